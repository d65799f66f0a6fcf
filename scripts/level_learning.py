#!/usr/bin/env python3
"""Does the recipe learn the level of a simple signal, given steps? (issue 27)

The bundled weights reconstruct held-out music ~9 dB too quietly. This trains the ``tiny`` preset
with a micro STFT (n_fft 256) from scratch on the simplest music there is, single sine tones of
random pitch (110-1760 Hz) at random peak levels (-30..0 dBFS, the training gains), with the
default recipe, and after every ``--every`` steps reconstructs held-out tones with the EMA
weights (the paper's two-step autoregressive decoding) and prints the level difference
(reconstruction minus input, dB) and the log-mel distance. If the level difference shrinks
towards 0 dB as steps accumulate, the quiet output is under-training, not something in the
recipe or the preconditioning that pulls the level down.

    python scripts/level_learning.py --steps 3000 --every 500 --out level.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from music2latent2 import EncoderDecoder  # noqa: E402
from music2latent2.evaluate import level_difference_db  # noqa: E402
from music2latent2.metrics import multires_logmel_distance  # noqa: E402
from music2latent2.training import TrainConfig, Trainer, crop_samples  # noqa: E402

MICRO = {"n_fft": 256, "hop_length": 64, "freq_bins": 128, "chunk_frames": 16}
SR = 44100


def tones(n: int, length: int, gen: torch.Generator, low_db: float = -30.0, high_db: float = 0.0) -> torch.Tensor:
    """(n, 1, length) sine tones, random pitch 110-1760 Hz and phase, peak at a random level."""
    freq = 110 * 2 ** (4 * torch.rand(n, 1, 1, generator=gen))
    phase = 2 * math.pi * torch.rand(n, 1, 1, generator=gen)
    peak_db = low_db + (high_db - low_db) * torch.rand(n, 1, 1, generator=gen)
    t = torch.arange(length) / SR
    return (10 ** (peak_db / 20)) * torch.sin(2 * math.pi * freq * t + phase)


def score(trainer: Trainer, clips: List[np.ndarray]) -> Dict[str, float]:
    codec = EncoderDecoder(trainer.ema, device="cpu", max_batch_size=8)
    levels, distances = [], []
    for clip in clips:
        latents, gain = codec.encode(clip, sr=SR, return_gain=True)
        rec = codec.decode(latents, length=clip.shape[-1], seed=0, gain=gain)
        levels.append(level_difference_db(clip, rec))
        distances.append(multires_logmel_distance(clip, rec, SR))
    trainer.ema.requires_grad_(False)
    return {"level_db": float(np.mean(levels)), "logmel": float(np.mean(distances))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the curve as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = TrainConfig(preset="tiny", model_overrides=dict(MICRO), batch_size=args.batch_size, lr=3e-4,
                      warmup_steps=50, total_steps=args.steps, ema_momentum=0.99, delta_start=1.0,
                      delta_end=0.01, precision="fp32", seed=args.seed)
    trainer = Trainer(cfg, "cpu")
    mc = trainer.model.config
    crop = crop_samples(mc.chunk_samples, mc.n_fft, mc.hop_length)
    gen = torch.Generator().manual_seed(args.seed)
    held_out = [c.numpy() for c in tones(4, SR // 2, torch.Generator().manual_seed(10_000 + args.seed), -12, -1)]
    curve = [{"step": 0, **score(trainer, held_out)}]
    print(f"step 0: level {curve[-1]['level_db']:+.1f} dB, log-mel {curve[-1]['logmel']:.3f}", flush=True)
    t0 = time.perf_counter()
    while trainer.step < args.steps:
        trainer.step_on_device(tones(args.batch_size, crop, gen))
        if trainer.step % args.every == 0 or trainer.step == args.steps:
            curve.append({"step": trainer.step, **score(trainer, held_out)})
            print(f"step {trainer.step}: level {curve[-1]['level_db']:+.1f} dB, log-mel {curve[-1]['logmel']:.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"config": json.loads(cfg.to_json()), "curve": curve}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
