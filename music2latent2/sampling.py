"""Decoding samplers: pure functions of (model, latents, noise settings).

They work on unscaled latents shaped ``(S, T, K, d_lat)`` (S sequences of T chunks) and yield
finished spectrogram chunks ``(t, (S, C, F, chunk_frames))`` in time order, so the caller can
overlap-add each chunk into the waveform and drop it: memory stays flat in the audio length.
"""

from __future__ import annotations

from typing import Callable, Iterator, List, Optional, Sequence, Tuple, TypeVar

import torch

from .edm import karras_sigmas
from .model import Music2Latent2

__all__ = ["iter_autoregressive", "noise", "map_batches"]

Out = TypeVar("Out", torch.Tensor, List[torch.Tensor])


def noise(shape: Sequence[int], device: torch.device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Standard Gaussian noise on ``device``, drawn from ``generator`` (on its own device) if given."""
    if generator is None:
        return torch.randn(*shape, device=device)
    return torch.randn(*shape, device=generator.device, generator=generator).to(device, non_blocking=True)


def map_batches(fn: Callable[..., Out], max_batch_size: Optional[int], *args: torch.Tensor) -> Out:
    """Apply ``fn`` to slices of at most ``max_batch_size`` along dim 0 of every arg, concatenated.

    ``fn`` may return a tensor or a list of tensors (concatenated element-wise).
    """
    n = args[0].shape[0]
    if not max_batch_size or n <= max_batch_size:
        return fn(*args)
    parts = [fn(*(a[i:i + max_batch_size] for a in args)) for i in range(0, n, max_batch_size)]
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)  # type: ignore[return-value]
    return [torch.cat(level) for level in zip(*parts)]  # type: ignore[return-value]


def _window_cross(prev: List[torch.Tensor], cur: List[torch.Tensor]) -> List[torch.Tensor]:
    # (S, ...) per level for each chunk -> (S * 2, ...) chunk-major, as ConsistencyModel expects.
    return [torch.stack([p, c], dim=1).flatten(0, 1) for p, c in zip(prev, cur)]


def _evaluate(model: Music2Latent2, x: torch.Tensor, sigma: torch.Tensor, cross: List[torch.Tensor],
              max_batch_size: Optional[int]) -> torch.Tensor:
    w = x.shape[1]
    # Regroup cross from (S*W, ...) to (S, W, ...) so map_batches slices whole windows.
    cross_w = [c.unflatten(0, (-1, w)) for c in cross]

    def run(xb: torch.Tensor, sb: torch.Tensor, *cb: torch.Tensor) -> torch.Tensor:
        return model.denoise(xb, sb, [c.flatten(0, 1) for c in cb])

    return map_batches(run, max_batch_size, x, sigma, *cross_w)


def iter_autoregressive(model: Music2Latent2, latents: torch.Tensor, sigma_cond: float = 0.4,
                        denoising_steps: int = 1, generator: Optional[torch.Generator] = None,
                        max_batch_size: Optional[int] = None) -> Iterator[Tuple[int, torch.Tensor]]:
    """The paper's two-step autoregressive decoding (SPEC section 5).

    Chunk 0 is denoised alone in one step from sigma_max. For t > 0 the window
    ``[x_{t-1} + sigma_cond * eps, sigma_max * eps']`` is evaluated once: it yields chunk t and a
    refined chunk t-1, which is then final. ``denoising_steps > 1`` adds consistency steps per
    chunk: chunk t is re-noised to the next lower Karras level and the window evaluated again.

    Args:
        model: the network.
        latents: (S, T, K, d_lat) unscaled latents (the tanh range).
        sigma_cond: noise level the previous chunk is re-noised to.
        denoising_steps: model evaluations per chunk (>= 1).
        generator: source of all noise, for reproducible decoding.
        max_batch_size: sequences per model evaluation.

    Yields:
        (t, chunk (S, C, F, chunk_frames)) for t = 0 .. T-1, in order.
    """
    cfg = model.config
    s_count, t_count = latents.shape[:2]
    device = latents.device
    shape = (s_count, cfg.spec_channels, cfg.freq_bins, cfg.chunk_frames)
    extra_sigmas = karras_sigmas(denoising_steps, cfg.sigma_min, cfg.sigma_max, cfg.rho)[1:].tolist()

    def sig(*levels: float) -> torch.Tensor:
        return torch.tensor(levels, device=device, dtype=torch.float32).expand(s_count, len(levels))

    prev: Optional[torch.Tensor] = None
    prev_cross: List[torch.Tensor] = []
    for t in range(t_count):
        cross = map_batches(model.decoder_features, max_batch_size, latents[:, t])
        x = cfg.sigma_max * noise(shape, device, generator)
        if prev is None:
            cur = _evaluate(model, x[:, None], sig(cfg.sigma_max), cross, max_batch_size)[:, 0]
            for level in extra_sigmas:
                x = cur + level * noise(shape, device, generator)
                cur = _evaluate(model, x[:, None], sig(level), cross, max_batch_size)[:, 0]
        else:
            window_cross = _window_cross(prev_cross, cross)
            levels = [cfg.sigma_max] + extra_sigmas
            for step, level in enumerate(levels):
                if step > 0:
                    x = cur + level * noise(shape, device, generator)
                past = prev + sigma_cond * noise(shape, device, generator)
                out = _evaluate(model, torch.stack([past, x], dim=1), sig(sigma_cond, level), window_cross,
                                max_batch_size)
                refined, cur = out[:, 0], out[:, 1]
            yield t - 1, refined
        prev, prev_cross = cur, cross
    assert prev is not None
    yield t_count - 1, prev

