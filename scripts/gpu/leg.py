#!/usr/bin/env python3
"""One training leg on a lent GPU: its plan, made here, and every step of it on the device.

A leg has 15 device-minutes, machine start (1-4 min), transfers and idle time included; at most
64 MiB travel per call (the working tree too) and 8 files of 16 MiB come back; the machine goes
back 30 s after a call ends. So a leg is few calls, every wait inside one:

    call 1      setup: wheels, code, the bundled weights (sent once), compile cache, corpus parts
    call 2      start: more parts, then training detached until the lease's end (from held_s)
    call 3..N   poll: returns each new snapshot (every <= 3 min) in pieces, the last at the end

The bundled weights (41 MiB) would otherwise travel in every call as a tracked file: ``park``
takes them out of git's index (the file stays where it is) and ignores them locally, so the
tree is ~2 MiB and call 1 carries them once; ``unpark`` undoes it.

Here:   plan [--json] | park | unpark | keep FILES_AT [--into DIR]
Device: setup PART... | unpack PART... | start PART... [-- TRAIN ARGS] | poll [SECONDS]

Environment (defaults): LEG_NUMBER (2: the leg after the shipped one), LEG_INIT (m2l2-small;
"none": fresh), LEG_PRESET (small), LEG_BATCH (32), LEG_WORKERS (12), LEG_SNAPSHOT_MINUTES
(2.5), LEG_BUDGET_S (900), LEG_HELD_S (start: the held_s of the last reply), LEG_DIR (/tmp/leg),
CORPUS_DIR (/tmp/corpus), LEG_CARRY_DIR (.carry), OUT (set by the device tool). The timing
assumptions of the plan are the LEG_*_S variables in ``Timing``. scripts/gpu/README.md is the
checklist that uses all this.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

ROOT = Path(os.environ.get("LEG_ROOT") or Path(__file__).resolve().parents[2])  # LEG_ROOT: tests
PARKED = "music2latent2/weights/m2l2-small.safetensors"  # the bundled weights: sent once, in call 1
MIB = 2 ** 20
CALL_LIMIT_MIB = 64.0
CALL_MARGIN_MIB = 0.5  # headroom for the tool's own accounting of a call
MAX_CARRY_PATHS = 8
MAX_FILES_BACK, FILE_BACK_MIB = 8, 16.0
PIECE_MIB = 15.0  # snapshot piece size (the trainer's --snapshot-piece-mib)
RESERVE_MINUTES = 0.1  # the trainer's --reserve-minutes: its schedules end this long before the end
CACHE_NAME = "compile_cache.bin.gz"
HELD_PLACEHOLDER = "HELD_SECONDS"  # replaced by the held_s of the last reply
MIB_PER_AUDIO_HOUR = 33.0  # the corpus's Vorbis at quality 0.5 (docs/corpus.md)
DATA_SPECS = ("music:0.6", "midi:0.15", "speech:0.15", "real:0.1")
# Settings the device side reads: the plan writes those set here into every command it prints.
DEVICE_VARS = ("LEG_CARRY_DIR", "LEG_PRESET", "LEG_BATCH", "LEG_LR", "LEG_WARMUP", "LEG_WORKERS", "LEG_CACHE_GB",
               "LEG_COMPILE", "LEG_SNAPSHOT_MINUTES", "LEG_LOG_EVERY", "LEG_MAX_STEPS", "LEG_START_WAIT") + \
    tuple(f"LEG_{name.upper()}" for name in ("budget_s", "start_s", "call_s", "gap_s", "tail_s"))


def env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_float(name: str, default: float) -> float:
    text = env(name, str(default))
    try:
        return float(text)
    except ValueError:
        raise SystemExit(f"{name} must be a number, got {text!r}") from None


@dataclass
class Timing:
    """What the plan assumes a leg's calls cost (seconds); each can be set as LEG_<NAME>."""

    budget_s: float = 900.0  # device time of a session
    start_s: float = 240.0  # machine start: the plan must hold for the slowest seen
    call_s: float = 10.0  # a call's transfers and start-up, besides its command
    gap_s: float = 20.0  # from a reply to the next call (the session's turn)
    setup_s: float = 15.0  # wheels, code copy, import check
    unpack_s_per_mib: float = 0.1
    trainer_start_s: float = 25.0  # imports, model, workers (before the data decode)
    decode_s_per_hour: float = 10.0  # leg 1: 5.4 h decoded in < 50 s on 16 threads
    tail_s: float = 45.0  # trainer end -> final snapshot and export -> files back -> give_back
    min_train_min: float = 9.0

    @classmethod
    def from_env(cls) -> "Timing":
        return cls(**{k: env_float(f"LEG_{k.upper()}", v) for k, v in asdict(cls()).items()})


# --------------------------------------------------------------------------- here: the plan
def git_files(root: Path) -> List[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, check=True,
                         capture_output=True).stdout.decode()
    return [p for p in out.split("\0") if p]


def tree_bytes(root: Path) -> int:
    """What a call sends besides its carry: tracked and untracked-not-ignored files, the bundled
    weights left out (parked, or about to be)."""
    return sum((root / p).stat().st_size for p in git_files(root) if p != PARKED and (root / p).is_file())


def path_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def is_parked(root: Path) -> bool:
    return PARKED not in subprocess.run(["git", "ls-files", "--", PARKED], cwd=root, capture_output=True,
                                        text=True, check=True).stdout.split()


def _part_key(path: Path) -> int:
    return int(path.name[1:]) if path.name[1:].isdigit() else 0


@dataclass
class Call:
    number: int
    kind: str  # setup | unpack | start | poll
    tree_mib: float
    carry: List[Tuple[str, float]] = field(default_factory=list)  # (path, MiB)
    command: str = ""

    @property
    def carry_mib(self) -> float:
        return sum(size for _, size in self.carry)

    @property
    def total_mib(self) -> float:
        return self.tree_mib + self.carry_mib


def _fill(call: Call, parts: List[Tuple[str, float]]) -> List[Tuple[str, float]]:
    """Move parts into ``call`` while it stays inside a call's limits; return the rest."""
    limit = CALL_LIMIT_MIB - CALL_MARGIN_MIB
    rest = list(parts)
    while rest and len(call.carry) < MAX_CARRY_PATHS and call.total_mib + rest[0][1] <= limit:
        call.carry.append(rest.pop(0))
    return rest


def make_plan(root: Path, timing: Timing, leg: int, unpack_calls: int, snapshot_min: float) -> Dict:
    """Every call of a leg with its sizes, the planned training minutes and the problems found."""
    carry_dir = env("LEG_CARRY_DIR", ".carry")
    notes, problems = [], []
    tree = tree_bytes(root) / MIB
    fixed: List[Tuple[str, float]] = []
    wheels = root / ".whl"
    if any(wheels.glob("*.whl")):
        fixed.append((".whl", path_bytes(wheels) / MIB))
    else:
        fixed.append((".whl", 1.8))
        notes.append(".whl not fetched yet (bash scripts/gpu/fetch_wheels.sh): 1.8 MiB assumed")
    init = env("LEG_INIT", "m2l2-small")
    # A continuation from a kept snapshot (runs/legN/latest.safetensors, ignored by git) carries
    # that file instead of the bundled one.
    init_file = init if init.lower() != "none" and (root / init).is_file() and not Path(init).is_absolute() \
        else PARKED
    weights = path_bytes(root / init_file) / MIB
    fixed.append((init_file, weights))
    if not is_parked(root):
        notes.append("the bundled weights are still tracked: run `bash scripts/gpu/leg.sh park` before call 1")
    cache = root / carry_dir / CACHE_NAME
    if cache.is_file():
        fixed.append((f"{carry_dir}/{CACHE_NAME}", path_bytes(cache) / MIB))
    else:
        notes.append(f"no {carry_dir}/{CACHE_NAME} (first compiled leg): the loss compiles cold inside the window")
    folders = sorted((p for p in (root / carry_dir).glob("p*") if p.is_dir()), key=_part_key)
    if folders:
        parts = [(f"{carry_dir}/{p.name}", path_bytes(p) / MIB) for p in folders]
    else:
        count, size = int(env_float("LEG_PARTS", 180)), env_float("LEG_PART_MIB", 6.0)
        parts = [(f"{carry_dir}/p{n}", size) for n in range(1, count + 1)]
        notes.append(f"no corpus parts in {carry_dir}/ yet: {count} parts of {size:g} MiB assumed "
                     "(corpus pack ... --part-mib 6)")

    def layout(order: List[Tuple[str, float]]) -> List[Call]:
        # Training starts in call 1 unless unpack calls are asked for (more data, fewer minutes).
        calls = [Call(1, "setup+start" if unpack_calls == 0 else "setup", tree, list(fixed))]
        rest = _fill(calls[0], order)
        for n in range(unpack_calls):
            calls.append(Call(len(calls) + 1, "unpack+start" if n == unpack_calls - 1 else "unpack", tree))
            rest = _fill(calls[-1], rest)
        return calls

    per_leg = sum(1 for c in layout(parts) for path, _ in c.carry if path.startswith(f"{carry_dir}/p"))
    offset = ((leg - 2) * per_leg) % len(parts) if parts and per_leg else 0
    calls = layout(parts[offset:] + parts[:offset])
    settings = {"LEG_NUMBER": str(leg), "LEG_INIT": init}
    settings.update({k: os.environ[k] for k in DEVICE_VARS if k in os.environ})
    prefix = " ".join(f"{k}={v}" for k, v in settings.items())
    for call in calls:
        names = " ".join(p for p, _ in call.carry if p.startswith(f"{carry_dir}/p"))
        command = {"setup": "setup", "setup+start": "setup", "unpack": "unpack", "unpack+start": "unpack"}[call.kind]
        call.command = f"export {prefix}; bash scripts/gpu/leg.sh {command} {names}".strip()
        if call.kind.endswith("+start"):
            held = "" if call.number == 1 else f"LEG_HELD_S={HELD_PLACEHOLDER} "
            call.command += f" && {held}bash scripts/gpu/leg.sh start"
    data_mib = sum(size for c in calls for p, size in c.carry if p.startswith(f"{carry_dir}/p"))
    hours = data_mib / MIB_PER_AUDIO_HOUR

    def training_s(start_s: float) -> float:
        spent = start_s + timing.call_s + timing.setup_s + calls[0].carry_mib * timing.unpack_s_per_mib
        for call in calls[1:]:
            spent += timing.gap_s + timing.call_s + call.carry_mib * timing.unpack_s_per_mib
        spent += timing.trainer_start_s + hours * timing.decode_s_per_hour
        return timing.budget_s - spent - timing.tail_s - RESERVE_MINUTES * 60

    train_s, train_fast_s = training_s(timing.start_s), training_s(60.0)
    polls = max(1, math.ceil(train_s / (snapshot_min * 60))) + 1
    for _ in range(polls):  # each one also moves the end to where the lease's held_s puts it
        calls.append(Call(len(calls) + 1, "poll", tree,
                          command=f"export {prefix}; LEG_HELD_S={HELD_PLACEHOLDER} bash scripts/gpu/leg.sh poll"))
    pieces = math.ceil(weights / PIECE_MIB)  # a snapshot is the same fp16 checkpoint as the bundled one
    back_files = pieces + 3 + (1 if cache.is_file() or env("LEG_COMPILE", "auto") != "off" else 0)
    back_mib = weights + 1.0 + (path_bytes(cache) / MIB if cache.is_file() else 0.0)
    for call in calls:
        if call.total_mib > CALL_LIMIT_MIB:
            problems.append(f"call {call.number} sends {call.total_mib:.1f} MiB > {CALL_LIMIT_MIB:g} MiB")
        if len(call.carry) > MAX_CARRY_PATHS:
            problems.append(f"call {call.number} carries {len(call.carry)} paths > {MAX_CARRY_PATHS}")
    if back_files > MAX_FILES_BACK:
        problems.append(f"a poll would return {back_files} files > {MAX_FILES_BACK}")
    if train_s / 60 < timing.min_train_min:
        problems.append(f"{train_s / 60:.1f} training minutes < {timing.min_train_min:g} with a "
                        f"{timing.start_s:g} s machine start")
    return {"leg": leg, "init": init, "timing": asdict(timing),
            "calls": [{"call": c.number, "kind": c.kind, "tree_mib": c.tree_mib, "carry_mib": c.carry_mib,
                       "total_mib": c.total_mib, "carry": [p for p, _ in c.carry], "command": c.command}
                      for c in calls],
            "training_minutes": train_s / 60, "training_minutes_fast_start": train_fast_s / 60,
            "data_mib": data_mib, "data_hours": hours, "parts_total": len(parts), "rotation_offset": offset,
            "snapshot_minutes": snapshot_min, "poll_back_files": back_files, "poll_back_mib": back_mib,
            "notes": notes, "problems": problems}


def print_plan(plan: Dict) -> None:
    t = plan["timing"]
    print(f"leg {plan['leg']} from {plan['init']}: {t['budget_s'] / 60:g} device-minutes, "
          f"machine start assumed {t['start_s']:g} s")
    for c in plan["calls"]:
        print(f"call {c['call']}: tree {c['tree_mib']:.1f} MiB + carry {c['carry_mib']:.1f} MiB "
              f"= {c['total_mib']:.1f} MiB  ({c['kind']})")
        print(f"    carry   {json.dumps(c['carry'])}")
        print(f"    command {c['command']}")
    print(f"training: {plan['training_minutes']:.1f} min planned ({plan['training_minutes_fast_start']:.1f} min "
          f"with a 60 s start); snapshots every {plan['snapshot_minutes']:g} min")
    print(f"data: {plan['data_mib']:.0f} MiB ~ {plan['data_hours']:.1f} h of audio "
          f"(of {plan['parts_total']} parts, rotation offset {plan['rotation_offset']})")
    print(f"back per poll: {plan['poll_back_files']} files, {plan['poll_back_mib']:.1f} MiB "
          f"(limit {MAX_FILES_BACK} files of {FILE_BACK_MIB:g} MiB)")
    for note in plan["notes"]:
        print(f"note: {note}")
    for problem in plan["problems"]:
        print(f"PROBLEM: {problem}")
    print("plan ok" if not plan["problems"] else "plan NOT ok")


def cmd_plan(args: argparse.Namespace) -> int:
    plan = make_plan(ROOT, Timing.from_env(), int(env_float("LEG_NUMBER", 2)),
                     int(env_float("LEG_UNPACK_CALLS", 0)), env_float("LEG_SNAPSHOT_MINUTES", 2.5))
    if args.json:
        print(json.dumps(plan, indent=1))
    else:
        print_plan(plan)
    return 1 if plan["problems"] else 0


# --------------------------------------------------------------------------- here: park, keep
def _exclude_file() -> Path:
    git_dir = subprocess.run(["git", "rev-parse", "--git-dir"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
    return (ROOT / git_dir / "info" / "exclude").resolve()


def cmd_park(args: argparse.Namespace) -> int:
    if not (ROOT / PARKED).is_file():
        raise SystemExit(f"{PARKED} is missing: nothing to park")
    exclude = _exclude_file()
    line = f"/{PARKED}"
    lines = exclude.read_text().splitlines() if exclude.is_file() else []
    if line not in lines:
        exclude.parent.mkdir(parents=True, exist_ok=True)
        exclude.write_text("\n".join(lines + [line]) + "\n")
    if not is_parked(ROOT):
        subprocess.run(["git", "rm", "--cached", "-q", "--", PARKED], cwd=ROOT, check=True)
    print(f"parked {PARKED}: out of the index and ignored, the file itself untouched; "
          "undo with `bash scripts/gpu/leg.sh unpark` (never commit while parked)")
    return 0


def cmd_unpark(args: argparse.Namespace) -> int:
    exclude = _exclude_file()
    if exclude.is_file():
        kept = [x for x in exclude.read_text().splitlines() if x != f"/{PARKED}"]
        exclude.write_text("\n".join(kept) + ("\n" if kept else ""))
    if is_parked(ROOT):
        subprocess.run(["git", "reset", "-q", "--", PARKED], cwd=ROOT, check=True)
    if is_parked(ROOT):
        raise SystemExit(f"{PARKED} is still not in the index")
    print(f"unparked {PARKED}: tracked again")
    return 0


def cmd_keep(args: argparse.Namespace) -> int:
    """Copy one reply's files out of the tool's folder (the next call replaces them), join the
    snapshot they hold into a verified checkpoint, and keep the compile cache for the next leg."""
    src, into = Path(args.files_at), Path(args.into)
    if not src.is_dir():
        raise SystemExit(f"{src} is not a folder")
    into.mkdir(parents=True, exist_ok=True)
    number = 1 + max((int(p.name[5:]) for p in into.glob("poll-*") if p.name[5:].isdigit()), default=0)
    dest = into / f"poll-{number:02d}"
    shutil.copytree(src, dest)
    for name in ("log.jsonl", "train_tail.txt"):
        if (dest / name).is_file():
            shutil.copyfile(dest / name, into / name)
    sys.path.insert(0, str(ROOT))
    from music2latent2.fileio import atomic_write

    def copy_atomically(src_file: Path, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda tmp: shutil.copyfile(src_file, tmp))

    cache = dest / CACHE_NAME
    if cache.is_file():
        target = ROOT / env("LEG_CARRY_DIR", ".carry") / CACHE_NAME
        copy_atomically(cache, target)
        print(f"compile cache ({cache.stat().st_size / MIB:.1f} MiB) -> {target}")
    if (dest / "pieces.json").is_file():
        from music2latent2.checkpoint import sha256_file
        from music2latent2.training.snapshot import join_snapshot

        step = json.loads((dest / "pieces.json").read_text())["step"]
        path = join_snapshot(dest, into / f"step-{step:08d}.safetensors")  # verifies every sha256
        copy_atomically(path, into / "latest.safetensors")
        print(f"kept step {step}: {path} (sha256 {sha256_file(path)[:16]}...) = {into / 'latest.safetensors'}")
    else:
        print(f"kept {dest} (no snapshot in it)")
    return 0


# --------------------------------------------------------------------------- device side
def leg_dir() -> Path:
    return Path(env("LEG_DIR", "/tmp/leg"))


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


def unpack_parts(parts: Sequence[str]) -> None:
    for part in parts:
        subprocess.run([python(), "-m", "music2latent2.training.corpus", "unpack", part, "--into",
                        env("CORPUS_DIR", "/tmp/corpus")], check=True, env=child_env())


def cmd_setup(args: argparse.Namespace) -> int:
    leg = leg_dir()
    if not (Path("music2latent2") / "__init__.py").is_file():
        raise SystemExit("run from the repository root")
    init = env("LEG_INIT", "m2l2-small")
    needed = PARKED if init == "m2l2-small" else init if init.lower() != "none" else None
    if needed is not None and not Path(needed).exists():
        raise SystemExit(f"{needed} did not arrive: name it in call 1's carry (the plan does)")
    leg.mkdir(parents=True, exist_ok=True)
    (leg / "first_command").write_text(f"{time.time():.3f}\n")
    wheels = sorted(str(p) for p in Path(".whl").glob("*.whl"))
    if wheels:
        subprocess.run([python(), "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(leg / "site"), *wheels], check=True)
    # A private copy of the code: every call re-sends the working tree, the run must not see it move.
    shutil.rmtree(leg / "code", ignore_errors=True)
    for name in ("music2latent2", "benchmarks"):
        shutil.copytree(name, leg / "code" / name)
    cache = Path(env("LEG_CARRY_DIR", ".carry")) / CACHE_NAME
    if cache.is_file():
        with gzip.open(cache) as src, open(leg / "compile_cache.bin", "wb") as dst:
            shutil.copyfileobj(src, dst)
        print(f"compile cache: {cache} unpacked")
    subprocess.run([python(), "-c", "import soundfile, soxr, torch, music2latent2 as m; print('soundfile', "
                    "soundfile.__version__, 'soxr', soxr.__version__, 'torch', torch.__version__, 'cuda', "
                    "torch.cuda.is_available() and torch.cuda.get_device_name(), 'code', m.__file__)"],
                   check=True, env=child_env())
    unpack_parts(args.parts)
    return 0


def cmd_unpack(args: argparse.Namespace) -> int:
    unpack_parts(args.parts)
    return 0


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


def _tail(path: Path, lines: int) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def lease_end(timing: Timing) -> float:
    """Write (and return) the UNIX time training must end by: the budget less the device time
    spent and the tail. Spent = LEG_HELD_S (the held_s of the last reply) plus what passed on this
    machine since the previous call ended (the gap, this call's transfer, this command so far).
    Without LEG_HELD_S (call 1, before any reply) the plan's slowest machine start is assumed and
    the first poll corrects it."""
    leg, now = leg_dir(), time.time()
    held_text = env("LEG_HELD_S", "")
    last = leg / "last_call_end"
    if held_text:
        try:
            held = float(held_text)
        except ValueError:
            raise SystemExit(f"LEG_HELD_S must be the held_s of the last reply (seconds), got {held_text!r}") from None
        spent = held + (now - float(last.read_text()) if last.is_file() else timing.gap_s + timing.call_s)
        how = f"held_s {held:g} + {spent - held:.0f} s since"
    else:
        first = leg / "first_command"
        began = float(first.read_text()) if first.is_file() else now
        spent = timing.start_s + timing.call_s + (now - began)
        how = f"assumed: a {timing.start_s:g} s start, to be corrected by the first poll"
    end_by = now + timing.budget_s - spent - timing.tail_s
    tmp = leg / "end_by.tmp"
    tmp.write_text(f"{end_by:.1f}\n")
    os.replace(tmp, leg / "end_by")
    print(f"device time spent: {spent:.0f} s ({how}); training ends in {(end_by - now) / 60:.2f} min")
    return end_by


def cmd_start(args: argparse.Namespace) -> int:
    leg = leg_dir()
    if not (leg / "code").is_dir():
        raise SystemExit(f"{leg}/code is missing: call 1 (setup) did not run on this machine (it went back?)")
    pid_file = leg / "pid"
    if pid_file.is_file() and _alive(int(pid_file.read_text())):
        raise SystemExit(f"training already runs (pid {pid_file.read_text().strip()}): poll it")
    unpack_parts(args.parts)
    end_by = lease_end(Timing.from_env())
    minutes = (end_by - time.time()) / 60
    if minutes < 1:
        raise SystemExit(f"{minutes:.2f} min left to train: not starting")
    corpus = Path(env("CORPUS_DIR", "/tmp/corpus"))
    data = [f"{corpus}/{spec}" for spec in DATA_SPECS if (corpus / spec.split(":")[0]).is_dir()]
    if not data:
        raise SystemExit(f"no corpus under {corpus} (music/ midi/ speech/ real/)")
    init = env("LEG_INIT", "m2l2-small")
    run = leg / "run"
    shutil.rmtree(run, ignore_errors=True)
    cmd = [python(), "-m", "music2latent2.training", "train", "--data", *data, "--out", str(run),
           "--preset", env("LEG_PRESET", "small"), "--batch-size", env("LEG_BATCH", "32"),
           "--lr", env("LEG_LR", "2e-4"),
           "--ema", "0.999", "--delta-end", "0.01", "--latent-penalty", "1", "--end-file", str(leg / "end_by"),
           "--reserve-minutes", str(RESERVE_MINUTES),
           "--snapshot-minutes", env("LEG_SNAPSHOT_MINUTES", "2.5"), "--snapshot-piece-mib", str(PIECE_MIB),
           "--save-every", "100000000", "--eval-every", "100000000", "--log-every", env("LEG_LOG_EVERY", "100"),
           "--workers", env("LEG_WORKERS", "12"), "--cache-gb", env("LEG_CACHE_GB", "40"),
           "--compile", env("LEG_COMPILE", "auto"), "--compile-cache", str(leg / "compile_cache.bin"),
           "--seed", str(int(env_float("LEG_NUMBER", 2)))]
    if init.lower() == "none":  # a fresh run starts as a pure denoiser (ECT)
        cmd += ["--delta-start", "1", "--warmup", env("LEG_WARMUP", "500")]
    else:
        path = Path(init)
        cmd += ["--init-from", str(path.resolve()) if path.exists() else init, "--warmup", env("LEG_WARMUP", "200")]
    if env("LEG_MAX_STEPS", ""):
        cmd += ["--more-steps", env("LEG_MAX_STEPS", "")]
    cmd += args.train_args
    (leg / "train_cmd.txt").write_text(" ".join(cmd) + "\n")
    log = open(leg / "train.log", "wb")
    # A new session: the device tool ends what a command leaves running, except such a process.
    # The shell records the trainer's exit status for the polls.
    script = 'python_status=0; "$@" || python_status=$?; echo "$python_status" > "$LEG_EXIT_FILE"'
    e = child_env()
    e["LEG_EXIT_FILE"] = str(leg / "exit_code")
    (leg / "exit_code").unlink(missing_ok=True)
    (leg / "returned.json").unlink(missing_ok=True)
    proc = subprocess.Popen(["sh", "-c", script, "sh", *cmd], cwd=leg, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, env=e)
    pid_file.write_text(f"{proc.pid}\n")
    waited = 0.0
    while waited < env_float("LEG_START_WAIT", 20) and proc.poll() is None:
        time.sleep(1)
        waited += 1
    print(_tail(leg / "train.log", 15))
    if proc.poll() is not None and proc.returncode != 0 or (leg / "exit_code").is_file() and \
            (leg / "exit_code").read_text().strip() != "0":
        print("training failed at its start (train.log above)")
        return 1
    print(f"training: running (pid {proc.pid})")
    return 0


def _latest_snapshot(run: Path) -> str | None:
    marker = run / "snapshots" / "LATEST"
    return marker.read_text().strip() if marker.is_file() else None


def cmd_poll(args: argparse.Namespace) -> int:
    leg, out = leg_dir(), out_dir()
    pid_file = leg / "pid"
    if not pid_file.is_file():
        raise SystemExit(f"no training started in {leg} (this machine has not run `start`: it went back?)")
    pid = int(pid_file.read_text())
    run = leg / "run"
    returned_file = leg / "returned.json"
    returned = json.loads(returned_file.read_text()) if returned_file.is_file() else {}
    if env("LEG_HELD_S", "") and _alive(pid):
        lease_end(Timing.from_env())
    t0 = time.time()
    while _alive(pid) and time.time() - t0 < args.seconds and _latest_snapshot(run) in (None, returned.get("snapshot")):
        time.sleep(2)
    alive = _alive(pid)
    files: List[Path] = []
    snap = _latest_snapshot(run)
    if snap is not None:
        folder = run / "snapshots" / snap
        files += sorted(folder.iterdir())
    for name in ("log.jsonl",):
        if (run / name).is_file():
            files.append(run / name)
    (out / "train_tail.txt").write_text(_tail(leg / "train.log", 400) + "\n")
    cache = leg / "compile_cache.bin"
    cache_back = None
    if cache.is_file() and returned.get("cache_mtime") != cache.stat().st_mtime:
        with open(cache, "rb") as src, gzip.open(out / CACHE_NAME, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst)
        if (out / CACHE_NAME).stat().st_size > FILE_BACK_MIB * MIB or len(files) + 2 > MAX_FILES_BACK:
            print(f"compile cache not returned ({(out / CACHE_NAME).stat().st_size / MIB:.1f} MiB gzipped, "
                  f"or no room among {MAX_FILES_BACK} files)")
            (out / CACHE_NAME).unlink()
        else:
            cache_back = cache.stat().st_mtime
    for f in files:
        shutil.copyfile(f, out / f.name)
    back = sorted(out.iterdir())
    if len(back) > MAX_FILES_BACK or any(f.stat().st_size > FILE_BACK_MIB * MIB for f in back):
        raise SystemExit(f"{len(back)} files in $OUT exceed what a call returns ({MAX_FILES_BACK} of "
                         f"{FILE_BACK_MIB:g} MiB)")
    new = snap is not None and snap != returned.get("snapshot")
    returned["snapshot"] = snap
    if cache_back is not None:
        returned["cache_mtime"] = cache_back
    returned_file.write_text(json.dumps(returned) + "\n")
    print(_tail(leg / "train.log", 8))
    left = (float((leg / "end_by").read_text()) - time.time()) / 60 if (leg / "end_by").is_file() else float("nan")
    print(f"snapshot: {snap or 'none yet'}{' (new)' if new else ' (returned before)' if snap else ''}; "
          f"back: {len(back)} files, {sum(f.stat().st_size for f in back) / MIB:.1f} MiB")
    if alive:
        print(f"training: running, {left:.1f} min to its end")
        return 0
    status = (leg / "exit_code").read_text().strip() if (leg / "exit_code").is_file() else "unknown"
    print(f"training: ended (exit status {status})")
    return 0 if status == "0" else 1


def _record_call_end() -> None:
    leg = leg_dir()
    if leg.is_dir():
        (leg / "last_call_end").write_text(f"{time.time():.3f}\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="leg.sh", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="(here) every call of the leg, its size, the training minutes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan, device=False)
    sub.add_parser("park", help="(here) keep the bundled weights out of the travelling tree").set_defaults(
        func=cmd_park, device=False)
    sub.add_parser("unpark", help="(here) track the bundled weights again").set_defaults(func=cmd_unpark, device=False)
    k = sub.add_parser("keep", help="(here) keep a reply's files, join its snapshot")
    k.add_argument("files_at")
    k.add_argument("--into", default="runs/leg")
    k.set_defaults(func=cmd_keep, device=False)
    for name, func in (("setup", cmd_setup), ("unpack", cmd_unpack)):
        s = sub.add_parser(name, help="(device) " + ("wheels, code, weights, cache, parts" if name == "setup"
                                                     else "more corpus parts"))
        s.add_argument("parts", nargs="*")
        s.set_defaults(func=func, device=True)
    st = sub.add_parser("start", help="(device) parts, then training detached until the lease's end")
    st.add_argument("parts", nargs="*", help="then, after --, more trainer flags (they win)")
    st.set_defaults(func=cmd_start, device=True)
    pl = sub.add_parser("poll", help="(device) wait for a new snapshot or the end, return it")
    pl.add_argument("seconds", nargs="?", type=float, default=560.0)
    pl.set_defaults(func=cmd_poll, device=True)
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args: List[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, train_args = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    args.train_args = train_args
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return args.func(args)
    finally:
        if args.device:
            _record_call_end()


if __name__ == "__main__":
    raise SystemExit(main())
