#!/usr/bin/env python3
"""Compare short-run training recipes at equal compute (same wall-clock budget, same machine).

Each candidate is one ``python -m music2latent2.training train`` run with ``--max-minutes``;
its final EMA weights are then scored on the first seconds of held-out files with the paper's
two-step autoregressive decoding (multi-resolution log-mel distance, SI-SDR). An untrained
network gives the reference row. The table is printed and written as markdown.

    python scripts/compare_recipes.py --data ../shared/data/train_real --eval ../shared/data/eval \\
        --minutes 6 --parallel 2 --out runs/recipes --table docs/recipe_comparison.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CANDIDATES: Dict[str, List[str]] = {
    # The paper's (v1's) consistency schedule 0.1 -> 0.001, as written.
    "paper (delta 0.1 -> 0.001)": ["--delta-start", "0.1", "--delta-end", "0.001"],
    # Same, with the bf16-safe floor the relay legs use.
    "paper, floor 0.01": ["--delta-start", "0.1", "--delta-end", "0.01"],
    # Easy Consistency Tuning: a pure denoiser first (target = clean chunk), then shrink the step.
    "ECT (delta 1 -> 0.01)": ["--delta-start", "1", "--delta-end", "0.01"],
    # ECT with noise levels drawn higher (log-sigma mean 0 instead of -1.1): more weight near sigma_max,
    # where one-step decoding starts.
    "ECT, log-sigma mean 0": ["--delta-start", "1", "--delta-end", "0.01", "--sigma-log-mean", "0"],
}


def score(model_dir: Path, eval_dir: Path, files: int, seconds: float) -> Dict[str, float]:
    import torch

    from music2latent2 import EncoderDecoder
    from music2latent2.evaluate import ViSQOL, evaluate_files, find_audio_files

    torch.set_num_threads(1)
    paths = [p for p in find_audio_files(eval_dir)][:files]
    encdec = EncoderDecoder(model_dir, device="cpu", max_batch_size=8)
    report = evaluate_files(encdec, paths, seconds, ViSQOL(enabled=False))
    return {"logmel": report["mean"]["logmel_distance"], "si_sdr": report["mean"]["si_sdr"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", required=True, help="training folders (DIR[:WEIGHT])")
    ap.add_argument("--eval", required=True, help="held-out folder to score on")
    ap.add_argument("--eval-files", type=int, default=6)
    ap.add_argument("--eval-seconds", type=float, default=4.0)
    ap.add_argument("--minutes", type=float, default=6.0, help="training budget per candidate")
    ap.add_argument("--parallel", type=int, default=2, help="candidates run at once (one thread each)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--model-overrides", default='{"n_fft": 1024, "hop_length": 256, "freq_bins": 512, '
                    '"chunk_frames": 32}', help="JSON; default: a half-size STFT (16x compression) so CPU runs "
                    "get enough steps")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="+", type=int, default=None, help="indices of the candidates to run (default all)")
    ap.add_argument("--out", type=Path, default=Path("runs/recipes"))
    ap.add_argument("--table", type=Path, default=None, help="write the markdown table here too")
    args = ap.parse_args()

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    common = ["--data", *args.data, "--preset", args.preset, "--model-overrides", args.model_overrides,
              "--batch-size", str(args.batch_size),
              "--lr", str(args.lr), "--warmup", str(args.warmup), "--ema", "0.99", "--workers", "1",
              "--log-every", "25", "--save-every", "1000000", "--eval-every", "1000000",
              "--max-minutes", str(args.minutes), "--reserve-minutes", "0", "--calibrate-steps", "20",
              "--latent-penalty", "1", "--cache-gb", "2", "--precision", "fp32", "--seed", str(args.seed)]
    pending = [item for n, item in enumerate(CANDIDATES.items()) if args.only is None or n in args.only]
    running: List[tuple] = []
    runs: Dict[str, Path] = {}
    while pending or running:
        while pending and len(running) < args.parallel:
            name, flags = pending.pop(0)
            out = args.out / f"c{len(runs)}"
            runs[name] = out
            out.mkdir(parents=True, exist_ok=True)
            log = open(out / "stdout.txt", "w")
            cmd = [sys.executable, "-m", "music2latent2.training", "train", *common, *flags, "--out", str(out)]
            running.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), log))
        time.sleep(5)
        for proc, log in list(running):
            if proc.poll() is not None:
                log.close()
                running.remove((proc, log))
                if proc.returncode:
                    print(f"a candidate failed ({proc.returncode}); see {log.name}", file=sys.stderr)

    rows = []
    for name, out in runs.items():
        entries = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        metrics = score(out / "final", Path(args.eval), args.eval_files, args.eval_seconds)
        rows.append((name, entries[-1]["step"], entries[-1]["loss"], metrics))
        print(name, rows[-1][1:], flush=True)
    # Reference: the same network untrained (what "learned nothing" scores).
    import torch

    from music2latent2 import ModelConfig, Music2Latent2

    torch.manual_seed(args.seed)
    config = ModelConfig.from_preset(args.preset, **json.loads(args.model_overrides))
    untrained = Music2Latent2(config).save_pretrained(args.out / "untrained")
    ref = score(untrained.parent, Path(args.eval), args.eval_files, args.eval_seconds)

    lines = [f"Recipes at equal compute: preset `{args.preset}` with `{args.model_overrides}`, "
             f"batch {args.batch_size}, lr {args.lr:g}, "
             f"warm-up {args.warmup}, EMA 0.99, seed {args.seed}, {args.minutes:g} min of one CPU thread each "
             f"({args.parallel} at a time on a {os.cpu_count()}-core machine); scored on the first "
             f"{args.eval_seconds:g} s of {args.eval_files} held-out files, two-step autoregressive decoding.",
             "", "| recipe | steps | final loss | log-mel distance (lower is better) | SI-SDR dB |",
             "| --- | --- | --- | --- | --- |"]
    for name, steps, loss, m in rows:
        lines.append(f"| {name} | {steps} | {loss:.1f} | {m['logmel']:.3f} | {m['si_sdr']:.2f} |")
    lines.append(f"| untrained network (reference) | 0 | - | {ref['logmel']:.3f} | {ref['si_sdr']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
