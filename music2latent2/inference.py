"""``EncoderDecoder``: the user-facing API (audio in, latents out, and back).

It keeps chunking, padding, batching, precision and latent scaling apart from the network
(:class:`~music2latent2.model.Music2Latent2`), which only ever sees fixed-size chunks.

Output-length contract: ``decode(encode(x), length=len(x))`` returns exactly ``len(x)`` samples,
time-aligned with ``x`` (zero lag). Without ``length`` it returns ``num_chunks * 32768``
samples, the span the latents stand for.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Any, ContextManager, Iterator, Literal, Optional, Tuple, Union, overload

import numpy as np
import torch

from .api_checks import (
    check_batch_size,
    chunk_progress,
    cpu_has_fast_bfloat16,
    ignore_v1_memory_knob,
    inference_api,
    parse_precision,
    refuse_positional,
    require_int,
)
from .audio import AudioLike, check_finite, check_sample_rate, check_time_last, load_audio, resample, to_float_array
from .config import ModelConfig
from .devices import DeviceLike, resolve_device
from .latents_io import LatentMetadata, load_latents
from .levels import GainLike, check_gain, normalization_gain
from .model import Music2Latent2, optimize_for_cpu
from .sampling import (
    DEFAULT_DENOISING_STEPS,
    DEFAULT_SIGMA_COND,
    check_denoising_steps,
    check_sigma_cond,
    iter_autoregressive,
    iter_parallel,
    map_batches,
)
from .spectral import OverlapAddStream

__all__ = ["EncoderDecoder"]

DECODE_MODES = ("autoregressive", "parallel")

# The encoder's outputs lie within +-latent_scale (a tanh, scaled). Generated latents may overshoot
# somewhat; beyond this many times the scale they are a mistake (and 1e30 overflows to NaN audio).
LATENT_RANGE_FACTOR = 10.0

@dataclass
class _Batch:
    """Audio normalised to (B, C, T) float32 on the model device, and how to give results back."""

    wav: torch.Tensor
    ndim: int
    kind: str  # "numpy" or "torch"
    device: torch.device


class EncoderDecoder:
    """Encode audio to Music2Latent2 latents and decode latents back to audio.

    Args:
        model: a :class:`Music2Latent2` module, or anything
            :meth:`Music2Latent2.from_pretrained` loads: a local checkpoint file or directory, a
            manifest name, a Hugging Face repo id ``"org/name"``, or None for the default model.
        device: where to run ("cpu", "cuda", "cuda:1", "mps", a torch.device); default CUDA when
            available, else CPU. A device this machine lacks is a ``ValueError`` before any loading.
        precision: "float32" (default), "bfloat16" or "float16": autocast on the model's device
            type for the network; spectral transforms always run in float32. On a CPU with
            AVX-512 or AMX, bfloat16 decoded 1.7x faster than float32 at a measured quality cost
            (docs/streaming.md); on other CPUs it is emulated and far slower (a warning says so).
            See ``optimize_cpu`` for what else changes on a CPU.
        max_batch_size: default for ``encode``/``decode``: chunks (encode) or sequences (decode;
            windows in parallel mode) per forward pass.
        compile: ``torch.compile`` the encoder, decoder and consistency network (in place, on
            the given module) with static shapes, and pad every batch up to ``max_batch_size``
            rows so shapes never change between calls (no recompilation; the first call of each
            shape is slow). Worth it on GPU for long or repeated jobs.
        revision: with a Hub repo id: the branch, tag or commit sha to load (a commit pins it).
        optimize_cpu: on a CPU, lay the model out for speed first (in place;
            :func:`~music2latent2.model.optimize_for_cpu`): the same function, to float rounding.
            False keeps the layout the model has.
        load_path_inference: music2latent (v1)'s argument, refused with a message: v1
            checkpoints are another model.
    """

    def __init__(self, model: Union[Music2Latent2, str, os.PathLike, None] = None,
                 device: DeviceLike = None, precision: Union[str, torch.dtype] = "float32",
                 max_batch_size: int = 32, compile: bool = False, revision: Optional[str] = None,
                 optimize_cpu: bool = True, load_path_inference: Optional[Any] = None) -> None:
        if load_path_inference is not None:
            raise TypeError("load_path_inference is music2latent (v1)'s checkpoint argument; music2latent2 is another "
                            "model and cannot read v1 checkpoints. Pass a music2latent2 checkpoint, manifest name "
                            "or Hub repo id as model=..., or nothing for the default model")
        # Cheap argument checks first: a typo should not cost a checkpoint read.
        self.device = resolve_device(device)
        self.precision = parse_precision(precision)
        self.max_batch_size = check_batch_size(max_batch_size)
        if isinstance(model, Music2Latent2):
            if revision is not None:
                raise ValueError("revision= selects a Hugging Face repo revision; it cannot apply to a loaded module")
        else:
            model = Music2Latent2.from_pretrained(model, revision=revision)
        self.model = model.to(self.device).eval()
        if self.device.type == "cpu" and optimize_cpu:
            optimize_for_cpu(self.model)
            if self.precision == torch.bfloat16 and not cpu_has_fast_bfloat16():
                warnings.warn("this CPU has no AVX-512 or AMX, so oneDNN emulates bfloat16: it runs many "
                              "times slower than float32 here; use precision='float32'", stacklevel=2)
        self.compile = bool(compile)
        # Pad every batch to max_batch_size rows (static shapes); on whenever compiled.
        self.static_shapes = self.compile
        if self.compile:
            # Module.compile() swaps the forward for a compiled one without changing the module's
            # parameters or state_dict; dynamic=False plus batch padding keeps shapes static.
            for part in (self.model.encoder, self.model.decoder, self.model.consistency):
                if hasattr(part, "compile"):  # nn.Module.compile: torch >= 2.2
                    part.compile(dynamic=False)
                else:
                    part.forward = torch.compile(part.forward, dynamic=False)  # type: ignore[method-assign, assignment]

    # ----------------------------------------------------------------- properties
    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def chunk_samples(self) -> int:
        return self.config.chunk_samples

    def _autocast(self) -> ContextManager[Any]:
        if self.precision == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.precision)

    def _batch_size(self, max_batch_size: Optional[int]) -> int:
        return self.max_batch_size if max_batch_size is None else check_batch_size(max_batch_size)

    # ----------------------------------------------------------------- input handling
    def _prepare_audio(self, audio: AudioLike, sr: int) -> _Batch:
        if isinstance(audio, (str, os.PathLike)):
            data, sr = load_audio(audio)
            wav, ndim, kind, device = torch.from_numpy(data), 2, "numpy", torch.device("cpu")
        else:
            kind = "numpy" if isinstance(audio, np.ndarray) else "torch"
            wav = to_float_array(audio)
            ndim, device = wav.ndim, wav.device
            if ndim not in (1, 2, 3):
                raise ValueError(f"audio must have shape (T,), (C, T) or (B, C, T); got {tuple(wav.shape)}")
            check_time_last(tuple(wav.shape))
            sr = check_sample_rate(sr)
        check_finite(wav)
        wav = wav.reshape((1, 1) + tuple(wav.shape[-1:]) if ndim == 1 else (-1,) + tuple(wav.shape[-2:]))
        if wav.shape[-1] == 0:
            raise ValueError("audio is empty (0 samples)")
        wav = resample(wav, int(sr), self.sample_rate)
        return _Batch(wav.to(self.device), ndim, kind, device)

    def _sequences(self, wav: torch.Tensor) -> torch.Tensor:
        """(B, C, T) audio -> (S, audio_channels, T) sequences the model encodes one by one."""
        b, c, n = wav.shape
        if self.config.audio_channels == 1:
            return wav.reshape(b * c, 1, n)
        if c == 1:
            return wav.expand(b, 2, n)
        if c != 2:
            raise ValueError(f"a stereo model needs 1 or 2 audio channels, got {c}")
        return wav

    def _give_back(self, x: torch.Tensor, batch_ndim: int, kind: str,
                   device: torch.device) -> Union[np.ndarray, torch.Tensor]:
        if batch_ndim != 3:
            x = x[0]
        if kind == "numpy":
            return x.float().cpu().numpy()
        return x.to(device)

    # ----------------------------------------------------------------- encode
    # numpy arrays and file paths give numpy, tensors give tensors: the overloads tell type checkers.
    # Everything after the audio is keyword-only: music2latent (v1) took other arguments in those
    # places (encode's second was max_waveform_length, decode's denoising_steps), and v1 code
    # must fail loudly rather than mean something else here.
    @overload
    def encode(self, audio: Union[str, os.PathLike, np.ndarray], *, sr: int = ..., extract_features: bool = ...,
               max_batch_size: Optional[int] = ..., normalize: bool = ..., return_gain: Literal[False] = ...,
               progress: bool = ..., max_waveform_length: Optional[int] = ...) -> np.ndarray: ...

    @overload
    def encode(self, audio: torch.Tensor, *, sr: int = ..., extract_features: bool = ...,
               max_batch_size: Optional[int] = ..., normalize: bool = ..., return_gain: Literal[False] = ...,
               progress: bool = ..., max_waveform_length: Optional[int] = ...) -> torch.Tensor: ...

    @overload
    def encode(self, audio: Union[str, os.PathLike, np.ndarray], *, sr: int = ..., extract_features: bool = ...,
               max_batch_size: Optional[int] = ..., normalize: bool = ..., return_gain: Literal[True],
               progress: bool = ..., max_waveform_length: Optional[int] = ...
               ) -> Tuple[np.ndarray, Union[float, np.ndarray]]: ...

    @overload
    def encode(self, audio: torch.Tensor, *, sr: int = ..., extract_features: bool = ...,
               max_batch_size: Optional[int] = ..., normalize: bool = ..., return_gain: Literal[True],
               progress: bool = ..., max_waveform_length: Optional[int] = ...
               ) -> Tuple[torch.Tensor, Union[float, torch.Tensor]]: ...

    def encode(self, audio: AudioLike, *v1_positional: Any, sr: int = 44100, extract_features: bool = False,
               max_batch_size: Optional[int] = None, normalize: bool = True, return_gain: bool = False,
               progress: bool = False, max_waveform_length: Optional[int] = None) -> Any:
        """Encode audio into latents (or MIR features).

        Args:
            audio: a file path (read at its own sample rate), or an array/tensor shaped (T,),
                (C, T) or (B, C, T), float or integer PCM.
            sr: sample rate of an array/tensor input (ignored for paths); resampled to 44.1 kHz.
            extract_features: return per-chunk features instead of latents.
            max_batch_size: chunks per encoder forward pass.
            normalize: first multiply each signal (each batch item, all its channels together)
                by the gain that brings its peak to ``config.input_peak_db``, the level the model
                reconstructs best (:mod:`~music2latent2.levels`). Latents of quiet and loud
                versions of a recording are then the same. No effect for a model whose
                ``input_peak_db`` is None.
            return_gain: also return the gain applied (1.0 without ``normalize``): a float for
                (T,) or (C, T) input, one per item for (B, C, T). ``decode(z, gain=gain)`` restores
                the original level.
            progress: show a progress bar over the chunks (for long single files).
            max_waveform_length: music2latent (v1)'s memory knob, accepted and ignored with a
                ``FutureWarning``: chunks are encoded ``max_batch_size`` at a time straight from
                the waveform, so memory does not grow with the audio beyond its own buffers.

        Returns:
            Latents (C, d_lat, L) for (T,) or (C, T) input, (B, C, d_lat, L) for (B, C, T), with
            L = K * chunks and chunk t's K embeddings at positions K*t .. K*t+K-1; scaled by
            ``config.latent_scale``. C is 1 for (T,) input and for a stereo model. With
            ``extract_features``: (C, K * dim, chunks) (or with a leading B), the K summary
            embeddings before the encoder's last linear layer, stacked (pool them into one clip
            vector with :func:`~music2latent2.features.clip_features`). numpy in -> numpy out;
            torch in -> torch out on the input's device (ordinary tensors, usable in autograd);
            path in -> numpy out. With ``return_gain``: ``(latents, gain)``.
        """
        refuse_positional("encode", v1_positional,
                           "in music2latent (v1) the second argument was max_waveform_length; pass sr=, "
                           "extract_features=, max_batch_size=... by name")
        ignore_v1_memory_knob(max_waveform_length)
        return self._encode(audio, sr, extract_features, max_batch_size, normalize, return_gain, progress)

    @inference_api
    def _encode(self, audio: AudioLike, sr: int, extract_features: bool, max_batch_size: Optional[int],
                normalize: bool, return_gain: bool, progress: bool) -> Any:
        batch = self._prepare_audio(audio, sr)
        b = batch.wav.shape[0]
        wav = batch.wav
        if normalize and self.config.input_peak_db is not None:
            gain = normalization_gain(wav, self.config.input_peak_db)  # (B,)
            wav = wav * gain[:, None, None]
        else:  # no copy of the audio when nothing is scaled
            gain = torch.ones(b, device=wav.device)
        seqs = self._sequences(wav)  # (S, ac, T)
        latents, features = self._encode_sequences(seqs, self._batch_size(max_batch_size), progress)
        out = features if extract_features else latents
        out = out.reshape(b, -1, *out.shape[1:])  # (B, C, ., .)
        result = self._give_back(out, batch.ndim, batch.kind, batch.device)
        if not return_gain:
            return result
        if batch.ndim != 3:
            return result, float(gain[0])
        return result, gain.cpu().numpy() if batch.kind == "numpy" else gain.to(batch.device)

    def _encode_sequences(self, seqs: torch.Tensor, max_batch_size: int,
                          progress: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """(S, ac, T) waveforms -> latents (S, d_lat, K*chunks), features (S, K*dim, chunks)."""
        padded, _ = self.model.geometry.pad(seqs)
        return self._encode_windows(self.model.geometry.windows(padded), max_batch_size, progress)

    def _encode_windows(self, windows: torch.Tensor, max_batch_size: int,
                        progress: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """(S, ac, chunks, span(1)) chunk windows -> latents (S, d_lat, K*chunks), features (S, K*dim, chunks)."""
        cfg = self.config
        s, chunks = windows.shape[0], windows.shape[2]
        index = torch.arange(s * chunks, device=windows.device)
        bar = chunk_progress(s * chunks, "encode", progress)

        def encode_group(idx: torch.Tensor) -> torch.Tensor:
            wav = windows[idx // chunks, :, idx % chunks]  # (n, ac, span)
            spec = self.model.spectral(wav)  # (n, 2ac, F, chunk_frames), float32
            with self._autocast():
                z, feats = self.model.encode_chunks(spec)
            bar.update(min(idx.shape[0], s * chunks - bar.n))  # padded rows are not chunks
            return torch.cat([z.float(), feats.float()], dim=-1)  # (n, K, d_lat + dim)

        with bar:
            out = map_batches(encode_group, max_batch_size, index, pad=self.static_shapes)  # (S*chunks, K, d_lat + dim)
        z, feats = out.split([cfg.latent_dim, cfg.dim], dim=-1)
        k = cfg.summary_tokens
        latents = z.reshape(s, chunks, k, cfg.latent_dim).permute(0, 3, 1, 2).reshape(s, cfg.latent_dim, chunks * k)
        features = feats.reshape(s, chunks, k * cfg.dim).transpose(1, 2)
        return latents * cfg.latent_scale, features.contiguous()

    # ----------------------------------------------------------------- decode
    def _sampler_options(self, denoising_steps: object, sigma_cond: object, seed: Optional[int],
                         generator: Optional[torch.Generator]) -> Tuple[int, float, Optional[torch.Generator]]:
        """Checked (denoising_steps, sigma_cond, generator); a seed becomes a generator on the model device."""
        steps = check_denoising_steps(denoising_steps)
        sigma = check_sigma_cond(sigma_cond, self.config.sigma_min, self.config.sigma_max)
        if generator is None and seed is not None:
            seed = require_int(seed, "seed must be an integer")
            generator = torch.Generator(device=self.device).manual_seed(seed)
        return steps, sigma, generator

    def _prepare_latents(self, latents: Union[np.ndarray, torch.Tensor]) -> _Batch:
        cfg = self.config
        if isinstance(latents, np.ndarray):
            kind, z = "numpy", torch.from_numpy(np.ascontiguousarray(latents))
        elif isinstance(latents, torch.Tensor):
            kind, z = "torch", latents.detach()
        else:
            raise TypeError(f"latents must be a numpy array or torch tensor, got {type(latents).__name__}")
        if not z.is_floating_point():
            raise TypeError(f"latents must be floating point, got {z.dtype}")
        if z.ndim not in (3, 4) or z.shape[-2] != cfg.latent_dim:
            raise ValueError(f"latents must have shape (C, {cfg.latent_dim}, L) or (B, C, {cfg.latent_dim}, L); "
                             f"got {tuple(z.shape)}")
        if z.shape[-1] == 0 or z.shape[-1] % cfg.summary_tokens:
            raise ValueError(f"latent length must be a positive multiple of K={cfg.summary_tokens}; "
                             f"got {z.shape[-1]}")
        check_finite(z, "latents")
        limit = LATENT_RANGE_FACTOR * cfg.latent_scale
        peak = float(z.abs().max())
        if peak > limit:
            raise ValueError(f"latents reach {peak:.3g}, far outside this model's range: its encoder gives values "
                             f"within +-{cfg.latent_scale:.3g} (tanh x latent_scale, about unit standard deviation) "
                             f"and decode refuses anything beyond +-{limit:.3g}. Were they scaled twice, or made "
                             "for another model?")
        return _Batch(z.float().to(self.device), z.ndim, kind, z.device)

    @overload
    def decode(self, latents: np.ndarray, *, length: Optional[int] = ..., gain: Optional[GainLike] = ...,
               max_batch_size: Optional[int] = ..., denoising_steps: int = ..., sigma_cond: float = ...,
               seed: Optional[int] = ..., generator: Optional[torch.Generator] = ..., mode: str = ...,
               progress: bool = ..., max_waveform_length: Optional[int] = ...) -> np.ndarray: ...

    @overload
    def decode(self, latents: torch.Tensor, *, length: Optional[int] = ..., gain: Optional[GainLike] = ...,
               max_batch_size: Optional[int] = ..., denoising_steps: int = ..., sigma_cond: float = ...,
               seed: Optional[int] = ..., generator: Optional[torch.Generator] = ..., mode: str = ...,
               progress: bool = ..., max_waveform_length: Optional[int] = ...) -> torch.Tensor: ...

    def decode(self, latents: Union[np.ndarray, torch.Tensor], *v1_positional: Any, length: Optional[int] = None,
               gain: Optional[GainLike] = None, max_batch_size: Optional[int] = None,
               denoising_steps: int = DEFAULT_DENOISING_STEPS, sigma_cond: float = DEFAULT_SIGMA_COND,
               seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
               mode: str = "autoregressive", progress: bool = False,
               max_waveform_length: Optional[int] = None) -> Union[np.ndarray, torch.Tensor]:
        """Decode latents to 44.1 kHz audio.

        ``mode="autoregressive"`` (default) is the paper's two-step autoregressive decoding
        (section IV-4): one model evaluation per chunk, in sequence. ``mode="parallel"`` decodes
        every chunk independently in one batched pass, then re-generates each chunk in a second
        batched pass conditioned on its predecessor's first-pass estimate (see
        :func:`~music2latent2.sampling.iter_parallel`): one extra one-chunk evaluation per chunk
        (about 1.4x the arithmetic), but no chunk waits for another, so a single long file runs
        in full batches. That pays off where batch size matters (a GPU); a CPU is already busy
        at batch 1, so there it is slower. The output differs from autoregressive mode's.

        Args:
            latents: (C, d_lat, L) or (B, C, d_lat, L), as :meth:`encode` returns; values beyond
                ``LATENT_RANGE_FACTOR * config.latent_scale`` in magnitude are refused.
            length: samples to return, an integer (<= chunks * 32768); default all of them.
            max_batch_size: sequences (channels x batch items) per model evaluation; in parallel
                mode, windows (sequences x chunks) per evaluation.
            denoising_steps: consistency steps per chunk, 1..64 (the paper's: 1).
            sigma_cond: noise level for re-noising the previous chunk, within the model's
                [sigma_min, sigma_max] (the paper's: 0.4). docs/decoding.md measures both knobs.
            seed / generator: make the noise, and so the output, reproducible.
            mode: "autoregressive" or "parallel".
            gain: what ``encode(..., return_gain=True)`` returned (a number, or one per batch
                item): the audio is divided by it, back to the level of the original. Default:
                the audio comes out at the model's ``input_peak_db`` level.
            progress: show a progress bar over the chunks (for long single files).
            max_waveform_length: music2latent (v1)'s memory knob, accepted and ignored with a
                ``FutureWarning``: memory is flat in the audio length here.

        Returns:
            (C * audio_channels, length) or (B, C * audio_channels, length) waveform at 44.1 kHz;
            numpy for numpy latents, torch on the latents' device for torch latents (an ordinary
            tensor, usable in autograd). For a ``.m2l`` file, :meth:`decode_file` gives the
            audio back at the original rate, length and level.
        """
        refuse_positional("decode", v1_positional,
                           "in music2latent (v1) the second argument was denoising_steps; pass "
                           "denoising_steps=..., and length=... for the number of samples, by name")
        ignore_v1_memory_knob(max_waveform_length)
        return self._decode(latents, length, gain, max_batch_size, denoising_steps, sigma_cond, seed, generator, mode,
                            progress)

    @inference_api
    def _decode(self, latents: Union[np.ndarray, torch.Tensor], length: Optional[int], gain: Optional[GainLike],
                max_batch_size: Optional[int], denoising_steps: int, sigma_cond: float, seed: Optional[int],
                generator: Optional[torch.Generator], mode: str, progress: bool) -> Union[np.ndarray, torch.Tensor]:
        if mode not in DECODE_MODES:
            raise ValueError(f"mode must be one of {DECODE_MODES}, got {mode!r}")
        cfg = self.config
        batch = self._prepare_latents(latents)
        z = batch.wav if batch.ndim == 4 else batch.wav[None]
        b, c = z.shape[:2]
        chunks = z.shape[-1] // cfg.summary_tokens
        total = chunks * cfg.chunk_samples
        length = total if length is None else require_int(length, "length must be an integer number of samples")
        if not 0 < length <= total:
            raise ValueError(f"length must be in 1..{total} for {chunks} chunks of latents, got {length}")
        denoising_steps, sigma_cond, generator = self._sampler_options(denoising_steps, sigma_cond, seed, generator)
        restore = None if gain is None else check_gain(gain, b, self.device)  # (B,)

        seq = z.reshape(b * c, cfg.latent_dim, chunks, cfg.summary_tokens).permute(0, 2, 3, 1)  # (S, T, K, d)
        seq = seq / cfg.latent_scale
        with self._autocast():
            sampler = iter_autoregressive if mode == "autoregressive" else iter_parallel
            stream = sampler(self.model, seq, sigma_cond=sigma_cond, denoising_steps=denoising_steps,
                             generator=generator, max_batch_size=self._batch_size(max_batch_size),
                             pad=self.static_shapes)
            with chunk_progress(chunks, "decode", progress) as bar:
                wav = self._assemble(stream, b * c, chunks, bar)
        # Reshape the contiguous buffer first, then crop: both are views, no copy of the audio.
        wav = self.model.geometry.crop(wav.reshape(b, c * cfg.audio_channels, -1), length)
        if restore is not None:
            wav = wav / restore[:, None, None]
        return self._give_back(wav, 3 if batch.ndim == 4 else 2, batch.kind, batch.device)

    def decode_file(self, source: Union[str, os.PathLike, Tuple[np.ndarray, LatentMetadata]], *,
                    sr: Optional[int] = None, denoising_steps: int = DEFAULT_DENOISING_STEPS,
                    sigma_cond: float = DEFAULT_SIGMA_COND, seed: Optional[int] = 0,
                    generator: Optional[torch.Generator] = None, max_batch_size: Optional[int] = None,
                    mode: str = "autoregressive", progress: bool = False) -> Tuple[np.ndarray, int]:
        """Decode a ``.m2l`` file back to the audio it was made from: rate, length, channels, level.

        :meth:`decode` works at 44.1 kHz and knows nothing of the original; a file's
        ``LatentMetadata.length`` counts samples at the original rate, so passing it as
        ``decode(length=...)`` for a 48 kHz file would silently give the wrong duration. This
        does the whole way back, as ``music2latent2 decode`` does.

        Args:
            source: a ``.m2l`` path, or the ``(latents, metadata)`` pair :func:`load_latents` returns.
            sr: output sample rate; default the original's.
            denoising_steps, sigma_cond, generator, max_batch_size, mode, progress: as :meth:`decode`.
            seed: decoder noise seed; default 0, so the same file always decodes to the same audio
                (None draws fresh noise).

        Returns:
            ``(wav, sr)``: float32 numpy (channels, samples) with the original channel count and
            ``ceil(length * sr / original sr)`` samples (exactly ``length`` at the original rate),
            at the original level (the gain stored at encoding is divided out).

        Raises:
            LatentFileError: a missing, corrupt or inconsistent file.
            ValueError: latents made by a model of another kind (K, d_lat, latent_scale, channels).
        """
        if isinstance(source, (str, os.PathLike)):
            latents, meta = load_latents(source)
        elif isinstance(source, tuple) and len(source) == 2 and isinstance(source[1], LatentMetadata):
            latents, meta = source
        else:
            raise TypeError("source must be a .m2l path or the (latents, metadata) pair load_latents returns, got "
                            f"{type(source).__name__}")
        out_sr = meta.sample_rate if sr is None else check_sample_rate(sr, "sr")
        cfg = self.config
        z = torch.as_tensor(latents)
        downmix = meta.check_model(int(z.shape[0]), cfg)
        chunks = z.shape[-1] // cfg.summary_tokens
        n_model = min(meta.model_length, chunks * cfg.chunk_samples)
        wav = self.decode(z, length=n_model, gain=meta.gain, denoising_steps=denoising_steps, sigma_cond=sigma_cond,
                          seed=seed, generator=generator, max_batch_size=max_batch_size, mode=mode,
                          progress=progress)  # (C_out, n_model) at the original level
        if downmix:
            wav = wav.mean(dim=0, keepdim=True)
        length = meta.length if out_sr == meta.sample_rate else -(-meta.length * out_sr // meta.sample_rate)
        wav = resample(wav.float().cpu(), cfg.sample_rate, out_sr)[..., :length]
        if wav.shape[-1] < length:  # resampler rounding: at most a few samples
            wav = torch.nn.functional.pad(wav, (0, length - wav.shape[-1]))
        return wav.numpy(), out_sr

    def _assemble(self, stream: Iterator[Tuple[int, torch.Tensor]], sequences: int, chunks: int,
                  bar: Optional[Any] = None) -> torch.Tensor:
        """Overlap-add finished spectrogram chunks into the padded waveform (S, ac, samples).

        Each chunk's finished samples go straight into one preallocated buffer (see
        :class:`~music2latent2.spectral.OverlapAddStream`): it is the only allocation that grows
        with the audio's length.
        """
        geometry = self.model.geometry
        cs = geometry.chunk_samples
        out = torch.empty(sequences, self.config.audio_channels, geometry.span(chunks), device=self.device)
        no_autocast = torch.autocast(device_type=self.device.type, enabled=False)
        with no_autocast:
            ola = OverlapAddStream(self.model.spectral, geometry, self.device)
        # The sampler is a generator: its model calls run while this loop pulls the next chunk,
        # so the loop itself stays under the caller's autocast and only the overlap-add opts out.
        for t, spec in stream:
            with no_autocast:
                out[..., t * cs:(t + 1) * cs] = ola.push(spec)
            if bar is not None:
                bar.update(1)
        with no_autocast:
            out[..., chunks * cs:] = ola.flush()
        return out

    def __repr__(self) -> str:
        return (f"EncoderDecoder(params={self.model.num_parameters() / 1e6:.1f}M, device={self.device}, "
                f"precision={self.precision}, audio_channels={self.config.audio_channels}"
                f"{', compile=True' if self.compile else ''})")

