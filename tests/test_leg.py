"""A training leg on a lent GPU (scripts/gpu/): the plan of its calls and what makes it NOT ok,
the wheels' tags, parking the bundled weights behind a pre-commit hook, the lease's end from
budget_left_s, when a call returns, a poll on a fresh machine, requested and final snapshots
coming back, keeping a reply without torch, continuation from a checkpoint's step and delta, and
the ship check. The whole sequence of calls is rehearsed by scripts/gpu/rehearse.sh (minutes,
not a test)."""

import gzip
import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
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
from music2latent2.training.pieces import SNAPSHOT_FORMAT, split_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "scripts" / "gpu"
LEG_SH = GPU / "leg.sh"
WEIGHTS = "music2latent2/weights/m2l2-small.safetensors"
WHEELS = ("cffi-2.0.0-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", "pycparser-2.23-py3-none-any.whl",
          "soundfile-0.13.1-py2.py3-none-manylinux_2_28_x86_64.whl",
          "soxr-1.0.0-cp312-abi3-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl")


def _load(name):
    sys.path.insert(0, str(GPU))
    spec = importlib.util.spec_from_file_location(f"m2l2_{name}", GPU / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"m2l2_{name}"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEG_") and k != "OUT"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _leg(args, root=ROOT, **extra):
    return subprocess.run(["bash", str(LEG_SH), *args], cwd=root, env=_env(LEG_ROOT=root, **extra),
                          capture_output=True, text=True, timeout=120)


def _plan(root, **extra):
    res = _leg(["plan", "--json"], root, **extra)
    return res, json.loads(res.stdout)


def _git(repo, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo,
                          capture_output=True, text=True)


def _repo(tmp_path, corpus_mib=170, part_mib=7.5):
    """A git checkout as a leg needs it: a 41 MiB stand-in for the bundled weights, wheels with
    the device's tags, wheels.txt, and a corpus packed into parts."""
    repo = tmp_path / "repo"
    weights = repo / WEIGHTS
    weights.parent.mkdir(parents=True)
    with open(weights, "wb") as f:
        f.truncate(43_027_932)  # sparse: the size is what counts
    (repo / "scripts" / "gpu").mkdir(parents=True)
    (repo / "scripts" / "gpu" / "wheels.txt").write_text((GPU / "wheels.txt").read_text())
    (repo / "README.md").write_text("x\n")
    (repo / ".gitignore").write_text("/.carry/\n/.whl/\n/.leg/\n/runs/\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "x")
    (repo / ".whl").mkdir()
    for name in WHEELS:
        (repo / ".whl" / name).write_bytes(b"w" * 450_000)
    corpus = tmp_path / "corpus" / "music"
    corpus.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(corpus_mib):
        (corpus / f"t{i:03d}.ogg").write_bytes(rng.bytes(2 ** 20))
    from music2latent2.training.corpus.parts import pack
    pack(corpus.parent, repo / ".carry", part_mib, log=lambda *_: None)
    return repo


# --------------------------------------------------------------------------- the plan
def test_a_ready_checkout_plans_few_calls_that_fit_train_and_bring_two_hours(tmp_path):
    repo = _repo(tmp_path)
    assert _leg(["park"], repo).returncode == 0
    res, plan = _plan(repo)
    assert res.returncode == 0 and plan["problems"] == [], plan["problems"]
    calls = {c["name"]: c for c in plan["calls"]}
    for c in plan["calls"]:
        assert c["total_mib"] <= 63 and len(c["carry"]) <= 8, c
    first = calls["call 1"]
    assert first["carry"][:2] == [".whl", WEIGHTS] and any(p.startswith(".carry/p") for p in first["carry"])
    assert first["tree_mib"] < 1  # the weights travel once, in call 1, not with the tree
    polls = [c for c in plan["calls"] if c["name"].startswith("poll")]
    assert polls and len({c["command"] for c in polls}) == 1  # one poll command, the same every time
    assert "LEG_BUDGET_LEFT_S=SECONDS_LEFT bash scripts/gpu/leg.sh poll" in polls[0]["command"]
    assert all(len(c["carry"]) == 8 for c in polls)  # polls bring corpus parts
    restart = calls["restart"]
    assert "runs/leg2/latest.safetensors" in restart["carry"] and WEIGHTS not in restart["carry"]
    assert "LEG_INIT=runs/leg2/latest.safetensors" in restart["command"]
    slow, fast = plan["timeline_slow"], plan["timeline_fast"]
    assert slow["train_minutes"] >= 8 and fast["train_minutes"] >= 11
    assert 2 <= slow["calls"] <= 3 and fast["calls"] <= 4  # 1-3 gaps in a window
    assert all(b - a <= 6.5 * 60 for a, b in zip(slow["returns_s"], slow["returns_s"][1:]))
    assert plan["data_hours"] >= 2 and plan["poll_back_files"] <= 8
    # Compile minutes are not training minutes.
    _, compiled = _plan(repo, LEG_COMPILE="on", LEG_COMPILE_DEADLINE_S=150)
    assert compiled["timeline_slow"]["train_minutes"] == pytest.approx(slow["train_minutes"] - 2.5, abs=0.01)
    # The next leg starts where this one stopped in the list of parts.
    _, third = _plan(repo, LEG_NUMBER=3)
    carried = [p for c in plan["calls"][:-1] for p in c["carry"] if p.startswith(".carry/p")]
    assert third["rotation_offset"] == len(carried) % plan["parts_total"]
    assert not set(carried[:2]) & {p for p in third["calls"][0]["carry"] if p.startswith(".carry/p")}
    text = _leg(["plan"], repo)
    assert text.returncode == 0 and text.stdout.rstrip().endswith("plan ok")


def test_plan_is_not_ok_without_wheels_parts_or_parking(tmp_path):
    repo = _repo(tmp_path, corpus_mib=20)

    def problems(**extra):
        res, plan = _plan(repo, **extra)
        assert (res.returncode == 1) == bool(plan["problems"])
        return " | ".join(plan["problems"])

    assert "still tracked" in problems()  # not parked: the weights would travel in every call
    assert _leg(["park"], repo).returncode == 0
    assert problems() == ""
    text = _leg(["plan"], repo, LEG_START_S=400)  # too few training minutes at a 400 s start
    assert text.returncode == 1 and "PROBLEM" in text.stdout and text.stdout.rstrip().endswith("plan NOT ok")
    wheels = repo / ".whl"
    (wheels / "soxr-0.5.0-cp312-cp312-manylinux_2_17_x86_64.whl").write_bytes(b"w")
    assert "holds soxr 0.5.0, 1.0.0" in problems() or "holds soxr 1.0.0, 0.5.0" in problems()
    (wheels / "soxr-0.5.0-cp312-cp312-manylinux_2_17_x86_64.whl").unlink()
    cffi = wheels / WHEELS[0]
    cffi.rename(wheels / "cffi-2.0.0-cp311-cp311-manylinux_2_17_x86_64.whl")  # fetched for this machine's Python
    assert "cannot install on the device" in problems()
    for f in wheels.iterdir():
        f.unlink()
    assert "lacks soundfile==0.13.1" in problems()
    for name in WHEELS:
        (wheels / name).write_bytes(b"w" * 450_000)
    big = repo / "runs" / "big.safetensors"  # a start file that fills call 1 to within a MiB of 64
    big.parent.mkdir()
    with open(big, "wb") as f:
        f.truncate(int(61.6 * 2 ** 20))
    assert "within 1 MiB of the 64 MiB limit" in problems(LEG_INIT="runs/big.safetensors")
    assert "not a file inside the checkout" in problems(LEG_INIT="runs/missing.safetensors")
    part = sorted((repo / ".carry").glob("p*"))[1]
    info = json.loads((part / "part.json").read_text())
    (part / "part.json").write_text(json.dumps({**info, "pack": "another"}))
    assert "mixes parts of 2 packs" in problems()
    for p in (repo / ".carry").iterdir():
        subprocess.run(["rm", "-r", str(p)], check=True)
    assert "no corpus parts" in problems()


def test_wheel_tags_are_read_as_the_devices_pip_reads_them():
    plan = _load("leg_plan")
    fits = plan.wheel_fits_device
    for name in WHEELS:
        assert fits(name) is None, name
    assert "CPython 3.12" in fits("cffi-2.0.0-cp311-cp311-manylinux_2_17_x86_64.whl")
    assert fits("soxr-1.0.0-cp310-abi3-manylinux_2_17_x86_64.whl") is None  # abi3 from 3.10 on runs on 3.12
    assert fits("soxr-1.0.0-cp313-abi3-manylinux_2_17_x86_64.whl") is not None
    assert "glibc" in fits("x-1.0-py3-none-manylinux_2_40_x86_64.whl")
    assert fits("x-1.0-py3-none-macosx_11_0_arm64.whl") is not None
    assert fits("x-1.0-py3-none-any.whl") is None and fits("not-a-wheel.zip") is not None


def test_a_call_returns_after_its_slice_or_waits_for_the_end():
    plan = _load("leg_plan")
    t = plan.Timing()  # poll 240 s, the end within 240 + 150 s: wait for it
    assert plan.call_deadline(1000, 1000 + 600, 240, t) == (1240, False)
    assert plan.call_deadline(1000, 1000 + 380, 240, t) == (1380, True)
    assert plan.call_deadline(1000, 1000 + 100, 240, t) == (1100, True)
    # Never past what one command may wait.
    assert plan.call_deadline(1000, 1000 + 700, 600, t) == (1000 + t.max_wait_s, False)


def test_park_guards_commits_with_a_hook_until_unpark(tmp_path):
    repo = _repo(tmp_path, corpus_mib=2, part_mib=1.5)
    assert _leg(["park"], repo).returncode == 0
    listed = _git(repo, "ls-files", "-co", "--exclude-standard").stdout.split()
    assert WEIGHTS not in listed and (repo / WEIGHTS).stat().st_size == 43_027_932  # not sent, still here
    (repo / "README.md").write_text("changed\n")
    _git(repo, "add", "README.md")
    commit = _git(repo, "commit", "-qm", "while parked")
    assert commit.returncode != 0 and "is parked" in commit.stderr
    assert WEIGHTS in _git(repo, "ls-tree", "-r", "--name-only", "HEAD").stdout  # the commit did not happen
    assert _leg(["unpark"], repo).returncode == 0
    assert _git(repo, "commit", "-qm", "after unpark").returncode == 0
    assert WEIGHTS in _git(repo, "ls-tree", "-r", "--name-only", "HEAD").stdout
    assert not (repo / ".git" / "hooks" / "pre-commit").exists()
    hook = repo / ".git" / "hooks" / "pre-commit"  # someone else's hook is never overwritten
    hook.write_text("#!/bin/sh\nexit 0\n")
    res = _leg(["park"], repo)
    assert res.returncode != 0 and "not leg.sh's" in res.stderr and hook.read_text() == "#!/bin/sh\nexit 0\n"


# --------------------------------------------------------------------------- the device side
def test_lease_end_counts_budget_left_and_the_time_since_the_last_call(tmp_path, monkeypatch):
    leg = _load("leg")
    for key in [k for k in os.environ if k.startswith("LEG_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("LEG_DIR", str(tmp_path))
    now = time.time()
    timing = leg.Timing()
    # Call 1, before any call on this machine: the slowest machine start is assumed as well.
    monkeypatch.setenv("LEG_BUDGET_LEFT_S", "900")
    end = leg.lease_end(timing, now - 10)
    assert end - now == pytest.approx(900 - (240 + 10 + 10) - 40, abs=2)
    # A poll: budget_left_s of the latest reply less what passed since the last call here ended.
    (tmp_path / "last_call_end").write_text(f"{now - 30}\n")
    monkeypatch.setenv("LEG_BUDGET_LEFT_S", "500")
    end = leg.lease_end(timing, now)
    assert end - now == pytest.approx(500 - 30 - 40, abs=2)
    assert float((tmp_path / "end_by").read_text()) == pytest.approx(end, abs=0.1)
    monkeypatch.setenv("LEG_BUDGET_LEFT_S", "SECONDS_LEFT")  # the placeholder left in by mistake
    with pytest.raises(SystemExit, match="budget_left_s"):
        leg.lease_end(timing, now)


def test_a_poll_on_a_fresh_machine_says_so_in_its_first_line(tmp_path):
    home = tmp_path / "leg"
    res = subprocess.run(["bash", str(LEG_SH), "poll"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env=_env(LEG_DIR=home, OUT=tmp_path / "out", LEG_BUDGET_LEFT_S=400))
    assert res.returncode == 3
    assert res.stdout.splitlines()[0].startswith("FRESH MACHINE: no leg runs here")
    assert "restart" in res.stdout.splitlines()[0]
    assert (home / "last_call_end").is_file()  # the restart counts its device time from here


FAKE_TRAINER = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[2])
from music2latent2.training.pieces import split_file
home, end_by = sys.argv[1], float(sys.argv[3])
run = os.path.join(home, "run", "snapshots")
os.makedirs(run, exist_ok=True)
open(os.path.join(home, "run", "log.jsonl"), "w").write('{"step": 1}\n')
open(os.path.join(home, "compile_cache.bin"), "wb").write(b"kernels" * 1000)
open(os.path.join(home, "compile_cache.bin.json"), "w").write('{"device": "NVIDIA H100", "torch": "2.11.0"}')
step, answered = 0, None

def snapshot(token, final):
    from pathlib import Path
    folder = Path(run) / f"step-{step:08d}"
    folder.mkdir(exist_ok=True)
    blob = folder / "model.safetensors"
    blob.write_bytes(os.urandom(3000))
    import hashlib
    sha = hashlib.sha256(blob.read_bytes()).hexdigest()
    pieces = split_file(blob, folder, 1000)
    blob.unlink()
    json.dump({"format": "music2latent2-snapshot-1", "file": "model.safetensors", "size": 3000, "sha256": sha,
               "step": step, "final": final, "request": token, "pieces": pieces}, open(folder / "pieces.json", "w"))
    open(os.path.join(run, "LATEST"), "w").write(folder.name + "\n")

while time.time() < end_by:
    step += 1
    try:
        token = open(os.path.join(home, "snapshot_request")).read().strip()
    except OSError:
        token = None
    if token and token != answered:
        answered = token
        snapshot(token, False)
    time.sleep(0.05)
step += 1
snapshot(answered, True)
time.sleep(1.5)  # still saving its state when the final snapshot is there
"""


def test_polls_return_a_requested_snapshot_then_the_final_one(tmp_path):
    home, cache_dir = tmp_path / "leg", tmp_path / "device-cache"
    home.mkdir()
    end_by = time.time() + 6
    (home / "end_by").write_text(f"{end_by}\n")
    trainer = subprocess.Popen([sys.executable, "-c", FAKE_TRAINER, str(home), str(ROOT), str(end_by)],
                               start_new_session=True)
    (home / "pid").write_text(f"{trainer.pid}\n")
    timing = dict(LEG_POLL_S=1, LEG_MIN_LAST_S=0, LEG_SNAPSHOT_S=1, LEG_TAIL_S=0, LEG_MAX_WAIT_S=30)

    def poll(n, **extra):
        out = tmp_path / f"out{n}"
        res = subprocess.run(["bash", str(LEG_SH), "poll"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                             env=_env(LEG_DIR=home, OUT=out, LEG_CARRY_DIR=tmp_path / "no-parts",
                                      LEG_CACHE_DIR=cache_dir, **timing, **extra))
        return res, out

    # budget_left_s far beyond the trainer's own end: the poll takes its 1 s slice and asks.
    res, out = poll(1, LEG_BUDGET_LEFT_S=10 ** 6)
    assert res.returncode == 0, res.stdout + res.stderr
    index = json.loads((out / "pieces.json").read_text())
    assert index["format"] == SNAPSHOT_FORMAT and index["request"] and not index["final"]
    names = {p.name for p in out.iterdir()}
    assert names == {"pieces.json", "model.safetensors.000", "model.safetensors.001", "model.safetensors.002",
                     "log.jsonl", "train_tail.txt", "compile-cache.tar.gz"}
    with tarfile.open(out / "compile-cache.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["compile_cache.bin", "compile_cache.bin.json"]
    assert "training: running" in res.stdout
    # Now the end is near: the poll waits for the final snapshot, and the cache is not sent twice.
    (home / "end_by").write_text(f"{end_by}\n")
    res, out = poll(2, LEG_BUDGET_LEFT_S=1)
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads((out / "pieces.json").read_text())["final"]
    assert "compile-cache.tar.gz" not in {p.name for p in out.iterdir()}
    assert "training: finished" in res.stdout
    trainer.wait(timeout=30)


SLOW_COMPILER = r"""
import sys, time
if sys.argv[sys.argv.index("--compile") + 1] == "on":
    print("speed: eager 2.50 steps/s = 80.0 samples/s (steps 5-30 of this run)", flush=True)
    print("compiling the training loss (step 31)", flush=True)
    time.sleep(60)  # a compile that would outlive the deadline
    sys.exit(5)
assert "--compile-after" not in sys.argv and "--compile-cache" not in sys.argv
print("eager run", " ".join(sys.argv[1:]), flush=True)
"""


def test_the_supervisor_stops_a_compile_past_its_deadline_and_goes_on_eagerly(tmp_path):
    home = tmp_path / "leg"
    (home / "run").mkdir(parents=True)
    (home / "run" / "log.jsonl").write_text("{}\n")
    cmd = [sys.executable, "-c", SLOW_COMPILER, "--compile", "on", "--compile-after", "30", "--compile-cache", "c.bin",
           "--seed", "2"]
    (home / "train_cmd.json").write_text(json.dumps(cmd))
    t0 = time.time()
    with open(home / "train.log", "wb") as log:
        res = subprocess.run([sys.executable, str(GPU / "leg.py"), "supervise"], stdout=log, stderr=subprocess.STDOUT,
                             env=_env(LEG_DIR=home, LEG_COMPILE_DEADLINE_S=1), timeout=60)
    assert res.returncode == 0 and time.time() - t0 < 20  # not the 60 s the compile would have taken
    text = (home / "train.log").read_text()
    assert "compile deadline passed (1 s, LEG_COMPILE_DEADLINE_S)" in text
    assert "eager run --seed 2 --compile off" in text
    assert (home / "exit_code").read_text().strip() == "0"  # the eager run's status, not the killed one's
    assert json.loads((home / "supervisor.json").read_text())["eager_samples_per_s"] == 80.0
    assert (home / "run-compiling" / "log.jsonl").is_file()  # the stopped run's files, out of the new run's way


def test_the_supervisor_knows_the_trainers_compile_lines():
    from music2latent2.training import compiling
    leg = _load("leg")
    assert (leg.COMPILE_START, leg.COMPILE_DONE) == (compiling.COMPILE_START, compiling.COMPILE_DONE)


def test_keep_joins_a_reply_without_torch_and_keeps_the_cache(tmp_path):
    pieces_module = _load("leg")._pieces()
    reply = tmp_path / "reply"
    reply.mkdir()
    blob = tmp_path / "model.safetensors"
    blob.write_bytes(np.random.default_rng(0).bytes(5000))
    import hashlib
    pieces = split_file(blob, reply, 2000)
    index = {"format": SNAPSHOT_FORMAT, "file": "model.safetensors", "size": 5000, "step": 7, "final": False,
             "sha256": hashlib.sha256(blob.read_bytes()).hexdigest(), "pieces": pieces}
    (reply / "pieces.json").write_text(json.dumps(index))
    (reply / "log.jsonl").write_text('{"step": 7}\n')
    environment = json.dumps({"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130"}).encode()
    with tarfile.open(reply / "compile-cache.tar.gz", "w:gz") as tar:
        for name, data in (("compile_cache.bin", gzip.compress(b"k" * 100)), ("compile_cache.bin.json", environment)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    into = tmp_path / "runs" / "leg2"
    script = ("import runpy, sys; sys.argv = ['leg.py', 'keep', sys.argv[1], '--into', sys.argv[2]]\n"
              "try:\n    runpy.run_path(%r, run_name='__main__')\n"
              "except SystemExit as e:\n    assert not e.code, e.code\n"
              "assert 'torch' not in sys.modules and 'music2latent2' not in sys.modules, 'keep imported torch'\n"
              % str(GPU / "leg.py"))
    env = _env(LEG_CACHE_DIR=tmp_path / "cache", LEG_ROOT=ROOT)
    res = subprocess.run([sys.executable, "-c", script, str(reply), str(into)], capture_output=True, text=True,
                         env=env, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (into / "latest.safetensors").read_bytes() == blob.read_bytes()
    assert (into / "step-00000007.safetensors").is_file() and (into / "poll-01" / "pieces.json").is_file()
    assert (into / "log.jsonl").is_file()
    kept = list((tmp_path / "cache").glob("*.tar.gz"))
    assert [p.name for p in kept] == ["NVIDIA-H100-80GB-HBM3--torch-2.11.0-cu130.tar.gz"]
    # A corrupt piece: refused, and latest.safetensors stays what it was.
    bad = reply / pieces[1]["name"]
    bad.write_bytes(b"x" + bad.read_bytes()[1:])
    res = subprocess.run([sys.executable, str(GPU / "leg.py"), "keep", str(reply), "--into", str(into)],
                         capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode != 0 and "corrupt" in res.stderr and "latest.safetensors is unchanged" in res.stderr
    assert (into / "latest.safetensors").read_bytes() == blob.read_bytes()
    assert pieces_module.PIECES_NAME == "pieces.json"


# --------------------------------------------------------------------------- continuation, ship check
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


