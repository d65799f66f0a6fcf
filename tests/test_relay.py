"""Relay-leg training: start from a checkpoint, time-budgeted schedules, snapshots in pieces,
pre-tanh monitoring and parallel preloading (tiny model, CPU). Corpus carry parts: test_corpus_builder.py."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from test_training import MICRO, _config  # the same micro training config

from music2latent2 import Music2Latent2
from music2latent2.checkpoint import CheckpointError
from music2latent2.training import Trainer, consistency_step_delta, crop_samples
from music2latent2.training.__main__ import main as train_main
from music2latent2.training.data import AudioSource
from music2latent2.training.losses import consistency_loss
from music2latent2.training.snapshot import LATEST_NAME, PIECES_NAME, join_snapshot, write_snapshot

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
def _batch(trainer: Trainer, seed: int = 0) -> torch.Tensor:
    c = trainer.model.config
    n = crop_samples(c.chunk_samples, c.n_fft, c.hop_length)
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / 44100
    return (0.3 * torch.sin(2 * torch.pi * 440 * t)[None, None] + 0.05 * torch.randn(2, 1, n, generator=g)).float()


def test_delta_schedule_is_geometric_from_start_step():
    # The paper's schedule is the special case start 0.1, end 1e-3.
    assert consistency_step_delta(50, 100, 0.1, 1e-3) == pytest.approx(0.01)
    # ECT: a pure denoiser at the start, shrinking geometrically, over [start_step, total_steps].
    assert consistency_step_delta(1000, 1100, 1.0, 0.01, start_step=1000) == pytest.approx(1.0)
    assert consistency_step_delta(1050, 1100, 1.0, 0.01, start_step=1000) == pytest.approx(0.1)
    assert consistency_step_delta(1100, 1100, 1.0, 0.01, start_step=1000) == pytest.approx(0.01)
    assert consistency_step_delta(5, 1100, 1.0, 0.01, start_step=1000) == pytest.approx(1.0)


def test_delta_one_makes_the_target_the_clean_chunk():
    # With delta >= 1 every teacher runs at sigma_min, where f(x, sigma_min) = x: the loss is a
    # reconstruction loss against the clean spectrogram, whatever the network's weights.
    trainer = Trainer(_config())
    model, wav = trainer.model, _batch(trainer)
    seen = []
    original = model.denoise

    def spy(x, sigma, cross):
        out = original(x, sigma, cross)
        seen.append((x.detach(), sigma.detach(), out.detach()))
        return out

    model.denoise = spy
    consistency_loss(model, wav, 1.0, trainer.sampler, torch.Generator().manual_seed(0))
    x_teacher, sigma_teacher, target = seen[0]
    assert torch.allclose(sigma_teacher, torch.full_like(sigma_teacher, model.config.sigma_min))
    assert torch.allclose(target, x_teacher, atol=1e-4)  # teacher returns its (almost clean) input


def test_lr_schedule_starts_at_start_step():
    trainer = Trainer(_config(warmup_steps=10, total_steps=1110, start_step=1000, lr=1e-4))
    assert trainer.step == 1000
    assert trainer.lr_at(1000) == pytest.approx(1e-5)
    assert trainer.lr_at(1009) == pytest.approx(1e-4)
    assert trainer.lr_at(1110) == pytest.approx(1e-6)
    with pytest.raises(ValueError, match="start_step"):
        _config(start_step=50, total_steps=50).validate()


def test_init_weights_from_a_checkpoint(tmp_path):
    donor = Trainer(_config(seed=3))
    donor.train_step(_batch(donor))
    path = donor.ema.save_pretrained(tmp_path / "ckpt", dtype=torch.float16)
    loaded = Music2Latent2.from_pretrained(path)
    trainer = Trainer(_config(seed=0, start_step=7, summary_init_std=None))  # keep the tokens (test_recipe: re-draw)
    trainer.init_weights_from(loaded)
    for a, b, c in zip(loaded.parameters(), trainer.model.parameters(), trainer.ema.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert trainer.step == 7 and not trainer.optimizer.state  # fresh optimiser
    other = Trainer(_config(model_overrides={**MICRO, "dim": 48}))
    with pytest.raises(ValueError, match="config differs"):
        other.init_weights_from(loaded)


def test_time_budget_lays_schedules_out_and_finishes_them(monkeypatch):
    import music2latent2.training.trainer as trainer_module

    clock = {"t": 0.0}

    def fake_clock() -> float:  # 0.5 s per reading: one reading per step -> 2 steps/s
        clock["t"] += 0.5
        return clock["t"]

    monkeypatch.setattr(trainer_module.time, "perf_counter", fake_clock)
    trainer = Trainer(_config(max_minutes=0.5, reserve_minutes=0.05, calibrate_steps=4, log_every=1000,
                              save_every=1000, eval_every=1000, total_steps=10 ** 6, warmup_steps=2))

    def batches():
        while True:
            yield _batch(trainer)

    saved = []
    trainer.fit(batches(), 100, on_save=lambda t: saved.append(t.step))
    total = trainer.config.total_steps
    assert 30 < total < 60, total  # ~2 steps/s over what is left of 27 s
    assert trainer.step == total and saved == [total]  # the run completed its schedules
    assert trainer.lr_at(trainer.step) == pytest.approx(trainer.config.min_lr)
    assert trainer.delta_at(trainer.step) == pytest.approx(trainer.config.delta_end)


def test_time_budget_is_a_hard_stop(monkeypatch):
    import music2latent2.training.trainer as trainer_module

    clock = {"t": 0.0}

    def slow_clock() -> float:  # calibration never completes: 10 s per reading
        clock["t"] += 10.0
        return clock["t"]

    monkeypatch.setattr(trainer_module.time, "perf_counter", slow_clock)
    trainer = Trainer(_config(max_minutes=1.0, calibrate_steps=100, log_every=1000, save_every=1000,
                              eval_every=1000, total_steps=10 ** 6))
    trainer.fit(iter([_batch(trainer)] * 50), 100, on_save=lambda t: None)
    assert 4 <= trainer.step <= 7


def test_penalty_and_saturation_stats():
    trainer = Trainer(_config())
    wav = _batch(trainer)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    loss0, stats = consistency_loss(trainer.model, wav, 0.1, trainer.sampler, g())
    assert 0 <= float(stats["saturated"]) <= 1 and float(stats["pre_tanh_std"]) > 0
    assert 0 <= float(stats["latent_penalty"]) < 1e-4  # untrained pre-tanh values are (almost all) inside +-2
    # A limit of zero penalises every value: the loss grows by weight * mean(pre^2).
    loss1, stats1 = consistency_loss(trainer.model, wav, 0.1, trainer.sampler, g(), latent_penalty=10.0,
                                     pre_tanh_limit=1e-9)
    assert float(stats1["latent_penalty"]) > 0
    expected = float(loss0.detach()) + 10.0 * float(stats1["latent_penalty"])
    assert float(loss1.detach()) == pytest.approx(expected, rel=1e-4)
    # Saturated latents are counted: scale the encoder's output layer up until the tanh clips.
    with torch.no_grad():
        trainer.model.encoder.latent_out.weight.mul_(1e4)
    _, stats2 = consistency_loss(trainer.model, wav, 0.1, trainer.sampler, g())
    assert float(stats2["saturated"]) > 0.5
    # The trainer logs them.
    out = Trainer(_config()).train_step(wav)
    assert {"saturated", "pre_tanh_std", "latent_penalty", "delta"} <= set(out)


def test_snapshot_pieces_join_and_corruption(tmp_path):
    trainer = Trainer(_config())
    root = tmp_path / "snapshots"
    first = write_snapshot(trainer.ema, root, step=1, latent_scale=2.5, piece_bytes=100_000)
    trainer.train_step(_batch(trainer))
    second = write_snapshot(trainer.ema, root, step=2, latent_scale=2.5, piece_bytes=100_000)
    third = write_snapshot(trainer.ema, root, step=3, latent_scale=2.5, piece_bytes=100_000, keep=2)
    assert not first.exists() and second.exists() and third.exists()  # keeps the newest two
    assert (root / LATEST_NAME).read_text().strip() == third.name
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp folders left
    index = json.loads((third / PIECES_NAME).read_text())
    assert len(index["pieces"]) >= 3 and all(p["size"] <= 100_000 for p in index["pieces"])

    joined = join_snapshot(root, tmp_path / "joined.safetensors")  # LATEST is followed
    model = Music2Latent2.from_pretrained(joined)
    assert model.config.latent_scale == pytest.approx(2.5)
    for a, b in zip(model.parameters(), trainer.ema.parameters()):
        torch.testing.assert_close(a, b.half().float())

    bad = third / index["pieces"][1]["name"]
    data = bytearray(bad.read_bytes())
    data[10] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        join_snapshot(third, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()
    bad.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        join_snapshot(third, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="not a snapshot"):
        join_snapshot(tmp_path, tmp_path / "bad.safetensors")


def test_parallel_preload_matches_sequential(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(6):
        sf.write(str(tmp_path / f"f{i}.ogg"), 0.2 * rng.standard_normal(20000 + 1000 * i), 48000,
                 format="OGG", subtype="VORBIS")
    budget = 10 ** 7
    one = AudioSource(tmp_path, 1.0, cache_budget=budget)
    one.preload(threads=1)
    many = AudioSource(tmp_path, 1.0, cache_budget=budget)
    many.preload(threads=4)
    assert sorted(one.cache) == sorted(many.cache) == list(range(6))
    for i in range(6):
        np.testing.assert_array_equal(one.cache[i], many.cache[i])
    import music2latent2.training.data as data_module

    decoded = []
    real_load = data_module.load_audio
    data_module.load_audio = lambda p: decoded.append(p) or real_load(p)
    try:
        small = AudioSource(tmp_path, 1.0, cache_budget=one.cache[0].nbytes + one.cache[1].nbytes)
        small.preload(threads=2)
    finally:
        data_module.load_audio = real_load
    assert sorted(small.cache) == [0, 1]  # stops at the first file that does not fit
    assert len(decoded) <= 4  # 3 needed, at most one more in flight: not the whole folder


def test_relay_cli_init_from_budget_snapshots_and_join(tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        sf.write(str(data / f"x{i}.flac"), 0.3 * rng.standard_normal(30000).astype(np.float32), 44100)
    donor = Trainer(_config())
    ckpt = donor.ema.save_pretrained(tmp_path / "shipped", dtype=torch.float16)
    run = tmp_path / "leg"
    args = ["train", "--data", str(data), "--out", str(run), "--init-from", str(ckpt), "--start-step", "40",
            "--steps", "44", "--batch-size", "2", "--warmup", "1", "--ema", "0.9", "--workers", "0",
            "--cache-gb", "0.01", "--log-every", "2", "--save-every", "100", "--eval-every", "100",
            "--snapshot-minutes", "100", "--snapshot-piece-mib", "0.1", "--delta-start", "1",
            "--delta-end", "0.01", "--latent-penalty", "1", "--precision", "fp32"]
    assert train_main(args) == 0
    out = capsys.readouterr().out
    assert "initialised from" in out and "step 42/44" in out and "sat " in out and "pre-tanh std" in out
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    # Schedules run from --start-step: the step that ended at 42 ran at progress 1/4 of 40 -> 44.
    assert [r["step"] for r in log] == [42, 44] and log[0]["delta"] == pytest.approx(0.01 ** 0.25)
    assert {"saturated", "pre_tanh_std"} <= set(log[0])
    # The final snapshot is written at the end even though the interval never elapsed.
    assert (run / "snapshots" / LATEST_NAME).read_text().strip() == "step-00000044"
    assert train_main(["join", str(run / "snapshots"), "--out", str(tmp_path / "back")]) == 0
    back = Music2Latent2.from_pretrained(tmp_path / "back")
    assert back.config.latent_scale != 1.0  # measured at snapshot time
    from safetensors import safe_open
    with safe_open(str(run / "state.safetensors"), framework="pt") as f:
        cfg = json.loads(f.metadata()["train_config"])
    assert cfg["start_step"] == 40 and cfg["init_from"] == str(ckpt) and len(cfg["init_sha256"]) == 64
