"""Building blocks: conv residual blocks, resampling, transformer blocks, noise embedding.

Every block takes explicit sizes; none reads a global config. Blocks that can be conditioned
on the noise level take ``cond_dim`` (0 = unconditioned) and then expect a conditioning tensor.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "group_count", "GroupNorm", "UPSAMPLE_MODES", "ResBlock", "Downsample", "Upsample", "FreqGain", "SigmaFreqGain",
    "set_upsample_mode", "SelfAttention", "TransformerBlock", "NoiseEmbedding", "chunked_causal_mask", "may_overwrite",
]


def group_count(channels: int, max_groups: int) -> int:
    """Largest group count <= max_groups that divides channels (GroupNorm needs a divisor)."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


class GroupNorm(nn.GroupNorm):
    """GroupNorm whose output keeps the input's dtype.

    Autocast runs group_norm in float32 and returns float32, which silently turns the whole conv
    residual stream (the bulk of the network's memory traffic) into float32 under bf16 training.
    Statistics are still computed in float32; only the normalised output is cast back, so a
    float32 input gives exactly ``nn.GroupNorm``'s result and the parameter names are unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 or x.dtype == torch.float64:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def may_overwrite(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether an op of ``x`` with ``others`` may overwrite ``x``, a fresh temporary: only without
    autograd (the out-of-place op's inputs may be saved for backward) and only where the result
    has ``x``'s dtype anyway, so the in-place op computes exactly the same values.

    Why bother: on a CPU, every fresh full-resolution activation (16 MiB for two chunks of
    ``small``) is new memory the kernel must fault in page by page; writing into the temporary
    instead halves a full-resolution ResBlock's time (docs/streaming.md), bit for bit."""
    return not torch.is_grad_enabled() and all(torch.promote_types(x.dtype, o.dtype) == x.dtype for o in others)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv -> GroupNorm -> SiLU -> zero-init 3x3 conv, plus residual.

    With ``cond_dim > 0`` the second norm is modulated by the noise embedding (scale/shift,
    the "AdaGN" of ADM; zero-initialised so training starts from the plain block).
    """

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int = 32, cond_dim: int = 0) -> None:
        super().__init__()
        self.norm1 = GroupNorm(group_count(in_channels, norm_groups), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm(group_count(out_channels, norm_groups), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        assert self.conv2.bias is not None  # Conv2d's default bias=True
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        self.ada = None
        if cond_dim > 0:
            proj = nn.Linear(cond_dim, 2 * out_channels)
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)
            self.ada = nn.Sequential(nn.SiLU(), proj)

    def forward(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, C_in, F, T), cond (B, cond_dim) -> (B, C_out, F, T)."""
        h = self.norm1(x)  # every h below is a fresh temporary, so inference may overwrite it
        h = self.conv1(F.silu(h, inplace=may_overwrite(h)))
        h = self.norm2(h)
        if self.ada is not None:
            if cond is None:
                raise ValueError("this block is noise-conditioned: pass cond")
            scale, shift = self.ada(cond)[:, :, None, None].chunk(2, dim=1)  # (B, C_out, 1, 1) each
            h = h.mul_(1 + scale).add_(shift) if may_overwrite(h, scale, shift) else _modulate(h, shift, scale)
        h = self.conv2(F.silu(h, inplace=may_overwrite(h)))
        skip = self.skip(x)
        return h.add_(skip) if may_overwrite(h, skip) else skip + h


def _axis_kernel(stride: int) -> Tuple[int, int]:
    # A strided axis uses non-overlapping patches (kernel = stride); an unstrided one a 3-tap
    # kernel. Either way the output is exactly input / stride.
    return (stride, 0) if stride > 1 else (3, 1)


class Downsample(nn.Module):
    """Strided conv dividing (freq, time) by (freq_factor, time_factor)."""

    def __init__(self, in_channels: int, out_channels: int, freq_factor: int, time_factor: int) -> None:
        super().__init__()
        (kf, pf), (kt, pt) = _axis_kernel(freq_factor), _axis_kernel(time_factor)
        self.conv = nn.Conv2d(in_channels, out_channels, (kf, kt), stride=(freq_factor, time_factor),
                              padding=(pf, pt))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


UPSAMPLE_MODES = ("pixel_shuffle", "transposed", "interpolate")


def _phase_taps(factor: int) -> torch.Tensor:
    """(factor, 3, 3) 0/1 map ``[phase, low-res tap, high-res tap]`` of nearest upsampling + 3-tap conv.

    Output row ``o = factor * y + phase`` of a 3-tap conv on the upsampled grid reads upsampled
    rows ``o - 1, o, o + 1``, i.e. low-resolution rows ``y + (phase + d) // factor`` for
    ``d in (-1, 0, 1)``: always within ``y - 1 .. y + 1``, so a 3-tap kernel on the coarse grid
    holds every phase's taps.
    """
    taps = torch.zeros(factor, 3, 3)
    for phase in range(factor):
        for d in (-1, 0, 1):
            taps[phase, (phase + d) // factor + 1, d + 1] = 1.0
    return taps


def _transposed_taps(factor: int) -> torch.Tensor:
    """(factor + 2, 3) 0/1 map ``[transposed-conv tap k, high-res tap]`` for the same function.

    A transposed conv with stride ``factor`` and padding 1 sends input row ``y`` to output row
    ``o = factor * y + k - 1``; that output reads ``y`` through every tap ``d`` with
    ``(o + d) // factor == y``, i.e. ``0 <= k - 1 + d < factor``. At factor 1 this is the
    3-tap kernel reversed, as a transposed conv correlates with the flipped kernel.
    """
    taps = torch.zeros(factor + 2, 3)
    for k in range(factor + 2):
        for d in (-1, 0, 1):
            if 0 <= k - 1 + d < factor:
                taps[k, d + 1] = 1.0
    return taps


class Upsample(nn.Module):
    """Nearest-neighbour upsampling by (freq_factor, time_factor) followed by a 3x3 conv.

    The stored parameters are those of that 3x3 conv (``conv``), whatever the mode. Three exact
    ways to compute the same function (equal up to float summation order):

    - ``"interpolate"``: as written, the reference. It materialises the upsampled input (and its
      gradient in training), ``f * t`` times larger than the input.
    - ``"pixel_shuffle"``: one 3x3 conv on the coarse grid with ``f * t`` output phases, then a
      pixel shuffle; the upsampled input never exists. Same FLOPs as the reference.
    - ``"transposed"``: one transposed conv with stride (f, t) and kernel (f + 2, t + 2) (3 on
      an axis with factor 1), which skips the taps that are structurally zero: 2.25x fewer
      FLOPs at factor (2, 2), 2x at (4, 1).

    The effective kernel is derived from ``conv`` on every call (a few thousand multiply-adds),
    so checkpoints, training and the optimiser see the one 3x3 weight.
    """

    def __init__(self, in_channels: int, out_channels: int, freq_factor: int, time_factor: int,
                 mode: str = "pixel_shuffle") -> None:
        super().__init__()
        self.factors = (freq_factor, time_factor)
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        _check_upsample_mode(mode)
        self.mode = mode
        self.register_buffer("phase_f", _phase_taps(freq_factor), persistent=False)
        self.register_buffer("phase_t", _phase_taps(time_factor), persistent=False)
        self.register_buffer("taps_f", _transposed_taps(freq_factor), persistent=False)
        self.register_buffer("taps_t", _transposed_taps(time_factor), persistent=False)

    phase_f: torch.Tensor
    phase_t: torch.Tensor
    taps_f: torch.Tensor
    taps_t: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, f, t) -> (B, C_out, f * freq_factor, t * time_factor)."""
        ff, tf = self.factors
        weight, bias = self.conv.weight, self.conv.bias
        assert bias is not None  # Conv2d's default bias=True
        if self.mode == "interpolate":
            return self.conv(F.interpolate(x, scale_factor=self.factors, mode="nearest"))
        c_out, c_in = weight.shape[:2]
        if self.mode == "pixel_shuffle":
            # [phase_f a, phase_t b, out o, in i, low-res taps K L] from the high-res taps d e.
            w = torch.einsum("aKd,bLe,oide->oabiKL", self.phase_f.to(weight.dtype), self.phase_t.to(weight.dtype),
                             weight).reshape(c_out * ff * tf, c_in, 3, 3)
            y = F.conv2d(x, w, bias.repeat_interleave(ff * tf), padding=1)  # (B, C_out*f*t, H, W)
            b, _, h, w_ = y.shape
            y = y.view(b, c_out, ff, tf, h, w_).permute(0, 1, 4, 2, 5, 3)  # (B, C_out, H, f, W, t)
            return y.reshape(b, c_out, h * ff, w_ * tf)
        # Transposed conv weights are (in, out, kH, kW) and flipped relative to a conv's.
        w = torch.einsum("Kd,Le,oide->ioKL", self.taps_f.to(weight.dtype), self.taps_t.to(weight.dtype), weight)
        return F.conv_transpose2d(x, w, bias, stride=self.factors, padding=1)


def _check_upsample_mode(mode: str) -> None:
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"upsample mode must be one of {UPSAMPLE_MODES}, got {mode!r}")


def set_upsample_mode(module: nn.Module, mode: str) -> None:
    """Set how every :class:`Upsample` inside ``module`` computes (see its docstring)."""
    _check_upsample_mode(mode)
    for m in module.modules():
        if isinstance(m, Upsample):
            m.mode = mode


class FreqGain(nn.Module):
    """A learned gain per frequency bin (v1): lets the first layer re-weight bands."""

    def __init__(self, freq_bins: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1, 1, freq_bins, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain.to(x.dtype)  # a float32 gain would promote a bf16 stream to float32


class SigmaFreqGain(nn.Module):
    """Noise-dependent per-bin gain ``1 + s(sigma)`` from a zero-initialised MLP (v1)."""

    def __init__(self, cond_dim: int, freq_bins: int) -> None:
        super().__init__()
        proj = nn.Linear(cond_dim, freq_bins)
        nn.init.zeros_(proj.weight)
        nn.init.zeros_(proj.bias)
        self.mlp = nn.Sequential(nn.SiLU(), proj)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (B, C, F, T), cond (B, cond_dim)."""
        return x * (1 + self.mlp(cond))[:, None, :, None]


def chunked_causal_mask(num_chunks: int, tokens_per_chunk: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Boolean (N, N) mask, True where query i may attend key j: chunk(j) <= chunk(i)."""
    chunk = torch.arange(num_chunks * tokens_per_chunk, device=device) // tokens_per_chunk
    return chunk[None, :] <= chunk[:, None]


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention`` (fused on GPU).

    ``causal_chunks=n`` applies chunked causal attention over ``n`` equal chunks of the
    sequence without a mask tensor: the queries of chunk c attend to keys of chunks 0..c in
    one unmasked call each, so every call stays eligible for the flash kernels.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, causal_chunks: int = 1) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, Dh)
        if causal_chunks <= 1:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            if n % causal_chunks:
                raise ValueError(f"sequence of {n} tokens does not split into {causal_chunks} chunks")
            size = n // causal_chunks
            out = torch.cat([
                F.scaled_dot_product_attention(q[:, :, c * size:(c + 1) * size], k[:, :, :(c + 1) * size],
                                               v[:, :, :(c + 1) * size])
                for c in range(causal_chunks)
            ], dim=2)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))  # (B, N, D)


class TransformerBlock(nn.Module):
    """Pre-LN transformer block, optionally AdaLN-Zero conditioned (DiT).

    A conditioned block takes a ready modulation ``(B, N, 6 * dim)`` (shift, scale, gate for the
    attention and MLP branches) and adds its own learned offset to it: the projection from the
    noise embedding is shared by all blocks ("adaLN-single", PixArt-alpha), which saves a
    6 * dim * cond_dim matrix per block. Conditioning is per token because the two chunks of the
    consistency model's window carry different noise levels.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4, conditioned: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=not conditioned)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=not conditioned)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * dim, dim))
        self.ada_offset = nn.Parameter(torch.zeros(6 * dim)) if conditioned else None

    def forward(self, x: torch.Tensor, modulation: Optional[torch.Tensor] = None,
                causal_chunks: int = 1) -> torch.Tensor:
        """x (B, N, D), modulation (B, N, 6D) for a conditioned block -> (B, N, D)."""
        if self.ada_offset is None:
            x = x + self.attn(self.norm1(x), causal_chunks)
            return x + self.mlp(self.norm2(x))
        if modulation is None:
            raise ValueError("this block is noise-conditioned: pass modulation")
        shift1, scale1, gate1, shift2, scale2, gate2 = (modulation + self.ada_offset).chunk(6, dim=-1)
        x = x + gate1 * self.attn(_modulate(self.norm1(x), shift1, scale1), causal_chunks)
        return x + gate2 * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class NoiseEmbedding(nn.Module):
    """sigma -> sinusoidal embedding of log(sigma)/4 -> MLP -> conditioning vector."""

    freqs: torch.Tensor

    def __init__(self, embed_dim: int, cond_dim: int) -> None:
        super().__init__()
        half = embed_dim // 2
        # freq_j = 10000^(-j / (half - 1)), j = 0..half-1 (v1: 128 frequencies for 256 channels).
        self.register_buffer("freqs", torch.pow(10000.0, -torch.arange(half) / max(half - 1, 1)), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * half, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        """sigma (...) -> (..., cond_dim)."""
        c_noise = torch.log(sigma.float()) / 4
        angles = c_noise[..., None] * self.freqs  # the buffer as it is, for device-free traced graphs
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=-1))


def sinusoidal_positions(num: int, dim: int) -> torch.Tensor:
    """Fixed sinusoidal table (num, dim), used to initialise learned positional embeddings."""
    pos = torch.arange(num, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(num, dim)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div[: dim // 2])
    return table
