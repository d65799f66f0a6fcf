"""A 15-minute training leg: the plan of its calls (scripts/gpu/leg.py), parking the bundled
weights, the lease's end, continuation from a checkpoint's step and delta, and the ship check.
The whole sequence of calls is rehearsed by scripts/gpu/rehearse.sh (minutes, not a test)."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from test_training import MICRO, _config

from music2latent2 import ModelConfig, Music2Latent2
from music2latent2.checkpoint import read_metadata
from music2latent2.training import Trainer
from music2latent2.training.__main__ import continuation, ship_decision
from music2latent2.training.__main__ import main as train_main
from music2latent2.training.export import export_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
LEG_SH = ROOT / "scripts" / "gpu" / "leg.sh"
CALL_LINE = re.compile(r"^call (\d+): tree ([\d.]+) MiB \+ carry ([\d.]+) MiB = ([\d.]+) MiB")


def _leg_module():
    spec = importlib.util.spec_from_file_location("m2l2_leg", ROOT / "scripts" / "gpu" / "leg.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["m2l2_leg"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _plan(env_extra=None, root=ROOT):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEG_")}
    env.update(env_extra or {})
    return subprocess.run(["bash", str(LEG_SH), "plan"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=60)


def _check_calls(text):
    calls = [CALL_LINE.match(line) for line in text.splitlines() if CALL_LINE.match(line)]
    assert calls, text
    for m in calls:
        tree, carry, total = (float(m.group(i)) for i in (2, 3, 4))
        assert total <= 64 and abs(tree + carry - total) <= 0.11, m.group(0)
    minutes = float(re.search(r"^training: ([\d.]+) min planned", text, re.M).group(1))
    return calls, minutes


def test_plan_of_this_checkout_fits_every_call_and_trains_nine_minutes():
    res = _plan()
    assert res.returncode == 0, res.stdout + res.stderr
    calls, minutes = _check_calls(res.stdout)
    assert minutes >= 9 and "plan ok" in res.stdout
    first = res.stdout.split("call 2:")[0]
    assert "music2latent2/weights/m2l2-small.safetensors" in first and "leg.sh start" in first
    # Every later call is a poll that moves the end to where the lease's held_s puts it.
    later = res.stdout.split("call 2:", 1)[1]
    assert later.count("LEG_HELD_S=HELD_SECONDS bash scripts/gpu/leg.sh poll") == len(calls) - 1


def test_plan_refuses_a_layout_that_does_not_fit():
    res = _plan({"LEG_START_S": "400"})  # a 400 s machine start leaves too few training minutes
    assert res.returncode == 1 and "PROBLEM" in res.stdout and "plan NOT ok" in res.stdout


def _repo(tmp_path):
    """A git checkout with a 41 MiB stand-in for the bundled weights and packed corpus parts."""
    repo = tmp_path / "repo"
    weights = repo / "music2latent2" / "weights" / "m2l2-small.safetensors"
    weights.parent.mkdir(parents=True)
    with open(weights, "wb") as f:
        f.truncate(43_027_932)  # sparse: the size is what counts
    (repo / "README.md").write_text("x\n")
    (repo / ".gitignore").write_text("/.carry/\n/.whl/\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], cwd=repo, check=True)
    subprocess.run(git + ["add", "."], cwd=repo, check=True)
    subprocess.run(git + ["commit", "-qm", "x"], cwd=repo, check=True)
    corpus = tmp_path / "corpus" / "music"
    corpus.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(60):
        (corpus / f"t{i:02d}.ogg").write_bytes(rng.bytes(1_000_000))
    from music2latent2.training.corpus.parts import pack
    pack(corpus.parent, repo / ".carry", 3.5, log=lambda *_: None)
    return repo


def test_plan_packs_parts_into_calls_rotates_them_and_park_unpark(tmp_path):
    repo = _repo(tmp_path)
    env = {"LEG_ROOT": str(repo)}
    res = _plan(env, root=repo)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "still tracked: run `bash scripts/gpu/leg.sh park`" in res.stdout
    calls, _ = _check_calls(res.stdout)
    first = res.stdout.split("call 2:")[0]
    carried = json.loads(re.search(r"carry +(\[.*\])", first).group(1))
    parts = [p for p in carried if p.startswith(".carry/p")]
    assert len(parts) >= 4 and len(carried) <= 8  # the room next to the weights goes to data
    assert float(calls[0].group(2)) < 1  # the tree leaves the weights out: they travel once, in call 1
    rotated = _plan({**env, "LEG_NUMBER": "3"}, root=repo).stdout
    later = json.loads(re.search(r"carry +(\[.*\])", rotated.split("call 2:")[0]).group(1))
    assert not set(parts) & {p for p in later if p.startswith(".carry/p")}  # leg 3 carries other parts

    weights = "music2latent2/weights/m2l2-small.safetensors"
    leg = ["bash", str(LEG_SH)]
    park_env = dict(os.environ, LEG_ROOT=str(repo))
    subprocess.run(leg + ["park"], cwd=repo, env=park_env, check=True, capture_output=True)
    tracked = subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True, text=True).stdout.split()
    assert weights not in tracked and (repo / weights).stat().st_size == 43_027_932
    assert subprocess.run(["git", "check-ignore", "-q", weights], cwd=repo).returncode == 0
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=repo, capture_output=True,
                            text=True).stdout.split()
    assert weights not in listed  # what the device tool sends
    assert "still tracked" not in _plan(env, root=repo).stdout
    subprocess.run(leg + ["unpark"], cwd=repo, env=park_env, check=True, capture_output=True)
    assert subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True,
                          text=True).stdout.strip() == ""


def test_lease_end_counts_held_s_and_the_time_since_the_last_call(tmp_path, monkeypatch):
    leg = _leg_module()
    monkeypatch.setenv("LEG_DIR", str(tmp_path))
    for key in [k for k in os.environ if k.startswith("LEG_") and k != "LEG_DIR"]:
        monkeypatch.delenv(key)
    now = time.time()
    (tmp_path / "last_call_end").write_text(f"{now - 30}\n")
    monkeypatch.setenv("LEG_HELD_S", "100")
    end = leg.lease_end(leg.Timing())
    # 900 s budget - (100 s held + 30 s since that reply) - 45 s tail
    assert end - now == pytest.approx(900 - 130 - 45, abs=2)
    assert float((tmp_path / "end_by").read_text()) == pytest.approx(end, abs=0.1)
    # Call 1, before any reply: the slowest machine start is assumed, measured from setup's start.
    monkeypatch.delenv("LEG_HELD_S")
    (tmp_path / "first_command").write_text(f"{now - 10}\n")
    end = leg.lease_end(leg.Timing())
    assert end - now == pytest.approx(900 - (240 + 10 + 10) - 45, abs=2)
    monkeypatch.setenv("LEG_HELD_S", "soon")
    with pytest.raises(SystemExit, match="held_s"):
        leg.lease_end(leg.Timing())


def test_continuation_reads_step_and_delta_from_the_metadata():
    assert continuation({"training_step": "2685", "training_delta": "0.0286"}, None, None, 0.01)[:3] == \
        (2685, 0.0286, 0.01)
    assert continuation({"training_step": "2685", "training_delta": "0.0286"}, 7, 0.5, 0.01)[:3] == (7, 0.5, 0.01)
    step, delta, end, notes = continuation({}, None, None, 0.01)
    assert (step, delta, end) == (0, 0.1, 0.01) and len(notes) == 2
    # Already below --delta-end: it stays where it is rather than growing again.
    assert continuation({"training_delta": "0.005"}, None, None, 0.01)[1:3] == (0.005, 0.005)


def test_bundled_weights_record_where_their_training_stopped():
    meta = read_metadata(ROOT / "music2latent2" / "weights" / "m2l2-small.safetensors")
    # Leg 1: delta 1 -> 0.01 over 3,478 planned steps, stopped at step 2,685.
    assert meta["training_step"] == "2685"
    assert float(meta["training_delta"]) == pytest.approx(0.01 ** (2685 / 3478))


def test_cli_continues_step_and_delta_of_an_init_checkpoint(tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    sf.write(str(data / "x.flac"), 0.3 * rng.standard_normal(30000).astype(np.float32), 44100)
    donor = Trainer(_config())
    ckpt = export_checkpoint(donor.ema, tmp_path / "shipped", dtype=torch.float16, step=40, delta=0.05)
    run = tmp_path / "leg"
    assert train_main(["train", "--data", str(data), "--out", str(run), "--init-from", str(ckpt), "--more-steps", "4",
                       "--batch-size", "2", "--warmup", "1", "--workers", "0", "--cache-gb", "0.01",
                       "--log-every", "2", "--save-every", "100", "--eval-every", "100", "--delta-end", "0.01",
                       "--precision", "fp32", "--snapshot-minutes", "100"]) == 0
    out = capsys.readouterr().out
    assert "training_step 40" in out and "training_delta 0.05" in out
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [42, 44]
    assert log[0]["delta"] == pytest.approx(0.05 * (0.01 / 0.05) ** 0.25)  # step 41 of 40 -> 44
    meta = read_metadata(run / "final")
    assert meta["training_step"] == "44" and float(meta["training_delta"]) == pytest.approx(0.01)
    with pytest.raises(SystemExit, match="--end-by leaves"):  # an end already past: refused, not run
        train_main(["train", "--data", str(data), "--out", str(tmp_path / "late"), "--init-from", str(ckpt),
                    "--more-steps", "4", "--batch-size", "2", "--workers", "0", "--cache-gb", "0.01",
                    "--end-by", str(time.time())])
    with pytest.raises(SystemExit, match="not beyond the start step"):
        train_main(["train", "--data", str(data), "--out", str(tmp_path / "b"), "--init-from", str(ckpt),
                    "--steps", "30"])


def test_trained_summary_tokens_are_kept_on_continuation():
    torch.manual_seed(3)
    source = Music2Latent2(ModelConfig.from_preset("tiny", **MICRO))
    source.init_summary_tokens(0.5, torch.Generator().manual_seed(1))  # a run already at that scale
    trainer = Trainer(_config(summary_init_std=0.5))
    assert trainer.init_weights_from(source) is False
    assert torch.equal(trainer.model.encoder.summary_tokens, source.encoder.summary_tokens)
    small = Music2Latent2(ModelConfig.from_preset("tiny", **MICRO))  # the modules' own small init
    assert Trainer(_config(summary_init_std=0.5)).init_weights_from(small) is True


def test_end_file_moves_the_budget_and_relays_the_schedules(tmp_path):
    from music2latent2.training.trainer import _EndFile

    trainer = Trainer(_config(total_steps=1000, reserve_minutes=0.5, max_minutes=20))
    begin = time.time()
    path = tmp_path / "end_by"
    path.write_text(f"{begin + 60}\n")
    ender = _EndFile(str(path), begin)
    ender.apply(trainer, None, 0.0)  # before the speed is known: only the budget moves
    assert trainer.config.max_minutes == pytest.approx(1.0) and trainer.config.total_steps == 1000
    path.write_text(f"{begin + 120}\n")
    ender.apply(trainer, 10.0, 30.0)  # 10 steps/s, 30 s spent: (2 - 0.5) min - 30 s = 60 s left
    assert trainer.config.max_minutes == pytest.approx(2.0)
    assert trainer.config.total_steps == trainer.step + 600
    path.write_text("half-writ")  # unreadable: the last value stands
    ender.apply(trainer, 10.0, 31.0)
    assert trainer.config.total_steps == trainer.step + 600


def _report(logmel, visqol, band, level, files=("a.flac",)):
    return {"files": [{"file": f, "seconds": 10.0} for f in files], "decoding": {"denoising_steps": 2},
            "mean": {"logmel_distance": logmel, "visqol": visqol, "band_level_error_db": band, "level_db": level}}


def test_ship_check_needs_better_log_mel_and_nothing_worse(tmp_path):
    shipped = _report(1.0, 3.0, 5.0, -9.0)
    assert ship_decision(_report(0.9, 3.01, 5.1, -8.0), shipped)[0]
    assert not ship_decision(_report(1.01, 3.5, 2.0, 0.0), shipped)[0]  # log-mel decides first
    assert not ship_decision(_report(0.9, 2.9, 5.0, -9.0), shipped)[0]  # ViSQOL worse
    assert not ship_decision(_report(0.9, 3.0, 6.0, -9.0), shipped)[0]  # a band further off
    assert ship_decision(_report(0.9, None, 5.0, -9.0), shipped)[0]  # ViSQOL not measured on one side
    with pytest.raises(SystemExit, match="not comparable"):
        ship_decision(_report(0.9, 3.0, 5.0, -9.0, files=("b.flac",)), shipped)
    (tmp_path / "c").mkdir()
    (tmp_path / "s").mkdir()
    (tmp_path / "c" / "results.json").write_text(json.dumps(_report(0.9, 3.01, 5.1, -8.0)))
    (tmp_path / "s" / "results.json").write_text(json.dumps(shipped))
    assert train_main(["ship-check", str(tmp_path / "c"), str(tmp_path / "s")]) == 0
    assert train_main(["ship-check", str(tmp_path / "s"), str(tmp_path / "c")]) == 3


def test_poll_returns_the_snapshot_logs_and_the_compile_cache_once(tmp_path, monkeypatch):
    leg = _leg_module()
    for key in [k for k in os.environ if k.startswith("LEG_")]:
        monkeypatch.delenv(key)
    home = tmp_path / "leg"
    snap = home / "run" / "snapshots" / "step-00000042"
    snap.mkdir(parents=True)
    for name in ("model.safetensors.000", "model.safetensors.001", "pieces.json"):
        (snap / name).write_bytes(b"x" * 100)
    (home / "run" / "snapshots" / "LATEST").write_text("step-00000042\n")
    (home / "run" / "log.jsonl").write_text('{"step": 42}\n')
    (home / "train.log").write_text("step 42/42\n")
    (home / "compile_cache.bin").write_bytes(b"kernels" * 1000)
    done = subprocess.Popen(["true"])
    done.wait()  # a trainer that has ended
    (home / "pid").write_text(f"{done.pid}\n")
    (home / "exit_code").write_text("0\n")
    monkeypatch.setenv("LEG_DIR", str(home))
    for n, expect_cache in ((1, True), (2, False)):
        out = tmp_path / f"out{n}"
        monkeypatch.setenv("OUT", str(out))
        assert leg.main(["poll", "5"]) == 0
        names = sorted(p.name for p in out.iterdir())
        expected = {"model.safetensors.000", "model.safetensors.001", "pieces.json", "log.jsonl", "train_tail.txt"}
        assert set(names) == expected | ({leg.CACHE_NAME} if expect_cache else set())
    import gzip
    assert gzip.decompress((tmp_path / "out1" / leg.CACHE_NAME).read_bytes()) == b"kernels" * 1000
    (home / "exit_code").write_text("1\n")  # a failed run: the poll still returns its files, and fails
    monkeypatch.setenv("OUT", str(tmp_path / "out3"))
    assert leg.main(["poll", "5"]) == 1 and (tmp_path / "out3" / "pieces.json").is_file()
