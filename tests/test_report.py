"""The HTML evaluation report: contents, comparison, card, safety of the folder, and a look in Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import struct
import subprocess

import numpy as np
import pytest
import soundfile as sf
from conftest import make_tiny

from music2latent2.checkpoint import sha256_file
from music2latent2.cli import main as cli_main
from music2latent2.evaluate import main as eval_main
from music2latent2.metrics import OCTAVE_CENTRES_HZ

pytest.importorskip("matplotlib", reason="the report extra (matplotlib) is not installed")

SR = 44100
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny checkpoint, a data folder (a mono file and a stereo one in a subfolder) and a report."""
    root = tmp_path_factory.mktemp("report")
    ckpt = make_tiny().save_pretrained(root / "ckpt")
    data = root / "data"
    (data / "sub").mkdir(parents=True)
    t = np.arange(int(1.0 * SR)) / SR
    rng = np.random.default_rng(0)
    mono = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.02 * rng.standard_normal(t.size)
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 3000 * t)], axis=1)
    sf.write(data / "a.wav", mono.astype(np.float32), SR)
    sf.write(data / "sub" / "b.flac", stereo.astype(np.float32), SR)
    report = root / "rep_a"
    args = ["--model", str(ckpt), "--data", str(data), "--no-visqol", "--report", str(report),
            "--card", str(root / "card.png")]
    assert eval_main(args) == 0
    return {"root": root, "ckpt": ckpt, "data": data, "report": report, "args": args}


def _data_uris(page: str, mime: str):
    return [base64.b64decode(m) for m in re.findall(rf"src='data:{re.escape(mime)};base64,([A-Za-z0-9+/=]+)'", page)]


def _png_size(png: bytes):
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", png[16:24])  # IHDR width, height


def test_report_holds_players_pictures_metrics_and_provenance(setup):
    report = setup["report"]
    results = json.loads((report / "results.json").read_text())
    page = (report / "index.html").read_text()
    # Who made it: model, sha256, decoding settings, code version and commit.
    info = results["model_info"]
    assert info["sha256"] == sha256_file(setup["ckpt"]) and info["sha256"] in page
    assert info["parameters"] > 0 and info["sample_rate"] == SR
    assert results["decoding"] == {"denoising_steps": 1, "sigma_cond": 0.4, "normalize": True, "seed": 0,
                                   "precision": "float32", "device": "cpu", "max_seconds": None}
    assert "autoregressive, 1 step(s), sigma_cond 0.4, seed 0, float32 on cpu" in page
    assert f"music2latent2 {results['software']['version']}" in page
    commit = results["software"]["commit"]  # None where the package is not a git checkout (a pip install)
    assert f"commit {commit or 'unknown'}" in page
    # One key per file (its path under --data), and its reconstruction saved next to the page.
    rows = {r["key"]: r for r in results["files"]}
    assert set(rows) == {"a.wav", "sub/b.flac"}
    for key, row in rows.items():
        rec, sr = sf.read(report / row["reconstruction"], always_2d=True)
        assert sr == SR and rec.shape == (row["samples"], row["channels"])
        assert f"<h3>{key}</h3>" in page
    assert rows["sub/b.flac"]["channels"] == 2
    # Players: input and reconstruction per file, FLAC that decodes to the evaluated length.
    audio = _data_uris(page, "audio/flac")
    assert len(audio) == 4 and page.count("<audio") == 4
    lengths = sorted(sf.read(io.BytesIO(a))[0].shape[0] for a in audio)
    assert lengths == [SR] * 4
    # Pictures: the summary's band plot, then per file a band plot and a spectrogram stack.
    pictures = _data_uris(page, "image/png")
    assert len(pictures) == 5
    sizes = [_png_size(p) for p in pictures]
    assert all(w >= 600 and h >= 200 for w, h in sizes)
    assert max(h for _, h in sizes) >= 450  # the stack: input, reconstruction, difference
    # Summary on top with the means; every band in the tables, per file and averaged.
    assert page.index("Summary") < page.index("<h3>")
    assert f"<td>{results['mean']['si_sdr']:.3f}</td>" in page
    assert f"<td>{results['mean']['level_db']:.3f}</td>" in page
    for band, value in results["band_levels_db"].items():
        assert f"<th>{band}</th>" in page
        assert value is None or f"<td>{value:+.3f}</td>" in page
    for row in rows.values():
        for value in row["band_levels_db"].values():
            assert value is None or f"<td>{value:+.3f}</td>" in page
    assert re.search(r"one level scale for every input and reconstruction in this report \(-?\d+ to -?\d+ dB\)", page)
    # Self-contained: nothing is fetched when the page is viewed.
    assert not re.search(r"https?://", page)
    assert not re.search(r"<(link|script)[^>]*\bsrc=|<link\b", page)
    # results.md: the overall level per file and a per-band table per file.
    md = (report / "results.md").read_text()
    assert "| file | " + " | ".join(f"{c // 1000} kHz" if c >= 1000 else f"{c} Hz" for c in OCTAVE_CENTRES_HZ) in md
    assert "| a.wav |" in md and "| b.flac |" in md and "level (dB)" in md
    assert not list(report.parent.glob(f".{report.name}.*"))  # no staging folder left


def test_card_is_a_picture(setup):
    from matplotlib.image import imread

    card = setup["root"] / "card.png"
    width, height = _png_size(card.read_bytes())
    assert width == 1200 and height >= 700  # the summary, then three spectrogram rows of one file
    pixels = imread(card)[..., :3]
    assert (pixels.max(-1) - pixels.min(-1) > 0.3).mean() > 0.1  # colour maps, not an empty figure


def test_compare_puts_two_reports_side_by_side(setup):
    other = setup["root"] / "rep_b"
    args = [a for a in setup["args"] if a not in ("--card", str(setup["root"] / "card.png"))]
    args[args.index("--report") + 1] = str(other)
    assert eval_main(args + ["--mode", "parallel", "--compare", str(setup["report"])]) == 0
    page = (other / "index.html").read_text()
    a = json.loads((other / "results.json").read_text())
    b = json.loads((setup["report"] / "results.json").read_text())
    assert "A: this report" in page and "B: compared with" in page
    assert "parallel, 1 step(s)" in page and "autoregressive, 1 step(s)" in page
    assert page.count("<audio") == 6  # input, A and B per file
    diff = a["mean"]["logmel_distance"] - b["mean"]["logmel_distance"]
    assert f"{diff:+.3f}</td>" in page
    # The spectrogram stack grows by B and B's difference (5 rows instead of 3).
    heights = [_png_size(p)[1] for p in _data_uris(page, "image/png")]
    solo = [_png_size(p)[1] for p in _data_uris((setup["report"] / "index.html").read_text(), "image/png")]
    assert max(heights) > max(solo) * 1.4
    # A report over other lengths is shown, but not compared file by file.
    short = setup["root"] / "rep_short"
    args[args.index("--report") + 1] = str(short)
    assert eval_main(args + ["--max-seconds", "0.5", "--report-audio", "none", "--compare", str(setup["report"])]) == 0
    page = (short / "index.html").read_text()
    assert page.count("not compared") == 2 and "<audio" not in page


def test_compare_and_report_refuse_what_they_cannot_use(setup, tmp_path, capsys):
    base = ["--model", str(setup["ckpt"]), "--data", str(setup["data"]), "--no-visqol"]
    plain = tmp_path / "plain"
    assert eval_main(base + ["--out", str(plain), "--max-files", "1"]) == 0
    with pytest.raises(SystemExit) as exc:  # a --out folder holds no reconstructions
        eval_main(base + ["--report", str(tmp_path / "r"), "--compare", str(plain)])
    assert exc.value.code == 2 and "lists no reconstructions" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        eval_main(base + ["--compare", str(setup["report"])])
    assert exc.value.code == 2 and "--compare needs --report" in capsys.readouterr().err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as exc:  # never overwrite a folder that is not a report
        eval_main(base + ["--report", str(mine)])
    assert exc.value.code == 2 and "holds something other than a report" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1
    # Nor a report that the user has added a file to: replacing it would lose that file.
    extended = tmp_path / "extended"
    shutil.copytree(setup["report"], extended)
    (extended / "my_notes.md").write_text("listened on headphones")
    with pytest.raises(SystemExit) as exc:
        eval_main(base + ["--report", str(extended)])
    assert exc.value.code == 2 and "holds something other than a report" in capsys.readouterr().err
    assert (extended / "my_notes.md").is_file()


def test_a_report_can_replace_the_one_it_is_compared_with(setup, tmp_path):
    report = tmp_path / "rep"
    shutil.copytree(setup["report"], report)
    old = json.loads((report / "results.json").read_text())
    base = ["--model", str(setup["ckpt"]), "--data", str(setup["data"]), "--no-visqol", "--report-audio", "none"]
    assert eval_main(base + ["--mode", "parallel", "--report", str(report), "--compare", str(report)]) == 0
    page = (report / "index.html").read_text()
    new = json.loads((report / "results.json").read_text())
    assert new["mode"] == "parallel" and "B: compared with" in page and "not compared" not in page
    diff = new["mean"]["si_sdr"] - old["mean"]["si_sdr"]  # B is the report that was there before
    assert f"{diff:+.3f}</td>" in page


def test_failed_run_leaves_the_earlier_report_as_it_was(setup, tmp_path):
    report = tmp_path / "rep"
    shutil.copytree(setup["report"], report)
    before = {p.relative_to(report): p.read_bytes() for p in report.rglob("*") if p.is_file()}
    data = tmp_path / "data"
    shutil.copytree(setup["data"], data)
    (data / "z_broken.wav").write_bytes(b"RIFF not really a wave file")
    with pytest.raises(Exception, match="z_broken"):
        eval_main(["--model", str(setup["ckpt"]), "--data", str(data), "--no-visqol", "--report", str(report)])
    after = {p.relative_to(report): p.read_bytes() for p in report.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "rep"]  # no partial report left beside it


def test_command_line_has_evaluate(setup, tmp_path, capsys):
    report = tmp_path / "cli"
    assert cli_main(["evaluate", "--model", str(setup["ckpt"]), "--data", str(setup["data"] / "a.wav"),
                     "--no-visqol", "--report", str(report), "--report-audio", "wav"]) == 0
    page = (report / "index.html").read_text()
    assert len(_data_uris(page, "audio/wav")) == 2
    assert json.loads((report / "results.json").read_text())["files"][0]["key"] == "a.wav"
    with pytest.raises(SystemExit) as exc:
        cli_main(["evaluate", "--help"])
    assert exc.value.code == 0 and "usage: music2latent2 evaluate" in capsys.readouterr().out


def test_speeds_are_x_real_time_higher_is_better(setup):
    results = json.loads((setup["report"] / "results.json").read_text())
    rows = results["files"]
    for key in ("encode_x_real_time", "decode_x_real_time"):
        assert all(r[key] > 0 for r in rows) and not any(k.endswith("_rtf") for r in rows for k in r)
        # The mean row is the speed of the whole run: all the audio over all the compute time.
        total_compute = sum(r["seconds"] / r[key] for r in rows)
        assert results["mean"][key] == pytest.approx(sum(r["seconds"] for r in rows) / total_compute)
        assert min(r[key] for r in rows) <= results["mean"][key] <= max(r[key] for r in rows)
    md = (setup["report"] / "results.md").read_text()
    assert "| encode x real time | decode x real time |" in md and "RTF" not in md
    page = (setup["report"] / "index.html").read_text()
    assert "encode x real time <span class=unit>(audio s per compute s, higher is faster)</span>" in page
    assert "RTF" not in re.sub(r"data:[^']*", "", page)  # outside the embedded pictures and audio
    assert f"<td>{results['mean']['decode_x_real_time']:.3f}</td>" in page
    # The comparison colours a faster A as better, a slower one as worse.
    from music2latent2.report import _metrics_table

    faster = _metrics_table({"encode_x_real_time": 20.0}, {"encode_x_real_time": 10.0}, "c")
    slower = _metrics_table({"decode_x_real_time": 2.0}, {"decode_x_real_time": 4.0}, "c")
    assert "<td class=better>+10.000</td>" in faster and "<td class=worse>-2.000</td>" in slower


def test_old_results_with_real_time_factors_are_read_as_x_real_time(setup, tmp_path):
    from music2latent2.report import load_report, upgrade_speed_keys

    # The keys of before: compute seconds per audio second, the mean a mean of the files' RTFs.
    old = {"files": [{"seconds": 2.0, "encode_rtf": 0.1, "decode_rtf": 0.5},
                     {"seconds": 1.0, "encode_rtf": 0.4, "decode_rtf": 0.0}],
           "mean": {"encode_rtf": 0.25, "decode_rtf": 0.25, "si_sdr": 3.0}}
    new = upgrade_speed_keys(json.loads(json.dumps(old)))
    assert [r["encode_x_real_time"] for r in new["files"]] == pytest.approx([10.0, 2.5])
    assert [r["decode_x_real_time"] for r in new["files"]] == pytest.approx([2.0, None])  # 0 s: no speed
    assert new["mean"]["encode_x_real_time"] == pytest.approx(3.0 / (0.2 + 0.4))  # 3 s of audio in 0.6 s
    assert new["mean"]["decode_x_real_time"] == pytest.approx(2.0)  # only the timed file counts
    assert new["mean"]["si_sdr"] == 3.0 and not any("_rtf" in k for k in new["mean"])
    # Only the mean (rows without speeds): 1 / RTF. Current results are left as they are.
    assert upgrade_speed_keys({"files": [], "mean": {"encode_rtf": 0.5}})["mean"] == {"encode_x_real_time": 2.0}
    current = json.loads((setup["report"] / "results.json").read_text())
    assert upgrade_speed_keys(json.loads(json.dumps(current))) == current

    # A report written before, as --compare's B: its speeds appear as x real time.
    prior = tmp_path / "prior"
    shutil.copytree(setup["report"], prior)
    results = json.loads((prior / "results.json").read_text())
    for row in results["files"]:
        for key in ("encode", "decode"):
            row[f"{key}_rtf"] = 1.0 / row.pop(f"{key}_x_real_time")
    for key in ("encode", "decode"):
        del results["mean"][f"{key}_x_real_time"]
        results["mean"][f"{key}_rtf"] = float(np.mean([r[f"{key}_rtf"] for r in results["files"]]))
    (prior / "results.json").write_text(json.dumps(results))
    loaded = load_report(prior)
    for key in ("encode", "decode"):
        assert loaded.results["mean"][f"{key}_x_real_time"] == pytest.approx(current["mean"][f"{key}_x_real_time"])
        for row in current["files"]:
            assert loaded.rows[row["key"]][f"{key}_x_real_time"] == pytest.approx(row[f"{key}_x_real_time"])
    report = tmp_path / "with_prior"
    args = [a for a in setup["args"] if a not in ("--card", str(setup["root"] / "card.png"))]
    args[args.index("--report") + 1] = str(report)
    assert eval_main(args + ["--compare", str(prior)]) == 0
    page = (report / "index.html").read_text()
    b = loaded.results["mean"]["encode_x_real_time"]
    assert re.search(rf"encode x real time <span class=unit>\([^)]*\)</span></td><td>[0-9.]+</td><td>{b:.3f}</td>",
                     page)


def _chromium(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["chromium", *CHROMIUM_FLAGS, *args], capture_output=True, text=True, timeout=timeout)


def test_report_renders_in_headless_chromium(setup, tmp_path):
    if shutil.which("chromium") is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium): the report was not opened in a "
                    "browser")
    url = (setup["report"] / "index.html").resolve().as_uri()
    profile = f"--user-data-dir={tmp_path / 'profile'}"
    shot = tmp_path / "report.png"
    res = _chromium(profile, "--window-size=1200,1600", f"--screenshot={shot}", url)
    assert shot.is_file(), res.stderr[-2000:]
    from matplotlib.image import imread

    pixels = imread(shot)[..., :3]  # (H, W, 3) in 0..1
    assert pixels.shape[:2] == (1600, 1200)
    dark = (pixels.mean(-1) < 0.5).mean()
    colourful = (pixels.max(-1) - pixels.min(-1) > 0.3).mean()
    assert 0.01 < dark < 0.6, dark  # text and spectrograms on a white page, not a blank or black one
    assert colourful > 0.01, colourful  # the bar plot's colours reached the screen
    # The embedded audio decodes in the browser: every player's script mark says "ready".
    dom = _chromium(profile, "--virtual-time-budget=5000", "--dump-dom", url).stdout
    states = re.findall(r"<audio[^>]*data-state=\"(\w+)\"", dom)
    assert states == ["ready"] * 4, states
