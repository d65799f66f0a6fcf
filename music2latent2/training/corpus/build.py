"""Build the training corpus: fetch, plan, render in parallel, write the manifest, pack carry parts.

The corpus is written into ``OUT.partial`` and renamed to ``OUT`` only when complete, so an
interrupted build never leaves a half corpus where a finished one was (``--overwrite``
replaces an existing corpus the same way, and only at the end).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .audiofiles import (
    SAMPLE_RATE,
    VORBIS_LEVEL,
    bandwidth_hz,
    file_digest,
    normalize_peak,
    read_mono,
    trim_silence,
    write_vorbis,
)
from .debian import copyright_file, ensure_tools, fetch_packages
from .midi import export_score, render_medley, score_paths
from .plan import Track, candidates, hold_out, select, slug, speech_groups, synthetic_tracks
from .render import render_espeak, render_lmms, render_tracker
from .sources import MUSIC_SOURCES, REAL_LICENCES, SOUNDFONTS, SPEECH_SOURCES, CorpusError, Source

MANIFEST_NAME = "manifest.json"
VALIDATION_NAME = "validation.txt"
FORMAT = "music2latent2-corpus"
Log = Callable[[str], None]


@dataclass
class BuildConfig:
    """Everything that decides what a corpus holds (stored in its manifest)."""

    out: Path
    cache: Path = Path.home() / ".cache" / "music2latent2" / "corpus"
    music_hours: float = 24.0
    midi_hours: float = 5.0
    speech_hours: float = 2.5
    synthetic_speech_share: float = 0.15  # of speech_hours, from espeak-ng (English and others)
    per_source_hours: float = 2.0
    min_seconds: float = 30.0
    speech_min_seconds: float = 10.0  # speech files are ~30 s groups; trimming their edges must not drop them
    min_sample_rate: int = 32000
    speech_min_sample_rate: int = 22050
    min_bandwidth_hz: float = 16000.0
    valid_fraction: float = 0.02
    vorbis_level: float = VORBIS_LEVEL
    real: Optional[Path] = None
    midi_dir: Optional[Path] = None  # ready .mid files instead of exporting music21's corpus
    soundfonts: Tuple[str, ...] = ()  # .sf2 files instead of the Debian ones
    exclude: Tuple[str, ...] = ()
    jobs: int = field(default_factory=lambda: os.cpu_count() or 1)
    seed: int = 0
    install_tools: bool = True
    overwrite: bool = False
    sources: Optional[Tuple[Source, ...]] = None  # None: the catalogue in sources.py


# ----------------------------------------------------------------------------- one track (in a worker)
def _audio(track: Track, min_seconds: float) -> Tuple[np.ndarray, int]:
    """Render or decode one planned track -> ((T,) mono 44.1 kHz, lowest source rate)."""
    paths = [Path(p) for p in track.inputs]
    if track.handler in ("files", "stems", "real"):
        return read_mono(paths)
    if track.handler == "tracker":
        return render_tracker(paths[0]), SAMPLE_RATE
    if track.handler == "lmms":
        return render_lmms(paths[0]), SAMPLE_RATE
    if track.handler == "speech_clips":
        gap = np.zeros(int(0.3 * SAMPLE_RATE), np.float32)
        clips, rate = [], SAMPLE_RATE
        for p in paths:
            clip, r = read_mono([p])
            clips += [normalize_peak(clip), gap]
            rate = min(rate, r)
        return np.concatenate(clips[:-1]), rate
    if track.handler == "midi":
        audio, _ = render_medley(track.inputs, dict(track.extra)["soundfont"], track.seed, min_seconds)
        return audio, SAMPLE_RATE
    if track.handler == "espeak":
        return render_espeak(track.seed), 22050
    raise ValueError(f"unknown handler {track.handler!r}")


def make_track(job: Tuple[Track, str, float, float, float]) -> Union[Dict, str]:
    """Worker: one track -> its manifest entry, or a string saying why it was skipped."""
    track, root, min_seconds, min_bandwidth, level = job
    try:
        audio, rate = _audio(track, min_seconds)
    except Exception as err:  # noqa: BLE001 - one bad source file must not stop the build
        return f"{track.relpath}: {type(err).__name__}: {err}"
    audio = normalize_peak(trim_silence(audio))
    seconds = len(audio) / SAMPLE_RATE
    if not np.isfinite(audio).all():
        return f"{track.relpath}: non-finite samples"
    if seconds < min_seconds:
        return f"{track.relpath}: {seconds:.1f} s is under {min_seconds:.0f} s"
    bandwidth = bandwidth_hz(audio, SAMPLE_RATE)
    if track.kind == "music" and bandwidth < min_bandwidth:
        return f"{track.relpath}: band-limited to {bandwidth / 1000:.1f} kHz"
    path = Path(root) / track.relpath
    write_vorbis(path, audio, level)
    return {"path": track.relpath, "kind": track.kind, "source": track.source, "licence": track.licence,
            "seconds": round(seconds, 3), "split": track.split, "source_rate": rate,
            "bandwidth_hz": round(bandwidth), "bytes": path.stat().st_size, "sha256": file_digest(path),
            "inputs": [Path(p).name for p in track.inputs][:8]}


def _run(pool, tracks: Sequence[Track], root: Path, cfg: BuildConfig, log: Log, what: str
         ) -> Tuple[List[Dict], List[str]]:
    minimum = {"music": cfg.min_seconds, "midi": cfg.min_seconds, "speech": cfg.speech_min_seconds, "real": 0.1}
    jobs = [(t, str(root), minimum[t.kind], cfg.min_bandwidth_hz, cfg.vorbis_level) for t in tracks]
    entries: List[Dict] = []
    skipped: List[str] = []
    t0 = time.perf_counter()
    # Longest first, so the last minutes are not spent waiting on one long render.
    jobs.sort(key=lambda j: -j[0].seconds)
    for n, result in enumerate(pool.imap_unordered(make_track, jobs), 1):
        (entries if isinstance(result, dict) else skipped).append(result)
        if n % 50 == 0 or n == len(jobs):
            hours = sum(e["seconds"] for e in entries) / 3600
            log(f"  {what}: {n}/{len(jobs)} tracks, {hours:.2f} h, {time.perf_counter() - t0:.0f} s")
    return entries, skipped


# ----------------------------------------------------------------------------- phases
def _plan_music(cfg: BuildConfig, trees: Dict[str, Path], sources: Sequence[Source], log: Log) -> List[Track]:
    seen: set = set()
    by_source: Dict[str, List[Track]] = {}
    for src in sources:
        by_source[src.package] = candidates(src, trees[src.package], seen, cfg.min_seconds, cfg.min_sample_rate)
    # Plan a little over the target: the band-limit check and renders drop some tracks.
    chosen = select(by_source, cfg.music_hours * 1.08, cfg.per_source_hours, cfg.seed)
    log(f"music: {sum(len(v) for v in by_source.values())} candidate tracks from {len(by_source)} packages, "
        f"{len(chosen)} chosen ({sum(t.seconds for t in chosen) / 3600:.2f} h planned)")
    return hold_out(chosen, cfg.valid_fraction, cfg.seed)


def _plan_speech(cfg: BuildConfig, trees: Dict[str, Path], sources: Sequence[Source]) -> List[Track]:
    seen: set = set()
    by_source = {s.package: speech_groups(s, trees[s.package], seen, cfg.speech_min_sample_rate, 30.0, cfg.seed)
                 for s in sources}
    real_hours = cfg.speech_hours * (1 - cfg.synthetic_speech_share)
    return hold_out(select(by_source, real_hours, cfg.per_source_hours, cfg.seed), cfg.valid_fraction, cfg.seed)


def _plan_real(cfg: BuildConfig) -> List[Track]:
    if cfg.real is None:
        return []
    if not cfg.real.is_dir():
        raise CorpusError(f"--real: folder not found: {cfg.real}")
    tracks = []
    for p in sorted(cfg.real.rglob("*")):
        if p.is_file() and p.suffix.lower() in (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif", ".opus"):
            rel = p.relative_to(cfg.real)
            top = rel.parts[0] if len(rel.parts) > 1 else cfg.real.name
            name = "/".join(slug(x) for x in rel.with_suffix("").parts) + ".ogg"
            tracks.append(Track("real", f"{cfg.real.name}/{top}", REAL_LICENCES.get(top, "see the source folder"),
                                "real", (str(p),), name, 0.0))
    return tracks


def _midi_pieces(cfg: BuildConfig, pool, log: Log) -> List[str]:
    """.mid files to render: ``cfg.midi_dir``, or music21's corpus exported into the cache."""
    if cfg.midi_dir is not None:
        pieces = sorted(str(p) for p in cfg.midi_dir.rglob("*.mid"))
        if not pieces:
            raise CorpusError(f"--midi-dir {cfg.midi_dir} holds no .mid files")
        return pieces
    out = cfg.cache / "midi"
    out.mkdir(parents=True, exist_ok=True)
    pieces = sorted(str(p) for p in out.glob("*.mid"))
    wanted = int(cfg.midi_hours * 60)  # ~1 piece per minute of renders: each is used about twice
    if len(pieces) < wanted:
        t0 = time.perf_counter()
        tasks = [(p, str(out), 3) for p in score_paths(cfg.seed)]
        step = max(4, cfg.jobs * 4)  # in slices: a pool keeps working on queued tasks after a break
        for i in range(0, len(tasks), step):
            for written in pool.map(export_score, tasks[i:i + step], chunksize=1):
                pieces += written
            if len(pieces) >= wanted:
                break
        log(f"midi: exported music21 scores to {len(pieces)} MIDI files in {time.perf_counter() - t0:.0f} s")
    return sorted(set(pieces))


def _soundfonts(cfg: BuildConfig) -> List[str]:
    if cfg.soundfonts:
        return list(cfg.soundfonts)
    trees = fetch_packages([s.package for s in SOUNDFONTS], cfg.cache, jobs=cfg.jobs)
    return [str(trees[s.package] / s.path) for s in SOUNDFONTS]


def _render_midi(cfg: BuildConfig, pool, root: Path, log: Log) -> Tuple[List[Dict], List[str]]:
    """MIDI medleys in batches until ``midi_hours`` (renders' lengths are known only afterwards)."""
    pieces = _midi_pieces(cfg, pool, log)
    rng = random.Random(cfg.seed)
    rng.shuffle(pieces)
    n_valid = max(1, round(len(pieces) * cfg.valid_fraction)) if cfg.valid_fraction > 0 and len(pieces) > 1 else 0
    valid_pieces, train_pieces = pieces[:n_valid], pieces[n_valid:]  # held-out scores, not just renders
    fonts = _soundfonts(cfg)
    entries: List[Dict] = []
    skipped: List[str] = []
    made, batch = 0, max(8, cfg.jobs * 4)
    # Training renders first: by the held-out ones, the batch size is known from their lengths.
    for split, group, hours in (("train", train_pieces, cfg.midi_hours * (1 - cfg.valid_fraction)),
                                ("valid", valid_pieces, cfg.midi_hours * cfg.valid_fraction)):
        done, first, empty = 0.0, 0, 0
        while group and done < hours * 3600 and empty < 3:  # three batches without a track: give up
            # A medley runs past min_seconds by up to one piece: size each batch by the renders so far.
            per_track = sum(e["seconds"] for e in entries) / len(entries) if entries else 2 * cfg.min_seconds
            need = max(1, min(batch if entries else cfg.jobs, int((hours * 3600 - done) / per_track) + 1))
            tracks = synthetic_tracks("midi", "midi", "music21", "music21 corpus (BSD / PD scores); soundfonts "
                                      "MIT, GPL-2, LGPL-2.1+", need, per_track, cfg.seed + made, group, fonts,
                                      first=first, split=split)
            got, bad = _run(pool, tracks, root, cfg, log, f"midi ({split})")
            entries += got
            skipped += bad
            done += sum(e["seconds"] for e in got)
            first += need
            made += 1
            empty = 0 if got else empty + 1
    return entries, skipped


def _render_espeak(cfg: BuildConfig, pool, root: Path, log: Log) -> Tuple[List[Dict], List[str]]:
    hours = cfg.speech_hours * cfg.synthetic_speech_share
    if hours <= 0:
        return [], []
    if ensure_tools(["espeak-ng"], cfg.install_tools, log):
        return [], ["espeak-ng not installed: no synthetic speech"]
    count = int(hours * 3600 / 35) + 1
    tracks = hold_out(synthetic_tracks("speech", "espeak", "espeak-ng", "GPL-3+ (synthetic)", count, 35.0,
                                       cfg.seed), cfg.valid_fraction, cfg.seed)
    return _run(pool, tracks, root, cfg, log, "speech (espeak-ng)")


# ----------------------------------------------------------------------------- the build
def summarize(entries: Sequence[Dict]) -> Dict[str, Dict[str, float]]:
    """Hours by kind, split, source and licence."""
    out: Dict[str, Dict[str, float]] = {"kind": {}, "split": {}, "source": {}, "licence": {}}
    for e in entries:
        for key in out:
            out[key][e[key]] = round(out[key].get(e[key], 0.0) + e["seconds"] / 3600, 4)
    return out


def build(cfg: BuildConfig, log: Log = print) -> Path:
    """Build the corpus described by ``cfg`` into ``cfg.out``; returns the manifest's path."""
    t0 = time.perf_counter()
    out = cfg.out
    if out.exists() and not cfg.overwrite:
        raise CorpusError(f"{out} already exists; pass --overwrite to replace it (at the end of the build)")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    sources = [s for s in (cfg.sources if cfg.sources is not None else MUSIC_SOURCES + SPEECH_SOURCES)
               if s.package not in cfg.exclude]
    missing_tools = ensure_tools([s.tool for s in sources if s.tool], cfg.install_tools, log)
    sources = [s for s in sources if s.tool not in missing_tools]
    trees = fetch_packages([s.package for s in sources], cfg.cache, log, cfg.jobs)
    log(f"fetched {len(trees)} packages in {time.perf_counter() - t0:.0f} s")
    music = [s for s in sources if s.kind == "music"]
    plan = _plan_music(cfg, trees, music, log) if cfg.music_hours > 0 else []
    plan += _plan_speech(cfg, trees, [s for s in sources if s.kind == "speech"]) if cfg.speech_hours > 0 else []
    plan += _plan_real(cfg)
    entries: List[Dict] = []
    skipped: List[str] = []
    with multiprocessing.get_context("fork").Pool(cfg.jobs) as pool:
        for run in (lambda: _run(pool, plan, partial, cfg, log, "music, speech, recordings"),
                    lambda: _render_espeak(cfg, pool, partial, log),
                    lambda: _render_midi(cfg, pool, partial, log) if cfg.midi_hours > 0 else ([], [])):
            got, bad = run()
            entries += got
            skipped += bad
    if not entries:  # e.g. every decode failed: say why instead of writing an empty corpus
        shutil.rmtree(partial, ignore_errors=True)
        raise CorpusError(f"no track could be made ({len(skipped)} skipped), e.g. " + "; ".join(skipped[:3]))
    for src in sources:
        notice = copyright_file(trees[src.package])
        if notice is not None:
            (partial / "licences").mkdir(exist_ok=True)
            shutil.copyfile(notice, partial / "licences" / f"{src.package}.txt")
    entries.sort(key=lambda e: e["path"])
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(replace(cfg, sources=None)).items()}
    manifest: Dict[str, Any] = {"format": FORMAT, "version": 1, "sample_rate": SAMPLE_RATE, "channels": 1,
                                "codec": "ogg/vorbis", "build_seconds": round(time.perf_counter() - t0, 1),
                                "config": config, "hours": summarize(entries), "skipped": skipped,
                                "files": entries}
    (partial / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
    (partial / VALIDATION_NAME).write_text("".join(e["path"] + "\n" for e in entries if e["split"] == "valid"))
    if out.exists():  # --overwrite: the old corpus goes only now that the new one is whole
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(partial, out)
        shutil.rmtree(old)
    else:
        os.replace(partial, out)
    log(report(manifest))
    for line in shortfalls(cfg, manifest["hours"]["kind"]):
        log(line)
    return out / MANIFEST_NAME


def shortfalls(cfg: BuildConfig, hours_by_kind: Dict[str, float]) -> List[str]:
    """Warnings for kinds that ended under 90 % of the hours asked for (sources exhausted,
    tools missing, many tracks skipped), so a short corpus is not mistaken for a full one."""
    asked = {"music": cfg.music_hours, "midi": cfg.midi_hours, "speech": cfg.speech_hours}
    return [f"warning: {kind} has {hours_by_kind.get(kind, 0.0):.2f} h of the {want:.2f} h asked for "
            "(see 'skipped' in the manifest)" for kind, want in asked.items()
            if want > 0 and hours_by_kind.get(kind, 0.0) < 0.9 * want]


def report(manifest: Dict) -> str:
    """A few lines: hours per kind, split and licence, skipped tracks, size, build time."""
    hours = manifest["hours"]
    lines = ["hours by kind:    " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(hours["kind"].items())),
             "hours by split:   " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(hours["split"].items())),
             "hours by licence:"]
    lines += [f"  {v:6.2f}  {k}" for k, v in sorted(hours["licence"].items(), key=lambda kv: -kv[1])]
    lines.append(f"{len(manifest['files'])} files, {len(manifest['skipped'])} skipped, built in "
                 f"{manifest['build_seconds']:.0f} s")
    return "\n".join(lines)
