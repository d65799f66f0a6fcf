"""EMA weights -> an inference checkpoint, with the latent scale measured on training data."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Dict, Iterable, Union

import torch

from ..model import Music2Latent2
from .losses import split_chunks

__all__ = ["measure_latent_scale", "export_checkpoint"]


@torch.no_grad()
def measure_latent_scale(model: Music2Latent2, batches: Iterable[torch.Tensor], max_batches: int = 8) -> float:
    """1 / std of the model's tanh latents over a few training batches.

    Args:
        model: the (EMA) network.
        batches: crops (B, audio_channels, 67072), e.g. from the training loader.
        max_batches: how many batches to encode.

    Returns:
        The ``latent_scale`` that gives user latents roughly unit standard deviation.
    """
    device = model.device
    was_training = model.training
    model.eval()
    total, total_sq, count = 0.0, 0.0, 0
    for n, wav in enumerate(batches):
        if n >= max_batches:
            break
        spec = model.spectral(wav.to(device).float())
        chunks = split_chunks(spec, model.config.chunk_frames).flatten(0, 1)  # (B*2, C, F, T)
        z, _ = model.encode_chunks(chunks)
        z = z.double()
        total += float(z.sum())
        total_sq += float(z.pow(2).sum())
        count += z.numel()
    model.train(was_training)
    if count == 0:
        raise ValueError("no batches to measure the latent scale on")
    var = total_sq / count - (total / count) ** 2
    std = max(var, 0.0) ** 0.5
    if std < 1e-6:
        raise ValueError(f"latents have near-zero standard deviation ({std:.2e}); cannot set a latent scale")
    return 1.0 / std


def export_checkpoint(model: Music2Latent2, path: Union[str, os.PathLike], latent_scale: float | None = None,
                      dtype: torch.dtype | None = None, step: int | None = None,
                      delta: float | None = None) -> Path:
    """Write an inference checkpoint of ``model`` (:meth:`Music2Latent2.save_pretrained`).

    Args:
        model: usually ``trainer.ema``; it is copied, not changed.
        path: output directory or ``.safetensors`` file.
        latent_scale: stored in the config (default: keep the model's).
        dtype: e.g. torch.float16 to halve the file.
        step: training step, recorded in the metadata (``training_step``).
        delta: the consistency step at ``step`` (``training_delta``), where a run continuing
            from this checkpoint resumes its delta schedule.
    """
    out = copy.deepcopy(model).cpu()
    if latent_scale is not None:
        out.config = out.config.replace(latent_scale=float(latent_scale))
    extra: Dict[str, str] = {}
    if step is not None:
        extra["training_step"] = str(step)
    if delta is not None:
        extra["training_delta"] = repr(float(delta))
    return out.save_pretrained(path, dtype=dtype, extra_metadata=extra or None)
