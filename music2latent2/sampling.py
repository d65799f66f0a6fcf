"""Decoding samplers: pure functions of (model, latents, noise settings).

They work on unscaled latents shaped ``(S, T, K, d_lat)`` (S sequences of T chunks) and yield
finished spectrogram chunks ``(t, (S, C, F, chunk_frames))`` in time order, so the caller can
overlap-add each chunk into the waveform and drop it: memory stays flat in the audio length.
:class:`AutoregressiveSampler` is the autoregressive one as a stepper, one chunk per call, for
latents that arrive over time (``streaming.StreamingDecoder``).
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, TypeVar

import numpy as np
import torch

from .edm import karras_sigmas
from .model import Music2Latent2

__all__ = ["AutoregressiveSampler", "iter_autoregressive", "iter_parallel", "noise", "map_batches",
           "DEFAULT_SIGMA_COND", "DEFAULT_DENOISING_STEPS", "PAPER_SIGMA_COND", "PAPER_DENOISING_STEPS",
           "MAX_DENOISING_STEPS", "check_sigma_cond", "check_denoising_steps"]

# The paper's decoding (IV-4, figure 3): one consistency step per chunk, context re-noised at 0.4.
PAPER_SIGMA_COND = 0.4
PAPER_DENOISING_STEPS = 1
# The library's defaults, chosen from the measured table in docs/decoding.md.
DEFAULT_SIGMA_COND = PAPER_SIGMA_COND
DEFAULT_DENOISING_STEPS = PAPER_DENOISING_STEPS
MAX_DENOISING_STEPS = 64


def check_sigma_cond(sigma_cond: object, sigma_min: Optional[float] = None, sigma_max: Optional[float] = None) -> float:
    """``sigma_cond`` as a float, or a ValueError saying why it cannot work.

    The context chunk is re-noised at sigma_cond and the network is evaluated there: it must be a
    finite number within the model's noise range [sigma_min, sigma_max] (0 would take log(0) in
    the noise embedding and give NaN audio; above sigma_max the network was never trained).
    Without the bounds (before a model is loaded) only positivity and finiteness are checked.
    """
    ok = isinstance(sigma_cond, (int, float, np.number)) and not isinstance(sigma_cond, bool) \
        and math.isfinite(float(sigma_cond)) and float(sigma_cond) > 0
    low = sigma_min if sigma_min is not None else 0.0
    high = sigma_max if sigma_max is not None else math.inf
    if not ok or not low <= float(sigma_cond) <= high:  # type: ignore[arg-type]
        where = f"between sigma_min={sigma_min:g} and sigma_max={sigma_max:g}" if sigma_min is not None \
            and sigma_max is not None else "a finite number > 0"
        raise ValueError(f"sigma_cond must be {where} (paper: {PAPER_SIGMA_COND}), got {sigma_cond!r}")
    return float(sigma_cond)  # type: ignore[arg-type]


def check_denoising_steps(steps: object) -> int:
    """``steps`` as an int in 1..MAX_DENOISING_STEPS, else TypeError/ValueError."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"denoising_steps must be an integer, got {steps!r} ({type(steps).__name__})")
    if not 1 <= int(steps) <= MAX_DENOISING_STEPS:
        raise ValueError(f"denoising_steps must be in 1..{MAX_DENOISING_STEPS} (the paper decodes with "
                         f"{PAPER_DENOISING_STEPS}), got {steps}")
    return int(steps)

Out = TypeVar("Out", torch.Tensor, List[torch.Tensor])


def noise(shape: Sequence[int], device: torch.device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Standard Gaussian noise on ``device``, drawn from ``generator`` (on its own device) if given."""
    if generator is None:
        return torch.randn(*shape, device=device)
    return torch.randn(*shape, device=generator.device, generator=generator).to(device, non_blocking=True)


def map_batches(fn: Callable[..., Out], max_batch_size: Optional[int], *args: torch.Tensor,
                pad: bool = False) -> Out:
    """Apply ``fn`` to slices of at most ``max_batch_size`` along dim 0 of every arg, concatenated.

    ``fn`` may return a tensor or a list of tensors (concatenated element-wise).

    Args:
        fn: the batched function.
        max_batch_size: slice size; None or 0 means one call on everything.
        *args: tensors sharing dim 0 (N).
        pad: give ``fn`` exactly ``max_batch_size`` rows every call, padding the last slice by
            repeating its last row and dropping the extra outputs. Shapes then never change,
            which is what ``torch.compile`` with static shapes needs (no recompilation).
            Rows must be independent in ``fn`` (true for every network here: no batch norm).
    """
    n = args[0].shape[0]
    if not max_batch_size or (n <= max_batch_size and not pad):
        return fn(*args)
    parts = []
    for i in range(0, n, max_batch_size):
        chunk = [a[i:i + max_batch_size] for a in args]
        rows = chunk[0].shape[0]
        if pad and rows < max_batch_size:
            # Repeat a real row rather than zeros so padded rows stay finite (sigma=0 is not valid).
            chunk = [torch.cat([c, c[-1:].expand(max_batch_size - rows, *c.shape[1:])]) for c in chunk]
        elif pad:
            # Full slices can be strided views whose strides depend on the audio length; compiled
            # code guards on strides, so hand it contiguous tensors or it recompiles per length.
            chunk = [c.contiguous() for c in chunk]
        out = fn(*chunk)
        if rows < max_batch_size and pad:
            out = out[:rows] if isinstance(out, torch.Tensor) else [o[:rows] for o in out]
        parts.append(out)
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return [torch.cat(level) for level in zip(*parts)]


def _window_cross(prev: List[torch.Tensor], cur: List[torch.Tensor]) -> List[torch.Tensor]:
    # (S, ...) per level for each chunk -> (S * 2, ...) chunk-major, as ConsistencyModel expects.
    return [torch.stack([p, c], dim=1).flatten(0, 1) for p, c in zip(prev, cur)]


def _evaluate(model: Music2Latent2, x: torch.Tensor, sigma: torch.Tensor, cross: List[torch.Tensor],
              max_batch_size: Optional[int], pad: bool = False, last_only: bool = False) -> torch.Tensor:
    """(S, W, C, F, T) windows -> their estimates; (S, 1, C, F, T) of the last chunk with ``last_only``."""
    w = x.shape[1]
    # Regroup cross from (S*W, ...) to (S, W, ...) so map_batches slices whole windows.
    cross_w = [c.unflatten(0, (-1, w)) for c in cross]

    def run(xb: torch.Tensor, sb: torch.Tensor, *cb: torch.Tensor) -> torch.Tensor:
        flat = [c.flatten(0, 1) for c in cb]
        return model.denoise(xb, sb, flat, last_only=True) if last_only and w > 1 else model.denoise(xb, sb, flat)

    return map_batches(run, max_batch_size, x, sigma, *cross_w, pad=pad)


def _sigma_table(levels: Sequence[float], rows: int, device: torch.device) -> torch.Tensor:
    """(rows, len(levels)) noise levels, built once before a loop: building a tensor from Python
    floats inside the loop would be a host-to-device copy every model evaluation on CUDA."""
    return torch.tensor(list(levels), dtype=torch.float32, device=device).expand(rows, len(levels)).contiguous()


def _noise_levels(model: Music2Latent2, denoising_steps: int) -> List[float]:
    """The noise levels of each chunk's consistency steps: sigma_max, then lower Karras levels."""
    cfg = model.config
    extra = karras_sigmas(denoising_steps, cfg.sigma_min, cfg.sigma_max, cfg.rho)[1:].tolist()
    return [cfg.sigma_max] + extra


class AutoregressiveSampler:
    """The paper's two-step autoregressive decoding, one chunk at a time (paper IV-4; docs/design.md
    section 5).

    Chunk 0 is denoised alone in one step from sigma_max. For t > 0 the window
    ``[x_{t-1} + sigma_cond * eps, sigma_max * eps']`` is evaluated once: it yields chunk t and a
    refined chunk t-1, which is then final. ``denoising_steps > 1`` adds consistency steps per
    chunk: chunk t is re-noised to the next lower Karras level and the window evaluated again.

    The state between chunks is the previous chunk's estimate and its decoder features, so
    chunks can arrive one by one (streaming) and the result does not depend on how they are
    grouped: :func:`iter_autoregressive` is this class driven over a whole latent sequence.

    Args:
        model: the network.
        sequences: S, the sequences decoded side by side.
        device: where the latents and noise live.
        sigma_cond: noise level the previous chunk is re-noised to.
        denoising_steps: model evaluations per chunk (>= 1).
        generator: source of all noise, for reproducible decoding.
        max_batch_size: sequences per model evaluation.
        pad: pad every model evaluation to ``max_batch_size`` rows (static shapes for
            ``torch.compile``); see :func:`map_batches`.
    """

    def __init__(self, model: Music2Latent2, sequences: int, device: torch.device,
                 sigma_cond: float = DEFAULT_SIGMA_COND, denoising_steps: int = DEFAULT_DENOISING_STEPS,
                 generator: Optional[torch.Generator] = None,
                 max_batch_size: Optional[int] = None, pad: bool = False) -> None:
        cfg = model.config
        self.model, self.sigma_cond, self.generator = model, sigma_cond, generator
        self.max_batch_size, self.pad, self.device = max_batch_size, pad, device
        self.shape = (sequences, cfg.spec_channels, cfg.freq_bins, cfg.chunk_frames)
        self.levels = _noise_levels(model, denoising_steps)
        # All noise levels as device tensors up front: stepping never touches the host.
        self._single = [_sigma_table([level], sequences, device) for level in self.levels]
        self._pairs = [_sigma_table([sigma_cond, level], sequences, device) for level in self.levels]
        self._prev: Optional[torch.Tensor] = None  # (S, C, F, chunk_frames): latest chunk's estimate
        self._prev_cross: List[torch.Tensor] = []
        self.chunks = 0

    def _noise(self) -> torch.Tensor:
        return noise(self.shape, self.device, self.generator)

    def _run(self, x: torch.Tensor, sigma: torch.Tensor, cross: List[torch.Tensor],
             last_only: bool = False) -> torch.Tensor:
        return _evaluate(self.model, x, sigma, cross, self.max_batch_size, self.pad, last_only)

    def step(self, latents: torch.Tensor, refine: bool = True) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """Decode the next chunk.

        Args:
            latents: (S, K, d_lat) unscaled latents of chunk t.
            refine: compute chunk t-1's refinement. Without it (a caller that never emits it,
                such as low-latency streaming) the window's context chunk is not de-patchified:
                chunk t's estimate is the same (to float rounding) for a quarter less work.
                Steps before the last never need it, so they skip it either way.

        Returns:
            (chunk t-1 refined, now final (None for t = 0 or without ``refine``); chunk t's
            estimate (S, C, F, chunk_frames), final only if no chunk follows).
        """
        cross = map_batches(self.model.decoder_features, self.max_batch_size, latents, pad=self.pad)
        x = self.model.config.sigma_max * self._noise()
        refined: Optional[torch.Tensor] = None
        if self._prev is None:
            cur = self._run(x[:, None], self._single[0], cross)[:, 0]
            for step, level in enumerate(self.levels[1:], start=1):
                x = cur + level * self._noise()
                cur = self._run(x[:, None], self._single[step], cross)[:, 0]
        else:
            window_cross = _window_cross(self._prev_cross, cross)
            for step, level in enumerate(self.levels):
                if step > 0:
                    x = cur + level * self._noise()
                past = self._prev + self.sigma_cond * self._noise()
                # Only the last step's refinement of chunk t-1 is ever returned.
                keep_refined = refine and step == len(self.levels) - 1
                out = self._run(torch.stack([past, x], dim=1), self._pairs[step], window_cross,
                                last_only=not keep_refined)
                cur = out[:, -1]
                if keep_refined:
                    refined = out[:, 0]
        self._prev, self._prev_cross = cur, cross
        self.chunks += 1
        return refined, cur


def iter_autoregressive(model: Music2Latent2, latents: torch.Tensor, sigma_cond: float = DEFAULT_SIGMA_COND,
                        denoising_steps: int = DEFAULT_DENOISING_STEPS, generator: Optional[torch.Generator] = None,
                        max_batch_size: Optional[int] = None, pad: bool = False,
                        ) -> Iterator[Tuple[int, torch.Tensor]]:
    """Autoregressive decoding of a whole latent sequence (see :class:`AutoregressiveSampler`).

    Args:
        model: the network.
        latents: (S, T, K, d_lat) unscaled latents (the tanh range).
        sigma_cond / denoising_steps / generator / max_batch_size / pad: as for
            :class:`AutoregressiveSampler`.

    Yields:
        (t, chunk (S, C, F, chunk_frames)) for t = 0 .. T-1, in order.
    """
    sampler = AutoregressiveSampler(model, latents.shape[0], latents.device, sigma_cond, denoising_steps,
                                    generator, max_batch_size, pad)
    cur = None
    for t in range(latents.shape[1]):
        refined, cur = sampler.step(latents[:, t])
        if refined is not None:
            yield t - 1, refined
    assert cur is not None
    yield latents.shape[1] - 1, cur


def iter_parallel(model: Music2Latent2, latents: torch.Tensor, sigma_cond: float = DEFAULT_SIGMA_COND,
                  denoising_steps: int = DEFAULT_DENOISING_STEPS, generator: Optional[torch.Generator] = None,
                  max_batch_size: Optional[int] = None, pad: bool = False,
                  ) -> Iterator[Tuple[int, torch.Tensor]]:
    """Parallel two-pass decoding: a constant number of batched passes instead of one per chunk.

    Pass 1 denoises every chunk independently from sigma_max (window of one chunk): estimate
    ``e_t``. Pass 2 evaluates, for every t > 0, the same two-chunk window the autoregressive
    sampler uses, ``[e_{t-1} + sigma_cond * eps, sigma_max * eps']``, but with the predecessor's
    *first-pass* estimate as context, so all windows are independent and run batched; chunk t
    is the window's second output. Chunk 0 has no predecessor: a second one-chunk pass would
    only draw another independent sample, so its first-pass estimate is kept as final.
    ``denoising_steps > 1`` adds consistency steps to the pass-2 windows (as in
    :func:`iter_autoregressive`); pass-1 estimates are only ever seen re-noised at sigma_cond.

    Chunks are processed in groups of ``max(1, max_batch_size // S)`` time steps, so memory is
    bounded by the batch size, not the audio length. Noise is drawn per chunk in time order
    (``eps'_t``, ``eps_t``, then pass-1 noise), so the output does not depend on
    ``max_batch_size``, and with ``denoising_steps=1`` and one or two chunks it equals
    :func:`iter_autoregressive`'s for the same generator state (chunk 0 then differs only by
    autoregressive mode's sigma_cond refinement of it when there are two). With more steps the
    extra noise is drawn in another order and chunk 0 keeps its single step, so they differ.

    Args:
        model: the network.
        latents: (S, T, K, d_lat) unscaled latents (the tanh range).
        sigma_cond: noise level the predecessor's estimate is re-noised to.
        denoising_steps: model evaluations per chunk in pass 2 (>= 1).
        generator: source of all noise, for reproducible decoding.
        max_batch_size: windows per model evaluation (None: everything in one group).
        pad: pad every model evaluation to ``max_batch_size`` rows (static shapes).

    Yields:
        (t, chunk (S, C, F, chunk_frames)) for t = 0 .. T-1, in order.
    """
    cfg = model.config
    s_count, t_count, device = latents.shape[0], latents.shape[1], latents.device
    shape = (s_count, cfg.spec_channels, cfg.freq_bins, cfg.chunk_frames)
    levels = _noise_levels(model, denoising_steps)
    extra_sigmas = levels[1:]
    group = t_count if not max_batch_size else max(1, max_batch_size // s_count)
    single = _sigma_table([cfg.sigma_max], s_count * group, device)
    pairs = [_sigma_table([sigma_cond, level], s_count * group, device) for level in levels]

    def flat(x: torch.Tensor) -> torch.Tensor:  # (S, G, ...) -> (S*G, ...), sequence-major
        return x.flatten(0, 1)

    carry: Optional[Tuple[torch.Tensor, List[torch.Tensor]]] = None  # (e_{t0-1}, its cross)
    for t0 in range(0, t_count, group):
        t1 = min(t0 + group, t_count)
        g = t1 - t0
        cross = map_batches(model.decoder_features, max_batch_size, flat(latents[:, t0:t1]), pad=pad)
        cross = [c.unflatten(0, (s_count, g)) for c in cross]  # (S, G, ...)
        # Noise per chunk in time order, independent of the grouping.
        fresh, cond, first = [], [], []
        for t in range(t0, t1):
            if t > 0:
                fresh.append([cfg.sigma_max * noise(shape, device, generator)]
                             + [level * noise(shape, device, generator) for level in extra_sigmas])
                cond.append([sigma_cond * noise(shape, device, generator) for _ in levels])
            if t < t_count - 1:  # the last chunk's estimate is never anyone's context
                first.append(cfg.sigma_max * noise(shape, device, generator))

        # Pass 1: one-chunk windows for chunks t0 .. min(t1, T-1) - 1.
        n1 = len(first)
        est = None
        if n1:
            x1 = torch.stack(first, dim=1)  # (S, n1, ...)
            c1 = [c[:, :n1] for c in cross]
            est = _evaluate(model, flat(x1)[:, None], single[:s_count * n1], [flat(c) for c in c1],
                            max_batch_size, pad)[:, 0].unflatten(0, (s_count, n1))
        # Context of chunk t is e_{t-1}: the carried estimate, then this group's.
        ctx_est = [carry[0][:, None]] if carry is not None else []
        ctx_cross = [[c[:, None] for c in carry[1]]] if carry is not None else []
        if est is not None:
            ctx_est.append(est)
            ctx_cross.append([c[:, :n1] for c in cross])
        finals: List[torch.Tensor] = []
        if t0 == 0:
            finals.append(est[:, 0] if est is not None else None)  # type: ignore[arg-type]
        n2 = len(fresh)
        if n2:
            past_est = torch.cat(ctx_est, dim=1)[:, :n2]  # e_{t-1} for t = max(t0, 1) .. t1-1
            past_cross = [torch.cat(level, dim=1)[:, :n2] for level in zip(*ctx_cross)]
            cur_cross = [c[:, g - n2:] for c in cross]
            window_cross = [torch.stack([p, c], dim=2).flatten(0, 2) for p, c in zip(past_cross, cur_cross)]
            cur: Optional[torch.Tensor] = None
            for step in range(len(levels)):
                x = torch.stack([f[step] for f in fresh], dim=1)
                if cur is not None:  # every step after the first
                    x = cur + x  # re-noise the current estimate to the next lower level
                past = past_est + torch.stack([c[step] for c in cond], dim=1)
                out = _evaluate(model, torch.stack([flat(past), flat(x)], dim=1), pairs[step][:s_count * n2],
                                window_cross, max_batch_size, pad, last_only=True)  # the context is never kept
                cur = out[:, -1].unflatten(0, (s_count, n2))
            finals.extend(cur.unbind(1))  # type: ignore[union-attr]
        if est is not None:
            carry = (est[:, -1], [c[:, n1 - 1] for c in cross])
        if finals and finals[0] is None:
            # A single-chunk input: the one chunk is the last one, with no pass-1 noise drawn.
            x = cfg.sigma_max * noise(shape, device, generator)
            finals[0] = _evaluate(model, x[:, None], single[:s_count], [c[:, 0] for c in cross],
                                  max_batch_size, pad)[:, 0]
        for offset, chunk in enumerate(finals):
            yield t0 + offset, chunk
