"""Pre-encode an audio dataset to .m2l latents and compute latent statistics for generative modelling.

    python examples/encode_dataset.py DATA_DIR LATENT_DIR [--model CHECKPOINT] [--device cuda]

1. Runs ``music2latent2 encode DATA_DIR -o LATENT_DIR`` (resumable: re-running skips finished
   files; ``--shard I/N`` splits the work across machines, then run once more with ``--stats-only``).
2. Streams over every ``.m2l`` under LATENT_DIR and computes the per-dimension mean and standard
   deviation of the latent vectors (over all files, channels and positions), saved to
   ``LATENT_DIR/latent_stats.npz`` (arrays ``mean``, ``std`` of shape (d_lat,), ``count``) and
   ``latent_stats.json``. A diffusion/flow model is usually trained on ``(z - mean) / std``.

Reading the latents back for training (examples/latent_model.py does it end to end)::

    from music2latent2 import LatentDataset
    data = LatentDataset("LATENT_DIR", crop_chunks=16, normalize=True)  # items (64, 16 * 8)
    # ... train; then decode what the model generates with data.denormalize(z) and encdec.decode
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from music2latent2 import LatentDataset
from music2latent2.cli import main as cli_main


def latent_statistics(latent_dir: Path) -> Dict[str, object]:
    """Per-dimension mean/std over every latent vector of every sequence in every .m2l file below
    ``latent_dir``: the statistics ``LatentDataset(latent_dir, normalize=True)`` standardises with."""
    data = LatentDataset(latent_dir)  # every sequence of every file, whole; checks they share one model
    stats = data.stats
    seconds = sum(meta.duration for meta in data.metadata)
    models = {meta.model_sha256 or meta.model_name for meta in data.metadata}
    return {"mean": stats.mean.double().numpy(), "std": stats.std.double().numpy(), "count": stats.positions,
            "files": len(data.files), "hours": seconds / 3600, "models": sorted(models)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir")
    parser.add_argument("latent_dir")
    parser.add_argument("--model", default=None,
                        help="manifest name, checkpoint file/directory or Hub repo id (default: the bundled model)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard", default=None, metavar="I/N", help="encode only this shard; no statistics")
    parser.add_argument("--stats-only", action="store_true", help="skip encoding (e.g. after all shards ran)")
    args = parser.parse_args(argv)

    status = 0
    if not args.stats_only:
        cmd: List[str] = ["encode", args.data_dir, "-o", args.latent_dir,
                          "--batch-size", str(args.batch_size), "--workers", str(args.workers)]
        if args.model:
            cmd += ["--model", args.model]
        if args.device:
            cmd += ["--device", args.device]
        if args.shard:
            cmd += ["--shard", args.shard]
        status = cli_main(cmd)
        if status in (2, 130) or args.shard:  # usage error, interrupted, or only one shard's share
            return status
        if status:
            print("some files failed (listed above); statistics cover the files that were encoded", file=sys.stderr)

    stats = latent_statistics(Path(args.latent_dir))
    if len(stats["models"]) > 1:
        print(f"warning: latents come from {len(stats['models'])} different models", file=sys.stderr)
    out = Path(args.latent_dir)
    np.savez(out / "latent_stats.npz", mean=stats["mean"], std=stats["std"], count=stats["count"])
    summary = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in stats.items()}
    (out / "latent_stats.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{stats['files']} files, {stats['hours']:.3f} h, {stats['count']} latent vectors; "
          f"mean of per-dim means {stats['mean'].mean():+.4f}, mean per-dim std {stats['std'].mean():.4f}; "
          f"saved {out / 'latent_stats.npz'} and latent_stats.json")
    return status  # 1 when some inputs failed to encode, so scripts notice


if __name__ == "__main__":
    sys.exit(main())
