"""Data-parallel training over torch.distributed: the process group and the few collectives the trainer needs.

One process per GPU (``torchrun --nproc_per_node N -m music2latent2.training train ...``; several
machines: ``--nnodes``, docs/distributed.md). Gradients are averaged by DistributedDataParallel
around the loss module. Everything else a rank decides on its own clock (the time budget, a
lease's end file, a stop signal) is agreed at fixed steps through :meth:`Ranks.agree`, so every
rank takes the same number of steps and none waits forever in a collective its peers left.

A single process is a world of one: every method is then a no-op that costs nothing.
"""

from __future__ import annotations

import datetime
import inspect
import signal
import sys
from typing import Any, Dict, List, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import LaunchEnv, launch_env, rank_device

__all__ = ["Ranks", "start_ranks", "LostRank", "StopSignals", "STOP_SIGNALS"]

# SLURM's preemption and time limit send SIGTERM (``--signal`` can ask for SIGUSR1 earlier),
# torchrun passes on SIGTERM and SIGINT (and SIGUSR1 with --signals-to-handle); Ctrl-C is SIGINT.
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


class LostRank(RuntimeError):
    """A collective failed: another rank has most likely died (its own error is in its log)."""


class Ranks:
    """The ranks of one training run and the collectives the trainer uses.

    Args:
        env: this process's place in the launch.
        device: the training device; collectives run there (NCCL on CUDA, gloo on the CPU).
    """

    def __init__(self, env: LaunchEnv, device: torch.device) -> None:
        self.env = env
        self.device = device

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def distributed(self) -> bool:
        return self.env.distributed

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    def print(self, *args: object) -> None:
        """Print on rank 0 only: one log, not N interleaved copies."""
        if self.is_main:
            print(*args, flush=True)

    def _collective(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RuntimeError as err:  # gloo: "Connection closed by peer"; NCCL: DistBackendError, a timeout
            raise LostRank(f"rank {self.rank} of {self.world_size}: {what} failed, so another rank has most likely "
                           f"died or hangs (its own error is in its log): {type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}") from err

    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum", what: str = "an all-reduce") -> torch.Tensor:
        """Reduce ``tensor`` (on the training device) in place over the ranks: ``sum``, ``max`` or ``mean``."""
        if not self.distributed:
            return tensor
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "mean": dist.ReduceOp.SUM}[op]
        self._collective(what, dist.all_reduce, tensor, op=reduce_op)
        if op == "mean":
            tensor /= self.world_size
        return tensor

    def mean(self, tensor: torch.Tensor, what: str = "an all-reduce") -> torch.Tensor:
        """The mean of ``tensor`` over the ranks, as a new tensor (``tensor`` itself in a world of one)."""
        if not self.distributed:
            return tensor
        return self.all_reduce_(tensor.clone(), "mean", what)

    def agree(self, main_values: Sequence[float], any_flags: Sequence[bool]) -> tuple[List[float], List[bool]]:
        """Rank 0's ``main_values`` and the OR of every rank's ``any_flags``, on every rank (one collective)."""
        if not self.distributed:
            return list(main_values), list(any_flags)
        n = len(main_values)
        vec = torch.zeros(n + len(any_flags), dtype=torch.float64, device=self.device)
        if self.is_main:  # values are only ever >= 0, so a MAX over zeros elsewhere is rank 0's broadcast
            vec[:n] = torch.tensor([float(v) for v in main_values], dtype=torch.float64)
        vec[n:] = torch.tensor([float(f) for f in any_flags], dtype=torch.float64)
        self.all_reduce_(vec, "max", "agreeing on when to stop")
        out = vec.tolist()
        return out[:n], [v > 0 for v in out[n:]]

    def all_gather(self, tensor: torch.Tensor, what: str = "gathering state") -> List[torch.Tensor]:
        """Every rank's ``tensor`` (same shape and dtype on each), as CPU tensors in rank order."""
        if not self.distributed:
            return [tensor.detach().cpu()]
        local = tensor.detach().to(self.device)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        self._collective(what, dist.all_gather, parts, local)
        return [p.cpu() for p in parts]

    @torch.no_grad()
    def broadcast_module(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers into every rank's ``module``."""
        if not self.distributed:
            return
        for t in list(module.parameters()) + list(module.buffers()):
            self._collective("broadcasting rank 0's weights", dist.broadcast, t.data, src=0)

    def check_same(self, values: Dict[str, float], hint: str) -> None:
        """Raise on every rank unless every rank holds the same ``values`` (checksums, counters)."""
        if not self.distributed:
            return
        local = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        parts = self.all_gather(local, "comparing the ranks' states")
        for r, part in enumerate(parts):
            if not torch.equal(part, parts[0]):
                names = [k for k, a, b in zip(values, part.tolist(), parts[0].tolist()) if a != b]
                raise RuntimeError(f"rank {r} holds another {', '.join(names)} than rank 0: {hint}")

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` (whose forward is the loss) under DistributedDataParallel: backward all-reduces
        the gradients bucket by bucket while it runs, and they come out averaged over the ranks."""
        if not self.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # The buffers (STFT window, constants) never change: no broadcast of them every step
        # (``forward_sync_buffers`` since torch 2.13, ``broadcast_buffers`` before).
        known = inspect.signature(DistributedDataParallel).parameters
        sync = "forward_sync_buffers" if "forward_sync_buffers" in known else "broadcast_buffers"
        options: Dict[str, Any] = {sync: False}
        return DistributedDataParallel(module, device_ids=device_ids, **options)

    def close(self) -> None:
        """Leave the process group together: a rank that tore its connections down while rank 0
        still exported the final weights could take the others' transport down with it."""
        if self.distributed and dist.is_initialized():
            self._collective("the final barrier", dist.barrier)
            dist.destroy_process_group()


def start_ranks(device_arg: str | None, timeout_minutes: float = 30.0) -> Ranks:
    """Join the launch's process group (torchrun's environment), or a world of one without a launcher.

    Args:
        device_arg: ``--device``; by default each rank takes its own GPU ``cuda:LOCAL_RANK`` (or the CPU).
        timeout_minutes: how long a collective may wait for a peer (rank 0 evaluating or saving
            makes the others wait) before the run fails instead of hanging.
    """
    env = launch_env()
    device = rank_device(env) if device_arg is None else torch.device(device_arg)
    if env.distributed and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", env.local_rank)
    if env.distributed:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                                    device_id=device if device.type == "cuda" else None)
        except (RuntimeError, ValueError) as err:
            print(f"error: rank {env.rank} of {env.world_size} cannot join the process group ({backend}): {err}",
                  file=sys.stderr, flush=True)
            raise
    return Ranks(env, device)


class StopSignals:
    """While installed, SIGTERM, SIGUSR1 and SIGINT ask the trainer to stop after its current step
    (``trainer.stop_signal``); the caller then saves a resumable state. A second SIGINT (Ctrl-C
    twice) stops at once. Installed only in the main thread; :meth:`restore` puts the old handlers back.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.previous: Dict[int, Any] = {}
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                break

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.trainer.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.trainer.stop_signal is None:
            self.trainer.stop_signal = name
            print(f"{self.trainer.ranks.env.tag()}{name}: stopping after this step and saving the training state",
                  file=sys.stderr, flush=True)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()
