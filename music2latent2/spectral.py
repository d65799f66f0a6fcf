"""Complex STFT representation with amplitude compression, and its exact inverse.

Layout: a waveform chunk becomes ``(B, 2 * audio_channels, freq_bins, frames)``: real and
imaginary planes of each audio channel, ``[ch0.re, ch0.im, ch1.re, ch1.im]``.

The Nyquist bin is dropped (as in Music2Latent), so the round trip is exact (to float32
precision) only for signals with no energy within a few bins of half the sample rate; for music
this is negligible, for white noise it costs about 1.5% of the signal's RMS (docs/design.md
section 1 has the measurements).

Chunk geometry (:class:`ChunkGeometry`) lives here too, as the one place that knows how many
samples lie behind a chunk of frames, how a signal is padded into chunks, and which output
samples a decoded chunk finishes (:class:`OverlapAddStream`). Inference, training and any
streaming code use it instead of repeating the arithmetic.

Time alignment. Frames are cut straight from the waveform (no centering): frame ``f`` covers
samples ``[f * hop, f * hop + n_fft)``. :meth:`ChunkGeometry.pad` puts ``n_fft // 2`` zeros in
front of the signal, so frame ``f`` is centred on original sample ``f * hop`` and chunk ``t``
stands for original samples ``[t * chunk_samples, (t + 1) * chunk_samples)``: decoding then
:meth:`ChunkGeometry.crop` gives back the input with zero lag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .config import ModelConfig

__all__ = ["SpectralTransform", "ChunkGeometry", "OverlapAddStream"]


@dataclass(frozen=True)
class ChunkGeometry:
    """Where the samples of each chunk of STFT frames lie (paper: 64 frames, hop 512, n_fft 2048).

    Attributes:
        chunk_samples: samples per chunk, ``chunk_frames * hop_length`` (32,768 for the paper).
        n_fft: STFT window length.
        hop_length: STFT hop.
    """

    chunk_samples: int
    n_fft: int
    hop_length: int

    @classmethod
    def from_config(cls, config: "ModelConfig") -> "ChunkGeometry":
        return cls(config.chunk_samples, config.n_fft, config.hop_length)

    @property
    def chunk_frames(self) -> int:
        return self.chunk_samples // self.hop_length

    @property
    def lead(self) -> int:
        """Zeros put in front of a signal so frame ``f`` is centred on sample ``f * hop``."""
        return self.n_fft // 2

    @property
    def overhang(self) -> int:
        """Samples the last frame of a chunk reaches past the chunk's own ``chunk_samples``."""
        return self.n_fft - self.hop_length

    def span(self, chunks: int = 1) -> int:
        """Samples behind ``chunks`` consecutive chunks of frames: 34,304 for one, 67,072 for two."""
        return chunks * self.chunk_samples + self.overhang

    def num_chunks(self, num_samples: int) -> int:
        """Chunks needed so every one of ``num_samples`` samples lies inside a chunk."""
        return max(1, math.ceil(num_samples / self.chunk_samples))

    def pad(self, wav: torch.Tensor) -> Tuple[torch.Tensor, int]:
        """Zero-pad the last axis to a whole number of chunks of frames.

        Args:
            wav: (..., N) waveform.

        Returns:
            (padded (..., span(chunks)), chunks), with :attr:`lead` zeros before the signal.
        """
        n = wav.shape[-1]
        chunks = self.num_chunks(n)
        return F.pad(wav, (self.lead, self.span(chunks) - self.lead - n)), chunks

    def windows(self, padded: torch.Tensor) -> torch.Tensor:
        """The samples behind each chunk of a padded signal: (..., span(C)) -> (..., C, span(1)), a view."""
        return padded.unfold(-1, self.span(1), self.chunk_samples)

    def crop(self, padded: torch.Tensor, length: int) -> torch.Tensor:
        """Undo :meth:`pad`: the ``length`` samples of the original signal, as a view."""
        return padded[..., self.lead: self.lead + length]


class SpectralTransform(nn.Module):
    """Waveform <-> compressed complex spectrogram.

    Forward: STFT (Hann, ``n_fft``, ``hop_length``, no centering), keep ``freq_bins`` bins,
    ``c' = beta * |c| ** alpha * exp(i * angle(c))``, real/imag as channels.

    Inverse: undo the compression, append zero bins up to Nyquist, irfft each frame, window it
    and overlap-add, then divide by the summed squared window.

    Why a custom inverse: ``torch.istft`` insists on the NOLA condition over the whole output,
    but without centering the periodic Hann window is exactly zero at the first sample, so it
    refuses these spectrograms. Writing the overlap-add ourselves also lets the decoder add one
    chunk's frames at a time (:class:`OverlapAddStream`), which keeps decoding memory flat in the
    audio length and lets finished audio leave before the next chunk is decoded.
    """

    window: torch.Tensor

    def __init__(self, n_fft: int = 2048, hop_length: int = 512, freq_bins: int = 1024,
                 alpha: float = 0.65, beta: float = 0.34) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.freq_bins = freq_bins
        self.alpha = alpha
        self.beta = beta
        self.register_buffer("window", torch.hann_window(n_fft, periodic=True), persistent=False)

    def num_frames(self, num_samples: int) -> int:
        return (num_samples - self.n_fft) // self.hop_length + 1

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """Args: wav (B, C, N) float. Returns (B, 2C, freq_bins, frames) float32."""
        b, c, n = wav.shape
        if n < self.n_fft:
            raise ValueError(f"need at least n_fft={self.n_fft} samples, got {n}")
        wav = wav.reshape(b * c, n).float()
        # The window buffer is used as it is: it moves with the module, and a `.to(wav.device)`
        # here would freeze the tracing device into exported graphs (torchscript.py).
        spec = torch.stft(wav, self.n_fft, self.hop_length, window=self.window,
                          center=False, return_complex=True)  # (B*C, n_fft/2+1, frames)
        spec = spec[:, : self.freq_bins]
        mag = spec.abs()
        # Compressing |c| keeps the phase: scale the complex value by beta * |c|^(alpha - 1).
        gain = self.beta * mag.clamp_min(1e-12).pow(self.alpha - 1.0)
        spec = spec * torch.where(mag > 0, gain, torch.zeros_like(gain))
        out = torch.view_as_real(spec).permute(0, 3, 1, 2)  # (B*C, 2, F, T)
        return out.reshape(b, 2 * c, self.freq_bins, -1)

    def frames(self, spec: torch.Tensor) -> torch.Tensor:
        """Windowed time-domain frames of a compressed spectrogram.

        Args: spec (B, 2C, freq_bins, T). Returns (B, C, n_fft, T) float32.
        """
        b, c2, fb, t = spec.shape
        spec = spec.float().reshape(b * c2 // 2, 2, fb, t).permute(0, 2, 3, 1).contiguous()
        spec = torch.view_as_complex(spec)  # (B*C, F, T)
        mag = spec.abs()
        gain = (mag.clamp_min(1e-12) / self.beta).pow(1.0 / self.alpha) / mag.clamp_min(1e-12)
        spec = spec * torch.where(mag > 0, gain, torch.zeros_like(gain))
        spec = F.pad(spec, (0, 0, 0, self.n_fft // 2 + 1 - fb))  # zero bins up to Nyquist
        frames = torch.fft.irfft(spec, n=self.n_fft, dim=1)  # (B*C, n_fft, T)
        frames = frames * self.window[:, None]
        return frames.reshape(b, c2 // 2, self.n_fft, t)

    def overlap_add_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Overlap-add windowed frames. (B, C, n_fft, T) -> (B, C, (T - 1) * hop + n_fft)."""
        b, c, n, t = frames.shape
        length = (t - 1) * self.hop_length + n
        out = F.fold(frames.reshape(b * c, n, t), output_size=(1, length),
                     kernel_size=(1, n), stride=(1, self.hop_length))
        return out.reshape(b, c, length)

    def window_envelope(self, num_frames: int, device: torch.device) -> torch.Tensor:
        """Sum over frames of the squared window at each output sample: ((T-1)*hop + n_fft,)."""
        sq = self.window.to(device).pow(2)[None, None, :, None].expand(1, 1, self.n_fft, num_frames)
        return self.overlap_add_frames(sq.contiguous())[0, 0]

    def inverse(self, spec: torch.Tensor) -> torch.Tensor:
        """Args: spec (B, 2C, freq_bins, T). Returns (B, C, (T - 1) * hop + n_fft) float32.

        The first and last ``n_fft - hop`` samples are only partly covered by frames; the
        envelope is clamped there, and :meth:`ChunkGeometry.pad` keeps real signal out of them.
        """
        wav = self.overlap_add_frames(self.frames(spec))
        env = self.window_envelope(spec.shape[-1], spec.device)
        return wav / env.clamp_min(1e-3)


class OverlapAddStream:
    """Chunk-by-chunk inverse of :class:`SpectralTransform` for autoregressive decoding.

    Chunk ``t``'s frames cover padded samples ``[t * chunk_samples, t * chunk_samples + span(1))``,
    reaching :attr:`ChunkGeometry.overhang` samples into chunk ``t + 1``'s region. So once chunk
    ``t`` is pushed, its first ``chunk_samples`` samples are final: :meth:`push` returns them
    normalised by the window envelope and keeps only the overhang for the next chunk. Every such
    region has the envelope of a two-chunk signal (the first region that of its first chunk), so
    one two-chunk envelope serves any length. The result equals :meth:`SpectralTransform.inverse`
    of all chunks at once (to float32 rounding), with state of ``overhang`` samples per channel.

    Args:
        spectral: the transform whose spectrograms are pushed.
        geometry: chunk geometry of those spectrograms.
        device: where the envelope and state live.
    """

    def __init__(self, spectral: SpectralTransform, geometry: ChunkGeometry, device: torch.device) -> None:
        self.spectral = spectral
        self.geometry = geometry
        cs = geometry.chunk_samples
        env = spectral.window_envelope(2 * geometry.chunk_frames, device).clamp_min(1e-3)  # (span(2),)
        self._first, self._middle, self._last = env[:cs], env[cs:2 * cs], env[2 * cs:]
        self._carry: Optional[torch.Tensor] = None  # (S, C, overhang) from the previous chunk
        self.chunks = 0

    def push(self, spec: torch.Tensor) -> torch.Tensor:
        """Add one chunk; (S, 2C, freq_bins, chunk_frames) -> its finished samples (S, C, chunk_samples)."""
        g = self.geometry
        seg = self.spectral.overlap_add_frames(self.spectral.frames(spec.float()))  # (S, C, span(1))
        if self._carry is not None:
            seg[..., :g.overhang] += self._carry
        done = seg[..., :g.chunk_samples]  # a view: normalised in place, no new buffer per chunk
        done /= self._first if self.chunks == 0 else self._middle
        self._carry = seg[..., g.chunk_samples:]
        self.chunks += 1
        return done

    def flush(self) -> torch.Tensor:
        """The last (S, C, overhang) samples, after the final chunk; the stream is then spent."""
        if self._carry is None:
            raise RuntimeError("flush() before any chunk was pushed")
        tail, self._carry = self._carry / self._last, None
        return tail
