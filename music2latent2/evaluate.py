"""Reconstruction evaluation: ``python -m music2latent2.evaluate --model M --data DIR``.

Encodes and decodes every audio file under DIR and reports, per file and on average, SI-SDR,
the multi-resolution log-mel L1 distance, ViSQOL (audio mode, if ``visqol-python`` is
installed and runs; otherwise null with the reason), the level of the reconstruction relative to
the input (dB) overall and per octave band, the speed of encode and decode in "x real time"
(seconds of audio per second of compute: higher is faster, as in the README's speed tables;
``encode_x_real_time`` and ``decode_x_real_time``; the mean row is the total audio over the
total compute time), and the latent health of all files' latents together (:mod:`~music2latent2.latent_health`). Writes
``results.json`` and ``results.md`` (``--out``), and with ``--report DIR`` a self-contained HTML
report with audio players, spectrograms and per-band levels (:mod:`~music2latent2.report`),
optionally side by side with another (``--compare``; an older report whose speeds are real-time
factors, ``encode_rtf``/``decode_rtf``, is read as 1 / RTF).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from ._version import __version__
from .audio import AUDIO_EXTENSIONS, find_audio_files, load_audio, resample
from .fileio import atomic_write
from .inference import EncoderDecoder
from .latent_health import HEALTH_KEYS, chunk_embeddings, latent_health
from .metrics import band_level_error_db, multires_logmel_distance, octave_band_levels_db, si_sdr
from .report import REPORT_AUDIO_FORMATS, SPEED_KEYS, ReportError, ReportWriter, load_report, overall_speed
from .sampling import DEFAULT_DENOISING_STEPS, DEFAULT_SIGMA_COND

__all__ = ["AUDIO_EXTENSIONS", "find_audio_files", "ViSQOL", "evaluate_file", "evaluate_files", "model_info",
           "software_info", "markdown_table", "main"]

FileCallback = Callable[[Dict[str, Any], np.ndarray, np.ndarray], None]

METRICS = ("si_sdr", "logmel_distance", "visqol", "level_db", "band_level_error_db", *SPEED_KEYS)


def level_difference_db(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Power of ``estimate`` relative to ``reference`` in dB (0: the same level; -9: 9 dB too quiet)."""
    ref = float(np.mean(np.square(reference, dtype=np.float64)))
    est = float(np.mean(np.square(estimate, dtype=np.float64)))
    return 10 * math.log10(max(est, 1e-20) / max(ref, 1e-20))


class ViSQOL:
    """ViSQOL v3 audio mode (48 kHz) through ``visqol-python``; ``available`` and ``reason`` say
    whether it could be set up. Never returns a made-up score: failures give (None, reason)."""

    def __init__(self, enabled: bool = True) -> None:
        self.api: Any = None
        self.reason: str | None = None if enabled else "disabled (--no-visqol)"
        if not enabled:
            return
        try:
            from visqol import VisqolApi

            api = VisqolApi()
            api.create(mode="audio")
            self.api = api
        except Exception as err:  # ImportError, missing model file, numba issues...
            self.reason = f"visqol-python unavailable: {type(err).__name__}: {err}"

    @property
    def available(self) -> bool:
        return self.api is not None

    def score(self, reference: np.ndarray, estimate: np.ndarray, sr: int) -> Tuple[float | None, str | None]:
        """MOS-LQO of a mono-mixed pair ``(C, T)`` at ``sr`` (resampled to 48 kHz)."""
        if self.api is None:
            return None, self.reason
        try:
            ref = resample(torch.from_numpy(reference.mean(0)).double(), sr, 48000).numpy()
            est = resample(torch.from_numpy(estimate.mean(0)).double(), sr, 48000).numpy()
            value = float(self.api.measure_from_arrays(ref, est, 48000).moslqo)
        except Exception as err:
            return None, f"visqol failed: {type(err).__name__}: {err}"
        if not math.isfinite(value):
            return None, "visqol returned a non-finite score"
        return value, None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate_file(encdec: EncoderDecoder, path: Path, max_seconds: float | None = None,
                  visqol: ViSQOL | None = None, denoising_steps: int = DEFAULT_DENOISING_STEPS, seed: int = 0,
                  mode: str = "autoregressive", sigma_cond: float = DEFAULT_SIGMA_COND,
                  normalize: bool = True, return_audio: bool = False) -> Dict[str, Any]:
    """Reconstruct one file and measure it (``mode``: the decoder's, autoregressive or parallel).

    The file is reconstructed as a user's would be: encoded with ``normalize`` and decoded back to
    its own level with the gain ``encode`` returned.

    Returns:
        {"file", "seconds", "channels", "si_sdr", "logmel_distance", "visqol", "visqol_error",
        "level_db", "band_levels_db", "band_level_error_db", "encode_x_real_time", "decode_x_real_time",
        "samples", "chunk_latents"} and, with ``return_audio``, "audio": the (input, reconstruction)
        pair the metrics compared, each (C, T) at the model's rate; ``band_levels_db`` is the
        per-octave-band level difference (:func:`~music2latent2.metrics.octave_band_levels_db`), ``chunk_latents`` is
        (chunks, K, d_lat) for :func:`~music2latent2.latent_health.latent_health`, not a metric;
        ``*_x_real_time`` are seconds of audio per second of compute (higher is faster; None if
        the clock measured no time at all).
    """
    data, sr = load_audio(path)
    sr_model = encdec.sample_rate
    if sr != sr_model:
        data = resample(torch.from_numpy(data), sr, sr_model).numpy()
    if max_seconds is not None:
        data = data[:, : max(1, int(max_seconds * sr_model))]
    seconds = data.shape[-1] / sr_model
    device = encdec.device
    _sync(device)
    t0 = time.perf_counter()
    z, gain = encdec.encode(data, sr=sr_model, normalize=normalize, return_gain=True)
    _sync(device)
    t1 = time.perf_counter()
    rec = encdec.decode(z, length=data.shape[-1], denoising_steps=denoising_steps, seed=seed, mode=mode,
                        sigma_cond=sigma_cond, gain=gain)
    _sync(device)
    t2 = time.perf_counter()
    rec = np.asarray(rec, dtype=np.float32)
    if rec.shape[0] != data.shape[0]:  # stereo model on a mono file: compare the mono mix
        rec = rec.mean(0, keepdims=True)
        data = data.mean(0, keepdims=True) if data.shape[0] != 1 else data
    result: Dict[str, Any] = {"file": str(path), "seconds": seconds, "samples": int(data.shape[-1]),
                              "channels": int(data.shape[0])}
    result["si_sdr"] = si_sdr(data, rec)
    result["logmel_distance"] = multires_logmel_distance(data, rec, sr_model)
    score, error = visqol.score(data, rec, sr_model) if visqol is not None else (None, "not requested")
    result["visqol"], result["visqol_error"] = score, error
    result["level_db"] = level_difference_db(data, rec)
    result["band_levels_db"] = octave_band_levels_db(data, rec, sr_model)
    result["band_level_error_db"] = band_level_error_db(result["band_levels_db"])
    result["encode_x_real_time"] = _speed(seconds, t1 - t0)
    result["decode_x_real_time"] = _speed(seconds, t2 - t1)
    result["chunk_latents"] = chunk_embeddings(z, encdec.config.summary_tokens)
    if return_audio:
        result["audio"] = (data, rec)
    return result


def _speed(audio_seconds: float, compute_seconds: float) -> float | None:
    """x real time: seconds of audio per second of compute."""
    return audio_seconds / compute_seconds if compute_seconds > 0 else None


def _mean(rows: Sequence[Dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return float(np.mean(values)) if values else None


def evaluate_files(encdec: EncoderDecoder, files: Sequence[Path], max_seconds: float | None = None,
                   visqol: ViSQOL | None = None, denoising_steps: int = DEFAULT_DENOISING_STEPS, seed: int = 0,
                   verbose: bool = False, mode: str = "autoregressive", sigma_cond: float = DEFAULT_SIGMA_COND,
                   normalize: bool = True, root: Optional[Path] = None,
                   on_file: Optional[FileCallback] = None) -> Dict[str, Any]:
    """Evaluate several files.

    Args:
        root: the folder the files were found in; each row's ``"key"`` is its path under it
            (POSIX), else its name.
        on_file: called as ``on_file(row, input, reconstruction)`` after each file, with the
            (C, T) signals the metrics compared (the report draws and plays them).

    Returns:
        {"files": [per-file dicts], "mean": {metric: value|None} (for the speeds: all the audio
        over all the compute time, not a mean of ratios), "band_levels_db": {band: mean
        over the files where it is not empty}, "latent_health": {...}}: the latent health of
        every file's latents taken together, each file a clip.
    """
    if not files:
        raise ValueError("no audio files to evaluate")
    rows = []
    clips = []
    for path in files:
        row = evaluate_file(encdec, path, max_seconds, visqol, denoising_steps, seed, mode, sigma_cond, normalize,
                            return_audio=on_file is not None)
        row["key"] = _key(Path(path), root)
        clips.append(row.pop("chunk_latents"))
        if on_file is not None:
            on_file(row, *row.pop("audio"))
        rows.append(row)
        if verbose:
            print(f"{Path(path).name}: " + ", ".join(_fmt(k, row[k]) for k in METRICS), flush=True)
    mean = {k: overall_speed(rows, k) if k in SPEED_KEYS else _mean(rows, k) for k in METRICS}
    bands = {band: _mean([r["band_levels_db"] for r in rows], band) for band in rows[0]["band_levels_db"]}
    health = {k: (v if math.isfinite(v) else None) for k, v in latent_health(clips).items()}
    return {"files": rows, "mean": mean, "band_levels_db": bands, "latent_health": health}


def _key(path: Path, root: Optional[Path]) -> str:
    if root is not None and root.is_dir():
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            pass
    return path.name


def model_info(encdec: EncoderDecoder) -> Dict[str, Any]:
    """What a report says about the model: its name, checkpoint sha256 and file (None for a model
    built in memory), Hub repo and commit, parameter count, channels and sample rate."""
    source = getattr(encdec.model, "source", None)
    return {"name": source.name if source is not None else "in-memory model",
            "sha256": source.sha256 if source is not None else None,
            "path": str(source.path) if source is not None else None,
            "repo_id": source.repo_id if source is not None else None,
            "revision": source.revision if source is not None else None,
            "parameters": sum(p.numel() for p in encdec.model.parameters()),
            "channels": encdec.config.audio_channels, "sample_rate": encdec.sample_rate}


def software_info() -> Dict[str, Any]:
    """The code that made the numbers: package version, its git commit (with ``-dirty`` for
    uncommitted changes; None outside a git checkout), torch version and the date."""
    here = Path(__file__).resolve().parent
    commit: Optional[str] = None
    try:
        top = subprocess.run(["git", "-C", str(here), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=10)
        if top.returncode == 0 and Path(top.stdout.strip()).resolve() == here.parent:
            head = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                  text=True, timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            commit = (head + ("-dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"version": __version__, "commit": commit, "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _fmt(key: str, value: float | None) -> str:
    return f"{key} {'n/a' if value is None else f'{value:.3f}'}"


def markdown_table(report: Dict[str, Any]) -> str:
    """Per-file rows and a mean row, as a markdown table (speeds in x real time: audio seconds per
    compute second, higher is faster; their mean row is the total audio over the total compute)."""
    head = ("| file | seconds | SI-SDR (dB) | log-mel dist | ViSQOL | level (dB) | band level error (dB) | "
            "encode x real time | decode x real time |")
    lines = [head, "|" + " --- |" * (len(METRICS) + 2)]

    def cell(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    for r in report["files"]:
        lines.append(f"| {Path(r['file']).name} | {r['seconds']:.1f} | " +
                     " | ".join(cell(r[k]) for k in METRICS) + " |")
    total = sum(r["seconds"] for r in report["files"])
    lines.append(f"| **mean** | {total:.1f} | " + " | ".join(cell(report["mean"][k]) for k in METRICS) + " |")
    if report.get("band_levels_db"):
        bands = list(report["band_levels_db"])

        def signed(v: float | None) -> str:
            return "n/a" if v is None else f"{v:+.1f}"

        lines += ["", "Level per octave band, reconstruction minus input (dB; n/a: the input has next to nothing "
                  "there):", "", "| file | " + " | ".join(bands) + " |", "|" + " --- |" * (len(bands) + 1)]
        lines += [f"| {Path(r['file']).name} | " + " | ".join(signed(r["band_levels_db"].get(b)) for b in bands) + " |"
                  for r in report["files"]]
        lines.append("| **mean** | " + " | ".join(signed(report["band_levels_db"][b]) for b in bands) + " |")
    if report.get("latent_health"):
        health = report["latent_health"]
        lines += ["", "Latent health (all files' latents; docs/recipe.md): " + ", ".join(
            f"{k.replace('_', ' ')} {cell(health.get(k))}" for k in HEALTH_KEYS)]
    return "\n".join(lines) + "\n"


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint file/directory or model name (default model)")
    parser.add_argument("--data", required=True, help="folder of audio files (recursive) or one file")
    parser.add_argument("--out", default=None, help="folder for results.json / results.md (default: print only)")
    parser.add_argument("--report", default=None, metavar="DIR",
                        help="write an HTML report (index.html with players, spectrograms, band levels) and the "
                             "results into DIR; an earlier report there is replaced once the new one is complete")
    parser.add_argument("--compare", default=None, metavar="OTHER_REPORT",
                        help="with --report: put a finished report (another checkpoint, or the other decoding mode) "
                             "side by side with this one, as B")
    parser.add_argument("--report-audio", default="flac", choices=list(REPORT_AUDIO_FORMATS),
                        help="how the report embeds audio players (default flac; wav is 2x larger; none: no players)")
    parser.add_argument("--card", default=None, metavar="PNG",
                        help="with --report: also draw a one-picture summary (for a README model card)")
    parser.add_argument("--card-file", default=None, metavar="KEY",
                        help="the file whose spectrograms the card shows (its path under --data; default the first)")
    parser.add_argument("--max-seconds", type=float, default=None, help="evaluate only the first N seconds")
    parser.add_argument("--max-files", type=int, default=None, help="evaluate only the first N files")
    parser.add_argument("--device", default=None)
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--denoising-steps", type=int, default=DEFAULT_DENOISING_STEPS)
    parser.add_argument("--sigma-cond", type=float, default=DEFAULT_SIGMA_COND,
                        help="re-noising level of the previous chunk (paper: 0.4)")
    parser.add_argument("--no-normalize", action="store_true",
                        help="encode each file at its own level (default: at the model's input level, restored after)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", default="autoregressive", choices=["autoregressive", "parallel"],
                        help="decoding mode")
    parser.add_argument("--no-visqol", action="store_true", help="skip ViSQOL (it is slow on CPU)")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m music2latent2.evaluate") -> int:
    """Run an evaluation from the command line; returns the exit status (0 done, 2 bad arguments)."""
    parser = _parser(prog)
    args = parser.parse_args(argv)
    if args.max_seconds is not None and not args.max_seconds > 0:
        parser.error("--max-seconds must be positive")
    for flag in ("compare", "card", "card_file"):
        if getattr(args, flag) is not None and args.report is None:
            parser.error(f"--{flag.replace('_', '-')} needs --report")
    try:
        files = find_audio_files(args.data)[: args.max_files]
    except ValueError as err:
        parser.error(str(err))
    if not files:
        parser.error(f"no audio files found in {args.data}")
    keys = [_key(Path(f), Path(args.data)) for f in files]
    if args.card_file is not None and args.card_file not in keys:
        parser.error(f"--card-file {args.card_file!r} is not among the files to evaluate: {', '.join(keys)}")
    try:
        compare = load_report(args.compare) if args.compare else None
    except ReportError as err:
        parser.error(str(err))
    try:
        encdec = EncoderDecoder(args.model, device=args.device, precision=args.precision)
    except (OSError, ValueError, RuntimeError) as err:  # missing/corrupt checkpoint, no network, bad device
        print(f"error: cannot load the model {args.model or '(default)'}: {err}", file=sys.stderr)
        return 2
    try:
        writer = ReportWriter(args.report, encdec.sample_rate, args.report_audio, compare) if args.report else None
    except (ReportError, ImportError) as err:
        parser.error(str(err))
    software = software_info()  # the code as it was when the run started
    with writer if writer is not None else contextlib.nullcontext():
        visqol = ViSQOL(enabled=not args.no_visqol)
        if not visqol.available:
            print(f"ViSQOL: null ({visqol.reason})", file=sys.stderr)
        report = evaluate_files(encdec, files, args.max_seconds, visqol, args.denoising_steps, args.seed,
                                verbose=True, mode=args.mode, sigma_cond=args.sigma_cond,
                                normalize=not args.no_normalize, root=Path(args.data),
                                on_file=writer.add if writer is not None else None)
        report["model"] = str(args.model)
        report["model_info"] = model_info(encdec)
        report["mode"] = args.mode
        report["decoding"] = {"denoising_steps": args.denoising_steps, "sigma_cond": args.sigma_cond,
                              "normalize": not args.no_normalize, "seed": args.seed, "precision": args.precision,
                              "device": str(encdec.device), "max_seconds": args.max_seconds}
        report["data"] = {"path": str(args.data), "files": len(files)}
        report["software"] = software
        report["visqol_note"] = visqol.reason
        table = markdown_table(report)
        print(table)
        if args.out and not (args.report and Path(args.out).resolve() == Path(args.report).resolve()):
            out = Path(args.out)
            _write_text(out / "results.json", json.dumps(report, indent=2) + "\n")
            _write_text(out / "results.md", table)
            print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
        if writer is not None:
            card = (Path(args.card), args.card_file) if args.card else None
            try:
                index = writer.finish(report, table, card)
            except ReportError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
            print(f"wrote the report {index}" + (f" and the card {args.card}" if args.card else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
