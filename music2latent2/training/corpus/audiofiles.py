"""Audio helpers of the corpus builder: mono 44.1 kHz reads, a band-limit detector, Vorbis writes."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence, Tuple

import numpy as np
import soundfile as sf
import torch

from ...audio import load_audio, resample
from ...fileio import atomic_write

SAMPLE_RATE = 44100
# Ogg Vorbis at libsndfile compression level 0.5 is ~80 kbit/s for mono music (34 MiB per hour)
# and decodes at ~1,000x real time per core; Opus at the same size decodes 3.8x slower and only
# at 48 kHz. Measured in docs/corpus.md.
VORBIS_LEVEL = 0.5


def to_mono(data: np.ndarray, sample_rate: int) -> np.ndarray:
    """(C, T) audio at any rate -> (T',) float32 mono at 44.1 kHz (the library's soxr resampler)."""
    mono = torch.from_numpy(np.ascontiguousarray(data.mean(axis=0), dtype=np.float32))
    return resample(mono, sample_rate, SAMPLE_RATE).numpy()


def read_mono(paths: Sequence[Path]) -> Tuple[np.ndarray, int]:
    """Mono 44.1 kHz sum of one or more files (stems of one song) and the lowest source rate."""
    mix, rate = None, SAMPLE_RATE * 100
    for path in paths:
        data, sr = load_audio(path)  # (C, T); a clear ValueError for an unreadable or empty file
        rate = min(rate, sr)
        mono = to_mono(data, sr)
        if mix is None:
            mix = mono
        else:
            n = max(len(mix), len(mono))
            mix = np.pad(mix, (0, n - len(mix))) + np.pad(mono, (0, n - len(mono)))
    if mix is None:
        raise ValueError("no files to read")
    return mix, rate


def trim_silence(audio: np.ndarray, threshold: float = 1e-4) -> np.ndarray:
    """Drop leading and trailing samples quieter than ``threshold``."""
    loud = np.flatnonzero(np.abs(audio) > threshold)
    return audio[loud[0]: loud[-1] + 1] if loud.size else audio[:0]


def normalize_peak(audio: np.ndarray, peak: float = 0.9) -> np.ndarray:
    """Scale clipping or very quiet audio to ``peak``; leave the rest as mastered."""
    top = float(np.abs(audio).max()) if audio.size else 0.0
    if top > 1.0 or 0.0 < top < 0.1:
        audio = audio * (peak / top)
    return audio.astype(np.float32, copy=False)


def bandwidth_hz(audio: np.ndarray, sample_rate: int, floor_db: float = -60.0, excerpts: int = 12,
                 frame: int = 16384) -> float:
    """Highest frequency with real content: where the spectrum falls ``floor_db`` below the music.

    The mean power spectrum of ``excerpts`` frames spread over the file is compared with its
    90th percentile level between 100 Hz and 8 kHz. The level is taken as the median over 1 kHz
    windows, so an isolated tone or a little codec noise above a low-pass cut-off does not
    count as bandwidth. A track low-passed at 10 kHz reads ~10 kHz; Vorbis at 128 kbit/s
    (cut-off ~19 kHz) reads 18-20 kHz. Quiet-topped recordings can read low: the check errs
    towards dropping a track.

    Args:
        audio: (T,) mono samples.
        sample_rate: their rate.
    """
    audio = np.asarray(audio, np.float32)
    if len(audio) < frame:
        frame = 1 << max(8, int(np.log2(max(len(audio), 256))))
        audio = np.pad(audio, (0, max(0, frame - len(audio))))
    window = np.hanning(frame).astype(np.float32)
    starts = np.linspace(0, len(audio) - frame, excerpts).astype(int)
    power = np.mean([np.abs(np.fft.rfft(audio[s:s + frame] * window)) ** 2 for s in starts], axis=0)
    freqs = np.fft.rfftfreq(frame, 1 / sample_rate)
    level = 10 * np.log10(power + 1e-20)
    reference = np.percentile(level[(freqs > 100) & (freqs < 8000)], 90)
    bin_hz = sample_rate / frame
    width = max(1, int(1000 / bin_hz))
    starts_idx = np.arange(0, max(1, len(level) - width), max(1, int(250 / bin_hz)))
    median = np.array([np.median(level[i:i + width]) for i in starts_idx])
    above = np.flatnonzero(median > reference + floor_db)
    if above.size == 0:
        return 0.0
    return float(freqs[min(starts_idx[above[-1]] + width, len(freqs) - 1)])


def write_vorbis(path: Path, audio: np.ndarray, level: float = VORBIS_LEVEL) -> None:
    """Write mono 44.1 kHz Ogg Vorbis atomically (the library's ``atomic_write``).

    Written in blocks: one very long write makes libsndfile's Vorbis encoder fail.
    """
    def write(tmp: str) -> None:
        with sf.SoundFile(tmp, "w", SAMPLE_RATE, 1, format="OGG", subtype="VORBIS", compression_level=level) as out:
            for i in range(0, len(audio), 1 << 16):
                out.write(audio[i:i + (1 << 16)])

    atomic_write(path, write)


def file_digest(*paths: Path, algorithm: str = "sha256") -> str:
    """Hex digest of one file, or of several read one after the other, in 1 MiB blocks."""
    digest = hashlib.new(algorithm)
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
