"""Streaming encode and decode: audio blocks of any size in, latents out as soon as a chunk is
complete, and latents chunk by chunk in, audio out as soon as it is final.

Both classes keep their state between calls, can be :meth:`reset`, and give what the offline
:class:`~music2latent2.inference.EncoderDecoder` gives for the same input (and seed), however the
input is split into blocks: the concatenated outputs of ``push`` and ``flush`` equal ``encode`` /
``decode`` of the whole. Latency, in samples at 44.1 kHz (docs/streaming.md has the derivation):

- :class:`StreamingEncoder`: chunk t (original samples ``[t * 32768, (t + 1) * 32768)``) is
  encoded once the input reaches sample ``(t + 1) * 32768 + 512``; the 512 samples of look-ahead
  are half of the last STFT frame.
- :class:`StreamingDecoder`: chunk t is final only once chunk t + 1 has been decoded (the
  paper's two-step refinement, IV-4), so audio lags the latents by one chunk plus the 1,024
  samples of STFT lead-in: 33,792 samples (766 ms). ``low_latency=True`` emits each chunk's
  first estimate instead, without its refinement: 1,024 samples (23 ms).

The sampler, noise and overlap-add are the offline ones (:class:`~music2latent2.sampling.
AutoregressiveSampler`, :class:`~music2latent2.spectral.OverlapAddStream`), so the decoder's
equality is by construction and the tests check it bit for bit. The encoder's holds to float32
rounding: a block's chunks are batched together, not in ``max_batch_size`` groups.
"""

from __future__ import annotations

from typing import List, Optional, Tuple, Union

import numpy as np
import torch

from .api_checks import inference_api
from .audio import check_finite, to_float_array
from .inference import EncoderDecoder
from .levels import check_gain
from .sampling import DEFAULT_DENOISING_STEPS, DEFAULT_SIGMA_COND, AutoregressiveSampler
from .spectral import OverlapAddStream

__all__ = ["StreamingEncoder", "StreamingDecoder"]

ArrayLike = Union[np.ndarray, torch.Tensor]


class _Layout:
    """The shape family of a stream, fixed by its first block: its leading dims (all but the
    last one or two axes), whether it has a batch dim, numpy or torch, and the device results go
    back to."""

    def __init__(self, x: ArrayLike, leading: Tuple[int, ...], batched: bool) -> None:
        self.leading, self.batched = leading, batched
        self.kind = "numpy" if isinstance(x, np.ndarray) else "torch"
        self.device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")

    @property
    def batch(self) -> int:
        return self.leading[0] if self.batched else 1

    def check(self, other: "_Layout", what: str) -> None:
        if (other.leading, other.kind) != (self.leading, self.kind):
            raise ValueError(f"{what} must keep the leading dims and type of the stream's first block: "
                             f"{self.leading} ({self.kind}), got {other.leading} ({other.kind}); "
                             "call reset() to start a new stream")

    def give_back(self, codec: EncoderDecoder, x: torch.Tensor) -> ArrayLike:
        """(B, ...) results -> the stream's own layout and type, as ``encode``/``decode`` give them back."""
        return codec._give_back(x, 3 if self.batched else 2, self.kind, self.device)


class StreamingEncoder:
    """Encode an audio stream block by block.

    Args:
        codec: the :class:`EncoderDecoder` whose model, device and precision are used.
        extract_features: emit per-chunk MIR features (as ``encode(extract_features=True)``)
            instead of latents.
        max_batch_size: chunks per encoder pass when one block completes several; default the
            codec's.
        gain: every block is multiplied by this before encoding. Offline ``encode`` picks the gain
            from the peak of the whole signal (``normalize=True``), which a stream cannot know in
            advance, so a stream takes it as a setting, like an input trim: pass
            ``encode(typical_audio, return_gain=True)[1]``, or ``10 ** (dB / 20)``. Give the same
            gain to the :class:`StreamingDecoder` to get the original level back.

    Blocks are shaped (T,), (C, T) or (B, C, T) like ``encode``'s input, at the model's sample
    rate (44.1 kHz; resample a live stream before it reaches the encoder), float or integer
    PCM; every block of a stream has the same leading dims. ``push`` returns the latents of the
    chunks the block completed, shaped as ``encode`` would, with ``K * m`` positions for m
    chunks (m is often 0); ``flush`` ends the stream and returns the rest, zero-padded exactly
    as ``encode`` pads. After ``flush``, :meth:`reset` starts a new stream.
    """

    def __init__(self, codec: EncoderDecoder, extract_features: bool = False,
                 max_batch_size: Optional[int] = None, gain: float = 1.0) -> None:
        self.codec = codec
        self.gain = float(check_gain(gain, 1, torch.device("cpu"))[0])
        self.extract_features = bool(extract_features)
        self.max_batch_size = codec._batch_size(max_batch_size)
        self.reset()

    @property
    def lookahead(self) -> int:
        """Samples past a chunk's end the encoder needs before that chunk is encoded (512)."""
        g = self.codec.model.geometry
        return g.span(1) - g.lead - g.chunk_samples

    def reset(self) -> None:
        """Forget everything pushed: the next block starts a new stream."""
        self._layout: Optional[_Layout] = None
        self._buffer: Optional[torch.Tensor] = None  # (B, C, n) samples not yet consumed, lead included
        self._finished = False
        self.samples = 0  # samples pushed so far (per channel)
        self.chunks = 0  # chunks emitted so far

    @inference_api
    def push(self, audio: ArrayLike) -> ArrayLike:
        """Add a block of audio; returns the latents (or features) of every chunk it completed."""
        if self._finished:
            raise RuntimeError("this stream was flushed; call reset() to start a new one")
        wav = to_float_array(audio)
        if wav.ndim not in (1, 2, 3):
            raise ValueError(f"audio blocks must have shape (T,), (C, T) or (B, C, T); got {tuple(wav.shape)}")
        layout = _Layout(audio, tuple(wav.shape[:-1]), batched=wav.ndim == 3)
        if self._layout is not None:
            self._layout.check(layout, "audio blocks")
        if wav.shape[-1]:
            check_finite(wav, "audio block")
        self._layout = self._layout or layout
        wav = wav.reshape((1, 1, -1) if wav.ndim == 1 else (-1,) + tuple(wav.shape[-2:])).to(self.codec.device)
        if self.gain != 1.0:
            wav = wav * self.gain
        g = self.codec.model.geometry
        if self._buffer is None:
            self._buffer = wav.new_zeros(wav.shape[0], wav.shape[1], g.lead)
        self._buffer = torch.cat([self._buffer, wav], dim=-1)
        self.samples += wav.shape[-1]
        ready = max(0, (self._buffer.shape[-1] - g.overhang) // g.chunk_samples)
        return self._emit(ready)

    @inference_api
    def flush(self) -> ArrayLike:
        """End the stream: encode the chunks still open, zero-padded as ``encode`` pads."""
        if self._finished:
            raise RuntimeError("this stream was already flushed; call reset() to start a new one")
        if self._buffer is None or self.samples == 0:
            raise RuntimeError("flush() before any audio was pushed: there is nothing to encode")
        g = self.codec.model.geometry
        remaining = g.num_chunks(self.samples) - self.chunks
        need = g.span(remaining) - self._buffer.shape[-1]
        self._buffer = torch.nn.functional.pad(self._buffer, (0, max(0, need)))
        out = self._emit(remaining)
        self._finished = True
        return out

    def _emit(self, chunks: int) -> ArrayLike:
        """Encode the first ``chunks`` complete chunks of the buffer and drop their samples."""
        assert self._buffer is not None and self._layout is not None
        g, cfg, codec = self.codec.model.geometry, self.codec.config, self.codec
        if chunks:
            seqs = codec._sequences(self._buffer[..., :g.span(chunks)])  # (S, ac, span(chunks))
            latents, features = codec._encode_windows(g.windows(seqs), self.max_batch_size)
            out = features if self.extract_features else latents
            self._buffer = self._buffer[..., chunks * g.chunk_samples:]
        else:
            # No chunk yet: an empty result with the right sequence count (and the same channel
            # check as a full one, which _sequences makes).
            rows = cfg.summary_tokens * cfg.dim if self.extract_features else cfg.latent_dim
            out = self._buffer.new_zeros(codec._sequences(self._buffer[..., :0]).shape[0], rows, 0)
        self.chunks += chunks
        b = self._layout.batch
        return self._layout.give_back(self.codec, out.reshape(b, out.shape[0] // b, *out.shape[1:]))  # (B, C, ., m)


class StreamingDecoder:
    """Decode a latent stream chunk by chunk with the paper's autoregressive sampler.

    Args:
        codec: the :class:`EncoderDecoder` whose model, device and precision are used.
        denoising_steps / sigma_cond / seed / generator / max_batch_size: as for
            :meth:`EncoderDecoder.decode`. With ``seed``, :meth:`reset` re-seeds, so a reset
            stream decodes the same again; a ``generator`` is used as it stands.
        low_latency: emit each chunk as soon as it is decoded, without the refinement the next
            chunk's window would give it (see the module docstring for what this saves in
            latency). The sampler draws the same noise and conditions on the same estimates, so
            only the emitted audio differs, and it skips the refinement's de-patchifier: a quarter
            less work per chunk.
        gain: the audio is divided by this: the :class:`StreamingEncoder`'s gain, or what
            ``encode(..., return_gain=True)`` returned for the latents.

    ``push`` takes latents shaped (C, d_lat, L) or (B, C, d_lat, L) as ``encode`` returns them,
    L a multiple of K (zero is allowed), and returns the audio that became final, shaped as
    ``decode`` returns it; ``flush`` ends the stream and returns the rest. Together they give
    ``chunks * 32768`` samples, exactly what ``decode`` gives without ``length``.
    """

    def __init__(self, codec: EncoderDecoder, denoising_steps: int = DEFAULT_DENOISING_STEPS,
                 sigma_cond: float = DEFAULT_SIGMA_COND,
                 seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 max_batch_size: Optional[int] = None, low_latency: bool = False, gain: float = 1.0) -> None:
        self.codec = codec
        self.gain = float(check_gain(gain, 1, torch.device("cpu"))[0])
        self.denoising_steps, self.sigma_cond, _ = codec._sampler_options(denoising_steps, sigma_cond, None, None)
        self.seed, self.generator = seed, generator
        self.max_batch_size = codec._batch_size(max_batch_size)
        self.low_latency = bool(low_latency)
        self.reset()

    @property
    def latency(self) -> int:
        """Samples by which the emitted audio lags the end of the latest pushed chunk."""
        g = self.codec.model.geometry
        return g.lead + (0 if self.low_latency else g.chunk_samples)

    def reset(self) -> None:
        """Forget everything pushed (and re-seed, if built with a seed)."""
        _, _, generator = self.codec._sampler_options(self.denoising_steps, self.sigma_cond, self.seed, self.generator)
        self._generator = generator
        self._layout: Optional[_Layout] = None
        self._sampler: Optional[AutoregressiveSampler] = None
        self._ola: Optional[OverlapAddStream] = None
        self._last: Optional[torch.Tensor] = None  # newest chunk, not yet emitted (refined mode)
        self._skip = self.codec.model.geometry.lead  # padded samples before the signal starts
        self._finished = False
        self.chunks = 0

    @inference_api
    def push(self, latents: ArrayLike) -> ArrayLike:
        """Add the latents of zero or more chunks; returns the audio that is now final."""
        if self._finished:
            raise RuntimeError("this stream was flushed; call reset() to start a new one")
        cfg, codec = self.codec.config, self.codec
        if isinstance(latents, (np.ndarray, torch.Tensor)) and latents.ndim in (3, 4) and latents.shape[-1] == 0 \
                and latents.shape[-2] == cfg.latent_dim:
            z = torch.zeros(tuple(latents.shape), device=codec.device)  # nothing yet, e.g. from an encoder push
        else:
            z = codec._prepare_latents(latents).wav
        layout = _Layout(latents, tuple(z.shape[:-2]), batched=z.ndim == 4)
        if self._layout is not None:
            self._layout.check(layout, "latents")
        self._layout = self._layout or layout
        if z.ndim == 3:
            z = z[None]
        b, c = z.shape[:2]
        chunks = z.shape[-1] // cfg.summary_tokens
        seq = z.reshape(b * c, cfg.latent_dim, chunks, cfg.summary_tokens).permute(0, 2, 3, 1) / cfg.latent_scale
        if self._sampler is None:
            self._sampler = AutoregressiveSampler(codec.model, b * c, codec.device, self.sigma_cond,
                                                  self.denoising_steps, self._generator, self.max_batch_size,
                                                  codec.static_shapes)
            with torch.autocast(device_type=codec.device.type, enabled=False):
                self._ola = OverlapAddStream(codec.model.spectral, codec.model.geometry, codec.device)
        finished: List[torch.Tensor] = []
        for t in range(chunks):
            with codec._autocast():
                refined, cur = self._sampler.step(seq[:, t], refine=not self.low_latency)
            done = cur if self.low_latency else refined
            if done is not None:
                finished.append(self._overlap_add(done))
            self._last = None if self.low_latency else cur
        self.chunks += chunks
        return self._give_back(finished)

    @inference_api
    def flush(self) -> ArrayLike:
        """End the stream: the last chunk (refined mode) and the final STFT overhang."""
        if self._finished:
            raise RuntimeError("this stream was already flushed; call reset() to start a new one")
        if self._ola is None or self.chunks == 0:
            raise RuntimeError("flush() before any latents were pushed: there is nothing to decode")
        finished = [self._overlap_add(self._last)] if self._last is not None else []
        with torch.autocast(device_type=self.codec.device.type, enabled=False):
            tail = self._ola.flush()
        # decode() returns chunks * chunk_samples samples from the lead on: the tail's first `lead`.
        finished.append(tail[..., :self.codec.model.geometry.lead])
        self._finished = True
        return self._give_back(finished)

    def _overlap_add(self, spec: torch.Tensor) -> torch.Tensor:
        assert self._ola is not None
        with torch.autocast(device_type=self.codec.device.type, enabled=False):
            wav = self._ola.push(spec)  # (S, ac, chunk_samples)
        skip = min(self._skip, wav.shape[-1])
        self._skip -= skip
        return wav[..., skip:]

    def _give_back(self, pieces: List[torch.Tensor]) -> ArrayLike:
        """Finished (S, ac, n) pieces -> one (C * ac, n) or (B, C * ac, n) block in the stream's layout."""
        assert self._layout is not None and self._sampler is not None
        s = self._sampler.shape[0]
        wav = torch.cat(pieces, dim=-1) if pieces else torch.zeros(s, self.codec.config.audio_channels, 0,
                                                                   device=self.codec.device)
        if self.gain != 1.0:
            wav = wav / self.gain
        b = self._layout.batch
        return self._layout.give_back(self.codec, wav.reshape(b, wav.shape[0] * wav.shape[1] // b, wav.shape[-1]))
