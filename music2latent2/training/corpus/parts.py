"""Carry parts: a corpus split into tar files small enough for one device call each, and back.

Only ~64 MiB travel to the GPU machine per call, and folders not named in a call stay on a
warm machine, so a corpus goes up as parts in successive calls. Each part is one uncompressed
tar (the audio is Vorbis already) with ``part.json`` beside it: the tar's size and sha256 and
the files inside. Unpacking checks the sha256 first and refuses a corrupt part; ``verify``
then checks every file against the corpus manifest's sha256.

Part 1 starts with the manifest, validation list and licences; the audio is spread over the
parts in a seeded random order, so the first N parts are a fair sample of the whole corpus
(a leg short of time can carry fewer parts and still train on every source).
"""

from __future__ import annotations

import json
import random
import secrets
import shutil
import tarfile
from pathlib import Path
from typing import Dict, List, Sequence

from .audiofiles import file_digest
from .sources import CorpusError

PART_TAR = "part.tar"
PART_JSON = "part.json"
TAR_OVERHEAD = 1536  # tar header + padding per member, a safe upper bound
END_OF_ARCHIVE = 10240  # the tar's closing blocks


def plan_parts(files: Sequence[Path], root: Path, part_bytes: int, seed: int = 0) -> List[List[Path]]:
    """Metadata first, then audio in seeded random order, each file into the first part with room.

    Raises:
        CorpusError: a file is larger than a part.
    """
    capacity = part_bytes - END_OF_ARCHIVE
    meta = sorted(f for f in files if f.suffix.lower() in (".json", ".txt", ".md"))
    audio = sorted(set(files) - set(meta))
    random.Random(seed).shuffle(audio)
    parts: List[List[Path]] = []
    free: List[int] = []
    for f in meta + audio:
        size = f.stat().st_size + TAR_OVERHEAD
        if size > capacity:
            raise CorpusError(f"{f.relative_to(root)} ({size} bytes) is larger than a part ({part_bytes} bytes): "
                              "raise --part-mib")
        for n, room in enumerate(free):
            if size <= room:
                parts[n].append(f)
                free[n] -= size
                break
        else:
            parts.append([f])
            free.append(capacity - size)
    return parts


def is_part_folder(path: Path) -> bool:
    """``p<N>`` holding a ``part.json``: what :func:`pack` writes (and may replace)."""
    return path.is_dir() and path.name[:1] == "p" and path.name[1:].isdigit() and (path / PART_JSON).is_file()


def pack(corpus: Path, out: Path, part_mib: float, seed: int = 0, log=print) -> List[Path]:
    """Write ``out/p1``, ``out/p2``, ... (replacing old parts in ``out``) and return their folders.

    Every part records the same ``pack`` id, so a set mixed from two packs is recognisable.

    Raises:
        CorpusError: ``out`` holds anything but parts (nothing of the user's is replaced), or a
            file is larger than a part.
    """
    if not corpus.is_dir():
        raise CorpusError(f"corpus folder not found: {corpus}")
    if out.exists():
        foreign = sorted(p.name for p in out.iterdir() if not is_part_folder(p)) if out.is_dir() else [out.name]
        if foreign:
            raise CorpusError(f"{out} holds more than carry parts ({', '.join(foreign[:3])}"
                              f"{', ...' if len(foreign) > 3 else ''}): pack into an empty or new folder")
    files = sorted(f for f in corpus.rglob("*") if f.is_file() and not f.name.startswith("."))
    if not files:
        raise CorpusError(f"no files in {corpus}")
    groups = plan_parts(files, corpus, int(part_mib * 2 ** 20), seed)
    pack_id = secrets.token_hex(8)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    folders = []
    for n, group in enumerate(groups, start=1):
        folder = staging / f"p{n}"
        folder.mkdir(parents=True)
        with tarfile.open(folder / PART_TAR, "w", format=tarfile.PAX_FORMAT) as tar:
            for f in group:
                tar.add(f, arcname=f.relative_to(corpus).as_posix(), recursive=False)
        size = (folder / PART_TAR).stat().st_size
        info: Dict[str, object] = {"part": n, "of": len(groups), "pack": pack_id, "size": size,
                                   "sha256": file_digest(folder / PART_TAR),
                                   "files": [f.relative_to(corpus).as_posix() for f in group]}
        (folder / PART_JSON).write_text(json.dumps(info, indent=1) + "\n")
        folders.append(out / f"p{n}")
        log(f"{out / f'p{n}'}: {len(group)} files, {size / 2 ** 20:.1f} MiB")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return folders


def unpack(part: Path, into: Path, log=print) -> int:
    """Verify ``part`` and extract it into ``into``; returns the number of files.

    Raises:
        CorpusError: the part is missing, not a part, or corrupt (nothing is extracted then).
    """
    try:
        info = json.loads((part / PART_JSON).read_text())
    except (OSError, ValueError) as err:
        raise CorpusError(f"{part} is not a corpus part: cannot read {PART_JSON} ({err})") from err
    tar_path = part / PART_TAR
    if not tar_path.is_file():
        raise CorpusError(f"{tar_path} is missing")
    size, sha = tar_path.stat().st_size, file_digest(tar_path)
    if size != info["size"] or sha != info["sha256"]:
        raise CorpusError(f"corrupt part {part}: {PART_TAR} has size {size} and sha256 {sha}, "
                          f"{PART_JSON} says {info['size']} and {info['sha256']}")
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        if sorted(names) != sorted(info["files"]):
            raise CorpusError(f"{part}: the tar's members differ from {PART_JSON}")
        for m in members:  # pack writes plain files with relative paths only; refuse anything else
            if not m.isfile() or m.name.startswith("/") or ".." in Path(m.name).parts:
                raise CorpusError(f"{part}: unsafe member {m.name!r} (not a plain file inside the corpus)")
        into.mkdir(parents=True, exist_ok=True)
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: a second line of defence
            tar.extractall(into, filter="data")
        else:
            tar.extractall(into)
    log(f"{part}: {len(names)} files verified and unpacked into {into}")
    return len(names)


def verify(corpus: Path, complete: bool = True) -> Dict[str, int]:
    """Check the files of ``corpus`` against its manifest's sizes and sha256s.

    With ``complete=False`` files absent from the folder are counted, not errors (a leg that
    carried only some parts). Returns counts of ``ok`` and ``absent`` files.

    Raises:
        CorpusError: no manifest, a corrupt file, or (with ``complete``) a missing one.
    """
    try:
        manifest = json.loads((corpus / "manifest.json").read_text())
    except (OSError, ValueError) as err:
        raise CorpusError(f"{corpus}: cannot read manifest.json ({err})") from err
    ok, absent, corrupt = 0, [], []
    for entry in manifest["files"]:
        path = corpus / entry["path"]
        if not path.is_file():
            absent.append(entry["path"])
        elif path.stat().st_size != entry["bytes"] or file_digest(path) != entry["sha256"]:
            corrupt.append(entry["path"])
        else:
            ok += 1
    if corrupt:
        raise CorpusError(f"{len(corrupt)} corrupt files in {corpus} (size or sha256 differ from the manifest), "
                          f"e.g. {corrupt[0]}")
    if absent and complete:
        raise CorpusError(f"{len(absent)} files of the manifest are missing from {corpus}, e.g. {absent[0]}")
    return {"ok": ok, "absent": len(absent)}
