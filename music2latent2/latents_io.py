"""The ``.m2l`` latent file format: safetensors holding one latent tensor plus metadata.

A ``.m2l`` file is a plain safetensors file (readable by any safetensors reader) with:

* one tensor, ``"latents"``: float32, shape (C, d_lat, L) exactly as
  :meth:`~music2latent2.EncoderDecoder.encode` returns it for one (C, T) signal
  (L = K * chunks, already multiplied by ``latent_scale``);
* string metadata describing how to turn it back into the original audio (see
  :class:`LatentMetadata`; every value is a string because safetensors metadata is str -> str).

Writes are atomic (temp file in the destination directory, then ``os.replace``), so a crash never
leaves a half-written ``.m2l`` under the final name.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional, Tuple, Union

import numpy as np
import torch

from .audio import check_sample_rate
from .fileio import atomic_write, safetensors_problem

if TYPE_CHECKING:
    from .config import ModelConfig

__all__ = ["LATENT_FORMAT", "LATENT_FORMAT_VERSION", "LatentFileError", "LatentMetadata", "save_latents",
           "load_latents", "read_latent_header", "read_latent_slice"]

LATENT_FORMAT = "music2latent2-latents"
LATENT_FORMAT_VERSION = "3"
# Version 2 added model_audio_channels, version 3 gain; older files are still read (see
# load_latents): a file without a gain was encoded at the audio's own level, gain 1.
READABLE_VERSIONS = ("1", "2", "3")
_FLOAT_FIELDS = ("latent_scale", "gain")
TENSOR_NAME = "latents"


class LatentFileError(ValueError):
    """A ``.m2l`` file is missing, unreadable, or its tensor and metadata disagree."""


@dataclass(frozen=True)
class LatentMetadata:
    """What a ``.m2l`` file records besides the latents.

    Attributes:
        sample_rate: sample rate of the original audio (Hz).
        length: length of the original audio in samples at ``sample_rate`` (not the model's
            rate: :attr:`model_length` is the ``length=`` for ``decode``, and
            ``EncoderDecoder.decode_file`` does the whole round trip).
        channels: channel count of the audio that was encoded.
        summary_tokens: K, latent vectors per chunk.
        latent_dim: d_lat, size of each latent vector.
        latent_scale: the model's ``latent_scale`` (latents = tanh-latents * scale).
        model_sample_rate: the rate the model works at (44,100 Hz).
        chunk_samples: samples per chunk at ``model_sample_rate`` (32,768).
        model_name: the model name or checkpoint path the latents were made with.
        model_sha256: sha256 of that checkpoint's ``model.safetensors`` ("" if unknown).
        model_audio_channels: audio channels of the model that made the latents (1 mono: one
            latent sequence per audio channel; 2 stereo: one sequence for both), None if unknown.
            Decoding with a model of the other kind would give the wrong number of channels.
        gain: what the audio was multiplied by before encoding (``encode(..., return_gain=True)``;
            1.0 for files written before format version 3); decoding divides by it.
        extra: free-form string fields (e.g. ``source``, the input's relative path).
    """

    sample_rate: int
    length: int
    channels: int
    summary_tokens: int
    latent_dim: int
    latent_scale: float
    model_sample_rate: int = 44100
    chunk_samples: int = 32768
    model_name: str = ""
    model_sha256: str = ""
    model_audio_channels: Optional[int] = None
    gain: float = 1.0
    extra: Dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("sample_rate", "length", "channels", "summary_tokens", "latent_dim", "model_sample_rate",
                     "chunk_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise LatentFileError(f"metadata {name} must be a positive integer, got {value!r}")
        if not float(self.latent_scale) > 0:
            raise LatentFileError(f"metadata latent_scale must be positive, got {self.latent_scale!r}")
        for name in ("sample_rate", "model_sample_rate"):
            try:
                check_sample_rate(getattr(self, name), f"metadata {name}")
            except ValueError as err:
                raise LatentFileError(str(err)) from None
        if not (np.isfinite(float(self.gain)) and float(self.gain) > 0):
            raise LatentFileError(f"metadata gain must be a finite positive number, got {self.gain!r}")
        if self.model_audio_channels not in (None, 1, 2):
            raise LatentFileError("metadata model_audio_channels must be 1, 2 or None, "
                                  f"got {self.model_audio_channels!r}")

    @property
    def duration(self) -> float:
        """Duration of the original audio in seconds."""
        return self.length / self.sample_rate

    @property
    def model_length(self) -> int:
        """The original audio's length in samples at ``model_sample_rate`` (44.1 kHz), the ``length=``
        to give :meth:`~music2latent2.EncoderDecoder.decode`; ``length`` counts the original rate."""
        return -(-self.length * self.model_sample_rate // self.sample_rate)

    def check_model(self, sequences: int, config: ModelConfig) -> bool:
        """Check that a model with ``config`` decodes these latents to the original's channels.

        Args:
            sequences: C, latent sequences in the file (its tensor's first axis).
            config: the decoding model's config.

        Returns:
            True when the output must be averaged to mono: a mono original encoded by a stereo
            model (its input was duplicated to both sides).

        Raises:
            ValueError: latents of another K, d_lat, latent_scale or channel kind than the model's.
        """
        for name in ("summary_tokens", "latent_dim"):
            if getattr(self, name) != getattr(config, name):
                raise ValueError(f"latents have {name}={getattr(self, name)} but the model has {getattr(config, name)}")
        if not math.isclose(self.latent_scale, config.latent_scale, rel_tol=1e-6):
            raise ValueError(f"latents have latent_scale={self.latent_scale} but the model has {config.latent_scale}: "
                             "they were made by another model")
        kinds = {1: "mono", 2: "stereo"}
        if self.model_audio_channels is not None and self.model_audio_channels != config.audio_channels:
            raise ValueError(f"latents were made by a {kinds[self.model_audio_channels]} model but this model is "
                             f"{kinds[config.audio_channels]}: they would decode to the wrong number of channels; "
                             f"decode them with a {kinds[self.model_audio_channels]} checkpoint")
        out_channels = sequences * config.audio_channels  # a stereo model gives 2 channels per sequence
        downmix = self.channels == 1 and config.audio_channels == 2 and out_channels == 2
        if out_channels != self.channels and not downmix:  # never another channel count than the original's
            raise ValueError(f"these latents ({sequences} sequences) would decode to {out_channels} channels "
                             f"with this {config.audio_channels}-channel model, but the original had {self.channels}")
        return downmix

    def to_strings(self) -> Dict[str, str]:
        """The safetensors metadata dict (str -> str), format tag and version included."""
        out = {f"extra.{k}": str(v) for k, v in self.extra.items()}
        for f in dataclasses.fields(self):
            if f.name == "model_audio_channels" and self.model_audio_channels is None:
                continue
            if f.name != "extra":
                value = getattr(self, f.name)
                out[f.name] = repr(float(value)) if f.name in _FLOAT_FIELDS else str(value)
        out.update({"format": LATENT_FORMAT, "format_version": LATENT_FORMAT_VERSION})
        return out

    @classmethod
    def from_strings(cls, meta: Dict[str, str], where: str = "latent file") -> LatentMetadata:
        """Parse :meth:`to_strings` output; raises :class:`LatentFileError` naming what is wrong."""
        if meta.get("format") != LATENT_FORMAT:
            raise LatentFileError(f"{where} is not a music2latent2 latent file (format={meta.get('format')!r})")
        if meta.get("format_version") not in READABLE_VERSIONS:
            raise LatentFileError(f"{where} has latent format version {meta.get('format_version')!r}; "
                                  f"this library reads versions {', '.join(READABLE_VERSIONS)}: upgrade music2latent2")
        kwargs: Dict[str, object] = {}
        for f in dataclasses.fields(cls):
            if f.name == "extra":
                continue
            if f.name not in meta:
                if f.default is not dataclasses.MISSING:
                    continue
                raise LatentFileError(f"{where} metadata lacks {f.name!r}")
            raw = meta[f.name]
            try:
                kwargs[f.name] = float(raw) if f.name in _FLOAT_FIELDS else raw if f.type == "str" else int(raw)
            except ValueError as err:
                raise LatentFileError(f"{where} metadata {f.name}={raw!r} is not a number") from err
        kwargs["extra"] = {k[len("extra."):]: v for k, v in meta.items() if k.startswith("extra.")}
        return cls(**kwargs)  # type: ignore[arg-type]


def save_latents(path: Union[str, os.PathLike], latents: Union[np.ndarray, torch.Tensor],
                 metadata: LatentMetadata) -> Path:
    """Write latents and their metadata to a ``.m2l`` file, atomically.

    Args:
        path: destination (conventionally ending in ``.m2l``).
        latents: (C, d_lat, L) array/tensor, as ``EncoderDecoder.encode`` returns for one signal.
        metadata: see :class:`LatentMetadata`; d_lat and K must agree with the shape.

    Returns:
        The written path.
    """
    from safetensors.torch import save_file

    z = torch.from_numpy(np.ascontiguousarray(latents)) if isinstance(latents, np.ndarray) else latents
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"latents must be a numpy array or torch tensor, got {type(latents).__name__}")
    if not z.is_floating_point():
        raise TypeError(f"latents must be floating point, got {z.dtype}")
    _check_shape(tuple(z.shape), metadata, "latents")
    if not bool(torch.isfinite(z).all()):
        raise ValueError("latents contain NaN or infinite values")
    tensor = z.detach().to("cpu", torch.float32).contiguous()
    strings = metadata.to_strings()
    return atomic_write(path, lambda tmp: save_file({TENSOR_NAME: tensor}, tmp, metadata=strings))


def read_latent_header(path: Union[str, os.PathLike]) -> Tuple[Tuple[int, ...], LatentMetadata]:
    """The tensor shape and metadata of a ``.m2l`` file, checked as :func:`load_latents` checks
    them, without reading the latents (a scan of a large folder reads only the headers).

    Raises:
        LatentFileError: as :func:`load_latents`.
    """
    return _read(path, with_tensor=False)[1:]


def read_latent_slice(path: Union[str, os.PathLike], sequence: int, start: int = 0,
                      stop: Optional[int] = None) -> torch.Tensor:
    """Positions ``start:stop`` (None: to the end) of latent sequence ``sequence`` of a ``.m2l``
    file, as a float32 (d_lat, stop - start) tensor. safetensors reads only that part of the file,
    so random crops of long files cost what the crop costs. The file's metadata is not checked
    here: :func:`read_latent_header` does that once per file.

    Raises:
        LatentFileError: the file cannot be read.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            part = f.get_slice(TENSOR_NAME)
            end = part.get_shape()[-1] if stop is None else stop
            z = part[sequence:sequence + 1, :, start:end][0]
    except (SafetensorError, OSError, RuntimeError) as err:
        raise LatentFileError(f"cannot read latent file {path}: {err}") from err
    return z.to(torch.float32).contiguous()


def load_latents(path: Union[str, os.PathLike]) -> Tuple[np.ndarray, LatentMetadata]:
    """Read a ``.m2l`` file.

    Version-1 files (before ``model_audio_channels`` was recorded) are read too; their
    ``model_audio_channels`` is inferred from the shape where it is unambiguous (C = 1 for a
    multi-channel original: stereo model; C = channels >= 2: mono model), else left None.

    Returns:
        (latents (C, d_lat, L) float32 numpy array, :class:`LatentMetadata`).

    Raises:
        LatentFileError: missing/unreadable file or not a latent file at all, wrong format or
            version, or a tensor shape or length that disagrees with the metadata.
    """
    tensor, _, metadata = _read(path, with_tensor=True)
    assert tensor is not None
    return tensor.float().numpy(), metadata


def _read(path: Union[str, os.PathLike],
          with_tensor: bool) -> Tuple[Optional[torch.Tensor], Tuple[int, ...], LatentMetadata]:
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise LatentFileError(f"latent file not found: {p}")
    problem = safetensors_problem(p)
    if problem:
        raise LatentFileError(f"cannot read {p}: it is not a music2latent2 latent file (.m2l, made by "
                              f"'music2latent2 encode' or save_latents): {problem}")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            if TENSOR_NAME not in f.keys():
                raise LatentFileError(f"latent file {p} has no {TENSOR_NAME!r} tensor")
            tensor = f.get_tensor(TENSOR_NAME) if with_tensor else None
            shape = tuple(tensor.shape) if tensor is not None else tuple(f.get_slice(TENSOR_NAME).get_shape())
    except (SafetensorError, OSError, RuntimeError) as err:
        raise LatentFileError(f"cannot read latent file {p}: {err}") from err
    metadata = LatentMetadata.from_strings(meta, where=f"latent file {p}")
    if meta.get("format_version") == "1":  # before model_audio_channels: infer it where the shape tells
        c = shape[0] if len(shape) == 3 else 0
        inferred = 2 if c == 1 and metadata.channels >= 2 else 1 if c == metadata.channels >= 2 else None
        metadata = dataclasses.replace(metadata, model_audio_channels=inferred)
    _check_shape(shape, metadata, f"latent file {p}")
    return tensor, shape, metadata


def _check_shape(shape: Tuple[int, ...], meta: LatentMetadata, where: str) -> None:
    if len(shape) != 3 or shape[1] != meta.latent_dim:
        raise LatentFileError(f"{where} must have shape (C, {meta.latent_dim}, L), got {shape}")
    if shape[0] == 0 or shape[2] == 0 or shape[2] % meta.summary_tokens:
        raise LatentFileError(f"{where}: C must be >= 1 and L a positive multiple of K={meta.summary_tokens}; "
                              f"got shape {shape}")
    if meta.model_audio_channels == 2 and shape[0] != 1:
        raise LatentFileError(f"{where}: a stereo model gives one latent sequence per signal, but the tensor has "
                              f"{shape[0]} (shape {shape})")
    if meta.model_audio_channels == 1 and shape[0] != meta.channels:
        raise LatentFileError(f"{where}: a mono model gives one latent sequence per audio channel "
                              f"(channels={meta.channels}), but the tensor has {shape[0]} (shape {shape})")
    covered = (shape[2] // meta.summary_tokens) * meta.chunk_samples
    # A few samples of slack for resampler rounding; beyond that the length is corrupt, and decoding
    # would pad the output to it (length=10**15 would ask for petabytes).
    if meta.length * meta.model_sample_rate > (covered + 4) * meta.sample_rate:
        raise LatentFileError(f"{where}: metadata length {meta.length} samples at {meta.sample_rate} Hz "
                              f"({meta.duration:.3f} s) is longer than the {shape[2] // meta.summary_tokens} chunks "
                              f"of latents cover ({covered / meta.model_sample_rate:.3f} s)")
