"""music2latent2.hear: the HEAR API's shapes, dtypes and timestamp rules, and what the embeddings are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny

import music2latent2.hear as hear
from music2latent2 import EncoderDecoder, Music2Latent2

SR = 44100
CHUNK = 32768


@pytest.fixture(scope="module")
def model() -> hear.HearModel:
    return hear.HearModel(make_tiny(seed=3))


def _noise(n_sounds: int, seconds: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n_sounds, int(seconds * SR), generator=g) * 2 - 1  # as hear-validator makes it


def test_attributes_are_what_hear_reads(model: hear.HearModel) -> None:
    assert isinstance(model, torch.nn.Module)
    assert model.sample_rate == 44100  # one of the rates HEAR accepts (16k, 22.05k, 44.1k, 48k)
    cfg = model.network.config
    assert model.scene_embedding_size == model.timestamp_embedding_size == cfg.summary_tokens * cfg.dim
    assert type(model.scene_embedding_size) is int and type(model.timestamp_embedding_size) is int
    assert model.phases == 1 and model.hop_ms == pytest.approx(1000 * CHUNK / SR)


@pytest.mark.parametrize("seconds", [1.07, 1.98, 4.0])  # the lengths hear-validator checks
@pytest.mark.parametrize("hop_ms", [None, 50.0])
def test_timestamp_embeddings_follow_the_hear_rules(seconds: float, hop_ms: float | None) -> None:
    model = hear.HearModel(make_tiny(seed=3), hop_ms=hop_ms)
    audio = _noise(2, seconds)
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    n = audio.shape[1]
    hop = CHUNK / model.phases  # samples
    count = int(np.floor(n / hop)) + 1
    assert emb.shape == (2, count, model.timestamp_embedding_size) and emb.dtype == torch.float32
    assert ts.shape == (2, count) and torch.equal(ts[0], ts[1])
    t = ts[0].double().numpy()
    length_ms = 1000 * n / SR
    assert t[0] == 0.0 and t[-1] <= length_ms  # within the audio ...
    assert t[-1] >= length_ms - model.hop_ms  # ... up to its end (HEAR errors below length - 2 hops)
    if count > 1:
        steps = np.diff(t)
        assert np.abs(steps - model.hop_ms).max() < 0.05  # regular: HEAR allows 1 ms of deviation
    np.testing.assert_allclose(t, np.arange(count) * 1000 * hop / SR, atol=0.012)  # no drift: half a sample
    assert torch.isfinite(emb).all()
    if hop_ms == 50.0:
        assert model.phases == 15 and model.hop_ms == pytest.approx(49.5359, abs=1e-3) and model.hop_ms <= 50


def test_timestamp_embedding_is_the_chunk_centred_on_it(model: hear.HearModel) -> None:
    """The embedding at time t is encode(extract_features=True) of the chunk [t - C/2, t + C/2)."""
    audio = _noise(1, 2.5, seed=1)
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    codec = EncoderDecoder(model.network, device="cpu")
    shifted = torch.nn.functional.pad(audio, (CHUNK // 2, 0))  # chunk t now centred on t * CHUNK
    feats = codec.encode(shifted[:, None], extract_features=True)[:, 0]  # (1, D, chunks)
    count = emb.shape[1]
    torch.testing.assert_close(emb[0], feats[0, :, :count].T, rtol=1e-5, atol=1e-5)
    # A finer hop interleaves further passes; every 4th embedding is the default one.
    fine = hear.HearModel(model.network, hop_ms=1000 * CHUNK / SR / 4)
    emb4, ts4 = hear.get_timestamp_embeddings(audio, fine)
    assert fine.phases == 4
    torch.testing.assert_close(emb4[:, ::4], emb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ts4[:, ::4], ts)
    # The pass at a quarter chunk is the audio's chunk centred on C/4 + t*C.
    quarter = torch.nn.functional.pad(audio, (CHUNK // 2 - CHUNK // 4, 0))
    feats_q = codec.encode(quarter[:, None], extract_features=True)[:, 0]
    torch.testing.assert_close(emb4[0, 1::4], feats_q[0, :, :emb4[0, 1::4].shape[0]].T, rtol=1e-5, atol=1e-5)


def test_scene_embedding_is_the_weighted_chunk_mean_and_batch_independent(model: hear.HearModel) -> None:
    audio = _noise(3, 2.74, seed=2)  # hear-validator's scene length: 4 chunks, the last 69% audio
    scene = hear.get_scene_embeddings(audio, model)
    assert scene.shape == (3, model.scene_embedding_size) and scene.dtype == torch.float32
    feats = EncoderDecoder(model.network, device="cpu").encode(audio[:, None], extract_features=True)  # (3, 1, D, 4)
    n = audio.shape[-1]
    weights = torch.tensor([1.0, 1.0, 1.0, (n - 3 * CHUNK) / CHUNK])
    torch.testing.assert_close(scene, (feats[:, 0] * weights).sum(-1) / weights.sum(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(scene, feats[:, 0].mean(-1), rtol=1e-5, atol=1e-6)  # the padding gets no full vote
    # An ordinary tensor: it can feed a trainable layer (an inference tensor would raise in backward).
    probe = torch.nn.Linear(scene.shape[1], 2)
    probe(scene).sum().backward()
    assert probe.weight.grad is not None
    emb, _ = hear.get_timestamp_embeddings(audio, model)
    assert not emb.is_inference()
    alone = hear.get_scene_embeddings(audio[1:2], model)
    torch.testing.assert_close(alone[0], scene[1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(scene[0], scene[1])  # different sounds, different embeddings
    # numpy in works as well (hear-eval-kit gives tensors; a user may not).
    torch.testing.assert_close(hear.get_scene_embeddings(audio.numpy(), model), scene)


def test_sounds_shorter_than_the_shifted_passes() -> None:
    """With a fine hop, most passes start past the end of a 0.1 s sound; each still counts."""
    model = hear.HearModel(make_tiny(seed=3), hop_ms=50)
    for samples in (1, 4410, CHUNK // 2 + 1):
        emb, ts = hear.get_timestamp_embeddings(_noise(2, samples / SR), model)
        count = int(np.floor(samples / (CHUNK / 15))) + 1
        assert emb.shape == (2, count, model.timestamp_embedding_size) and ts.shape == (2, count)
        assert float(ts.max()) <= 1000 * samples / SR and torch.isfinite(emb).all()


def test_stereo_model_takes_mono_audio() -> None:
    model = hear.HearModel(make_tiny(audio_channels=2, seed=4))
    emb, ts = hear.get_timestamp_embeddings(_noise(2, 1.0), model)
    assert emb.shape == (2, 2, model.timestamp_embedding_size)
    assert hear.get_scene_embeddings(_noise(2, 1.0), model).shape == (2, model.scene_embedding_size)


def test_load_model_from_a_checkpoint_and_module_moves(tmp_path: Path) -> None:
    make_tiny(seed=5).save_pretrained(tmp_path / "ckpt")
    model = hear.load_model(str(tmp_path / "ckpt"), hop_ms=100, device="cpu")
    assert isinstance(model.network, Music2Latent2) and model.phases == 8
    assert model.network.source is not None and model.network.source.path.parent == tmp_path / "ckpt"
    model.to("cpu")  # what hear-validator and hear-eval-kit do; the next call follows the module
    assert model.codec().device == torch.device("cpu")
    moved = hear.HearModel(make_tiny(seed=5)).to("meta")  # another device: each call's codec follows the module
    assert moved.codec().device == torch.device("meta") and moved.codec().model is moved.network
    with pytest.raises(ValueError, match="hop_ms must be a positive number"):
        hear.load_model(str(tmp_path / "ckpt"), hop_ms=0)
    with pytest.raises(ValueError, match="finest hop"):
        hear.HearModel(model.network, hop_ms=0.5)
    with pytest.raises(ValueError, match="precision"):
        hear.HearModel(model.network, precision="int8")


def test_bad_audio_is_named(model: hear.HearModel) -> None:
    with pytest.raises(ValueError, match=r"\(n_sounds, n_samples\)"):
        hear.get_scene_embeddings(torch.zeros(SR), model)
    with pytest.raises(ValueError, match=r"\(n_sounds, n_samples\)"):
        hear.get_timestamp_embeddings(torch.zeros(1, 2, SR), model)
    with pytest.raises(ValueError, match="empty"):
        hear.get_timestamp_embeddings(torch.zeros(2, 0), model)
    with pytest.raises(TypeError, match="floating point"):
        hear.get_scene_embeddings(torch.zeros(1, SR, dtype=torch.int16), model)
    bad = torch.zeros(1, SR)
    bad[0, 100] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        hear.get_scene_embeddings(bad, model)
    with pytest.raises(TypeError, match="load_model"):
        hear.get_scene_embeddings(torch.zeros(1, SR), model.network)  # type: ignore[arg-type]
