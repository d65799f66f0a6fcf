#!/usr/bin/env python3
"""Build a compact real-music training corpus for a relay leg from Debian packages.

Downloads (``apt-get download``, no install) freely licensed game-music and speech packages,
extracts them (``dpkg-deb -x``, and the zip archives some keep their music in), keeps music
files of at least 30 s at 32 kHz or more, de-duplicates by md5, mixes Frets on Fire stems,
caps every package at ``--per-source-hours`` so no single game dominates, and writes mono
44.1 kHz Ogg Vorbis (~76 kbps) into ``OUT/music``, ``OUT/speech`` (Czech actors' lines joined
into ~30 s files) and ``OUT/real`` (recordings from ``--real``), with ``OUT/manifest.json``
(path, source package, licence, seconds, kind per file). Audio is never committed.

    python scripts/build_leg_corpus.py --out corpus/leg --real ../shared/data/train_real

Licences are Debian main (DFSG-free): GPL, CC-BY, CC-BY-SA, CC0, public domain. Share-alike
binds redistribution of the audio, not a model trained on it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import random
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import soundfile as sf
import soxr

SR = 44100
AUDIO = {".ogg", ".opus", ".flac", ".wav", ".mp3"}
# package -> licence (from each package's copyright file; see the README's model card)
MUSIC_PACKAGES: Dict[str, str] = {
    "marsshooter-data": "CC-BY-SA-3.0",
    "nexuiz-music": "GPL-2",
    "supertux-data": "GPL / CC-BY-SA / CC0 (mixed)",
    "hedgewars-data": "GPL-2 / CC-BY-SA",
    "colobot-common-sounds": "GPL-3+",
    "singularity-music": "CC-BY-SA-3.0",
    "wesnoth-1.16-music": "GPL-2+",
    "naev-data": "GPL / CC-BY(-SA) / PD (mixed)",
    "fretsonfire-songs-muldjord": "CC-BY-SA-3.0",
    "fretsonfire-songs-sectoid": "GPL",
}
SPEECH_PACKAGES: Dict[str, str] = {"fillets-ng-data-cs": "GPL-2+"}
REAL_LICENCES = {"weresax": "CC0-1.0", "splendid_grand_piano": "public domain", "sonic_pi": "CC0",
                 "sms_tools_sounds": "CC-BY-4.0"}
STEM_NAMES = ("song.ogg", "guitar.ogg", "rhythm.ogg", "drums.ogg")


def download(packages: Sequence[str], scratch: Path) -> Dict[str, Path]:
    """apt-get download + dpkg-deb -x (+ unzip of .pk3/.zip); package -> extracted folder."""
    debs = scratch / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if not list(debs.glob(f"{p}_*.deb"))]
    if missing:
        subprocess.run(["apt-get", "download", *missing], cwd=debs, check=True, stdout=subprocess.DEVNULL)
    out = {}
    for pkg in packages:
        target = scratch / "x" / pkg
        if not target.exists():
            deb = next(debs.glob(f"{pkg}_*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
            for archive in list(target.rglob("*.pk3")) + list(target.rglob("*.zip")):
                with zipfile.ZipFile(archive) as z:
                    members = [m for m in z.namelist() if Path(m).suffix.lower() in AUDIO]
                    z.extractall(archive.with_suffix(".unzipped"), members)
        out[pkg] = target
    return out


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def music_items(pkg: str, root: Path, min_seconds: float) -> List[Tuple[List[Path], float]]:
    """(files to mix, seconds) per track: stems of one Frets on Fire song, else single files."""
    items, seen = [], set()
    stem_dirs = {p.parent for p in root.rglob("song.ogg")} if pkg.startswith("fretsonfire") else set()
    for d in sorted(stem_dirs):
        stems = [d / n for n in STEM_NAMES if (d / n).is_file()]
        items.append((stems, sf.info(str(stems[0])).duration))
    for f in sorted(root.rglob("*")):
        if f.suffix.lower() not in AUDIO or f.parent in stem_dirs or not f.is_file():
            continue
        try:
            info = sf.info(str(f))
        except Exception:  # noqa: BLE001 - unreadable: skip
            continue
        if info.duration < min_seconds or info.samplerate < 32000:
            continue
        digest = _md5(f)
        if digest in seen:
            continue
        seen.add(digest)
        items.append(([f], info.duration))
    return items


def read_mono(paths: Sequence[Path]) -> np.ndarray:
    """Mono mix at 44.1 kHz of one or more files (stems are summed)."""
    mix = None
    for p in paths:
        data, sr = sf.read(str(p), dtype="float32", always_2d=True)
        mono = data.mean(1)
        if sr != SR:
            mono = soxr.resample(mono, sr, SR, quality="HQ").astype(np.float32)
        if mix is None:
            mix = mono
        else:
            n = max(len(mix), len(mono))
            mix = np.pad(mix, (0, n - len(mix))) + np.pad(mono, (0, n - len(mono)))
    assert mix is not None
    peak = float(np.abs(mix).max()) if mix.size else 0.0
    if peak > 1.0 or 0 < peak < 0.1:
        mix = mix * (0.9 / peak)
    return mix.astype(np.float32)


def write_vorbis(path: Path, audio: np.ndarray, level: float = 0.5) -> None:
    """Atomic Ogg Vorbis write in blocks (one huge write crashes libsndfile's Vorbis encoder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    with sf.SoundFile(str(tmp), "w", SR, 1, format="OGG", subtype="VORBIS", compression_level=level) as out:
        for i in range(0, len(audio), 16384):
            out.write(audio[i:i + 16384])
    os.replace(tmp, path)


def _job(args: Tuple[List[str], str]) -> Tuple[str, float]:
    sources, dest = args
    audio = read_mono([Path(s) for s in sources])
    write_vorbis(Path(dest), audio)
    return dest, len(audio) / SR


def speech_files(root: Path, hours: float, out: Path, seed: int) -> List[Tuple[List[str], float]]:
    """Join short utterances into ~30 s files with 0.3 s gaps (written here, not in the pool)."""
    clips = sorted(f for f in root.rglob("*") if f.suffix.lower() in AUDIO and f.is_file())
    random.Random(seed).shuffle(clips)
    made, total, buf, n = [], 0.0, [], 0
    gap = np.zeros(int(0.3 * SR), np.float32)
    for clip in clips:
        try:
            buf += [read_mono([clip]), gap]
        except Exception:  # noqa: BLE001
            continue
        if sum(len(b) for b in buf) >= 30 * SR:
            audio = np.concatenate(buf)
            dest = out / f"cs_{n:04d}.ogg"
            write_vorbis(dest, audio)
            made.append(([str(dest)], len(audio) / SR))
            total += len(audio) / SR
            buf, n = [], n + 1
            if total >= hours * 3600:
                break
    return made


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/m2l2-debs"))
    ap.add_argument("--music-hours", type=float, default=5.0)
    ap.add_argument("--per-source-hours", type=float, default=0.7)
    ap.add_argument("--speech-hours", type=float, default=0.4)
    ap.add_argument("--real", type=Path, default=None, help="folder of real recordings to add (sub-folder = source)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.time()
    trees = download([*MUSIC_PACKAGES, *SPEECH_PACKAGES], args.scratch)
    print(f"downloaded and extracted {len(trees)} packages in {time.time() - t0:.0f} s", flush=True)

    rng = random.Random(args.seed)
    jobs, entries = [], []
    per_source: Dict[str, float] = {}
    for pkg in MUSIC_PACKAGES:
        items = music_items(pkg, trees[pkg], 30.0)
        rng.shuffle(items)
        for n, (paths, seconds) in enumerate(items):
            if per_source.get(pkg, 0.0) + seconds > args.per_source_hours * 3600 and per_source.get(pkg):
                continue
            per_source[pkg] = per_source.get(pkg, 0.0) + seconds
            dest = args.out / "music" / pkg / f"{n:03d}_{paths[0].parent.name if len(paths) > 1 else paths[0].stem}.ogg"
            jobs.append(([str(p) for p in paths], str(dest)))
            entries.append({"path": str(dest.relative_to(args.out)), "source": pkg, "licence": MUSIC_PACKAGES[pkg],
                            "kind": "music"})
    budget = args.music_hours * 3600
    if sum(per_source.values()) > budget:  # trim the largest sources first, evenly
        scale = budget / sum(per_source.values())
        print(f"music over budget: keeping ~{scale:.0%} of each source", flush=True)
        keep, used = [], {}
        for job, entry in zip(jobs, entries):
            src = entry["source"]
            if used.get(src, 0.0) < per_source[src] * scale:
                keep.append((job, entry))
                used[src] = used.get(src, 0.0) + sf.info(job[0][0]).duration
        jobs, entries = [k[0] for k in keep], [k[1] for k in keep]
    if args.real is not None:
        for f in sorted(args.real.rglob("*")):
            if f.suffix.lower() in AUDIO and f.is_file():
                top = f.relative_to(args.real).parts[0]
                dest = args.out / "real" / f.relative_to(args.real).with_suffix(".ogg")
                jobs.append(([str(f)], str(dest)))
                entries.append({"path": str(dest.relative_to(args.out)), "source": f"train_real/{top}",
                                "licence": REAL_LICENCES.get(top, "see source"), "kind": "real"})
    with multiprocessing.Pool(args.jobs) as pool:
        seconds = dict(pool.imap_unordered(_job, jobs, chunksize=1))
    for entry in entries:
        entry["seconds"] = round(seconds[str(args.out / entry["path"])], 3)
    for pkg, licence in SPEECH_PACKAGES.items():
        for (dest,), secs in speech_files(trees[pkg], args.speech_hours, args.out / "speech" / pkg, args.seed):
            entries.append({"path": str(Path(dest).relative_to(args.out)), "source": pkg, "licence": licence,
                            "kind": "speech", "seconds": round(secs, 3)})
    manifest = {"sample_rate": SR, "channels": 1, "format": "ogg/vorbis", "files": entries}
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    hours: Dict[str, float] = {}
    for e in entries:
        hours[e["kind"]] = hours.get(e["kind"], 0.0) + e["seconds"] / 3600
        hours[e["source"]] = hours.get(e["source"], 0.0) + e["seconds"] / 3600
    size = sum(f.stat().st_size for f in args.out.rglob("*.ogg"))
    for key, h in sorted(hours.items()):
        print(f"{key:40s} {h:6.2f} h")
    print(f"{len(entries)} files, {size / 2 ** 20:.1f} MiB, built in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
