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

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Union

import torch

from ..checkpoint import WEIGHTS_NAME, CheckpointError, sha256_file
from ..fileio import atomic_write
from ..model import Music2Latent2
from .export import export_checkpoint

__all__ = ["PIECES_NAME", "LATEST_NAME", "write_snapshot", "latest_snapshot", "join_snapshot", "split_file"]

PIECES_NAME = "pieces.json"
LATEST_NAME = "LATEST"
SNAPSHOT_FORMAT = "music2latent2-snapshot-1"


def split_file(path: Path, out_dir: Path, piece_bytes: int) -> List[Dict[str, Any]]:
    """Split ``path`` into ``out_dir/<name>.000, .001, ...`` of at most ``piece_bytes`` each."""
    if piece_bytes < 1:
        raise ValueError(f"piece size must be positive, got {piece_bytes}")
    pieces = []
    with open(path, "rb") as src:
        index = 0
        while True:
            block = src.read(piece_bytes)
            if not block:
                break
            name = f"{path.name}.{index:03d}"
            (out_dir / name).write_bytes(block)
            pieces.append({"name": name, "size": len(block), "sha256": hashlib.sha256(block).hexdigest()})
            index += 1
    return pieces


def write_snapshot(model: Music2Latent2, folder: Union[str, os.PathLike], step: int, latent_scale: float,
                   piece_bytes: int = 15 * 2 ** 20, keep: int = 2, delta: float | None = None) -> Path:
    """Write ``model`` (the EMA network) as an fp16 checkpoint in pieces; see the module doc.

    Args:
        model: network to snapshot (copied to the CPU, not changed).
        folder: the run's ``snapshots/`` folder.
        step: training step, part of the snapshot's name and metadata.
        latent_scale: stored in the checkpoint's config.
        piece_bytes: largest piece.
        keep: how many complete snapshots to keep (older ones are deleted).
        delta: the consistency step at ``step``, recorded for a continuation.

    Returns:
        The snapshot's folder.
    """
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the snapshot is an ordinary folder
        ckpt = export_checkpoint(model, tmp / WEIGHTS_NAME, latent_scale=latent_scale, dtype=torch.float16, step=step,
                                 delta=delta)
        pieces = split_file(ckpt, tmp, piece_bytes)
        index = {"format": SNAPSHOT_FORMAT, "file": WEIGHTS_NAME, "size": ckpt.stat().st_size,
                 "sha256": sha256_file(ckpt), "step": step, "pieces": pieces}
        ckpt.unlink()
        (tmp / PIECES_NAME).write_text(json.dumps(index, indent=2) + "\n")
        if final.exists():  # the same step snapshotted twice (e.g. the final one): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    atomic_write(root / LATEST_NAME, lambda t: Path(t).write_text(final.name + "\n"))
    done = sorted(p for p in root.glob("step-*") if (p / PIECES_NAME).is_file())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


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
    try:
        index = json.loads((src / PIECES_NAME).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{src} is not a snapshot: cannot read {PIECES_NAME} ({err})") from err
    if index.get("format") != SNAPSHOT_FORMAT:
        raise CheckpointError(f"{src / PIECES_NAME} is not a {SNAPSHOT_FORMAT} index")
    target = Path(out)
    if target.suffix != ".safetensors":
        target = target / WEIGHTS_NAME

    def write(tmp: str) -> None:
        digest = hashlib.sha256()
        with open(tmp, "wb") as dst:
            for piece in index["pieces"]:
                path = src / piece["name"]
                if not path.is_file():
                    raise CheckpointError(f"snapshot piece missing: {path}")
                data = path.read_bytes()
                if len(data) != piece["size"] or hashlib.sha256(data).hexdigest() != piece["sha256"]:
                    raise CheckpointError(f"snapshot piece {path} is corrupt (size or sha256 differs from "
                                          f"{PIECES_NAME})")
                digest.update(data)
                dst.write(data)
        if digest.hexdigest() != index["sha256"]:
            raise CheckpointError(f"joined snapshot {src} has sha256 {digest.hexdigest()}, expected {index['sha256']}")
        Music2Latent2.from_pretrained(tmp)  # strict load: config, names, shapes, finite values

    return atomic_write(target, write)
