"""Input level: any level encodes like the model's own, the gain travels, and decoding knobs that
cannot work are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from music2latent2 import EncoderDecoder, ModelConfig, Music2Latent2, load_latents
from music2latent2.cli import main as cli_main
from music2latent2.levels import MAX_GAIN_DB, check_gain, normalization_gain

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _music(n: int = 70_000, seed: int = 0) -> torch.Tensor:
    t = torch.arange(n) / 44100
    rng = torch.Generator().manual_seed(seed)
    return (torch.sin(2 * torch.pi * 440 * t) * 0.5 + 0.1 * torch.randn(n, generator=rng))[None]  # (1, n)


def test_quiet_and_loud_input_encode_alike(tiny_encdec: EncoderDecoder) -> None:
    wav = _music()
    peak_db = tiny_encdec.config.input_peak_db
    assert peak_db is not None
    results = {db: tiny_encdec.encode(wav * 10 ** (db / 20) / wav.abs().max(), return_gain=True) for db in (-40, -6, 0)}
    for db, (z, gain) in results.items():
        assert isinstance(gain, float)
        assert gain == pytest.approx(10 ** ((peak_db - db) / 20), rel=1e-5)
        torch.testing.assert_close(z, results[-6][0], atol=1e-5, rtol=1e-4)
    raw = tiny_encdec.encode(wav * 0.01, normalize=False, return_gain=True)
    assert raw[1] == 1.0 and not torch.allclose(raw[0], results[-6][0], atol=1e-3)


def test_decode_restores_the_original_level(tiny_encdec: EncoderDecoder) -> None:
    quiet = _music() * 0.003
    z, gain = tiny_encdec.encode(quiet, return_gain=True)
    at_model_level = tiny_encdec.decode(z, seed=0)
    restored = tiny_encdec.decode(z, seed=0, gain=gain)
    torch.testing.assert_close(restored * gain, at_model_level, atol=1e-7, rtol=1e-5)
    # A batch has one gain per item, shared by its channels, in the input's kind.
    batch = np.stack([quiet.numpy().repeat(2, 0), 30 * quiet.numpy().repeat(2, 0)])  # (2, 2, T)
    zb, gains = tiny_encdec.encode(batch, return_gain=True)
    assert isinstance(gains, np.ndarray) and gains.shape == (2,)
    assert gains[0] == pytest.approx(30 * gains[1], rel=1e-5)
    out = tiny_encdec.decode(zb, seed=0, gain=gains, length=batch.shape[-1])
    assert out.shape == batch.shape
    np.testing.assert_allclose(out[1] * gains[1], tiny_encdec.decode(zb, seed=0, length=batch.shape[-1])[1],
                               atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="gain has 3 values for 2 signals"):
        tiny_encdec.decode(zb, gain=np.ones(3))
    for bad in (0.0, -2.0, float("nan"), np.array([1.0, np.inf])):
        with pytest.raises(ValueError, match="gain must be finite and positive"):
            tiny_encdec.decode(zb, gain=bad)
    with pytest.raises(TypeError, match="gain must be a number"):
        tiny_encdec.decode(zb, gain="loud")  # type: ignore[arg-type]


def test_normalization_gain_edge_cases() -> None:
    wav = torch.zeros(3, 2, 100)
    wav[1, 1, 5] = 0.5
    wav[2, 0, 7] = 1e-9  # near-silence: capped, not blown up to -6 dBFS
    gain = normalization_gain(wav, -6.0)
    assert gain[0] == 1.0  # silence
    assert gain[1] == pytest.approx(10 ** (-6 / 20) / 0.5)
    assert gain[2] == pytest.approx(10 ** (MAX_GAIN_DB / 20))
    assert torch.equal(normalization_gain(wav, None), torch.ones(3))
    with pytest.raises(TypeError):
        check_gain(True, 1, torch.device("cpu"))


def test_a_model_without_an_input_level_encodes_as_it_comes(tiny_model: Music2Latent2) -> None:
    model = Music2Latent2(tiny_model.config.replace(input_peak_db=None))
    model.load_state_dict(tiny_model.state_dict())
    encdec = EncoderDecoder(model, device="cpu")
    wav = _music() * 0.01
    z, gain = encdec.encode(wav, return_gain=True)
    assert gain == 1.0
    torch.testing.assert_close(z, encdec.encode(wav, normalize=False))


def test_checkpoints_from_before_the_input_level_load_without_one(tmp_path: Path, tiny_model: Music2Latent2) -> None:
    path = tiny_model.save_pretrained(tmp_path / "new")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    config = json.loads(meta["config"])
    assert config["input_peak_db"] == tiny_model.config.input_peak_db
    del config["input_peak_db"]  # what every checkpoint written before the field looks like
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(path)), str(old), metadata={**meta, "config": json.dumps(config)})
    loaded = Music2Latent2.from_pretrained(old)
    assert loaded.config.input_peak_db is None
    with pytest.raises(ValueError, match="input_peak_db=5.0 is out of range"):
        ModelConfig.from_preset("tiny", input_peak_db=5.0)


def test_sigma_cond_and_steps_that_cannot_work_are_refused(tiny_encdec: EncoderDecoder) -> None:
    z = torch.tanh(torch.randn(1, 64, 16, generator=torch.Generator().manual_seed(0)))
    # sigma_cond=0 used to decode to all-NaN audio (log 0 in the noise embedding).
    for bad in (0.0, -0.1, 1e-4, 81.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sigma_cond must be between sigma_min=0.002 and sigma_max=80"):
            tiny_encdec.decode(z, sigma_cond=bad)
    for bad_steps in (0, 65):
        with pytest.raises(ValueError, match="denoising_steps must be in 1..64"):
            tiny_encdec.decode(z, denoising_steps=bad_steps)
    with pytest.raises(TypeError, match="denoising_steps must be an integer"):
        tiny_encdec.decode(z, denoising_steps=1.5)  # type: ignore[arg-type]
    for edge in (0.002, 80.0):  # the ends of the trained range are fine
        assert torch.isfinite(tiny_encdec.decode(z, sigma_cond=edge, seed=0)).all()


def test_cli_keeps_the_gain_in_m2l_files(tmp_path: Path, tiny_model: Music2Latent2) -> None:
    import soundfile as sf

    ckpt = tiny_model.save_pretrained(tmp_path / "ckpt")
    wav = (_music(50_000)[0] * 0.01).numpy()
    sf.write(tmp_path / "quiet.wav", wav, 44100, subtype="FLOAT")
    assert cli_main(["encode", str(tmp_path / "quiet.wav"), "-o", str(tmp_path / "q.m2l"), "--model", str(ckpt),
                     "-q", "--device", "cpu"]) == 0
    z, meta = load_latents(tmp_path / "q.m2l")
    expected_gain = 10 ** (tiny_model.config.input_peak_db / 20) / np.abs(wav).max()
    assert meta.gain == pytest.approx(expected_gain, rel=1e-5)
    assert cli_main(["decode", str(tmp_path / "q.m2l"), "-o", str(tmp_path / "q.wav"), "--model", str(ckpt),
                     "-q", "--device", "cpu", "--sigma-cond", "0.2"]) == 0
    decoded, _ = sf.read(tmp_path / "q.wav", dtype="float32")
    encdec = EncoderDecoder(tiny_model, device="cpu")
    reference = encdec.decode(z, length=len(wav), seed=0, sigma_cond=0.2)[0]  # at the model's level
    # The file is 16-bit PCM at the original (quiet) level: the model-level audio divided by the gain.
    np.testing.assert_allclose(decoded, reference / meta.gain, atol=2 / 32768)
    assert np.abs(decoded).max() < 0.1
    assert cli_main(["encode", str(tmp_path / "quiet.wav"), "-o", str(tmp_path / "raw.m2l"), "--model", str(ckpt),
                     "-q", "--device", "cpu", "--no-normalize"]) == 0
    assert load_latents(tmp_path / "raw.m2l")[1].gain == 1.0
