"""Corpus builder pieces: audio helpers, the band-limit detector, planning, MIDI variation and renders."""

import io
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from music2latent2.training.corpus.audiofiles import bandwidth_hz, normalize_peak, read_mono, trim_silence, write_vorbis
from music2latent2.training.corpus.midi import GM_BASS, GM_MELODIC, render_medley, vary_midi
from music2latent2.training.corpus.plan import Track, hold_out, select, slug

SR = 44100


def _lowpassed_noise(cutoff_hz: float, seconds: float = 3.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    spec = np.fft.rfft(rng.standard_normal(int(seconds * SR)))
    spec[np.fft.rfftfreq(int(seconds * SR), 1 / SR) > cutoff_hz] = 0
    audio = np.fft.irfft(spec, int(seconds * SR))
    return (0.3 * audio / np.abs(audio).max()).astype(np.float32)


def midi_bytes(notes=(60, 64, 67, 72), beats: float = 1.0) -> bytes:
    mido = pytest.importorskip("mido")
    mid = mido.MidiFile(ticks_per_beat=480)
    track = mido.MidiTrack()
    mid.tracks.append(track)
    for k, note in enumerate(notes):
        track.append(mido.Message("note_on", channel=0, note=note, velocity=80, time=0 if k == 0 else 10))
        track.append(mido.Message("note_off", channel=0, note=note, velocity=0, time=int(480 * beats) - 10))
    buf = io.BytesIO()
    mid.save(file=buf)
    return buf.getvalue()


@pytest.mark.parametrize("cutoff", [6000, 11000, 15000, 19000])
def test_bandwidth_reads_the_lowpass_cutoff(cutoff):
    measured = bandwidth_hz(_lowpassed_noise(cutoff), SR)
    assert abs(measured - cutoff) < 1500, (cutoff, measured)


def test_bandwidth_ignores_an_isolated_tone_above_the_cutoff():
    audio = _lowpassed_noise(10000)
    audio += 0.05 * np.sin(2 * np.pi * 18000 * np.arange(len(audio)) / SR).astype(np.float32)
    assert bandwidth_hz(audio, SR) < 12000


def test_trim_and_normalize():
    audio = np.zeros(1000, np.float32)
    audio[100:200] = 2.0
    trimmed = trim_silence(audio)
    assert trimmed.shape == (100,)
    assert np.abs(normalize_peak(trimmed)).max() == pytest.approx(0.9)
    quiet = np.full(10, 0.01, np.float32)
    assert np.abs(normalize_peak(quiet)).max() == pytest.approx(0.9)
    mastered = np.full(10, 0.5, np.float32)
    assert np.array_equal(normalize_peak(mastered), mastered)  # left as mastered
    assert trim_silence(np.zeros(5, np.float32)).size == 0


def test_read_mono_sums_stems_and_resamples(tmp_path):
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    sf.write(str(a), np.full((48000, 2), 0.1, np.float32), 48000)
    sf.write(str(b), np.full(SR // 2, 0.2, np.float32), SR)
    mix, rate = read_mono([a, b])
    assert rate == 44100 and abs(len(mix) - SR) <= 2
    assert mix[1000] == pytest.approx(0.3, abs=1e-3) and mix[-1000] == pytest.approx(0.1, abs=1e-3)


def test_write_vorbis_is_atomic_and_readable(tmp_path):
    path = tmp_path / "sub" / "x.ogg"
    write_vorbis(path, _lowpassed_noise(16000, 2.0))
    info = sf.info(str(path))
    assert info.samplerate == SR and info.channels == 1 and info.duration == pytest.approx(2.0, abs=0.01)
    assert [p.name for p in path.parent.iterdir()] == ["x.ogg"]


def _tracks(source: str, n: int, seconds: float) -> list:
    return [Track("music", source, "GPL", "files", (f"/{source}/{i}",), f"{source}/{i}.ogg", seconds)
            for i in range(n)]


def test_select_fills_small_sources_first_and_caps_large_ones():
    by_source = {"big": _tracks("big", 100, 100.0), "mid": _tracks("mid", 30, 100.0),
                 "small": _tracks("small", 5, 100.0)}
    chosen = select(by_source, hours=5000 / 3600, per_source_hours=2500 / 3600, seed=0)
    per = {s: sum(t.seconds for t in chosen if t.source == s) for s in by_source}
    assert per["small"] == 500  # everything it has
    assert abs(per["mid"] - per["big"]) <= 100  # equal shares of the rest, to one track
    assert per["mid"] == pytest.approx(2250, abs=100) and per["big"] == pytest.approx(2250, abs=100)
    assert sum(per.values()) == pytest.approx(5000, abs=100)
    capped = select(by_source, hours=100.0, per_source_hours=1000 / 3600, seed=0)
    assert {s: sum(t.seconds for t in capped if t.source == s) for s in by_source} == \
        {"big": 1000, "mid": 1000, "small": 500}
    assert len({t.name for t in chosen}) == len(chosen)  # no track twice
    assert select(by_source, 1.0, 1.0, seed=0) == select(by_source, 1.0, 1.0, seed=0)


def test_hold_out_takes_whole_tracks_and_leaves_every_source_training():
    tracks = _tracks("a", 40, 60.0) + _tracks("b", 1, 60.0) + _tracks("c", 10, 60.0)
    split = hold_out(tracks, 0.1, seed=1)
    valid = [t for t in split if t.split == "valid"]
    assert sum(t.seconds for t in valid) >= 0.1 * sum(t.seconds for t in tracks)
    assert all(t.relpath.startswith("valid/music/") for t in valid)
    assert all(any(t.source == s and t.split == "train" for t in split) for s in "abc")
    assert [replace_split(t) for t in split] == tracks  # only the split changed


def replace_split(track: Track) -> Track:
    from dataclasses import replace

    return replace(track, split="train")


def test_slug():
    assert slug("Côte d'Azur / 2 (live).ogg") == "C_te_d_Azur_2_live_.ogg"
    assert slug("...") == "track" and len(slug("x" * 300)) == 80


def test_vary_midi_changes_instrument_pitch_and_tempo():
    mido = pytest.importorskip("mido")
    out, info = vary_midi(midi_bytes(), random.Random(3))
    mid = mido.MidiFile(file=io.BytesIO(out))
    msgs = [m for t in mid.tracks for m in t]
    programs = [m.program for m in msgs if m.type == "program_change"]
    assert len(programs) == 1 and programs[0] in GM_MELODIC + GM_BASS
    notes = [m.note for m in msgs if m.type == "note_on"]
    assert notes == [n + info["transpose"] for n in (60, 64, 67, 72)]
    tempo = [m.tempo for m in msgs if m.type == "set_tempo"][0]
    assert tempo == int(500000 / info["tempo"])


def pretty_midi_soundfont() -> Path:
    pretty_midi = pytest.importorskip("pretty_midi")
    pytest.importorskip("midirenderer")
    path = Path(pretty_midi.__file__).parent / "TimGM6mb.sf2"
    if not path.is_file():
        pytest.skip("pretty_midi ships no TimGM6mb.sf2")
    return path


def test_render_medley_joins_pieces_until_the_minimum(tmp_path):
    soundfont = pretty_midi_soundfont()
    pieces = []
    for i in range(6):
        pieces.append(tmp_path / f"p{i}.mid")
        pieces[-1].write_bytes(midi_bytes(notes=tuple(60 + i + k for k in range(8))))
    audio, used = render_medley([str(p) for p in pieces], str(soundfont), seed=0, min_seconds=8.0)
    assert len(audio) >= 8.0 * SR and np.isfinite(audio).all()
    assert 10 ** (-14 / 20) - 1e-3 <= np.abs(audio).max() <= 10 ** (-1 / 20) + 1e-3
    assert 2 <= len(used) <= 6 and set(used) <= {p.name for p in pieces}
    again, _ = render_medley([str(p) for p in pieces], str(soundfont), seed=0, min_seconds=8.0)
    assert np.array_equal(audio, again)  # a seed gives the same render
