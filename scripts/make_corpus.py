#!/usr/bin/env python3
"""Build a training corpus: synthetic music from MIDI, optional synthetic speech, real recordings.

    # once, where music21 is installed: score corpus -> .mid files (small: ~2 KB each)
    python scripts/make_corpus.py --export-midi corpus/midi --max-scores 800 --jobs 2
    # anywhere (e.g. a 16-core GPU machine): render them with random instruments, etc.
    python scripts/make_corpus.py --midi-dir corpus/midi --out corpus --variants 3 --jobs 16 \\
        --speech-minutes 30 --real ../shared/data/train_real

Music: every MIDI file is rendered ``--variants`` times with a General MIDI soundfont through
``midirenderer`` (PyPI; falls back to the ``fluidsynth`` command), each time with random
instruments per channel, transposition, tempo, velocity scaling, stereo width and loudness,
and optionally layered with a second piece. Speech: ``espeak-ng`` (or ``piper``) via subprocess,
if installed. Real: audio under ``--real`` copied as 44.1 kHz FLAC. Prints hours per source.
Output: ``OUT/music/*.flac``, ``OUT/speech/*.flac``, ``OUT/real/**.flac``.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import soundfile as sf
import torch

# Runnable from a checkout that is not installed (e.g. copied to a GPU machine).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from music2latent2.audio import find_audio_files, load_audio, resample  # noqa: E402
from music2latent2.fileio import atomic_write  # noqa: E402

SR = 44100
# General MIDI programs grouped so a random pick stays plausible for melodic lines.
GM_MELODIC = (list(range(0, 8)) + list(range(16, 24)) + list(range(24, 32)) + list(range(40, 48))
              + list(range(48, 56)) + list(range(56, 64)) + list(range(64, 80)) + list(range(80, 88)))
GM_BASS = list(range(32, 40)) + [42, 43, 58, 70]


def default_soundfont() -> Path | None:
    """pretty_midi's bundled TimGM6mb.sf2 (6 MB GM soundfont), or a Debian one if present."""
    for p in ("/usr/share/sounds/sf2/FluidR3_GM.sf2", "/usr/share/sounds/sf2/FluidR3Mono_GM.sf3"):
        if Path(p).is_file():
            return Path(p)
    try:
        import pretty_midi
    except ImportError:
        return None
    p = Path(pretty_midi.__file__).parent / "TimGM6mb.sf2"
    return p if p.is_file() else None


# ----------------------------------------------------------------------------- MIDI export
def _export_one(args: Tuple[str, str, int]) -> List[str]:
    src, out_dir, max_per_file = args
    from music21 import converter, stream

    written = []
    try:
        parsed = converter.parse(src)
        scores = list(parsed.scores)[:max_per_file] if isinstance(parsed, stream.Opus) else [parsed]
        stem = "_".join(Path(src).with_suffix("").parts[-2:])
        for k, score in enumerate(scores):
            dst = Path(out_dir) / f"{stem}_{k}.mid"
            tmp = dst.with_suffix(".tmp")
            score.write("midi", fp=str(tmp))
            os.replace(tmp, dst)
            written.append(str(dst))
    except Exception as err:  # music21 cannot parse every file in its corpus
        print(f"skip {src}: {type(err).__name__}: {err}", file=sys.stderr)
    return written


def export_midi(out_dir: Path, max_scores: int, jobs: int, seed: int) -> List[str]:
    """music21's score corpus -> .mid files (random subset of ``max_scores`` corpus files)."""
    from music21 import corpus

    paths = [str(p) for p in corpus.getPaths() if Path(str(p)).suffix in (".krn", ".abc", ".mxl", ".xml", ".musicxml")]
    random.Random(seed).shuffle(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = [(p, str(out_dir), 3) for p in paths[:max_scores]]
    with mp.Pool(jobs) as pool:
        files = [f for chunk in pool.imap_unordered(_export_one, tasks) for f in chunk]
    print(f"exported {len(files)} MIDI files from {len(tasks)} corpus files to {out_dir}")
    return files


# ----------------------------------------------------------------------------- MIDI variation
def vary_midi(midi_bytes: bytes, rng: random.Random) -> Tuple[bytes, Dict[str, float]]:
    """Random instruments, transposition, tempo and velocity for one rendering (uses mido)."""
    import mido

    mid = mido.MidiFile(file=io.BytesIO(midi_bytes))
    transpose = rng.randint(-5, 5)
    tempo_factor = rng.uniform(0.75, 1.3)
    velocity_gain = rng.uniform(0.6, 1.2)
    programs = {ch: rng.choice(GM_BASS if ch == 1 and rng.random() < 0.3 else GM_MELODIC) for ch in range(16)}
    for track in mid.tracks:
        seen_program = set()
        for msg in track:
            ch = getattr(msg, "channel", None)
            if msg.type == "set_tempo":
                msg.tempo = int(min(max(msg.tempo / tempo_factor, 1), 16777215))
            elif msg.type == "program_change" and ch != 9:
                msg.program = programs[ch]
                seen_program.add(ch)
            elif msg.type in ("note_on", "note_off") and ch != 9:
                msg.note = min(max(msg.note + transpose, 0), 127)
                if msg.type == "note_on" and msg.velocity > 0:
                    msg.velocity = int(min(max(msg.velocity * velocity_gain, 1), 127))
        # Scores without program changes would all sound as piano: add one per used channel.
        used = {m.channel for m in track if m.type == "note_on" and m.channel != 9}
        for ch in sorted(used - seen_program):
            track.insert(0, mido.Message("program_change", channel=ch, program=programs[ch], time=0))
    if not any(m.type == "set_tempo" for t in mid.tracks for m in t):
        mid.tracks[0].insert(0, mido.MetaMessage("set_tempo", tempo=int(500000 / tempo_factor), time=0))
    buf = io.BytesIO()
    mid.save(file=buf)
    return buf.getvalue(), {"transpose": transpose, "tempo": tempo_factor, "velocity": velocity_gain}


# ----------------------------------------------------------------------------- rendering
_SOUNDFONT: Dict[str, bytes] = {}


def _render(midi_bytes: bytes, soundfont: str) -> np.ndarray:
    """MIDI bytes -> (T, 2) float32 at 44.1 kHz."""
    try:
        import midirenderer

        if soundfont not in _SOUNDFONT:
            _SOUNDFONT[soundfont] = Path(soundfont).read_bytes()
        wav = midirenderer.render_wave_from(_SOUNDFONT[soundfont], midi_bytes)
        data, sr = sf.read(io.BytesIO(bytes(wav)), dtype="float32", always_2d=True)
    except ImportError:
        if shutil.which("fluidsynth") is None:
            raise RuntimeError("neither midirenderer (pip) nor fluidsynth (apt) is installed") from None
        with tempfile.TemporaryDirectory() as tmp:
            mid, out = Path(tmp) / "in.mid", Path(tmp) / "out.wav"
            mid.write_bytes(midi_bytes)
            subprocess.run(["fluidsynth", "-ni", "-g", "0.6", "-r", str(SR), "-F", str(out), soundfont, str(mid)],
                           check=True, capture_output=True)
            data, sr = sf.read(str(out), dtype="float32", always_2d=True)
    if sr != SR:
        import soxr

        data = soxr.resample(data, sr, SR).astype(np.float32)
    if data.shape[1] == 1:
        data = np.repeat(data, 2, axis=1)
    return data[:, :2]


def _mix(data: np.ndarray, rng: random.Random) -> np.ndarray:
    """Random stereo width and loudness; trims leading/trailing silence."""
    mid, side = data.mean(1), (data[:, 0] - data[:, 1]) / 2
    width = rng.uniform(0.0, 1.5)
    out = np.stack([mid + width * side, mid - width * side], 1)
    loud = np.flatnonzero(np.abs(out).max(1) > 1e-4)
    if loud.size == 0:
        return out[:0]
    out = out[loud[0]: loud[-1] + 1]
    peak = float(np.abs(out).max())
    return (out * (10 ** (rng.uniform(-14, -1) / 20) / max(peak, 1e-6))).astype(np.float32)


def _render_task(task: Tuple[str, str, int, str, float, str | None]) -> Tuple[str, float, float]:
    midi_path, out_dir, seed, soundfont, max_seconds, layer_path = task
    rng = random.Random(seed)
    t0 = time.perf_counter()
    try:
        midi, _ = vary_midi(Path(midi_path).read_bytes(), rng)
        data = _mix(_render(midi, soundfont), rng)
        if layer_path is not None and data.shape[0]:  # layer a second piece under the first
            other, _ = vary_midi(Path(layer_path).read_bytes(), rng)
            extra = _mix(_render(other, soundfont), rng)[: data.shape[0]]
            data[: extra.shape[0]] += rng.uniform(0.2, 0.6) * extra
            data /= max(1.0, float(np.abs(data).max()) / 0.99)
    except Exception as err:
        print(f"skip {midi_path}: {type(err).__name__}: {err}", file=sys.stderr)
        return "", 0.0, time.perf_counter() - t0
    if data.shape[0] < SR:  # under a second: not worth a file
        return "", 0.0, time.perf_counter() - t0
    limit = int(max_seconds * SR)
    if data.shape[0] > limit:
        start = rng.randrange(0, data.shape[0] - limit)
        data = data[start:start + limit]
    dst = Path(out_dir) / f"{Path(midi_path).stem}_s{seed}.flac"
    tmp = dst.with_name(".tmp-" + dst.name)
    sf.write(str(tmp), data, SR, format="FLAC", subtype="PCM_16")
    os.replace(tmp, dst)
    return str(dst), data.shape[0] / SR, time.perf_counter() - t0


def render_music(midi_files: Sequence[str], out_dir: Path, variants: int, soundfont: Path, jobs: int, seed: int,
                 max_seconds: float, layer_prob: float, max_hours: float | None) -> Tuple[float, float]:
    """Render every MIDI file ``variants`` times. Returns (audio seconds, wall seconds)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    tasks = []
    for v in range(variants):
        for i, path in enumerate(midi_files):
            layer = rng.choice(midi_files) if rng.random() < layer_prob else None
            tasks.append((path, str(out_dir), seed * 1_000_003 + v * 100_003 + i, str(soundfont), max_seconds, layer))
    rng.shuffle(tasks)
    total, t0 = 0.0, time.perf_counter()
    with mp.Pool(jobs) as pool:
        for n, (_, seconds, _) in enumerate(pool.imap_unordered(_render_task, tasks), 1):
            total += seconds
            if n % 50 == 0:
                print(f"  music: {n}/{len(tasks)} files, {total / 3600:.2f} h", flush=True)
            if max_hours is not None and total >= max_hours * 3600:
                pool.terminate()
                break
    return total, time.perf_counter() - t0


# ----------------------------------------------------------------------------- speech
WORDS = ("the a one every small quiet old bright river window garden music morning evening table letter "
         "city mountain voice story friend summer winter light water paper train station house road "
         "walks sings reads finds carries remembers opens follows watches builds writes hears keeps "
         "slowly softly again today tomorrow together under over near behind across through").split()


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16))).capitalize() + "."


def _speech_task(task: Tuple[str, int]) -> Tuple[str, float]:
    out_dir, seed = task
    rng = random.Random(seed)
    text = " ".join(_sentence(rng) for _ in range(rng.randint(3, 8)))
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "s.wav"
        voice = rng.choice(["en", "en-us", "en-gb", "de", "fr", "es", "it"])
        cmd = ["espeak-ng", "-v", f"{voice}+{rng.choice(['m1', 'm3', 'f1', 'f2', 'f4'])}",
               "-s", str(rng.randint(120, 190)), "-p", str(rng.randint(20, 80)), "-w", str(wav), text]
        if subprocess.run(cmd, capture_output=True).returncode != 0 or not wav.is_file():
            return "", 0.0
        data, sr = sf.read(str(wav), dtype="float32")
    data = resample(torch.from_numpy(data), sr, SR).numpy()
    data *= 10 ** (rng.uniform(-12, -1) / 20) / max(float(np.abs(data).max()), 1e-6)
    dst = Path(out_dir) / f"espeak_{seed}.flac"
    atomic_write(dst, lambda tmp: sf.write(tmp, data, SR, format="FLAC", subtype="PCM_16"))
    return str(dst), data.shape[0] / SR


def render_speech(out_dir: Path, minutes: float, jobs: int, seed: int) -> float:
    """Synthetic speech with espeak-ng until ``minutes`` of audio exist. Returns seconds."""
    if shutil.which("espeak-ng") is None:
        print("speech: espeak-ng not installed (apt-get install espeak-ng); skipped")
        return 0.0
    out_dir.mkdir(parents=True, exist_ok=True)
    total, k = 0.0, 0
    with mp.Pool(jobs) as pool:
        while total < minutes * 60:
            batch = [(str(out_dir), seed * 7919 + k + j) for j in range(jobs * 4)]
            k += len(batch)
            results = pool.map(_speech_task, batch)
            total += sum(s for _, s in results)
            if not any(p for p, _ in results):
                print("speech: espeak-ng failed on every sentence; stopped")
                break
    return total


# ----------------------------------------------------------------------------- real audio
def copy_real(src: Path, out_dir: Path) -> float:
    """Copy audio under ``src`` as 44.1 kHz FLAC (keeping folders and licence files). Returns seconds.

    Each file is written atomically, so an interrupted copy never leaves a truncated FLAC that
    the training loader would accept (its header reads fine).
    """
    if not src.is_dir():
        raise SystemExit(f"--real: folder not found: {src}")
    for path in sorted(src.rglob("*")):
        if path.is_file() and path.suffix.lower() in (".txt", ".md"):
            rel = path.relative_to(src)
            atomic_write(out_dir / rel, lambda tmp, path=path: shutil.copyfile(path, tmp))
    total = 0.0
    for path in find_audio_files(src):
        try:
            data, sr = load_audio(path)
        except ValueError as err:
            print(f"skip {path}: {err}", file=sys.stderr)
            continue
        data = resample(torch.from_numpy(data), sr, SR).numpy()
        dst = (out_dir / path.relative_to(src)).with_suffix(".flac")
        clipped = np.clip(data.T, -1, 1)
        atomic_write(dst, lambda tmp, clipped=clipped: sf.write(tmp, clipped, SR, format="FLAC", subtype="PCM_16"))
        total += data.shape[-1] / SR
    return total


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="corpus", help="output folder (music/, speech/, real/ inside)")
    p.add_argument("--export-midi", default=None, metavar="DIR", help="write music21 scores as .mid files here")
    p.add_argument("--max-scores", type=int, default=400, help="music21 corpus files to export")
    p.add_argument("--midi-dir", default=None, help="render the .mid files in this folder")
    p.add_argument("--render", action="store_true", help="with --export-midi: also render the exported files")
    p.add_argument("--soundfont", default=None, help="GM .sf2 (default: pretty_midi's TimGM6mb.sf2)")
    p.add_argument("--variants", type=int, default=2, help="renderings per MIDI file")
    p.add_argument("--max-seconds", type=float, default=60.0, help="longest rendered file (random excerpt)")
    p.add_argument("--max-music-hours", type=float, default=None, help="stop rendering music after this much")
    p.add_argument("--layer-prob", type=float, default=0.2, help="chance of layering a second piece")
    p.add_argument("--speech-minutes", type=float, default=0.0, help="synthetic speech to make (espeak-ng)")
    p.add_argument("--real", default=None, help="folder of real recordings to copy in (e.g. ../shared/data/train_real)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    hours: Dict[str, float] = {}
    midi_files: List[str] = []
    if args.export_midi:
        midi_files = export_midi(Path(args.export_midi), args.max_scores, args.jobs, args.seed)
    if args.midi_dir:
        midi_files = sorted(str(f) for f in Path(args.midi_dir).rglob("*.mid"))
        if not midi_files:
            p.error(f"no .mid files in {args.midi_dir}")
    if args.midi_dir or (args.export_midi and args.render):
        soundfont = Path(args.soundfont) if args.soundfont else default_soundfont()
        if soundfont is None or not soundfont.is_file():
            p.error("no soundfont: pass --soundfont PATH or pip install pretty_midi (ships TimGM6mb.sf2)")
        seconds, wall = render_music(midi_files, out / "music", args.variants, soundfont, args.jobs, args.seed,
                                     args.max_seconds, args.layer_prob, args.max_music_hours)
        hours["music (synthetic)"] = seconds / 3600
        print(f"music: {seconds / 60:.1f} min in {wall:.1f} s wall with {args.jobs} jobs = "
              f"{seconds / max(wall, 1e-9):.0f}x real time ({seconds / max(wall, 1e-9) / args.jobs:.0f}x per job)")
    if args.speech_minutes > 0:
        t0 = time.perf_counter()
        seconds = render_speech(out / "speech", args.speech_minutes, args.jobs, args.seed)
        hours["speech (espeak-ng)"] = seconds / 3600
        if seconds:
            print(f"speech: {seconds / 60:.1f} min in {time.perf_counter() - t0:.1f} s wall")
    if args.real:
        hours["real recordings"] = copy_real(Path(args.real), out / "real") / 3600
    for name, h in hours.items():
        print(f"{name:>20}: {h:.3f} h")
    print(f"{'total':>20}: {sum(hours.values()):.3f} h")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
