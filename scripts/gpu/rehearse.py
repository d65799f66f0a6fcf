#!/usr/bin/env python3
"""Rehearse training legs on this CPU exactly as the device tool would run them.

Two legs, each the calls ``leg.sh plan --json`` lays out, run one after the other:

1. ``tiny``: a fresh tiny-preset leg with a stand-in compile cache carried in call 1 and
   expected back from a poll, snapshots every 0.4 minutes, the end corrected by every poll;
2. ``continuation``: the bundled ``m2l2-small`` continued for 3 steps, checked to carry on at
   its training_step and training_delta.

For every call it copies what would travel (tracked and untracked-not-ignored files, the bundled
weights left out as ``park`` leaves them, plus the carried paths) into a stand-in device folder,
refuses a call over 64 MiB or 8 carried paths, runs the command with job control on and kills
its process group afterwards (the tool ends what a command leaves running, except a process that
started its own session), checks ``$OUT`` against what a call may return (8 files of 16 MiB),
and keeps the reply with ``leg.sh keep`` as the checklist does. Then it evaluates the kept
continuation and runs the ship check against the bundled model. Exits non-zero on any failure.

    bash scripts/gpu/rehearse.sh [WORK_DIR] [CORPUS_DIR]
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
import leg  # noqa: E402  (scripts/gpu/leg.py: the same plan and limits)

CARRY = ".carry/rehearsal"
NAME_OK = re.compile(r"^[A-Za-z0-9._-]+$")


class Failure(RuntimeError):
    pass


def sh(cmd: List[str], env: Dict[str, str] | None = None, cwd: Path = ROOT) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise Failure(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def send(call: Dict, device: Path) -> float:
    """Copy what this call sends into ``device``; returns the MiB sent."""
    total = 0
    for rel in leg.git_files(ROOT):
        if rel == leg.PARKED or not (ROOT / rel).is_file():
            continue
        (device / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, device / rel)
        total += (ROOT / rel).stat().st_size
    if len(call["carry"]) > leg.MAX_CARRY_PATHS:
        raise Failure(f"call {call['call']} carries {len(call['carry'])} paths")
    for rel in call["carry"]:
        src, dst = ROOT / rel, device / rel
        if dst.is_dir():
            shutil.rmtree(dst)
        elif dst.exists():
            dst.unlink()
        if not src.exists():  # the tool's rule: a carried path that is not here is removed there
            print(f"   (carry {rel} is not here: removed there)")
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
        total += leg.path_bytes(src)
    mib = total / leg.MIB
    if mib > leg.CALL_LIMIT_MIB:
        raise Failure(f"call {call['call']} would send {mib:.1f} MiB > {leg.CALL_LIMIT_MIB:g} MiB")
    return mib


def run_on_device(command: str, device: Path, out: Path, env: Dict[str, str]) -> str:
    """As the tool runs a command: a job-controlled background job, then its group killed."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    pid_file = out.parent / f"{out.name}.job"
    script = f'set -m; ( {command} ) & echo $! > "{pid_file}"; wait $!'
    proc = subprocess.run(["bash", "-c", script], cwd=device, env={**env, "OUT": str(out)},
                          capture_output=True, text=True)
    try:
        os.killpg(int(pid_file.read_text()), signal.SIGKILL)
    except (OSError, ValueError):
        pass
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise Failure(f"`{command}` failed on the device ({proc.returncode}):\n{text[-4000:]}")
    files = sorted(out.rglob("*"))
    if len(files) > leg.MAX_FILES_BACK or any(f.is_dir() or not NAME_OK.match(f.name) or
                                              f.stat().st_size > leg.FILE_BACK_MIB * leg.MIB for f in files):
        raise Failure(f"$OUT holds what a call cannot return: {[f.name for f in files]}")
    if sum(f.stat().st_size for f in files) > 64 * leg.MIB:
        raise Failure("$OUT holds more than 64 MiB")
    return text


def rehearse_leg(name: str, work: Path, settings: Dict[str, str]) -> Path:
    """Run one leg's planned calls; returns the folder the replies were kept in."""
    base = work / name
    device, back = base / "device", base / "back"
    device.mkdir(parents=True)
    env = {**os.environ, "LEG_CARRY_DIR": CARRY, "LEG_DIR": str(base / "leg"), "CORPUS_DIR": str(base / "corpus"),
           "OMP_NUM_THREADS": "2", **settings}
    plan = json.loads(sh([sys.executable, str(HERE / "leg.py"), "plan", "--json"], env=env))
    if plan["problems"]:
        raise Failure(f"plan of leg {name}: {plan['problems']}")
    print(f"== leg {name}: {len(plan['calls'])} calls planned, {plan['training_minutes']:.2f} training min")
    lease_begin = time.time()
    calls = list(plan["calls"])
    polls = [c for c in calls if c["kind"] == "poll"]
    extra = 0
    ended = False
    while calls:
        call = calls.pop(0)
        mib = send(call, device)
        held = time.time() - lease_begin  # what the tool's reply would say (no machine start here)
        command = call["command"].replace(leg.HELD_PLACEHOLDER, f"{held:.0f}")
        print(f"-- call {call['call']} ({call['kind']}, {mib:.1f} MiB): {command}", flush=True)
        out = base / f"out{call['call']}"
        text = run_on_device(command, device, out, env)
        print("   " + "\n   ".join(text.strip().splitlines()[-4:]), flush=True)
        sh([sys.executable, str(HERE / "leg.py"), "keep", str(out), "--into", str(back)], env=env)
        if call["kind"] == "poll" and "training: ended" in text:
            ended = True
            break
        if not calls and polls and extra < 20:  # the plan's poll count is an estimate: poll on
            extra += 1
            calls.append({**polls[-1], "call": call["call"] + 1})
    if not ended:
        raise Failure(f"leg {name}: training did not end")
    if not (back / "latest.safetensors").is_file():
        raise Failure(f"leg {name}: no snapshot came back")
    return back


def main() -> int:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/m2l2-rehearsal").resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    corpus = Path(sys.argv[2]).resolve() if len(sys.argv) > 2 else work / "corpus-src"
    if len(sys.argv) <= 2:  # the examples' recordings stand in for the corpus
        (corpus / "real").mkdir(parents=True)
        for f in sorted(ROOT.glob("examples/**/*.flac")):
            shutil.copy2(f, corpus / "real" / f.name)
    carry = ROOT / CARRY
    shutil.rmtree(carry, ignore_errors=True)
    try:
        sh([sys.executable, "-m", "music2latent2.training.corpus", "pack", str(corpus), "--out", str(carry),
            "--part-mib", os.environ.get("PART_MIB", "1")])
        # A stand-in compile cache (the CPU legs do not compile): it must travel in call 1 and come back.
        import gzip
        with gzip.open(carry / leg.CACHE_NAME, "wb") as f:
            f.write(b"stand-in compile cache\n" * 100)
        common = {"LEG_WORKERS": "1", "LEG_START_WAIT": "5", "LEG_START_S": "0", "LEG_GAP_S": "2", "LEG_CALL_S": "1",
                  "LEG_CACHE_GB": "1", "LEG_LOG_EVERY": "10", "LEG_MIN_TRAIN_MIN": "0.5"}
        tiny = rehearse_leg("tiny", work, {**common, "LEG_INIT": "none", "LEG_PRESET": "tiny", "LEG_BATCH": "4",
                                           "LEG_SNAPSHOT_MINUTES": "0.4", "LEG_BUDGET_S": "150", "LEG_TAIL_S": "20"})
        returned = sorted(tiny.glob(f"poll-*/{leg.CACHE_NAME}"))
        if not returned:
            raise Failure("the compile cache did not come back")
        steps = [json.loads(x)["step"] for x in (tiny / "log.jsonl").read_text().splitlines()]
        kept = len(list(tiny.glob("step-*")))
        print(f"tiny leg: {len(steps)} log lines, last step {steps[-1]}, {kept} snapshots kept")

        cont = rehearse_leg("continuation", work, {**common, "LEG_INIT": "m2l2-small", "LEG_PRESET": "small",
                                                   "LEG_BATCH": "1", "LEG_MAX_STEPS": "3", "LEG_LOG_EVERY": "1",
                                                   "LEG_SNAPSHOT_MINUTES": "5", "LEG_BUDGET_S": "900",
                                                   "LEG_TAIL_S": "20"})
        sys.path.insert(0, str(ROOT))
        from music2latent2.checkpoint import read_metadata

        shipped = read_metadata(ROOT / leg.PARKED)
        meta = read_metadata(cont / "latest.safetensors")
        step0, delta0 = int(shipped["training_step"]), float(shipped["training_delta"])
        if int(meta["training_step"]) != step0 + 3:
            raise Failure(f"continuation ended at step {meta['training_step']}, expected {step0 + 3}")
        if not 0.01 <= float(meta["training_delta"]) < delta0:
            raise Failure(f"continuation delta {meta['training_delta']} is not between 0.01 and {delta0}")
        tail = (cont / "train_tail.txt").read_text()
        if "continues from the checkpoint's training_delta" not in tail:
            raise Failure("the continuation did not start from the checkpoint's delta")
        print(f"continuation: step {step0} -> {meta['training_step']}, delta {delta0:.4f} -> "
              f"{float(meta['training_delta']):.4f}")

        print("== here: evaluate the kept continuation and the shipped model, then the ship check")
        evals = {}
        for label, model in (("candidate", str(cont / "latest.safetensors")), ("shipped", "m2l2-small")):
            evals[label] = work / f"eval-{label}"
            sh([sys.executable, "-m", "music2latent2.evaluate", "--model", model, "--data", str(ROOT / "examples"),
                "--out", str(evals[label]), "--max-seconds", "2", "--max-files", "2", "--no-visqol"])
        check = subprocess.run([sys.executable, "-m", "music2latent2.training", "ship-check",
                                str(evals["candidate"]), str(evals["shipped"])], cwd=ROOT, capture_output=True,
                               text=True)
        print(check.stdout.strip())
        if check.returncode not in (0, 3):
            raise Failure(f"ship-check failed ({check.returncode}): {check.stderr[-2000:]}")
    except Failure as err:
        print(f"REHEARSAL FAILED: {err}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(carry, ignore_errors=True)
    print(f"rehearsal ok ({work})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
