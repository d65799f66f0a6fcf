"""Offline MIR probe benchmark: linear probes on notes and chords rendered from General MIDI soundfonts.

    python benchmarks/mir_probe.py [--model m2l2-small] [--soundfont A.sf2 --soundfont B.sf2 ...]

The paper probes TinySOL (pitch class, instrument), Beatport (key) and MagnaTagATune (tags);
none of them can be downloaded here. This benchmark renders look-alikes instead, offline:

- **notes** (TinySOL-like): 18 General MIDI instruments in 6 families, every pitch class in a
  random octave of each instrument's range, random velocity. Labels: pitch class (12),
  instrument family (6), instrument (18).
- **chords**: major and minor triads on all 12 roots (24 classes), random inversion, register,
  instrument (10 sustained programs) and optional bass root.

The same score is rendered with every soundfont, and each soundfont in turn is held out for
testing (leave-one-soundfont-out): a probe cannot pass by memorising one sample set. Default
soundfonts: the four sf2 General MIDI banks in Debian (FluidR3_GM, TimGM6mb, sf_GMbank and the
OPL3 FM bank), fetched with ``apt-get download`` into ``--cache``. Every clip is one chunk
(32,768 samples), peak-normalised to a random level, so loudness says nothing about the label.

Features: the model's HEAR scene embeddings (:mod:`music2latent2.hear`, the chunk features of
``encode(extract_features=True)``) beside log-mel statistics (mean and standard deviation of
128 log-mel bands over time), so the numbers have a reference. Probes: multinomial logistic
regression (:mod:`music2latent2.probe`), penalty chosen on inner leave-one-soundfont-out folds
of the training soundfonts. Results are printed and written to a section of BENCHMARKS.md kept
per checkpoint (``--out``; ``--no-write`` only prints). See docs/mir.md.
"""

from __future__ import annotations

import argparse
import io
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import git_commit, replace_section  # noqa: E402

from music2latent2 import Music2Latent2  # noqa: E402
from music2latent2.devices import resolve_device  # noqa: E402
from music2latent2.hear import HearModel, get_scene_embeddings  # noqa: E402
from music2latent2.metrics import log_mel_spectrogram  # noqa: E402
from music2latent2.probe import evaluate_probe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_RATE = 44100

# (family, General MIDI program, name, lowest MIDI note, highest MIDI note)
INSTRUMENTS: Tuple[Tuple[str, int, str, int, int], ...] = (
    ("keyboard", 0, "acoustic grand piano", 33, 96), ("keyboard", 4, "electric piano", 33, 96),
    ("keyboard", 6, "harpsichord", 36, 89),
    ("plucked", 24, "nylon guitar", 40, 84), ("plucked", 25, "steel guitar", 40, 84),
    ("plucked", 46, "harp", 36, 96),
    ("bowed", 40, "violin", 55, 96), ("bowed", 41, "viola", 48, 84), ("bowed", 42, "cello", 36, 76),
    ("brass", 56, "trumpet", 54, 82), ("brass", 57, "trombone", 40, 72), ("brass", 60, "french horn", 41, 77),
    ("reed", 65, "alto sax", 49, 81), ("reed", 68, "oboe", 58, 91), ("reed", 71, "clarinet", 50, 91),
    ("flute", 73, "flute", 60, 96), ("flute", 74, "recorder", 60, 96), ("flute", 75, "pan flute", 60, 96),
)
CHORD_PROGRAMS = (0, 4, 16, 19, 24, 46, 48, 52, 61, 89)  # pianos, organs, guitar, harp, strings, choir, brass, pad
PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
# Extra soundfont beside the corpus's three (docs/corpus.md): FM synthesis, unlike any sample bank.
OPL3 = ("opl3-soundfont", "usr/share/sounds/sf2/OPL-3_FM_128M.sf2", "GPL-3+")

NOTE_ON_S, NOTE_S, GAP_S = 0.01, 0.55, 0.8  # note-on after the clip start, held for, silence after a clip


@dataclass
class Event:
    """One clip of the score: its notes, program, velocity and labels."""

    program: int
    notes: Tuple[int, ...]
    velocity: int
    labels: Dict[str, str] = field(default_factory=dict)


def note_score(rng: random.Random, notes_per_pitch_class: int) -> List[Event]:
    """Every instrument, every pitch class ``notes_per_pitch_class`` times, in random octaves of its range."""
    events = []
    for family, program, name, low, high in INSTRUMENTS:
        for pc in range(12):
            candidates = [n for n in range(low, high + 1) if n % 12 == pc]
            for _ in range(notes_per_pitch_class):
                events.append(Event(program, (rng.choice(candidates),), rng.randint(50, 110),
                                    {"pitch class": PITCH_CLASSES[pc], "instrument family": family,
                                     "instrument": name}))
    return events


def chord_score(rng: random.Random, variants: int) -> List[Event]:
    """Major and minor triads on every root, ``variants`` times each, in random voicings."""
    events = []
    for root in range(12):
        for quality, third in (("maj", 4), ("min", 3)):
            for _ in range(variants):
                low = 48 + (root - 48) % 12 + 12 * rng.randint(0, 1)  # the root, C3..B4
                notes = [low, low + third, low + 7]
                for _ in range(rng.randint(0, 2)):  # inversion: the lowest note up an octave
                    notes = notes[1:] + [notes[0] + 12]
                if rng.random() < 0.5:
                    notes.insert(0, low - 12)  # a bass root under the triad
                events.append(Event(rng.choice(CHORD_PROGRAMS), tuple(notes), rng.randint(60, 100),
                                    {"chord": f"{PITCH_CLASSES[root]}:{quality}"}))
    return events


def score_midi(events: Sequence[Event], clip_seconds: float) -> bytes:
    """One MIDI file: each event on channel 0 at ``k * (clip + gap)`` s, with its own program change."""
    import mido

    ticks_per_second = 960  # 480 ticks per beat at the default 120 bpm
    timed: List[Tuple[int, int, "mido.Message"]] = []  # (tick, order, message); order keeps offs before ons
    for k, ev in enumerate(events):
        start = k * (clip_seconds + GAP_S)
        on, off = round((start + NOTE_ON_S) * ticks_per_second), round((start + NOTE_ON_S + NOTE_S) * ticks_per_second)
        timed.append((round(start * ticks_per_second), 1, mido.Message("program_change", program=ev.program)))
        for n in ev.notes:
            timed.append((on, 2, mido.Message("note_on", note=n, velocity=ev.velocity)))
            timed.append((off, 0, mido.Message("note_off", note=n, velocity=0)))
    # A no-op controller after the last clip: the renderer stops at the last event, and the last
    # note's release would be cut off without it.
    end = round(len(events) * (clip_seconds + GAP_S) * ticks_per_second)
    timed.append((end, 3, mido.Message("control_change", control=7, value=100)))
    track = mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=500_000)])
    last = 0
    for tick, _, msg in sorted(timed, key=lambda item: (item[0], item[1])):
        track.append(msg.copy(time=tick - last))
        last = tick
    buf = io.BytesIO()
    mido.MidiFile(ticks_per_beat=480, tracks=[track]).save(file=buf)
    return buf.getvalue()


def render_clips(events: Sequence[Event], soundfont: str, clip_samples: int,
                 rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Render the score with one soundfont -> ((N, clip_samples) float32 clips, (N,) bool audible).

    Each clip is peak-normalised to a random level between -20 and -3 dBFS; a clip the
    soundfont leaves silent (peak below -80 dBFS) is marked not audible.
    """
    from music2latent2.training.corpus.midi import render_midi

    clip_seconds = clip_samples / SAMPLE_RATE
    audio = render_midi(score_midi(events, clip_seconds), soundfont)  # (T,) mono 44.1 kHz
    clips = np.zeros((len(events), clip_samples), np.float32)
    for k in range(len(events)):
        start = round(k * (clip_seconds + GAP_S) * SAMPLE_RATE)
        piece = audio[start:start + clip_samples]
        clips[k, :len(piece)] = piece
    peaks = np.abs(clips).max(axis=1)
    audible = peaks > 1e-4
    levels = 10 ** (rng.uniform(-20, -3, len(events)) / 20)
    clips[audible] *= (levels[audible] / peaks[audible])[:, None]
    return clips, audible


def default_soundfonts(cache: Path) -> List[str]:
    """The four sf2 General MIDI banks in Debian, downloaded and unpacked into ``cache`` once."""
    from music2latent2.training.corpus.debian import fetch_packages
    from music2latent2.training.corpus.sources import SOUNDFONTS

    fonts = [(s.package, s.path) for s in SOUNDFONTS] + [OPL3[:2]]
    trees = fetch_packages([package for package, _ in fonts], cache)
    return [str(trees[package] / path) for package, path in fonts]


def logmel_stats(clips: np.ndarray, batch: int = 256) -> np.ndarray:
    """(N, T) clips -> (N, 256): mean and standard deviation over time of 128 log10-mel bands."""
    out = []
    for i in range(0, len(clips), batch):
        mel = log_mel_spectrogram(torch.from_numpy(clips[i:i + batch]), SAMPLE_RATE, 2048, 512, 128)  # (n, 128, F)
        out.append(torch.cat([mel.mean(-1), mel.std(-1)], dim=1).numpy())
    return np.concatenate(out).astype(np.float32)


@dataclass
class Dataset:
    """Rendered clips of one score: clips (N, T), soundfont index per clip (N,), labels per task."""

    clips: np.ndarray
    font: np.ndarray
    labels: Dict[str, List[str]]


def build(events: Sequence[Event], soundfonts: Sequence[str], clip_samples: int, seed: int) -> Tuple[Dataset, int]:
    """Render ``events`` with every soundfont; returns the dataset and the number of silent clips dropped."""
    rng = np.random.default_rng(seed)
    clips, fonts, keep_events, dropped = [], [], [], 0
    for f, font in enumerate(soundfonts):
        rendered, audible = render_clips(events, font, clip_samples, rng)
        clips.append(rendered[audible])
        fonts.append(np.full(int(audible.sum()), f))
        keep_events += [ev for ev, ok in zip(events, audible) if ok]
        dropped += int((~audible).sum())
    tasks = sorted(events[0].labels)
    return Dataset(np.concatenate(clips), np.concatenate(fonts),
                   {t: [ev.labels[t] for ev in keep_events] for t in tasks}), dropped


@dataclass
class TaskResult:
    task: str
    features: str
    classes: int
    accuracy: List[float]  # one per held-out soundfont
    auc: List[float]


def probe_task(x: np.ndarray, labels: Sequence[str], font: np.ndarray, task: str, features: str,
               seed: int, max_iter: int = 300) -> TaskResult:
    """Leave-one-soundfont-out probes; inner folds hold out each remaining soundfont in turn."""
    names = sorted(set(labels))
    y = np.array([names.index(label) for label in labels])
    accs, aucs = [], []
    fonts = np.unique(font)
    for held_out in fonts:
        train, test = np.flatnonzero(font != held_out), np.flatnonzero(font == held_out)
        train_fonts = font[train]
        inner = [(np.flatnonzero(train_fonts != v), np.flatnonzero(train_fonts == v)) for v in np.unique(train_fonts)]
        score = evaluate_probe(x[train], y[train], x[test], y[test], len(names),
                               validation=inner if len(inner) > 1 else (), seed=seed, max_iter=max_iter)
        accs.append(score.accuracy)
        aucs.append(score.macro_auc)
    return TaskResult(task, features, len(names), accs, aucs)


def table(results: Sequence[TaskResult], font_names: Sequence[str]) -> str:
    lines = ["| task | classes | chance | features | accuracy | macro AUC | accuracy per held-out soundfont ("
             + ", ".join(font_names) + ") |", "|---|---:|---:|---|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r.task} | {r.classes} | {1 / r.classes:.3f} | {r.features} | {np.mean(r.accuracy):.3f} | "
                     f"{np.mean(r.auc):.3f} | " + " / ".join(f"{a:.2f}" for a in r.accuracy) + " |")
    return "\n".join(lines)


def model_label(network: Music2Latent2, given: Optional[str]) -> Tuple[str, str]:
    """(label for the table, BENCHMARKS.md section key): checkpoint name and sha256 prefix when known."""
    source = network.source
    if source is None:
        return given or "model", f"mir-probe {given or 'model'}"
    name = source.name.removeprefix("default:")
    if "/" in name and Path(name).exists():  # a local path: its file or folder name is enough
        name = Path(name).name
    return f"{name} (sha256 {source.sha256[:12]})", f"mir-probe {name} {source.sha256[:12]}"


def timed(times: Dict[str, float], what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, its wall time recorded in ``times[what]`` and printed."""
    start = time.perf_counter()
    out = fn(*args)
    times[what] = time.perf_counter() - start
    print(f"{what}: {times[what]:.1f} s", flush=True)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint file/folder, manifest name or repo id (default: bundled)")
    p.add_argument("--soundfont", action="append", help=".sf2 file (repeat, at least 2; default: 4 from Debian)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "music2latent2" / "debian"),
                   help="where Debian soundfont packages are downloaded and unpacked")
    p.add_argument("--notes-per-pitch-class", type=int, default=1, help="per instrument and soundfont")
    p.add_argument("--chord-variants", type=int, default=4, help="per chord and soundfont")
    p.add_argument("--untrained", action="store_true", help="also probe the same architecture with random weights")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps (default: CUDA when available)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--probe-iterations", type=int, default=300, help="L-BFGS iterations per probe fit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.soundfont is not None and len(args.soundfont) < 2:
        p.error("leave-one-soundfont-out needs at least 2 --soundfont files")
    for font in args.soundfont or ():
        if not Path(font).is_file():
            p.error(f"soundfont not found: {font}")
    try:
        device = resolve_device(args.device)  # default: CUDA when available
    except (TypeError, ValueError) as err:
        p.error(str(err))
    times: Dict[str, float] = {}
    started = time.perf_counter()
    try:
        soundfonts = args.soundfont or default_soundfonts(Path(args.cache))
    except RuntimeError as err:  # CorpusError: no apt-get, no network, a package missing
        print(f"error: cannot fetch the default soundfonts: {err}; or pass --soundfont files", file=sys.stderr)
        return 2
    font_names = [Path(f).stem for f in soundfonts]
    network = Music2Latent2.from_pretrained(args.model)
    models = {"ours": HearModel(network, max_batch_size=args.max_batch_size)}
    if args.untrained:
        torch.manual_seed(args.seed)
        models["untrained"] = HearModel(Music2Latent2(network.config), max_batch_size=args.max_batch_size)
    for m in models.values():
        m.to(device)
    clip_samples = network.config.chunk_samples
    rng = random.Random(args.seed)
    scores = {"notes": note_score(rng, args.notes_per_pitch_class), "chords": chord_score(rng, args.chord_variants)}
    label, key = model_label(network, args.model)
    results: List[TaskResult] = []
    summary = []
    for name, events in scores.items():
        data, dropped = timed(times, f"render {name}", build, events, soundfonts, clip_samples, args.seed)
        summary.append(f"{name}: {len(data.clips)} clips ({len(data.clips) * clip_samples / SAMPLE_RATE / 60:.1f} min)"
                       + (f", {dropped} silent clips dropped" if dropped else ""))
        features = {"log-mel stats": timed(times, f"log-mel {name}", logmel_stats, data.clips)}
        wav = torch.from_numpy(data.clips).to(device)
        for model_name, model in models.items():
            features[model_name] = timed(times, f"features {model_name} {name}", get_scene_embeddings, wav,
                                         model).cpu().numpy()
        for task, labels in data.labels.items():
            for feat_name, x in features.items():
                shown = {"ours": label, "untrained": "same network, untrained"}.get(feat_name, feat_name)
                results.append(timed(times, f"probe {task} / {feat_name}", probe_task, np.asarray(x), labels,
                                     data.font, task, shown, args.seed, args.probe_iterations))
    report = table(results, font_names)
    print(report)

    def stage(*prefixes: str) -> float:
        return sum(v for k, v in times.items() if k.startswith(prefixes))

    command = "python benchmarks/mir_probe.py " + " ".join(argv if argv is not None else sys.argv[1:])
    body = "\n".join([
        f"## MIR probes: {label}", "",
        f"Generated by `benchmarks/mir_probe.py` (see docs/mir.md). Command: `{command.strip()}`", "",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; commit {git_commit()}; torch {torch.__version__}; "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; "
        f"device {device}; seed {args.seed}",
        "- data: " + "; ".join(summary) + f"; soundfonts: {', '.join(font_names)}",
        f"- wall time: {time.perf_counter() - started:.0f} s, of which rendering {stage('render'):.0f} s, features "
        f"{stage('features', 'log-mel'):.0f} s, probes {stage('probe'):.0f} s (the rest: model loading, and the "
        "soundfont download on a first run)",
        "- accuracy and macro AUC (one-vs-rest ROC AUC averaged over classes) are means over the held-out "
        "soundfonts; each probe is trained on the other soundfonts",
        "", report])
    if not args.no_write:
        replace_section(Path(args.out), key, body)
        print(f"wrote section {key!r} of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
