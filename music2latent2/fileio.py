"""Atomic file writes: outputs appear complete under their final name, or not at all."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable, Union

__all__ = ["atomic_write"]


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


def atomic_write(path: Union[str, os.PathLike], write: Callable[[str], None]) -> Path:
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
