"""A file split into pieces with a sha256 list, and put back together: the standard library only.

Only small files come back from a lent GPU machine per call, so snapshots travel in pieces
(:mod:`.snapshot`). Joining them back is what happens on the developer's machine between two
calls, where every second counts: this module imports neither torch nor the package, so
``scripts/gpu/leg.py`` loads it by path and joins a 41 MiB snapshot in a fraction of a second.
Loading the joined checkpoint strictly (:func:`.snapshot.join_snapshot`) can wait until the
window is over.

``pieces.json`` of a snapshot::

    {"format": "music2latent2-snapshot-1", "file": "model.safetensors", "size": ..., "sha256": ...,
     "step": 1234, "final": false, "pieces": [{"name": "model.safetensors.000", "size": ..., "sha256": ...}]}
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Union

__all__ = ["PIECES_NAME", "SNAPSHOT_FORMAT", "PiecesError", "split_file", "read_index", "check_pieces",
           "join_pieces"]

PIECES_NAME = "pieces.json"
SNAPSHOT_FORMAT = "music2latent2-snapshot-1"


class PiecesError(ValueError):
    """A snapshot's pieces are missing, corrupt or do not add up to the recorded file."""


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


def read_index(folder: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The ``pieces.json`` of a snapshot folder.

    Raises:
        PiecesError: it is missing, unreadable or not a snapshot index.
    """
    path = Path(folder) / PIECES_NAME
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PiecesError(f"{folder} is not a snapshot: cannot read {PIECES_NAME} ({err})") from err
    if not isinstance(index, dict) or index.get("format") != SNAPSHOT_FORMAT:
        raise PiecesError(f"{path} is not a {SNAPSHOT_FORMAT} index")
    return index


def _checked_pieces(src: Path, index: Dict[str, Any]) -> Iterator[bytes]:
    """Each piece's bytes in order, its size and sha256 checked, then the whole file's sha256."""
    digest = hashlib.sha256()
    for piece in index["pieces"]:
        path = src / piece["name"]
        if not path.is_file():
            raise PiecesError(f"snapshot piece missing: {path}")
        data = path.read_bytes()
        if len(data) != piece["size"] or hashlib.sha256(data).hexdigest() != piece["sha256"]:
            raise PiecesError(f"snapshot piece {path} is corrupt (size or sha256 differs from {PIECES_NAME})")
        digest.update(data)
        yield data
    if digest.hexdigest() != index["sha256"]:
        raise PiecesError(f"joined snapshot {src} has sha256 {digest.hexdigest()}, expected {index['sha256']}")


def check_pieces(folder: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Check every piece of ``folder/pieces.json`` (sizes, sha256s, the whole file's) without
    writing anything; returns the index. Raises :class:`PiecesError` as :func:`join_pieces` does."""
    index = read_index(folder)
    for _ in _checked_pieces(Path(folder), index):
        pass
    return index


def join_pieces(folder: Union[str, os.PathLike], out: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Join the pieces listed in ``folder/pieces.json`` into ``out``, checking every size and
    sha256 and the whole file's; ``out`` appears only complete and verified (temp file, rename).

    Returns:
        The index (``step``, ``sha256``, ``final``, ...).

    Raises:
        PiecesError: a piece is missing or corrupt, or the joined file's sha256 differs.
    """
    src, target = Path(folder), Path(out)
    index = read_index(src)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as dst:
            for data in _checked_pieces(src, index):
                dst.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return index
