"""Where this process stands in a multi-process launch (torchrun, or SLURM's srun through it).

A launcher such as ``torchrun --nproc_per_node 8`` starts one process per GPU and tells each its
place through environment variables: ``RANK`` (0..WORLD_SIZE-1 over all machines), ``WORLD_SIZE``
and ``LOCAL_RANK`` (its GPU on this machine). The command line reads them to split a dataset
between the processes (each takes the files of its own shard) and to pick its GPU; the training
code (``music2latent2.training.distributed``) uses them to join a process group. A plain
``python`` start has none of them and is a world of one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import torch

__all__ = ["LaunchEnv", "launch_env", "rank_device"]


@dataclass(frozen=True)
class LaunchEnv:
    """One process's place in a launch: ``rank`` of ``world_size``, GPU ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def tag(self) -> str:
        """``"[rank 1/4] "`` in a distributed launch, ``""`` otherwise: the prefix of per-rank lines."""
        return f"[rank {self.rank}/{self.world_size}] " if self.distributed else ""


def _int_var(environ: Mapping[str, str], name: str, default: int) -> int:
    text = environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer (set by a launcher such as "
                         "torchrun; unset it to run as a single process)") from None


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """This process's :class:`LaunchEnv`, from torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``.

    Raises:
        ValueError: the variables are malformed or inconsistent (the message names them).
    """
    env = os.environ if environ is None else environ
    world = _int_var(env, "WORLD_SIZE", 1)
    rank = _int_var(env, "RANK", 0)
    local = _int_var(env, "LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"inconsistent launch environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local} "
                         "(need WORLD_SIZE >= 1 and 0 <= RANK < WORLD_SIZE)")
    return LaunchEnv(rank, world, local)


def rank_device(env: LaunchEnv) -> torch.device:
    """The default device of a process: its own GPU ``cuda:LOCAL_RANK`` where CUDA is present, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if env.local_rank >= count:
        raise ValueError(f"LOCAL_RANK={env.local_rank} but this machine has {count} CUDA device(s): start at most "
                         f"{count} processes per machine (torchrun --nproc_per_node {count})")
    return torch.device("cuda", env.local_rank)
