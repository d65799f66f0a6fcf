"""Reading, validating, converting and resampling user audio."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Tuple, Union

import numpy as np
import soundfile as sf
import torch

from .fileio import find_files

__all__ = ["AudioLike", "AUDIO_EXTENSIONS", "MIN_SAMPLE_RATE", "MAX_SAMPLE_RATE", "MAX_TIME_LAST_GUESS",
           "find_audio_files", "load_audio", "to_float_array", "resample", "check_finite", "check_sample_rate",
           "check_time_last"]

AudioLike = Union[str, os.PathLike, np.ndarray, torch.Tensor]

# File endings treated as audio when scanning folders (all formats libsndfile reads).
AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au",
                              ".snd", ".w64", ".caf", ".rf64"})


# Sample rates outside this range are mistakes (sr=1 would make a 44,100x longer signal; sr=1e12 would
# squeeze a song into a few samples), not audio: refused with an error instead of running out of memory.
MIN_SAMPLE_RATE = 1_000
MAX_SAMPLE_RATE = 768_000

# A 2-D or 3-D array whose last axis is at most this long and shorter than the axis before it is taken
# to be (time, channels), the layout soundfile.read returns, and refused: 64 samples are 1.5 ms at
# 44.1 kHz, never a useful signal, while (time, channels) arrays have 1-8 channels and long time axes.
MAX_TIME_LAST_GUESS = 64


def check_sample_rate(sr: object, name: str = "sr") -> int:
    """Return ``sr`` as an int if it is an integer number of Hz in 1 kHz .. 768 kHz, else raise.

    Raises:
        TypeError: ``sr`` is not an integer (floats such as 44100.0 included: pass ``int(sr)``).
        ValueError: ``sr`` is outside ``MIN_SAMPLE_RATE .. MAX_SAMPLE_RATE``.
    """
    if isinstance(sr, bool) or not isinstance(sr, (int, np.integer)):
        raise TypeError(f"{name} must be an integer number of Hz, got {sr!r} ({type(sr).__name__})"
                        + ("; pass int(sr)" if isinstance(sr, (float, np.floating)) and float(sr).is_integer() else ""))
    if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
        raise ValueError(f"{name}={int(sr)} Hz is not a plausible audio sample rate: it must be between "
                         f"{MIN_SAMPLE_RATE} and {MAX_SAMPLE_RATE} Hz")
    return int(sr)


def check_time_last(shape: Tuple[int, ...], name: str = "audio") -> None:
    """Refuse an array that looks like (time, channels) instead of (channels, time).

    The rule: for 2 or more dimensions, if the last axis is at most ``MAX_TIME_LAST_GUESS`` long and
    shorter than the axis before it, the axes are swapped (a 5 s stereo clip from ``soundfile.read``
    is (220500, 2); taken as (C, T) it would be 220,500 channels of 2 samples each).
    """
    if len(shape) >= 2 and 0 < shape[-1] <= MAX_TIME_LAST_GUESS and shape[-2] > shape[-1]:
        swapped = shape[:-2] + (shape[-1], shape[-2])
        fix = "wav.T" if len(shape) == 2 else "wav.swapaxes(-1, -2)"
        raise ValueError(f"{name} has shape {tuple(shape)}, which looks like (time, channels), the layout "
                         f"soundfile.read returns; time must be the last axis: (T,), (C, T) or (B, C, T). "
                         f"Pass {fix} (shape {swapped})")


def find_audio_files(path: Union[str, os.PathLike]) -> List[Path]:
    """A file -> [it]; a folder -> its audio files, recursive and sorted. Hidden files and folders
    (such as the temp files of an interrupted atomic write) are skipped."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise ValueError(f"audio file or folder not found: {p}")
    return find_files(p, AUDIO_EXTENSIONS)


def load_audio(path: Union[str, os.PathLike]) -> Tuple[np.ndarray, int]:
    """Read an audio file. Returns ((C, T) float32 in [-1, 1], sample rate)."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"audio file not found: {p}")
    if not p.is_file():
        raise ValueError(f"not a file: {p}")
    try:
        data, sr = sf.read(str(p), dtype="float32", always_2d=True)  # (T, C)
    except Exception as err:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        raise ValueError(f"cannot read audio file {p}: {err}") from err
    if data.size == 0:
        raise ValueError(f"audio file is empty: {p}")
    try:
        check_sample_rate(int(sr), "sample rate")
    except ValueError as err:
        raise ValueError(f"audio file {p}: {err}") from None
    return np.ascontiguousarray(data.T), int(sr)


def to_float_array(x: Union[np.ndarray, torch.Tensor], name: str = "audio") -> torch.Tensor:
    """Convert PCM of any common dtype to a float32 tensor in [-1, 1] (device kept)."""
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "fiu":
            raise TypeError(f"{name} must be float or integer PCM, got numpy dtype {x.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        raise TypeError(f"{name} must be a path, numpy array or torch tensor, got {type(x).__name__}")
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be real float or integer PCM, got {t.dtype}")
    if t.is_floating_point():
        return t.float()
    scale = {torch.int16: 32768.0, torch.int32: 2147483648.0, torch.int8: 128.0, torch.int64: 2.0 ** 63}
    if t.dtype == torch.uint8:  # unsigned 8-bit PCM is offset by 128
        return (t.float() - 128.0) / 128.0
    if t.dtype not in scale:
        raise TypeError(f"unsupported {name} dtype {t.dtype}")
    return t.float() / scale[t.dtype]


def check_finite(x: torch.Tensor, name: str = "audio") -> None:
    if x.numel() == 0:
        raise ValueError(f"{name} is empty")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def resample(x: torch.Tensor, sr_in: int, sr_out: int) -> torch.Tensor:
    """Resample (..., T) along the last axis with soxr (high quality). Device is kept."""
    if sr_in == sr_out:
        return x
    check_sample_rate(sr_in, "input sample rate")
    check_sample_rate(sr_out, "output sample rate")
    import soxr

    lead, n = x.shape[:-1], x.shape[-1]
    flat = x.reshape(-1, n).detach().cpu().numpy().T  # (T, channels) as soxr expects
    out = soxr.resample(np.ascontiguousarray(flat), sr_in, sr_out)
    out = torch.from_numpy(np.ascontiguousarray(out.T if out.ndim == 2 else out[None]))
    return out.reshape(*lead, -1).to(x.device)
