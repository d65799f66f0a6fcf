"""Consistency-training loss (paper IV-3; docs/design.md section 4): noise-level sampling, step schedule, pseudo-Huber.

The network sees a window of two consecutive chunks. Both are encoded and decoded
independently (features computed once, shared by student and teacher), get independent noise
indices ``i``, and are noised with the same ``eps`` at two neighbouring levels: the student at
``sigma(i)``, the teacher (the same network, no gradient) at ``sigma(max(i - delta, 0))``.
"""

from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch
from torch import nn

from ..config import ModelConfig
from ..edm import index_from_sigma, sigma_from_index
from ..model import Music2Latent2

__all__ = ["consistency_step_delta", "NoiseIndexSampler", "pseudo_huber", "split_chunks", "consistency_loss",
           "LOSS_WEIGHTINGS", "loss_weight", "ContextPairs", "ConsistencyLoss", "draw_noise", "spectrogram_windows"]

LOSS_WEIGHTINGS = ("inverse_delta", "edm")


def consistency_step_delta(step: int, total_steps: int, start: float = 0.1, end: float = 1e-3,
                           start_step: int = 0) -> float:
    """Consistency step in index units, geometric from ``start`` to ``end`` over the run.

    ``delta(p) = start * (end / start) ** p`` with progress ``p`` = (step - start_step) /
    (total_steps - start_step) clipped to [0, 1]. With the defaults this is the paper's (v1)
    schedule ``max(0.1 ** (1 + 2k/K), 1e-3)``: 0.1 -> 0.01 -> 0.001.

    ``start >= 1`` makes every teacher evaluate at sigma_min, where the consistency
    parametrisation returns its input: the target is the clean chunk and the loss is a plain
    denoising reconstruction (the first phase of Easy Consistency Tuning, see docs).
    """
    span = max(total_steps - start_step, 1)
    progress = min(max((step - start_step) / span, 0.0), 1.0)
    return float(start * (end / start) ** progress)


class NoiseIndexSampler:
    """Draws continuous noise indices ``i`` in (0, 1] so that log(sigma(i)) ~ N(mean, std).

    A fine grid of ``i`` is weighted by the probability the normal distribution of log(sigma)
    gives each cell (the mass between the log-sigmas of its edges), a cell is drawn from those
    weights, then a uniform offset inside the cell makes ``i`` continuous. So log(sigma) follows
    the normal truncated to [log sigma_min, log sigma_max], as documented.

    Args:
        config: the model config (sigma_min, sigma_max, rho).
        mean / std: of log(sigma).
        grid: cells of the index grid.
        uniform_share: this share of the draws is uniform in the index instead (Karras-uniform:
            23% of them above sigma 20), so the one-step decoder from sigma_max gets trained.
        legacy_density: weight each cell by the normal *density* at its centre, as v1's code and
            this project's first leg did. That forgets the d log(sigma)/di factor of the change of
            variable, so log(sigma) comes out with mean about -0.56, not -1.1 (noise ~1.7x
            higher than asked). Kept so that a run started that way resumes unchanged.
    """

    def __init__(self, config: ModelConfig, mean: float = -1.1, std: float = 2.0, grid: int = 10000,
                 uniform_share: float = 0.0, legacy_density: bool = False) -> None:
        if not std > 0 or not 0 <= uniform_share <= 1:
            raise ValueError(f"need std > 0 and 0 <= uniform_share <= 1, got {std} and {uniform_share}")
        edges = torch.linspace(0.0, 1.0, grid + 1, dtype=torch.float64)
        if legacy_density:
            centres = (edges[:-1] + edges[1:]) / 2
            log_sigma = torch.log(sigma_from_index(centres, config.sigma_min, config.sigma_max, config.rho).double())
            weights = torch.exp(-0.5 * ((log_sigma - mean) / std) ** 2)
        else:
            log_edges = torch.log(sigma_from_index(edges, config.sigma_min, config.sigma_max, config.rho).double())
            cdf = torch.special.ndtr((log_edges - mean) / std)
            weights = cdf[1:] - cdf[:-1]
        if not float(weights.sum()) > 0:
            raise ValueError(f"log-sigma N({mean}, {std}) puts no mass between sigma_min and sigma_max")
        probs = (1 - uniform_share) * weights / weights.sum() + uniform_share / grid
        self.probs = probs.float()
        self.cell = 1.0 / grid

    def sample(self, shape: Tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
        """Indices of the given shape (float32, on the generator's device)."""
        n = math.prod(shape)
        device = generator.device if generator is not None else torch.device("cpu")
        if self.probs.device != device:  # draw on the generator's device (the GPU in training)
            self.probs = self.probs.to(device)
        cells = torch.multinomial(self.probs, n, replacement=True, generator=generator)
        offset = torch.rand(n, generator=generator, device=device)
        return ((cells.float() + offset) * self.cell).clamp(1e-6, 1.0).reshape(shape)


class ContextPairs:
    """Makes some training windows look like inference: a lightly noised context chunk before
    the chunk being decoded.

    At inference the first chunk of every window is the previous output re-noised at sigma_cond
    (0.4) and the second starts from sigma_max. Independent draws make that pair rare, so the
    network can ignore the context and still score well. For a share of the windows this sets the
    first chunk's log-sigma to N(log(sigma), log_std) and the second chunk's index uniform in
    [min_index, 1], the upper part of the noise range, where the context is the most useful.

    Args:
        share: probability that a window gets a context pair.
        sigma: centre of the context chunk's noise level.
        log_std: spread of the context chunk's log-sigma.
        min_index: lowest noise index of the second chunk (0.5 is sigma 1.9 with the paper's
            constants).
    """

    def __init__(self, config: ModelConfig, share: float, sigma: float = 0.4, log_std: float = 0.5,
                 min_index: float = 0.5) -> None:
        if not 0 <= share <= 1 or not config.sigma_min < sigma < config.sigma_max or log_std < 0 \
                or not 0 <= min_index < 1:
            raise ValueError(f"context pairs need 0 <= share <= 1, sigma in (sigma_min, sigma_max), log_std >= 0 "
                             f"and 0 <= min_index < 1; got {share}, {sigma}, {log_std}, {min_index}")
        self.config, self.share, self.sigma, self.log_std, self.min_index = config, share, sigma, log_std, min_index

    def apply(self, index: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 2) indices -> the same with some windows replaced by context pairs."""
        if self.share <= 0:
            return index
        cfg = self.config
        b = index.shape[0]
        device = index.device
        chosen = torch.rand(b, generator=generator, device=device) < self.share
        log_sigma = math.log(self.sigma) + self.log_std * torch.randn(b, generator=generator, device=device)
        sigma = log_sigma.exp().clamp(cfg.sigma_min * 1.001, cfg.sigma_max)
        left = index_from_sigma(sigma, cfg.sigma_min, cfg.sigma_max, cfg.rho).clamp(1e-6, 1.0)
        right = self.min_index + (1 - self.min_index) * torch.rand(b, generator=generator, device=device)
        pair = torch.stack([left, right], dim=1).to(index.dtype)
        return torch.where(chosen[:, None], pair, index)


def loss_weight(weighting: str, sig_hi: torch.Tensor, sig_lo: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """Per-chunk weight of the consistency distance.

    ``"inverse_delta"`` (v1): 1 / (sigma_hi - sigma_lo). Above sigma ~5 the gap between
    neighbouring Karras levels grows so fast that these chunks get almost no gradient.
    ``"edm"``: the same times sqrt(sigma_hi^2 + sigma_data^2) / sigma_data, i.e. v1's weight at
    low noise and, while the teacher sits at sigma_min (the denoising start of the ECT schedule),
    exactly 1 / c_out: the distance measured in units of the network's own output, EDM's
    weighting, under which every noise level asks the network for the same effort.
    """
    inverse = 1.0 / (sig_hi - sig_lo).clamp_min(1e-8)
    if weighting == "inverse_delta":
        return inverse
    if weighting == "edm":
        return inverse * (sig_hi.pow(2) + sigma_data ** 2).sqrt() / sigma_data
    raise ValueError(f"loss weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """sqrt(||a - b||^2 + c^2) - c over all but the leading two axes: (B, W, ...) -> (B, W)."""
    sq = (a.float() - b.float()).pow(2).flatten(2).sum(-1)
    return torch.sqrt(sq + c * c) - c


def split_chunks(spec: torch.Tensor, chunk_frames: int) -> torch.Tensor:
    """(B, C, F, 2 * chunk_frames) spectrogram -> (B, 2, C, F, chunk_frames) window of chunks."""
    b, c, f, t = spec.shape
    if t != 2 * chunk_frames:
        raise ValueError(f"expected {2 * chunk_frames} frames (two chunks), got {t}")
    return spec.reshape(b, c, f, 2, chunk_frames).permute(0, 3, 1, 2, 4).contiguous()


def draw_noise(config: ModelConfig, batch: int, sampler: NoiseIndexSampler, generator: torch.Generator | None = None,
               context: ContextPairs | None = None, device: torch.device | None = None,
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The random part of one loss evaluation, drawn outside the (compilable) loss.

    Returns:
        (student noise indices ``(B, 2)``, Gaussian noise ``(B, 2, C, F, chunk_frames)``), on
        ``device`` (default: the generator's). The draw order (indices, context pairs, noise) is
        what fixes a run's noise stream.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    device = device or gen_device
    i_hi = sampler.sample((batch, 2), generator)
    if context is not None:
        i_hi = context.apply(i_hi, generator)
    shape = (batch, 2, config.spec_channels, config.freq_bins, config.chunk_frames)
    eps = torch.randn(shape, generator=generator, device=gen_device)  # same eps at both levels
    return i_hi.to(device), eps.to(device)


class ConsistencyLoss(nn.Module):
    """The whole training loss as one module: student, teacher, distance and statistics.

    Its ``forward`` is a pure function of its inputs (the noise is drawn outside by
    :func:`draw_noise`, the consistency step comes as a 0-d tensor), so ``torch.compile(...,
    fullgraph=True)`` captures it as one graph that never recompiles as delta shrinks, and a
    data-parallel wrapper can treat it as the module whose forward is the loss.

    Args:
        model: the online network (student and, under no_grad, teacher).
        autocast_dtype: e.g. torch.bfloat16 to run the network under autocast.
        latent_penalty: weight of ``mean(relu(|pre| - pre_tanh_limit) ** 2)`` on the encoder's
            pre-tanh values: zero while they stay in range, a pull back once the tanh would
            saturate (a saturated tanh passes no gradient and wastes the latent range).
        pre_tanh_limit: where the penalty starts (tanh(2) = 0.96).
        weighting: :func:`loss_weight`'s scheme.
    """

    def __init__(self, model: Music2Latent2, autocast_dtype: torch.dtype | None = None, latent_penalty: float = 0.0,
                 pre_tanh_limit: float = 2.0, weighting: str = "inverse_delta") -> None:
        super().__init__()
        if weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")
        self.model = model
        self.autocast_dtype = autocast_dtype
        self.latent_penalty, self.pre_tanh_limit, self.weighting = latent_penalty, pre_tanh_limit, weighting

    def forward(self, x: torch.Tensor, i_hi: torch.Tensor, eps: torch.Tensor,
                delta: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """
        Args:
            x: (B, 2, C, F, T) clean spectrogram windows (:func:`split_chunks`).
            i_hi: (B, 2) student noise indices.
            eps: (B, 2, C, F, T) Gaussian noise, shared by student and teacher.
            delta: 0-d tensor, the consistency step in index units.

        Returns:
            (scalar loss with grad, 0-d tensor stats: ``sigma_mean``, ``delta_sigma_mean``,
            ``saturated`` (fraction of latents with |tanh| > 0.99), ``pre_tanh_std``,
            ``latent_penalty`` (the unweighted penalty), ``high_sigma_share`` (share of the
            weighted loss from chunks above sigma 5, where one-step decoding starts), and the
            detached ``latents`` (B, 2, K, d_lat)).
        """
        model = self.model
        cfg = model.config
        device = x.device
        b, w = x.shape[:2]
        i_lo = (i_hi - delta).clamp_min(0.0)
        sig_hi = sigma_from_index(i_hi, cfg.sigma_min, cfg.sigma_max, cfg.rho).to(device)
        sig_lo = sigma_from_index(i_lo, cfg.sigma_min, cfg.sigma_max, cfg.rho).to(device)
        view = (b, w, 1, 1, 1)
        autocast = torch.autocast(device_type=device.type, dtype=self.autocast_dtype or torch.float32,
                                  enabled=self.autocast_dtype is not None)
        with autocast:
            _, features = model.encode_chunks(x.flatten(0, 1))  # chunks independent
            pre = model.encoder.latent_out(features).float()  # (B*2, K, d_lat) before the tanh
            latents = torch.tanh(pre)
            cross: List[torch.Tensor] = model.decoder_features(latents)  # chunk-major, as denoise expects
            with torch.no_grad():
                target = model.denoise(x + sig_lo.view(view) * eps, sig_lo, [c.detach() for c in cross])
            pred = model.denoise(x + sig_hi.view(view) * eps, sig_hi, cross)

        d = x[0, 0].numel()  # elements per chunk
        dist = pseudo_huber(pred, target.detach(), 0.00054 * math.sqrt(d))  # (B, 2)
        weighted = dist * loss_weight(self.weighting, sig_hi, sig_lo, cfg.sigma_data)  # (B, 2)
        loss = weighted.mean()
        penalty = torch.relu(pre.abs() - self.pre_tanh_limit).pow(2).mean()
        if self.latent_penalty > 0:
            loss = loss + self.latent_penalty * penalty
        pre = pre.detach()
        weighted = weighted.detach()
        # Tensors, not floats: the trainer reads them on log steps only (no host sync per step).
        stats = {"sigma_mean": sig_hi.mean(), "delta_sigma_mean": (sig_hi - sig_lo).mean(),
                 "saturated": (latents.detach().abs() > 0.99).float().mean(), "pre_tanh_std": pre.std(),
                 "latent_penalty": penalty.detach(),
                 "high_sigma_share": (weighted * (sig_hi > 5)).sum() / weighted.sum().clamp_min(1e-30),
                 "latents": latents.detach().view(b, w, *latents.shape[1:])}
        return loss, stats


def spectrogram_windows(model: Music2Latent2, wav: torch.Tensor) -> torch.Tensor:
    """(B, audio_channels, 67072) crops -> (B, 2, C, F, chunk_frames) clean windows, in float32."""
    with torch.autocast(device_type=wav.device.type, enabled=False):
        spec = model.spectral(wav.float())  # (B, C, F, 128)
    return split_chunks(spec, model.config.chunk_frames)


def consistency_loss(model: Music2Latent2, wav: torch.Tensor, delta: float, sampler: NoiseIndexSampler,
                     generator: torch.Generator | None = None, autocast_dtype: torch.dtype | None = None,
                     latent_penalty: float = 0.0, pre_tanh_limit: float = 2.0, weighting: str = "inverse_delta",
                     context: ContextPairs | None = None, keep_latents: bool = False,
                     ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """One eager consistency-training loss evaluation: noise drawn, then :class:`ConsistencyLoss`.

    Args:
        model: the online network.
        wav: (B, audio_channels, 67072) crops: exactly two chunks of STFT frames.
        delta: consistency step in index units (:func:`consistency_step_delta`).
        sampler: noise index sampler.
        generator: generator for indices and noise, ideally on the model's device (its state is
            part of the training state).
        autocast_dtype / latent_penalty / pre_tanh_limit / weighting: see :class:`ConsistencyLoss`.
        context: :class:`ContextPairs` to mix in, or None.
        keep_latents: keep ``stats["latents"]`` (B, 2, K, d_lat), for the latent-health numbers.

    Returns:
        (scalar loss with grad, 0-d tensor stats as :meth:`ConsistencyLoss.forward`).
    """
    x = spectrogram_windows(model, wav)
    i_hi, eps = draw_noise(model.config, x.shape[0], sampler, generator, context, device=wav.device)
    loss_fn = ConsistencyLoss(model, autocast_dtype, latent_penalty, pre_tanh_limit, weighting)
    loss, stats = loss_fn(x, i_hi, eps, torch.full((), delta, device=wav.device))
    if not keep_latents:
        del stats["latents"]
    return loss, stats
