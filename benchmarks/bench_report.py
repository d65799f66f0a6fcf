"""What the benchmark scripts share: the commit they measured, and their sections of BENCHMARKS.md.

Generated sections are kept apart, so one benchmark's rewrite leaves the others.

A section sits between ``<!-- begin: KEY -->`` and ``<!-- end: KEY -->`` lines. Writing it
replaces that span if the file has it, or appends the section otherwise; everything outside it
is kept byte for byte, and the file is replaced atomically (temp file + rename).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

TITLE = "# Benchmarks\n"
ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """The checked-out commit, with "-dirty" when the tree has uncommitted changes; "?" without git."""
    try:
        return subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                              text=True, check=False).stdout.strip() or "?"
    except OSError:
        return "?"


def begin_marker(key: str) -> str:
    return f"<!-- begin: {key} -->"


def end_marker(key: str) -> str:
    return f"<!-- end: {key} -->"


def replace_section(path: Path, key: str, body: str) -> None:
    """Write ``body`` as section ``key`` of the markdown file at ``path`` (created if missing).

    Raises:
        ValueError: the file has one marker of the pair without the other, or the end before the
            begin; it is left untouched (a hand edit broke it, and guessing could drop text).
    """
    text = path.read_text() if path.exists() else TITLE
    begin, end = begin_marker(key), end_marker(key)
    section = f"{begin}\n{body.strip()}\n{end}"
    i, j = text.find(begin), text.find(end)
    if i < 0 and j < 0:
        new = text.rstrip("\n") + "\n\n" + section + "\n"
    elif i < 0 or j < i:
        raise ValueError(f"{path}: the markers of section {key!r} are unpaired or out of order; fix them by hand")
    else:
        new = text[:i] + section + text[j + len(end):]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new)
    os.replace(tmp, path)
