"""Which decode settings and which input level suit a checkpoint, measured on held-out audio.

    python benchmarks/decode_settings.py knobs --eval DIR [--model NAME] [--seconds 4] [--write docs/decoding.md]
    python benchmarks/decode_settings.py levels --eval DIR [--model NAME] [--peaks -40 -20 -1] [--write docs/levels.md]

``knobs``: every clip (mono, its first ``--seconds``, peak-normalised to -6 dBFS) is encoded as
``encode`` does by default (brought to the model's ``input_peak_db``) and decoded back to its
own level with each setting: autoregressive with 1, 2 and 4 consistency steps at several ``sigma_cond``, and parallel
mode. Reported per setting: the mean multi-resolution log-mel distance to the input, the level
difference (dB, reconstruction minus input) and the compute, as CPU seconds per second of audio
(the decode's wall time on this machine divided by the audio's duration, threads as given).

``levels``: the same clips scaled to each peak level in ``--peaks`` are encoded *without* the
model's level normalisation (``normalize=False``) and decoded with the default settings; the
output, scaled back by the same factor, is scored against the -6 dBFS clip (every row at one
level: see ``_decode_scored``): the level at which the weights reconstruct best is the one to write in
``input_peak_db``. For a model that has one, the same levels are run again with normalisation
on, which should make every row score like the best one.

The mean over clips is reported; one fixed decode seed per clip, so settings differ only in
themselves. ``--write`` puts the table in a generated section of that markdown file (with the
commit measured), leaving the rest of the file as it is.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import git_commit, replace_section  # noqa: E402

from music2latent2 import EncoderDecoder  # noqa: E402
from music2latent2.audio import find_audio_files, load_audio, resample  # noqa: E402
from music2latent2.evaluate import level_difference_db  # noqa: E402
from music2latent2.metrics import multires_logmel_distance  # noqa: E402
from music2latent2.sampling import PAPER_DENOISING_STEPS, PAPER_SIGMA_COND  # noqa: E402

# (label, mode, denoising_steps, sigma_cond)
SETTINGS: Tuple[Tuple[str, str, int, float], ...] = (
    ("autoregressive, 1 step, sigma_cond 0.2", "autoregressive", 1, 0.2),
    ("autoregressive, 1 step, sigma_cond 0.4 (paper)", "autoregressive", 1, 0.4),
    ("autoregressive, 2 steps, sigma_cond 0.1", "autoregressive", 2, 0.1),
    ("autoregressive, 2 steps, sigma_cond 0.2", "autoregressive", 2, 0.2),
    ("autoregressive, 2 steps, sigma_cond 0.4", "autoregressive", 2, 0.4),
    ("autoregressive, 2 steps, sigma_cond 0.8", "autoregressive", 2, 0.8),
    ("autoregressive, 4 steps, sigma_cond 0.2", "autoregressive", 4, 0.2),
    ("autoregressive, 4 steps, sigma_cond 0.4", "autoregressive", 4, 0.4),
    ("parallel, 1 step", "parallel", 1, 0.4),
    ("parallel, 2 steps, sigma_cond 0.2", "parallel", 2, 0.2),
)


def clips(eval_dir: Path, sample_rate: int, seconds: float, peak_db: float) -> List[Tuple[str, np.ndarray]]:
    """Every audio file's first ``seconds``, mono, resampled, peak-normalised to ``peak_db`` dBFS."""
    out = []
    for path in find_audio_files(eval_dir):
        data, sr = load_audio(path)
        mono = resample(torch.from_numpy(data), sr, sample_rate).numpy().mean(0, keepdims=True)
        mono = mono[:, : int(seconds * sample_rate)].astype(np.float32)
        out.append((path.stem, mono * np.float32(10 ** (peak_db / 20) / max(float(np.abs(mono).max()), 1e-8))))
    if not out:
        raise SystemExit(f"no audio files in {eval_dir}")
    return out


def _decode_scored(encdec: EncoderDecoder, wav: np.ndarray, seed: int, scale: float = 1.0, normalize: bool = True,
                   **options: Any) -> Tuple[float, float, float]:
    """Encode ``wav * scale``, decode it, and score the result divided by ``scale`` against ``wav``.

    Scoring at one common level matters: the log-mel distance floors mel power at an absolute
    1e-5, so a quieter pair of signals has more bins at the floor and scores better for no reason.
    """
    latents, gain = encdec.encode(wav * np.float32(scale), normalize=normalize, return_gain=True)
    start = time.perf_counter()
    out = encdec.decode(latents, length=wav.shape[-1], seed=seed, gain=gain, **options) / np.float32(scale)
    seconds = time.perf_counter() - start
    return (multires_logmel_distance(wav, out, encdec.config.sample_rate), level_difference_db(wav, out),
            seconds)


def run_knobs(encdec: EncoderDecoder, items: Sequence[Tuple[str, np.ndarray]]) -> List[Dict[str, Any]]:
    rows = []
    audio_s = sum(w.shape[-1] for _, w in items) / encdec.config.sample_rate
    for label, mode, steps, sigma in SETTINGS:
        scores = [_decode_scored(encdec, w, seed, mode=mode, denoising_steps=steps, sigma_cond=sigma)
                  for seed, (_, w) in enumerate(items)]
        rows.append({"setting": label, "mode": mode, "denoising_steps": steps, "sigma_cond": sigma,
                     "logmel": float(np.mean([s[0] for s in scores])),
                     "level_db": float(np.mean([s[1] for s in scores])),
                     "cpu_s_per_audio_s": sum(s[2] for s in scores) / audio_s})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def run_levels(encdec: EncoderDecoder, items: Sequence[Tuple[str, np.ndarray]],
               peaks: Sequence[float]) -> List[Dict[str, Any]]:
    rows = []
    # Normalisation rows only mean something for a model that names its level.
    for normalize in (False, True) if encdec.config.input_peak_db is not None else (False,):
        for peak in peaks:
            scores = [_decode_scored(encdec, w, seed, 10 ** (peak / 20) / max(float(np.abs(w).max()), 1e-8),
                                     normalize=normalize) for seed, (_, w) in enumerate(items)]
            rows.append({"input_peak_dbfs": peak, "normalize": normalize,
                         "logmel": float(np.mean([s[0] for s in scores])),
                         "level_db": float(np.mean([s[1] for s in scores]))})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _header(encdec: EncoderDecoder, args: argparse.Namespace, n: int, peak_db: float) -> str:
    return (f"Model `{args.model or 'default'}`, commit `{git_commit()}`, CPU, {torch.get_num_threads()} threads; "
            f"{n} held-out clips (first {args.seconds:g} s, mono, peak {peak_db:g} dBFS), one decode seed per clip. "
            "log-mel: multi-resolution log-mel distance to the input (lower is better); level: reconstruction "
            "minus input, dB; both at the clip's level.")


def knobs_table(rows: Sequence[Dict[str, Any]], header: str) -> str:
    best = min(rows, key=lambda r: r["logmel"])
    lines = [header, "", "| decoding | log-mel | level dB | CPU s per audio s |", "|---|---|---|---|"]
    for r in rows:
        mark = " **(best)**" if r is best else ""
        lines.append(f"| {r['setting']}{mark} | {r['logmel']:.3f} | {r['level_db']:+.1f} | "
                     f"{r['cpu_s_per_audio_s']:.2f} |")
    return "\n".join(lines)


def levels_table(rows: Sequence[Dict[str, Any]], header: str, target: Optional[float]) -> str:
    lines = [header, ""]
    if any(r["normalize"] for r in rows):
        lines += [f"Normalisation on brings every input to the model's `input_peak_db` ({target} dBFS).", ""]
    lines += ["| input peak dBFS | normalise | log-mel | level dB |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['input_peak_dbfs']:g} | {'yes' if r['normalize'] else 'no'} | {r['logmel']:.3f} | "
                     f"{r['level_db']:+.1f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("knobs", "levels"))
    ap.add_argument("--eval", type=Path, required=True, help="held-out audio folder")
    ap.add_argument("--model", default=None, help="model name, folder or repo id (default: the bundled default)")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--peaks", type=float, nargs="+", default=[-40, -30, -25, -20, -12, -6, -1])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--write", type=Path, default=None, help="markdown file whose generated section gets the table")
    ap.add_argument("--render", type=Path, default=None, help="only format the rows of an earlier --json run")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    encdec = EncoderDecoder(args.model, device="cpu")
    target = encdec.config.input_peak_db
    items = clips(args.eval, encdec.config.sample_rate, args.seconds, -6.0)
    header = _header(encdec, args, len(items), -6.0)
    if args.render is not None:
        rows = json.loads(args.render.read_text())
    elif args.what == "knobs":
        rows = run_knobs(encdec, items)
    else:
        rows = run_levels(encdec, items, args.peaks)
    if args.what == "knobs":
        text = knobs_table(rows, header + f" Paper: {PAPER_DENOISING_STEPS} step, sigma_cond {PAPER_SIGMA_COND}.")
    else:
        text = levels_table(rows, header, target)
    print(text)
    if args.json and args.render is None:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.write:
        replace_section(args.write, f"decode_settings {args.what}", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
