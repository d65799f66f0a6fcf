"""One rank of the data-parallel tests (tests/test_distributed.py), started by torchrun or plainly.

    python tests/ddp_worker.py equal OUT_PREFIX         # 3 steps on fixed batches and noise
    python tests/ddp_worker.py cli [--slow-rank R --sleep S --slow-from N] [--kill-rank R --at-step N]
                                   [--term-rank R --at-step N] [--nan-rank R --at-step N] -- TRAIN_ARGS...

``equal`` feeds each rank its slice of one global batch and of one global noise draw, so a world
of 2 x batch 1 must end where a world of 1 x batch 2 does. ``cli`` runs the real training command
line with one rank slowed, killed, signalled or fed NaN from a step on, and prints each rank's last
step to last_step.rankR.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import torch
from safetensors.torch import save_file

MICRO = {"n_fft": 256, "hop_length": 64, "freq_bins": 128, "chunk_frames": 16}


def equal(prefix: str) -> int:
    import music2latent2.training.trainer as trainer_module
    from music2latent2.training.data import crop_samples
    from music2latent2.training.distributed import start_ranks
    from music2latent2.training.losses import NoiseIndexSampler, draw_noise
    from music2latent2.training.trainer import TrainConfig, Trainer

    torch.set_num_threads(1)
    ranks = start_ranks("cpu")
    cfg = TrainConfig(preset="tiny", model_overrides=MICRO, batch_size=2, total_steps=10, warmup_steps=1,
                      ema_momentum=0.9, compile="off", optimizer="adamw")
    trainer = Trainer(cfg, "cpu", ranks=ranks)
    trainer.sync_ranks()
    init = {f"init/{k}": v.clone() for k, v in trainer.model.state_dict().items()}
    mc = trainer.model.config
    crop = crop_samples(mc.chunk_samples, mc.n_fft, mc.hop_length)
    global_gen = torch.Generator().manual_seed(123)
    sampler = NoiseIndexSampler(mc)
    lo, hi = ranks.rank * trainer.rank_batch_size, (ranks.rank + 1) * trainer.rank_batch_size
    drawn = {}

    def rank_slice_of_global_noise(config, batch, *args, **kwargs):  # noqa: ANN001, ANN202
        i_hi, eps = drawn["noise"]
        return i_hi[lo:hi], eps[lo:hi]

    trainer_module.draw_noise = rank_slice_of_global_noise  # type: ignore[assignment]
    grads = {}
    for step in range(3):
        wav = 0.1 * torch.randn(cfg.batch_size, mc.audio_channels, crop, generator=global_gen)
        drawn["noise"] = draw_noise(mc, cfg.batch_size, sampler, global_gen)
        trainer.step_on_device(wav[lo:hi])
        if step == 0:  # the gradient of the first step, as the optimiser saw it (averaged over the ranks)
            grads = {f"grad/{k}": p.grad.clone() for k, p in trainer.model.named_parameters()}
    tensors = {f"model/{k}": v.contiguous() for k, v in trainer.model.state_dict().items()}
    tensors.update({f"ema/{k}": v.contiguous() for k, v in trainer.ema.state_dict().items()})
    tensors.update(init)
    tensors.update(grads)
    save_file(tensors, f"{prefix}.rank{ranks.rank}.safetensors",
              metadata={"samples_seen": str(trainer.samples_seen), "world": str(ranks.world_size)})
    ranks.close()
    return 0


def cli(args: argparse.Namespace, train_args: list) -> int:
    from music2latent2.training.__main__ import main
    from music2latent2.training.trainer import Trainer

    rank = int(os.environ.get("RANK", "0"))
    step_on_device, fit = Trainer.step_on_device, Trainer.fit

    def patched_step(self, wav):  # noqa: ANN001, ANN202
        if rank == args.slow_rank and self.step >= args.slow_from:
            time.sleep(args.sleep)
        if rank == args.nan_rank and self.step >= args.at_step:
            wav = torch.full_like(wav, float("nan"))
        if self.step == args.at_step and rank == args.kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.step == args.at_step and rank == args.term_rank:
            os.kill(os.getpid(), signal.SIGTERM)
        return step_on_device(self, wav)

    def patched_fit(self, *a, **k):  # noqa: ANN001, ANN202
        reason = fit(self, *a, **k)
        # A file per rank: the ranks' stdout lines may interleave.
        with open(f"last_step.rank{rank}.json", "w") as f:
            json.dump({"rank": rank, "last_step": self.step, "reason": reason, "total": self.config.total_steps}, f)
        return reason

    Trainer.step_on_device, Trainer.fit = patched_step, patched_fit  # type: ignore[method-assign]
    return main(["train", *train_args])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["equal", "cli"])
    parser.add_argument("prefix", nargs="?")
    parser.add_argument("--slow-rank", type=int, default=-1)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--slow-from", type=int, default=0)
    parser.add_argument("--nan-rank", type=int, default=-1)
    parser.add_argument("--kill-rank", type=int, default=-1)
    parser.add_argument("--term-rank", type=int, default=-1)
    parser.add_argument("--at-step", type=int, default=-1)
    argv = sys.argv[1:]
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    ns = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    sys.exit(equal(ns.prefix) if ns.mode == "equal" else cli(ns, rest))
