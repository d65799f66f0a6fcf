"""Convolutional patchifier and de-patchifier shared by the encoder, decoder and consistency model.

A patchifier turns a spectrogram chunk ``(B, C, freq_bins, chunk_frames)`` into a coarse grid
``(B, channels[-1], f, t)`` whose cells become transformer tokens, and remembers its output at
every resolution level. A de-patchifier mirrors it back up, returning its features at every
level (the decoder hands these to the consistency model) and, optionally, an output
spectrogram.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from .modules import Downsample, FreqGain, GroupNorm, ResBlock, SigmaFreqGain, Upsample, group_count, may_overwrite

__all__ = ["Patchifier", "DePatchifier", "set_channels_last"]


class Patchifier(nn.Module):
    """Input conv -> per-bin gain -> [residual blocks, downsample] per level.

    Args:
        in_channels: spectrogram channels.
        channels: conv width per level.
        layers: residual blocks per level.
        freq_down / time_down: downsampling between consecutive levels.
        freq_bins: frequency bins of the input (for the per-bin gain).
        norm_groups: GroupNorm groups.
        cond_dim: 0 for an unconditioned patchifier (encoder), else the noise-conditioning width
            (consistency model: AdaLN blocks and a sigma-dependent per-bin gain).
    """

    def __init__(self, in_channels: int, channels: Sequence[int], layers: Sequence[int],
                 freq_down: Sequence[int], time_down: Sequence[int], freq_bins: int,
                 norm_groups: int = 32, cond_dim: int = 0) -> None:
        super().__init__()
        self.input_conv = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.gain: nn.Module = SigmaFreqGain(cond_dim, freq_bins) if cond_dim else FreqGain(freq_bins)
        self.levels = nn.ModuleList(
            nn.ModuleList(ResBlock(c, c, norm_groups, cond_dim) for _ in range(n)) for c, n in zip(channels, layers)
        )
        self.downs = nn.ModuleList(
            Downsample(channels[i], channels[i + 1], freq_down[i], time_down[i]) for i in range(len(channels) - 1)
        )
        self.conditioned = cond_dim > 0
        self.channels_last = False  # see set_channels_last

    def forward(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None,
                cross: Optional[Sequence[torch.Tensor]] = None) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """
        Args:
            x: (B, C_in, F, T) spectrogram.
            cond: (B, cond_dim) noise conditioning, for a conditioned patchifier.
            cross: optional per-level features (B, channels[l], F_l, T_l) added at the input of
                each level (the decoder's cross-connections).

        Returns:
            (bottom (B, channels[-1], f, t), per-level outputs for skip connections).
        """
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            cross = [c.contiguous(memory_format=torch.channels_last) for c in cross] if cross is not None else None
        h = self.input_conv(x)
        h = self.gain(h, cond) if self.conditioned else self.gain(h)
        skips: List[torch.Tensor] = []
        for level, blocks in enumerate(self.levels):
            if cross is not None:  # h is a fresh temporary here (the gain's or a downsampling's output)
                h = h.add_(cross[level]) if may_overwrite(h, cross[level]) else h + cross[level]
            for block in cast(nn.ModuleList, blocks):
                h = block(h, cond)
            skips.append(h)
            if level < len(self.downs):
                h = self.downs[level](h)
        return h, skips


class DePatchifier(nn.Module):
    """Mirror of :class:`Patchifier`: [add skip, residual blocks, upsample] per level, coarse to fine.

    Args:
        out_channels: output spectrogram channels, or 0 for a feature-only de-patchifier.
        channels / layers / freq_down / time_down / freq_bins / norm_groups / cond_dim: as for
            :class:`Patchifier` (listed fine to coarse, mirrored internally).
    """

    def __init__(self, out_channels: int, channels: Sequence[int], layers: Sequence[int],
                 freq_down: Sequence[int], time_down: Sequence[int], freq_bins: int,
                 norm_groups: int = 32, cond_dim: int = 0) -> None:
        super().__init__()
        self.levels = nn.ModuleList(
            nn.ModuleList(ResBlock(c, c, norm_groups, cond_dim) for _ in range(n)) for c, n in zip(channels, layers)
        )
        self.ups = nn.ModuleList(
            Upsample(channels[i + 1], channels[i], freq_down[i], time_down[i]) for i in range(len(channels) - 1)
        )
        self.out_channels = out_channels
        if out_channels:
            self.gain = SigmaFreqGain(cond_dim, freq_bins) if cond_dim else FreqGain(freq_bins)
            self.out_norm = GroupNorm(group_count(channels[0], norm_groups), channels[0])
            self.out_conv = nn.Conv2d(channels[0], out_channels, 3, padding=1)
        self.conditioned = cond_dim > 0
        self.channels_last = False  # see set_channels_last

    def forward(self, h: torch.Tensor, cond: Optional[torch.Tensor] = None,
                skips: Optional[Sequence[torch.Tensor]] = None) -> Tuple[Optional[torch.Tensor], List[torch.Tensor]]:
        """
        Args:
            h: (B, channels[-1], f, t) coarse grid.
            cond: (B, cond_dim) noise conditioning, for a conditioned de-patchifier.
            skips: the patchifier's per-level outputs, added at the input of each level.

        Returns:
            (output (B, out_channels, F, T) or None, per-level features, fine to coarse).
        """
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
            skips = [s.contiguous(memory_format=torch.channels_last) for s in skips] if skips is not None else None
        feats: List[Optional[torch.Tensor]] = [None] * len(self.levels)
        for level in range(len(self.levels) - 1, -1, -1):
            if skips is not None:  # below the top, h is a fresh temporary (an upsampling's output)
                fresh = level < len(self.levels) - 1
                h = h.add_(skips[level]) if fresh and may_overwrite(h, skips[level]) else h + skips[level]
            for block in cast(nn.ModuleList, self.levels[level]):
                h = block(h, cond)
            feats[level] = h
            if level > 0:
                h = self.ups[level - 1](h)
        out = None
        if self.out_channels:
            h = self.out_norm(h)
            h = self.gain(h, cond) if self.conditioned else self.gain(h)
            out = self.out_conv(F.silu(h))
        return out, feats  # type: ignore[return-value]


def set_channels_last(module: nn.Module, enabled: bool = True) -> None:
    """Run every (de-)patchifier inside ``module`` on channels-last activations, or back on NCHW.

    Why: oneDNN's CPU convolutions are up to 2.5x faster on channels-last tensors when a layer
    has few channels (measured on the 32-channel full-resolution layers of ``small``), and a
    stream that is channels-last from its first conv stays so through every norm, activation
    and skip, so nothing is converted in between. The inputs (spectrogram, cross features,
    skips, token grid) are converted on entry; the weights and the state dict are untouched, and
    the results are the same up to float rounding. docs/streaming.md has the measurements.
    """
    for m in module.modules():
        if isinstance(m, (Patchifier, DePatchifier)):
            m.channels_last = bool(enabled)
