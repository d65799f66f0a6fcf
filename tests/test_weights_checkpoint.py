"""Checkpoint format: safetensors + config metadata, strict loading, corrupt files, sha256."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict

import pytest
import torch
from safetensors.torch import save_file

from music2latent2 import EncoderDecoder, ModelConfig, Music2Latent2
from music2latent2.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    ChecksumMismatchError,
    read_metadata,
    sha256_file,
)
from music2latent2.hub import WeightsNotAvailableError


@pytest.fixture(scope="module")
def model() -> Music2Latent2:
    torch.manual_seed(1)
    return Music2Latent2(ModelConfig.from_preset("tiny")).eval()


def write_raw(path: Path, tensors: Dict[str, torch.Tensor], config: ModelConfig,
              version: str = FORMAT_VERSION) -> Path:
    meta = {"format": "pt", "music2latent2_format_version": version, "config": config.to_json()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def test_roundtrip_directory_and_file(model: Music2Latent2, tmp_path: Path) -> None:
    path = model.save_pretrained(tmp_path / "dir")
    assert path == tmp_path / "dir" / "model.safetensors"
    assert json.loads((tmp_path / "dir" / "config.json").read_text()) == model.config.to_dict()
    meta = read_metadata(path)
    assert meta["music2latent2_format_version"] == FORMAT_VERSION
    assert ModelConfig.from_json(meta["config"]) == model.config
    for loaded in (Music2Latent2.from_pretrained(tmp_path / "dir"), Music2Latent2.from_pretrained(str(path)),
                   EncoderDecoder(str(tmp_path / "dir"), device="cpu").model):
        assert not loaded.training
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key


def test_half_precision_checkpoint_loads_as_float32(model: Music2Latent2, tmp_path: Path) -> None:
    full = model.save_pretrained(tmp_path / "f32")
    half = model.save_pretrained(tmp_path / "f16", dtype=torch.float16)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded = Music2Latent2.from_pretrained(half)
    for key, value in model.state_dict().items():
        got = loaded.state_dict()[key]
        assert got.dtype == value.dtype
        assert torch.allclose(got, value, rtol=1e-3, atol=1e-4), key


def test_missing_unexpected_and_misshaped_tensors_are_named(model: Music2Latent2, tmp_path: Path) -> None:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    first = next(iter(state))
    missing = dict(state)
    del missing[first]
    with pytest.raises(CheckpointError, match=f"missing tensors \\['{first}'\\]"):
        Music2Latent2.from_pretrained(write_raw(tmp_path / "missing.safetensors", missing, model.config))

    extra = dict(state, **{"stray.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="unexpected tensors \\['stray.weight'\\]"):
        Music2Latent2.from_pretrained(write_raw(tmp_path / "extra.safetensors", extra, model.config))

    key = next(k for k, v in state.items() if v.dim() >= 1 and v.is_floating_point())
    shaped = dict(state)
    shaped[key] = torch.zeros(*state[key].shape[:-1], state[key].shape[-1] + 1)
    with pytest.raises(CheckpointError, match=f"mis-shaped tensors .*{key}"):
        Music2Latent2.from_pretrained(write_raw(tmp_path / "shape.safetensors", shaped, model.config))

    # The config in the metadata decides the architecture: another preset's config does not fit.
    other = ModelConfig.from_preset("tiny", dim=48, noise_embed_dim=48, cond_dim=48)
    with pytest.raises(CheckpointError, match="does not match its config"):
        Music2Latent2.from_pretrained(write_raw(tmp_path / "config.safetensors", state, other))


def test_corrupt_truncated_and_foreign_files(model: Music2Latent2, tmp_path: Path) -> None:
    good = model.save_pretrained(tmp_path / "good")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64 + b"not a checkpoint")
    for bad in (truncated, garbage):
        with pytest.raises(CheckpointError, match=f"cannot read checkpoint .*{bad.name}"):
            Music2Latent2.from_pretrained(bad)
    with pytest.raises(WeightsNotAvailableError, match="no checkpoint file or directory"):
        Music2Latent2.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="checkpoint not found: .*empty/model.safetensors"):
        Music2Latent2.from_pretrained(tmp_path / "empty")

    state = model.state_dict()
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(plain))
    with pytest.raises(CheckpointError, match="no model config"):
        Music2Latent2.from_pretrained(plain)
    with pytest.raises(CheckpointError, match="format version '99'"):
        Music2Latent2.from_pretrained(write_raw(tmp_path / "v99.safetensors", dict(state), model.config, version="99"))

    nan_state = {k: v.clone() for k, v in state.items()}
    key = next(k for k, v in nan_state.items() if v.is_floating_point())
    nan_state[key].view(-1)[0] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite"):
        Music2Latent2.from_pretrained(write_raw(tmp_path / "nan.safetensors", nan_state, model.config))


def test_sha256_is_checked_before_loading(model: Music2Latent2, tmp_path: Path) -> None:
    path = model.save_pretrained(tmp_path / "sha")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert sha256_file(path) == digest
    assert isinstance(Music2Latent2.from_pretrained(path, sha256=digest.upper()), Music2Latent2)
    wrong = "0" * 64
    with pytest.raises(ChecksumMismatchError) as info:
        Music2Latent2.from_pretrained(path, sha256=wrong)
    assert info.value.expected == wrong and info.value.actual == digest
    assert str(path) in str(info.value) and wrong in str(info.value) and digest in str(info.value)
    assert isinstance(info.value, CheckpointError) and isinstance(info.value, ValueError)
