"""Clip-level MIR features: per-chunk features pooled with each chunk's real share of audio.

``EncoderDecoder.encode(..., extract_features=True)`` gives one feature vector per chunk of
32,768 samples. The audio is zero-padded up to whole chunks, so the last chunk of a clip holds
anything from one sample to a full chunk of real audio. A plain mean over chunks gives that
mostly-silent chunk a full vote: a 3 s clip has 5 chunks, the last one 3.7% audio and 96.3%
zeros. Weighting each chunk by the fraction of its 32,768 samples that are real audio removes
that dependence on where the clip happens to end.
"""

from __future__ import annotations

import math
from typing import TypeVar, Union

import numpy as np
import torch

__all__ = ["chunk_weights", "clip_features"]

Array = TypeVar("Array", np.ndarray, torch.Tensor)


def chunk_weights(length: int, chunks: int, chunk_samples: int = 32768) -> np.ndarray:
    """Fraction of real audio in each chunk of a ``length``-sample signal padded to ``chunks`` chunks.

    Args:
        length: samples of real audio at the model's rate (44.1 kHz), before padding.
        chunks: chunks the features cover (at least ``ceil(length / chunk_samples)``).
        chunk_samples: samples per chunk (``config.chunk_samples``).

    Returns:
        (chunks,) float64 weights in [0, 1]; they sum to ``length / chunk_samples``.
    """
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length <= 0:
        raise ValueError(f"length must be a positive number of samples, got {length!r}")
    if chunks < math.ceil(length / chunk_samples):
        raise ValueError(f"{chunks} chunks of {chunk_samples} samples cannot hold {length} samples of audio: "
                         "is length at another sample rate than the model's 44.1 kHz?")
    start = np.arange(chunks, dtype=np.int64) * chunk_samples
    return np.clip(int(length) - start, 0, chunk_samples) / chunk_samples


def clip_features(features: Array, length: Union[int, None] = None, chunk_samples: int = 32768) -> Array:
    """One vector per clip: the per-chunk features averaged, each chunk weighted by its audio.

    Args:
        features: (..., D, chunks) as ``encode(..., extract_features=True)`` returns them.
        length: samples of audio that were encoded, at the model's rate (44.1 kHz; for a file at
            another rate, ``ceil(n * 44100 / sr)``). None weights every chunk equally (the plain
            mean, right only when the audio fills whole chunks).
        chunk_samples: samples per chunk (``config.chunk_samples``).

    Returns:
        (..., D), numpy for numpy input, torch (same device and dtype) for torch input.
    """
    if not isinstance(features, (np.ndarray, torch.Tensor)) or features.ndim < 2:
        raise ValueError("features must be an array of shape (..., D, chunks)")
    chunks = features.shape[-1]
    if length is None:
        weights = np.full(chunks, 1.0 / chunks)
    else:
        weights = chunk_weights(length, chunks, chunk_samples)
        weights = weights / weights.sum()
    if isinstance(features, np.ndarray):
        return (features * weights.astype(features.dtype)).sum(axis=-1)
    w = torch.as_tensor(weights, dtype=features.dtype, device=features.device)
    return (features * w).sum(dim=-1)
