"""Training data: crop size, silence skipping, folder weights, worker seeding, DIR:WEIGHT parsing."""

import numpy as np
import pytest
import soundfile as sf
import torch

from music2latent2.training.data import (
    AudioSource,
    CropDataset,
    build_sources,
    crop_samples,
    make_loader,
    parse_data_spec,
)

CROP = crop_samples()


def _write(path, data, sr):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, sr)


@pytest.fixture()
def folders(tmp_path):
    rng = np.random.default_rng(0)
    music = tmp_path / "music"
    for i in range(3):  # 22.05 kHz mono noise: exercises resampling
        _write(music / f"n{i}.flac", 0.3 * rng.standard_normal(22050 * 2).astype(np.float32), 22050)
    _write(music / "silent.wav", np.zeros(44100 * 4, np.float32), 44100)
    speech = tmp_path / "speech"
    t = np.arange(48000 * 2) / 48000
    _write(speech / "sub" / "tone.wav", np.stack([np.sin(2 * np.pi * 300 * t), 0.5 * np.sin(2 * np.pi * 500 * t)], 1)
           .astype(np.float32) * 0.5, 48000)
    _write(speech / "short.wav", 0.5 * rng.standard_normal(5000).astype(np.float32), 44100)
    (speech / "notes.txt").write_text("not audio")
    silent = tmp_path / "silent"
    _write(silent / "zero.wav", np.zeros(44100 * 3, np.float32), 44100)
    return tmp_path


def test_crop_size_is_two_chunks():
    assert CROP == 67072


def test_parse_data_spec(folders):
    assert parse_data_spec(str(folders / "music")) == (folders / "music", 1.0)
    assert parse_data_spec(f"{folders / 'music'}:2.5") == (folders / "music", 2.5)
    with pytest.raises(ValueError, match="positive"):
        parse_data_spec(f"{folders / 'music'}:0")
    with pytest.raises(ValueError, match="not found"):
        parse_data_spec(str(folders / "nope"))


def test_crops_shape_channels_and_silence(folders):
    music = AudioSource(folders / "music", 1.0)
    speech = AudioSource(folders / "speech", 1.0)
    assert len(music.files) == 4 and len(speech.files) == 2  # notes.txt ignored, subfolders found
    assert speech.lengths[0] == 5000 and speech.lengths[1] == 88200  # 48 kHz -> 44.1 kHz
    rng = np.random.default_rng(0)
    mono = CropDataset([music, speech], audio_channels=1, crop=CROP)
    stereo = CropDataset([music, speech], audio_channels=2, crop=CROP)
    for _ in range(30):
        x, _ = mono.sample(rng)
        assert x.shape == (1, CROP) and x.dtype == np.float32
        assert np.sqrt(np.mean(x ** 2)) > 10 ** (-60 / 20)  # the silent file never comes out
        assert np.abs(x).max() <= 1.0 + 1e-6  # random gain after peak normalisation
        y, _ = stereo.sample(rng)
        assert y.shape == (2, CROP)
    with pytest.raises(ValueError, match="silent"):
        CropDataset([AudioSource(folders / "silent", 1.0)], 1, CROP).sample(rng, max_tries=5)


def test_weights_respected(folders):
    ds = CropDataset([AudioSource(folders / "music", 3.0), AudioSource(folders / "speech", 1.0)], 1, CROP)
    rng = np.random.default_rng(1)
    picks = np.array([ds.sample(rng)[1] for _ in range(400)])
    # P(music) = 0.75, minus its silent-file retries (~1/3 of its length-weighted draws):
    # expected share 0.5 / (0.5 + 0.25) = 2/3 of the accepted crops.
    share = float(np.mean(picks == 0))
    assert 0.55 < share < 0.78, share


def test_loader_workers_get_different_seeds(folders):
    ds = CropDataset([AudioSource(folders / "music", 1.0)], 1, CROP, seed=7)
    loader = make_loader(ds, batch_size=2, num_workers=2)
    it = iter(loader)
    a, b = next(it), next(it)  # one batch from each worker
    assert a.shape == (2, 1, CROP) and a.dtype == torch.float32
    assert not torch.equal(a, b)
    first = next(iter(make_loader(CropDataset([AudioSource(folders / "music", 1.0)], 1, CROP, seed=7), 2)))
    again = next(iter(make_loader(CropDataset([AudioSource(folders / "music", 1.0)], 1, CROP, seed=7), 2)))
    assert torch.equal(first, again)  # same seed, same stream


def test_cache_budget(folders, monkeypatch):
    import music2latent2.training.data as data_module

    src = AudioSource(folders / "music", 1.0, cache_budget=10 ** 9)
    src.preload()
    assert len(src.cache) == 4 and src.cached_bytes == sum(a.nbytes for a in src.cache.values())
    one_file = next(iter(src.cache.values())).nbytes
    # A budget for about one file: preload stops at the first file that does not fit instead of
    # decoding (and throwing away) the rest of the corpus.
    decoded = []
    real_load = data_module.load_audio
    monkeypatch.setattr(data_module, "load_audio", lambda p: decoded.append(p) or real_load(p))
    small = AudioSource(folders / "music", 1.0, cache_budget=one_file + 10)
    small.preload()
    assert len(small.cache) == 1 and len(decoded) == 2 and small.cached_bytes <= small.cache_budget
    none = AudioSource(folders / "music", 1.0)  # no budget: nothing cached, files still load
    assert none.load(0).shape[-1] > 0 and not none.cache


def test_build_sources_splits_the_budget(folders):
    sources = build_sources([str(folders / "music"), str(folders / "speech")], preload_bytes=1000)
    assert [s.cache_budget for s in sources] == [500, 500]
