"""The plan of a training leg, made here: which call carries what, when each returns, what it trains.

Standard library only (the plan runs in a second here, between calls too). ``leg.py`` is the
command line; this module holds the rules both sides share: the device's timing assumptions
(:class:`Timing`), when a call returns (:func:`call_deadline`), the call limits and the checks
that make a plan "NOT ok" (wheels, corpus parts, parking, sizes).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

PARKED = "music2latent2/weights/m2l2-small.safetensors"  # the bundled weights: sent once, in call 1
MIB = 2 ** 20
CALL_LIMIT_MIB = 64.0
CALL_HEADROOM_MIB = 1.0  # a call this close to the limit is refused: the tool's own accounting may differ
MAX_CARRY_PATHS = 8
MAX_FILES_BACK, FILE_BACK_MIB = 8, 16.0
PIECE_MIB = 15.0  # snapshot piece size (the trainer's --snapshot-piece-mib)
RESERVE_MINUTES = 0.1  # the trainer's --reserve-minutes: its schedules end this long before the end
CACHE_BACK = "compile-cache.tar.gz"  # the compile cache as a poll returns it (kernels + their environment)
EXIT_FRESH = 3  # a poll's exit status on a machine where no leg runs (FRESH MACHINE)
PLACEHOLDER = "SECONDS_LEFT"  # replaced by the budget_left_s of the latest reply (or of status before call 1)
MIB_PER_AUDIO_HOUR = 33.0  # the corpus's Vorbis at quality 0.5 (docs/corpus.md)
DATA_SPECS = ("music:0.6", "midi:0.15", "speech:0.15", "real:0.1")
# The device's Python, as its image lists it (KINDS.md of the device tool): wheels must install there.
DEVICE_PYTHON = (3, 12)
DEVICE_GLIBC = (2, 39)
DEVICE_TORCH = "2.11.0+cu130"
# Settings the device side reads: the plan writes those set here into every command it prints.
DEVICE_VARS = ("LEG_CARRY_DIR", "LEG_PRESET", "LEG_BATCH", "LEG_LR", "LEG_WARMUP", "LEG_WORKERS", "LEG_CACHE_GB",
               "LEG_COMPILE", "LEG_COMPILE_AFTER", "LEG_COMPILE_DEADLINE_S", "LEG_LOG_EVERY", "LEG_MAX_STEPS",
               "LEG_START_WAIT", "LEG_SUMMARY_INIT_STD")


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
    """What a leg's calls cost and how long each waits (seconds); each can be set as LEG_<NAME>.

    The costs are leg 1's measurements (scripts/gpu/README.md) or estimates marked there; the
    waits are choices: call 1 returns its first snapshot ``first_s`` after its command began, a
    poll ``poll_s`` after its own began, and a poll that would leave less than ``min_last_s``
    for one more waits for the end instead (at most ``max_wait_s``: a command may run 600 s).
    """

    budget_s: float = 900.0  # device time of a session (status's budget_left_s before call 1)
    start_s: float = 240.0  # machine start: the plan must hold for the slowest seen
    call_s: float = 10.0  # a call's transfers and start-up, besides its command
    gap_s: float = 20.0  # from a reply to the next call (the session's turn)
    setup_s: float = 20.0  # wheels, code copy, import check
    unpack_s_per_mib: float = 0.05
    trainer_start_s: float = 25.0  # imports, model, workers (before the data decode)
    decode_s_per_hour: float = 10.0  # leg 1: 5.4 h decoded in < 50 s on 16 threads
    snapshot_s: float = 10.0  # a requested snapshot written and copied to $OUT
    tail_s: float = 40.0  # the trainer's end -> final snapshot -> files back -> give_back
    first_s: float = 270.0
    poll_s: float = 240.0
    min_last_s: float = 150.0
    max_wait_s: float = 540.0
    min_train_min: float = 8.0
    min_start_s: float = 60.0  # a start that would leave less training than this does not start

    @classmethod
    def from_env(cls) -> "Timing":
        return cls(**{k: env_float(f"LEG_{k.upper()}", v) for k, v in asdict(cls()).items()})


def call_deadline(command_start: float, end_by: float, slice_s: float, timing: Timing) -> Tuple[float, bool]:
    """When a call started at ``command_start`` returns, and whether it waits for the end.

    It returns ``slice_s`` after it began with a requested snapshot, unless the end comes within
    ``slice_s + min_last_s`` and inside the call's longest wait: then it waits for the final
    snapshot (one call fewer, and no short last one).
    """
    if end_by - command_start <= slice_s + timing.min_last_s and end_by - command_start + timing.snapshot_s \
            <= timing.max_wait_s:
        return end_by, True
    return command_start + min(slice_s, timing.max_wait_s), False


# --------------------------------------------------------------------------- what travels
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


# --------------------------------------------------------------------------- wheels
WHEEL_NAME = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)"
                        r"\.whl$")


def wheel_fits_device(filename: str, python: Tuple[int, int] = DEVICE_PYTHON,
                      glibc: Tuple[int, int] = DEVICE_GLIBC) -> Optional[str]:
    """None if pip on the device (CPython ``python``, x86-64 Linux, ``glibc``) accepts this wheel;
    otherwise why not. Read from the file name's tags (PEP 425, PEP 600), as pip reads them."""
    m = WHEEL_NAME.match(filename)
    if m is None:
        return "not a wheel file name"
    cp = f"cp{python[0]}{python[1]}"
    pys, abis, plats = (m.group(k).split(".") for k in ("py", "abi", "plat"))

    def py_ok(tag: str) -> bool:
        if tag in (f"py{python[0]}", f"py{python[0]}{python[1]}", cp):
            return True
        stable = re.fullmatch(r"cp(\d)(\d+)", tag)  # an abi3 wheel built for cp3X runs on 3.X and later
        return bool(stable) and "abi3" in abis and (int(stable.group(1)), int(stable.group(2))) <= python

    def plat_ok(tag: str) -> bool:
        if tag == "any":
            return True
        legacy = {"manylinux1_x86_64": (2, 5), "manylinux2010_x86_64": (2, 12), "manylinux2014_x86_64": (2, 17)}
        if tag in legacy:
            return legacy[tag] <= glibc
        pep600 = re.fullmatch(r"manylinux_(\d+)_(\d+)_x86_64", tag)
        return bool(pep600) and (int(pep600.group(1)), int(pep600.group(2))) <= glibc

    if not any(py_ok(t) for t in pys):
        return f"Python tags {m.group('py')} do not include CPython {python[0]}.{python[1]}"
    if not any(a in ("none", "abi3", cp) for a in abis):
        return f"ABI {m.group('abi')} is not {cp}"
    if not any(plat_ok(t) for t in plats):
        return f"platform {m.group('plat')} needs more than x86-64 glibc {glibc[0]}.{glibc[1]}"
    return None


def required_wheels(root: Path) -> Dict[str, str]:
    """``{name: version}`` of scripts/gpu/wheels.txt."""
    wanted = {}
    for line in (root / "scripts" / "gpu" / "wheels.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            wanted[name.lower().replace("-", "_")] = version
    return wanted


def check_wheels(root: Path, folder: Path) -> List[str]:
    """Problems of the wheels a call carries: missing, extra versions, or not installable there."""
    found: Dict[str, List[str]] = {}
    problems = []
    for whl in sorted(folder.glob("*.whl")):
        why = wheel_fits_device(whl.name)
        if why is not None:
            problems.append(f"{folder.name}/{whl.name} cannot install on the device ({why})")
        m = WHEEL_NAME.match(whl.name)
        if m is not None:
            found.setdefault(m.group("name").lower(), []).append(m.group("version"))
    for name, version in required_wheels(root).items():
        versions = found.get(name, [])
        if not versions:
            problems.append(f"{folder.name}/ lacks {name}=={version} (bash scripts/gpu/fetch_wheels.sh)")
        elif versions != [version]:
            problems.append(f"{folder.name}/ holds {name} {', '.join(versions)}, wheels.txt wants {version} "
                            "(one version each: run fetch_wheels.sh again)")
    return problems


# --------------------------------------------------------------------------- corpus parts, compile cache
def _part_key(path: Path) -> int:
    return int(path.name[1:]) if path.name[1:].isdigit() else 0


def corpus_parts(carry: Path) -> Tuple[List[Path], List[str]]:
    """The packed parts in ``carry`` in order, and what is wrong with them as one set."""
    folders = sorted((p for p in carry.glob("p*") if p.is_dir() and p.name[1:].isdigit()), key=_part_key)
    problems = []
    infos = []
    for p in folders:
        try:
            infos.append(json.loads((p / "part.json").read_text()))
        except (OSError, ValueError):
            problems.append(f"{p} is not a corpus part (no readable part.json)")
    packs = {i.get("pack") for i in infos}
    counts = {i.get("of") for i in infos}
    if len(packs) > 1 or len(counts) > 1:
        problems.append(f"{carry}/ mixes parts of {max(len(packs), len(counts))} packs: pack the corpus again")
    elif infos and counts != {len(folders)}:
        problems.append(f"{carry}/ holds {len(folders)} parts of a pack of {counts.pop()}")
    return folders, problems


def cache_slug(device: str, torch_version: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{device}--torch-{torch_version}").strip("-")


def read_cache_environment(archive: Path) -> Optional[Dict[str, str]]:
    """The environment recorded inside a returned compile cache (``compile-cache.tar.gz``)."""
    try:
        with tarfile.open(archive) as tar:
            member = tar.extractfile("compile_cache.bin.json")
            return json.loads(member.read()) if member is not None else None
    except (OSError, tarfile.TarError, KeyError, ValueError):
        return None


def matching_cache(cache_dir: Path, gpu: str, torch_version: str) -> Tuple[Optional[Path], str]:
    """A kept compile cache made on a GPU whose name contains ``gpu`` with this torch, and why (not)."""
    seen = []
    for archive in sorted(cache_dir.glob("*.tar.gz")):
        made = read_cache_environment(archive)
        if made is None:
            continue
        seen.append(f"{made.get('device')} / torch {made.get('torch')}")
        if gpu.lower() in str(made.get("device", "")).lower() and made.get("torch") == torch_version:
            return archive, f"{archive} (made on {made.get('device')}, torch {made.get('torch')})"
    return None, ("no compile cache kept yet" if not seen else
                  f"no kept cache for {gpu} / torch {torch_version} (kept: {'; '.join(seen)})")


# --------------------------------------------------------------------------- the plan
@dataclass
class Call:
    name: str  # "call 1", "poll 1", ..., "restart"
    tree_mib: float
    carry: List[Tuple[str, float]] = field(default_factory=list)  # (path, MiB)
    command: str = ""

    @property
    def total_mib(self) -> float:
        return self.tree_mib + sum(size for _, size in self.carry)


def call_limit_mib() -> float:
    """What a call may send: the tool's 64 MiB (LEG_CALL_LIMIT_MIB: the rehearsal's smaller calls)."""
    return env_float("LEG_CALL_LIMIT_MIB", CALL_LIMIT_MIB)


def _fill(call: Call, parts: List[Tuple[str, float]]) -> List[Tuple[str, float]]:
    """Move parts into ``call`` while it stays a MiB inside a call's limits; return the rest."""
    limit = call_limit_mib() - CALL_HEADROOM_MIB
    rest = list(parts)
    while rest and len(call.carry) < MAX_CARRY_PATHS and call.total_mib + rest[0][1] <= limit:
        call.carry.append(rest.pop(0))
    return rest


def timeline(timing: Timing, start_s: float, call1_mib: float, call1_hours: float, poll_mib: List[float],
             compile_s: float) -> Dict:
    """When each call returns and how many minutes train, for a machine that starts in ``start_s``."""
    t = start_s + timing.call_s
    train_from = t + timing.setup_s + call1_mib * timing.unpack_s_per_mib + timing.trainer_start_s + \
        call1_hours * timing.decode_s_per_hour
    end_by = timing.budget_s - timing.tail_s
    until, final = call_deadline(t, end_by, timing.first_s, timing)
    returns = [until + timing.snapshot_s + timing.call_s]
    while not final and len(returns) < 20:
        mib = poll_mib[len(returns) - 1] if len(returns) - 1 < len(poll_mib) else 0.0
        t = returns[-1] + timing.gap_s + timing.call_s + mib * timing.unpack_s_per_mib
        until, final = call_deadline(t, end_by, timing.poll_s, timing)
        returns.append(until + timing.snapshot_s + timing.call_s)
    train_s = end_by - train_from - compile_s - RESERVE_MINUTES * 60
    return {"start_s": start_s, "returns_s": returns, "train_minutes": train_s / 60, "calls": len(returns)}


def make_plan(root: Path, timing: Timing, leg: int) -> Dict:
    """Every call of a leg with its sizes, its timeline at the slowest and a quick start, the
    restart call, and the problems that make it NOT ok."""
    carry_dir = env("LEG_CARRY_DIR", ".carry")
    cache_dir = Path(env("LEG_CACHE_DIR", ".leg/compile-cache"))
    notes, problems = [], []
    tree = tree_bytes(root) / MIB
    wheels = root / ".whl"
    problems += check_wheels(root, wheels)
    fixed: List[Tuple[str, float]] = [(".whl", path_bytes(wheels) / MIB if wheels.is_dir() else 0.0)]
    init = env("LEG_INIT", "m2l2-small")
    restart_init = f"{env('LEG_KEEP_DIR', f'runs/leg{leg}')}/latest.safetensors"  # where `keep` puts it
    if init.lower() == "none":
        init_file = None
    elif init == "m2l2-small":
        init_file = PARKED
        if not is_parked(root):
            problems.append("the bundled weights are still tracked (they would travel in every call): "
                            "bash scripts/gpu/leg.sh park")
    elif Path(init).is_absolute() or not (root / init).is_file():
        problems.append(f"LEG_INIT {init} is not a file inside the checkout (it must travel in call 1's carry)")
        init_file = init
    else:
        init_file = init
    # A snapshot is an fp16 checkpoint: of the `small` preset, the bundled file's size.
    weights_mib = env_float("LEG_SNAPSHOT_MIB", path_bytes(root / PARKED) / MIB)
    if init_file is not None:
        fixed.append((init_file, path_bytes(root / init_file) / MIB if (root / init_file).is_file() else weights_mib))
    compile_on = env("LEG_COMPILE", "off") == "on"
    gpu = env("LEG_GPU", "H100")
    torch_version = env("LEG_DEVICE_TORCH", DEVICE_TORCH)
    cache_back = 0
    if compile_on:
        cache, why = matching_cache(root / cache_dir, gpu, torch_version)
        if cache is not None:
            fixed.append((str(cache.relative_to(root) if cache.is_absolute() else cache), path_bytes(cache) / MIB))
            notes.append(f"compile cache carried: {why}")
        else:
            notes.append(f"compile on, cold: {why}; a compile past {env('LEG_COMPILE_DEADLINE_S', '150')} s "
                         "is stopped and the run starts again eagerly")
        cache_back = 1
    else:
        notes.append("compile off (the default until a GPU has measured cold compile seconds and compiled "
                     "samples/s: LEG_COMPILE=on measures both)")
    folders, part_problems = corpus_parts(root / carry_dir)
    problems += part_problems
    if not folders:
        problems.append(f"no corpus parts in {carry_dir}/ (python -m music2latent2.training.corpus pack CORPUS "
                        f"--out {carry_dir} --part-mib 7.5)")
    parts = [(f"{carry_dir}/{p.name}", path_bytes(p) / MIB) for p in folders]

    def layout(order: List[Tuple[str, float]], polls: int) -> List[Call]:
        calls = [Call("call 1", tree, list(fixed))]
        rest = _fill(calls[0], order)
        for n in range(polls):
            calls.append(Call(f"poll {n + 1}", tree))
            rest = _fill(calls[-1], rest)
        return calls

    # The number of polls comes from the timeline of the slowest start, which has the fewest.
    probe = layout(parts, 4)
    data_of = [sum(size for p, size in c.carry if p.startswith(f"{carry_dir}/p")) for c in probe]
    compile_s = env_float("LEG_COMPILE_DEADLINE_S", 150.0) if compile_on else 0.0
    first_carry, first_hours = probe[0].total_mib - tree, data_of[0] / MIB_PER_AUDIO_HOUR
    slow = timeline(timing, timing.start_s, first_carry, first_hours, data_of[1:], compile_s)
    fast = timeline(timing, min(60.0, timing.start_s), first_carry, first_hours, data_of[1:], compile_s)
    polls = max(slow["calls"], fast["calls"]) - 1
    per_leg = sum(1 for c in layout(parts, polls) for p, _ in c.carry if p.startswith(f"{carry_dir}/p"))
    offset = ((leg - 2) * per_leg) % len(parts) if parts and per_leg else 0
    calls = layout(parts[offset:] + parts[:offset], polls)
    settings = {"LEG_NUMBER": str(leg), "LEG_INIT": init}
    settings.update({k: os.environ[k] for k in DEVICE_VARS if k in os.environ})
    prefix = " ".join(f"{k}={v}" for k, v in settings.items())
    budget = f"LEG_BUDGET_LEFT_S={PLACEHOLDER}"
    calls[0].command = f"export {prefix}; {budget} bash scripts/gpu/leg.sh start"
    poll_command = f"export {prefix}; {budget} bash scripts/gpu/leg.sh poll"
    for c in calls[1:]:
        c.command = poll_command
    restart = Call("restart", tree, [(p, s) for p, s in fixed if p != init_file])
    restart.carry.insert(1, (restart_init, path_bytes(root / restart_init) / MIB if (root / restart_init).is_file()
                             else weights_mib))
    _fill(restart, [(p, s) for p, s in calls[0].carry if p.startswith(f"{carry_dir}/p")])
    restart.command = calls[0].command.replace(f"LEG_INIT={init}", f"LEG_INIT={restart_init}")
    data_mib = sum(size for c in calls for p, size in c.carry if p.startswith(f"{carry_dir}/p"))
    hours = data_mib / MIB_PER_AUDIO_HOUR
    pieces = math.ceil(weights_mib / PIECE_MIB)  # a snapshot is an fp16 checkpoint like the bundled one
    back_files = pieces + 3 + cache_back  # + pieces.json, log.jsonl, train_tail.txt
    for call in calls + [restart]:
        if call.total_mib > call_limit_mib() - CALL_HEADROOM_MIB:
            problems.append(f"{call.name} sends {call.total_mib:.1f} MiB: within {CALL_HEADROOM_MIB:g} MiB of "
                            f"the {call_limit_mib():g} MiB limit")
        if len(call.carry) > MAX_CARRY_PATHS:
            problems.append(f"{call.name} carries {len(call.carry)} paths > {MAX_CARRY_PATHS}")
    if back_files > MAX_FILES_BACK:
        problems.append(f"a poll would return {back_files} files > {MAX_FILES_BACK}")
    if slow["train_minutes"] < timing.min_train_min:
        problems.append(f"{slow['train_minutes']:.1f} training minutes < {timing.min_train_min:g} with a "
                        f"{timing.start_s:g} s machine start")
    if hours < 2.0:
        notes.append(f"only {hours:.1f} h of distinct audio reach the leg (pack bigger parts, or more of them)")
    return {"leg": leg, "init": init, "timing": asdict(timing), "tree_mib": tree,
            "calls": [{"name": c.name, "tree_mib": c.tree_mib, "total_mib": c.total_mib,
                       "carry": [p for p, _ in c.carry], "command": c.command} for c in calls + [restart]],
            "timeline_slow": slow, "timeline_fast": fast, "compile_minutes": compile_s / 60,
            "data_mib": data_mib, "data_hours": hours, "first_call_hours": first_hours,
            "parts_total": len(parts), "rotation_offset": offset, "poll_back_files": back_files,
            "notes": notes, "problems": problems}


def print_plan(plan: Dict) -> None:
    t = plan["timing"]
    print(f"leg {plan['leg']} from {plan['init']}: {t['budget_s'] / 60:g} device-minutes")
    for c in plan["calls"]:
        label = c["name"] + (" (only after FRESH MACHINE or a lost machine)" if c["name"] == "restart" else "")
        print(f"{label}: tree {c['tree_mib']:.1f} MiB + carry {c['total_mib'] - c['tree_mib']:.1f} MiB "
              f"= {c['total_mib']:.1f} MiB")
        print(f"    carry   {json.dumps(c['carry'])}")
        print(f"    command {c['command']}")
    print("every poll: the command above with the same text; later polls beyond the list carry []")
    for key in ("timeline_slow", "timeline_fast"):
        tl = plan[key]
        returns = ", ".join(f"{r / 60:.1f}" for r in tl["returns_s"])
        print(f"with a {tl['start_s']:g} s start: {tl['calls']} calls returning at {returns} min, "
              f"{tl['calls'] - 1} gap(s); {tl['train_minutes']:.1f} min of training"
              + (f" after {plan['compile_minutes']:.1f} min of compile" if plan["compile_minutes"] else ""))
    print(f"data: {plan['data_mib']:.0f} MiB ~ {plan['data_hours']:.1f} h of audio, {plan['first_call_hours']:.2f} h "
          f"from the start, the rest as polls bring it (of {plan['parts_total']} parts, rotation offset "
          f"{plan['rotation_offset']})")
    print(f"back per call: {plan['poll_back_files']} files (limit {MAX_FILES_BACK} of {FILE_BACK_MIB:g} MiB)")
    for note in plan["notes"]:
        print(f"note: {note}")
    for problem in plan["problems"]:
        print(f"PROBLEM: {problem}")
    print("plan ok" if not plan["problems"] else "plan NOT ok")
