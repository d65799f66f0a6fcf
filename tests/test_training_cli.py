"""The training command line: end to end (train -> resume -> export -> evaluate, micro model), and
its argument checks (one line ``error: ...``, exit status 2, before any model is loaded)."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import music2latent2.training.__main__ as training_main
from music2latent2 import EncoderDecoder, ModelConfig, Music2Latent2
from music2latent2.checkpoint import read_metadata
from music2latent2.latent_health import HEALTH_KEYS
from music2latent2.training.__main__ import main as train_main
from music2latent2.training.trainer import TrainConfig, Trainer

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
    assert row["encode_x_real_time"] > 0 and row["decode_x_real_time"] > 0  # audio s per compute s
    assert "encode_rtf" not in row and "decode_rtf" not in row
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


# --------------------------------------------------------------------------- argument checks
# `train` checks what it can before a model is loaded: one line "error: ..." on stderr, exit
# status 2, and no run folder left behind.


class _Reached(BaseException):
    """Raised by a patched loader: the run got past every argument check (not an Exception, so no
    handler in the command turns it into an error line)."""


def _train(argv, capsys):
    """Run ``train`` in-process: (exit status, stdout, stderr)."""
    try:
        code = train_main(["train", *argv])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a checkpoint is loaded or a network built: the checks must come first."""
    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(Music2Latent2, "from_pretrained", classmethod(loaded))
    monkeypatch.setattr(training_main, "Trainer", loaded)


def _audio_folder(path: Path, seconds: float = 0.7) -> Path:
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    sf.write(str(path / "a.wav"), (0.3 * rng.standard_normal(int(44100 * seconds))).astype(np.float32), 44100)
    return path


def _tiny_checkpoint(path: Path, summary_std: float | None = None) -> Path:
    torch.manual_seed(0)
    model = Music2Latent2(ModelConfig.from_preset("tiny", **json.loads(MICRO)))
    if summary_std is not None:  # a checkpoint whose summary tokens a run already drew at that scale
        with torch.no_grad():
            model.init_summary_tokens(summary_std, torch.Generator().manual_seed(1))
    return model.save_pretrained(path)


def test_missing_data_folder_is_one_line_before_loading(tmp_path, capsys, no_model):
    run = tmp_path / "runs" / "finetune"
    code, out, err = _train(["--init-from", "m2l2-small", "--data", f"{tmp_path / 'my_music'}:0.8",
                             "--more-steps", "5", "--out", str(run)], capsys)
    assert code == 2
    line = _one_error_line(err)
    assert f"--data {tmp_path / 'my_music'}:0.8" in line and "not found" in line
    assert not (tmp_path / "runs").exists()


def test_empty_data_folder_is_one_line_before_loading(tmp_path, capsys, no_model):
    empty = tmp_path / "my_music"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("not audio")
    (empty / "sub" / "broken.wav").write_bytes(b"")  # an audio name, but nothing soundfile can read
    code, _, err = _train(["--init-from", "m2l2-small", "--data", str(empty), "--out", str(tmp_path / "run")], capsys)
    assert code == 2
    line = _one_error_line(err)
    assert "no readable audio files" in line and str(empty) in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, value", [("--lr", "0"), ("--lr", "-1e-4"), ("--lr", "nan"), ("--seed", "x"),
                                         ("--seed", "1.5"), ("--seed", "-1"), ("--warmup", "-1"), ("--steps", "0"),
                                         ("--batch-size", "0"), ("--ema", "1"), ("--min-lr", "0")])
def test_numbers_out_of_range_are_one_line_before_loading(tmp_path, capsys, no_model, flag, value):
    data = _audio_folder(tmp_path / "data")
    code, _, err = _train(["--data", str(data), "--preset", "tiny", "--out", str(tmp_path / "run"),
                           f"{flag}={value}"], capsys)
    assert code == 2
    line = _one_error_line(err)
    assert f"argument {flag}: must be" in line and repr(value) in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case, needle", [
    ("eval_missing", "--eval-data"), ("eval_empty", "--eval-data"), ("out_is_file", "is an existing file"),
    ("resume_nothing", "--resume"), ("init_unknown", "--init-from no-such-model"), ("device", "--device nonsense"),
    ("keep_without_init", "--keep-summary-tokens"), ("bad_weight", "data weight"), ("overrides", "--model-overrides"),
    ("delta", "--delta-end")])
def test_other_checks_come_before_loading(tmp_path, capsys, no_model, case, needle):
    data = _audio_folder(tmp_path / "data")
    out = tmp_path / "run"
    extra = {"eval_missing": ["--eval-data", str(tmp_path / "held")], "eval_empty": ["--eval-data", str(out)],
             "out_is_file": [], "resume_nothing": ["--resume"], "init_unknown": ["--init-from", "no-such-model"],
             "device": ["--device", "nonsense"], "keep_without_init": ["--keep-summary-tokens"],
             "bad_weight": [], "overrides": ["--model-overrides", '{"no_such_field": 1}'],
             "delta": ["--delta-end", "0.5"]}[case]
    data_spec = f"{data}:0" if case == "bad_weight" else str(data)
    if case == "eval_empty":  # an existing folder without audio (here: the run folder itself)
        out.mkdir()
    if case == "out_is_file":
        out.write_text("a file")
    code, _, err = _train(["--data", data_spec, "--preset", "tiny", "--out", str(out), *extra], capsys)
    assert code == 2
    assert needle in _one_error_line(err)
    if case == "out_is_file":
        assert out.read_text() == "a file"
    else:
        assert out.is_dir() if case == "eval_empty" else not out.exists()
        assert not out.exists() or not any(out.iterdir())


def test_corrupt_init_checkpoint_names_the_file(tmp_path, capsys, no_model):
    folder = tmp_path / "my_model"
    folder.mkdir()
    (folder / "model.safetensors").write_text("this is not a checkpoint\n")
    data = _audio_folder(tmp_path / "data")
    code, _, err = _train(["--init-from", str(folder), "--data", str(data), "--out", str(tmp_path / "run")], capsys)
    assert code == 2
    line = _one_error_line(err)
    assert f"--init-from {folder}" in line and str(folder / "model.safetensors") in line
    assert not (tmp_path / "run").exists()


def test_checkpoint_that_fails_to_load_is_one_line_and_leaves_nothing(tmp_path, capsys):
    # A valid header and config, but a tensor missing: found only when the weights are loaded.
    path = _tiny_checkpoint(tmp_path / "my_model")
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    del tensors[sorted(tensors)[0]]
    save_file(tensors, str(path), metadata=metadata)
    data = _audio_folder(tmp_path / "data")
    run = tmp_path / "new" / "run"
    code, out, err = _train(["--init-from", str(tmp_path / "my_model"), "--data", str(data), "--out", str(run),
                             "--device", "cpu"], capsys)
    assert code == 2
    assert "Traceback" not in err
    warning, error = err.strip().splitlines()  # the CPU warning, then the error
    assert warning.startswith("warning: training on the CPU") and "very slow" in warning and "--device cuda" in warning
    assert error.startswith("error: --init-from") and str(path) in error and "cannot load" in error
    assert not (tmp_path / "new").exists()


def test_a_failure_after_the_run_folder_was_made_removes_it(tmp_path, capsys, monkeypatch):
    def no_data(*args, **kwargs):
        raise ValueError("no readable audio files in any of the folders")  # the folder emptied meanwhile

    monkeypatch.setattr(training_main, "_loader", no_data)
    data = _audio_folder(tmp_path / "data")
    run = tmp_path / "a" / "b" / "run"
    code, _, err = _train(["--data", str(data), "--preset", "tiny", "--model-overrides", MICRO, "--steps", "1",
                           "--out", str(run), "--workers", "0"], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("error: --data: no readable audio files")
    assert "Traceback" not in err
    assert not (tmp_path / "a").exists()  # every folder this run made, and nothing else
    assert data.is_dir()


def test_help_shows_defaults_and_every_option_has_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exc:
        train_main(["train", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--lr LR peak learning rate" in text and "(default: 0.0001)" in text
    assert "--warmup WARMUP steps of linear learning-rate warm-up" in text and "(default: 10000)" in text
    assert "--seed SEED random seed" in text and "(default: 0)" in text
    assert "--batch-size BATCH_SIZE crops per step" in text and "(default: 16)" in text
    assert "--keep-summary-tokens" in text and "--redraw-summary-tokens" in text
    parser = training_main.Parser(prog="train")
    training_main.add_train_arguments(parser)
    missing = [a.option_strings for a in parser._actions if not a.help]
    assert missing == []


def _recipe_blocks() -> list:
    text = (ROOT / "docs" / "finetune.md").read_text()
    blocks = re.findall(r"```bash\n(python -m music2latent2.training train .*?)```", text, re.S)
    return [shlex.split(b.replace("\\\n", " "))[4:] for b in blocks]


def test_docs_recipe_without_the_users_folder_says_so(tmp_path, capsys, no_model, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a new user's folder: no my_music/ yet
    recipe = _recipe_blocks()[0]
    assert "my_music" in recipe
    code, _, err = _train(recipe, capsys)
    assert code == 2
    assert "--data my_music" in _one_error_line(err)
    assert not (tmp_path / "runs").exists()


def test_docs_example_on_the_bundled_clip_passes_the_checks(tmp_path, capsys, monkeypatch):
    def reached(*args, **kwargs):
        raise _Reached

    monkeypatch.setattr(Music2Latent2, "from_pretrained", classmethod(reached))
    monkeypatch.chdir(ROOT)  # as written: from the repository root
    args = _recipe_blocks()[1]
    assert args[args.index("--data") + 1] == "examples"
    args[args.index("--out") + 1] = str(tmp_path / "runs" / "try")
    with pytest.raises(_Reached):
        train_main(["train", *args])
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- summary tokens
def _summary(model: Music2Latent2) -> torch.Tensor:
    return model.encoder.summary_tokens.detach().clone()


@pytest.mark.parametrize("flag, kept", [(None, False), ("--keep-summary-tokens", True)])
def test_summary_token_switch_in_a_fine_tune(tmp_path, capsys, flag, kept):
    start = Music2Latent2.from_pretrained(_tiny_checkpoint(tmp_path / "shipped"))  # tokens at the small init
    data = _audio_folder(tmp_path / "data", seconds=1.0)
    run = tmp_path / "run"
    # Two steps: the fused RAdam gathers moments for its first five, so only a re-draw moves the tokens.
    code, out, err = _train(["--init-from", str(tmp_path / "shipped"), "--data", str(data), "--out", str(run),
                             "--more-steps", "2", "--batch-size", "2", "--warmup", "1", "--workers", "0",
                             "--cache-gb", "0.01", "--log-every", "1", "--device", "cpu",
                             *([flag] if flag else [])], capsys)
    assert code == 0, err
    assert err.startswith("warning: training on the CPU")
    final = Music2Latent2.from_pretrained(run / "final")
    if kept:
        assert "are kept as asked (--keep-summary-tokens)" in out
        assert torch.allclose(_summary(final), _summary(start), atol=1e-6)
    else:
        assert "are re-drawn at std 0.5" in out
        assert not torch.allclose(_summary(final), _summary(start), atol=1e-3)
        assert float(_summary(final).std()) == pytest.approx(0.5, rel=0.2)


def test_summary_token_modes_of_init_weights_from():
    def trainer(std=0.5):
        return Trainer(TrainConfig(preset="tiny", model_overrides=json.loads(MICRO), batch_size=2, total_steps=2,
                                   warmup_steps=1, summary_init_std=std, num_workers=0))

    torch.manual_seed(0)
    small = Music2Latent2(ModelConfig.from_preset("tiny", **json.loads(MICRO)))  # the modules' small init
    drawn = Music2Latent2(ModelConfig.from_preset("tiny", **json.loads(MICRO)))
    drawn.init_summary_tokens(0.5, torch.Generator().manual_seed(1))  # already at the scale
    for model, mode, redrawn in [(small, "auto", True), (drawn, "auto", False), (small, "keep", False),
                                 (drawn, "redraw", True)]:
        t = trainer()
        assert t.init_weights_from(model, summary_tokens=mode) is redrawn, (mode, redrawn)
        same = torch.equal(_summary(t.model), _summary(model))
        assert same is not redrawn
        assert torch.equal(_summary(t.ema), _summary(t.model))
    with pytest.raises(ValueError, match="summary_init_std"):
        trainer(None).init_weights_from(small, summary_tokens="redraw")
    with pytest.raises(ValueError, match="summary_tokens must be"):
        trainer().init_weights_from(small, summary_tokens="sometimes")
