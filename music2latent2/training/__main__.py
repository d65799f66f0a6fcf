"""Command line: ``python -m music2latent2.training {train,join,export,bench,ship-check} ...``.

    python -m music2latent2.training train --data corpus/music:1 corpus/speech:1 \\
        --eval-data my_heldout --preset small --out runs/small --steps 100000
    python -m music2latent2.training train --out runs/small --resume          # continue
    python -m music2latent2.training export --state runs/small --data corpus/music --out ckpt/ --fp16
    python -m music2latent2.training train --data corpus/leg/music ... --init-from m2l2-small \\
        --max-minutes 9 --snapshot-minutes 2.5 --out runs/leg2   # a relay leg: step and delta continue
    python -m music2latent2.training join runs/leg2/snapshots --out model.safetensors
    python -m music2latent2.training bench --preset small --batch-size 32 --seconds 30 --json
    python -m music2latent2.training ship-check runs/leg2/eval runs/shipped/eval   # exit 0: ship

``train`` checks every argument it can before a model or checkpoint is loaded (data and
evaluation folders hold readable audio, the run folder can be created, numbers are in range,
the ``--init-from`` checkpoint and the ``--device`` exist): a bad one ends the run with one line
``error: ...`` on stderr and exit status 2, and leaves no run folder behind.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

from ..checkpoint import read_metadata, sha256_file, weights_path
from ..distributed import launch_env
from ..evaluate import ViSQOL, evaluate_files, find_audio_files
from ..inference import EncoderDecoder
from ..model import Music2Latent2
from .bench import add_bench_arguments, cmd_bench
from .cli_args import DEFAULTS, HelpFormatter, Parser, UsageError, add_train_arguments
from .cli_checks import check_end_by, cpu_warning, new_folders, preflight, remove_if_empty
from .data import (
    CropDataset,
    StepBatches,
    build_sources,
    crop_samples,
    describe_sources,
    make_step_loader,
)
from .distributed import LostRank, Ranks, StopSignals, start_ranks
from .export import export_checkpoint, measure_latent_scale
from .snapshot import join_snapshot, write_snapshot
from .state import STATE_NAME, load_state, read_state_configs, save_state
from .trainer import TrainConfig, Trainer

_PROG = "python -m music2latent2.training"


def _loader(cfg: TrainConfig, trainer: Trainer, num_workers: int | None = None, preload: bool = True) -> tuple:
    """This rank's batches: its share of the files, its own seed, ``batch_size / world_size`` crops."""
    mc = trainer.model.config
    ranks = trainer.ranks
    crop = crop_samples(mc.chunk_samples, mc.n_fft, mc.hop_length)
    per_machine = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # ranks sharing this machine's cores
    sources = build_sources(cfg.data, mc.sample_rate, preload_bytes=int(cfg.cache_gb * 2 ** 30) if preload else 0,
                            threads=max(1, min(16, (os.cpu_count() or 1) // per_machine)), rank=ranks.rank,
                            world_size=ranks.world_size, allow_empty=cfg.data_watch is not None)
    ranks.print("data" + (f" (rank 0's share of {ranks.world_size})" if ranks.distributed else "") + ": "
                + describe_sources(sources))
    crops = CropDataset(sources, mc.audio_channels, crop, gain_db=(cfg.gain_db[0], cfg.gain_db[1]),
                        watch=cfg.data_watch)
    batches = StepBatches(crops, trainer.rank_batch_size, cfg.seed, start_step=trainer.step, rank=ranks.rank)
    workers = cfg.num_workers if num_workers is None else num_workers
    return make_step_loader(batches, workers, pin_memory=trainer.device.type == "cuda"), crop


def _latent_scale(trainer: Trainer, loader) -> float:
    batches = list(trainer.recent_batches) or iter(loader)
    return measure_latent_scale(trainer.ema, batches, max_batches=8)


def _export(trainer: Trainer, loader, path: Path, fp16: bool) -> Path:
    # During training, reuse recent batches: a second iter() on a DataLoader with persistent
    # workers would reset the running one.
    scale = _latent_scale(trainer, loader)
    return export_checkpoint(trainer.ema, path, latent_scale=scale, step=trainer.step,
                             dtype=torch.float16 if fp16 else None, delta=trainer.delta_at(trainer.step))


def continuation(metadata: Dict[str, str], start_step: int | None, delta_start: float | None,
                 delta_end: float) -> Tuple[int, float, float, List[str]]:
    """Where a run from a checkpoint starts: ``(start_step, delta_start, delta_end, notes)``.

    Flags given win; otherwise the step count continues from the checkpoint's ``training_step``
    and the consistency step from its ``training_delta`` (so a continuation does not start again
    as a pure denoiser, nor at the paper's 0.1), shrinking towards ``delta_end``. A checkpoint
    already below ``delta_end`` keeps its delta.
    """
    notes = []
    if start_step is None:
        start_step = int(metadata.get("training_step") or 0)
        notes.append(f"step count continues from the checkpoint's training_step {start_step}"
                     if "training_step" in metadata else "the checkpoint records no training_step: counting from 0")
    if delta_start is None:
        if "training_delta" in metadata:
            delta_start = float(metadata["training_delta"])
            notes.append(f"consistency step continues from the checkpoint's training_delta {delta_start:.4g}")
        else:
            delta_start = DEFAULTS.delta_start
            notes.append(f"the checkpoint records no training_delta: delta starts at {delta_start:g}")
    if not (math.isfinite(delta_start) and delta_start > 0):
        raise UsageError(f"delta must be a positive number, got {delta_start}")
    if delta_end > delta_start:
        notes.append(f"delta {delta_start:.4g} is already below --delta-end {delta_end:g}: it stays there")
        delta_end = delta_start
    return start_step, delta_start, delta_end, notes


def _build_trainer(args: argparse.Namespace, out: Path, ranks: Ranks) -> Tuple[TrainConfig, Trainer]:
    """The run's config and trainer: resumed from ``out``, or new (from scratch or ``--init-from``)."""
    say = ranks.print
    device = ranks.device
    if args.resume:
        cfg, model_config = read_state_configs(out / STATE_NAME)
        if args.steps:
            cfg.total_steps = args.steps
        if args.max_minutes:
            cfg.max_minutes = args.max_minutes
        # An end time, a snapshot request and a growing corpus belong to one lease, not to the run.
        cfg.end_file, cfg.snapshot_request, cfg.data_watch = args.end_file, args.snapshot_request, args.data_watch
        trainer = Trainer(cfg, device, model_config, ranks=ranks)
        try:
            load_state(trainer, out / STATE_NAME)
        except Exception as err:  # noqa: BLE001 - a truncated or foreign file: say which, no traceback
            raise UsageError(f"--resume: cannot load the training state {out / STATE_NAME}: "
                             f"{type(err).__name__}: {err}") from err
        say(f"resumed {out} at step {trainer.step}")
        return cfg, trainer
    if not args.data:  # preflight says so first; kept for callers of this function
        raise UsageError("--data is required (or --resume)")
    if (out / STATE_NAME).exists():
        raise UsageError(f"{out} already holds a training state; pass --resume or another --out")
    overrides = json.loads(args.model_overrides) if args.model_overrides else {}
    init = None
    start_step = args.start_step or 0
    delta_start = DEFAULTS.delta_start if args.delta_start is None else args.delta_start
    delta_end = args.delta_end
    if args.init_from:
        if overrides:
            raise UsageError("--model-overrides cannot change a network loaded with --init-from")
        init = _load_init(args.init_from)
        assert init.source is not None  # set by from_pretrained
        start_step, delta_start, delta_end, notes = continuation(
            read_metadata(init.source.path), args.start_step, args.delta_start, args.delta_end)
        for note in notes:
            say(f"note: {note}")
    total_steps = args.steps or (start_step + args.more_steps if args.more_steps else 1_000_000)
    if total_steps <= start_step:
        raise UsageError(f"--steps {total_steps} is not beyond the start step {start_step} "
                         "(--steps counts from 0; --more-steps counts from the start step)")
    cfg = TrainConfig(preset=args.preset, model_overrides=overrides, data=args.data, eval_data=args.eval_data,
                      out_dir=str(out), batch_size=args.batch_size, lr=args.lr, min_lr=min(args.min_lr, args.lr),
                      total_steps=total_steps, warmup_steps=args.warmup, ema_momentum=args.ema,
                      delta_start=delta_start, delta_end=delta_end,
                      sigma_log_mean=args.sigma_log_mean, sigma_log_std=args.sigma_log_std, seed=args.seed,
                      num_workers=args.workers, cache_gb=args.cache_gb, save_every=args.save_every,
                      eval_every=args.eval_every, log_every=args.log_every, eval_seconds=args.eval_seconds,
                      eval_files=args.eval_files, precision=args.precision, compile=args.compile,
                      compile_cache=args.compile_cache or str(out / "compile_cache.bin"),
                      compile_after_steps=args.compile_after,
                      snapshot_request=args.snapshot_request, data_watch=args.data_watch,
                      optimizer=args.optimizer, channels_last=args.channels_last,
                      start_step=start_step, max_minutes=args.max_minutes, end_file=args.end_file,
                      calibrate_steps=args.calibrate_steps, reserve_minutes=args.reserve_minutes,
                      snapshot_minutes=args.snapshot_minutes, snapshot_piece_mib=args.snapshot_piece_mib,
                      latent_penalty=args.latent_penalty, pre_tanh_limit=args.pre_tanh_limit,
                      sigma_sampler=args.sigma_sampler, sigma_uniform_share=args.sigma_uniform_share,
                      loss_weighting=args.loss_weighting, context_share=args.context_share,
                      context_sigma=args.context_sigma, summary_init_std=args.summary_init_std,
                      gain_db=list(args.gain_db), max_consecutive_skips=args.max_consecutive_skips)
    if init is None:
        trainer = Trainer(cfg, device, ranks=ranks)
    else:
        assert init.source is not None  # set by from_pretrained
        cfg.init_from, cfg.init_sha256 = init.source.name, init.source.sha256
        trainer = Trainer(cfg, device, init.config.replace(latent_scale=1.0), ranks=ranks)
        if trainer.init_weights_from(init, summary_tokens=args.summary_tokens):
            why = "as asked (--redraw-summary-tokens)" if args.summary_tokens == "redraw" else \
                "as they were at a small scale (--keep-summary-tokens keeps them)"
            say(f"note: the summary tokens and positions of {cfg.init_from} are re-drawn at std "
                f"{cfg.summary_init_std:g} (--summary-init-std), {why}")
        else:
            why = "as asked (--keep-summary-tokens)" if args.summary_tokens == "keep" or cfg.summary_init_std is None \
                else f"as they are already at the scale of --summary-init-std {cfg.summary_init_std:g}"
            say(f"note: the summary tokens and positions of {cfg.init_from} are kept {why}")
        say(f"initialised from {cfg.init_from} (sha256 {cfg.init_sha256[:12]}...) at step {trainer.step}")
    if ranks.is_main:
        out.mkdir(parents=True, exist_ok=True)
    return cfg, trainer


def _load_init(name: str) -> Music2Latent2:
    """The ``--init-from`` checkpoint, strictly; a file that fails to load is one line naming it."""
    try:
        return Music2Latent2.from_pretrained(name)  # strict; CheckpointError names what is wrong
    except Exception as err:  # noqa: BLE001 - corrupt, truncated, a missing download...: exit 2, no traceback
        local = Path(name)
        where = f" {weights_path(local)}" if local.exists() and str(weights_path(local)) not in str(err) else ""
        raise UsageError(f"--init-from {name}: cannot load the checkpoint{where}: {type(err).__name__}: "
                         f"{err}") from err


def cmd_train(args: argparse.Namespace) -> int:
    out = Path(args.out)
    preflight(args)  # before anything is loaded or created: one line and exit 2 for a bad argument
    created = new_folders(out) if launch_env().is_main else []
    try:
        return _train(args, out)
    except BaseException:
        remove_if_empty(created)  # a run that failed before writing anything leaves nothing behind
        raise


def _train(args: argparse.Namespace, out: Path) -> int:
    ranks = start_ranks(args.device, args.dist_timeout_minutes)
    say = ranks.print
    if ranks.is_main and ranks.device.type == "cpu":
        print(cpu_warning(args.device), file=sys.stderr, flush=True)
    try:
        cfg, trainer = _build_trainer(args, out, ranks)
    except ValueError as err:  # a batch that does not split over the ranks, a bad state file...
        raise UsageError(str(err)) from err
    trainer.sync_ranks()
    say(f"model: {trainer.model.num_parameters() / 1e6:.2f}M parameters on {ranks.device}"
        + (f" (rank 0 of {ranks.world_size})" if ranks.distributed else ""))
    say(f"batch: {cfg.batch_size} per step (global) = {trainer.rank_batch_size} per rank x {ranks.world_size} "
        f"rank(s); learning rate {cfg.lr:g} for that global batch")
    stops = StopSignals(trainer)  # SIGTERM/SIGUSR1/Ctrl-C: finish the step, save, exit
    connected = True  # the process group is intact, so the ranks can leave it together
    try:
        try:
            loader, crop = _loader(cfg, trainer)
        except ValueError as err:  # the folders changed since they were checked
            raise UsageError(f"--data: {err}") from err
        if args.end_by is not None:
            # An absolute end (a device lease's): whatever loading the data took is already spent.
            check_end_by(args.end_by, cfg.reserve_minutes)
            left = (args.end_by - time.time()) / 60
            cfg.max_minutes = left if cfg.max_minutes is None else min(cfg.max_minutes, left)
            say(f"time budget: {cfg.max_minutes:.2f} min until --end-by")
        on_save, on_eval, on_snapshot = _callbacks(cfg, out, loader, ranks)
        reason = trainer.fit(loader, crop, on_save, on_eval, log_file=out / "log.jsonl" if ranks.is_main else None,
                             on_snapshot=on_snapshot)
        if reason == "diverged":
            return 1
        snapshots = cfg.snapshot_minutes is not None or cfg.snapshot_request is not None
        if reason != "signal" and ranks.is_main and snapshots:
            # The final weights, in pieces like the others, first: a lease's last poll waits for them.
            on_snapshot(trainer, final=True)
        if reason != "steps":  # stopped between saves (the last step always saves): keep every step
            save_state(trainer, out / STATE_NAME)
        if reason == "signal":
            say(f"stopped by {trainer.stop_signal} after step {trainer.step}: the training state is saved in "
                f"{out / STATE_NAME}; run again with --resume to continue (bit for bit)")
            return 0
        if ranks.is_main:
            path = _export(trainer, loader, out / "final", fp16=False)
            print(f"exported EMA weights to {path}", flush=True)
    except (LostRank, RuntimeError) as err:
        connected = False
        if not ranks.distributed:
            raise
        state = out / STATE_NAME
        saved = (f"the last saved state, {state}, is where --resume continues" if state.is_file()
                 else "no training state was saved yet (--save-every)")
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"error: rank {ranks.rank} of {ranks.world_size} stopped at step {trainer.step}: {first_line}\n"
              f"(when a collective fails, another rank has most likely died: its own error is in its log; {saved})",
              file=sys.stderr, flush=True)
        return 1
    except UsageError:  # every rank finds the same: they can leave the process group together
        raise
    except BaseException:
        connected = False
        raise
    finally:
        stops.restore()
        if connected:
            ranks.close()
    return 0


def _callbacks(cfg: TrainConfig, out: Path, loader, ranks: Ranks) -> tuple:
    """The trainer's ``on_save``, ``on_eval`` and ``on_snapshot`` for a run in ``out``."""

    def on_save(t: Trainer) -> None:
        save_state(t, out / STATE_NAME)  # every rank: the ranks' noise generators are gathered

    def on_eval(t: Trainer) -> None:
        if not cfg.eval_data:
            return
        better = False
        if ranks.is_main:  # the others wait for its verdict
            better = _evaluate(t, cfg, out)
        (_, ), (better, ) = ranks.agree([0.0], [better])
        if better:
            if ranks.is_main:
                _export(t, loader, out / "best", fp16=False)
                print(f"new best (log-mel {t.best_metric:.4f}) -> {out / 'best'}", flush=True)
            save_state(t, out / STATE_NAME)

    def on_snapshot(t: Trainer, final: bool = False) -> None:
        snap = write_snapshot(t.ema, out / "snapshots", t.step, _latent_scale(t, loader),
                              piece_bytes=int(cfg.snapshot_piece_mib * 2 ** 20), delta=t.delta_at(t.step),
                              final=final, extra={"request": t.snapshot_token, "speed": t.speed})
        print(f"snapshot step {t.step}{' (final)' if final else ''} -> {snap}", flush=True)

    return on_save, on_eval, on_snapshot


def _evaluate(t: Trainer, cfg: TrainConfig, out: Path) -> bool:
    """The EMA on the held-out files; ``eval.jsonl`` gets a line. Returns whether it is the best so far."""
    assert cfg.eval_data is not None
    files = find_audio_files(cfg.eval_data)[: cfg.eval_files]
    # optimize_cpu=False: the EMA keeps the layout the trainer updates it in, step after step.
    encdec = EncoderDecoder(t.ema, device=t.device, max_batch_size=8, optimize_cpu=False)
    report = evaluate_files(encdec, files, cfg.eval_seconds, ViSQOL(enabled=False))
    t.ema.requires_grad_(False)
    mean, health = report["mean"], report["latent_health"]
    rank, slot_cos = (float("nan") if health[k] is None else health[k] for k in ("effective_rank", "slot_cosine"))
    band_error = float("nan") if mean["band_level_error_db"] is None else mean["band_level_error_db"]
    print(f"eval step {t.step}: SI-SDR {mean['si_sdr']:.2f} dB  log-mel {mean['logmel_distance']:.4f}  "
          f"level {mean['level_db']:+.1f} dB  band error {band_error:.1f} dB  latent rank {rank:.2f}  "
          f"slot-cos {slot_cos:.2f}", flush=True)
    with open(out / "eval.jsonl", "a") as f:
        f.write(json.dumps({"step": t.step, **mean, **health, "band_levels_db": report["band_levels_db"]}) + "\n")
    if t.best_metric is None or mean["logmel_distance"] < t.best_metric:
        t.best_metric = mean["logmel_distance"]
        return True
    return False


def cmd_join(args: argparse.Namespace) -> int:
    path = join_snapshot(args.snapshot, args.out)
    print(f"joined and verified {path} (sha256 {sha256_file(path)})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    cfg, model_config = read_state_configs(Path(args.state))
    if args.data:
        cfg.data = args.data
    trainer = Trainer(cfg, args.device or "cpu", model_config)
    load_state(trainer, args.state)
    loader, _ = _loader(cfg, trainer, num_workers=0, preload=False)  # 8 batches: no need to decode the corpus
    path = _export(trainer, loader, Path(args.out), fp16=args.fp16)
    print(f"exported EMA weights of step {trainer.step} to {path}")
    return 0


# A candidate ships when it is better on log-mel and no worse, beyond these margins, on the rest.
SHIP_MARGINS = {"visqol": 0.02, "band_level_error_db": 0.25, "abs_level_db": 0.5}


def _results(path: str) -> dict:
    p = Path(path)
    p = p / "results.json" if p.is_dir() else p
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: cannot read evaluation results {p} ({err})") from err


def ship_decision(candidate: dict, shipped: dict) -> Tuple[bool, List[str]]:
    """Whether ``candidate`` (a results.json of ``python -m music2latent2.evaluate``) beats
    ``shipped`` on the same files: lower log-mel distance, and ViSQOL, per-band level error and
    overall level each no worse than :data:`SHIP_MARGINS` allow. Returns (ships, lines)."""
    def files(r: dict) -> list:
        return [(Path(f["file"]).name, round(f["seconds"], 2)) for f in r["files"]]

    if files(candidate) != files(shipped) or candidate.get("decoding") != shipped.get("decoding"):
        raise SystemExit("error: the two evaluations are not comparable (other files, lengths or decode settings)")
    c, s = candidate["mean"], shipped["mean"]
    rows = [("log-mel distance", c["logmel_distance"], s["logmel_distance"],
             c["logmel_distance"] < s["logmel_distance"])]
    for key, label, sign in (("visqol", "ViSQOL", 1), ("band_level_error_db", "band level error (dB)", -1)):
        if c.get(key) is None or s.get(key) is None:
            rows.append((label, c.get(key), s.get(key), True))  # not measured on one side: not held against it
        else:
            rows.append((label, c[key], s[key], sign * (c[key] - s[key]) >= -SHIP_MARGINS[key]))
    rows.append(("|level| (dB)", abs(c["level_db"]), abs(s["level_db"]),
                 abs(c["level_db"]) <= abs(s["level_db"]) + SHIP_MARGINS["abs_level_db"]))

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    lines = [f"{label:24s} candidate {fmt(a):>8s}  shipped {fmt(b):>8s}  {'ok' if good else 'WORSE'}"
             for label, a, b, good in rows]
    ships = all(good for *_, good in rows)
    lines.append("verdict: SHIP (better on the held-out evaluation)" if ships else "verdict: do not ship")
    return ships, lines


def cmd_ship_check(args: argparse.Namespace) -> int:
    ships, lines = ship_decision(_results(args.candidate), _results(args.shipped))
    print("\n".join(lines))
    return 0 if ships else 3


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m music2latent2.training``; returns the exit status (0 done; 1 the run
    diverged or a rank failed; 3 ship-check: do not ship). A bad argument prints one line
    ``error: ...`` on stderr and raises ``SystemExit(2)``, before any model is loaded."""
    parser = Parser(prog=_PROG, formatter_class=HelpFormatter,
                     epilog="exit status: 0 ok, 1 diverged or a rank failed, 2 bad arguments or input, "
                            "3 ship-check: do not ship")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, formatter_class=HelpFormatter)

    t = command("train", "train a model: new, from a checkpoint (--init-from, a fine-tune) or --resume")
    add_train_arguments(t)
    t.set_defaults(func=cmd_train)
    j = command("join", "join and verify a snapshot's pieces into one checkpoint")
    j.add_argument("snapshot", help="a snapshot folder, or OUT/snapshots (its LATEST one)")
    j.add_argument("--out", required=True, help="checkpoint to write (.safetensors or a folder)")
    j.set_defaults(func=cmd_join)
    e = command("export", "EMA weights of a training state -> inference checkpoint")
    e.add_argument("--state", required=True, help="run folder or state.safetensors")
    e.add_argument("--out", required=True, help="checkpoint directory or .safetensors path")
    e.add_argument("--data", nargs="+", default=None, help="folders to measure the latent scale on "
                   "(default: the run's training data)")
    e.add_argument("--fp16", action="store_true", help="store weights in float16")
    e.add_argument("--device", default=None, help="where to measure the latent scale (default: cpu)")
    e.set_defaults(func=cmd_export)
    b = command("bench", "time real training steps: samples/s, FLOPs, memory, compile time")
    add_bench_arguments(b)
    b.set_defaults(func=cmd_bench)
    sc = command("ship-check", "does a candidate beat the shipped model? (exit 0: ship, 3: do not)")
    sc.add_argument("candidate", help="results.json (or its folder) of the candidate's evaluation")
    sc.add_argument("shipped", help="results.json (or its folder) of the shipped model's, same files and settings")
    sc.set_defaults(func=cmd_ship_check)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as err:
        print(f"{launch_env().tag()}error: {err}", file=sys.stderr, flush=True)
        raise


if __name__ == "__main__":
    raise SystemExit(main())
