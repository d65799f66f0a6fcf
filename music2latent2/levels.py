"""Input level: bring each signal to the level its model reconstructs best, and back.

A model is trained on crops at some range of peak levels and reconstructs audio at other levels
worse (docs/levels.md has the measurements). ``EncoderDecoder.encode`` therefore multiplies each
signal by the gain that brings its peak to ``config.input_peak_db`` before encoding, and can
return that gain; ``decode(..., gain=)`` divides the audio by it again. One gain per signal (per
batch item, shared by its channels), not per chunk: a per-chunk gain would flatten the music's
dynamics in the latents and give the autoregressive decoder a context chunk at another level than
the chunk it decodes.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import numpy as np
import torch

__all__ = ["MAX_GAIN_DB", "normalization_gain", "check_gain", "GainLike"]

# Never amplify by more than this: near-silent input would otherwise be blown up into noise.
MAX_GAIN_DB = 60.0

GainLike = Union[float, int, np.ndarray, torch.Tensor]


def normalization_gain(wav: torch.Tensor, peak_db: Optional[float]) -> torch.Tensor:
    """Gains ``(B,)`` that bring the peak of each ``(C, T)`` signal of ``wav (B, C, T)`` to ``peak_db``.

    Silence (peak 0) gets gain 1; no gain exceeds ``MAX_GAIN_DB``. ``peak_db=None`` (a model
    without a preferred level) gives ones.
    """
    b = wav.shape[0]
    if peak_db is None:
        return torch.ones(b, device=wav.device)
    peak = wav.detach().abs().reshape(b, -1).amax(-1).float()  # (B,)
    target = 10.0 ** (peak_db / 20)
    gain = torch.where(peak > 0, target / peak.clamp_min(1e-30), torch.ones_like(peak))
    return gain.clamp(max=10.0 ** (MAX_GAIN_DB / 20))


def check_gain(gain: GainLike, batch: int, device: torch.device) -> torch.Tensor:
    """A user's ``gain`` (a number, or one per batch item) -> float32 ``(batch,)`` on ``device``.

    Raises ValueError for a gain that is not finite and positive or has the wrong shape.
    """
    if isinstance(gain, bool):
        raise TypeError("gain must be a number or an array of numbers, got a bool")
    if isinstance(gain, (int, float, np.number)):
        values = torch.full((batch,), float(gain))
    elif isinstance(gain, (np.ndarray, torch.Tensor)):
        values = torch.as_tensor(np.asarray(gain) if isinstance(gain, np.ndarray) else gain.detach().cpu())
        values = values.double().reshape(-1)
        if values.numel() == 1:
            values = values.expand(batch)
        elif values.numel() != batch:
            raise ValueError(f"gain has {values.numel()} values for {batch} signals: pass one per batch item, as "
                             "encode(..., return_gain=True) returns them")
    else:
        raise TypeError(f"gain must be a number or an array of numbers, got {type(gain).__name__}")
    bad = [float(v) for v in values.flatten() if not (math.isfinite(float(v)) and float(v) > 0)]
    if bad:
        raise ValueError(f"gain must be finite and positive (it is what encode multiplied the audio by), got {bad[0]}")
    return values.float().to(device)
