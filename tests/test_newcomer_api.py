"""What a newcomer touches first: v1-style calls, ordinary tensors, .m2l round trips at the
original rate, LatentDataset, clip-level features, progress."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from music2latent2 import (
    EncoderDecoder,
    LatentDataset,
    LatentMetadata,
    LatentStats,
    cli,
    clip_features,
    load_latents,
    save_latents,
)
from music2latent2.features import chunk_weights
from music2latent2.latents_io import LatentFileError

CHUNK = 32768


def _noise(channels: int, samples: int, seed: int = 0) -> np.ndarray:
    return (0.2 * np.random.default_rng(seed).standard_normal((channels, samples))).astype(np.float32)


# ----------------------------------------------------------------------------- music2latent (v1) calls
def test_v1_positional_arguments_are_refused_with_the_replacement(tiny_encdec: EncoderDecoder) -> None:
    wav = _noise(1, 5000)
    z = tiny_encdec.encode(wav)
    with pytest.raises(TypeError, match="denoising_steps=") as err:
        tiny_encdec.decode(z, 1)  # type: ignore[misc]  # v1: one denoising step; here it would be length=1
    assert "music2latent (v1)" in str(err.value)
    with pytest.raises(TypeError, match="max_waveform_length"):
        tiny_encdec.encode(wav, 48000)  # type: ignore[misc]
    with pytest.raises(TypeError, match="cannot read v1 checkpoints"):
        EncoderDecoder(load_path_inference="music2latent.pt", device="cpu")


def test_v1_keywords_work_or_warn(tiny_encdec: EncoderDecoder) -> None:
    wav = _noise(1, 5000)
    with pytest.warns(FutureWarning, match="max_waveform_length"):
        z = tiny_encdec.encode(wav, max_waveform_length=44100 * 10, max_batch_size=4)
    np.testing.assert_array_equal(z, tiny_encdec.encode(wav))
    with pytest.warns(FutureWarning, match="max_waveform_length"):
        out = tiny_encdec.decode(z, denoising_steps=1, max_waveform_length=44100, max_batch_size=2, seed=0)
    np.testing.assert_array_equal(out, tiny_encdec.decode(z, denoising_steps=1, seed=0))
    with pytest.raises(TypeError, match="seed must be an integer"):
        tiny_encdec.decode(z, seed="x")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- ordinary tensors
def test_torch_outputs_feed_trainable_layers(tiny_encdec: EncoderDecoder) -> None:
    wav = torch.from_numpy(_noise(2, 9000))
    z = tiny_encdec.encode(wav)
    feats = tiny_encdec.encode(wav, extract_features=True)
    audio = tiny_encdec.decode(z, length=9000, seed=0)
    assert not (z.is_inference() or feats.is_inference() or audio.is_inference())
    layer = torch.nn.Linear(z.shape[1], 3)
    layer(z.transpose(1, 2)).sum().backward()  # an inference tensor raises "cannot be saved for backward"
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
    (torch.nn.Linear(9000, 1)(audio) ** 2).sum().backward()


# ----------------------------------------------------------------------------- .m2l back to the original
def test_decode_file_restores_rate_length_channels_and_level(tiny_encdec: EncoderDecoder, tmp_path: Path) -> None:
    sr, n = 48000, 120000  # 2.5 s: meta.length counts 48 kHz samples, not the model's 44.1 kHz
    audio = 0.05 * _noise(1, n)  # quiet: normalisation brings it up, the stored gain brings it back
    src = tmp_path / "song.wav"
    sf.write(src, audio.T, sr)
    z, gain = tiny_encdec.encode(audio, sr=sr, return_gain=True)
    cfg = tiny_encdec.config
    meta = LatentMetadata(sample_rate=sr, length=n, channels=1, summary_tokens=cfg.summary_tokens,
                          latent_dim=cfg.latent_dim, latent_scale=cfg.latent_scale,
                          model_audio_channels=cfg.audio_channels, gain=float(gain))
    path = save_latents(tmp_path / "song.m2l", z, meta)
    assert meta.model_length == math.ceil(n * 44100 / sr) == 110250

    wav, out_sr = tiny_encdec.decode_file(path)
    assert (out_sr, wav.shape, wav.dtype) == (sr, (1, n), np.float32)
    model_rate = tiny_encdec.decode(z, length=meta.model_length, gain=gain, seed=0)
    assert abs(20 * np.log10(np.abs(wav).max() / np.abs(model_rate).max())) < 0.5  # the same level
    assert np.abs(wav).max() < 0.5 * np.abs(tiny_encdec.decode(z, length=110250, seed=0)).max()  # not the model's
    again, _ = tiny_encdec.decode_file(load_latents(path))  # the (latents, metadata) pair; seed 0 both times
    np.testing.assert_array_equal(again, wav)
    at_16k, sr16 = tiny_encdec.decode_file(path, sr=16000)
    assert (sr16, at_16k.shape) == (16000, (1, 40000))

    stereo_meta = LatentMetadata(sample_rate=sr, length=n, channels=2, summary_tokens=cfg.summary_tokens,
                                 latent_dim=cfg.latent_dim, latent_scale=cfg.latent_scale, model_audio_channels=1)
    with pytest.raises(ValueError, match="original had 2"):
        tiny_encdec.decode_file((z, stereo_meta))
    with pytest.raises(LatentFileError, match="not found"):
        tiny_encdec.decode_file(tmp_path / "missing.m2l")
    with pytest.raises(TypeError, match="load_latents"):
        tiny_encdec.decode_file(z)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- LatentDataset
def _write_m2l(path: Path, sequences: int, chunks: int, seed: int, scale: float = 1.0) -> np.ndarray:
    z = np.random.default_rng(seed).standard_normal((sequences, 64, 8 * chunks)).astype(np.float32)
    z = z * np.linspace(0.5, 2.0, 64, dtype=np.float32)[None, :, None] + 0.3
    meta = LatentMetadata(sample_rate=44100, length=chunks * CHUNK - 10, channels=sequences, summary_tokens=8,
                          latent_dim=64, latent_scale=scale, model_audio_channels=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_latents(path, z, meta)
    return z


def test_latent_dataset_crops_on_chunk_boundaries(tmp_path: Path) -> None:
    root = tmp_path / "latents"
    a = _write_m2l(root / "a.m2l", 2, 6, seed=0)
    _write_m2l(root / "sub" / "b.m2l", 1, 3, seed=1)
    _write_m2l(root / "short.m2l", 1, 1, seed=2)
    _write_m2l(root / ".hidden" / "x.m2l", 1, 9, seed=3)
    (root / "notes.txt").write_text("not a latent file")

    ds = LatentDataset(root, crop_chunks=3)
    assert len(ds) == 3 and ds.skipped == [root / "short.m2l"]  # a.m2l's 2 sequences + b.m2l
    assert [ds.source(i) for i in range(3)] == [(root / "a.m2l", 0), (root / "a.m2l", 1), (root / "sub" / "b.m2l", 0)]
    torch.manual_seed(0)
    starts = set()
    for _ in range(40):
        item = ds[1]
        assert item.shape == (64, 24) and item.dtype == torch.float32
        hits = [s for s in range(0, a.shape[-1] - 23) if np.array_equal(a[1, :, s:s + 24], item.numpy())]
        assert len(hits) == 1 and hits[0] % 8 == 0  # a crop of sequence 1, starting on a chunk
        starts.add(hits[0] // 8)
    assert starts == {0, 1, 2, 3}  # every start of a 6-chunk file is drawn
    np.testing.assert_array_equal(LatentDataset(root, crop_chunks=3, random_crop=False)[0].numpy(), a[0, :, :24])
    first = LatentDataset(root, channels="first")
    assert [first.source(i) for i in range(len(first))] == [(root / "a.m2l", 0), (root / "short.m2l", 0),
                                                           (root / "sub" / "b.m2l", 0)]  # hidden folder skipped
    assert [first[i].shape[-1] for i in range(3)] == [48, 8, 24]  # whole sequences
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch.shape == (3, 64, 24)


def test_latent_dataset_normalisation_and_its_inverse(tmp_path: Path) -> None:
    root = tmp_path / "latents"
    zs = [_write_m2l(root / f"{i}.m2l", 1, 4 + i, seed=i) for i in range(3)]
    ds = LatentDataset(root, normalize=True)
    every = np.concatenate([z[0] for z in zs], axis=-1)  # (64, positions)
    assert ds.stats.positions == every.shape[1]
    np.testing.assert_allclose(ds.stats.mean.numpy(), every.mean(axis=1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ds.stats.std.numpy(), every.std(axis=1), rtol=1e-4)
    normed = torch.cat([ds[i] for i in range(len(ds))], dim=-1)
    assert normed.mean(dim=1).abs().max() < 1e-4 and (normed.std(dim=1, unbiased=False) - 1).abs().max() < 1e-3
    np.testing.assert_allclose(ds.denormalize(ds[2]).numpy(), zs[2][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ds.denormalize(ds[2].numpy()), zs[2][0], rtol=1e-5, atol=1e-5)
    ds.stats.save(tmp_path / "stats.json")
    other = LatentDataset(root, normalize=True, stats=LatentStats.load(tmp_path / "stats.json"))
    np.testing.assert_allclose(other[0].numpy(), ds[0].numpy(), rtol=1e-6, atol=1e-6)


def test_latent_dataset_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        LatentDataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .m2l files.*music2latent2 encode"):
        LatentDataset(tmp_path / "empty")
    _write_m2l(tmp_path / "mixed" / "a.m2l", 1, 2, seed=0)
    _write_m2l(tmp_path / "mixed" / "b.m2l", 1, 2, seed=0, scale=2.0)
    with pytest.raises(ValueError, match=r"b\.m2l has latent_scale=2.0.*one model"):
        LatentDataset(tmp_path / "mixed")
    _write_m2l(tmp_path / "short" / "a.m2l", 1, 2, seed=0)
    with pytest.raises(ValueError, match="shorter than crop_chunks=5"):
        LatentDataset(tmp_path / "short", crop_chunks=5)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.m2l").write_bytes(b"\x00" * 40)
    with pytest.raises(LatentFileError, match=r"x\.m2l"):
        LatentDataset(tmp_path / "bad")
    with pytest.raises(ValueError, match="crop_chunks"):
        LatentDataset(tmp_path / "short", crop_chunks=0)
    with pytest.raises(ValueError, match="channels"):
        LatentDataset(tmp_path / "short", channels="mean")


# ----------------------------------------------------------------------------- clip features
def test_clip_features_weight_the_padded_last_chunk_by_its_audio(tiny_encdec: EncoderDecoder) -> None:
    n = int(3.0 * 44100)  # 5 chunks, the last 3.7% audio
    np.testing.assert_allclose(chunk_weights(n, 5), [1, 1, 1, 1, (n - 4 * CHUNK) / CHUNK])
    feats = tiny_encdec.encode(_noise(2, n), extract_features=True)  # (2, D, 5)
    clip = clip_features(feats, n)
    w = chunk_weights(n, 5)
    assert clip.shape == feats.shape[:2]
    np.testing.assert_allclose(clip, (feats * w).sum(-1) / w.sum(), rtol=1e-5)
    np.testing.assert_allclose(clip_features(feats, 5 * CHUNK), feats.mean(-1), rtol=1e-5, atol=1e-7)  # whole chunks
    torch.testing.assert_close(clip_features(torch.from_numpy(feats), n), torch.from_numpy(clip))
    with pytest.raises(ValueError, match="another sample rate"):
        clip_features(feats, 10 * CHUNK)


# ----------------------------------------------------------------------------- progress
def test_progress_bar_for_long_single_files(tiny_encdec: EncoderDecoder, capsys: pytest.CaptureFixture) -> None:
    wav = _noise(1, 3 * CHUNK)
    z = tiny_encdec.encode(wav, progress=True)
    err = capsys.readouterr().err
    assert "encode" in err and "3/3" in err and "chunk" in err
    np.testing.assert_array_equal(z, tiny_encdec.encode(wav))
    out = tiny_encdec.decode(z, seed=0, progress=True)
    err = capsys.readouterr().err
    assert "decode" in err and "3/3" in err
    np.testing.assert_array_equal(out, tiny_encdec.decode(z, seed=0))


def test_cli_logs_progress_lines_without_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from music2latent2 import ModelConfig, Music2Latent2

    model_dir = tmp_path / "model"
    Music2Latent2(ModelConfig.from_preset("tiny")).save_pretrained(model_dir)
    (tmp_path / "in").mkdir()
    for i in range(2):
        sf.write(tmp_path / "in" / f"{i}.wav", _noise(1, 4000, seed=i).T, 44100)
    monkeypatch.setattr(cli, "_PROGRESS_EVERY_S", 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["encode", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", str(model_dir),
                         "--device", "cpu", "--workers", "0"]) == 0
    err = capsys.readouterr().err  # pytest's capture is not a terminal, as a SLURM log is not
    assert "encode: 1/2 files, 0 failed" in err and "encode: 2/2 files, 0 failed" in err
