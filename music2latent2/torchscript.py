"""TorchScript export for real-time hosts that follow the nn~ convention (Max/MSP, Pure Data).

A host such as nn~ loads the file with ``torch::jit::load`` and calls ``encode``, ``decode`` or
``forward`` on every audio block: a ``(B, in_channels, N / in_ratio)`` tensor in, a
``(B, out_channels, N / out_ratio)`` tensor out, where N, the host's block size, is a multiple
of every ratio. It learns the channels and ratios from a ``<method>_params`` buffer
``[in_channels, in_ratio, out_channels, out_ratio]`` and the method list from ``get_methods()``.

Here a latent "frame" is one summary embedding: chunk t's K = 8 embeddings are frames
``K*t .. K*t+K-1``, exactly as :meth:`EncoderDecoder.encode` lays them out, so the latent ratio
is ``chunk_samples / K`` = 4,096 samples per frame and the latent channels are ``latent_dim``.

The network runs on whole chunks, but a host's blocks can be as short as one frame, so the
exported module is stateful: ``encode`` buffers audio until a chunk is complete and ``decode``
buffers frames until a chunk's K are in, decodes it with the paper's autoregressive sampler
(one step, ``sigma_cond`` settable) and overlap-adds it. Each keeps a FIFO pre-filled with just
enough zeros that every block can be answered at once, whatever the block size: a fixed latency
of ``encode_latency`` samples (one chunk), ``decode_latency`` (``lead + (K - 1) * ratio``, plus one
chunk unless exported with ``low_latency=True``) and, for ``forward`` (encode then decode, each
chunk decoded as soon as it is encoded), ``forward_latency`` (``lead`` plus one chunk, plus one
more unless low-latency). docs/streaming.md derives them. Past that delay the output equals the
offline ``encode``/``decode`` of the same audio (the decoder's noise comes from the global RNG)
without level normalisation (``normalize=False``): a live stream has no peak to measure ahead, so
the host sets the input gain, best near the model's ``input_peak_db`` (docs/levels.md).
``forward`` shares the encoder's buffer with ``encode`` and the decoder's state with ``decode``, so
a host calls one method per loaded instance (nn~ loads the file once per object).

Why tracing: the networks are traced (their Python control flow is fixed per window size),
then a scripted shell holds the streaming state. The traced graphs carry no device constants,
so moving the module to another device moves everything it computes with. The shell writes
the sampler step and the chunk overlap-add again in TorchScript's subset of Python (the
originals, ``sampling.AutoregressiveSampler`` and ``spectral.OverlapAddStream``, use
generators, batching helpers and Optional state it cannot compile); tests/test_torchscript.py
pins them to the originals bit for bit.
"""

# No `from __future__ import annotations`: TorchScript must read the annotations as types.
import copy
import os
import warnings
from pathlib import Path
from typing import List, Tuple, Union

import torch
from torch import nn

from .fileio import atomic_write
from .model import Music2Latent2, optimize_for_cpu
from .sampling import DEFAULT_SIGMA_COND, check_sigma_cond

__all__ = ["NNTildeCodec", "ChunkEncoder", "export_torchscript", "FLOAT_ATTRIBUTE"]

# nn~'s type codes for settable attributes: 0 bool, 1 int, 2 float, 3 str.
FLOAT_ATTRIBUTE = 2


class ChunkEncoder(nn.Module):
    """(N, ac, span(1)) chunk windows -> (N, K, d_lat) latents, scaled as ``encode`` returns them,
    and, with ``features=True``, also the (N, K, dim) features ``extract_features`` gives.

    A window is what :meth:`ChunkGeometry.windows` cuts: for chunk t of a signal, its samples
    ``t * chunk_samples - lead .. (t + 1) * chunk_samples + lookahead`` (zeros outside the signal).
    """

    def __init__(self, model: Music2Latent2, features: bool = False) -> None:
        super().__init__()
        self.spectral, self.encoder, self.scale = model.spectral, model.encoder, model.config.latent_scale
        self.features = features

    def forward(self, wav: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        latents, features = self.encoder(self.spectral(wav))
        return (latents * self.scale, features) if self.features else latents * self.scale


class _ChunkSynth(nn.Module):
    """(S, 2ac, F, chunk_frames) spectrogram -> (S, ac, span(1)) overlap-added, not yet normalised."""

    def __init__(self, model: Music2Latent2) -> None:
        super().__init__()
        self.spectral = model.spectral

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        return self.spectral.overlap_add_frames(self.spectral.frames(spec))


class _LastChunkDenoiser(nn.Module):
    """The consistency network returning only a window's last chunk (``last_only``), as a module
    whose forward tracing can record: low-latency decoding never emits the context's refinement."""

    def __init__(self, consistency: nn.Module) -> None:
        super().__init__()
        self.consistency = consistency

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cross: List[torch.Tensor]) -> torch.Tensor:
        return self.consistency(x, sigma, cross, last_only=True)


class NNTildeCodec(nn.Module):
    """The scriptable streaming shell around traced networks; build it with :func:`export_torchscript`.

    Args:
        model: the network (traced here, on its own device, in float32).
        low_latency: emit each decoded chunk without the next chunk's refinement (see
            :class:`~music2latent2.streaming.StreamingDecoder`).
        sigma_cond: initial re-noising level of the previous chunk (settable from the host).
    """

    prev_cross: List[torch.Tensor]

    def __init__(self, model: Music2Latent2, low_latency: bool = False, sigma_cond: float = DEFAULT_SIGMA_COND) -> None:
        super().__init__()
        cfg, g = model.config, model.geometry
        model = copy.deepcopy(model).float().eval()  # traced in float32 eval mode; the caller's module is left alone
        optimize_for_cpu(model)  # the same function, faster on CPUs (docs/streaming.md); unmeasured on CUDA
        device = model.device
        self.ac, self.k, self.d = cfg.audio_channels, cfg.summary_tokens, cfg.latent_dim
        self.cs, self.ratio = g.chunk_samples, g.chunk_samples // cfg.summary_tokens
        self.lead, self.overhang, self.span = g.lead, g.overhang, g.span(1)
        self.spec_shape = [cfg.spec_channels, cfg.freq_bins, cfg.chunk_frames]
        self.latent_scale, self.sigma_max, self.sigma_cond = cfg.latent_scale, cfg.sigma_max, float(sigma_cond)
        self.sigma_min = cfg.sigma_min
        self.low_latency = bool(low_latency)
        self.sample_rate = cfg.sample_rate
        self.encode_latency = self.cs
        refine = 0 if low_latency else self.cs  # a chunk waits for the next one's window
        self.decode_latency = self.lead + (self.k - 1) * self.ratio + refine
        self.forward_latency = self.lead + self.cs + refine

        with torch.no_grad():
            window = torch.zeros(1, self.ac, self.span, device=device)
            latents = torch.zeros(1, self.k, self.d, device=device)
            cross = model.decoder(latents)
            spec = torch.zeros(1, *self.spec_shape, device=device)
            self.chunk_encoder = torch.jit.trace(ChunkEncoder(model), (window,), check_trace=False)
            self.decoder_features = torch.jit.trace(model.decoder, (latents,), check_trace=False)
            sigma = torch.full((1, 1), cfg.sigma_max, device=device)
            self.denoise_one = torch.jit.trace(model.consistency, (spec[:, None], sigma, cross), check_trace=False)
            pair = [torch.cat([c, c]) for c in cross]
            sigmas = torch.tensor([[sigma_cond, cfg.sigma_max]], device=device)
            two = _LastChunkDenoiser(model.consistency) if low_latency else model.consistency
            self.denoise_two = torch.jit.trace(two, (torch.cat([spec, spec])[None], sigmas, pair), check_trace=False)
            self.synth = torch.jit.trace(_ChunkSynth(model), (spec,), check_trace=False)
            env = model.spectral.window_envelope(2 * g.chunk_frames, device).clamp_min(1e-3)
        self.register_buffer("env_first", env[:self.cs].clone())
        self.register_buffer("env_middle", env[self.cs:2 * self.cs].clone())

        # nn~ metadata: [in_channels, in_ratio, out_channels, out_ratio] per method.
        self.register_buffer("encode_params", torch.tensor([self.ac, 1, self.d, self.ratio]))
        self.register_buffer("decode_params", torch.tensor([self.d, self.ratio, self.ac, 1]))
        self.register_buffer("forward_params", torch.tensor([self.ac, 1, self.ac, 1]))
        self.register_buffer("sigma_cond_params", torch.tensor([FLOAT_ATTRIBUTE]))
        audio = ["(signal) audio"] if self.ac == 1 else ["(signal) audio left", "(signal) audio right"]
        frames = [f"(signal) latent {i}" for i in range(self.d)]
        self.encode_input_labels, self.encode_output_labels = audio, frames
        self.decode_input_labels, self.decode_output_labels = frames, audio
        self.forward_input_labels, self.forward_output_labels = audio, audio

        # Streaming state, sized at the first block (and again whenever the batch size changes).
        self.enc_buffer = torch.zeros(0, self.ac, 0, device=device)  # audio not yet encoded, lead included
        self.enc_fifo = torch.zeros(0, self.d, 0, device=device)  # frames not yet returned
        self.dec_pending = torch.zeros(0, self.d, 0, device=device)  # frames of an incomplete chunk
        self.dec_fifo = torch.zeros(0, self.ac, 0, device=device)  # audio not yet returned
        self.prev = torch.zeros(0, device=device)  # previous chunk's estimate (B, C, F, T)
        self.prev_cross = []
        self.ola_carry = torch.zeros(0, device=device)  # overhang of the last emitted chunk
        self.dec_chunks = 0  # chunks decoded
        self.emitted = 0  # chunks overlap-added
        self.skip = self.lead

    # ------------------------------------------------------------------ nn~ discovery
    @torch.jit.export
    def get_methods(self) -> List[str]:
        return ["encode", "decode", "forward"]

    @torch.jit.export
    def get_attributes(self) -> List[str]:
        return ["sigma_cond"]

    @torch.jit.export
    def get_sigma_cond(self) -> float:
        return self.sigma_cond

    @torch.jit.export
    def set_sigma_cond(self, value: float) -> int:
        # nn~ reports a non-zero return as a refused setting; 0 would give NaN audio (log 0).
        if not (self.sigma_min <= value <= self.sigma_max):
            return -1
        self.sigma_cond = value
        return 0

    @torch.jit.export
    def reset(self) -> None:
        """Forget both streams: the next block starts from silence and the latencies start over."""
        self.enc_buffer = self.enc_buffer[:0]
        self.enc_fifo = self.enc_fifo[:0]
        self.dec_pending = self.dec_pending[:0]

    # ------------------------------------------------------------------ methods
    @torch.jit.export
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, audio_channels, N) audio, N a multiple of the ratio -> (B, latent_dim, N / ratio) frames."""
        frames = self._encode_ready(x)
        if self.enc_fifo.shape[0] != x.shape[0]:
            self.enc_fifo = torch.zeros(x.shape[0], self.d, self.k, device=x.device)  # one chunk of latency
        self.enc_fifo = torch.cat([self.enc_fifo, frames], dim=-1)
        m = x.shape[-1] // self.ratio
        out = self.enc_fifo[..., :m]
        self.enc_fifo = self.enc_fifo[..., m:]
        return out

    @torch.jit.export
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent_dim, M) frames -> (B, audio_channels, M * ratio) audio."""
        if z.dim() != 3 or z.shape[1] != self.d:
            raise ValueError("decode expects (B, latent_dim, M) latent frames")
        self._decode_frames(z.float(), self.decode_latency)
        return self._pop_audio(z.shape[-1] * self.ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Audio through the autoencoder, each chunk decoded as soon as it is encoded (no frame FIFO
        in between, so ``forward_latency`` is below ``encode_latency + decode_latency``)."""
        self._decode_frames(self._encode_ready(x), self.forward_latency)
        return self._pop_audio(x.shape[-1])

    # ------------------------------------------------------------------ internals
    def _encode_ready(self, x: torch.Tensor) -> torch.Tensor:
        """Buffer a block; (B, d, R * K) frames of the R chunks it completed (R may be 0)."""
        if x.dim() != 3 or x.shape[1] != self.ac or x.shape[-1] % self.ratio != 0:
            raise ValueError("expected audio (B, audio_channels, N) with N a multiple of the latent ratio")
        b = x.shape[0]
        if self.enc_buffer.shape[0] != b:
            self.enc_buffer = torch.zeros(b, self.ac, self.lead, device=x.device)
        self.enc_buffer = torch.cat([self.enc_buffer, x.float()], dim=-1)
        ready = (self.enc_buffer.shape[-1] - self.overhang) // self.cs
        if ready == 0:
            return torch.zeros(b, self.d, 0, device=x.device)
        windows = self.enc_buffer[..., :ready * self.cs + self.overhang].unfold(-1, self.span, self.cs)
        windows = windows.permute(0, 2, 1, 3).reshape(b * ready, self.ac, self.span)  # (B*R, ac, span)
        self.enc_buffer = self.enc_buffer[..., ready * self.cs:]
        z = self.chunk_encoder(windows)  # (B*R, K, d)
        return z.reshape(b, ready * self.k, self.d).transpose(1, 2)  # (B, d, R*K)

    def _decode_frames(self, z: torch.Tensor, latency: int) -> None:
        """Buffer frames (B, d, M) and decode every chunk they complete; a new stream (or a new
        batch size) starts with ``latency`` samples of silence in the output FIFO."""
        b = z.shape[0]
        if self.dec_pending.shape[0] != b:
            self.dec_pending = torch.zeros(b, self.d, 0, device=z.device)
            self.dec_fifo = torch.zeros(b, self.ac, latency, device=z.device)
            self.dec_chunks, self.emitted, self.skip = 0, 0, self.lead
        self.dec_pending = torch.cat([self.dec_pending, z], dim=-1)
        chunks = self.dec_pending.shape[-1] // self.k
        for t in range(chunks):
            latents = self.dec_pending[..., t * self.k:(t + 1) * self.k].transpose(1, 2) / self.latent_scale
            self._decode_chunk(latents)  # (B, K, d) unscaled
        self.dec_pending = self.dec_pending[..., chunks * self.k:]

    def _pop_audio(self, n: int) -> torch.Tensor:
        out = self.dec_fifo[..., :n]
        self.dec_fifo = self.dec_fifo[..., n:]
        return out

    def _decode_chunk(self, latents: torch.Tensor) -> None:
        # The offline sampler's order of noise draws (sampling.AutoregressiveSampler, one step).
        b = latents.shape[0]
        cross: List[torch.Tensor] = self.decoder_features(latents)
        shape = [b] + self.spec_shape
        x = self.sigma_max * torch.randn(shape, device=latents.device)
        if self.dec_chunks == 0:
            sigma = torch.full([b, 1], self.sigma_max, device=latents.device)
            cur = self.denoise_one(x[:, None], sigma, cross)[:, 0]
        else:
            window_cross = [torch.stack([p, c], dim=1).flatten(0, 1) for p, c in zip(self.prev_cross, cross)]
            past = self.prev + self.sigma_cond * torch.randn(shape, device=latents.device)
            sigmas = torch.tensor([[self.sigma_cond, self.sigma_max]], device=latents.device).expand(b, 2)
            out = self.denoise_two(torch.stack([past, x], dim=1), sigmas, window_cross)  # (B, 2 or 1, C, F, T)
            cur = out[:, -1]
            if not self.low_latency:
                self._overlap_add(out[:, 0])
        if self.low_latency:
            self._overlap_add(cur)
        self.prev, self.prev_cross = cur, cross
        self.dec_chunks += 1

    def _overlap_add(self, spec: torch.Tensor) -> None:
        seg = self.synth(spec)  # (B, ac, span)
        if self.emitted > 0:
            seg = torch.cat([seg[..., :self.overhang] + self.ola_carry, seg[..., self.overhang:]], dim=-1)
        env = self.env_first if self.emitted == 0 else self.env_middle
        done = seg[..., :self.cs] / env
        self.ola_carry = seg[..., self.cs:]
        self.emitted += 1
        done = done[..., self.skip:]
        self.skip = 0
        self.dec_fifo = torch.cat([self.dec_fifo, done], dim=-1)


def export_torchscript(model: Union[Music2Latent2, str, os.PathLike, None], path: Union[str, os.PathLike],
                       low_latency: bool = False, sigma_cond: float = DEFAULT_SIGMA_COND) -> Path:
    """Write a TorchScript file for nn~-style hosts (see the module docstring).

    Args:
        model: a :class:`Music2Latent2`, or anything :meth:`Music2Latent2.from_pretrained` loads.
        path: the ``.ts`` file to write; written to a temp file and renamed, so an existing file
            is replaced only by a complete export.
        low_latency: decode without the refinement step (one chunk less latency).
        sigma_cond: initial re-noising level of the previous chunk (paper: 0.4).

    Returns:
        The path written.
    """
    check_sigma_cond(sigma_cond)  # before the (possibly slow) load
    if not isinstance(model, Music2Latent2):
        model = Music2Latent2.from_pretrained(model)
    check_sigma_cond(sigma_cond, model.config.sigma_min, model.config.sigma_max)
    with warnings.catch_warnings():
        # Tracing warns about every Python-level shape check; each is fixed per window size by design.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # PyTorch deprecates TorchScript in favour of torch.export, but nn~ and other libtorch
        # hosts load TorchScript files; the warning would only confuse someone exporting for them.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
        scripted = torch.jit.script(NNTildeCodec(model, low_latency=low_latency, sigma_cond=sigma_cond))
        return atomic_write(path, lambda tmp: torch.jit.save(scripted, tmp))
