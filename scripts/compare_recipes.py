#!/usr/bin/env python3
"""Compare training recipes at equal compute: the same steps, data, batch and seeds for each.

Each candidate is one ``python -m music2latent2.training train`` run per seed with ``--steps``;
its final EMA weights are then measured on held-out files (never trained on):

- latent health of whole clips (effective rank, slot cosine, within-clip and over-time shares);
- the decoder diagnostics of ``music2latent2.training.diagnostics`` on two-chunk windows:
  one-step error per noise level, context gain, latent use;
- the log-mel distance of a full reconstruction (the paper's two-step autoregressive decoding)
  of the first seconds of a few files.

Every clip is peak-normalised to -6 dBFS first, so the numbers are about the recipe, not the
recordings' levels. An untrained network gives the reference row. Results go to
``OUT/results.json`` (per seed) and a markdown table (means over seeds, with the spread).

    python scripts/compare_recipes.py --data corpus/music:0.6 corpus/midi:0.25 corpus/speech:0.15 \\
        --eval ../shared/data/eval --steps 1200 --seeds 0 1 --parallel 2 --out runs/recipes \\
        --table docs/recipe.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Every candidate names every recipe flag, so the table does not move when the defaults do.
LEG1 = ["--sigma-sampler", "legacy_density", "--sigma-uniform-share", "0", "--loss-weighting", "inverse_delta",
        "--context-share", "0", "--summary-init-std", "none", "--gain-db", "-12", "0", "--optimizer", "radam"]
FIXED = LEG1 + ["--sigma-sampler", "lognormal"]  # argparse keeps the last value of a repeated flag
# EDM weighting is left out of the combination: on its own it undid what the network learned at
# low noise (docs/recipe.md), so a combination with it measures nothing new.
ALL_BUT_EDM = FIXED + ["--sigma-uniform-share", "0.3", "--context-share", "0.25", "--summary-init-std", "0.5"]
# name -> (training flags, model overrides merged into --model-overrides)
CANDIDATES: Dict[str, Tuple[List[str], Dict[str, Any]]] = {
    "leg 1 recipe": (LEG1, {}),
    "sampler as documented": (FIXED, {}),
    "+ uniform share 0.3": (FIXED + ["--sigma-uniform-share", "0.3"], {}),
    "+ edm weighting": (FIXED + ["--loss-weighting", "edm"], {}),
    "+ context pairs 0.25": (FIXED + ["--context-share", "0.25"], {}),
    "+ summary init 0.5": (FIXED + ["--summary-init-std", "0.5"], {}),
    "+ sigma_data 0.25": (FIXED, {"sigma_data": 0.25}),
    "all but edm weighting": (ALL_BUT_EDM, {"sigma_data": 0.25}),
    # The paper's RAdam against the fused AdamW that skips non-finite steps on the device
    # (compare with "+ summary init 0.5", the same recipe with RAdam).
    "+ summary init 0.5, fused AdamW": (FIXED + ["--summary-init-std", "0.5", "--optimizer", "adamw"], {}),
    "+ summary init 0.5, RAdam on the fused kernel": (FIXED + ["--summary-init-std", "0.5", "--optimizer",
                                                               "radam_fused"], {}),
}


def _clips(eval_dir: Path, sample_rate: int, seconds: float, files: int | None = None) -> List[np.ndarray]:
    import torch

    from music2latent2.audio import find_audio_files, load_audio, resample

    out = []
    for path in find_audio_files(eval_dir)[:files]:
        data, sr = load_audio(path)
        mono = resample(torch.from_numpy(data), sr, sample_rate).numpy().mean(0, keepdims=True)
        mono = mono[:, : int(seconds * sample_rate)]
        out.append(mono * (10 ** (-6 / 20) / max(float(np.abs(mono).max()), 1e-8)))
    return out


def score(model_dir: Path, eval_dir: Path, files: int, seconds: float) -> Dict[str, Any]:
    import torch

    from music2latent2 import EncoderDecoder, Music2Latent2
    from music2latent2.audio import find_audio_files
    from music2latent2.latent_health import chunk_embeddings, latent_health
    from music2latent2.metrics import multires_logmel_distance
    from music2latent2.training.diagnostics import decoder_diagnostics, heldout_windows

    torch.set_num_threads(1)
    model = Music2Latent2.from_pretrained(model_dir)
    encdec = EncoderDecoder(model, device="cpu", max_batch_size=8)
    k = model.config.summary_tokens
    health = latent_health([chunk_embeddings(encdec.encode(c, normalize=False), k)
                            for c in _clips(eval_dir, model.config.sample_rate, 20.0)])
    logmel = [multires_logmel_distance(c, encdec.decode(encdec.encode(c, normalize=False), length=c.shape[-1],
                                                        seed=0))
              for c in _clips(eval_dir, model.config.sample_rate, seconds, files)]
    diag = decoder_diagnostics(model, heldout_windows(find_audio_files(eval_dir), model))
    return {"health": health, "logmel": float(np.mean(logmel)), "diagnostics": diag}


def _run_all(args: argparse.Namespace, env: Dict[str, str]) -> Dict[str, Dict[int, Path]]:
    common = ["--data", *args.data, "--preset", args.preset, "--batch-size", str(args.batch_size),
              "--lr", str(args.lr), "--warmup", str(args.warmup), "--ema", "0.99", "--workers", "1",
              "--log-every", "50", "--save-every", "1000000", "--eval-every", "1000000", "--steps", str(args.steps),
              "--delta-start", "1", "--delta-end", "0.01", "--latent-penalty", "1", "--cache-gb", "1",
              "--precision", "fp32", "--device", "cpu"]
    base = json.loads(args.model_overrides)
    jobs = []
    for n, (name, (flags, overrides)) in enumerate(CANDIDATES.items()):
        if args.only is not None and n not in args.only:
            continue
        for seed in args.seeds:
            jobs.append((name, seed, args.out / f"c{n}_s{seed}", flags + ["--seed", str(seed), "--model-overrides",
                                                                        json.dumps({**base, **overrides})]))
    runs: Dict[str, Dict[int, Path]] = {}
    running: List[tuple] = []
    while jobs or running:
        while jobs and len(running) < args.parallel:
            name, seed, out, flags = jobs.pop(0)
            runs.setdefault(name, {})[seed] = out
            if (out / "score.json").exists():
                continue  # trained and scored in an earlier invocation
            if out.exists():
                subprocess.run(["rm", "-rf", str(out)], check=True)
            out.mkdir(parents=True)
            log = open(out / "stdout.txt", "w")
            train = [sys.executable, "-m", "music2latent2.training", "train", *common, *flags, "--out", str(out)]
            # Scoring right after training keeps every core busy while other candidates still train.
            score_cmd = [sys.executable, str(Path(__file__).resolve()), "--score-run", str(out), "--seed-of-run",
                         str(seed), "--eval", args.eval, "--eval-files", str(args.eval_files), "--eval-seconds",
                         str(args.eval_seconds)]
            cmd = ["bash", "-c", " ".join(map(shlex.quote, train)) + " && " + " ".join(map(shlex.quote, score_cmd))]
            running.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), log))
        time.sleep(2)
        for proc, log in list(running):
            if proc.poll() is not None:
                log.close()
                running.remove((proc, log))
                if proc.returncode:
                    raise SystemExit(f"a candidate failed ({proc.returncode}); see {log.name}")
    return runs


def _cell(values: List[float], digits: int) -> str:
    mean = float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {float(np.std(values)):.{digits}f}"


def table(results: Dict[str, List[Dict[str, Any]]], args: argparse.Namespace) -> str:
    sig_cols = (1.0, 10.0, 80.0)
    lines = [f"Preset `{args.preset}` with `{args.model_overrides}`, batch {args.batch_size}, {args.steps} steps, "
             f"lr {args.lr:g}, warm-up {args.warmup}, EMA 0.99, ECT delta 1 -> 0.01, seeds "
             f"{', '.join(map(str, args.seeds))} (mean ± std over seeds); held-out clips peak-normalised to "
             "-6 dBFS. Lower is better for log-mel, one-step error and slot cosine; higher for the rest.", "",
             "| recipe | log-mel | eff. rank | slot cos | within-clip | over time | latent use | context gain dB | "
             + " | ".join(f"1-step nmse @{s:g}" for s in sig_cols) + " | level dB @80 |",
             "|---" * (9 + len(sig_cols)) + "|"]
    for name, rows in results.items():
        diag = [r["diagnostics"] for r in rows]
        cells = [_cell([r["logmel"] for r in rows], 3),
                 _cell([r["health"]["effective_rank"] for r in rows], 2),
                 _cell([r["health"]["slot_cosine"] for r in rows], 2),
                 _cell([r["health"]["within_clip_share"] for r in rows], 2),
                 _cell([r["health"]["time_share"] for r in rows], 2),
                 _cell([d["latent_use"] for d in diag], 2),
                 _cell([d["context"]["gain_db"] for d in diag], 2)]
        cells += [_cell([d["one_step"][str(s)]["nmse"] if str(s) in d["one_step"] else d["one_step"][s]["nmse"]
                         for d in diag], 3) for s in sig_cols]
        cells.append(_cell([d["one_step"][str(80.0)]["level_db"] if str(80.0) in d["one_step"]
                            else d["one_step"][80.0]["level_db"] for d in diag], 1))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", help="training folders (DIR[:WEIGHT])")
    ap.add_argument("--eval", required=True, help="held-out folder to score on")
    ap.add_argument("--score-run", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seed-of-run", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--eval-files", type=int, default=6)
    ap.add_argument("--eval-seconds", type=float, default=4.0)
    ap.add_argument("--steps", type=int, default=1200, help="training steps per run (the same compute for all)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--parallel", type=int, default=2, help="runs at once (one thread each)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--model-overrides", default='{"n_fft": 1024, "hop_length": 256, "freq_bins": 512, '
                    '"chunk_frames": 32}', help="JSON; default: a half-size STFT (16x compression) so CPU runs "
                    "get enough steps")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--only", nargs="+", type=int, default=None, help="indices of the candidates to run (default all)")
    ap.add_argument("--out", type=Path, default=Path("runs/recipes"))
    ap.add_argument("--table", type=Path, default=None,
                    help="markdown file whose generated section gets the table (docs/recipe.md)")
    args = ap.parse_args()

    if args.score_run is not None:  # internal: score one finished run into RUN/score.json
        row = {"seed": args.seed_of_run, **score(args.score_run / "final", Path(args.eval), args.eval_files,
                                                  args.eval_seconds)}
        (args.score_run / "score.json").write_text(json.dumps(row))
        return 0
    if not args.data:
        ap.error("--data is required")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    runs = _run_all(args, env)
    results: Dict[str, List[Dict[str, Any]]] = {}
    for name, seeds in runs.items():
        for seed, out in seeds.items():
            cached = out / "score.json"
            if cached.exists():
                row = json.loads(cached.read_text())
            else:
                row = {"seed": seed, **score(out / "final", Path(args.eval), args.eval_files, args.eval_seconds)}
                cached.write_text(json.dumps(row))
            results.setdefault(name, []).append(row)
            print(f"{name} seed {seed}: log-mel {row['logmel']:.3f} health {row['health']}", flush=True)

    import torch

    from music2latent2 import ModelConfig, Music2Latent2

    ref_rows = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        config = ModelConfig.from_preset(args.preset, **json.loads(args.model_overrides))
        path = Music2Latent2(config).save_pretrained(args.out / f"untrained_s{seed}")
        ref_rows.append({"seed": seed, **score(path.parent, Path(args.eval), args.eval_files, args.eval_seconds)})
    results["untrained network (reference)"] = ref_rows
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    text = table(results, args)
    print(text)
    if args.table:  # a generated section of that markdown file; the rest of it is kept
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from bench_report import git_commit, replace_section

        replace_section(args.table, "compare_recipes", f"Measured at commit `{git_commit()}`.\n\n{text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
