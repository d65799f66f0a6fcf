"""The .m2l latent file format: round trip, validation, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from music2latent2 import LatentMetadata, load_latents, save_latents
from music2latent2.fileio import atomic_write
from music2latent2.latents_io import LatentFileError


def _meta(**overrides: object) -> LatentMetadata:
    kwargs = dict(sample_rate=22050, length=28667, channels=2, summary_tokens=8, latent_dim=64, latent_scale=1.5,
                  model_name="ckpt/dir", model_sha256="ab" * 32, extra={"source": "sub/x.m2l"})
    kwargs.update(overrides)
    return LatentMetadata(**kwargs)  # type: ignore[arg-type]


def _hidden(directory: Path) -> list:
    return [p.name for p in directory.iterdir() if p.name.startswith(".")]


def test_round_trip_keeps_latents_and_metadata(tmp_path: Path) -> None:
    z = np.random.default_rng(0).standard_normal((2, 64, 24)).astype(np.float32)
    meta = _meta()
    out = save_latents(tmp_path / "x.m2l", torch.from_numpy(z), meta)
    z2, meta2 = load_latents(out)
    assert z2.dtype == np.float32 and np.array_equal(z2, z)
    assert meta2 == meta
    assert meta2.length == 28667 and meta2.sample_rate == 22050 and meta2.extra == {"source": "sub/x.m2l"}
    assert meta2.duration == pytest.approx(28667 / 22050)
    # A plain safetensors file: any reader sees the tensor.
    assert load_file(str(out))["latents"].shape == (2, 64, 24)
    assert _hidden(tmp_path) == []
    probe = tmp_path / "probe"
    probe.touch()  # a plain new file shows what the umask gives
    assert (out.stat().st_mode & 0o777) == (probe.stat().st_mode & 0o777)


def test_save_rejects_inconsistent_latents(tmp_path: Path) -> None:
    with pytest.raises(LatentFileError, match="shape"):
        save_latents(tmp_path / "a.m2l", np.zeros((1, 32, 8), np.float32), _meta())
    with pytest.raises(LatentFileError, match="multiple of K"):
        save_latents(tmp_path / "a.m2l", np.zeros((1, 64, 12), np.float32), _meta())
    with pytest.raises(TypeError, match="floating"):
        save_latents(tmp_path / "a.m2l", np.zeros((1, 64, 8), np.int32), _meta())
    with pytest.raises(ValueError, match="NaN"):
        # 3 chunks: enough to cover the metadata's 1.3 s, so the NaN check is what refuses it.
        save_latents(tmp_path / "a.m2l", np.full((1, 64, 24), np.nan, np.float32), _meta())
    with pytest.raises(LatentFileError, match="length"):
        _meta(length=0)
    assert list(tmp_path.iterdir()) == []


def test_load_rejects_bad_files(tmp_path: Path) -> None:
    with pytest.raises(LatentFileError, match="not found"):
        load_latents(tmp_path / "missing.m2l")
    junk = tmp_path / "junk.m2l"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(LatentFileError, match="cannot read"):
        load_latents(junk)
    other = tmp_path / "other.m2l"
    save_file({"latents": torch.zeros(1, 64, 8)}, str(other), metadata={"format": "pt"})
    with pytest.raises(LatentFileError, match="not a music2latent2 latent file"):
        load_latents(other)
    future = tmp_path / "future.m2l"
    strings = _meta().to_strings()
    save_file({"latents": torch.zeros(1, 64, 8)}, str(future), metadata={**strings, "format_version": "99"})
    with pytest.raises(LatentFileError, match="version"):
        load_latents(future)
    lying = tmp_path / "lying.m2l"
    save_file({"latents": torch.zeros(1, 32, 8)}, str(lying), metadata=strings)
    with pytest.raises(LatentFileError, match="shape"):
        load_latents(lying)


def test_atomic_write_failure_keeps_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.npy"
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"old"))

    def half_then_die(tmp: str) -> None:
        Path(tmp).write_bytes(b"half-writ")
        raise KeyboardInterrupt  # what Ctrl-C / SIGTERM (turned into KeyboardInterrupt by the CLI) looks like

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_die)
    assert target.read_bytes() == b"old"
    with pytest.raises(OSError):
        atomic_write(tmp_path / "new.npy", lambda tmp: (_ for _ in ()).throw(OSError("disk full")))
    assert sorted(os.listdir(tmp_path)) == ["out.npy"]
