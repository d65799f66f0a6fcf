#!/usr/bin/env python3
"""Split a corpus folder into carry parts for the device tool, and put them back together.

Only 64 MiB travel to the GPU machine per call, and folders not named in a call stay on a
warm machine, so a corpus goes up as parts in successive calls. Each part is one
uncompressed tar (the audio is Vorbis already) with ``part.json`` beside it: the tar's size
and sha256 and the files inside. Unpacking checks the sha256 first and refuses a corrupt part.

    python scripts/gpu/pack_corpus.py pack corpus/leg --out .carry --part-mib 58   # here
    python scripts/gpu/pack_corpus.py unpack .carry/p1 --into /tmp/corpus          # there
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path
from typing import Dict, List

PART_TAR = "part.tar"
PART_JSON = "part.json"
TAR_OVERHEAD = 1536  # tar header + padding per member, a safe upper bound


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def plan_parts(files: List[Path], root: Path, part_bytes: int) -> List[List[Path]]:
    """First-fit decreasing: the largest files first, each into the first part with room, so the
    parts come out nearly full (fewer parts, fewer calls). Members are then listed in path order."""
    capacity = part_bytes - 10240  # 10 KiB: the tar's end-of-archive blocks
    parts: List[List[Path]] = []
    free: List[int] = []
    for f in sorted(files, key=lambda f: (-f.stat().st_size, f.as_posix())):
        size = f.stat().st_size + TAR_OVERHEAD
        if size > capacity:
            raise ValueError(f"{f.relative_to(root)} ({size} bytes) is larger than a part ({part_bytes} bytes)")
        for n, room in enumerate(free):
            if size <= room:
                parts[n].append(f)
                free[n] -= size
                break
        else:
            parts.append([f])
            free.append(capacity - size)
    return [sorted(p) for p in parts]


def pack(corpus: Path, out: Path, part_mib: float) -> List[Path]:
    """Write ``out/p1``, ``out/p2``, ... (replacing old parts) and return their folders."""
    if not corpus.is_dir():
        raise SystemExit(f"error: corpus folder not found: {corpus}")
    files = sorted(f for f in corpus.rglob("*") if f.is_file() and not f.name.startswith("."))
    if not files:
        raise SystemExit(f"error: no files in {corpus}")
    groups = plan_parts(files, corpus, int(part_mib * 2 ** 20))
    if out.exists():
        shutil.rmtree(out)
    folders = []
    for n, group in enumerate(groups, start=1):
        folder = out / f"p{n}"
        folder.mkdir(parents=True)
        with tarfile.open(folder / PART_TAR, "w", format=tarfile.PAX_FORMAT) as tar:
            for f in group:
                tar.add(f, arcname=f.relative_to(corpus).as_posix(), recursive=False)
        info: Dict[str, object] = {"part": n, "of": len(groups), "size": (folder / PART_TAR).stat().st_size,
                                   "sha256": _sha256(folder / PART_TAR),
                                   "files": [f.relative_to(corpus).as_posix() for f in group]}
        (folder / PART_JSON).write_text(json.dumps(info, indent=1) + "\n")
        folders.append(folder)
        print(f"{folder}: {len(group)} files, {info['size'] / 2 ** 20:.1f} MiB")
    return folders


def unpack(part: Path, into: Path) -> int:
    """Verify ``part`` and extract it into ``into``; returns the number of files."""
    try:
        info = json.loads((part / PART_JSON).read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {part} is not a corpus part: cannot read {PART_JSON} ({err})") from err
    tar_path = part / PART_TAR
    if not tar_path.is_file():
        raise SystemExit(f"error: {tar_path} is missing")
    size, sha = tar_path.stat().st_size, _sha256(tar_path)
    if size != info["size"] or sha != info["sha256"]:
        raise SystemExit(f"error: corrupt part {part}: {PART_TAR} has size {size} and sha256 {sha}, "
                         f"{PART_JSON} says {info['size']} and {info['sha256']}")
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path) as tar:
        names = tar.getnames()
        if sorted(names) != sorted(info["files"]):
            raise SystemExit(f"error: {part}: the tar's members differ from {PART_JSON}")
        tar.extractall(into, filter="data")  # no absolute paths, no '..', no devices
    print(f"{part}: {len(names)} files verified and unpacked into {into}")
    return len(names)


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="corpus folder -> parts")
    p.add_argument("corpus", type=Path)
    p.add_argument("--out", type=Path, default=Path(".carry"))
    p.add_argument("--part-mib", type=float, default=58.0, help="largest part (MiB)")
    u = sub.add_parser("unpack", help="verify and extract parts")
    u.add_argument("parts", type=Path, nargs="+")
    u.add_argument("--into", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.command == "pack":
        pack(args.corpus, args.out, args.part_mib)
    else:
        for part in args.parts:
            unpack(part, args.into)
    return 0


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
