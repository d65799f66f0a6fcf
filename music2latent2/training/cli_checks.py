"""What ``train`` checks before a model or checkpoint is loaded, and the cleanup of a failed start.

Every check here costs file-system reads only; a failure is a :class:`~.cli_args.UsageError`
(one line, exit status 2), so a typo never costs a checkpoint load or leaves a run folder.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import List, Sequence

import soundfile as sf

from ..audio import AUDIO_EXTENSIONS
from ..checkpoint import read_config, weights_path
from ..config import ModelConfig
from ..devices import _cuda_reason, resolve_device
from ..distributed import launch_env, rank_device
from ..evaluate import find_audio_files
from ..fileio import check_output_dir
from .cli_args import DEFAULTS, UsageError
from .data import parse_data_spec
from .state import STATE_NAME, read_state_configs

__all__ = ["preflight", "check_end_by", "cpu_warning", "new_folders", "remove_if_empty"]

_AUDIO_KINDS = ", ".join(e for e in (".wav", ".flac", ".mp3", ".ogg", ".opus", ".aiff") if e in AUDIO_EXTENSIONS)
_AUDIO_KINDS += "..."


def _first_readable_audio(path: Path) -> Path | None:
    """The first audio file below ``path`` (or ``path`` itself) that training would take: one whose
    header soundfile reads and that has samples, as :class:`~.data.AudioSource` asks. None if none."""
    for file in find_audio_files(path):
        try:
            if sf.info(str(file)).frames > 0:
                return file
        except Exception:  # noqa: BLE001 - unreadable: the trainer leaves it out too
            continue
    return None


def _check_data(specs: Sequence[str], may_be_empty: bool, resumed: bool = False) -> None:
    """Each ``DIR[:WEIGHT]`` names an existing folder with at least one readable audio file (with
    ``may_be_empty``, a folder still being filled: it need only exist)."""
    flag = "the run's data folder" if resumed else "--data"
    fix = "put the folder back where the run found it" if resumed else "name another folder"
    for spec in specs:
        try:
            folder, _ = parse_data_spec(spec)
        except ValueError as err:
            if "weight" in str(err):
                raise UsageError(f"{flag} {spec}: {err} (write DIR or DIR:WEIGHT, e.g. my_music:0.8)") from None
            raise UsageError(f"{flag} {spec}: {err}; {fix} (an existing folder of audio files)") from None
        if not may_be_empty and _first_readable_audio(folder) is None:
            raise UsageError(f"{flag} {spec}: no readable audio files in {folder} (searched recursively for "
                             f"{_AUDIO_KINDS} files with samples); put the training audio there or {fix}")


def _check_init(name: str) -> None:
    """An ``--init-from`` that cannot work, found without loading it: a local checkpoint's header and
    config are read; a manifest name or a Hub repo id are left to the load (downloads happen there)."""
    from ..hub import _REPO_ID
    from ..manifest import load_manifest

    p = Path(name)
    if p.exists():
        path = weights_path(p)
        if not path.is_file():
            raise UsageError(f"--init-from {name}: the folder holds no model.safetensors; name a checkpoint file "
                             "or a folder holding one")
        try:
            read_config(path)
        except Exception as err:  # noqa: BLE001 - CheckpointError names what is wrong
            raise UsageError(f"--init-from {name}: not a usable checkpoint: {err}") from None
        return
    try:
        models = sorted(load_manifest().models)
    except Exception:  # noqa: BLE001 - a broken manifest is reported by the load itself
        return
    if name in models or (_REPO_ID.fullmatch(name) and not name.endswith(".safetensors")):
        return
    raise UsageError(f"--init-from {name}: no such checkpoint file or folder, and not a model name of the weights "
                     f"manifest ({', '.join(models) or 'none released'}) nor a Hugging Face repo id org/name")


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is an existing file; name a folder for the run (state, logs, checkpoints)")
    try:
        check_output_dir(out)
    except OSError as err:
        raise UsageError(f"--out {out}: {err.strerror if err.strerror else err}") from None


def check_end_by(end_by: float, reserve_minutes: float) -> None:
    left = (end_by - time.time()) / 60
    if left <= reserve_minutes:
        raise UsageError(f"--end-by leaves {left:.2f} min, not more than --reserve-minutes {reserve_minutes:g}")


def preflight(args: argparse.Namespace) -> None:
    """Check what ``train`` can check without a model: the device, the run folder, the data and
    evaluation folders, the ``--init-from`` checkpoint and the flags that go together.

    Raises:
        UsageError: the first problem found, as one line saying what to change.
    """
    if args.device is not None:
        try:
            resolve_device(args.device)
        except (TypeError, ValueError) as err:
            raise UsageError(f"--device {args.device}: {err}") from None
    else:
        try:
            rank_device(launch_env())
        except ValueError as err:
            raise UsageError(str(err)) from None
    out = Path(args.out)
    _check_out(out)
    state = out / STATE_NAME
    init_only = [flag for flag, given in (("--keep-summary-tokens", args.summary_tokens == "keep"),
                                          ("--redraw-summary-tokens", args.summary_tokens == "redraw")) if given]
    if args.resume:
        if not state.is_file():
            raise UsageError(f"--resume: {out} holds no training state ({state} does not exist); start a run "
                             "there without --resume, or name the run folder with --out")
        try:
            cfg, _ = read_state_configs(state)
        except Exception as err:  # noqa: BLE001 - a broken file: say which
            raise UsageError(f"--resume: cannot read the training state {state}: {err}") from None
        if init_only:
            raise UsageError(f"{init_only[0]} is for a run that starts --init-from a checkpoint, not for --resume")
        _check_data(cfg.data, may_be_empty=args.data_watch is not None, resumed=True)
    else:
        if not args.data:
            raise UsageError("--data is required: one or more folders of audio files, DIR or DIR:WEIGHT "
                             "(or --resume to continue the run in --out)")
        if state.exists():
            raise UsageError(f"{out} already holds a training state; pass --resume to continue it, or another --out")
        _check_data(args.data, may_be_empty=args.data_watch is not None)
        overrides = {}
        if args.model_overrides:
            try:
                overrides = json.loads(args.model_overrides)
            except ValueError as err:
                raise UsageError(f"--model-overrides is not JSON ({err}); write e.g. '{{\"depth\": 4}}'") from None
            if not isinstance(overrides, dict):
                raise UsageError("--model-overrides must be a JSON object, e.g. '{\"depth\": 4}'")
        if args.init_from:
            if overrides:
                raise UsageError("--model-overrides cannot change a network loaded with --init-from")
            _check_init(args.init_from)
        else:
            if init_only:
                raise UsageError(f"{init_only[0]} is for a run that starts --init-from a checkpoint; a new run "
                                 "draws its summary tokens at --summary-init-std")
            try:
                ModelConfig.from_preset(args.preset, **overrides)
            except (TypeError, ValueError) as err:
                raise UsageError(f"--model-overrides: {err}") from None
        delta_start = args.delta_start if args.delta_start is not None else \
            (None if args.init_from else DEFAULTS.delta_start)
        if delta_start is not None and args.delta_end > delta_start:
            raise UsageError(f"--delta-end {args.delta_end:g} is above the starting consistency step "
                             f"{delta_start:g} (--delta-start); it must not be")
        start = args.start_step if args.start_step is not None else (None if args.init_from else 0)
        if start is not None and args.steps and args.steps <= start:
            raise UsageError(f"--steps {args.steps} is not beyond the start step {start} "
                             "(--steps counts from 0; --more-steps counts from the start step)")
        if args.summary_tokens == "redraw" and args.summary_init_std is None:
            raise UsageError("--redraw-summary-tokens needs a --summary-init-std to draw them at, not 'none'")
    if args.eval_data:
        try:
            found = _first_readable_audio(Path(args.eval_data))
        except ValueError as err:
            raise UsageError(f"--eval-data {args.eval_data}: {err}; give a folder of held-out audio files") from None
        if found is None:
            raise UsageError(f"--eval-data {args.eval_data}: no readable audio files in it; give a folder of "
                             "held-out audio files")
    if args.gain_db[0] > args.gain_db[1]:
        raise UsageError(f"--gain-db LOW HIGH: LOW {args.gain_db[0]:g} is above HIGH {args.gain_db[1]:g}")
    if args.end_by is not None:
        check_end_by(args.end_by, args.reserve_minutes)


def cpu_warning(device_arg: str | None) -> str:
    why = f" ({_cuda_reason()})" if device_arg is None else ""
    return (f"warning: training on the CPU{why} is very slow, hundreds of times slower than on a GPU (the small "
            "preset: about 0.16 samples/s against 92 on an H100); on a machine with an NVIDIA GPU and a CUDA "
            "build of PyTorch the GPU is used by default, or choose one with --device cuda:N")


def new_folders(out: Path) -> List[Path]:
    """The folders on the way to ``out`` that do not exist yet, deepest first (what this run creates)."""
    new = []
    p = Path(os.path.abspath(out))
    while not p.exists() and p != p.parent:
        new.append(p)
        p = p.parent
    return new


def remove_if_empty(folders: Sequence[Path]) -> None:
    """Remove the folders a failed run created, deepest first, as long as nothing was written in them."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (the run wrote something worth keeping), or never created
            if folder.exists():
                return
