#!/usr/bin/env python3
"""One training leg on a lent GPU: its plan, made here, and every step of it on the device.

A leg has the session's device-minutes (15), machine start (1-4 min), transfers and idle time
included; at most 64 MiB travel per call and 8 files of 16 MiB come back; the machine goes back
30 s after a call ends, with whatever trained since the last snapshot that came home. So the
trainer runs detached from call 1 to the lease's end, and every call returns fresh weights:

    call 1   start: wheels, code, the weights to start from (sent once), corpus parts, a compile
             cache made on this GPU and torch (if compiling); training starts; the call waits
             LEG_FIRST_S, asks the trainer for a snapshot and returns it
    poll     the same command each time: more corpus parts (the running loader takes them in), the
             end moved to where budget_left_s puts it, a wait of LEG_POLL_S (or, when little is
             left, until the end), a requested snapshot returned; its first line says FRESH
             MACHINE when the leg's machine went back
    restart  call 1 again with the last kept snapshot: after FRESH MACHINE, at once

The bundled weights (41 MiB) would otherwise travel in every call as a tracked file: ``park``
takes them out of git's index (the file stays where it is), ignores them locally and installs a
pre-commit hook that refuses any commit while they are parked; ``unpark`` undoes all three.

Here:   plan [--json] | park | unpark | keep FILES_AT [--into runs/legN] | verify runs/legN
Device: start | poll

Environment (defaults): LEG_NUMBER (2), LEG_INIT (m2l2-small; "none": fresh; or a kept snapshot),
LEG_BUDGET_LEFT_S (the budget_left_s of the latest reply, or of status before call 1), LEG_PRESET
(small), LEG_BATCH (32), LEG_WORKERS (12), LEG_COMPILE (off | on), LEG_COMPILE_AFTER (30),
LEG_COMPILE_DEADLINE_S (150), LEG_DIR (/tmp/leg), CORPUS_DIR (/tmp/corpus), LEG_CARRY_DIR (.carry),
LEG_CACHE_DIR (.leg/compile-cache), LEG_GPU (H100: the compile cache to carry), OUT (set by the
device tool). The timing assumptions are the LEG_*_S variables of ``leg_plan.Timing``.
scripts/gpu/README.md is the checklist that uses all this.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from leg_plan import (  # noqa: E402  (scripts/gpu/leg_plan.py)
    CACHE_BACK,
    DATA_SPECS,
    EXIT_FRESH,
    FILE_BACK_MIB,
    MAX_FILES_BACK,
    MIB,
    PARKED,
    PIECE_MIB,
    RESERVE_MINUTES,
    Timing,
    cache_slug,
    call_deadline,
    env,
    env_float,
    is_parked,
    make_plan,
    print_plan,
    read_cache_environment,
)

# The trainer's lines around its first compiled step (music2latent2/training/compiling.py; a test
# checks that both sides agree: this script imports nothing of the package).
COMPILE_START = "compiling the training loss"
COMPILE_DONE = "compiled the training loss in"
COMPILE_DEADLINE_LINE = "compile deadline passed"
ROOT = Path(os.environ.get("LEG_ROOT") or Path(__file__).resolve().parents[2])  # LEG_ROOT: tests
HOOK_MARK = "# music2latent2: leg.sh park"


def _pieces() -> ModuleType:
    """music2latent2/training/pieces.py, loaded by path: it needs neither torch nor the package,
    so joining a snapshot here takes a fraction of a second."""
    path = ROOT / "music2latent2" / "training" / "pieces.py"
    spec = importlib.util.spec_from_file_location("m2l2_pieces", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _replace_file(src: Path, target: Path) -> None:
    """Copy ``src`` over ``target`` so that ``target`` is never partial (temp file, rename)."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- here: plan, park, keep
def cmd_plan(args: argparse.Namespace) -> int:
    plan = make_plan(ROOT, Timing.from_env(), int(env_float("LEG_NUMBER", 2)))
    if args.json:
        print(json.dumps(plan, indent=1))
    else:
        print_plan(plan)
    return 1 if plan["problems"] else 0


def _git_dir() -> Path:
    out = subprocess.run(["git", "rev-parse", "--git-common-dir"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    return (ROOT / out).resolve()


def _hook() -> Path:
    return _git_dir() / "hooks" / "pre-commit"


HOOK = f"""#!/bin/sh
{HOOK_MARK} (removed by leg.sh unpark)
# While the bundled weights are parked they are out of git's index: a commit now would delete them.
if ! git ls-files --error-unmatch -- {PARKED} >/dev/null 2>&1 && git cat-file -e HEAD:{PARKED} 2>/dev/null; then
    echo "refused: {PARKED} is parked (bash scripts/gpu/leg.sh park); run 'bash scripts/gpu/leg.sh unpark' first" >&2
    exit 1
fi
"""


def cmd_park(args: argparse.Namespace) -> int:
    if not (ROOT / PARKED).is_file():
        raise SystemExit(f"{PARKED} is missing: nothing to park")
    hook = _hook()
    if hook.exists() and HOOK_MARK not in hook.read_text(errors="replace"):
        raise SystemExit(f"{hook} exists and is not leg.sh's: parking needs its own pre-commit hook "
                         "(the guard that keeps a commit from deleting the parked weights)")
    hook.parent.mkdir(parents=True, exist_ok=True)
    hook.write_text(HOOK)
    hook.chmod(0o755)
    exclude = _git_dir() / "info" / "exclude"
    line = f"/{PARKED}"
    lines = exclude.read_text().splitlines() if exclude.is_file() else []
    if line not in lines:
        exclude.parent.mkdir(parents=True, exist_ok=True)
        exclude.write_text("\n".join(lines + [line]) + "\n")
    if not is_parked(ROOT):
        subprocess.run(["git", "rm", "--cached", "-q", "--", PARKED], cwd=ROOT, check=True)
    print(f"parked {PARKED}: out of the index and ignored, the file itself untouched; a pre-commit hook "
          "refuses commits until `bash scripts/gpu/leg.sh unpark`")
    return 0


def cmd_unpark(args: argparse.Namespace) -> int:
    exclude = _git_dir() / "info" / "exclude"
    if exclude.is_file():
        kept = [x for x in exclude.read_text().splitlines() if x != f"/{PARKED}"]
        exclude.write_text("\n".join(kept) + ("\n" if kept else ""))
    if is_parked(ROOT):
        subprocess.run(["git", "reset", "-q", "--", PARKED], cwd=ROOT, check=True)
    if is_parked(ROOT):
        raise SystemExit(f"{PARKED} is still not in the index")
    hook = _hook()
    if hook.is_file() and HOOK_MARK in hook.read_text(errors="replace"):
        hook.unlink()
    print(f"unparked {PARKED}: tracked again")
    return 0


def cmd_keep(args: argparse.Namespace) -> int:
    """Copy one reply's files out of the tool's folder, join the snapshot in them (sizes and
    sha256 checked, standard library only) into ``latest.safetensors``, and keep a compile cache.
    Nothing here waits for torch: the strict load is ``verify``'s, after the window."""
    t0 = time.perf_counter()
    src = Path(args.files_at)
    into = Path(args.into) if args.into else ROOT / env("LEG_KEEP_DIR", f"runs/leg{int(env_float('LEG_NUMBER', 2))}")
    if not src.is_dir():
        raise SystemExit(f"{src} is not a folder")
    into.mkdir(parents=True, exist_ok=True)
    number = 1 + max((int(p.name[5:]) for p in into.glob("poll-*") if p.name[5:].isdigit()), default=0)
    dest = into / f"poll-{number:02d}"
    shutil.copytree(src, dest)
    for name in ("log.jsonl", "train_tail.txt"):
        if (dest / name).is_file():
            _replace_file(dest / name, into / name)
    said = []
    cache = dest / CACHE_BACK
    if cache.is_file():
        made = read_cache_environment(cache) or {}
        target = ROOT / env("LEG_CACHE_DIR", ".leg/compile-cache") / \
            f"{cache_slug(str(made.get('device')), str(made.get('torch')))}.tar.gz"
        target.parent.mkdir(parents=True, exist_ok=True)
        _replace_file(cache, target)
        said.append(f"compile cache ({made.get('device')}, torch {made.get('torch')}) -> {target}")
    pieces = _pieces()
    if (dest / pieces.PIECES_NAME).is_file():
        index = pieces.read_index(dest)
        step_file = into / f"step-{index['step']:08d}.safetensors"
        try:
            pieces.join_pieces(dest, step_file)
        except pieces.PiecesError as err:
            raise SystemExit(f"not kept: {err} (latest.safetensors is unchanged)") from None
        _replace_file(step_file, into / "latest.safetensors")
        said.append(f"kept step {index['step']}{' (final)' if index.get('final') else ''}: {step_file} "
                    f"(sha256 {index['sha256'][:16]}...) = {into / 'latest.safetensors'}")
    else:
        said.append(f"kept {dest} (no snapshot in it)")
    print("\n".join(said) + f"\n({time.perf_counter() - t0:.2f} s)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """After the window: load the kept checkpoint strictly (config, names, shapes, finite values)."""
    path = Path(args.folder) / "latest.safetensors"
    sys.path.insert(0, str(ROOT))
    from music2latent2 import Music2Latent2
    from music2latent2.checkpoint import read_metadata, sha256_file

    Music2Latent2.from_pretrained(path)
    meta = read_metadata(path)
    print(f"{path}: loads strictly; step {meta.get('training_step')}, delta {meta.get('training_delta')}, "
          f"sha256 {sha256_file(path)}")
    return 0


# --------------------------------------------------------------------------- device side
def leg_dir() -> Path:
    return Path(env("LEG_DIR", "/tmp/leg"))


def corpus_dir() -> Path:
    return Path(env("CORPUS_DIR", "/tmp/corpus"))


def out_dir() -> Path:
    out = Path(env("OUT", str(leg_dir() / "out")))
    out.mkdir(parents=True, exist_ok=True)
    return out


def child_env() -> Dict[str, str]:
    leg = leg_dir()
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(leg / "site"), str(leg / "code")] +
                                      ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    e["PYTHONUNBUFFERED"] = "1"
    return e


def python() -> str:
    return env("LEG_PYTHON", sys.executable)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (our own child in the rehearsal) counts as ended
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _trainer_pid() -> Optional[int]:
    pid_file = leg_dir() / "pid"
    return int(pid_file.read_text()) if pid_file.is_file() else None


def _tail(path: Path, lines: int) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def unpack_new_parts() -> int:
    """Unpack every corpus part in the carry folder not unpacked on this machine yet, then touch
    the trainer's watch file. Returns how many were unpacked."""
    leg, corpus = leg_dir(), corpus_dir()
    done_file = leg / "unpacked.json"
    done = set(json.loads(done_file.read_text())) if done_file.is_file() else set()
    new = []
    for part in sorted(Path(env("LEG_CARRY_DIR", ".carry")).glob("p*")):
        try:
            key = json.loads((part / "part.json").read_text())["sha256"]
        except (OSError, ValueError, KeyError):
            continue
        if key not in done:
            new.append((part, key))
    for part, key in new:
        subprocess.run([python(), "-m", "music2latent2.training.corpus", "unpack", str(part), "--into", str(corpus)],
                       check=True, env=child_env())
        done.add(key)
        done_file.write_text(json.dumps(sorted(done)) + "\n")
    if new:
        corpus.mkdir(parents=True, exist_ok=True)
        (corpus / "ARRIVED").write_text(f"{len(done)} parts, {time.time():.3f}\n")
    return len(new)


def lease_end(timing: Timing, command_start: float) -> float:
    """Write (and return) the UNIX time training must end by: the device time left less the
    tail. Left = LEG_BUDGET_LEFT_S (the budget_left_s of the latest reply) less what passed on
    this machine since the previous call on it ended (the gap, this call's transfer, this command
    so far). With no earlier call on this machine (call 1), the slowest machine start is
    assumed as well, and the first poll corrects it."""
    leg, now = leg_dir(), time.time()
    text = env("LEG_BUDGET_LEFT_S", "")
    try:
        left = float(text)
    except ValueError:
        raise SystemExit(f"LEG_BUDGET_LEFT_S must be the budget_left_s of the latest reply (seconds), "
                         f"got {text!r}") from None
    last = leg / "last_call_end"
    if last.is_file():
        spent = now - float(last.read_text())
        how = f"budget_left_s {left:g} - {spent:.0f} s since the last call here ended"
    else:
        spent = timing.start_s + timing.call_s + (now - command_start)
        how = f"budget_left_s {left:g} - an assumed {timing.start_s:g} s machine start (the first poll corrects it)"
    end_by = now + left - spent - timing.tail_s
    tmp = leg / "end_by.tmp"
    tmp.write_text(f"{end_by:.1f}\n")
    os.replace(tmp, leg / "end_by")
    print(f"end: {how}; training ends in {(end_by - now) / 60:.2f} min")
    return end_by


def _setup() -> None:
    leg = leg_dir()
    init = env("LEG_INIT", "m2l2-small")
    needed = PARKED if init == "m2l2-small" else init if init.lower() != "none" else None
    if needed is not None and not Path(needed).is_file():
        raise SystemExit(f"{needed} did not arrive: name it in this call's carry (the plan does)")
    wheels = sorted(str(p) for p in Path(".whl").glob("*.whl"))
    if wheels:
        subprocess.run([python(), "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(leg / "site"), *wheels], check=True,
                       env={**os.environ, "PIP_ROOT_USER_ACTION": "ignore"})
    # A private copy of the code: every call re-sends the working tree, the run must not see it move.
    shutil.rmtree(leg / "code", ignore_errors=True)
    shutil.copytree("music2latent2", leg / "code" / "music2latent2")
    check = ("import json, soundfile, soxr, torch, music2latent2 as m; "
             "from music2latent2.training.compiling import compile_environment as e; "
             "d = torch.device('cuda' if torch.cuda.is_available() else 'cpu'); "
             "print('soundfile', soundfile.__version__, 'soxr', soxr.__version__, 'torch', torch.__version__, "
             "'code', m.__file__); print(json.dumps(e(d)))")
    out = subprocess.run([python(), "-c", check], check=True, env=child_env(), capture_output=True, text=True,
                         cwd=leg).stdout
    print(out.splitlines()[0])
    here = json.loads(out.splitlines()[-1])
    for archive in Path(env("LEG_CACHE_DIR", ".leg/compile-cache")).glob("*.tar.gz"):
        made = read_cache_environment(archive)
        if made != here:
            print(f"compile cache {archive}: made on {made}, this is {here}: not used")
            continue
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12: refuse members outside LEG_DIR
                tar.extractall(leg, filter="data")
            else:
                tar.extractall(leg)
        print(f"compile cache {archive}: unpacked (made on this GPU and torch)")
        break


def _train_command() -> List[str]:
    leg, corpus = leg_dir(), corpus_dir()
    for spec in DATA_SPECS:  # folders whose audio has not arrived yet start empty
        (corpus / spec.split(":")[0]).mkdir(parents=True, exist_ok=True)
    cmd = [python(), "-m", "music2latent2.training", "train",
           "--data", *[f"{corpus}/{spec}" for spec in DATA_SPECS], "--data-watch", str(corpus / "ARRIVED"),
           "--out", str(leg / "run"), "--preset", env("LEG_PRESET", "small"), "--batch-size", env("LEG_BATCH", "32"),
           "--lr", env("LEG_LR", "2e-4"), "--ema", "0.999", "--delta-end", "0.01", "--latent-penalty", "1",
           "--end-file", str(leg / "end_by"), "--snapshot-request", str(leg / "snapshot_request"),
           "--reserve-minutes", str(RESERVE_MINUTES), "--snapshot-piece-mib", str(PIECE_MIB),
           "--save-every", "100000000", "--eval-every", "100000000", "--log-every", env("LEG_LOG_EVERY", "100"),
           "--workers", env("LEG_WORKERS", "12"), "--cache-gb", env("LEG_CACHE_GB", "40"),
           "--seed", str(int(env_float("LEG_NUMBER", 2)))]
    if env("LEG_COMPILE", "off") == "on":
        cmd += ["--compile", "on", "--compile-after", env("LEG_COMPILE_AFTER", "30"),
                "--compile-cache", str(leg / "compile_cache.bin")]
    else:
        cmd += ["--compile", "off"]
    if env("LEG_SUMMARY_INIT_STD", ""):
        cmd += ["--summary-init-std", env("LEG_SUMMARY_INIT_STD", "")]
    init = env("LEG_INIT", "m2l2-small")
    if init.lower() == "none":  # a fresh run starts as a pure denoiser (ECT)
        cmd += ["--delta-start", "1", "--warmup", env("LEG_WARMUP", "500")]
    else:
        path = Path(init)
        cmd += ["--init-from", str(path.resolve()) if path.exists() else init, "--warmup", env("LEG_WARMUP", "200")]
    if env("LEG_MAX_STEPS", ""):
        cmd += ["--more-steps", env("LEG_MAX_STEPS", "")]
    return cmd


def cmd_start(args: argparse.Namespace) -> int:
    command_start = time.time()
    leg = leg_dir()
    pid = _trainer_pid()
    if pid is not None and _alive(pid):
        print(f"ALREADY TRAINING here (pid {pid}): this call polls instead")
        return cmd_poll(args)
    if not (Path("music2latent2") / "__init__.py").is_file():
        raise SystemExit("run from the repository root")
    print(f"leg {env('LEG_NUMBER', '2')} from {env('LEG_INIT', 'm2l2-small')}: starting on this machine")
    leg.mkdir(parents=True, exist_ok=True)
    _setup()
    unpack_new_parts()
    timing = Timing.from_env()
    end_by = lease_end(timing, command_start)
    if end_by - time.time() < timing.min_start_s:
        raise SystemExit(f"{(end_by - time.time()) / 60:.2f} min left to train (< LEG_MIN_START_S "
                         f"{timing.min_start_s:g} s): not starting")
    cmd = _train_command()
    (leg / "train_cmd.json").write_text(json.dumps(cmd) + "\n")
    for name in ("exit_code", "returned.json", "snapshot_request", "supervisor.json"):
        (leg / name).unlink(missing_ok=True)
    for name in ("run", "run-compiling"):
        shutil.rmtree(leg / name, ignore_errors=True)
    log = open(leg / "train.log", "wb")
    # A new session: the device tool ends what a command leaves running, except such a process.
    # The supervisor runs the trainer, bounds its compile and records its exit status (cmd_supervise).
    proc = subprocess.Popen([python(), str(Path(__file__).resolve()), "supervise"], cwd=leg, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    (leg / "pid").write_text(f"{proc.pid}\n")
    waited = 0.0
    while waited < env_float("LEG_START_WAIT", 20) and proc.poll() is None:
        time.sleep(1)
        waited += 1
    if proc.poll() is not None and proc.returncode != 0 or _exit_status() not in (None, "0"):
        print(_tail(leg / "train.log", 25))
        print("training failed at its start (train.log above)")
        return 1
    print(f"training: started (pid {proc.pid})")
    return _wait_and_return(command_start, timing.first_s)


def _run_trainer(cmd: List[str], deadline_s: Optional[float]) -> Optional[int]:
    """Run the trainer (in a process group of its own, its output into train.log) to its end; with
    ``deadline_s``, kill it once its first compiled step has run that long. Returns its exit
    status, or None when it was killed at the deadline."""
    leg = leg_dir()
    log = leg / "train.log"
    proc = subprocess.Popen(cmd, cwd=leg, env=child_env(), stdin=subprocess.DEVNULL, start_new_session=True)
    (leg / "trainer_pid").write_text(f"{proc.pid}\n")
    offset, compiling_since = log.stat().st_size if log.is_file() else 0, None
    while proc.poll() is None:
        time.sleep(0.5)
        if deadline_s is None:
            continue
        with open(log, "rb") as f:  # only what the trainer wrote since the last look
            f.seek(offset)
            new = f.read().decode(errors="replace")
            offset = f.tell()
        if COMPILE_DONE in new or "training eagerly" in new:
            deadline_s = None  # compiled, or fell back by itself: nothing left to bound
        elif compiling_since is None and COMPILE_START in new:
            compiling_since = time.time()
        if compiling_since is not None and deadline_s is not None and time.time() - compiling_since > deadline_s:
            os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its loader workers
            proc.wait()
            return None
    return proc.returncode


def cmd_supervise(args: argparse.Namespace) -> int:
    """(device, started by ``start``) Run the trainer; a compile past LEG_COMPILE_DEADLINE_S costs
    that run (its steps so far and the compile), and the leg goes on eagerly from the same start
    weights. The compile is bounded from outside because nothing can stop it safely inside the
    process. Writes the exit status to LEG_DIR/exit_code for the polls."""
    leg = leg_dir()
    cmd = json.loads((leg / "train_cmd.json").read_text())
    compiles = "--compile" in cmd and cmd[cmd.index("--compile") + 1] == "on"
    deadline = env_float("LEG_COMPILE_DEADLINE_S", 150.0) if compiles else None
    t0 = time.time()
    status = _run_trainer(cmd, deadline)
    if status is None:
        spent = time.time() - t0
        text = (leg / "train.log").read_text(errors="replace")
        eager = re.findall(r"^speed: eager ([\d.]+) steps/s = ([\d.]+) samples/s", text, re.M)
        record = {"compile": "deadline", "compile_deadline_s": deadline, "run_seconds": spent,
                  "eager_steps_per_s": float(eager[-1][0]) if eager else None,
                  "eager_samples_per_s": float(eager[-1][1]) if eager else None}
        (leg / "supervisor.json").write_text(json.dumps(record) + "\n")
        print(f"{COMPILE_DEADLINE_LINE} ({deadline:g} s, LEG_COMPILE_DEADLINE_S): the run was stopped after "
              f"{spent:.0f} s and starts again eagerly from the same weights", flush=True)
        os.replace(leg / "run", leg / "run-compiling")  # its snapshots would shadow the new run's
        cut = cmd.index("--compile")
        eager_cmd = [a for i, a in enumerate(cmd) if i not in (cut, cut + 1)]
        for flag in ("--compile-after", "--compile-cache"):
            if flag in eager_cmd:
                i = eager_cmd.index(flag)
                del eager_cmd[i:i + 2]
        status = _run_trainer(eager_cmd + ["--compile", "off"], None)
    (leg / "exit_code").write_text(f"{status}\n")
    return 0


def _exit_status() -> Optional[str]:
    f = leg_dir() / "exit_code"
    return f.read_text().strip() if f.is_file() else None


def cmd_poll(args: argparse.Namespace) -> int:
    command_start = time.time()
    leg = leg_dir()
    pid = _trainer_pid()
    if pid is None:
        leg.mkdir(parents=True, exist_ok=True)  # so that the restart counts its time from this call's end
        print("FRESH MACHINE: no leg runs here (the leg's machine went back; this one started bare and is held "
              "now). Next, at once: the plan's restart call, which continues from the last kept snapshot.")
        return EXIT_FRESH
    if not _alive(pid):
        print(f"TRAINING ENDED before this poll (exit status {_exit_status()}): returning what it left")
        return _wait_and_return(command_start, 0.0)
    print(f"leg running here (pid {pid})")
    if unpack_new_parts():
        print("data: the running loader takes the new parts in within seconds")
    lease_end(Timing.from_env(), command_start)
    return _wait_and_return(command_start, Timing.from_env().poll_s)


def _snapshot_index(run: Path) -> Optional[Dict]:
    marker = run / "snapshots" / "LATEST"
    try:
        return json.loads((run / "snapshots" / marker.read_text().strip() / "pieces.json").read_text())
    except (OSError, ValueError):
        return None


def _copy_snapshot(run: Path, out: Path) -> Optional[Dict]:
    """Copy the newest snapshot's pieces into ``out``, checked against its own index (the trainer
    may replace a snapshot of the same step while it is read): retried until they agree."""
    pieces = _pieces()
    for _ in range(5):
        marker = run / "snapshots" / "LATEST"
        if not marker.is_file():
            return None
        folder = run / "snapshots" / marker.read_text().strip()
        try:
            for f in folder.iterdir():
                shutil.copyfile(f, out / f.name)
            return pieces.check_pieces(out)
        except (OSError, pieces.PiecesError):
            time.sleep(1)
    return None


def _wait_and_return(command_start: float, slice_s: float) -> int:
    """Wait until this call's return time (:func:`leg_plan.call_deadline`), ask the trainer for
    a snapshot (or, at the end, wait for its final one), and put the files back in $OUT."""
    leg, out, timing = leg_dir(), out_dir(), Timing.from_env()
    run = leg / "run"
    pid = _trainer_pid()
    try:
        end_by = float((leg / "end_by").read_text())
    except (OSError, ValueError):
        end_by = time.time()
    until, final = call_deadline(command_start, end_by, slice_s, timing)
    limit = command_start + timing.max_wait_s + timing.snapshot_s + 30  # never past the command's 600 s

    def alive() -> bool:
        return pid is not None and _alive(pid)

    def final_done() -> bool:
        index = _snapshot_index(run)
        return bool(index and index.get("final"))

    while time.time() < until and alive() and not final_done():
        time.sleep(1)
    if alive() and not final:  # ask for a snapshot now, and wait for the one that answers it
        token = f"{time.time():.3f}"
        tmp = leg / "snapshot_request.tmp"
        tmp.write_text(token + "\n")
        os.replace(tmp, leg / "snapshot_request")
        while alive() and time.time() < limit and (_snapshot_index(run) or {}).get("request") != token \
                and not final_done():
            time.sleep(0.5)
    while final and alive() and not final_done() and time.time() < limit:
        time.sleep(1)
    index = _copy_snapshot(run, out)
    if (run / "log.jsonl").is_file():
        shutil.copyfile(run / "log.jsonl", out / "log.jsonl")
    (out / "train_tail.txt").write_text(_tail(leg / "train.log", 400) + "\n")
    returned_file = leg / "returned.json"
    returned = json.loads(returned_file.read_text()) if returned_file.is_file() else {}
    cache = leg / "compile_cache.bin"
    record = cache.with_name(cache.name + ".json")
    if cache.is_file() and record.is_file() and returned.get("cache_mtime") != cache.stat().st_mtime:
        with tarfile.open(out / CACHE_BACK, "w:gz") as tar:
            tar.add(cache, arcname=cache.name)
            tar.add(record, arcname=record.name)
        if (out / CACHE_BACK).stat().st_size > FILE_BACK_MIB * MIB:
            print(f"compile cache not returned ({(out / CACHE_BACK).stat().st_size / MIB:.1f} MiB gzipped)")
            (out / CACHE_BACK).unlink()
        else:
            returned["cache_mtime"] = cache.stat().st_mtime
    back = sorted(p for p in out.iterdir() if not p.name.startswith("."))
    if len(back) > MAX_FILES_BACK or any(f.stat().st_size > FILE_BACK_MIB * MIB for f in back):
        raise SystemExit(f"{len(back)} files in $OUT exceed what a call returns ({MAX_FILES_BACK} of "
                         f"{FILE_BACK_MIB:g} MiB)")
    snap = None if index is None else index["step"]
    new = snap is not None and snap != returned.get("step")
    returned["step"] = snap
    returned_file.write_text(json.dumps(returned) + "\n")
    print(_tail(leg / "train.log", 6))
    speed = (index or {}).get("speed") or {}
    if speed.get("eager_samples_per_s") or speed.get("compile") not in (None, "pending", "off"):
        print("speed: " + json.dumps({k: speed[k] for k in sorted(speed) if k.endswith("_per_s")
                                      or k.startswith("compile") or k == "device"}))
    if (leg / "supervisor.json").is_file():
        print("speed of the run stopped at its compile deadline: " + (leg / "supervisor.json").read_text().strip())
    marks = (" (final)" if index and index.get("final") else "") + \
        (" (new)" if new else " (returned before)" if snap is not None else "")
    print(f"snapshot: {'none yet' if snap is None else f'step {snap}'}{marks}; "
          f"back: {len(back)} files, {sum(f.stat().st_size for f in back) / MIB:.1f} MiB")
    if alive() and not (index and index.get("final")):
        left = (end_by - time.time()) / 60
        print(f"training: running, {left:.1f} min to its end; next: keep these files, then the poll at once")
        return 0
    status = _exit_status()
    if status == "0" or (index and index.get("final")):
        print(f"training: finished (final snapshot; exit status {status or 'not yet: it saves its state'}): "
              "keep these files, then give_back at once")
        return 0
    print(f"training: ended (exit status {status}): read train_tail.txt; nothing of this leg ships")
    return 1


def _record_call_end() -> None:
    leg = leg_dir()
    if leg.is_dir():
        (leg / "last_call_end").write_text(f"{time.time():.3f}\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="leg.sh", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="(here) every call of the leg, its size, when it returns, the training minutes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan, device=False)
    sub.add_parser("park", help="(here) keep the bundled weights out of the travelling tree").set_defaults(
        func=cmd_park, device=False)
    sub.add_parser("unpark", help="(here) track the bundled weights again").set_defaults(func=cmd_unpark, device=False)
    k = sub.add_parser("keep", help="(here, between calls) keep a reply's files, join its snapshot")
    k.add_argument("files_at")
    k.add_argument("--into", default=None, help="default LEG_KEEP_DIR, else runs/legN (N: LEG_NUMBER)")
    k.set_defaults(func=cmd_keep, device=False)
    v = sub.add_parser("verify", help="(here, after the window) load the kept checkpoint strictly")
    v.add_argument("folder")
    v.set_defaults(func=cmd_verify, device=False)
    sub.add_parser("start", help="(device) set up, start training, return its first snapshot").set_defaults(
        func=cmd_start, device=True)
    sub.add_parser("poll", help="(device) take in new parts, move the end, return a fresh snapshot").set_defaults(
        func=cmd_poll, device=True)
    sub.add_parser("supervise", help="(device, started by start) run the trainer, bound its compile").set_defaults(
        func=cmd_supervise, device=False)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return args.func(args)
    finally:
        if args.device:
            _record_call_end()


if __name__ == "__main__":
    raise SystemExit(main())
