"""Compiling the training loss within a lease: a cache that names its machine, and the measured
speed with and without compilation.

A compile cache is only worth carrying to a machine with the same GPU and the same torch,
Triton and CUDA builds (their versions are part of inductor's cache keys), so
:func:`save_compile_cache` writes that environment beside the kernels and
:func:`load_compile_cache` skips a cache made elsewhere. :class:`SpeedProbe` times a window of
eager steps and one of compiled steps (two device syncs each), so a leg reports compile seconds
against eager and compiled samples/s instead of assuming them.

A compile of unknown length is bounded from outside the process: the trainer prints
:data:`COMPILE_START` when the first compiled step begins, and ``scripts/gpu/leg.py`` kills a run
whose compile outlives its deadline and starts it again eagerly. (An exception raised into the
compile by a timer signal was tried first: it can land in a callback from C++ that cannot pass
it on, and the interpreter aborted.)"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from ..fileio import atomic_write

__all__ = ["COMPILE_START", "COMPILE_DONE", "compile_environment", "load_compile_cache",
           "save_compile_cache", "cache_environment_file", "SpeedProbe", "PROBE_STEPS"]

PROBE_STEPS = 20  # steps per timed window
_PROBE_SKIP = 5  # steps before a window (warm-up: allocator, cuDNN autotuning)


# Printed when the first compiled step begins: a supervising process (scripts/gpu/leg.py) times
# the compile from this line and, past its deadline, restarts the run eagerly.
COMPILE_START = "compiling the training loss"
COMPILE_DONE = "compiled the training loss in"  # followed by the seconds it took


def compile_environment(device: torch.device) -> Dict[str, Optional[str]]:
    """What a compile cache is only valid for: the device's name and the torch, CUDA and Triton builds."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{device.type}:{platform.machine()}"
    try:  # triton comes with CUDA builds of torch; read its version without importing it
        triton_version: Optional[str] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    return {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version}


def cache_environment_file(cache: Path) -> Path:
    """Where the environment of the cache ``cache`` is recorded: ``<cache>.json``."""
    return cache.with_name(cache.name + ".json")


def load_compile_cache(path: Optional[str], device: torch.device, say: Callable[[str], None]) -> bool:
    """Load compiled kernels from ``path`` if it exists and was made for this environment.

    Returns whether it was loaded. A cache without an environment record is tried (torch keys
    its artifacts by environment, so a mismatch only misses); one whose record names another
    device or build is skipped with a message; an unreadable one costs a recompile, never the run.
    """
    if path is None or not Path(path).is_file():
        return False
    cache = Path(path)
    here = compile_environment(device)
    record = cache_environment_file(cache)
    if record.is_file():
        try:
            made = json.loads(record.read_text())
        except (OSError, ValueError):
            made = None
        if made != here:
            say(f"compile cache {cache} was made for {made}; this is {here}: not used (compiling afresh)")
            return False
    try:
        loaded = torch.compiler.load_cache_artifacts(cache.read_bytes())
    except Exception as err:
        say(f"warning: compile cache {cache} unusable ({type(err).__name__}: {err}); compiling afresh")
        return False
    if loaded is None:  # torch logs why and returns None for what it cannot read
        say(f"warning: compile cache {cache} unusable (torch could not read it); compiling afresh")
        return False
    say(f"compile cache: loaded {cache}")
    return True


def save_compile_cache(path: Optional[str], device: torch.device) -> Optional[Path]:
    """Write the compiled kernels to ``path`` and their environment to ``<path>.json`` (each atomically)."""
    if path is None:
        return None
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:
        return None
    blob = artifacts[0]
    cache = Path(path)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cache_environment_file(cache),
                 lambda tmp: Path(tmp).write_text(json.dumps(compile_environment(device)) + "\n"))
    return atomic_write(cache, lambda tmp: Path(tmp).write_bytes(blob))


class SpeedProbe:
    """Steps/s of an eager window (before a compile, or the whole run's when it does not
    compile) and of a compiled window right after the compile: two device syncs per window.

    Call :meth:`after_step` after every step with the number of steps this process has run; the
    trainer's ``speed`` dict is filled as windows close (``eager_steps_per_s``,
    ``compiled_steps_per_s``, and their ``*_samples_per_s`` at ``batch_size``).

    Args:
        sync: waits for the device's queued work.
        batch_size: crops per step (global).
        compile_at: steps run before the compile (None: no compile).
        record: the dict to fill.
    """

    def __init__(self, sync: Callable[[], None], batch_size: int, compile_at: Optional[int],
                 record: Dict[str, object]) -> None:
        self.sync, self.batch_size, self.record = sync, batch_size, record
        eager_end = compile_at if compile_at is not None else _PROBE_SKIP + PROBE_STEPS
        self.windows = []  # (label, first step, last step)
        if eager_end - _PROBE_SKIP >= 5:
            self.windows.append(("eager", _PROBE_SKIP, eager_end))
        if compile_at is not None:
            start = compile_at + 1 + _PROBE_SKIP // 2  # the first compiled step (the compile) excluded
            self.windows.append(("compiled", start, start + PROBE_STEPS))
        self._t: Dict[str, float] = {}

    def after_step(self, steps_run: int, compiled_now: bool) -> Optional[str]:
        """Returns a line to print when a window has just closed."""
        for label, first, last in self.windows:
            if steps_run == first:
                self.sync()
                self._t[label] = time.perf_counter()
            elif steps_run == last and label in self._t:
                if label == "compiled" and not compiled_now:  # the compile fell back: nothing compiled to time
                    return None
                self.sync()
                rate = (last - first) / (time.perf_counter() - self._t[label])
                self.record[f"{label}_steps_per_s"] = rate
                self.record[f"{label}_samples_per_s"] = rate * self.batch_size
                return f"speed: {label} {rate:.2f} steps/s = {rate * self.batch_size:.1f} samples/s " \
                       f"(steps {first}-{last} of this run)"
        return None
