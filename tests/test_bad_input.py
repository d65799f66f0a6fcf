"""Bad input that used to hang, mislead or give wrong output: each case now fails clearly, early,
and names the problem and the fix."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import make_tiny
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from music2latent2 import EncoderDecoder, LatentMetadata, ModelConfig, Music2Latent2, cli, load_latents, save_latents
from music2latent2.audio import check_time_last
from music2latent2.checkpoint import CheckpointError
from music2latent2.devices import resolve_device
from music2latent2.fileio import check_output_dir
from music2latent2.latents_io import LatentFileError

SR = 44100
CHUNK = 32768


def _tone(n: int, channels: int = 1) -> np.ndarray:
    t = np.arange(n) / SR
    return np.stack([0.3 * np.sin(2 * np.pi * (220 + 110 * c) * t) for c in range(channels)]).astype(np.float32)


# --------------------------------------------------------------------------- 1. (T, C) arrays
def test_time_channels_layout_is_refused_quickly(tiny_encdec: EncoderDecoder) -> None:
    stereo = _tone(5 * SR, 2)  # (2, T)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"looks like \(time, channels\).*Pass wav\.T \(shape \(2, 220500\)\)"):
        tiny_encdec.encode(stereo.T)  # (T, 2), as soundfile.read returns it
    with pytest.raises(ValueError, match=r"wav\.swapaxes\(-1, -2\)"):
        tiny_encdec.encode(torch.from_numpy(np.ascontiguousarray(stereo.T))[None])  # (1, T, 2)
    assert time.perf_counter() - start < 1.0  # refused up front, not after 220,500 sequences
    # The documented rule's edges: a time axis of 65 samples, or not shorter than the channel axis, is audio.
    check_time_last((2, 65))
    check_time_last((64, 64))
    check_time_last((1000, 65))  # e.g. many short clips stacked as channels
    check_time_last((2, 0))  # empty is reported as empty, not as a layout problem
    with pytest.raises(ValueError, match="looks like"):
        check_time_last((65, 64))
    # The right layout of the same audio still works.
    assert tiny_encdec.encode(stereo[:, :CHUNK]).shape == (2, 64, 8)


# --------------------------------------------------------------------------- 3. sample rates
def test_sample_rate_bounds_and_type(tiny_encdec: EncoderDecoder, tmp_path: Path) -> None:
    x = _tone(4000)
    for sr in (1, 999, 768_001, 10**12):
        with pytest.raises(ValueError, match=f"sr={sr} Hz is not a plausible audio sample rate.*1000 and 768000"):
            tiny_encdec.encode(x, sr=sr)
    with pytest.raises(TypeError, match=r"sr must be an integer number of Hz.*pass int\(sr\)"):
        tiny_encdec.encode(x, sr=48000.0)
    with pytest.raises(TypeError, match="integer number of Hz"):
        tiny_encdec.encode(x, sr=True)
    # The bounds themselves are accepted: 500 samples at 1 kHz are 0.5 s, one chunk.
    assert tiny_encdec.encode(x[:, :500], sr=np.int64(1000)).shape == (1, 64, 8)
    assert tiny_encdec.encode(x, sr=768_000).shape == (1, 64, 8)
    # Files carry their own rate; one outside the range is refused with the file named.
    slow = tmp_path / "slow.wav"
    sf.write(slow, np.zeros(800, np.float32), 800)
    with pytest.raises(ValueError, match="slow.wav: sample rate=800 Hz is not a plausible"):
        tiny_encdec.encode(str(slow))


# --------------------------------------------------------------------------- 7. decode arguments
def test_decode_refuses_fractional_length_and_huge_latents(tiny_encdec: EncoderDecoder) -> None:
    z = tiny_encdec.encode(_tone(CHUNK))
    with pytest.raises(TypeError, match=r"length must be an integer number of samples, got 1\.7"):
        tiny_encdec.decode(z, length=1.7)
    with pytest.raises(TypeError, match="length"):
        tiny_encdec.decode(z, length=True)
    assert tiny_encdec.decode(z, length=np.int32(1000), seed=0).shape == (1, 1000)
    scale = tiny_encdec.config.latent_scale
    for value in (1e30, -1e30, 11.0 * scale):
        with pytest.raises(ValueError, match=rf"latents reach .*within \+-{scale:.3g}.*beyond \+-{10 * scale:.3g}"):
            tiny_encdec.decode(np.full((1, 64, 8), value, np.float32))
    # Generated latents may overshoot the encoder's range a little: that still decodes to finite audio.
    out = tiny_encdec.decode(np.full((1, 64, 8), 3.0 * scale, np.float32), seed=0)
    assert np.isfinite(out).all()
    with pytest.raises(TypeError, match="denoising_steps must be an integer"):
        tiny_encdec.decode(z, denoising_steps=1.5)
    with pytest.raises(ValueError, match="sigma_cond"):
        tiny_encdec.decode(z, sigma_cond=float("nan"))


# --------------------------------------------------------------------------- 5. devices
def test_devices_are_checked_before_loading(tiny_model: Music2Latent2, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'nonsense' is not a device name PyTorch knows; use 'cpu', 'cuda'"):
        EncoderDecoder(tiny_model, device="nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available.*use device='cpu'"):
            EncoderDecoder(tiny_model, device="cuda")
    else:
        with pytest.raises(ValueError, match="does not exist"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    with pytest.raises(TypeError, match="device must be"):
        resolve_device(1.5)  # type: ignore[arg-type]
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type in ("cpu", "cuda")
    # The device is checked before the model argument is resolved: no checkpoint is read for a typo.
    with pytest.raises(ValueError, match="not a device name"):
        EncoderDecoder(str(tmp_path / "no-such-checkpoint.safetensors"), device="nonsense")
    with pytest.raises(TypeError, match="max_batch_size must be an integer"):
        EncoderDecoder(tiny_model, device="cpu", max_batch_size=2.5)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- 4 and 5. checkpoints
def _rewrite(src: Path, dst: Path, config: dict | None = None, tensors: dict | None = None) -> Path:
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    if config is not None:
        meta["config"] = json.dumps(config)
    if tensors is not None:  # new tensors: the recorded content hash would (rightly) refuse them first
        meta.pop("content_sha256", None)
    save_file(tensors if tensors is not None else load_file(str(src)), str(dst), metadata=meta)
    return dst


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny().save_pretrained(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def test_checkpoint_config_is_validated_field_by_field(checkpoint: Path, tmp_path: Path) -> None:
    with safe_open(str(checkpoint), framework="pt") as f:
        config = json.loads(f.metadata()["config"])
    cases = {
        "dim=200000 is out of range": {**config, "dim": 200000},
        "field dim must be an integer, got 'abc'": {**config, "dim": "abc"},
        r"field channels\[1\] must be an integer": {**config, "channels": [8, 16.5, 32, 32]},
        "field sigma_max must be a number": {**config, "sigma_max": None},
        r"missing ModelConfig fields: \['dim'\]": {k: v for k, v in config.items() if k != "dim"},
        "field audio_channels=3 is out of range": {**config, "audio_channels": 3},
    }
    for i, (message, bad) in enumerate(cases.items()):
        path = _rewrite(checkpoint, tmp_path / f"bad{i}.safetensors", config=bad)
        start = time.perf_counter()
        with pytest.raises(CheckpointError, match=f"invalid model config: .*{message}"):
            Music2Latent2.from_pretrained(path)
        assert time.perf_counter() - start < 5.0, message  # refused, not built
    # A config that is valid but belongs to another model (54 GB at float32): named tensors, nothing allocated.
    big = _rewrite(checkpoint, tmp_path / "big.safetensors", config={**config, "dim": 8192, "depth": 8,
                                                                     "cond_dim": 8192, "noise_embed_dim": 8192})
    with pytest.raises(CheckpointError, match="mis-shaped tensors"):
        Music2Latent2.from_pretrained(big)


def test_checkpoint_tensor_dtypes_are_checked(checkpoint: Path, tmp_path: Path) -> None:
    tensors = load_file(str(checkpoint))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].to(torch.int32)
    path = _rewrite(checkpoint, tmp_path / "int.safetensors", tensors=tensors)
    with pytest.raises(CheckpointError, match=rf"must be floating point .*{name}: I32"):
        Music2Latent2.from_pretrained(path)
    # fp16 and bf16 storage are fine (shipped checkpoints are fp16).
    half = {k: v.to(torch.bfloat16) for k, v in load_file(str(checkpoint)).items()}
    bf16 = _rewrite(checkpoint, tmp_path / "bf16.safetensors", tensors=half)
    assert isinstance(Music2Latent2.from_pretrained(bf16), Music2Latent2)


def test_config_fields_are_typed_and_bounded_in_python_too() -> None:
    with pytest.raises(ValueError, match="field depth must be an integer, got 2.0"):
        ModelConfig.from_preset("tiny", depth=2.0)
    with pytest.raises(ValueError, match="field heads must be an integer, got True"):
        ModelConfig.from_preset("tiny", heads=True)
    with pytest.raises(ValueError, match="sigma_min .* must be below sigma_max"):
        ModelConfig.from_preset("tiny", sigma_min=90.0)
    config = ModelConfig.from_preset("tiny", sigma_max=80, channels=(8, 16, 32, 32))
    assert config.sigma_max == 80.0 and isinstance(config.sigma_max, float) and config.channels == [8, 16, 32, 32]
    assert ModelConfig.from_json(config.to_json()) == config


def test_not_a_safetensors_file_is_named_as_such(tmp_path: Path) -> None:
    text = tmp_path / "notes.m2l"
    text.write_text("these are my notes, not latents\n" * 10)
    with pytest.raises(LatentFileError, match="notes.m2l: it is not a music2latent2 latent file"):
        load_latents(text)
    wav = tmp_path / "song.safetensors"
    sf.write(wav, np.zeros(1000, np.float32), SR, format="WAV")
    with pytest.raises(CheckpointError, match="song.safetensors: not a valid safetensors file"):
        Music2Latent2.from_pretrained(wav)


# --------------------------------------------------------------------------- 2. .m2l channels
def _meta(**overrides: object) -> LatentMetadata:
    kwargs = dict(sample_rate=SR, length=CHUNK, channels=2, summary_tokens=8, latent_dim=64, latent_scale=1.0)
    kwargs.update(overrides)
    return LatentMetadata(**kwargs)  # type: ignore[arg-type]


def test_latent_files_record_the_model_channels(tmp_path: Path) -> None:
    z2, z1 = np.zeros((2, 64, 8), np.float32), np.zeros((1, 64, 8), np.float32)
    path = save_latents(tmp_path / "a.m2l", z2, _meta(model_audio_channels=1))
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format_version"] == "3" and f.metadata()["model_audio_channels"] == "1"
    assert load_latents(path)[1].model_audio_channels == 1
    with pytest.raises(LatentFileError, match="a stereo model gives one latent sequence per signal"):
        save_latents(tmp_path / "b.m2l", z2, _meta(model_audio_channels=2))
    mono_rule = r"a mono model gives one latent sequence per audio channel \(channels=2\)"
    with pytest.raises(LatentFileError, match=mono_rule):
        save_latents(tmp_path / "b.m2l", z1, _meta(model_audio_channels=1))
    with pytest.raises(LatentFileError, match="model_audio_channels must be 1, 2 or None"):
        _meta(model_audio_channels=3)
    # Version-1 files (no model_audio_channels) are still read; the value is inferred where the shape tells.
    for z, channels, expected in ((z2, 2, 1), (z1, 2, 2), (z1, 1, None)):
        strings = {**_meta(channels=channels).to_strings(), "format_version": "1"}
        old = tmp_path / "v1.m2l"
        save_file({"latents": torch.from_numpy(z)}, str(old), metadata=strings)
        assert load_latents(old)[1].model_audio_channels == expected


def test_latent_files_keep_the_gain(tmp_path: Path) -> None:
    z = np.zeros((2, 64, 8), np.float32)
    path = save_latents(tmp_path / "a.m2l", z, _meta(gain=3.5))
    assert load_latents(path)[1].gain == 3.5
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(LatentFileError, match="gain must be a finite positive number"):
            _meta(gain=bad)
    # Version-2 files have no gain: they were encoded at the audio's own level.
    strings = {k: v for k, v in _meta().to_strings().items() if k != "gain"}
    old = tmp_path / "v2.m2l"
    save_file({"latents": torch.from_numpy(z)}, str(old), metadata={**strings, "format_version": "2"})
    assert load_latents(old)[1].gain == 1.0
    strings["gain"] = "loud"
    save_file({"latents": torch.from_numpy(z)}, str(old), metadata=strings)
    with pytest.raises(LatentFileError, match="gain='loud' is not a number"):
        load_latents(old)


def test_latent_metadata_rates_and_length_are_bounded(tmp_path: Path) -> None:
    with pytest.raises(LatentFileError, match="sample_rate=1 Hz is not a plausible"):
        _meta(sample_rate=1)
    z = np.zeros((2, 64, 8), np.float32)  # one chunk: 32768 samples at 44.1 kHz
    with pytest.raises(LatentFileError, match="longer than the 1 chunks of latents cover"):
        save_latents(tmp_path / "a.m2l", z, _meta(length=10**15))
    strings = {**_meta().to_strings(), "length": str(10**15)}
    lying = tmp_path / "lying.m2l"
    save_file({"latents": torch.from_numpy(z)}, str(lying), metadata=strings)
    with pytest.raises(LatentFileError, match="longer than"):
        load_latents(lying)
    save_latents(tmp_path / "ok.m2l", z, _meta(length=CHUNK, sample_rate=48000))  # 0.68 s in 0.74 s: fine


# --------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, channels in (("mono", 1), ("stereo", 2)):
        make_tiny(audio_channels=channels).save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture
def stereo_wav(tmp_path: Path) -> Path:
    path = tmp_path / "in" / "song.wav"
    path.parent.mkdir()
    sf.write(path, _tone(SR // 2, 2).T, SR)
    return path


def _cli(*argv: object) -> int:
    return cli.main([str(a) for a in argv] + ["--device", "cpu", "-q", "--workers", "0"])


@pytest.mark.parametrize("encoder, decoder", [("mono", "stereo"), ("stereo", "mono")])
def test_decode_with_the_other_channel_type_is_refused(encoder: str, decoder: str, models: dict, stereo_wav: Path,
                                                       tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    lat = tmp_path / "song.m2l"
    assert _cli("encode", stereo_wav, "-o", lat, "--model", models[encoder]) == 0
    assert load_latents(lat)[1].model_audio_channels == (1 if encoder == "mono" else 2)
    assert _cli("decode", lat, "-o", tmp_path / "out.wav", "--model", models[decoder]) == 1
    err = capsys.readouterr().err
    assert f"latents were made by a {encoder} model but this model is {decoder}" in err
    assert not (tmp_path / "out.wav").exists()
    # The right model decodes them to the original's 2 channels.
    assert _cli("decode", lat, "-o", tmp_path / "out.wav", "--model", models[encoder]) == 0
    assert sf.info(str(tmp_path / "out.wav")).channels == 2


def test_decode_refuses_a_channel_count_before_decoding(models: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    # Latents saved without model_audio_channels (allowed: None) whose sequence count fits neither kind of model
    # for the recorded channel count: 2 sequences of a 2-channel original through a stereo model would be 4 channels.
    lat = save_latents(tmp_path / "lat" / "a.m2l", np.zeros((2, 64, 8), np.float32),
                       _meta(channels=2, latent_scale=make_tiny().config.latent_scale))
    monkeypatch.setattr(EncoderDecoder, "decode", lambda *a, **k: pytest.fail("decoded before checking channels"))
    assert _cli("decode", lat, "-o", tmp_path / "out.wav", "--model", models["stereo"]) == 1
    assert "would decode to 4 channels with this 2-channel model, but the original had 2" in capsys.readouterr().err
    assert not (tmp_path / "out.wav").exists()


def test_cli_without_model_names_the_option(tmp_path: Path, stereo_wav: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "manifest.json"
    empty.write_text(json.dumps({"manifest_version": 1, "default": None, "models": {}}))
    monkeypatch.setenv("MUSIC2LATENT2_MANIFEST", str(empty))
    assert _cli("encode", stereo_wav, "-o", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "no --model given" in err and "pass --model with a checkpoint file or folder" in err
    assert "None" not in err and "EncoderDecoder(" not in err
    assert not (tmp_path / "out").exists()


def test_cli_bad_model_names_the_option(tmp_path: Path, stereo_wav: Path, capsys: pytest.CaptureFixture) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not a checkpoint")
    assert _cli("encode", stereo_wav, "-o", tmp_path / "out", "--model", junk) == 2
    err = capsys.readouterr().err
    assert f"cannot load model '{junk}'" in err and "--model NAME_OR_PATH" in err


def test_cli_checks_outputs_and_device_before_loading(models: dict, stereo_wav: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    loads = []
    real_runner = cli.Runner
    monkeypatch.setattr(cli, "Runner", lambda args: loads.append(args) or real_runner(args))
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    second = stereo_wav.with_name("other.wav")
    sf.write(second, _tone(1000), SR)
    # -o names an existing file while two outputs need a folder.
    assert _cli("encode", stereo_wav, second, "-o", notes, "--model", models["mono"]) == 2
    assert f"{notes} is a file" in capsys.readouterr().err and notes.read_text() == "keep me"
    # A bad --device is named as the option.
    assert cli.main(["encode", str(stereo_wav), "-o", str(tmp_path / "x"), "--model", str(models["mono"]),
                     "--device", "no-such-device", "-q"]) == 2
    assert "--device: device 'no-such-device' is not a device name" in capsys.readouterr().err
    # An output folder where nothing can be created.
    monkeypatch.setattr("music2latent2.fileio._create_temp",
                        lambda p: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    assert _cli("encode", stereo_wav, "-o", tmp_path / "ro", "--model", models["mono"]) == 2
    assert "cannot create files in output folder" in capsys.readouterr().err
    assert loads == []  # none of these loaded the model
    assert not (tmp_path / "x").exists() and not (tmp_path / "ro").exists()


def test_read_only_output_folder(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        writable = os.access(folder, os.W_OK)  # True for root, which may write anyway
        if writable:
            check_output_dir(folder / "sub")  # must not refuse a folder the process can write to
        else:
            with pytest.raises(PermissionError, match=f"cannot create files in output folder {folder}"):
                check_output_dir(folder / "sub")
        assert list(folder.iterdir()) == []  # the probe leaves nothing behind
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("option, value, message", [
    ("--batch-size", "0", "argument --batch-size: must be positive, got 0"),
    ("--workers", "-1", "argument --workers: must be >= 0, got -1"),
    ("--sr", "10", "argument --sr: rate=10 Hz is not a plausible audio sample rate"),
    ("--sr", "abc", "argument --sr: must be an integer number of Hz, got 'abc'"),
    ("--denoising-steps", "0", "argument --denoising-steps: denoising_steps must be in 1..64"),
    ("--denoising-steps", "65", "argument --denoising-steps: denoising_steps must be in 1..64"),
    ("--sigma-cond", "0", "argument --sigma-cond: sigma_cond must be a finite number > 0"),
    ("--sigma-cond", "nan", "argument --sigma-cond: sigma_cond must be a finite number > 0"),
])
def test_cli_option_errors_name_only_that_option(option: str, value: str, message: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    command = "decode" if option in ("--sr", "--denoising-steps", "--sigma-cond") else "encode"
    with pytest.raises(SystemExit) as info:
        cli.main([command, str(tmp_path), "-o", str(tmp_path / "o"), option, value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    if command == "encode":
        assert "--sr" not in err  # encode has no --sr: the message must not mention it


def test_decode_of_a_non_latent_file_says_so(models: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fake = tmp_path / "lat" / "song.m2l"
    fake.parent.mkdir()
    sf.write(fake, _tone(1000).T, SR, format="WAV")  # audio renamed to .m2l
    assert _cli("decode", fake.parent, "-o", tmp_path / "dec", "--model", models["mono"]) == 1
    err = capsys.readouterr().err
    assert "it is not a music2latent2 latent file" in err and "header too large" not in err


# --------------------------------------------------------------------------- 8. examples/mir_probe.py
def test_mir_probe_checks_labels_before_extracting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("mir_probe", Path(__file__).parents[1] / "examples" / "mir_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)  # type: ignore[union-attr]
    monkeypatch.setattr(probe, "cli_main", lambda argv: pytest.fail("features were extracted"))
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        sf.write(flat / f"{i}.wav", _tone(1000).T, SR)
    assert probe.main([str(flat), "--model", "unused"]) == 2
    err = capsys.readouterr().err
    assert "needs one sub-folder per class" in err and "no audio in any sub-folder" in err
    (flat / "a").mkdir()
    sf.write(flat / "a" / "x.wav", _tone(1000).T, SR)
    sf.write(flat / "a" / "y.wav", _tone(1000).T, SR)
    assert probe.main([str(flat), "--model", "unused"]) == 2
    assert "found a: 2" in capsys.readouterr().err
    (flat / "b" / "deeper").mkdir(parents=True)  # files below a class folder count for it
    sf.write(flat / "b" / "deeper" / "x.wav", _tone(1000).T, SR)
    sf.write(flat / "b" / "y.wav", _tone(1000).T, SR)
    assert probe.check_layout(flat) is None
    assert probe.count_labelled_files(flat) == {"a": 2, "b": 2}


def test_cli_threads_option_is_applied_and_restored(models: dict, stereo_wav: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    real_process = cli.Runner.process
    monkeypatch.setattr(cli.Runner, "process", lambda self, job, loaded: seen.append(torch.get_num_threads())
                        or real_process(self, job, loaded))
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # a setting --threads 1 must change and main() must restore
    try:
        assert _cli("encode", stereo_wav, "-o", tmp_path / "a.m2l", "--model", models["mono"], "--threads", "1") == 0
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
