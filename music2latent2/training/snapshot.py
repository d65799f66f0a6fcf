"""Snapshots in pieces: fp16 EMA weights split into small files with a sha256 list.

A training leg on a lent GPU may lose its machine at any moment, and only small files come
back from it per call. So every few minutes the run writes its EMA weights as an inference
checkpoint (fp16), split into pieces of at most ``piece_bytes``, with ``pieces.json`` listing
each piece's size and sha256 and the sha256 of the whole file. :func:`join_snapshot` puts
the pieces back together, verifies every checksum and loads the result strictly.

Layout of a run's ``snapshots/`` folder::

    snapshots/LATEST                      name of the newest complete snapshot
    snapshots/step-00001234/pieces.json
    snapshots/step-00001234/model.safetensors.000 ...

A snapshot folder is built under a hidden temp name and renamed into place when complete,
and ``LATEST`` is replaced atomically after that, so a reader never sees a partial snapshot.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Union

import torch

from ..checkpoint import WEIGHTS_NAME, CheckpointError, sha256_file
from ..fileio import atomic_write
from ..model import Music2Latent2
from .export import export_checkpoint
from .pieces import PIECES_NAME, SNAPSHOT_FORMAT, PiecesError, join_pieces, split_file

__all__ = ["PIECES_NAME", "LATEST_NAME", "write_snapshot", "latest_snapshot", "join_snapshot", "split_file"]

LATEST_NAME = "LATEST"


def write_snapshot(model: Music2Latent2, folder: Union[str, os.PathLike], step: int, latent_scale: float,
                   piece_bytes: int = 15 * 2 ** 20, keep: int = 2, delta: float | None = None,
                   final: bool = False, extra: Dict[str, Any] | None = None) -> Path:
    """Write ``model`` (the EMA network) as an fp16 checkpoint in pieces; see the module doc.

    Args:
        model: network to snapshot (copied to the CPU, not changed).
        folder: the run's ``snapshots/`` folder.
        step: training step, part of the snapshot's name and metadata.
        latent_scale: stored in the checkpoint's config.
        piece_bytes: largest piece.
        keep: how many complete snapshots to keep (older ones are deleted).
        delta: the consistency step at ``step``, recorded for a continuation.
        final: the run's last snapshot (``pieces.json`` says so: a poll waiting for the end stops).
        extra: more JSON-able entries for ``pieces.json`` (e.g. the run's measured speed).

    Returns:
        The snapshot's folder.
    """
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the snapshot is an ordinary folder
        ckpt = export_checkpoint(model, tmp / WEIGHTS_NAME, latent_scale=latent_scale, dtype=torch.float16, step=step,
                                 delta=delta)
        pieces = split_file(ckpt, tmp, piece_bytes)
        index = {"format": SNAPSHOT_FORMAT, "file": WEIGHTS_NAME, "size": ckpt.stat().st_size,
                 "sha256": sha256_file(ckpt), "step": step, "final": final, "pieces": pieces, **(extra or {})}
        ckpt.unlink()
        (tmp / PIECES_NAME).write_text(json.dumps(index, indent=2) + "\n")
        if target.exists():  # the same step snapshotted twice (e.g. the final one): replace it
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    atomic_write(root / LATEST_NAME, lambda t: Path(t).write_text(target.name + "\n"))
    done = sorted(p for p in root.glob("step-*") if (p / PIECES_NAME).is_file())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_snapshot(folder: Union[str, os.PathLike]) -> Path:
    """The newest complete snapshot in a run's ``snapshots/`` folder."""
    root = Path(folder)
    marker = root / LATEST_NAME
    if not marker.is_file():
        raise FileNotFoundError(f"no snapshot in {root} (no {LATEST_NAME} file)")
    return root / marker.read_text().strip()


def join_snapshot(snapshot: Union[str, os.PathLike], out: Union[str, os.PathLike]) -> Path:
    """Join a snapshot's pieces into one checkpoint, verified, written atomically.

    Args:
        snapshot: a snapshot folder (holding ``pieces.json``), or a ``snapshots/`` folder with a
            ``LATEST`` marker.
        out: the checkpoint to write (a ``.safetensors`` path, or a folder that gets
            ``model.safetensors``).

    Raises:
        CheckpointError: a piece is missing or has the wrong size or sha256, the joined file's
            sha256 differs from the recorded one, or the result does not load strictly.
    """
    src = Path(snapshot)
    if not (src / PIECES_NAME).is_file() and (src / LATEST_NAME).is_file():
        src = latest_snapshot(src)
    target = Path(out)
    if target.suffix != ".safetensors":
        target = target / WEIGHTS_NAME

    def write(tmp: str) -> None:
        try:
            join_pieces(src, tmp)
        except PiecesError as err:
            raise CheckpointError(str(err)) from err
        Music2Latent2.from_pretrained(tmp)  # strict load: config, names, shapes, finite values

    return atomic_write(target, write)
