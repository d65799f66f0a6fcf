"""The ``train`` command's arguments: typed, range-checked, every default shown in ``--help``.

A bad value is refused by argparse as one line ``error: ...`` with exit status 2, before anything
is loaded; :mod:`.cli_checks` then checks what needs the file system.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable, NoReturn

from ..distributed import launch_env
from .losses import LOSS_WEIGHTINGS
from .trainer import COMPILE_MODES, OPTIMIZERS, SIGMA_SAMPLERS, TrainConfig

__all__ = ["UsageError", "Parser", "HelpFormatter", "add_train_arguments", "PRESETS", "DEFAULTS"]

DEFAULTS = TrainConfig()  # the recipe flags default to the dataclass's values (docs/recipe.md)
PRESETS = ("paper", "paper_stereo", "small", "tiny")


class UsageError(SystemExit):
    """A bad argument or input: :func:`main` prints ``error: <message>`` as one line on stderr and
    the process exits with status 2 (a ``SystemExit``, so a caller of ``main`` sees the status)."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = " ".join(line.strip() for line in str(message).splitlines() if line.strip())

    def __str__(self) -> str:
        return self.message


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line ``error: ...`` (exit 2) instead of the long usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{launch_env().tag()}error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.HelpFormatter):
    """Every option's default at the end of its help, unless it has none to show or says it itself."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default is argparse.SUPPRESS or "(default" in text
                or not action.option_strings or action.nargs == 0):
            return text
        shown = " ".join(str(v) for v in default) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown})"


# ----------------------------------------------------------------------------- argument types
def _type_error(text: str, what: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"must be {what}, got {text!r}")


def _int_type(low: int, what: str, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise _type_error(text, what) from None
        if value < low or (high is not None and value > high):
            raise _type_error(text, what)
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


def _float_type(what: str, low: float = -math.inf, high: float = math.inf, low_open: bool = False,
                high_open: bool = False, none: bool = False) -> Callable[[str], float | None]:
    def parse(text: str) -> float | None:
        if none and text.lower() == "none":
            return None
        try:
            value = float(text)
        except ValueError:
            raise _type_error(text, what) from None
        if not math.isfinite(value) or value < low or value > high or (low_open and value == low) \
                or (high_open and value == high):
            raise _type_error(text, what)
        return value

    parse.__name__ = what
    return parse


_positive_int = _int_type(1, "a whole number >= 1")
_count = _int_type(0, "a whole number >= 0")
_seed = _int_type(0, "a whole number from 0 to 2**63 - 1", 2 ** 63 - 1)
_positive = _float_type("a positive number", 0.0, low_open=True)
_non_negative = _float_type("a number >= 0", 0.0)
_finite = _float_type("a finite number")
_share = _float_type("a number from 0 to 1", 0.0, 1.0)
_momentum = _float_type("a number from 0 up to (not including) 1", 0.0, 1.0, high_open=True)
_gain = _float_type("a level in dBFS from -80 to 0", -80.0, 0.0)
_positive_or_none = _float_type("a positive number or 'none'", 0.0, low_open=True, none=True)


def add_train_arguments(t: argparse.ArgumentParser) -> None:
    t.add_argument("--data", nargs="+", metavar="DIR[:WEIGHT]",
                   help="training folders of audio files (searched recursively; .wav, .flac, .mp3, .ogg... at any "
                        "sample rate), each with an optional sampling weight, e.g. my_music:0.8 other_music:0.2 "
                        "(required unless --resume)")
    t.add_argument("--eval-data", default=None, metavar="DIR",
                   help="held-out audio (never in --data) the EMA weights reconstruct every --eval-every steps; "
                        "the best is exported to OUT/best (default: no evaluation)")
    t.add_argument("--out", required=True, help="run folder for the training state, logs and exported checkpoints "
                   "(created; must not hold a training state unless --resume)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its saved state (the "
                   "data, recipe and model are the run's own; --steps extends it)")
    t.add_argument("--preset", default="small", choices=PRESETS,
                   help="network size of a new run (ignored with --init-from, whose network is the checkpoint's)")
    t.add_argument("--model-overrides", default=None, metavar="JSON",
                   help='ModelConfig fields changed from the preset, as JSON, e.g. \'{"depth": 4}\' (default: none)')
    t.add_argument("--steps", type=_positive_int, default=None,
                   help="total steps, counted from 0 (default 1M; on resume: extend the run to this many)")
    t.add_argument("--more-steps", type=_positive_int, default=None,
                   help="total steps as a count from the start step (e.g. from an --init-from checkpoint's "
                        "training_step); --steps wins when both are given (default: --steps)")
    t.add_argument("--batch-size", type=_positive_int, default=16,
                   help="crops per step over all ranks (the global batch); each of N torchrun ranks takes 1/N")
    t.add_argument("--lr", type=_positive, default=1e-4,
                   help="peak learning rate (for the global batch), reached after --warmup and decayed on a "
                        "cosine to --min-lr")
    t.add_argument("--warmup", type=_count, default=10000,
                   help="steps of linear learning-rate warm-up at the start (0: none; a fine-tune wants a few "
                        "hundred)")
    t.add_argument("--ema", type=_momentum, default=0.9999,
                   help="EMA momentum of the exported weights, in [0, 1) (use ~0.999 for runs of thousands of steps)")
    t.add_argument("--seed", type=_seed, default=0,
                   help="random seed of the weight init, the crops and the training noise (a whole number >= 0; "
                        "the same seed and data give the same run)")
    t.add_argument("--workers", type=_count, default=4, help="data-loading worker processes (0: load in the "
                   "training process)")
    t.add_argument("--cache-gb", type=_non_negative, default=4.0,
                   help="decoded-audio cache budget in GiB, shared by the workers")
    t.add_argument("--save-every", type=_positive_int, default=1000,
                   help="save the training state (for --resume) every N steps; the last step always saves")
    t.add_argument("--eval-every", type=_positive_int, default=5000, help="evaluate on --eval-data every N steps")
    t.add_argument("--log-every", type=_positive_int, default=50,
                   help="print a progress line (loss, speed) and append to OUT/log.jsonl every N steps")
    t.add_argument("--eval-seconds", type=_positive, default=10.0,
                   help="evaluate the first N seconds of each held-out file")
    t.add_argument("--eval-files", type=_positive_int, default=16, help="evaluate at most N held-out files")
    t.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 autocast on CUDA, fp32 elsewhere")
    t.add_argument("--compile", default=DEFAULTS.compile, choices=COMPILE_MODES,
                   help="torch.compile the whole loss as one graph (auto: on CUDA; a failure falls back to eager)")
    t.add_argument("--compile-cache", default=None, metavar="PATH",
                   help="compiled kernels, read at start and written after compiling (default OUT/compile_cache.bin; "
                        "copy it beside the next run on the same GPU and torch to skip most of the compile)")
    t.add_argument("--compile-after", type=_count, default=DEFAULTS.compile_after_steps, metavar="STEPS",
                   help="train this many steps eagerly before compiling; their speed is logged beside the "
                        "compiled speed")
    t.add_argument("--optimizer", default=DEFAULTS.optimizer, choices=OPTIMIZERS,
                   help="radam_fused: the paper's RAdam steps on the fused Adam kernel (no host sync per step); "
                        "radam: torch's RAdam (one sync per step); adamw: plain fused Adam, no weight decay "
                        "(docs/recipe.md)")
    t.add_argument("--channels-last", action="store_true", help="NHWC convolutions (measure with bench first)")
    t.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1, mps... (default: the GPU when there is one, under torchrun each rank's "
                        "cuda:LOCAL_RANK; else the CPU, which is very slow)")
    t.add_argument("--min-lr", type=_positive, default=1e-6,
                   help="lr at the end of the cosine decay (at most --lr)")
    t.add_argument("--delta-start", type=_positive, default=None,
                   help="consistency step at the start, index units (>= 1: start as a pure denoiser; default 0.1, "
                        "or an --init-from checkpoint's training_delta)")
    t.add_argument("--delta-end", type=_positive, default=1e-3,
                   help="consistency step at the end (bf16: keep >= 0.01)")
    t.add_argument("--sigma-log-mean", type=_finite, default=-1.1, help="mean of log(sigma) of training noise")
    t.add_argument("--sigma-log-std", type=_positive, default=2.0, help="std of log(sigma) of training noise")
    t.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="start online and EMA weights from this checkpoint (file, folder, manifest name such as "
                        "m2l2-small, or Hub repo id org/name); fresh optimiser; step count and delta continue "
                        "from its metadata (default: a new network of --preset)")
    tokens = t.add_mutually_exclusive_group()
    tokens.add_argument("--keep-summary-tokens", dest="summary_tokens", action="store_const", const="keep",
                        default="auto",
                        help="with --init-from: keep the checkpoint's K summary tokens and decoder summary "
                             "positions as it learned them. Default (neither flag): re-draw them at "
                             "--summary-init-std when they are at a small scale (std below half of it, as in "
                             "m2l2-small, whose 8 tokens are near-copies: re-drawn, they give distinct slots, "
                             "docs/recipe.md), keep them when they are already at that scale (a run that drew them)")
    tokens.add_argument("--redraw-summary-tokens", dest="summary_tokens", action="store_const", const="redraw",
                        help="with --init-from: re-draw the summary tokens and positions at --summary-init-std "
                             "even when they are already at that scale")
    t.add_argument("--start-step", type=_count, default=None,
                   help="step counter at the start; schedules run from it (default 0, or an --init-from "
                        "checkpoint's training_step)")
    t.add_argument("--max-minutes", type=_positive, default=None,
                   help="time budget: schedules end when it does (speed measured over the first steps; "
                        "default: no budget, --steps decides)")
    t.add_argument("--end-by", type=_finite, default=None, metavar="UNIX_SECONDS",
                   help="absolute time budget (e.g. a machine reservation's end): the minutes left once the data "
                        "is loaded, as --max-minutes (the smaller of the two; default: none)")
    t.add_argument("--end-file", default=None, metavar="PATH",
                   help="a file holding the UNIX time to end by, re-read every 5 s: moving it moves the end "
                        "and re-lays the schedules (default: none)")
    t.add_argument("--snapshot-request", default=None, metavar="PATH",
                   help="a file whose every new content asks for a snapshot at the next step; the snapshot's "
                        "pieces.json records that content (default: none)")
    t.add_argument("--data-watch", default=None, metavar="PATH",
                   help="a file rewritten whenever new audio arrives in the --data folders: the loader then "
                        "takes the new files in (folders may start empty; batches then depend on arrival times; "
                        "default: the folders are read once)")
    t.add_argument("--reserve-minutes", type=_non_negative, default=0.5,
                   help="part of --max-minutes kept free at the end for the final export")
    t.add_argument("--calibrate-steps", type=_positive_int, default=100,
                   help="steps timed to lay out a --max-minutes budget")
    t.add_argument("--snapshot-minutes", type=_positive, default=None,
                   help="every M minutes write fp16 EMA weights in pieces to OUT/snapshots (default: no snapshots)")
    t.add_argument("--snapshot-piece-mib", type=_positive, default=15.0, help="largest snapshot piece (MiB)")
    t.add_argument("--latent-penalty", type=_non_negative, default=0.0,
                   help="weight of the penalty on encoder pre-tanh values beyond --pre-tanh-limit")
    t.add_argument("--pre-tanh-limit", type=_positive, default=2.0,
                   help="encoder pre-tanh magnitude beyond which --latent-penalty applies")
    t.add_argument("--max-consecutive-skips", type=_positive_int, default=DEFAULTS.max_consecutive_skips,
                   help="stop (exit 1) after this many non-finite steps in a row: the run has diverged")
    t.add_argument("--dist-timeout-minutes", type=_positive, default=30.0,
                   help="under torchrun: how long a rank waits for the others (rank 0 evaluating or saving) "
                        "before the run fails instead of hanging")
    recipe = t.add_argument_group("recipe (docs/recipe.md)")
    recipe.add_argument("--sigma-sampler", default=DEFAULTS.sigma_sampler, choices=SIGMA_SAMPLERS,
                        help="lognormal: log(sigma) ~ N(mean, std) as asked; legacy_density: the draw m2l2-small "
                             "was trained with")
    recipe.add_argument("--sigma-uniform-share", type=_share, default=DEFAULTS.sigma_uniform_share,
                        help="share of noise indices drawn uniformly in the index (more high-sigma draws; no gain "
                             "measured in docs/recipe.md)")
    recipe.add_argument("--loss-weighting", default=DEFAULTS.loss_weighting, choices=LOSS_WEIGHTINGS,
                        help="inverse_delta: 1/delta_sigma (v1); edm: the same times sqrt(sigma^2+sd^2)/sd")
    recipe.add_argument("--context-share", type=_share, default=DEFAULTS.context_share,
                        help="share of windows with a lightly noised context chunk before a noisy one")
    recipe.add_argument("--context-sigma", type=_positive, default=DEFAULTS.context_sigma,
                        help="noise level of such a context chunk")
    recipe.add_argument("--summary-init-std", type=_positive_or_none, default=DEFAULTS.summary_init_std,
                        help="std of the summary tokens and their decoder positions at initialisation, and what "
                             "an --init-from checkpoint's are re-drawn at (see --keep-summary-tokens; 'none': "
                             "the modules' own small init, or the checkpoint's tokens, always kept)")
    recipe.add_argument("--gain-db", type=_gain, nargs=2, default=DEFAULTS.gain_db, metavar=("LOW", "HIGH"),
                        help="peak level range of training crops, dBFS")
