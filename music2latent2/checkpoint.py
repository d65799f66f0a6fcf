"""Inference checkpoints: ``model.safetensors`` with the ModelConfig in its metadata.

No pickles: tensors come from safetensors, the config from JSON in the file's metadata.
Loading is strict: a missing, unexpected or mis-shaped tensor is an error naming it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .model import Music2Latent2

__all__ = ["FORMAT_VERSION", "WEIGHTS_NAME", "save_checkpoint", "load_checkpoint", "read_metadata",
           "CheckpointError"]

FORMAT_VERSION = "1"
WEIGHTS_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, corrupt, or does not match its config."""


def _weights_path(path: Union[str, os.PathLike]) -> Path:
    p = Path(path)
    return p / WEIGHTS_NAME if p.is_dir() else p


def save_checkpoint(model: Music2Latent2, path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None,
                    extra_metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write the model's weights and config atomically (temp file + rename).

    Args:
        path: a directory (``model.safetensors`` and ``config.json`` are written inside) or a
            ``.safetensors`` file path.
        dtype: store floating-point tensors in this dtype (e.g. torch.float16 to halve the size).
    """
    p = Path(path)
    if p.suffix != ".safetensors":
        p.mkdir(parents=True, exist_ok=True)
        (p / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2, sort_keys=True) + "\n")
        p = p / WEIGHTS_NAME
    p.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[name] = t.contiguous()
    metadata = {"format": "pt", "music2latent2_format_version": FORMAT_VERSION, "config": model.config.to_json()}
    metadata.update(extra_metadata or {})
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=p.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p


def read_metadata(path: Union[str, os.PathLike]) -> Dict[str, str]:
    """The safetensors metadata of a checkpoint, checked for a config and a known format version."""
    from safetensors import safe_open

    p = _weights_path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint {p}: not a valid safetensors file ({err})") from err
    if "config" not in meta:
        raise CheckpointError(f"checkpoint {p} has no model config in its metadata")
    version = meta.get("music2latent2_format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {p} has format version {version!r}; this library reads {FORMAT_VERSION!r}")
    return meta


def load_checkpoint(path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu") -> Music2Latent2:
    """Build a model from a checkpoint file or directory, strictly. Weights load as float32."""
    p = _weights_path(path)
    meta = read_metadata(p)
    try:
        config = ModelConfig.from_json(meta["config"])
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint {p} has an invalid model config: {err}") from err
    try:
        tensors = load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint {p}: {err}") from err
    model = Music2Latent2(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
                   for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected}")
        if wrong:
            parts.append(f"mis-shaped tensors {wrong}")
        raise CheckpointError(f"checkpoint {p} does not match its config: " + "; ".join(parts))
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"checkpoint {p} has non-finite values in {bad[:5]}")
    model.load_state_dict({k: t.float() if t.is_floating_point() else t for k, t in tensors.items()}, strict=True)
    return model.to(map_location).eval()
