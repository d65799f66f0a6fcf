"""How many torch threads should a CPU user give music2latent2? Measured, not guessed.

    python benchmarks/cpu_threads.py [--model NAME_OR_PATH] [--seconds 8] [--repeats 3]

Each measurement runs in a fresh process (``--worker``) with ``torch.set_num_threads(N)`` and
times encode and decode of ``--seconds`` of music (the bundled Brahms example, tiled), best of
``--repeats`` after one warm-up call. Three situations are measured for N = 1 and N = all cores:

* idle: the worker alone on the machine;
* busy: one other CPU-bound process (a Python busy loop) runs beside it, as on a shared machine;
* two workers: two workers at once, as ``--shard 0/2`` and ``--shard 1/2`` would run. Encode and
  decode are timed in separate pairs that start together; the aggregate throughput is all the
  audio both processed divided by the wall time from the common start until the later one is
  done (so a worker finishing early does not flatter the other).

Prints a markdown table (x real time = audio seconds per wall-clock second).
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

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "brahms_hungarian_dance_5_8s.flac"


def worker(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from music2latent2 import EncoderDecoder
    from music2latent2.audio import load_audio

    torch.set_num_threads(args.threads)
    encdec = EncoderDecoder(args.model, device="cpu")
    wav, sr = load_audio(EXAMPLE)
    wav = wav.mean(axis=0, keepdims=True)
    reps = int(np.ceil(args.seconds * sr / wav.shape[-1]))
    wav = np.tile(wav, reps)[:, : int(args.seconds * sr)]
    z = encdec.encode(wav, sr=sr)
    encdec.decode(encdec.encode(wav[:, :sr], sr=sr), seed=0)  # warm-up
    if args.start_at:  # a pair: line up with the other worker, then time the whole loop
        time.sleep(max(0.0, args.start_at - time.time()))
        for _ in range(args.repeats):
            encdec.encode(wav, sr=sr) if args.op == "encode" else encdec.decode(z, seed=0)
        print(json.dumps({"end": time.time()}))
        return
    best: Dict[str, float] = {"encode": float("inf"), "decode": float("inf")}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        encdec.encode(wav, sr=sr)
        t1 = time.perf_counter()
        encdec.decode(z, seed=0)
        t2 = time.perf_counter()
        best["encode"] = min(best["encode"], t1 - t0)
        best["decode"] = min(best["decode"], t2 - t1)
    print(json.dumps({"threads": args.threads, "seconds": args.seconds, **best}))


def _spawn(args: argparse.Namespace, threads: int, start_at: float = 0.0, op: str = "both") -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--worker", "--threads", str(threads), "--seconds", str(args.seconds),
           "--repeats", str(args.repeats), "--start-at", str(start_at), "--op", op]
    if args.model:
        cmd += ["--model", args.model]
    # OMP/MKL variables would override set_num_threads in some builds; the worker decides alone.
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)


def _result(proc: subprocess.Popen) -> Dict[str, float]:
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"worker failed with exit status {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="manifest name or checkpoint (default: the bundled model)")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--op", default="both", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    cores = os.cpu_count() or 1
    rows = []
    for threads in sorted({1, cores}):
        r = _result(_spawn(args, threads))
        rows.append(("idle", threads, r["encode"], r["decode"], 1))
    for threads in sorted({1, cores}):
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            r = _result(_spawn(args, threads))
        finally:
            hog.kill()
            hog.wait()
        rows.append(("busy (1 other CPU-bound process)", threads, r["encode"], r["decode"], 1))
    for threads in sorted({1, cores}):
        walls = {}
        for op in ("encode", "decode"):
            start = time.time() + 30.0  # both load the model, encode and warm up first, then start together
            pair = [_spawn(args, threads, start, op), _spawn(args, threads, start, op)]
            walls[op] = max(_result(p)["end"] for p in pair) - start
        # Both workers processed `repeats` times `seconds` of audio: per-repeat wall time for the table.
        rows.append(("two workers at once", threads, walls["encode"] / args.repeats, walls["decode"] / args.repeats, 2))
    print(f"{cores} logical cores, {args.seconds:g} s of music per call; single processes: best of "
          f"{args.repeats}; pairs: {args.repeats} calls each, wall time from the common start\n")
    print("| situation | torch threads per process | encode x real time | decode x real time |")
    print("|---|---:|---:|---:|")
    for situation, threads, enc, dec, n in rows:
        # Two workers each process `seconds` in the slower one's time: aggregate = n * seconds / time.
        print(f"| {situation} | {threads} | {n * args.seconds / enc:.2f} | {n * args.seconds / dec:.2f} |")


if __name__ == "__main__":
    main()
