"""Fetch Debian packages without installing them, and make sure the rendering tools exist.

Data packages need no installation: ``apt-get download`` fetches the .deb and ``dpkg-deb -x``
unpacks it into a folder. Some games keep their music inside zip archives (.zip, .pk3); their
audio members are unpacked beside them. Everything lands in a cache folder, so a second build
(another seed, other hours) downloads nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Sequence

from ...audio import AUDIO_EXTENSIONS
from .sources import TOOL_PACKAGES, CorpusError

Log = Callable[[str], None]


def _deb_file(debs: Path, package: str) -> Path | None:
    found = sorted(debs.glob(f"{package}_*.deb"))
    return found[-1] if found else None


def _apt_download(packages: Sequence[str], debs: Path) -> List[str]:
    """Download ``packages`` into ``debs``; returns those that could not be downloaded."""
    if shutil.which("apt-get") is None:
        raise CorpusError("apt-get not found: the corpus builder needs a Debian or Ubuntu machine "
                          "(or pass --cache with the .deb files already in CACHE/debs)")
    res = subprocess.run(["apt-get", "download", *packages], cwd=debs, capture_output=True, text=True)
    if res.returncode == 0:
        return []
    # One unknown package fails the whole call: retry one by one to name the culprits.
    failed = []
    for pkg in packages:
        if _deb_file(debs, pkg) is None:
            one = subprocess.run(["apt-get", "download", pkg], cwd=debs, capture_output=True, text=True)
            if one.returncode != 0:
                failed.append(f"{pkg} ({one.stderr.strip().splitlines()[-1] if one.stderr.strip() else 'failed'})")
    return failed


def _unpack_archives(tree: Path) -> None:
    """Unpack the audio members of zip archives (.zip, .pk3) found in an extracted package."""
    for archive in sorted(list(tree.rglob("*.zip")) + list(tree.rglob("*.pk3"))):
        try:
            with zipfile.ZipFile(archive) as z:
                members = [m for m in z.namelist() if Path(m).suffix.lower() in AUDIO_EXTENSIONS]
                z.extractall(archive.with_name(archive.name + ".unzipped"), members)
        except zipfile.BadZipFile:
            continue  # some .pk3 files are not zips; they hold no music we know how to read


def fetch_packages(packages: Sequence[str], cache: Path, log: Log = print, jobs: int = 1) -> Dict[str, Path]:
    """Download and extract ``packages`` under ``cache``; returns package -> extracted folder.

    Raises:
        CorpusError: apt-get is missing, or packages could not be downloaded (named, with the fix).
    """
    debs, trees = cache / "debs", cache / "trees"
    debs.mkdir(parents=True, exist_ok=True)
    trees.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if not (trees / p).is_dir() and _deb_file(debs, p) is None]
    if missing:
        log(f"downloading {len(missing)} packages into {debs}")
        failed = _apt_download(missing, debs)
        if failed:
            raise CorpusError("could not download: " + ", ".join(failed)
                              + ". Run `apt-get update` (as root), check the network, or leave the package out "
                                "with --exclude")
    todo = [p for p in packages if not (trees / p).is_dir()]
    if todo:
        # dpkg-deb spends its time in xz: one process per core extracts the packages side by side.
        with ThreadPoolExecutor(max(1, jobs)) as threads:
            list(threads.map(lambda pkg: _extract(_deb_file(debs, pkg), trees / pkg), todo))
    return {pkg: trees / pkg for pkg in packages}


def _extract(deb: Path | None, target: Path) -> None:
    """``dpkg-deb -x`` into a temporary folder, zips unpacked, then renamed to ``target``."""
    assert deb is not None
    tmp = target.with_name(f".{target.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    res = subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], capture_output=True, text=True)
    if res.returncode != 0:
        raise CorpusError(f"cannot extract {deb}: {res.stderr.strip()} (delete it and build again "
                          "to download it afresh)")
    _unpack_archives(tmp)
    os.replace(tmp, target)  # a half-extracted package is never taken for a whole one


def copyright_file(tree: Path) -> Path | None:
    """The package's Debian copyright file (its licence terms), if it has one."""
    found = sorted(tree.glob("usr/share/doc/*/copyright"))
    return found[0] if found else None


def ensure_tools(tools: Sequence[str], install: bool, log: Log = print) -> List[str]:
    """Make sure the named programs exist; returns those still missing.

    With ``install`` (and root), missing tools are installed with apt-get; otherwise the
    command that would install them is printed, and the caller skips what needs them.
    """
    missing = [t for t in dict.fromkeys(tools) if shutil.which(t) is None]
    if not missing:
        return []
    packages = [TOOL_PACKAGES.get(t, t) for t in missing]
    command = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    if install and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        log("installing " + " ".join(packages))
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        res = subprocess.run(command, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            log(f"warning: {' '.join(command)} failed: {res.stderr.strip()[-300:]}")
    else:
        log(f"warning: {', '.join(missing)} not installed; the sources that need "
            f"{'it' if len(missing) == 1 else 'them'} are skipped. Install with: sudo {' '.join(command)}")
    return [t for t in missing if shutil.which(t) is None]
