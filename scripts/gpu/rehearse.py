#!/usr/bin/env python3
"""Rehearse training legs on this CPU as the device tool would run them.

Four legs, each the calls ``leg.sh plan --json`` lays out, with small stand-ins for the device's
limits and minutes:

1. ``tiny``: a fresh tiny-preset leg whose polls bring more corpus parts (the running loader
   must take them in), every call returning a snapshot, the last one the final;
2. ``missed-gap``: the same, but the machine goes back after call 1 (its trainer killed, its
   folders gone): the next poll must say FRESH MACHINE in its first line, and the plan's restart
   call must continue from the snapshot kept from call 1;
3. ``slow-compile``: LEG_COMPILE=on with a stand-in compile cache made "for this machine" carried
   in call 1 and a 3 s deadline: the supervisor must stop the compiling run, report its eager
   samples/s and start the run again eagerly;
4. ``continuation``: the bundled ``m2l2-small`` continued for 3 steps, checked to carry on at its
   training_step and training_delta, then evaluated and ship-checked against the bundled model.

For every call it copies what would travel (tracked and untracked-not-ignored files, the bundled
weights left out as ``park`` leaves them, plus the carried paths) into a stand-in device folder,
refuses a call over the limit or 8 carried paths, runs the command with job control on and kills
its process group afterwards (the tool ends what a command leaves running, except a process that
started its own session), checks ``$OUT`` against what a call may return (8 files of 16 MiB),
and keeps the reply with ``leg.sh keep`` as the checklist does (timed).

The carried wheels (.whl, from fetch_wheels.sh) are for the device's Python 3.12. Their tags are
checked (the plan) and pip installs them for a simulated 3.12 (``--python-version 3.12``); the
legs then install and import the same versions built for the device Python used here
(``--device-python``, e.g. a venv with the device's torch 2.11), which is all that can run here.

    bash scripts/gpu/rehearse.sh [--device-python PYTHON] [--work DIR]
"""

from __future__ import annotations

import argparse
import gzip
import io
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
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import soundfile as sf

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
import leg_plan  # noqa: E402  (scripts/gpu/leg_plan.py: the same plan and limits)

CARRY = ".carry/rehearsal"
NAME_OK = re.compile(r"^[A-Za-z0-9._-]+$")
# The tiny legs' stand-ins for 15 device-minutes: every wait and cost scaled down.
TINY_TIMING = {"LEG_BUDGET_S": "150", "LEG_START_S": "0", "LEG_CALL_S": "1", "LEG_GAP_S": "1", "LEG_SETUP_S": "8",
               "LEG_TRAINER_START_S": "10", "LEG_TAIL_S": "12", "LEG_FIRST_S": "35", "LEG_POLL_S": "22",
               "LEG_MIN_LAST_S": "12", "LEG_MAX_WAIT_S": "90", "LEG_SNAPSHOT_S": "3", "LEG_MIN_TRAIN_MIN": "0.3",
               "LEG_MIN_START_S": "20"}


class Failure(RuntimeError):
    pass


def sh(cmd: List[str], env: Optional[Dict[str, str]] = None, cwd: Path = ROOT) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise Failure(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


class Machine:
    """A stand-in device machine: its folder (the travelling tree lands there) and its LEG_DIR."""

    def __init__(self, base: Path, number: int, twin_wheels: Path) -> None:
        self.folder = base / f"machine{number}"
        self.leg_dir = base / f"machine{number}-leg"
        self.corpus = base / f"machine{number}-corpus"
        self.twin_wheels = twin_wheels
        self.folder.mkdir(parents=True)

    def send(self, call: Dict) -> float:
        """Copy what this call sends; returns the MiB sent (checked against the limits)."""
        total = 0
        for rel in leg_plan.git_files(ROOT):
            if rel == leg_plan.PARKED or not (ROOT / rel).is_file():
                continue
            (self.folder / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, self.folder / rel)
            total += (ROOT / rel).stat().st_size
        if len(call["carry"]) > leg_plan.MAX_CARRY_PATHS:
            raise Failure(f"{call['name']} carries {len(call['carry'])} paths")
        for rel in call["carry"]:
            src, dst = ROOT / rel, self.folder / rel
            if rel == ".whl":  # what the device Python here can install (see the module doc)
                src = self.twin_wheels
            if dst.is_dir():
                shutil.rmtree(dst)
            elif dst.exists():
                dst.unlink()
            if not src.exists():  # the tool's rule: a carried path that is not here is removed there
                print(f"   (carry {rel} is not here: removed there)")
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
            total += leg_plan.path_bytes(ROOT / rel)
        mib = total / leg_plan.MIB
        if mib > leg_plan.call_limit_mib():
            raise Failure(f"{call['name']} would send {mib:.1f} MiB > {leg_plan.call_limit_mib():g} MiB")
        return mib

    def run(self, command: str, out: Path, env: Dict[str, str]) -> Tuple[int, str]:
        """As the tool runs a command: a job-controlled background job, then its group killed."""
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        pid_file = out.parent / f"{out.name}.job"
        script = f'set -m; ( {command} ) & echo $! > "{pid_file}"; wait $!'
        here = {"OUT": str(out), "LEG_DIR": str(self.leg_dir), "CORPUS_DIR": str(self.corpus)}
        proc = subprocess.run(["bash", "-c", script], cwd=self.folder, env={**env, **here}, capture_output=True,
                              text=True)
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except (OSError, ValueError):
            pass
        files = sorted(out.rglob("*"))
        if len(files) > leg_plan.MAX_FILES_BACK or any(
                f.is_dir() or not NAME_OK.match(f.name) or f.stat().st_size > leg_plan.FILE_BACK_MIB * leg_plan.MIB
                for f in files):
            raise Failure(f"$OUT holds what a call cannot return: {[f.name for f in files]}")
        return proc.returncode, proc.stdout + proc.stderr

    def go_back(self) -> None:
        """The machine is given back: its trainer dies, its folders are gone."""
        for name in ("pid", "trainer_pid"):  # the supervisor and the trainer each lead a session
            pid_file = self.leg_dir / name
            if pid_file.is_file():
                try:
                    os.killpg(int(pid_file.read_text()), signal.SIGKILL)
                except OSError:
                    pass
        for path in (self.folder, self.leg_dir, self.corpus):
            shutil.rmtree(path, ignore_errors=True)


class Leg:
    """One rehearsed leg: the plan, a simulated lease, the calls and the kept replies."""

    def __init__(self, name: str, work: Path, settings: Dict[str, str], device_python: str,
                 twin_wheels: Path) -> None:
        self.name, self.base = name, work / name
        self.keep_rel = f"{CARRY}/keep-{name}"
        self.env = {**os.environ, "LEG_CARRY_DIR": f"{CARRY}/parts", "LEG_CACHE_DIR": f"{CARRY}/cache",
                    "LEG_KEEP_DIR": self.keep_rel, "OMP_NUM_THREADS": "2", "LEG_PYTHON": device_python, **settings}
        self.here_env = {k: v for k, v in self.env.items() if k != "LEG_PYTHON"}
        self.plan = json.loads(sh([sys.executable, str(HERE / "leg.py"), "plan", "--json"], env=self.here_env))
        if self.plan["problems"]:
            raise Failure(f"plan of leg {name}: {self.plan['problems']}")
        self.budget = float(settings.get("LEG_BUDGET_S", "900"))
        self.began = time.time()
        self.twin_wheels = twin_wheels
        self.machines = 0
        self.machine = self.new_machine()
        self.replies = 0
        self.keep_seconds: List[float] = []
        self.texts: List[str] = []  # every reply's output
        print(f"== leg {name}: {len(self.plan['calls']) - 1} calls planned (and a restart), "
              f"{self.plan['timeline_fast']['train_minutes']:.2f} training min", flush=True)

    @property
    def kept(self) -> Path:
        return ROOT / self.keep_rel

    def new_machine(self) -> Machine:
        self.machines += 1
        return Machine(self.base, self.machines, self.twin_wheels)

    def budget_left(self) -> float:
        return self.budget - (time.time() - self.began)

    def call(self, call: Dict, expect: Sequence[int] = (0,)) -> Tuple[int, str]:
        mib = self.machine.send(call)
        command = call["command"].replace(leg_plan.PLACEHOLDER, f"{self.budget_left():.0f}")
        print(f"-- {call['name']} ({mib:.1f} MiB): {command}", flush=True)
        self.replies += 1
        out = self.base / f"reply{self.replies:02d}"
        rc, text = self.machine.run(command, out, self.env)
        self.texts.append(text)
        lines = text.strip().splitlines()
        print("   first: " + (lines[0] if lines else ""))
        print("   " + "\n   ".join(lines[-3:]), flush=True)
        if rc not in expect:
            raise Failure(f"{call['name']} exited {rc}, expected {list(expect)}:\n{text[-4000:]}")
        if any(out.iterdir()):
            t0 = time.perf_counter()
            sh([sys.executable, str(HERE / "leg.py"), "keep", str(out)], env=self.here_env)
            self.keep_seconds.append(time.perf_counter() - t0)
        return rc, text

    def polls(self, first_poll: int = 1) -> str:
        """Poll until the training ends; returns the last reply's text."""
        calls = [c for c in self.plan["calls"] if c["name"].startswith("poll")]
        n = first_poll
        for _ in range(30):
            call = calls[n - 1] if n <= len(calls) else {**calls[-1], "name": f"poll {n}", "carry": []}
            _, text = self.call(call)
            if "training: finished" in text or "training: ended" in text:
                return text
            n += 1
        raise Failure(f"leg {self.name}: training did not end")

    def finish(self) -> None:
        self.machine.go_back()  # nothing of this leg keeps running
        if not (self.kept / "latest.safetensors").is_file():
            raise Failure(f"leg {self.name}: no snapshot came back")
        print(f"leg {self.name}: keep took {', '.join(f'{s:.2f}' for s in self.keep_seconds)} s "
              f"(python start included)")


def final_index(kept: Path) -> Dict:
    replies = sorted(kept.glob("poll-*"))
    return json.loads((replies[-1] / "pieces.json").read_text())


def make_corpus(folder: Path) -> None:
    """The examples' recordings, plus 14 minutes of synthetic Vorbis, enough for several parts."""
    (folder / "real").mkdir(parents=True)
    for f in sorted(ROOT.glob("examples/**/*.flac")):
        shutil.copy2(f, folder / "real" / f.name)
    (folder / "music").mkdir()
    rng = np.random.default_rng(0)
    sr = 44100
    for i in range(28):
        t = np.arange(30 * sr) / sr
        tone = sum(0.2 / k * np.sin(2 * np.pi * 110 * (i % 7 + 1) * k * t) for k in range(1, 5))
        audio = (tone * (0.6 + 0.4 * np.sin(2 * np.pi * 0.5 * t)) + 0.02 * rng.standard_normal(t.size))
        with sf.SoundFile(str(folder / "music" / f"tone{i:02d}.ogg"), "w", sr, 1, format="OGG",
                          subtype="VORBIS") as out:
            for start in range(0, t.size, sr):  # blockwise: libsndfile's Vorbis writer fails on long blocks
                out.write(audio[start:start + sr].astype(np.float32))


def check_device_wheels(work: Path, device_python: str) -> Path:
    """Check .whl against the device's Python (pip for a simulated 3.12) and return the folder of
    the same versions for ``device_python``, which the legs carry in its place."""
    wheels = ROOT / ".whl"
    problems = leg_plan.check_wheels(ROOT, wheels)
    if problems:
        raise Failure("; ".join(problems))
    target = work / "site-312"
    major, minor = leg_plan.DEVICE_PYTHON
    platforms = [a for n in range(17, leg_plan.DEVICE_GLIBC[1] + 1) for a in ("--platform", f"manylinux_2_{n}_x86_64")]
    sh([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
        "--target", str(target), "--python-version", f"{major}.{minor}", "--implementation", "cp", "--abi",
        f"cp{major}{minor}", *platforms, "--only-binary=:all:", *map(str, sorted(wheels.glob("*.whl")))])
    installed = sorted(p.name for p in target.iterdir() if p.name.endswith(".dist-info"))
    print(f"wheels: {len(installed)} install for CPython {major}.{minor} ({', '.join(installed)})")
    version = sh([device_python, "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"]).strip()
    if version == f"{major}.{minor}":
        print("wheels: the device's Python version is here: the legs carry .whl itself")
        return wheels
    twins = work / f"whl-{version}"
    sh(["bash", str(HERE / "fetch_wheels.sh"), version, str(twins)])
    print(f"wheels: not exercised here: importing the cp{major}{minor} builds (no Python {major}.{minor}); the legs "
          f"install and import the same versions for Python {version} instead")
    return twins


def stand_in_cache(folder: Path, device_python: str, wheels: Path, work: Path) -> None:
    """A compile cache 'made on this machine with the device Python's torch': it must travel in
    call 1, unpack there and be tried (junk kernels: the trainer says so and compiles afresh)."""
    site = work / "site-device"  # the package imports soundfile, which the device Python gets from the wheels
    sh([device_python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
        *map(str, sorted(wheels.glob("*.whl")))])
    environment = sh([device_python, "-c", "import json, torch; "
                      "from music2latent2.training.compiling import compile_environment as e; "
                      "print(json.dumps(e(torch.device('cpu'))))"],
                     env={**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}).strip()
    made = json.loads(environment)
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / f"{leg_plan.cache_slug(made['device'], made['torch'])}.tar.gz", "w:gz") as tar:
        for name, data in (("compile_cache.bin", gzip.compress(b"stand-in kernels\n" * 100)),
                           ("compile_cache.bin.json", (environment + "\n").encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device-python", default=sys.executable,
                        help="the Python that runs the device's commands (e.g. a venv with the device's torch)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/m2l2-rehearsal"))
    args = parser.parse_args()
    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    carry = ROOT / CARRY
    shutil.rmtree(carry, ignore_errors=True)
    device_python = str(Path(args.device_python).absolute()) if os.sep in args.device_python else args.device_python
    parked_here = not leg_plan.is_parked(ROOT)
    try:
        if parked_here:  # as the checklist does before the plan; undone below
            print(sh([sys.executable, str(HERE / "leg.py"), "park"]).strip())
        torch_version = sh([device_python, "-c", "import torch; print(torch.__version__)"]).strip()
        print(f"device side: {device_python} (torch {torch_version})")
        twins = check_device_wheels(work, device_python)
        make_corpus(work / "corpus")
        sh([sys.executable, "-m", "music2latent2.training.corpus", "pack", str(work / "corpus"), "--out",
            str(carry / "parts"), "--part-mib", "0.8"])
        tiny = {**TINY_TIMING, "LEG_INIT": "none", "LEG_PRESET": "tiny", "LEG_BATCH": "4", "LEG_WORKERS": "1",
                "LEG_START_WAIT": "5", "LEG_CACHE_GB": "1", "LEG_LOG_EVERY": "10", "LEG_SNAPSHOT_MIB": "1",
                "LEG_CALL_LIMIT_MIB": "6.5"}

        leg = Leg("tiny", work, tiny, device_python, twins)
        leg.call(leg.plan["calls"][0])
        leg.polls()
        leg.finish()
        tail = (leg.kept / "train_tail.txt").read_text()
        arrivals = re.findall(r"^data: \+(\d+) files", tail, re.M)
        if not arrivals:
            raise Failure("tiny: the loader never took in the parts the polls brought")
        index = final_index(leg.kept)
        if not index.get("final"):
            raise Failure("tiny: the last reply's snapshot is not the final one")
        print(f"tiny: {len(arrivals)} arrivals of new files during training; final step {index['step']}; "
              f"speed {json.dumps({k: round(v, 2) for k, v in index['speed'].items() if k.endswith('_per_s')})}")

        leg = Leg("missed-gap", work, tiny, device_python, twins)
        leg.call(leg.plan["calls"][0])
        kept_step = final_index(leg.kept)["step"]
        leg.machine.go_back()  # the next call comes too late
        leg.machine = leg.new_machine()
        _, text = leg.call(leg.plan["calls"][1], expect=(leg_plan.EXIT_FRESH,))
        if not text.startswith("FRESH MACHINE"):
            raise Failure(f"missed-gap: the poll's first line is not FRESH MACHINE: {text[:200]}")
        restart = next(c for c in leg.plan["calls"] if c["name"] == "restart")
        _, text = leg.call(restart)
        if f"training_step {kept_step}" not in text + (leg.kept / "train_tail.txt").read_text():
            raise Failure(f"missed-gap: the restart did not continue from the kept step {kept_step}")
        leg.polls(first_poll=2)
        leg.finish()
        end = final_index(leg.kept)["step"]
        if not end > kept_step:
            raise Failure(f"missed-gap: ended at step {end}, not beyond the kept {kept_step}")
        print(f"missed-gap: kept step {kept_step} from call 1, lost what the machine trained after it; the "
              f"restart continued from {kept_step} to {end}")

        stand_in_cache(carry / "cache", device_python, twins, work)
        leg = Leg("slow-compile", work, {**tiny, "LEG_COMPILE": "on", "LEG_COMPILE_AFTER": "10",
                                         "LEG_COMPILE_DEADLINE_S": "3", "LEG_GPU": "cpu",
                                         "LEG_DEVICE_TORCH": torch_version}, device_python, twins)
        if not any(p.startswith(f"{CARRY}/cache/") for p in leg.plan["calls"][0]["carry"]):
            raise Failure("slow-compile: the plan does not carry the cache made for this machine")
        _, text = leg.call(leg.plan["calls"][0])
        if "unpacked (made on this GPU and torch)" not in text:
            raise Failure("slow-compile: the carried compile cache was not unpacked on the device")
        leg.polls()
        leg.finish()
        tail = (leg.kept / "train_tail.txt").read_text()
        if "compile cache" not in tail:
            raise Failure("slow-compile: the trainer did not try the carried compile cache")
        if "compile deadline passed" not in tail:
            raise Failure("slow-compile: the compile was not stopped at its deadline")
        found = re.findall(r"^speed of the run stopped at its compile deadline: (.*)$", "\n".join(leg.texts), re.M)
        stopped = json.loads(found[-1]) if found else {}
        if not stopped.get("eager_samples_per_s"):
            raise Failure("slow-compile: no reply reported the eager speed of the run stopped at its deadline")
        speed = final_index(leg.kept)["speed"]
        if speed.get("compile") != "off" or not speed.get("eager_samples_per_s"):
            raise Failure(f"slow-compile: expected the restarted run to train eagerly and time it, got {speed}")
        print(f"slow-compile: the compile was stopped at its 3 s deadline (eager before it: "
              f"{stopped['eager_samples_per_s']:.2f} samples/s); the run started again eagerly at "
              f"{speed['eager_samples_per_s']:.2f} samples/s, final step {final_index(leg.kept)['step']}")

        continuation = {**TINY_TIMING, "LEG_BUDGET_S": "900", "LEG_FIRST_S": "120", "LEG_POLL_S": "120",
                        "LEG_INIT": "m2l2-small", "LEG_PRESET": "small", "LEG_BATCH": "1", "LEG_MAX_STEPS": "3",
                        "LEG_LOG_EVERY": "1", "LEG_WORKERS": "1", "LEG_START_WAIT": "5", "LEG_CACHE_GB": "1"}
        leg = Leg("continuation", work, continuation, device_python, twins)
        _, text = leg.call(leg.plan["calls"][0])
        if "training: finished" not in text:
            leg.polls()
        leg.finish()
        sys.path.insert(0, str(ROOT))
        from music2latent2.checkpoint import read_metadata

        shipped = read_metadata(ROOT / leg_plan.PARKED)
        meta = read_metadata(leg.kept / "latest.safetensors")
        step0, delta0 = int(shipped["training_step"]), float(shipped["training_delta"])
        if int(meta["training_step"]) != step0 + 3:
            raise Failure(f"continuation ended at step {meta['training_step']}, expected {step0 + 3}")
        if not 0.01 <= float(meta["training_delta"]) < delta0:
            raise Failure(f"continuation delta {meta['training_delta']} is not between 0.01 and {delta0}")
        print(f"continuation: step {step0} -> {meta['training_step']}, delta {delta0:.4f} -> "
              f"{float(meta['training_delta']):.4f}")
        print(sh([sys.executable, str(HERE / "leg.py"), "verify", str(leg.kept)]).strip())

        print("== here: evaluate the kept continuation and the shipped model, then the ship check")
        evals = {}
        for label, model in (("candidate", str(leg.kept / "latest.safetensors")), ("shipped", "m2l2-small")):
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
        if parked_here:
            print(sh([sys.executable, str(HERE / "leg.py"), "unpark"]).strip())
    print(f"rehearsal ok ({work})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
