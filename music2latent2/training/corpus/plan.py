"""Planning: which tracks the corpus will hold, before any audio is decoded.

A *track* is one output file: a decoded game-music file, the mixed stems of one song, a
rendered module or project, a group of speech clips joined to ~30 s, a MIDI medley, or a
synthetic-speech passage. Planning lists candidate tracks per source with their lengths (read
from headers), drops duplicates (md5 of the inputs) and what fails the rate and length rules,
then picks tracks so that no source dominates: the source with the fewest seconds so far gives
its next random track until the kind has its hours, and no source gives more than
``per_source_hours``.
"""

from __future__ import annotations

import heapq
import random
import re
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

import soundfile as sf

from ...audio import AUDIO_EXTENSIONS
from .audiofiles import file_digest
from .render import TRACKER_SUFFIXES
from .sources import Source

STEM_NAMES = ("song.ogg", "guitar.ogg", "rhythm.ogg", "drums.ogg")
LMMS_SUFFIXES = (".mmpz", ".mmp")
# A render's length is unknown until it is made: plan with the mean of the lmms-common demo renders
# that pass the 30 s rule (174 s, 22 of its 26 projects, measured 2026-12-02).
LMMS_TYPICAL_SECONDS = 170.0


@dataclass(frozen=True)
class Track:
    """One planned output file.

    Args:
        kind: music, midi, speech or real.
        source: Debian package (or ``folder/sub-folder`` for --real, ``music21`` for MIDI).
        licence: licence summary of the source.
        handler: files, stems, tracker, lmms, speech_clips, midi, espeak or real.
        inputs: the files it is made from (absolute paths; for midi, the pieces to draw from).
        name: output path below ``OUT/<kind>/`` (and ``OUT/valid/<kind>/`` when held out).
        seconds: planned length (header lengths; an estimate for renders).
        split: ``train`` or ``valid``.
        seed: randomness of a render (instruments, voice, ...).
        extra: render parameters (soundfont path for midi).
    """

    kind: str
    source: str
    licence: str
    handler: str
    inputs: Tuple[str, ...]
    name: str
    seconds: float
    split: str = "train"
    seed: int = 0
    extra: Tuple[Tuple[str, str], ...] = field(default_factory=tuple)

    @property
    def relpath(self) -> str:
        prefix = "valid/" if self.split == "valid" else ""
        return f"{prefix}{self.kind}/{self.name}"


def slug(text: str) -> str:
    """A safe file name part: letters, digits, '-', '_' and '.' only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:80] or "track"


def _duration(path: Path) -> Tuple[float, int]:
    """(seconds, sample rate) from the header; (0, 0) for what soundfile cannot read."""
    try:
        info = sf.info(str(path))
    except Exception:  # noqa: BLE001 - unreadable or not audio: not a candidate
        return 0.0, 0
    return float(info.duration), int(info.samplerate)


def _tracker_seconds(path: Path) -> float:
    """A module's playing time from ``openmpt123 --info`` (0 when it cannot tell)."""
    try:
        res = subprocess.run(["openmpt123", "--info", str(path)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0.0
    match = re.search(r"Duration\.*:\s*(?:(\d+):)?(\d+):(\d+(?:\.\d+)?)", res.stdout)
    if not match:
        return 0.0
    hours, minutes, seconds = match.groups()
    return int(hours or 0) * 3600 + int(minutes) * 60 + float(seconds)


def candidates(source: Source, tree: Path, seen: Set[str], min_seconds: float, min_rate: int) -> List[Track]:
    """Candidate tracks of one extracted package (``seen`` collects md5s across packages)."""
    files = sorted(p for p in tree.rglob("*") if p.is_file() and not p.name.startswith("."))
    out: List[Track] = []

    def add(inputs: List[Path], seconds: float, label: str) -> None:
        digest = file_digest(*inputs, algorithm="md5")
        if digest in seen:
            return
        seen.add(digest)
        name = f"{source.package}/{slug(label)}_{digest[:6]}.ogg"
        out.append(Track(source.kind, source.package, source.licence, source.handler,
                         tuple(str(p) for p in inputs), name, seconds))

    if source.handler == "stems":
        for song in (p for p in files if p.name == "song.ogg"):
            stems = [song.parent / n for n in STEM_NAMES if (song.parent / n).is_file()]
            seconds, rate = _duration(song)
            if seconds >= min_seconds and rate >= min_rate:
                add(stems, seconds, song.parent.name)
    elif source.handler == "tracker":
        for p in files:
            if p.suffix.lower() in TRACKER_SUFFIXES:
                seconds = min(_tracker_seconds(p), 600.0)
                if seconds >= min_seconds:
                    add([p], seconds, p.stem)
    elif source.handler == "lmms":
        for p in files:
            if p.suffix.lower() in LMMS_SUFFIXES and "/projects/" in p.as_posix():
                add([p], LMMS_TYPICAL_SECONDS, p.stem)
    elif source.handler == "files":
        for p in files:
            if p.suffix.lower() in AUDIO_EXTENSIONS:
                seconds, rate = _duration(p)
                if seconds >= min_seconds and rate >= min_rate:
                    add([p], seconds, p.stem)
    else:
        raise ValueError(f"{source.package}: handler {source.handler!r} does not list candidates")
    return out


def speech_groups(source: Source, tree: Path, seen: Set[str], min_rate: int, seconds_per_file: float,
                  seed: int) -> List[Track]:
    """Short speech clips, shuffled and grouped into tracks of about ``seconds_per_file``."""
    clips = []
    for p in sorted(tree.rglob("*")):
        if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS:
            seconds, rate = _duration(p)
            if seconds > 0.3 and rate >= min_rate:
                digest = file_digest(p, algorithm="md5")
                if digest not in seen:
                    seen.add(digest)
                    clips.append((p, seconds))
    random.Random(seed).shuffle(clips)
    tracks: List[Track] = []
    group: List[Path] = []
    total = 0.0
    for p, seconds in clips:
        group.append(p)
        total += seconds + 0.3
        if total >= seconds_per_file:
            tracks.append(Track("speech", source.package, source.licence, "speech_clips", tuple(map(str, group)),
                                f"{source.package}/{len(tracks):04d}.ogg", total))
            group, total = [], 0.0
    return tracks


def select(by_source: Dict[str, List[Track]], hours: float, per_source_hours: float, seed: int) -> List[Track]:
    """Water-filling, one track at a time: the source with the fewest seconds so far gives its
    next (random) track, until the kind has ``hours``; no source goes past ``per_source_hours``
    (its last track may cross it). Sources smaller than the level they reach give everything."""
    rng = random.Random(seed)
    queues: Dict[str, List[Track]] = {}
    for name in sorted(by_source):
        tracks = list(by_source[name])
        rng.shuffle(tracks)
        if tracks:
            queues[name] = tracks
    tiebreak = {name: rng.random() for name in queues}  # which source goes first among equals
    budget, cap = hours * 3600, per_source_hours * 3600
    heap = [(0.0, tiebreak[name], name) for name in queues]
    heapq.heapify(heap)
    chosen: List[Track] = []
    total = 0.0
    while heap and total < budget:
        seconds, tb, name = heapq.heappop(heap)
        track = queues[name].pop(0)
        chosen.append(track)
        total += track.seconds
        seconds += track.seconds
        if queues[name] and seconds < cap:
            heapq.heappush(heap, (seconds, tb, name))
    return chosen


def hold_out(tracks: Sequence[Track], fraction: float, seed: int) -> List[Track]:
    """Mark whole tracks ``valid`` until ``fraction`` of the seconds, taking sources in turn."""
    if fraction <= 0 or not tracks:
        return list(tracks)
    rng = random.Random(seed)
    by_source: Dict[str, List[int]] = {}
    for i, t in enumerate(tracks):
        by_source.setdefault(t.source, []).append(i)
    for idx in by_source.values():
        rng.shuffle(idx)
    order = sorted(by_source)
    rng.shuffle(order)
    target = fraction * sum(t.seconds for t in tracks)
    chosen: Set[int] = set()
    held, turn = 0.0, 0
    while held < target and any(by_source[s] for s in order):
        source = order[turn % len(order)]
        turn += 1
        if len(by_source[source]) > 1:  # never take a source's last track: it must also train
            i = by_source[source].pop()
            chosen.add(i)
            held += tracks[i].seconds
        elif all(len(by_source[s]) <= 1 for s in order):
            break
    return [replace(t, split="valid") if i in chosen else t for i, t in enumerate(tracks)]


def synthetic_tracks(kind: str, handler: str, source: str, licence: str, count: int, seconds: float, seed: int,
                     pieces: Optional[Sequence[str]] = None, soundfonts: Sequence[str] = (),
                     pieces_per_track: int = 8, first: int = 0, split: str = "train") -> List[Track]:
    """``count`` planned renders (MIDI medleys or espeak passages), each with its own seed,
    numbered from ``first``."""
    rng = random.Random(seed)
    out = []
    for n in range(count):
        extra: Tuple[Tuple[str, str], ...] = ()
        inputs: Tuple[str, ...] = ()
        if pieces:
            inputs = tuple(rng.sample(list(pieces), min(pieces_per_track, len(pieces))))
        if soundfonts:
            extra = (("soundfont", rng.choice(list(soundfonts))),)
        out.append(Track(kind, source, licence, handler, inputs, f"{slug(source)}/{first + n:05d}.ogg", seconds,
                         split=split, seed=rng.randrange(1 << 31), extra=extra))
    return out
