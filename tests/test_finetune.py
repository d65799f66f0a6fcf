"""docs/finetune.md's recipe, on a tiny model: its flags exist, and it fine-tunes a checkpoint."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors import safe_open

from music2latent2 import EncoderDecoder, ModelConfig, Music2Latent2
from music2latent2.training.__main__ import main as train_main

ROOT = Path(__file__).resolve().parents[1]
MICRO = {"n_fft": 256, "hop_length": 64, "freq_bins": 128, "chunk_frames": 16}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _recipe() -> list:
    text = (ROOT / "docs" / "finetune.md").read_text()
    block = re.search(r"```bash\n(python -m music2latent2.training train .*?)```", text, re.S)
    assert block is not None
    return shlex.split(block.group(1).replace("\\\n", " "))[4:]  # after "python -m ... train"


def test_recipe_flags_exist(capsys):
    with pytest.raises(SystemExit):
        train_main(["train", "--help"])
    known = capsys.readouterr().out
    flags = [a for a in _recipe() if a.startswith("--")]
    assert "--init-from" in flags and "--more-steps" in flags
    for flag in flags:
        assert re.search(rf"{flag}\b", known), flag


def test_recipe_fine_tunes_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    start = Music2Latent2(ModelConfig.from_preset("tiny", **MICRO))
    start.save_pretrained(tmp_path / "shipped")
    rng = np.random.default_rng(0)
    for name in ("my_audio", "corpus", "my_heldout"):
        (tmp_path / name).mkdir()
        t = np.arange(30000) / 44100
        tone = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 800) * t) + 0.05 * rng.standard_normal(t.size)
        sf.write(str(tmp_path / name / "a.wav"), tone.astype(np.float32), 44100)
    # The recipe as written, with the tiny run's paths and sizes in place of the real ones.
    values = {"--init-from": str(tmp_path / "shipped"), "--eval-data": str(tmp_path / "my_heldout"),
              "--batch-size": "2", "--warmup": "1", "--more-steps": "8", "--save-every": "8",
              "--eval-every": "8", "--out": str(tmp_path / "run")}
    args, recipe = [], _recipe()
    for i, arg in enumerate(recipe):
        if i and recipe[i - 1] in values:
            arg = values[recipe[i - 1]]
        elif arg.split(":")[0] in ("my_music", "my_audio", "corpus/music"):  # the recipe's placeholder folders
            folder, sep, weight = arg.partition(":")
            arg = str(tmp_path / ("my_audio" if folder.startswith("my") else "corpus")) + sep + weight
        args.append(arg)
    args += ["--workers", "0", "--cache-gb", "0.01", "--eval-seconds", "0.2", "--log-every", "1"]
    assert train_main(["train", *args]) == 0
    run = tmp_path / "run"
    best = EncoderDecoder(run / "best", device="cpu")  # an ordinary checkpoint
    assert best.config.replace(latent_scale=1.0).to_dict() == start.config.to_dict()
    with safe_open(str(run / "state.safetensors"), framework="pt") as f:
        cfg = json.loads(f.metadata()["train_config"])
    assert cfg["init_from"] and len(cfg["init_sha256"]) == 64 and cfg["lr"] == 5e-5 and cfg["ema_momentum"] == 0.999
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert len(evals) == 1
    assert list(evals[0]["band_levels_db"]) == ["63 Hz", "125 Hz", "250 Hz", "500 Hz", "1 kHz", "2 kHz", "4 kHz",
                                                "8 kHz", "16 kHz"]  # the held-out eval sees every band
    assert evals[0]["level_db"] is not None and evals[0]["band_level_error_db"] is not None
    final = Music2Latent2.from_pretrained(run / "final")
    # The fine-tune changed the weights (not only the re-drawn summary tokens: RAdam steps from step 6 on).
    before = dict(start.named_parameters())
    moved = [name for name, p in final.named_parameters() if "summary" not in name
             and not torch.equal(p.detach(), before[name].detach())]
    assert len(moved) > len(before) // 2, len(moved)
