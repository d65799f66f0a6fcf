"""File helpers: atomic writes (outputs appear complete under their final name, or not at all), a
check that an output folder can be written before any work starts, and a cheap test of whether a
file is safetensors at all (``.m2l`` latents and checkpoints both are)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable, Collection, List, Optional, Union

__all__ = ["atomic_write", "check_output_dir", "find_files", "nearest_existing", "safetensors_problem"]

# safetensors files start with an 8-byte little-endian header size, then a JSON header.
_MAX_HEADER = 100_000_000  # safetensors' own limit


def _create_temp(p: Path) -> str:
    """Create a unique hidden temp file beside ``p``. Unlike mkstemp (always 0600) it is opened
    with mode 0666, so the OS applies the process umask as for any new file; this avoids reading
    the umask with os.umask, a process-wide and thread-unsafe call."""
    for _ in range(100):
        tmp = p.parent / f".{p.stem}.tmp-{secrets.token_hex(4)}{p.suffix}"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return str(tmp)
    raise FileExistsError(f"could not create a temp file beside {p}")


def atomic_write(path: Union[str, os.PathLike], write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)`` on a temp file next to ``path``, then rename it over ``path``.

    The temp file keeps ``path``'s suffix (some writers pick the format from it) and starts with
    a dot so directory scans skip it. It is removed if ``write`` raises (including
    KeyboardInterrupt / SystemExit), so an interrupted run leaves neither a partial output
    nor a temp file; only a hard kill (SIGKILL) can leave a hidden ``.<name>.tmp-*`` behind,
    and never a partial file under the final name.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(p)
    mode = os.stat(tmp).st_mode & 0o777  # 0666 minus the umask, as the OS applied it
    try:
        write(tmp)
        os.chmod(tmp, mode)  # some writers (safetensors) recreate the file as 0600
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data is on disk before the name points at it (power loss, not just a kill)
        finally:
            os.close(fd)
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p


def safetensors_problem(path: Union[str, os.PathLike]) -> Optional[str]:
    """Why ``path`` cannot be a safetensors file, or None if its first bytes look right.

    safetensors itself reports a text or audio file as "header too large" or "invalid header";
    this reads 9 bytes so callers can say "not a latent file" or "not a checkpoint" instead.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if size == 0:
        return "it is empty"
    if len(head) < 9:
        return f"it is only {size} bytes long"
    header = int.from_bytes(head[:8], "little")
    if header > min(size - 8, _MAX_HEADER) or head[8:9] != b"{":
        return "it is not a safetensors file (its first bytes are not a safetensors header)"
    return None


def nearest_existing(path: Union[str, os.PathLike]) -> Path:
    """``path`` itself if it exists, else its closest existing ancestor (absolute)."""
    existing = Path(os.path.abspath(path))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing


def check_output_dir(path: Union[str, os.PathLike]) -> None:
    """Make sure files can be created in folder ``path`` (which need not exist yet) without
    creating it: the nearest existing ancestor must be a folder in which a file can be created.

    Raises:
        NotADirectoryError: ``path`` or one of its ancestors is an existing file.
        PermissionError (or another OSError): nothing can be created there (read-only folder or
            file system), as found by creating and removing a hidden probe file.
    """
    p = Path(os.path.abspath(path))
    existing = nearest_existing(p)
    if not existing.is_dir():
        raise NotADirectoryError(f"output folder {p} cannot be created: {existing} is a file")
    try:
        probe = _create_temp(existing / "m2l-write-probe")
    except OSError as err:
        raise type(err)(err.errno, f"cannot create files in output folder {existing} ({err.strerror})") from None
    os.unlink(probe)


def find_files(folder: Union[str, os.PathLike], suffixes: Collection[str]) -> List[Path]:
    """Files below ``folder`` whose suffix (any case) is one of ``suffixes`` (lower case, with the
    dot), recursive and sorted. Hidden files and folders are skipped: among them the temp files of
    an interrupted :func:`atomic_write`, which must never be read as finished outputs."""
    root = Path(folder)
    return sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in suffixes
                  and not any(part.startswith(".") for part in f.relative_to(root).parts))
