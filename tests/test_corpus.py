"""scripts/make_corpus.py: MIDI variation, mixing, rendering (when the train extras are installed)."""

import importlib.util
import io
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_corpus", ROOT / "scripts" / "make_corpus.py")
make_corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_corpus)


def _midi_bytes() -> bytes:
    mido = pytest.importorskip("mido")
    mid = mido.MidiFile(ticks_per_beat=480)
    track = mido.MidiTrack()
    mid.tracks.append(track)
    for k, note in enumerate((60, 64, 67, 72)):
        track.append(mido.Message("note_on", channel=0, note=note, velocity=80, time=0 if k == 0 else 10))
        track.append(mido.Message("note_off", channel=0, note=note, velocity=0, time=470))
    buf = io.BytesIO()
    mid.save(file=buf)
    return buf.getvalue()


def test_vary_midi_changes_instrument_pitch_and_tempo():
    mido = pytest.importorskip("mido")
    out, info = make_corpus.vary_midi(_midi_bytes(), random.Random(3))
    mid = mido.MidiFile(file=io.BytesIO(out))
    msgs = [m for t in mid.tracks for m in t]
    programs = [m.program for m in msgs if m.type == "program_change"]
    assert len(programs) == 1 and programs[0] in make_corpus.GM_MELODIC + make_corpus.GM_BASS
    notes = [m.note for m in msgs if m.type == "note_on"]
    assert notes == [n + info["transpose"] for n in (60, 64, 67, 72)]
    tempo = [m.tempo for m in msgs if m.type == "set_tempo"][0]
    assert tempo == int(500000 / info["tempo"])


def test_mix_trims_silence_and_sets_level():
    data = np.zeros((44100, 2), np.float32)
    data[1000:30000, 0] = 0.5
    out = make_corpus._mix(data, random.Random(0))
    assert out.shape == (29000, 2)
    assert 10 ** (-14 / 20) - 1e-4 <= np.abs(out).max() <= 10 ** (-1 / 20) + 1e-4


def test_copy_real_resamples_to_flac(tmp_path):
    src = tmp_path / "src" / "sub"
    src.mkdir(parents=True)
    sf.write(str(src / "a.wav"), 0.1 * np.ones(16000, np.float32), 16000)
    (src / "a.LICENSE.txt").write_text("CC0")
    seconds = make_corpus.copy_real(tmp_path / "src", tmp_path / "out")
    assert seconds == pytest.approx(1.0, abs=1e-3)
    info = sf.info(str(tmp_path / "out" / "sub" / "a.flac"))
    assert info.samplerate == 44100 and (tmp_path / "out" / "sub" / "a.LICENSE.txt").is_file()


def test_render_task_writes_audible_flac(tmp_path):
    pytest.importorskip("midirenderer")
    soundfont = make_corpus.default_soundfont()
    if soundfont is None:
        pytest.skip("no General MIDI soundfont (pip install pretty_midi)")
    midi = tmp_path / "tune.mid"
    midi.write_bytes(_midi_bytes())
    path, seconds, _ = make_corpus._render_task((str(midi), str(tmp_path), 1, str(soundfont), 30.0, None))
    assert path and seconds > 1.0
    data, sr = sf.read(path)
    assert sr == 44100 and data.shape[1] == 2 and np.abs(data).max() > 0.05
