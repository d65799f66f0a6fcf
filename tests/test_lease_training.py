"""What the trainer does for a device lease (issue 42), on CPU: no device-to-host read in a
training step, a compile cache that names its machine, the speed probe,
snapshots on request (and a final one), the measured speed in them, and a loader that takes in
corpus parts arriving while it trains, reading windows instead of whole files."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from test_training import _batch, _config
from torch.utils._python_dispatch import TorchDispatchMode

from music2latent2.training import Trainer
from music2latent2.training.__main__ import main as train_main
from music2latent2.training.compiling import (
    PROBE_STEPS,
    SpeedProbe,
    cache_environment_file,
    compile_environment,
    load_compile_cache,
)
from music2latent2.training.data import AudioSource, CropDataset, build_sources

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("optimizer", ["radam_fused", "adamw"])
def test_a_training_step_reads_nothing_back_from_the_device(optimizer):
    trainer = Trainer(_config(optimizer=optimizer))
    trainer.step_on_device(_batch(trainer, 0))  # the first step allocates the optimiser state
    with _CountOps() as counted:
        for step in (1, 2):
            trainer.step_on_device(_batch(trainer, step))
    assert sum(counted.ops.values()) > 100  # the mode saw the step's ops
    # .item(), bool() or float() of a tensor: a host sync on a GPU, one per step costs the overlap.
    assert counted.ops[torch.ops.aten._local_scalar_dense.default] == 0


def test_a_compile_cache_made_elsewhere_is_not_loaded(tmp_path):
    cache = tmp_path / "compile_cache.bin"
    cache.write_bytes(b"kernels")
    here = compile_environment(torch.device("cpu"))
    cache_environment_file(cache).write_text(json.dumps({**here, "device": "NVIDIA H200"}))
    said = []
    assert not load_compile_cache(str(cache), torch.device("cpu"), said.append)
    assert "made for" in said[0] and "NVIDIA H200" in said[0] and "not used" in said[0]
    cache_environment_file(cache).write_text(json.dumps(here))  # the right machine, but junk kernels
    said.clear()
    assert not load_compile_cache(str(cache), torch.device("cpu"), said.append)
    assert "unusable" in said[0]


def test_the_speed_probe_times_an_eager_and_a_compiled_window():
    syncs, record = [], {}
    probe = SpeedProbe(lambda: syncs.append(1), batch_size=4, compile_at=30, record=record)
    lines = [probe.after_step(n, compiled_now=True) for n in range(1, 60)]
    said = [line for line in lines if line]
    assert len(said) == 2 and said[0].startswith("speed: eager") and said[1].startswith("speed: compiled")
    assert "steps 5-30" in said[0] and f"steps 33-{33 + PROBE_STEPS}" in said[1]  # the compile step left out
    assert len(syncs) == 4  # two per window, none in between
    assert record["eager_samples_per_s"] == pytest.approx(4 * record["eager_steps_per_s"])
    assert record["compiled_steps_per_s"] > 0
    fell_back: dict = {}
    probe = SpeedProbe(lambda: None, 4, compile_at=30, record=fell_back)
    for n in range(1, 60):  # the compile fell back: no compiled speed is claimed
        probe.after_step(n, compiled_now=False)
    assert "eager_steps_per_s" in fell_back and "compiled_steps_per_s" not in fell_back
    eager_only: dict = {}
    probe = SpeedProbe(lambda: None, 4, compile_at=None, record=eager_only)
    for n in range(1, 30):
        probe.after_step(n, compiled_now=False)
    assert set(eager_only) == {"eager_steps_per_s", "eager_samples_per_s"}


def _audio_folder(path: Path, seconds: float, count: int, seed: int = 0, fmt: str = "flac") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        n = int(seconds * 44100)
        tone = 0.3 * np.sin(2 * np.pi * (220 + 50 * i) * np.arange(n) / 44100) + 0.05 * rng.standard_normal(n)
        sf.write(str(path / f"a{seed}-{i}.{fmt}"), tone.astype(np.float32), 44100)
    return path


def test_cli_snapshots_on_request_records_speed_and_ends_with_a_final_snapshot(tmp_path):
    data = _audio_folder(tmp_path / "data", 2.0, 2)
    request = tmp_path / "request"
    request.write_text("poll-1\n")  # a request already there when the run starts is answered
    run = tmp_path / "run"
    assert train_main(["train", "--data", str(data), "--out", str(run), "--preset", "tiny", "--model-overrides",
                       json.dumps({"n_fft": 256, "hop_length": 64, "freq_bins": 128, "chunk_frames": 16}),
                       "--steps", "30", "--batch-size", "2", "--warmup", "1", "--workers", "0", "--cache-gb", "0.01",
                       "--log-every", "10", "--save-every", "1000", "--eval-every", "1000", "--precision", "fp32",
                       "--compile", "off", "--snapshot-request", str(request), "--snapshot-piece-mib", "0.5"]) == 0
    indexes = sorted((json.loads(p.read_text()) for p in run.glob("snapshots/step-*/pieces.json")),
                     key=lambda i: i["step"])
    assert [i["request"] for i in indexes] == ["poll-1", "poll-1"] and indexes[0]["step"] < 30
    assert not indexes[0]["final"] and indexes[-1]["final"] and indexes[-1]["step"] == 30
    speed = indexes[-1]["speed"]
    assert speed["compile"] == "off" and speed["eager_steps_per_s"] > 0 and speed["batch_size"] == 2
    assert speed["eager_samples_per_s"] == pytest.approx(2 * speed["eager_steps_per_s"])


def test_window_reads_give_the_crops_of_whole_file_reads(tmp_path):
    folder = _audio_folder(tmp_path / "a", 3.0, 3, fmt="ogg")
    cached = AudioSource(folder, 1.0, cache_budget=10 ** 9)
    cached.preload()
    streamed = AudioSource(folder, 1.0, cache_budget=0)
    assert not any(cached.streamable(i, 67072) for i in range(3)) and all(streamed.streamable(i, 67072)
                                                                          for i in range(3))
    def no_whole_decode(index):
        raise AssertionError("a window read fell back to decoding the whole file")

    streamed.load = no_whole_decode  # the streamed crops must come from window reads alone
    a, b = CropDataset([cached], 1, 67072), CropDataset([streamed], 1, 67072)
    for seed in range(6):
        ra, rb = np.random.default_rng(seed), np.random.default_rng(seed)
        np.testing.assert_array_equal(a.sample(ra)[0], b.sample(rb)[0])


def test_the_loader_takes_in_files_that_arrive_while_it_trains(tmp_path):
    watch = tmp_path / "ARRIVED"
    music = _audio_folder(tmp_path / "music", 2.0, 2)
    speech = tmp_path / "speech"
    speech.mkdir()
    with pytest.raises(ValueError, match="no readable audio"):
        build_sources([str(speech)])  # an empty folder is an error without a watch file
    sources = build_sources([str(music), f"{speech}:3"], allow_empty=True)
    crops = CropDataset(sources, 1, 67072, watch=watch, watch_every_s=0.0)
    assert crops.source_probs.tolist() == [1.0, 0.0]  # nothing to draw from speech yet
    _audio_folder(speech, 2.0, 3, seed=1)
    watch.write_text("1 part\n")
    assert crops.take_in_new_files() == 3 and crops.take_in_new_files() == 0  # once per change of the file
    assert crops.source_probs.tolist() == pytest.approx([0.25, 0.75])
    rng = np.random.default_rng(0)
    drawn = {crops.sample(rng)[1] for _ in range(20)}
    assert drawn == {0, 1}
    time.sleep(0.01)
    _audio_folder(music, 2.0, 1, seed=2)
    watch.write_text("2 parts\n")
    crops.sample(rng)  # sample() looks at the watch file itself
    assert len(crops.sources[0].files) == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no readable audio files in any"):
        build_sources([str(tmp_path / "empty")], allow_empty=True)  # at least one folder must have audio
