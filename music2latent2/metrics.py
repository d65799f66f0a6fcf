"""Reconstruction metrics: SI-SDR and a multi-resolution log-mel distance (pure torch/numpy).

Both take a reference and an estimate of the same shape ``(..., T)`` (numpy or torch) and
compare them along the last axis; leading axes (channels, batch) are averaged.
"""

from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ["si_sdr", "mel_filterbank", "mel_band_centres_hz", "log_mel_spectrogram", "multires_logmel_distance",
           "OCTAVE_CENTRES_HZ", "octave_band_levels_db", "band_level_error_db"]

ArrayLike = Union[np.ndarray, torch.Tensor]

# (n_fft, hop, n_mels): short windows catch transients, long ones pitch and timbre.
DEFAULT_RESOLUTIONS: Tuple[Tuple[int, int, int], ...] = ((512, 128, 64), (1024, 256, 128), (2048, 512, 128))


def _as_pair(reference: ArrayLike, estimate: ArrayLike) -> Tuple[torch.Tensor, torch.Tensor]:
    ref = torch.as_tensor(np.asarray(reference) if isinstance(reference, np.ndarray) else reference)
    est = torch.as_tensor(np.asarray(estimate) if isinstance(estimate, np.ndarray) else estimate)
    ref, est = ref.detach().double().cpu(), est.detach().double().cpu()
    if ref.shape != est.shape:
        raise ValueError(f"reference and estimate must have the same shape, got {tuple(ref.shape)} "
                         f"and {tuple(est.shape)}")
    if ref.numel() == 0:
        raise ValueError("reference is empty")
    if not (bool(torch.isfinite(ref).all()) and bool(torch.isfinite(est).all())):
        raise ValueError("reference and estimate must be finite")
    return ref, est


def si_sdr(reference: ArrayLike, estimate: ArrayLike, eps: float = 1e-10) -> float:
    """Scale-invariant signal-to-distortion ratio in dB (Le Roux et al. 2019).

    The reference is projected on the estimate's direction: ``target = <s', s> s / ||s||^2``,
    ``SI-SDR = 10 log10(||target||^2 / ||s' - target||^2)``, with both signals made zero-mean.

    Args:
        reference: (..., T) clean signal.
        estimate: (..., T) reconstruction.

    Returns:
        Mean SI-SDR over the leading axes, in dB.
    """
    ref, est = _as_pair(reference, estimate)
    ref = ref - ref.mean(-1, keepdim=True)
    est = est - est.mean(-1, keepdim=True)
    alpha = (est * ref).sum(-1, keepdim=True) / (ref.pow(2).sum(-1, keepdim=True) + eps)
    target = alpha * ref
    noise = est - target
    ratio = (target.pow(2).sum(-1) + eps) / (noise.pow(2).sum(-1) + eps)
    return float((10 * torch.log10(ratio)).mean())


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + f / 700.0)  # HTK mel scale


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0,
                   f_max: Union[float, None] = None) -> torch.Tensor:
    """Triangular, area-normalised mel filters on the HTK scale.

    Returns:
        (n_mels, n_fft // 2 + 1) float32 matrix mapping a power spectrum to mel bands.
    """
    if n_mels < 1 or n_fft < 2:
        raise ValueError(f"need n_mels >= 1 and n_fft >= 2, got {n_mels} and {n_fft}")
    f_max = sample_rate / 2 if f_max is None else f_max
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(np.array(f_min)), _hz_to_mel(np.array(f_max)), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None] - lower) / np.maximum(centre - lower, 1e-9)
    falling = (upper - freqs[None]) / np.maximum(upper - centre, 1e-9)
    fb = np.maximum(0.0, np.minimum(rising, falling))
    fb *= 2.0 / np.maximum(upper - lower, 1e-9)  # equal area per band (Slaney-style norm)
    return torch.from_numpy(fb.astype(np.float32))


def mel_band_centres_hz(sample_rate: int, n_mels: int, f_min: float = 0.0,
                        f_max: Union[float, None] = None) -> np.ndarray:
    """(n_mels,) centre frequencies in Hz of :func:`mel_filterbank`'s bands (to label a mel axis)."""
    f_max = sample_rate / 2 if f_max is None else f_max
    mels = np.linspace(_hz_to_mel(np.array(f_min)), _hz_to_mel(np.array(f_max)), n_mels + 2)
    return _mel_to_hz(mels[1:-1])


def log_mel_spectrogram(wav: torch.Tensor, sample_rate: int, n_fft: int, hop: int, n_mels: int,
                        floor: float = 1e-5) -> torch.Tensor:
    """(..., T) waveform -> (..., n_mels, frames) log10 mel power (centred Hann STFT)."""
    lead, n = wav.shape[:-1], wav.shape[-1]
    x = wav.reshape(-1, n).float()
    if n < n_fft // 2 + 1:  # reflect padding needs at least half a window
        x = torch.nn.functional.pad(x, (0, n_fft // 2 + 1 - n))
    spec = torch.stft(x, n_fft, hop, window=torch.hann_window(n_fft, device=x.device), center=True,
                      return_complex=True)
    power = spec.abs().pow(2)  # (N, n_fft/2+1, frames)
    mel = mel_filterbank(sample_rate, n_fft, n_mels).to(x.device) @ power
    return torch.log10(mel.clamp_min(floor)).reshape(*lead, n_mels, -1)


def multires_logmel_distance(reference: ArrayLike, estimate: ArrayLike, sample_rate: int = 44100,
                             resolutions: Sequence[Tuple[int, int, int]] = DEFAULT_RESOLUTIONS) -> float:
    """Mean absolute difference of log10 mel spectrograms, averaged over several resolutions.

    0 for identical signals; grows as the estimate departs from the reference. Insensitive to
    phase, so it suits a generative decoder better than SI-SDR does.

    Args:
        reference / estimate: (..., T) waveforms at ``sample_rate``.
        resolutions: (n_fft, hop, n_mels) triples.
    """
    ref, est = _as_pair(reference, estimate)
    if not resolutions:
        raise ValueError("need at least one resolution")
    total = 0.0
    for n_fft, hop, n_mels in resolutions:
        a = log_mel_spectrogram(ref, sample_rate, n_fft, hop, n_mels)
        b = log_mel_spectrogram(est, sample_rate, n_fft, hop, n_mels)
        total += float((a - b).abs().mean())
    value = total / len(resolutions)
    return 0.0 if math.isclose(value, 0.0, abs_tol=1e-12) else value


OCTAVE_CENTRES_HZ = (63, 125, 250, 500, 1000, 2000, 4000, 8000, 16000)


def _band_label(centre: int) -> str:
    return f"{centre // 1000} kHz" if centre >= 1000 else f"{centre} Hz"


def octave_band_levels_db(reference: ArrayLike, estimate: ArrayLike, sample_rate: int = 44100,
                          n_fft: int = 4096, empty_below_db: float = -60.0) -> Dict[str, float | None]:
    """Level of ``estimate`` relative to ``reference`` in each octave band, in dB.

    One number per band (centres 63 Hz .. 16 kHz, edges at centre / sqrt(2) .. centre * sqrt(2),
    the top band up to Nyquist): 10 log10 of the estimate's power in the band over the
    reference's, from power spectra averaged over Hann frames of ``n_fft``. The overall level
    (``level_difference_db``) hides a spectral tilt or a hole; this shows where it is.

    Returns:
        {band label: dB, or None where the reference holds less than ``empty_below_db`` of its
        total power in that band (a band a speech file or a low sample rate leaves empty)}.
    """
    ref, est = _as_pair(reference, estimate)
    spectra = []
    for x in (ref, est):
        x = x.double().reshape(-1, x.shape[-1])  # (channels, T)
        if x.shape[-1] < n_fft:
            x = torch.nn.functional.pad(x, (0, n_fft - x.shape[-1]))
        spec = torch.stft(x, n_fft, n_fft // 2, window=torch.hann_window(n_fft, dtype=torch.float64),
                          center=False, return_complex=True)  # (channels, n_fft/2+1, frames)
        spectra.append(spec.abs().pow(2).mean(dim=(0, 2)))  # (n_fft/2+1,)
    freqs = torch.fft.rfftfreq(n_fft, 1.0 / sample_rate, dtype=torch.float64)
    total = float(spectra[0].sum())
    out: Dict[str, float | None] = {}
    for centre in OCTAVE_CENTRES_HZ:
        lo, hi = centre / math.sqrt(2), centre * math.sqrt(2)
        if centre == OCTAVE_CENTRES_HZ[-1]:
            hi = sample_rate / 2 + 1
        band = (freqs >= lo) & (freqs < hi)
        p_ref, p_est = float(spectra[0][band].sum()), float(spectra[1][band].sum())
        if total <= 0 or p_ref <= total * 10 ** (empty_below_db / 10):
            out[_band_label(centre)] = None
        else:
            out[_band_label(centre)] = 10 * math.log10(max(p_est, 1e-30) / p_ref)
    return out


def band_level_error_db(band_levels: Dict[str, float | None]) -> float | None:
    """Mean absolute per-band level difference over the bands that are not empty (dB), each band
    capped at 60 dB so that one band a reconstruction leaves silent does not swamp the rest."""
    values = [min(abs(v), 60.0) for v in band_levels.values() if v is not None]
    return float(np.mean(values)) if values else None
