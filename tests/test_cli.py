"""The music2latent2 command line on a tiny random model: round trips, failures, resume, shards."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import soundfile as sf
import torch

from music2latent2 import EncoderDecoder, ModelConfig, Music2Latent2, cli, load_latents
from music2latent2.checkpoint import sha256_file
from music2latent2.fileio import atomic_write
from music2latent2.spectral import ChunkGeometry

REPO = Path(__file__).resolve().parents[1]
# name -> (sample rate, seconds, channels)
GEOMETRY = ChunkGeometry(32768, 2048, 512)
FILES = {"a.wav": (22050, 1.1, 1), "sub/b.flac": (48000, 0.6, 2), "sub/deeper/c.wav": (44100, 0.5, 1)}


def _tone(sr: int, seconds: float, channels: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    freqs = rng.uniform(150, 900, channels)
    return (0.3 * np.sin(2 * np.pi * freqs[None] * t[:, None]) + 0.01 * rng.standard_normal((t.size, channels)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("model")
    Music2Latent2(ModelConfig.from_preset("tiny")).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def encdec(model_dir: Path) -> EncoderDecoder:
    return EncoderDecoder(str(model_dir), device="cpu")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for i, (name, (sr, sec, ch)) in enumerate(FILES.items()):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / name, _tone(sr, sec, ch, i), sr)
    (root / "notes.txt").write_text("not audio: ignored by directory scans")
    return root


@pytest.fixture(scope="module")
def encoded(dataset: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One true CLI round trip in a subprocess (python -m music2latent2), shared by later tests."""
    out = tmp_path_factory.mktemp("run")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    steps = (["encode", str(dataset), "-o", str(out / "lat")], ["decode", str(out / "lat"), "-o", str(out / "dec")])
    for argv in steps:
        proc = subprocess.run([sys.executable, "-m", "music2latent2", *argv, "--model", str(model_dir),
                               "--device", "cpu", "-q"], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert "3 done" in proc.stderr
    return out


def _run(argv: List[str], model_dir: Path) -> int:
    return cli.main([*argv, "--model", str(model_dir), "--device", "cpu", "-q"])


def _files(root: Path) -> Dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_encode_decode_round_trip(encoded: Path, dataset: Path, model_dir: Path, encdec: EncoderDecoder) -> None:
    sha = sha256_file(model_dir / "model.safetensors")
    assert sorted(_files(encoded / "lat")) == ["a.m2l", "sub/b.m2l", "sub/deeper/c.m2l"]
    assert sorted(_files(encoded / "dec")) == ["a.wav", "sub/b.wav", "sub/deeper/c.wav"]
    for name, (sr, sec, ch) in FILES.items():
        stem = Path(name).with_suffix("")
        audio, _ = sf.read(dataset / name, dtype="float32", always_2d=True)
        z, meta = load_latents(encoded / "lat" / f"{stem}.m2l")
        assert (meta.sample_rate, meta.length, meta.channels) == (sr, int(sr * sec), ch)
        assert (meta.summary_tokens, meta.latent_dim, meta.model_sha256) == (8, 64, sha)
        assert meta.model_name == str(model_dir) and meta.extra["source"] == f"{stem}.m2l"
        # Latents are exactly what the Python API gives for the same audio.
        expected = encdec.encode(audio.T, sr=sr)
        assert z.shape == expected.shape == (ch, 64, 8 * GEOMETRY.num_chunks(math.ceil(len(audio) * 44100 / sr)))
        np.testing.assert_allclose(z, expected, atol=1e-5)
        info = sf.info(str(encoded / "dec" / f"{stem}.wav"))
        assert (info.samplerate, info.frames, info.channels) == (sr, int(sr * sec), ch)
    # At 44.1 kHz no resampling happens: the file is the seeded decoder output, 16-bit quantised.
    z, meta = load_latents(encoded / "lat" / "sub/deeper/c.m2l")
    assert meta.gain != 1.0  # encoded at the model's input level, restored on decoding
    direct = np.clip(encdec.decode(z, length=meta.length, seed=0, gain=meta.gain), -1, 1)
    written, _ = sf.read(encoded / "dec" / "sub/deeper/c.wav", dtype="float32", always_2d=True)
    np.testing.assert_allclose(written.T, direct, atol=1.5 / 32768)


def test_reconstruct_and_features(dataset: Path, model_dir: Path, encdec: EncoderDecoder, tmp_path: Path) -> None:
    out = tmp_path / "rec.flac"
    assert _run(["reconstruct", str(dataset / "a.wav"), "-o", str(out), "--format", "flac", "--sr", "16000"],
                model_dir) == 0
    info = sf.info(str(out))
    assert (info.samplerate, info.frames, info.format) == (16000, math.ceil(int(22050 * 1.1) * 16000 / 22050), "FLAC")
    # Without --format, a single output named .flac is a FLAC file (not a folder holding a .wav).
    out.unlink()
    assert _run(["reconstruct", str(dataset / "a.wav"), "-o", str(out)], model_dir) == 0
    assert out.is_file() and sf.info(str(out)).format == "FLAC"
    # A finished run has nothing to do: it exits 0 before loading the model (a bogus one here).
    assert cli.main(["reconstruct", str(dataset / "a.wav"), "-o", str(out), "--model", str(tmp_path / "none"),
                     "-q"]) == 0

    assert _run(["features", str(dataset), "-o", str(tmp_path / "feat"), "--workers", "0"], model_dir) == 0
    for name, (sr, _, ch) in FILES.items():
        feats = np.load(tmp_path / "feat" / Path(name).with_suffix(".npy"))
        audio, _ = sf.read(dataset / name, dtype="float32", always_2d=True)
        expected = encdec.encode(audio.T, sr=sr, extract_features=True)  # (C, K*dim, chunks)
        chunks = GEOMETRY.num_chunks(math.ceil(len(audio) * 44100 / sr))
        assert feats.shape == (ch, 8 * 32, chunks)  # the same layout for mono and stereo files
        np.testing.assert_allclose(feats, expected, atol=1e-5)
    # --clip: one vector per file and channel, each chunk weighted by its share of real audio.
    assert _run(["features", str(dataset), "-o", str(tmp_path / "clip"), "--clip", "--workers", "0"], model_dir) == 0
    for name, (sr, _, ch) in FILES.items():
        clip = np.load(tmp_path / "clip" / Path(name).with_suffix(".npy"))
        feats = np.load(tmp_path / "feat" / Path(name).with_suffix(".npy"))
        n = sf.info(str(dataset / name)).frames
        n_model = math.ceil(n * 44100 / sr)
        share = np.clip(n_model - np.arange(feats.shape[-1]) * 32768, 0, 32768) / 32768
        assert clip.shape == (ch, 8 * 32)
        np.testing.assert_allclose(clip, (feats * share).sum(-1) / share.sum(), atol=1e-5)


def test_bad_inputs_are_reported_and_skipped(dataset: Path, model_dir: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    data.mkdir()
    sf.write(data / "good1.wav", _tone(44100, 0.4, 1, 1), 44100)
    (data / "broken.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk")
    sf.write(data / "good2.wav", _tone(44100, 0.4, 1, 2), 44100)
    sf.write(data / "nan.wav", np.full((2000, 1), np.nan, np.float32), 44100, subtype="FLOAT")
    assert _run(["encode", str(data), "-o", str(tmp_path / "lat")], model_dir) == 1
    err = capsys.readouterr().err
    assert sorted(_files(tmp_path / "lat")) == ["good1.m2l", "good2.m2l"]
    summary = err[err.index("file(s) failed"):]
    assert "broken.wav" in summary and "nan.wav" in summary and "good1" not in summary
    # Decode: a corrupt .m2l next to a good one.
    (tmp_path / "lat" / "good2.m2l").unlink()
    (tmp_path / "lat" / "zz.m2l").write_bytes(b"garbage")
    assert _run(["decode", str(tmp_path / "lat"), "-o", str(tmp_path / "dec")], model_dir) == 1
    assert sorted(_files(tmp_path / "dec")) == ["good1.wav"]
    assert "zz.m2l" in capsys.readouterr().err
    # Usage errors: exit status 2, nothing written.
    assert _run(["encode", str(tmp_path / "nope"), "-o", str(tmp_path / "x")], model_dir) == 2
    sf.write(data / "good1.flac", _tone(44100, 0.4, 1, 1), 44100)  # same output name as good1.wav
    assert _run(["encode", str(data), "-o", str(tmp_path / "x")], model_dir) == 2
    assert "both be written" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["encode", str(data), "-o", str(tmp_path / "x"), "--shard", "2/2"])
    assert exit_info.value.code == 2
    assert not (tmp_path / "x").exists()
    # A device that does not exist is a usage error (2), not a failed input (1), and is named as the option.
    (data / "good1.flac").unlink()
    assert cli.main(["encode", str(data), "-o", str(tmp_path / "x"), "--model", str(model_dir),
                     "--device", "no-such-device", "-q"]) == 2
    assert "--device: device 'no-such-device'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("command", ["encode", "decode"])
def test_interrupted_run_resumes_to_identical_outputs(command: str, encoded: Path, dataset: Path, model_dir: Path,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    src = dataset if command == "encode" else encoded / "lat"
    reference = encoded / ("lat" if command == "encode" else "dec")  # the uninterrupted subprocess run
    out = tmp_path / "out"
    calls = []
    real = atomic_write

    def dies_on_second_file(path: Path, write):  # noqa: ANN001
        calls.append(path)
        if len(calls) == 2:  # killed half-way through writing the second output
            def partial(tmp: str) -> None:
                Path(tmp).write_bytes(b"partial")
                raise KeyboardInterrupt
            return real(path, partial)
        return real(path, write)

    monkeypatch.setattr("music2latent2.latents_io.atomic_write", dies_on_second_file)
    monkeypatch.setattr(cli, "atomic_write", dies_on_second_file)
    assert _run([command, str(src), "-o", str(out), "--workers", "2"], model_dir) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    monkeypatch.undo()
    first = _files(out)
    assert len(first) == 1 and not any(Path(k).name.startswith(".") for k in first)
    assert _run([command, str(src), "-o", str(out)], model_dir) == 0
    assert "2 done, 1 skipped" in capsys.readouterr().err
    assert sorted(_files(out)) == sorted(_files(reference))
    for name, data in _files(reference).items():
        if command == "decode":  # byte-identical: decoding is seeded
            assert (out / name).read_bytes() == data, name
        else:  # encode is deterministic (file bytes differ: safetensors orders metadata keys at random)
            (z, meta), (z_ref, meta_ref) = load_latents(out / name), load_latents(reference / name)
            assert np.array_equal(z, z_ref) and meta == meta_ref, name
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert _run([command, str(src), "-o", str(out)], model_dir) == 0  # nothing left to do
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_shards_partition_the_files(dataset: Path, model_dir: Path, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    names = [f"d{i % 4}/s{i % 3}/f{i}.wav" for i in range(40)]
    for n in names:
        (tree / n).parent.mkdir(parents=True, exist_ok=True)
        (tree / n).touch()
    jobs = cli.collect_jobs([str(tree)], str(tmp_path / "o"), "encode", ".m2l")
    keys = {j.key for j in jobs}
    assert keys == {str(Path(n).with_suffix(".m2l").as_posix()) for n in names}
    for n in (1, 2, 3, 7):
        parts = [{k for k in keys if cli.shard_of(k, n) == i} for i in range(n)]
        assert set().union(*parts) == keys and sum(map(len, parts)) == len(keys)
    # Through the CLI: two shards together write every output exactly once.
    outs = []
    for i in range(2):
        assert _run(["encode", str(dataset), "-o", str(tmp_path / f"s{i}"), "--shard", f"{i}/2"], model_dir) == 0
        outs.append(set(_files(tmp_path / f"s{i}")))
    assert outs[0] | outs[1] == {"a.m2l", "sub/b.m2l", "sub/deeper/c.m2l"} and not outs[0] & outs[1]
