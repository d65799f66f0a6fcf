"""Synthetic music: music21's score corpus -> MIDI -> varied General MIDI renders.

Every render draws its own instruments per channel, transposition, tempo and velocity, and a
soundfont from several, so one score gives several different-sounding tracks. Pieces shorter
than the minimum track length are joined into medleys; some renders get a second piece layered
underneath. Rendering uses midirenderer (PyPI; a Rust synthesizer, ~30-60x real time per core
depending on the soundfont, measured in docs/corpus.md).
"""

from __future__ import annotations

import io
import os
import random
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, cast

import numpy as np
import soundfile as sf

from .audiofiles import to_mono, trim_silence

# General MIDI programs grouped so a random pick stays plausible for melodic lines.
GM_MELODIC = (list(range(0, 8)) + list(range(16, 24)) + list(range(24, 32)) + list(range(40, 48))
              + list(range(48, 56)) + list(range(56, 64)) + list(range(64, 80)) + list(range(80, 88)))
GM_BASS = list(range(32, 40)) + [42, 43, 58, 70]
SCORE_SUFFIXES = (".krn", ".abc", ".mxl", ".xml", ".musicxml")


def export_score(task: Tuple[str, str, int]) -> List[str]:
    """One music21 corpus file -> up to ``max_per_file`` .mid files in ``out_dir`` (written atomically)."""
    src, out_dir, max_per_file = task
    from music21 import converter, stream

    written = []
    try:
        parsed = converter.parse(src)
        scores = list(parsed.scores)[:max_per_file] if isinstance(parsed, stream.Opus) else [parsed]
        stem = "_".join(Path(src).with_suffix("").parts[-2:])
        for k, score in enumerate(scores):
            dst = Path(out_dir) / f"{stem}_{k}.mid"
            tmp = dst.with_name("." + dst.name + ".partial")
            score.write("midi", fp=str(tmp))
            os.replace(tmp, dst)
            written.append(str(dst))
    except Exception as err:  # noqa: BLE001 - music21 cannot parse every file of its corpus
        print(f"skip {src}: {type(err).__name__}: {err}", file=sys.stderr)
    return written


def score_paths(seed: int) -> List[str]:
    """music21's corpus files, shuffled by ``seed``."""
    from music21 import corpus

    paths = sorted(str(p) for p in corpus.getPaths() if Path(str(p)).suffix in SCORE_SUFFIXES)
    random.Random(seed).shuffle(paths)
    return paths


def vary_midi(midi_bytes: bytes, rng: random.Random) -> Tuple[bytes, Dict[str, float]]:
    """Random instruments, transposition (+-5), tempo (x0.75-1.3) and velocity for one render."""
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
                msg.program = programs[cast(int, ch)]  # a program_change always has a channel
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


_SOUNDFONT_BYTES: Dict[str, bytes] = {}


def render_midi(midi_bytes: bytes, soundfont: str) -> np.ndarray:
    """MIDI bytes -> (T,) mono 44.1 kHz with midirenderer (the soundfont is read once per process)."""
    import midirenderer

    if soundfont not in _SOUNDFONT_BYTES:
        _SOUNDFONT_BYTES[soundfont] = Path(soundfont).read_bytes()
    wav = midirenderer.render_wave_from(_SOUNDFONT_BYTES[soundfont], midi_bytes)
    data, sr = sf.read(io.BytesIO(bytes(wav)), dtype="float32", always_2d=True)  # (T, C)
    return to_mono(data.T, sr)


def render_medley(midi_paths: Sequence[str], soundfont: str, seed: int, min_seconds: float,
                  layer_prob: float = 0.2) -> Tuple[np.ndarray, List[str]]:
    """Render pieces from ``midi_paths`` in order, joined by 0.5 s gaps, until ``min_seconds``.

    Each piece gets its own variation; with probability ``layer_prob`` the next piece is layered
    under the first instead. Returns the audio (peak between -14 and -1 dBFS) and the pieces used.
    """
    rng = random.Random(seed)
    parts: List[np.ndarray] = []
    used: List[str] = []
    total = 0
    gap = np.zeros(22050, np.float32)
    queue = list(midi_paths)
    # Half a second over the minimum: the medley's edges are trimmed again when it is written.
    while queue and total < (min_seconds + 0.5) * 44100:
        path = queue.pop(0)
        try:
            audio = trim_silence(render_midi(vary_midi(Path(path).read_bytes(), rng)[0], soundfont))
        except Exception as err:  # noqa: BLE001 - a score music21 wrote but the synth rejects
            print(f"skip {Path(path).name}: {type(err).__name__}: {err}", file=sys.stderr)
            continue
        if audio.size == 0:
            continue
        used.append(Path(path).name)
        if queue and rng.random() < layer_prob:  # a second piece under this one
            other = queue.pop(0)
            try:
                under = trim_silence(render_midi(vary_midi(Path(other).read_bytes(), rng)[0], soundfont))
                n = min(len(audio), len(under))
                audio = audio.copy()
                audio[:n] += rng.uniform(0.2, 0.6) * under[:n]
                used.append(Path(other).name)
            except Exception:  # noqa: BLE001
                pass
        audio = audio * (10 ** (rng.uniform(-14, -1) / 20) / max(float(np.abs(audio).max()), 1e-6))
        total += (len(gap) if parts else 0) + len(audio)  # the gap after the last piece is dropped
        parts += [audio.astype(np.float32), gap]
    if not parts:
        return np.zeros(0, np.float32), used
    return np.concatenate(parts[:-1]), used
