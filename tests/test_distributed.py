"""Data-parallel training and sharded encoding under torchrun: gloo, 2 CPU processes (docs/distributed.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import List

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from music2latent2 import ModelConfig, Music2Latent2
from music2latent2.distributed import LaunchEnv, launch_env
from music2latent2.training.__main__ import main as train_main
from music2latent2.training.data import AudioSource, CropDataset, StepBatches, make_step_loader
from music2latent2.training.distributed import Ranks
from music2latent2.training.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "ddp_worker.py"
MICRO = json.dumps({"n_fft": 256, "hop_length": 64, "freq_bins": 128, "chunk_frames": 16})
COMMON = ["--preset", "tiny", "--model-overrides", MICRO, "--batch-size", "2", "--warmup", "1", "--ema", "0.9",
          "--workers", "0", "--cache-gb", "0.01", "--log-every", "5", "--save-every", "100", "--compile", "off",
          "--device", "cpu"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return dict(env, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _torchrun(args: List[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *args],
                          cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _train(cwd: Path, worker: List[str], train: List[str]) -> subprocess.CompletedProcess:
    return _torchrun([str(WORKER), "cli", *worker, "--", "--data", "data", *COMMON, *train], cwd)


def _last_steps(cwd: Path) -> dict:
    """rank -> what ddp_worker wrote after Trainer.fit (and remove it, for the next run)."""
    out = {}
    for rank in (0, 1):
        path = cwd / f"last_step.rank{rank}.json"
        out[rank] = json.loads(path.read_text())
        path.unlink()
    return out


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    (tmp_path / "data").mkdir()
    for i in range(2):
        sf.write(str(tmp_path / "data" / f"x{i}.flac"), 0.3 * rng.standard_normal(30000).astype(np.float32), 44100)
    return tmp_path


def test_two_ranks_of_batch_one_match_one_process_of_batch_two(tmp_path):
    one = subprocess.run([sys.executable, str(WORKER), "equal", str(tmp_path / "one")], env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    two = _torchrun([str(WORKER), "equal", str(tmp_path / "two")], tmp_path)
    assert two.returncode == 0, two.stderr
    a, b0, b1 = (load_file(tmp_path / f"{n}.safetensors") for n in ("one.rank0", "two.rank0", "two.rank1"))
    for name in b0:  # DDP keeps the ranks identical, bit for bit
        assert torch.equal(b0[name], b1[name]), name
    # The gradient the optimiser saw: the mean over the ranks' halves is the batch's mean.
    grads = [k for k in a if k.startswith("grad/")]
    scale = max(float(a[k].abs().max()) for k in grads)
    assert scale > 0
    for k in grads:
        torch.testing.assert_close(b0[k], a[k], rtol=1e-4, atol=1e-6 * scale, msg=k)
    # Weights after 3 steps: Adam divides by sqrt(v), so elements whose gradient is rounding noise
    # (conv biases in front of a GroupNorm) may step either way; every other element agrees.
    moved = off = total = 0
    for k in (k for k in a if k.startswith("model/")):
        moved += int(((a[k] - a["init/" + k[6:]]).abs() > 1e-5).sum())
        off += int(((a[k] - b0[k]).abs() > 1e-6).sum())
        total += a[k].numel()
    assert moved > total // 2  # the steps did move the weights
    assert off < total // 1000, (off, total)


def test_signal_on_one_rank_stops_both_and_resume_is_bit_for_bit(data):
    # SIGTERM reaches rank 0 only, at step 3: both ranks stop at the next agreed step (10).
    res = _train(data, ["--term-rank", "0", "--at-step", "3"], ["--out", "cut", "--steps", "14"])
    assert res.returncode == 0, res.stderr
    stops = _last_steps(data)
    assert stops[0]["last_step"] == stops[1]["last_step"] == 10 and stops[0]["reason"] == "signal"
    assert "stopped by SIGTERM after step 10" in res.stdout and "SIGTERM: stopping" in res.stderr
    assert not (data / "cut" / "final").exists()  # an interrupted run exports nothing as final
    res = _train(data, [], ["--out", "cut", "--resume"])
    assert res.returncode == 0, res.stderr
    assert "resumed cut at step 10" in res.stdout and _last_steps(data)[1]["last_step"] == 14
    res = _train(data, [], ["--out", "whole", "--steps", "14"])
    assert res.returncode == 0, res.stderr
    cut, whole = load_file(data / "cut" / "state.safetensors"), load_file(data / "whole" / "state.safetensors")
    assert sorted(cut) == sorted(whole) and "rng/generator/1" in cut
    for name in whole:
        assert torch.equal(cut[name], whole[name]), name
    log = [json.loads(line) for line in (data / "whole" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [5, 10, 14]  # rank 0 alone writes the log


def test_a_slow_rank_stops_at_the_same_step_as_the_other(data):
    # Rank 1 turns slow after the budget's calibration: the 6 s budget, on rank 0's clock, ends
    # the run for both at one agreed step.
    res = _train(data, ["--slow-rank", "1", "--sleep", "0.4", "--slow-from", "14"],
                 ["--out", "slow", "--steps", "100000", "--max-minutes", "0.1", "--calibrate-steps", "3",
                  "--reserve-minutes", "0.01"])
    assert res.returncode == 0, res.stderr
    stops = _last_steps(data)
    assert stops[0]["last_step"] == stops[1]["last_step"] > 14
    assert stops[0]["reason"] == stops[1]["reason"] == "time" and stops[0]["last_step"] % 10 == 0
    assert "time budget of 0.1 min spent" in res.stdout


def test_a_killed_rank_ends_the_run_with_an_error_not_a_hang(data):
    res = _train(data, ["--kill-rank", "1", "--at-step", "3"], ["--out", "killed", "--steps", "1000"])
    assert res.returncode != 0
    assert "error: rank 0 of 2 stopped at step 3" in res.stderr
    assert "another rank has most likely died" in res.stderr and "no training state was saved yet" in res.stderr
    assert "SIGKILL" in res.stderr  # torchrun names the rank that died and how


def test_a_non_finite_rank_makes_every_rank_skip_and_then_stop(data):
    res = _train(data, ["--nan-rank", "1", "--at-step", "2"],
                 ["--out", "nan", "--steps", "1000", "--max-consecutive-skips", "3"])
    assert res.returncode != 0
    stops = _last_steps(data)
    assert stops[0]["last_step"] == stops[1]["last_step"] == 5 and stops[0]["reason"] == "diverged"
    assert "skipped 3" in res.stdout and "training has diverged" in res.stdout


def test_distributed_encode_writes_every_file_once(tmp_path):
    torch.manual_seed(0)
    Music2Latent2(ModelConfig.from_preset("tiny")).save_pretrained(tmp_path / "model")
    rng = np.random.default_rng(0)
    names = [f"{'sub/' if i % 2 else ''}f{i}" for i in range(7)]
    for name in names:
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(tmp_path / "in" / f"{name}.wav"), 0.3 * rng.standard_normal(6000).astype(np.float32), 22050)
    cmd = ["-m", "music2latent2", "encode", "in", "-o", "out", "--model", "model", "--device", "cpu", "--threads", "1"]
    res = _torchrun(cmd, tmp_path)
    assert res.returncode == 0, res.stderr
    done = {}
    for rank in (0, 1):
        line = next(x for x in res.stderr.splitlines() if x.startswith(f"[rank {rank}/2] encode: "))
        done[rank] = int(line.split("encode: ")[1].split(" done")[0])
        assert f"(shard {rank}/2 of 7 files)" in line
    assert done[0] + done[1] == 7 and min(done.values()) > 0  # both ranks worked, no file twice
    assert "all 2 ranks: 7 done, 0 skipped (already done), 0 failed" in res.stderr
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.m2l")) == \
        sorted(f"{n}.m2l" for n in names)
    again = _torchrun(cmd, tmp_path)  # resumable: a finished run has nothing left to do
    assert again.returncode == 0 and "all 2 ranks: 0 done, 7 skipped" in again.stderr
    clash = _torchrun(cmd + ["--shard", "0/2"], tmp_path)
    assert clash.returncode != 0 and "--shard and torchrun's ranks would both split" in clash.stderr


def test_single_process_sigusr1_then_resume_is_bit_for_bit(data, monkeypatch):
    """The data of a step depends on the step alone, whatever the loader's workers."""
    step_on_device = Trainer.step_on_device
    handler_before = signal.getsignal(signal.SIGUSR1)

    def signal_at_step_3(self, wav):  # noqa: ANN001, ANN202
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)  # handled: the run stops after this step
        return step_on_device(self, wav)

    args = ["--data", str(data / "data"), *COMMON, "--steps", "6"]
    assert train_main(["train", *args, "--out", str(data / "whole")]) == 0
    monkeypatch.setattr(Trainer, "step_on_device", signal_at_step_3)
    workers = ["--workers", "2"]  # another worker count than the uninterrupted run's 0
    assert train_main(["train", *args, *workers, "--out", str(data / "cut")]) == 0
    with safe_open(str(data / "cut" / "state.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["info"])["step"] == 4  # the signal stopped it, after its step
    assert not (data / "cut" / "final").exists()
    assert signal.getsignal(signal.SIGUSR1) == handler_before  # the training put the old handler back
    monkeypatch.setattr(Trainer, "step_on_device", step_on_device)
    assert train_main(["train", "--out", str(data / "cut"), "--resume"]) == 0
    cut, whole = load_file(data / "cut" / "state.safetensors"), load_file(data / "whole" / "state.safetensors")
    for name in whole:
        assert torch.equal(cut[name], whole[name]), name


def test_step_batches_depend_on_the_step_only(data):
    crops = CropDataset([AudioSource(data / "data", 1.0)], 1, 4000)
    direct = [StepBatches(crops, 2, seed=5, start_step=0).batch(s) for s in range(6)]
    for workers, start in ((0, 0), (2, 0), (3, 2)):
        loader = iter(make_step_loader(StepBatches(crops, 2, seed=5, start_step=start), workers))
        for s in range(start, 6):
            assert torch.equal(next(loader), direct[s]), (workers, s)
    other_rank = StepBatches(crops, 2, seed=5, rank=1).batch(0)
    assert not torch.equal(other_rank, direct[0])


def test_launch_env_and_batch_split():
    assert launch_env({}) == LaunchEnv(0, 1, 0)
    env = launch_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert env.distributed and not env.is_main and env.tag() == "[rank 3/4] "
    with pytest.raises(ValueError, match="WORLD_SIZE='x' is not an integer"):
        launch_env({"WORLD_SIZE": "x"})
    with pytest.raises(ValueError, match="inconsistent launch environment"):
        launch_env({"RANK": "2", "WORLD_SIZE": "2"})
    cfg = TrainConfig(preset="tiny", model_overrides=json.loads(MICRO), batch_size=3, compile="off")
    with pytest.raises(ValueError, match="does not split evenly over 2 ranks"):
        Trainer(cfg, "cpu", ranks=Ranks(LaunchEnv(0, 2, 0), torch.device("cpu")))


def test_rank_shards_of_a_data_folder(tmp_path):
    for i in range(5):
        sf.write(str(tmp_path / f"{i}.wav"), np.full(100, 0.1, np.float32), 8000)
    shards = []
    for rank in range(2):
        source = AudioSource(tmp_path, 1.0)
        assert source.shard(rank, 2)
        shards.append([p.name for p in source.files])
    assert shards == [["0.wav", "2.wav", "4.wav"], ["1.wav", "3.wav"]]
    assert not AudioSource(tmp_path, 1.0).shard(0, 8)  # fewer files than ranks: every rank uses all
