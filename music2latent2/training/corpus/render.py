"""Renderers that turn non-audio sources into mono 44.1 kHz audio: tracker modules (openmpt123),
LMMS projects (lmms), synthetic speech (espeak-ng). Each runs the program in a temporary folder,
so nothing is written beside the package files (a second build reads them unchanged)."""

from __future__ import annotations

import os
import random
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ...audio import load_audio
from .audiofiles import SAMPLE_RATE, to_mono

TRACKER_SUFFIXES = (".mod", ".xm", ".it", ".s3m", ".mtm", ".669", ".med", ".okt", ".stm", ".umx", ".ult", ".far")
# Longest render of one module or project: some loop forever, and the caps decide what is kept.
MAX_RENDER_SECONDS = 600


class RenderError(RuntimeError):
    """A program could not render a source; the message says which and why."""


def _read_wav(path: Path, what: str) -> np.ndarray:
    try:
        data, sr = load_audio(path)
    except ValueError as err:
        raise RenderError(f"{what}: no readable output ({err})") from None
    return to_mono(data, sr)


def render_tracker(module: Path, timeout: float = 300.0) -> np.ndarray:
    """Render a tracker module (.mod/.xm/.it/.s3m/...) with openmpt123 -> (T,) mono 44.1 kHz."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.wav"
        # Float output: no 16-bit clipping, and no random dither, so a rebuild renders the same samples.
        cmd = ["openmpt123", "--batch", "--quiet", "--samplerate", str(SAMPLE_RATE), "--channels", "1",
               "--float", "--end-time", str(MAX_RENDER_SECONDS), "--force", "-o", str(out), str(module)]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RenderError(f"openmpt123 took over {timeout:.0f} s on {module.name}") from None
        if res.returncode != 0 and not out.is_file():
            raise RenderError(f"openmpt123 failed on {module.name}: {res.stderr.strip()[-200:]}")
        return _read_wav(out, f"openmpt123 on {module.name}")


def render_lmms(project: Path, timeout: float = 900.0) -> np.ndarray:
    """Render an LMMS project (.mmp/.mmpz) headless -> (T,) mono 44.1 kHz.

    LMMS sometimes crashes while exiting after writing a complete file, so a non-zero exit
    with a readable output is accepted.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.wav"
        cmd = ["lmms"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allowroot")  # lmms refuses to run as root otherwise
        cmd += ["-r", str(project), "-o", str(out), "-f", "wav", "-s", str(SAMPLE_RATE)]
        env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "HOME": tmp}
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise RenderError(f"lmms took over {timeout:.0f} s on {project.name}") from None
        if not out.is_file():
            raise RenderError(f"lmms wrote nothing for {project.name} (exit {res.returncode})")
        return _read_wav(out, f"lmms on {project.name}")


WORDS = ("the a one every small quiet old bright river window garden music morning evening table letter "
         "city mountain voice story friend summer winter light water paper train station house road "
         "walks sings reads finds carries remembers opens follows watches builds writes hears keeps "
         "slowly softly again today tomorrow together under over near behind across through").split()
VOICES = ("en", "en-us", "en-gb-x-rp", "en-029", "de", "fr", "es", "it", "nl", "pl")
VARIANTS = ("m1", "m3", "m5", "f1", "f2", "f4", "klatt", "klatt3")


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16))).capitalize() + "."


def render_espeak(seed: int, seconds: float = 35.0) -> np.ndarray:
    """About ``seconds`` of synthetic speech (espeak-ng: random voice, rate, pitch) -> (T,) mono 44.1 kHz."""
    rng = random.Random(seed)
    words_needed = int(seconds * 1.7)  # measured: ~1.7 words a second over these voices and rates
    text, count = [], 0
    while count < words_needed:
        sentence = _sentence(rng)
        text.append(sentence)
        count += len(sentence.split())
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "s.wav"
        cmd = ["espeak-ng", "-v", f"{rng.choice(VOICES)}+{rng.choice(VARIANTS)}", "-s", str(rng.randint(120, 190)),
               "-p", str(rng.randint(20, 80)), "-g", str(rng.randint(2, 12)), "-w", str(wav), " ".join(text)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if res.returncode != 0 or not wav.is_file():
            raise RenderError(f"espeak-ng failed: {res.stderr.strip()[-200:]}")
        return _read_wav(wav, "espeak-ng")
