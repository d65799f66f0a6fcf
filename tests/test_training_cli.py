"""End to end: train -> resume -> export -> evaluate, through the command lines (micro model)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from music2latent2 import EncoderDecoder
from music2latent2.checkpoint import read_metadata
from music2latent2.latent_health import HEALTH_KEYS
from music2latent2.training.__main__ import main as train_main

ROOT = Path(__file__).resolve().parents[1]
MICRO = json.dumps({"n_fft": 256, "hop_length": 64, "freq_bins": 128, "chunk_frames": 16})


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_train_resume_export_evaluate(tmp_path, capsys):
    rng = np.random.default_rng(0)
    data, held = tmp_path / "data", tmp_path / "eval"
    data.mkdir()
    held.mkdir()
    for i in range(2):
        sf.write(str(data / f"x{i}.flac"), 0.3 * rng.standard_normal(30000).astype(np.float32), 44100)
    sf.write(str(held / "e.wav"), 0.3 * rng.standard_normal(8000).astype(np.float32), 16000)
    run = tmp_path / "run"
    common = ["--log-every", "1", "--save-every", "2", "--eval-every", "2", "--eval-seconds", "0.2"]
    assert train_main(["train", "--data", f"{data}:1", "--eval-data", str(held), "--out", str(run),
                       "--preset", "tiny", "--model-overrides", MICRO, "--steps", "2", "--batch-size", "2",
                       "--warmup", "1", "--ema", "0.9", "--workers", "0", "--cache-gb", "0.01", *common]) == 0
    out = capsys.readouterr().out
    assert "step 2/2" in out and "steps/s" in out and "audio" in out and "eval step 2" in out
    assert (run / "state.safetensors").is_file() and (run / "best" / "model.safetensors").is_file()
    assert train_main(["train", "--out", str(run), "--resume", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "resumed" in out and "step 3/3" in out
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert train_main(["export", "--state", str(run), "--out", str(tmp_path / "ckpt"), "--fp16"]) == 0
    meta = read_metadata(tmp_path / "ckpt")
    assert meta["training_step"] == "3"
    scale = json.loads(meta["config"])["latent_scale"]
    assert scale != 1.0 and scale > 0
    assert EncoderDecoder(tmp_path / "ckpt", device="cpu").config.latent_scale == pytest.approx(scale)

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "music2latent2.evaluate", "--model", str(tmp_path / "ckpt"),
                          "--data", str(held), "--out", str(tmp_path / "report"), "--max-seconds", "0.1",
                          "--no-visqol"], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "report" / "results.json").read_text())
    row = report["files"][0]
    assert row["seconds"] == pytest.approx(0.1, abs=1e-3)
    assert np.isfinite(row["si_sdr"]) and row["logmel_distance"] > 0 and np.isfinite(row["level_db"])
    assert set(report["latent_health"]) == set(HEALTH_KEYS)
    assert report["latent_health"]["effective_rank"] > 0
    assert report["decoding"]["normalize"] is True
    assert "Latent health" in (tmp_path / "report" / "results.md").read_text()
    assert row["visqol"] is None and "disabled" in row["visqol_error"]
    assert row["encode_rtf"] > 0 and row["decode_rtf"] > 0
    assert "| **mean** |" in (tmp_path / "report" / "results.md").read_text()
    # Per-octave-band levels per file and averaged (0.1 s of audio: every band is measured).
    assert list(row["band_levels_db"]) == ["63 Hz", "125 Hz", "250 Hz", "500 Hz", "1 kHz", "2 kHz", "4 kHz",
                                           "8 kHz", "16 kHz"]
    assert set(report["band_levels_db"]) == set(row["band_levels_db"])
    measured = [v for v in row["band_levels_db"].values() if v is not None]
    assert measured and row["band_level_error_db"] == pytest.approx(np.mean([min(abs(v), 60) for v in measured]))
    assert "Level per octave band" in (tmp_path / "report" / "results.md").read_text()


def test_evaluate_cli_rejects_missing_data(tmp_path, capsys):
    from music2latent2.evaluate import main as eval_main
    with pytest.raises(SystemExit) as exc:  # a usage error (exit 2) that names the folder, not a traceback
        eval_main(["--data", str(tmp_path / "missing")])
    assert exc.value.code == 2
    assert f"not found: {tmp_path / 'missing'}" in capsys.readouterr().err
