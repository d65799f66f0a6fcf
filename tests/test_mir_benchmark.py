"""benchmarks/mir_probe.py: the rendered scores carry their labels, and the report lands in its own section."""

from __future__ import annotations

import importlib.util
import random
import shutil
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from conftest import make_tiny

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    pytest.importorskip("midirenderer")
    pytest.importorskip("mido")
    return _load("mir_probe")


@pytest.fixture(scope="module")
def soundfont() -> Path:
    pretty_midi = pytest.importorskip("pretty_midi")
    path = Path(pretty_midi.__file__).parent / "TimGM6mb.sf2"  # the wheel carries this GM bank
    if not path.is_file():
        pytest.skip("pretty_midi's TimGM6mb.sf2 is missing")
    return path


def test_scores_cover_every_label_evenly(bench: ModuleType) -> None:
    notes = bench.note_score(random.Random(0), 2)
    assert len(notes) == len(bench.INSTRUMENTS) * 12 * 2
    for ev in notes:
        (note,) = ev.notes
        family, program, name, low, high = next(i for i in bench.INSTRUMENTS if i[1] == ev.program)
        assert low <= note <= high and bench.PITCH_CLASSES[note % 12] == ev.labels["pitch class"]
        assert ev.labels["instrument family"] == family and ev.labels["instrument"] == name
    chords = bench.chord_score(random.Random(0), 3)
    assert len(chords) == 24 * 3
    for ev in chords:
        root, quality = ev.labels["chord"].split(":")
        pcs = {n % 12 for n in ev.notes}
        r = bench.PITCH_CLASSES.index(root)
        assert pcs == {r, (r + (4 if quality == "maj" else 3)) % 12, (r + 7) % 12}
        assert ev.program in bench.CHORD_PROGRAMS


def test_rendered_clips_hold_their_notes(bench: ModuleType, soundfont: Path) -> None:
    """Each clip's strongest partial is its own note or an octave of it: the score and the slicing line up."""
    events = [bench.Event(73, (n,), 100, {}) for n in (60, 67, 72, 64)]  # flute: a clean fundamental
    clips, audible = bench.render_clips(events, str(soundfont), 32768, np.random.default_rng(0))
    assert clips.shape == (4, 32768) and audible.all()
    peaks = np.abs(clips).max(1)
    assert (peaks > 10 ** (-20.5 / 20)).all() and (peaks < 10 ** (-2.9 / 20)).all()
    for clip, ev in zip(clips, events):
        spectrum = np.abs(np.fft.rfft(clip * np.hanning(len(clip))))
        f0 = 440.0 * 2 ** ((ev.notes[0] - 69) / 12)
        peak_hz = np.argmax(spectrum) * 44100 / len(clip)
        semitones = 12 * np.log2(peak_hz / f0)
        assert abs(semitones - 12 * round(semitones / 12)) < 0.5  # within a quarter tone of the pitch class


def test_benchmark_runs_and_writes_its_section(bench: ModuleType, soundfont: Path, tmp_path: Path) -> None:
    make_tiny(seed=7).save_pretrained(tmp_path / "tiny")
    fonts = []
    for name in ("a", "b"):  # two copies stand in for two soundfonts (leave-one-out needs two)
        fonts.append(tmp_path / f"{name}.sf2")
        shutil.copy(soundfont, fonts[-1])
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nhand-written notes\n")
    argv = ["--model", str(tmp_path / "tiny"), "--soundfont", str(fonts[0]), "--soundfont", str(fonts[1]),
            "--chord-variants", "2", "--probe-iterations", "25", "--out", str(out)]
    assert bench.main(argv) == 0
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nhand-written notes\n")
    assert text.count("<!-- begin: mir-probe tiny ") == 1 and text.count("<!-- end: mir-probe tiny ") == 1
    rows = [line for line in text.splitlines() if line.startswith("| ") and "classes" not in line]
    tasks = {row.split(" | ")[0].strip("| ") for row in rows}
    assert tasks == {"pitch class", "instrument family", "instrument", "chord"}
    assert len(rows) == 8  # 4 tasks x (ours, log-mel stats)
    for row in rows:
        cells = row.strip("|").split(" | ")
        accuracy, auc = float(cells[4]), float(cells[5])
        assert 0 <= accuracy <= 1 and 0 <= auc <= 1
    # With the same bank on both sides, log-mel statistics find the pitch class: labels follow the audio.
    logmel_pitch = next(r for r in rows if r.startswith("| pitch class") and "log-mel" in r)
    assert float(logmel_pitch.strip("|").split(" | ")[4]) > 0.5


def test_benchmark_refuses_one_soundfont(bench: ModuleType, soundfont: Path, capsys: pytest.CaptureFixture,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--soundfont", str(soundfont), "--no-write"])
    assert "at least 2 --soundfont" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--soundfont", str(soundfont), "--soundfont", "/nonexistent.sf2", "--no-write"])
    assert "soundfont not found: /nonexistent.sf2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--soundfont", str(soundfont), "--soundfont", str(soundfont), "--device", "nonsense"])
    assert "not a device name PyTorch knows" in capsys.readouterr().err
    from music2latent2.training.corpus.sources import CorpusError

    def no_apt(cache: Path) -> list:
        raise CorpusError("apt-get not found: the corpus builder needs a Debian or Ubuntu machine")

    monkeypatch.setattr(bench, "default_soundfonts", no_apt)
    assert bench.main(["--no-write"]) == 2
    err = capsys.readouterr().err
    assert "cannot fetch the default soundfonts: apt-get not found" in err and "--soundfont" in err


def test_sections_are_replaced_in_place(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        sections = _load("bench_report")
    finally:
        sys.path.remove(str(BENCHMARKS))
    path = tmp_path / "B.md"
    sections.replace_section(path, "one", "first")
    sections.replace_section(path, "two", "second")
    sections.replace_section(path, "one", "first, again")
    text = path.read_text()
    assert text.index("first, again") < text.index("second") and "first\n" not in text
    assert text.startswith("# Benchmarks\n")
    path.write_text(text.replace("<!-- end: one -->", ""))
    broken = path.read_text()
    with pytest.raises(ValueError, match="unpaired"):
        sections.replace_section(path, "one", "x")
    assert path.read_text() == broken  # left untouched
