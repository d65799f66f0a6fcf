"""Evaluation metrics on signals with known answers."""

import math

import numpy as np
import pytest
import torch

from music2latent2.metrics import mel_filterbank, multires_logmel_distance, si_sdr

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tone_mix(n: int = 44100, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 44100
    x = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in (220.0, 551.0, 1763.0))
    return (0.2 * x + 0.05 * rng.standard_normal(n)).astype(np.float32)


def test_si_sdr_identical_is_large():
    x = _tone_mix()
    assert si_sdr(x, x) > 80


@pytest.mark.parametrize("snr_db", [0.0, 10.0, 20.0])
def test_si_sdr_scaled_plus_noise_matches_snr(snr_db):
    x = _tone_mix()
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(x.shape)
    noise -= noise @ x / (x @ x) * x  # orthogonal to x: SI-SDR is then exactly the SNR
    y = 0.5 * x
    noise *= np.linalg.norm(y) / np.linalg.norm(noise) / 10 ** (snr_db / 20)
    assert si_sdr(x, y + noise) == pytest.approx(snr_db, abs=0.2)


def test_si_sdr_scale_invariant_and_torch_numpy_agree():
    x = _tone_mix()
    y = x + 0.1 * np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)
    a = si_sdr(x, y)
    assert si_sdr(x, 3.0 * y) == pytest.approx(a, abs=1e-6)
    assert si_sdr(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(a, abs=1e-6)


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        si_sdr(np.zeros(10), np.zeros(11))
    with pytest.raises(ValueError, match="finite"):
        multires_logmel_distance(np.full(4096, np.nan), np.zeros(4096))


def test_logmel_distance_zero_for_identical_and_grows_with_noise():
    x = _tone_mix()
    assert multires_logmel_distance(x, x) == 0.0
    rng = np.random.default_rng(3)
    noise = rng.standard_normal(x.shape).astype(np.float32)
    dists = [multires_logmel_distance(x, x + level * noise) for level in (0.003, 0.03, 0.3)]
    assert 0 < dists[0] < dists[1] < dists[2]
    # Channels are averaged: a (2, T) pair with one perfect channel lies between.
    pair = multires_logmel_distance(np.stack([x, x]), np.stack([x, x + 0.3 * noise]))
    assert pair == pytest.approx(dists[2] / 2, rel=1e-4)


def test_mel_filterbank_shape_and_coverage():
    fb = mel_filterbank(44100, 2048, 128)
    assert fb.shape == (128, 1025)
    assert torch.all(fb >= 0)
    assert torch.all(fb.sum(1) > 0)  # no empty band
    peaks = fb.argmax(1)
    assert torch.all(peaks[1:] >= peaks[:-1])  # centres increase
    assert math.isclose(float(fb[:, 0].sum()), 0.0, abs_tol=1e-6)  # DC is the first edge


def test_visqol_orders_degradations_or_reports_why():
    from music2latent2.evaluate import ViSQOL

    v = ViSQOL()
    x = _tone_mix(44100)[None]
    if not v.available:  # visqol-python is an optional extra: then it must say why, never score
        assert v.reason and v.score(x, x, 44100) == (None, v.reason)
        return
    noisy = x + 0.3 * np.random.default_rng(4).standard_normal(x.shape).astype(np.float32)
    clean_score, err = v.score(x, x, 44100)
    noisy_score, _ = v.score(x, noisy, 44100)
    assert err is None and 1.0 <= noisy_score < clean_score <= 5.0


def test_octave_band_levels_see_a_gain_and_a_missing_top():
    from music2latent2.metrics import band_level_error_db, octave_band_levels_db

    x = np.random.default_rng(0).standard_normal((1, 44100)).astype(np.float32)
    half = octave_band_levels_db(x, 0.5 * x)
    assert len(half) == 9 and all(v == pytest.approx(-6.0206, abs=1e-6) for v in half.values())
    assert band_level_error_db(half) == pytest.approx(6.0206, abs=1e-6)
    # Remove everything above ~3 kHz from the estimate: the bands up there drop, the low ones stay.
    spec = np.fft.rfft(x)
    spec[:, np.fft.rfftfreq(x.shape[-1], 1 / 44100) > 3000] = 0
    dull = np.fft.irfft(spec, n=x.shape[-1])
    levels = octave_band_levels_db(x, dull)
    assert abs(levels["250 Hz"]) < 0.1 and levels["8 kHz"] < -40 and levels["16 kHz"] < -40
    assert band_level_error_db(levels) <= 60  # a silent band counts at most 60 dB
    # The other way round the reference's top bands are empty: no number is made up for them.
    back = octave_band_levels_db(dull, x)
    assert back["16 kHz"] is None and back["8 kHz"] is None and back["250 Hz"] is not None
