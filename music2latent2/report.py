"""The evaluation report: one self-contained ``index.html`` a person can look at and listen to.

``python -m music2latent2.evaluate --data DIR --report OUT`` writes into OUT:

- ``index.html``: everything embedded (pictures as PNG, audio as FLAC or WAV ``data:`` URIs, CSS
  and a few lines of script inline), so it opens offline, can be mailed or archived, and fetches
  nothing when viewed;
- ``results.json`` / ``results.md``: the numbers, as ``--out`` writes them, plus each file's key
  (its path under DIR) and the path of its reconstruction;
- ``reconstructions/<key>.flac``: the decoded audio (24-bit, at the model's rate), which
  ``--compare OUT`` reads back to draw another report's reconstructions on this report's scales.

A report is built in a hidden folder next to OUT and renamed into place only when complete, so
an interrupted or failed run leaves an earlier report in OUT as it was, and OUT is only ever
replaced by a finished report (a folder that is not a report is never overwritten).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import soundfile as sf

from . import report_plots as plots
from .audio import load_audio

__all__ = ["REPORT_AUDIO_FORMATS", "RECONSTRUCTIONS", "SPEED_KEYS", "ReportError", "PriorReport", "load_report",
           "ReportWriter", "overall_speed", "upgrade_speed_keys"]

REPORT_AUDIO_FORMATS = ("flac", "wav", "none")
RECONSTRUCTIONS = "reconstructions"
_MIME = {"flac": "audio/flac", "wav": "audio/wav"}

# metric key -> (label, unit, +1 higher is better / -1 lower is better / 0 closer to 0 is better)
METRIC_INFO: Dict[str, Tuple[str, str, int]] = {
    "si_sdr": ("SI-SDR", "dB", 1), "logmel_distance": ("log-mel distance", "", -1),
    "visqol": ("ViSQOL", "MOS-LQO, 1-5", 1), "level_db": ("level", "dB, recon - input", 0),
    "band_level_error_db": ("band level error", "dB, mean |band level|", -1),
    "encode_x_real_time": ("encode x real time", "audio s per compute s, higher is faster", 1),
    "decode_x_real_time": ("decode x real time", "audio s per compute s, higher is faster", 1)}

# Speeds in "x real time" (audio seconds per compute second), and the keys older results hold
# instead: real-time factors, compute seconds per audio second (their inverse).
SPEED_KEYS = ("encode_x_real_time", "decode_x_real_time")
_RTF_KEYS = {"encode_x_real_time": "encode_rtf", "decode_x_real_time": "decode_rtf"}


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")


def overall_speed(rows: Sequence[Dict[str, Any]], key: str) -> Optional[float]:
    """All the audio over all the compute time of the rows that have ``key`` (x real time): the
    speed of the whole evaluation, which a mean of per-file ratios is not (short files would weigh
    as much as long ones). None if no row has it."""
    timed = [(r["seconds"], r["seconds"] / r[key]) for r in rows
             if _positive(r.get(key)) and _positive(r.get("seconds"))]
    if not timed:
        return None
    return sum(a for a, _ in timed) / sum(c for _, c in timed)


def upgrade_speed_keys(results: Dict[str, Any]) -> Dict[str, Any]:
    """Give results written before the speeds were in x real time (``encode_rtf``/``decode_rtf``:
    compute seconds per audio second) the current keys, 1 / RTF, in place; returns ``results``.
    Results that have the current keys are left as they are."""
    rows = [r for r in results.get("files", []) if isinstance(r, dict)]
    mean = results.get("mean") if isinstance(results.get("mean"), dict) else None
    for key, old in _RTF_KEYS.items():
        for row in rows:
            if old in row and key not in row:
                rtf = row.pop(old)
                row[key] = 1.0 / rtf if _positive(rtf) else None
        if mean is not None and old in mean and key not in mean:
            rtf = mean.pop(old)
            mean[key] = overall_speed(rows, key) if any(_positive(r.get(key)) for r in rows) else (
                1.0 / rtf if _positive(rtf) else None)
    return results


class ReportError(ValueError):
    """A report folder that cannot be written, or a ``--compare`` folder that is not a report."""


@dataclass
class PriorReport:
    """A finished report read back for ``--compare``: its results and where its audio is."""

    path: Path
    results: Dict[str, Any]
    rows: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # key -> per-file row

    def reconstruction(self, key: str) -> Tuple[np.ndarray, int]:
        """The report's reconstruction of ``key``: ((C, T) float32, sample rate)."""
        return load_audio(self.path / self.rows[key]["reconstruction"])


def load_report(path: str | os.PathLike) -> PriorReport:
    """Read a report folder written by ``--report`` (for ``--compare``); ReportError if it is not one."""
    folder = Path(path)
    results_file = folder / "results.json"
    if not results_file.is_file():
        raise ReportError(f"--compare {folder}: no results.json there; name a folder written by --report")
    try:
        results = upgrade_speed_keys(json.loads(results_file.read_text(encoding="utf-8")))
        rows = {r["key"]: r for r in results["files"] if r.get("reconstruction")}
    except (ValueError, KeyError, TypeError) as err:
        raise ReportError(f"--compare {folder}: results.json is not a report's ({type(err).__name__}: {err}); "
                          "name a folder written by --report") from err
    if not rows:
        raise ReportError(f"--compare {folder}: its results.json lists no reconstructions (written by --out, not "
                          "--report?)")
    missing = [r["reconstruction"] for r in rows.values() if not (folder / r["reconstruction"]).is_file()]
    if missing:
        raise ReportError(f"--compare {folder}: {len(missing)} reconstruction(s) missing, e.g. {missing[0]}")
    return PriorReport(folder, results, rows)


REPORT_ENTRIES = frozenset({"index.html", "results.json", "results.md", RECONSTRUCTIONS})


def _is_report(folder: Path) -> bool:
    """An earlier report, and nothing else: replacing it loses nothing the user put there."""
    names = {p.name for p in folder.iterdir()}
    return {"index.html", "results.json"} <= names and names <= REPORT_ENTRIES


def _encode_audio(wav: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.clip(wav, -1, 1).T, sample_rate, format=fmt.upper(), subtype="PCM_16")
    return buf.getvalue()


def _data_uri(mime: str, payload: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


@dataclass
class _Entry:
    row: Dict[str, Any]
    mel_input: np.ndarray
    mel_recon: np.ndarray
    audio: Dict[str, bytes]  # "input" / "recon" / "other" -> encoded file
    mel_other: Optional[np.ndarray] = None
    other_row: Optional[Dict[str, Any]] = None
    other_note: str = ""


class ReportWriter:
    """Collects each evaluated file's audio and numbers, then writes the report folder.

    Use as a context manager: leaving it by an exception removes the unfinished report and
    leaves ``out`` untouched.

    Args:
        out: the report folder. It may be missing, empty, or an earlier report (replaced whole
            when the new one is complete); anything else is refused.
        sample_rate: the model's rate, at which every signal arrives.
        audio_format: how players embed audio: "flac" (lossless, small), "wav" (plays
            everywhere) or "none" (no players; the smallest report).
        compare: a finished report to put side by side with this one (``--compare``).
    """

    def __init__(self, out: str | os.PathLike, sample_rate: int, audio_format: str = "flac",
                 compare: Optional[PriorReport] = None) -> None:
        if audio_format not in REPORT_AUDIO_FORMATS:
            raise ValueError(f"audio_format must be one of {REPORT_AUDIO_FORMATS}, got {audio_format!r}")
        plots.require_matplotlib()  # fail before the evaluation, not after it
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise ReportError(f"--report {self.out} is a file; name a folder")
        if self.out.is_dir() and any(self.out.iterdir()) and not _is_report(self.out):
            raise ReportError(f"--report {self.out} is a folder that holds something other than a report (a report "
                              f"holds only {', '.join(sorted(REPORT_ENTRIES))}); name a new or empty folder, or an "
                              "earlier report, which is replaced whole")
        self.sample_rate = sample_rate
        self.audio_format = audio_format
        self.compare = compare
        self.entries: List[_Entry] = []
        self._names: Set[str] = set()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.staging = self.out.parent / f".{self.out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
        (self.staging / RECONSTRUCTIONS).mkdir(parents=True)

    def __enter__(self) -> "ReportWriter":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.discard()

    def discard(self) -> None:
        """Remove the unfinished report (nothing once :meth:`finish` has moved it into place)."""
        shutil.rmtree(self.staging, ignore_errors=True)

    def add(self, row: Dict[str, Any], reference: np.ndarray, reconstruction: np.ndarray) -> None:
        """One evaluated file: its result row (with ``"key"``) and the two ``(C, T)`` signals
        the metrics compared. Saves the reconstruction and sets ``row["reconstruction"]``."""
        key = row["key"]
        name = str(Path(key).with_suffix(".flac"))
        if name in self._names:  # "a.wav" and "a.flac" side by side
            name = f"{key}.flac"
        self._names.add(name)
        relative = f"{RECONSTRUCTIONS}/{name}"
        target = self.staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        sf.write(target, np.clip(reconstruction, -1, 1).T, self.sample_rate, format="FLAC", subtype="PCM_24")
        row["reconstruction"] = relative
        audio: Dict[str, bytes] = {}
        if self.audio_format != "none":
            audio["input"] = _encode_audio(reference, self.sample_rate, self.audio_format)
            audio["recon"] = _encode_audio(reconstruction, self.sample_rate, self.audio_format)
        entry = _Entry(row, plots.mel_db(reference, self.sample_rate), plots.mel_db(reconstruction, self.sample_rate),
                       audio)
        if self.compare is not None:
            self._add_other(entry, reference)
        self.entries.append(entry)

    def _add_other(self, entry: _Entry, reference: np.ndarray) -> None:
        assert self.compare is not None
        key = entry.row["key"]
        if key not in self.compare.rows:
            entry.other_note = "not in report B"
            return
        other, sr = self.compare.reconstruction(key)
        if sr != self.sample_rate or other.shape[-1] != reference.shape[-1]:
            entry.other_note = (f"report B holds {other.shape[-1] / sr:.2f} s of this file at {sr} Hz, this one "
                                f"{reference.shape[-1] / self.sample_rate:.2f} s at {self.sample_rate} Hz (evaluate "
                                "both with the same --max-seconds): not compared")
            return
        if other.shape[0] != reference.shape[0]:
            other = other.mean(0, keepdims=True)
        entry.other_row = self.compare.rows[key]
        entry.mel_other = plots.mel_db(other, sr)
        if self.audio_format != "none":
            entry.audio["other"] = _encode_audio(other, sr, self.audio_format)

    def finish(self, results: Dict[str, Any], markdown: str, card: Optional[Tuple[Path, Optional[str]]] = None
               ) -> Path:
        """Write results.json, results.md and index.html and move the report into place.

        Args:
            results: the evaluation's report dict (rows already carry their reconstruction path).
            markdown: results.md's text.
            card: (PNG path, key of the example file or None for the first) to also draw a
                one-picture summary (written atomically, outside the report folder).

        Returns:
            The path of ``index.html``.
        """
        if not self.entries:
            raise ReportError("no files were evaluated, so there is nothing to report")
        levels = plots.level_scale([s for e in self.entries for s in (e.mel_input, e.mel_recon)])
        (self.staging / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        (self.staging / "results.md").write_text(markdown, encoding="utf-8")
        (self.staging / "index.html").write_text(self._html(results, levels), encoding="utf-8")
        if card is not None:
            self._card(card[0], card[1], results, levels)
        old = self.out.parent / f".{self.out.name}.old-{secrets.token_hex(4)}"
        if self.out.exists():
            os.replace(self.out, old)
        os.replace(self.staging, self.out)
        shutil.rmtree(old, ignore_errors=True)
        return self.out / "index.html"

    # ------------------------------------------------------------------------- pictures
    def _rows(self, entry: _Entry, levels: Tuple[float, float], with_other: bool = True
              ) -> List[Tuple[str, np.ndarray, str]]:
        floor = levels[0]
        other = entry.mel_other if with_other else None
        a = "reconstruction A" if self.compare is not None and with_other else "reconstruction"
        rows = [("input", entry.mel_input, "level"), (a, entry.mel_recon, "level")]
        if other is not None:
            rows.append(("reconstruction B", other, "level"))
        rows.append((f"{a} minus input (dB)", plots.difference_db(entry.mel_input, entry.mel_recon, floor),
                     "difference"))
        if other is not None:
            rows.append(("reconstruction B minus input (dB)", plots.difference_db(entry.mel_input, other, floor),
                         "difference"))
        return rows

    def _card(self, path: Path, key: Optional[str], results: Dict[str, Any], levels: Tuple[float, float]) -> None:
        from .fileio import atomic_write

        by_key = {e.row["key"]: e for e in self.entries}
        if key is not None and key not in by_key:
            raise ReportError(f"--card-file {key!r} is not among the evaluated files: {', '.join(by_key)}")
        entry = by_key[key] if key is not None else self.entries[0]
        info = results.get("model_info", {})
        table = [(METRIC_INFO[k][0], _num(v)) for k, v in results["mean"].items() if k in METRIC_INFO]
        lines = [f"{k}: {v}" for k, v in _settings(results) if k != "model"]
        rows = self._rows(entry, levels, with_other=False)
        png = plots.card_png(f"music2latent2 · {info.get('name', results.get('model'))}", lines, table,
                             results["band_levels_db"], entry.row["key"], rows, levels, self.sample_rate)
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(png))

    # ------------------------------------------------------------------------- HTML
    def _html(self, results: Dict[str, Any], levels: Tuple[float, float]) -> str:
        other = self.compare.results if self.compare is not None else None
        name = results.get("model_info", {}).get("name", results.get("model"))
        parts = [_HEAD.format(title=html.escape(f"music2latent2 evaluation: {name}"))]
        parts.append("<h1>Reconstruction report</h1>")
        parts.append(_about(results, other))
        parts.append(f"<p class=note>Spectrograms: mel power ({plots.SPEC_MELS} bands, {plots.SPEC_N_FFT}-point "
                     f"STFT), one level scale for every input and reconstruction in this report "
                     f"({levels[0]:.0f} to {levels[1]:.0f} dB); differences on one scale of "
                     f"±{plots.DIFF_RANGE_DB:.0f} dB, red where the reconstruction is louder, blue where it is "
                     "quieter. Band levels: reconstruction minus input per octave band (0 is right).</p>")
        parts.append("<h2 id=summary>Summary</h2>")
        parts.append("<div class=row>" + _metrics_table(results.get("mean", {}), other.get("mean") if other else None,
                                                      f"mean over {len(self.entries)} files"))
        series = [("A" if other else "mean", results["band_levels_db"])]
        if other and other.get("band_levels_db"):
            series.append(("B", other["band_levels_db"]))
        parts.append(_img(plots.band_levels_png(series, "level per octave band (mean over files)"), "mean band levels")
                     + "</div>")
        parts.append(_band_table(series))
        parts.append("<h2>Files</h2><ul class=toc>" + "".join(
            f"<li><a href='#f{i}'>{html.escape(e.row['key'])}</a></li>" for i, e in enumerate(self.entries)) + "</ul>")
        for i, entry in enumerate(self.entries):
            parts.append(self._file_section(i, entry, levels))
        parts.append(_TAIL)
        return "\n".join(parts)

    def _file_section(self, index: int, entry: _Entry, levels: Tuple[float, float]) -> str:
        row = entry.row
        out = [f"<section class=file id=f{index}><h3>{html.escape(row['key'])}</h3>",
               f"<p class=note>{row['seconds']:.2f} s, {row['channels']} channel(s)"
               + (f"; {html.escape(entry.other_note)}" if entry.other_note else "") + "</p>"]
        if entry.audio:
            names = {"input": "input", "recon": "reconstruction A" if self.compare else "reconstruction",
                     "other": "reconstruction B"}
            mime = _MIME[self.audio_format]
            out.append("<div class=players>" + "".join(
                f"<figure><figcaption>{names[k]}</figcaption><audio controls preload=metadata "
                f"src='{_data_uri(mime, v)}'></audio></figure>" for k, v in entry.audio.items()) + "</div>")
        series = [("A" if self.compare else "this file", row["band_levels_db"])]
        if entry.other_row is not None:
            series.append(("B", entry.other_row["band_levels_db"]))
        out.append("<div class=row>" + _metrics_table(row, entry.other_row, "this file")
                   + _img(plots.band_levels_png(series), f"band levels of {row['key']}") + "</div>")
        out.append(_band_table(series))
        out.append(_img(plots.spectrogram_png(self._rows(entry, levels), levels, self.sample_rate),
                        f"spectrograms of {row['key']}", "spec") + "</section>")
        return "\n".join(out)


# ----------------------------------------------------------------------------- HTML pieces
def _num(value: Any, signed: bool = False) -> str:
    if not isinstance(value, (int, float)) or value != value:
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _img(png: bytes, alt: str, cls: str = "plot") -> str:
    return f"<img class={cls} alt='{html.escape(alt, quote=True)}' src='{_data_uri('image/png', png)}'>"


def _verdict(key: str, a: Any, b: Any) -> str:
    if not all(isinstance(v, (int, float)) for v in (a, b)) or a == b:
        return ""
    sign = METRIC_INFO[key][2]
    better = abs(a) < abs(b) if sign == 0 else (a - b) * sign > 0
    return " class=better" if better else " class=worse"


def _metrics_table(values: Dict[str, Any], other: Optional[Dict[str, Any]], caption: str) -> str:
    head = "<th>metric</th>" + ("<th>A</th><th>B</th><th>A - B</th>" if other is not None else "<th>value</th>")
    rows = []
    for key, (label, unit, _) in METRIC_INFO.items():
        if key not in values:
            continue
        unit_note = f" <span class=unit>({html.escape(unit)})</span>" if unit else ""
        cells = f"<td>{label}{unit_note}</td><td>{_num(values[key])}</td>"
        if other is not None:
            a, b = values.get(key), other.get(key)
            diff = a - b if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
            cells += f"<td>{_num(b)}</td><td{_verdict(key, a, b)}>{_num(diff, signed=True)}</td>"
        rows.append(f"<tr>{cells}</tr>")
    return f"<table class=metrics><caption>{html.escape(caption)}</caption><tr>{head}</tr>{''.join(rows)}</table>"


def _band_table(series: Sequence[Tuple[str, Dict[str, Optional[float]]]]) -> str:
    bands = list(series[0][1])
    head = "<th></th>" + "".join(f"<th>{html.escape(b)}</th>" for b in bands)
    body = "".join(f"<tr><td>{html.escape(label)}</td>" + "".join(
        f"<td>{_num(levels.get(b), signed=True)}</td>" for b in bands) + "</tr>" for label, levels in series)
    return f"<table class=bandtable><caption>dB, reconstruction minus input</caption><tr>{head}</tr>{body}</table>"


def _settings(results: Dict[str, Any]) -> List[Tuple[str, str]]:
    """(label, value) pairs that identify a report: model, checkpoint, decoding, data and code."""
    info, dec, sw = results.get("model_info", {}), results.get("decoding", {}), results.get("software", {})
    items = [("model", str(info.get("name", results.get("model")))),
             ("sha256", info.get("sha256") or "n/a (not loaded from a file)"),
             ("network", f"{info.get('parameters', 0) / 1e6:.2f} M parameters, {info.get('channels', '?')} "
                         f"channel(s), {info.get('sample_rate', '?')} Hz"),
             ("decoding", f"{results.get('mode', '?')}, {dec.get('denoising_steps', '?')} step(s), sigma_cond "
                          f"{dec.get('sigma_cond', '?')}, seed {dec.get('seed', '?')}, {dec.get('precision', '?')} "
                          f"on {dec.get('device', '?')}, normalize {dec.get('normalize', '?')}"),
             ("data", f"{results.get('data', {}).get('files', '?')} files, "
                      + (f"first {dec['max_seconds']:g} s of each" if dec.get("max_seconds") else "whole files")),
             ("code", f"music2latent2 {sw.get('version', '?')}, commit {sw.get('commit') or 'unknown'}, torch "
                      f"{sw.get('torch', '?')}, {sw.get('date', '')}")]
    if info.get("repo_id"):
        items.insert(2, ("hub", f"{info['repo_id']}@{info.get('revision') or '?'}"))
    return items


def _about(results: Dict[str, Any], other: Optional[Dict[str, Any]]) -> str:
    def block(label: str, res: Dict[str, Any]) -> str:
        return (f"<table class=about><caption>{html.escape(label)}</caption>" + "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in _settings(res)) + "</table>")

    if other is None:
        return block("model and settings", results)
    return "<div class=side>" + block("A: this report", results) + block("B: compared with", other) + "</div>"


_HEAD = """<!DOCTYPE html>
<html lang=en><head><meta charset=utf-8><title>{title}</title>
<meta name=viewport content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px; color: #222; padding: 0 1em; }}
h1 {{ margin-bottom: 0.2em; }} h3 {{ margin: 0.3em 0; font-family: monospace; }}
table {{ border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }}
caption {{ text-align: left; font-weight: bold; padding-bottom: 0.2em; }}
th, td {{ border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
table.about td {{ text-align: left; font-family: monospace; word-break: break-all; }}
.side {{ display: flex; gap: 1em; flex-wrap: wrap; }} .side table {{ flex: 1; }}
.note {{ color: #555; font-size: 0.9em; }}
.better {{ background: #d8f0d8; }} .worse {{ background: #f6d8d8; }}
section.file {{ border-top: 2px solid #ddd; margin-top: 1.5em; padding-top: 0.5em; }}
.players {{ display: flex; gap: 1em; flex-wrap: wrap; }} figure {{ margin: 0; }}
figcaption {{ font-size: 0.85em; color: #555; }}
img.spec {{ width: 100%; }} img.plot {{ max-width: 560px; min-width: 320px; flex: 1; }}
.row {{ display: flex; gap: 1.5em; align-items: flex-start; flex-wrap: wrap; }}
.warn {{ color: #a00; font-size: 0.85em; }} .unit {{ color: #777; font-size: 0.85em; }}
ul.toc {{ columns: 2; font-family: monospace; font-size: 0.85em; }}
</style></head><body>"""

# Marks each player once the browser has read its audio (data-state ready/error) and says so
# next to a player whose format this browser cannot play.
_TAIL = """<script>
document.querySelectorAll("audio").forEach(function (a) {
  a.addEventListener("loadedmetadata", function () { a.dataset.state = "ready"; });
  a.addEventListener("error", function () {
    a.dataset.state = "error";
    a.insertAdjacentHTML("afterend", "<div class=warn>this browser cannot play this audio; " +
      "re-run with --report-audio wav</div>");
  });
  if (a.readyState >= 1) { a.dataset.state = "ready"; }
});
</script></body></html>
"""
