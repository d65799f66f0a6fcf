"""Pictures for the evaluation report: log-mel spectrograms, their difference, per-band levels.

Drawn with matplotlib (the optional ``report`` extra) through ``matplotlib.figure.Figure``, never
``pyplot``: no global figure state and no GUI backend, so a report can be made in a server, a
test or a notebook without touching the caller's matplotlib settings.

Colour scales are what make two pictures comparable, so they are fixed per report, not per
picture: every input and reconstruction spectrogram in one report (and in the report it is
compared with) shares one level scale, from the loudest mel bin of any of the report's inputs and
reconstructions down ``LEVEL_RANGE_DB``, and every difference picture shares one symmetric scale
of +-``DIFF_RANGE_DB``.
"""

from __future__ import annotations

import io
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .metrics import log_mel_spectrogram, mel_band_centres_hz

__all__ = ["SPEC_N_FFT", "SPEC_HOP", "SPEC_MELS", "LEVEL_RANGE_DB", "DIFF_RANGE_DB", "require_matplotlib", "mel_db",
           "level_scale", "difference_db", "spectrogram_png", "band_levels_png", "card_png"]

SPEC_N_FFT, SPEC_HOP, SPEC_MELS = 2048, 512, 128
LEVEL_RANGE_DB = 80.0  # the level pictures show this much below the report's loudest bin
DIFF_RANGE_DB = 20.0  # difference pictures saturate at +-20 dB (a 20 dB hole is already a hole)
LEVEL_CMAP, DIFF_CMAP = "magma", "RdBu_r"  # difference: red where the reconstruction is louder
SERIES_COLOURS = ("#1f77b4", "#ff7f0e")  # this report, the one compared with


def require_matplotlib() -> Any:
    """matplotlib's ``Figure`` class, or an ImportError that says how to install it."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("the evaluation report draws its pictures with matplotlib, which is not installed: "
                          "pip install 'music2latent2[report]'") from err
    return Figure


def mel_db(wav: np.ndarray, sample_rate: int) -> np.ndarray:
    """Mel power spectrogram in dB of a ``(C, T)`` signal, power averaged over the channels.

    Returns:
        (SPEC_MELS, frames) float32, frames = T // SPEC_HOP + 1 (centred Hann STFT). The dB are
        relative (area-normalised filters), the same for every signal, so differences are exact.
    """
    x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32)).reshape(-1, wav.shape[-1])  # (C, T)
    log_mel = log_mel_spectrogram(x, sample_rate, SPEC_N_FFT, SPEC_HOP, SPEC_MELS, floor=1e-12)  # (C, n_mels, frames)
    power = torch.pow(10.0, log_mel.double()).mean(0)  # mel is linear in power: the channels' mean power
    return (10 * torch.log10(power.clamp_min(1e-12))).float().numpy()


def level_scale(spectrograms: Sequence[np.ndarray]) -> Tuple[float, float]:
    """(low, high) dB of the shared level scale: the loudest bin rounded up to 5 dB, and
    ``LEVEL_RANGE_DB`` below it."""
    peak = max((float(s.max()) for s in spectrograms if s.size), default=0.0)
    high = 5.0 * np.ceil(peak / 5.0)
    return high - LEVEL_RANGE_DB, high


def difference_db(reference: np.ndarray, estimate: np.ndarray, floor_db: float) -> np.ndarray:
    """``estimate - reference`` in dB, clipped to +-DIFF_RANGE_DB, and 0 where both lie below the
    picture's floor (the difference of two inaudible noise floors would only be clutter)."""
    frames = min(reference.shape[-1], estimate.shape[-1])
    ref, est = reference[:, :frames], estimate[:, :frames]
    diff = np.clip(est - ref, -DIFF_RANGE_DB, DIFF_RANGE_DB)
    diff[np.maximum(ref, est) < floor_db] = 0.0
    return diff


def _png(fig: Any, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _mel_axis(ax: Any, sample_rate: int) -> None:
    centres = mel_band_centres_hz(sample_rate, SPEC_MELS)
    ticks, labels = [], []
    for hz in (100, 500, 1000, 2000, 4000, 8000, 16000):
        if hz < centres[-1]:
            ticks.append(float(np.interp(hz, centres, np.arange(SPEC_MELS))))
            labels.append(f"{hz // 1000}k" if hz >= 1000 else str(hz))
    ax.set_yticks(ticks, labels)
    ax.set_ylabel("Hz")


def _draw_spectrograms(fig: Any, axes: Sequence[Any], rows: Sequence[Tuple[str, np.ndarray, str]],
                       levels: Tuple[float, float], sample_rate: int) -> None:
    for ax, (title, image, kind) in zip(axes, rows):
        extent = (0.0, image.shape[-1] * SPEC_HOP / sample_rate, -0.5, SPEC_MELS - 0.5)
        if kind == "level":
            im = ax.imshow(image, origin="lower", aspect="auto", cmap=LEVEL_CMAP, vmin=levels[0], vmax=levels[1],
                           extent=extent, interpolation="nearest")
            label = "dB"
        else:
            im = ax.imshow(image, origin="lower", aspect="auto", cmap=DIFF_CMAP, vmin=-DIFF_RANGE_DB,
                           vmax=DIFF_RANGE_DB, extent=extent, interpolation="nearest")
            label = "dB diff"
        ax.set_title(title, fontsize=9, loc="left")
        _mel_axis(ax, sample_rate)
        fig.colorbar(im, ax=ax, pad=0.01, fraction=0.03).set_label(label, fontsize=8)
    axes[-1].set_xlabel("seconds")


def spectrogram_png(rows: Sequence[Tuple[str, np.ndarray, str]], levels: Tuple[float, float],
                    sample_rate: int) -> bytes:
    """One picture of stacked spectrograms on the report's scales.

    Args:
        rows: (title, (n_mels, frames) dB image, "level" or "difference"), drawn top to bottom.
        levels: the shared (low, high) level scale (:func:`level_scale`).
    """
    figure = require_matplotlib()
    fig = figure(figsize=(10, 0.4 + 1.55 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), 1, sharex=True, squeeze=False)[:, 0]
    _draw_spectrograms(fig, axes, rows, levels, sample_rate)
    return _png(fig)


def _draw_bands(ax: Any, series: Sequence[Tuple[str, Dict[str, Optional[float]]]]) -> None:
    bands = list(series[0][1])
    width = 0.8 / len(series)
    x = np.arange(len(bands))
    values = [v for _, levels in series for v in levels.values() if v is not None]
    top = max(6.0, float(np.ceil(max((abs(v) for v in values), default=0.0) + 2)))
    for i, (label, levels) in enumerate(series):
        offset = (i - (len(series) - 1) / 2) * width
        heights = [np.nan if levels.get(b) is None else float(levels[b]) for b in bands]  # type: ignore[arg-type]
        ax.bar(x + offset, heights, width, label=label, color=SERIES_COLOURS[i % len(SERIES_COLOURS)])
        for j, h in enumerate(heights):
            if np.isnan(h):
                ax.text(x[j] + offset, 0, "n/a", ha="center", va="bottom", fontsize=7, color="grey")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(x, bands, fontsize=8)
    ax.set_xlim(-0.6, len(bands) - 0.4)  # bands with no bar (n/a) keep their place
    ax.set_ylim(-min(top, 62.0), min(top, 62.0))
    ax.set_ylabel("dB (recon - input)", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)


def band_levels_png(series: Sequence[Tuple[str, Dict[str, Optional[float]]]], title: str = "") -> bytes:
    """Grouped bars of per-octave-band level differences (reconstruction minus input, dB).

    Args:
        series: (legend label, {band: dB or None}) for each report; the bands of the first are drawn.
    """
    figure = require_matplotlib()
    fig = figure(figsize=(6.4, 2.6), layout="constrained")
    ax = fig.subplots()
    _draw_bands(ax, series)
    if title:
        ax.set_title(title, fontsize=9, loc="left")
    return _png(fig)


def card_png(title: str, lines: Sequence[str], table: Sequence[Tuple[str, str]],
             bands: Dict[str, Optional[float]], example: str, rows: Sequence[Tuple[str, np.ndarray, str]],
             levels: Tuple[float, float], sample_rate: int) -> bytes:
    """A one-picture summary of a report for a README: the metrics, the mean per-band levels and
    one file's spectrograms.

    Args:
        title / lines: heading and the lines under it (model, sha256, settings, commit).
        table: (metric, value) pairs.
        bands: mean per-band level difference.
        example / rows: the example file's name and its spectrogram rows (:func:`spectrogram_png`).
    """
    figure = require_matplotlib()
    fig = figure(figsize=(12, 3.2 + 1.5 * len(rows)), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[3.2, 1.5 * len(rows)])
    text_ax, band_ax = top.subplots(1, 2, width_ratios=[1, 1.25])
    text_ax.axis("off")
    text_ax.text(0, 1, title, fontsize=13, weight="bold", va="top", transform=text_ax.transAxes)
    body: List[str] = list(lines) + [""] + [f"{name:<28}{value}" for name, value in table]
    text_ax.text(0, 0.86, "\n".join(body), fontsize=8.5, family="monospace", va="top", transform=text_ax.transAxes)
    _draw_bands(band_ax, [("mean over files", bands)])
    band_ax.set_title("level per octave band, reconstruction minus input (mean over files)", fontsize=9, loc="left")
    axes = bottom.subplots(len(rows), 1, sharex=True, squeeze=False)[:, 0]
    _draw_spectrograms(bottom, axes, [(f"{example}: {t}", im, k) for t, im, k in rows], levels, sample_rate)
    return _png(fig)
