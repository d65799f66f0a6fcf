"""Decoder diagnostics on held-out audio: what a training recipe has taught the network.

Reconstruction scores mix everything together; these separate the parts (docs/recipe.md):

- one-step error per noise level: a single denoiser call on a chunk noised at sigma, with its
  true latents. One-step decoding starts at sigma_max, so that is the number that matters most;
  a recipe that never trains high sigma is good at sigma <= 1 and poor at 80.
- context gain: how much better the second chunk of a window comes out (from sigma_max) with its
  true predecessor as context, re-noised at sigma_cond, than alone. Zero: the context is ignored.
- latent use: how much the output changes when the chunk's latents are swapped for its
  neighbour's in the same clip, relative to how much it changes with a new noise seed. Below 1:
  the decoder hears the clip's timbre but not what happens from one chunk to the next.

Every number is computed on the compressed spectrogram the network works on, in float32, with a
fixed seed, so two recipes are compared on the very same noise.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch

from ..audio import load_audio, resample
from ..latent_health import latent_health
from ..model import Music2Latent2
from ..spectral import ChunkGeometry
from .losses import split_chunks

__all__ = ["DIAGNOSTIC_SIGMAS", "heldout_windows", "decoder_diagnostics"]

DIAGNOSTIC_SIGMAS = (0.05, 0.2, 0.4, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


def heldout_windows(paths: Sequence[Path], model: Music2Latent2, windows_per_file: int = 4,
                    peak_db: float = -6.0, silence_db: float = -50.0) -> torch.Tensor:
    """Two-chunk training windows ``(N, audio_channels, span(2))`` cut evenly from each file.

    Each window is peak-normalised to ``peak_db`` dBFS (the middle of the training gains), so the
    diagnostics measure the network, not the level of the recording. Near-silent windows are left
    out. Deterministic: the same files always give the same windows.
    """
    cfg = model.config
    span = ChunkGeometry.from_config(cfg).span(2)
    out: List[torch.Tensor] = []
    for path in paths:
        data, sr = load_audio(path)
        wav = resample(torch.from_numpy(data), sr, cfg.sample_rate)
        wav = wav.mean(0, keepdim=True) if cfg.audio_channels == 1 else (
            wav[:2] if wav.shape[0] >= 2 else wav.expand(2, -1))
        n = wav.shape[-1]
        if n < span:
            continue
        starts = np.linspace(0, n - span, windows_per_file + 2)[1:-1].astype(int)
        for s in starts:
            w = wav[:, s:s + span]
            if float(w.pow(2).mean().sqrt()) < 10 ** (silence_db / 20):
                continue
            out.append(w * (10 ** (peak_db / 20) / float(w.abs().max())))
    if not out:
        raise ValueError("no non-silent two-chunk window in the held-out files")
    return torch.stack(out).float()


def _linear_power(spec: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Compressed (..., 2*ac, F, T) -> power of the uncompressed STFT, summed over everything but dim 0."""
    re, im = spec[:, :, 0::2], spec[:, :, 1::2]
    mag = (re.pow(2) + im.pow(2)).sqrt()
    return ((mag / beta) ** (1 / alpha)).pow(2).flatten(1).sum(-1)


@torch.no_grad()
def decoder_diagnostics(model: Music2Latent2, windows: torch.Tensor, sigmas: Sequence[float] = DIAGNOSTIC_SIGMAS,
                        sigma_cond: float = 0.4, seed: int = 0, batch_size: int = 16,
                        boundary_frames: int = 8) -> Dict[str, object]:
    """One-step error per sigma, context gain, latent use and latent health of held-out windows.

    Args:
        model: the network (evaluated in eval mode, float32, on its own device).
        windows: (N, audio_channels, span(2)) from :func:`heldout_windows`.
        sigmas: noise levels of the one-step table.
        sigma_cond: the context chunk's noise level (inference's).
        seed: noise seed (the same for every recipe compared).
        batch_size: windows per model call.
        boundary_frames: frames at the start of the second chunk where the context matters most.

    Returns:
        {"one_step": {sigma: {"nmse", "level_db"}}, "context": {"nmse_alone", "nmse_with_context",
        "gain_db", "boundary_gain_db"}, "latent_use": float, "health": latent_health(...)}.
        nmse is ||f - x||^2 / ||x||^2 on the compressed spectrogram; level_db is the power of the
        estimate relative to the clean chunk, uncompressed (0 dB: the right level).
    """
    was_training = model.training
    model.eval()
    cfg = model.config
    device = model.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sums: Dict[str, float] = {}

    def add(key: str, value: torch.Tensor) -> None:
        sums[key] = sums.get(key, 0.0) + float(value.sum())

    health_clips: List[np.ndarray] = []
    for start in range(0, windows.shape[0], batch_size):
        wav = windows[start:start + batch_size].to(device)
        x = split_chunks(model.spectral(wav), cfg.chunk_frames)  # (B, 2, C, F, T)
        b = x.shape[0]
        latents, _ = model.encode_chunks(x.flatten(0, 1))  # (B*2, K, d)
        health_clips += list(latents.view(b, 2, *latents.shape[1:]).double().cpu().numpy())
        cross = model.decoder_features(latents)  # chunk-major (B*2, ...)
        first = [c.view(b, 2, *c.shape[1:])[:, 0] for c in cross]
        second = [c.view(b, 2, *c.shape[1:])[:, 1] for c in cross]
        x1, x2 = x[:, 0], x[:, 1]
        energy1 = x1.pow(2).flatten(1).sum(-1)
        power1 = _linear_power(x1, cfg.spec_alpha, cfg.spec_beta)
        for sigma in sigmas:
            eps = torch.randn(x1.shape, generator=gen).to(device)
            s = torch.full((b, 1), float(sigma), device=device)
            f = model.denoise((x1 + sigma * eps)[:, None], s, first)[:, 0]
            add(f"err@{sigma}", (f - x1).pow(2).flatten(1).sum(-1))
            add(f"pow@{sigma}", _linear_power(f, cfg.spec_alpha, cfg.spec_beta))
        add("energy1", energy1)
        add("power1", power1)

        # Context: chunk 2 from sigma_max, alone and after its true predecessor at sigma_cond.
        eps2 = cfg.sigma_max * torch.randn(x2.shape, generator=gen).to(device)
        ctx = x1 + sigma_cond * torch.randn(x1.shape, generator=gen).to(device)
        alone = model.denoise(eps2[:, None], torch.full((b, 1), cfg.sigma_max, device=device), second)[:, 0]
        window_cross = [torch.stack([p, q], 1).flatten(0, 1) for p, q in zip(first, second)]
        sig2 = torch.tensor([[sigma_cond, cfg.sigma_max]], device=device).expand(b, 2)
        with_ctx = model.denoise(torch.stack([ctx, eps2], 1), sig2, window_cross)[:, 1]
        edge = slice(0, boundary_frames)
        add("ctx_alone", (alone - x2).pow(2).flatten(1).sum(-1))
        add("ctx_with", (with_ctx - x2).pow(2).flatten(1).sum(-1))
        add("edge_alone", (alone - x2)[..., edge].pow(2).flatten(1).sum(-1))
        add("edge_with", (with_ctx - x2)[..., edge].pow(2).flatten(1).sum(-1))
        add("energy2", x2.pow(2).flatten(1).sum(-1))

        # Latent use: chunk 2's latents swapped for chunk 1's, against a second noise seed.
        other_seed = model.denoise((cfg.sigma_max * torch.randn(x2.shape, generator=gen).to(device))[:, None],
                                   torch.full((b, 1), cfg.sigma_max, device=device), second)[:, 0]
        swapped = model.denoise(eps2[:, None], torch.full((b, 1), cfg.sigma_max, device=device), first)[:, 0]
        add("use_swap", (swapped - alone).pow(2).flatten(1).sum(-1))
        add("use_seed", (other_seed - alone).pow(2).flatten(1).sum(-1))
    model.train(was_training)

    def db(ratio: float) -> float:
        return 10 * math.log10(max(ratio, 1e-20))

    one_step = {float(s): {"nmse": sums[f"err@{s}"] / sums["energy1"],
                           "level_db": db(sums[f"pow@{s}"] / sums["power1"])} for s in sigmas}
    context = {"nmse_alone": sums["ctx_alone"] / sums["energy2"],
               "nmse_with_context": sums["ctx_with"] / sums["energy2"],
               "gain_db": db(sums["ctx_alone"] / max(sums["ctx_with"], 1e-20)),
               "boundary_gain_db": db(sums["edge_alone"] / max(sums["edge_with"], 1e-20))}
    return {"one_step": one_step, "context": context,
            "latent_use": math.sqrt(sums["use_swap"] / max(sums["use_seed"], 1e-20)),
            "health": latent_health(health_clips)}
