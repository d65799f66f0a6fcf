"""The content hash of checkpoints and training states, and a clear error for every way a local
checkpoint can fail to load (each names the file)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from music2latent2 import EncoderDecoder, ModelConfig, Music2Latent2
from music2latent2.checkpoint import (
    CONTENT_HASH_KEY,
    CheckpointError,
    ChecksumMismatchError,
    ContentHashMismatchError,
    content_sha256,
    read_config,
    read_metadata,
    read_tensors,
)

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "music2latent2" / "weights" / "m2l2-small.safetensors"


@pytest.fixture(scope="module")
def model() -> Music2Latent2:
    torch.manual_seed(3)
    return Music2Latent2(ModelConfig.from_preset("tiny")).eval()


@pytest.fixture(scope="module")
def saved(model: Music2Latent2, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model.save_pretrained(tmp_path_factory.mktemp("hash") / "tiny.safetensors")


def header(path: Path) -> Tuple[int, Dict[str, Any]]:
    """(length of the JSON header, the parsed header) of a safetensors file."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8:8 + n])


def flipped(src: Path, dst: Path, offset: int, mask: int = 0x01) -> Path:
    data = bytearray(src.read_bytes())
    data[offset] ^= mask
    dst.write_bytes(bytes(data))
    return dst


def data_offset(path: Path, name: str) -> int:
    """The file offset of the first byte of tensor ``name``'s data."""
    n, head = header(path)
    return 8 + n + head[name]["data_offsets"][0]


def rewritten(src: Path, dst: Path, drop: Tuple[str, ...] = (), **changes: str) -> Path:
    """``src`` written again by safetensors itself, with metadata keys dropped or changed."""
    with safe_open(str(src), framework="pt") as f:
        meta = {k: v for k, v in (f.metadata() or {}).items() if k not in drop}
    save_file(load_file(str(src)), str(dst), metadata={**meta, **changes})
    return dst


def reference_hash(path: Path) -> str:
    """content_sha256 computed from the file's bytes alone, as the checkpoint module docstring
    defines it: a second implementation, sharing no code with the library's."""
    data = path.read_bytes()
    n, head = header(path)
    digest = hashlib.sha256()
    names = sorted((k for k in head if k != "__metadata__"), key=lambda k: k.encode("utf-8"))
    for name in names:
        entry = head[name]
        start, end = entry["data_offsets"]
        raw, code = name.encode("utf-8"), entry["dtype"].encode("ascii")
        digest.update(struct.pack("<Q", len(raw)) + raw + struct.pack("<Q", len(code)) + code)
        digest.update(struct.pack("<Q", len(entry["shape"])) + b"".join(struct.pack("<Q", d) for d in entry["shape"]))
        digest.update(struct.pack("<Q", end - start) + data[8 + n + start:8 + n + end])
    return digest.hexdigest()


# --------------------------------------------------------------------------- the hash itself
def test_saved_checkpoints_record_the_hash_of_their_tensor_data(model: Music2Latent2, saved: Path,
                                                                tmp_path: Path) -> None:
    meta = read_metadata(saved)
    assert meta[CONTENT_HASH_KEY] == content_sha256(model.state_dict()) == reference_hash(saved)
    # fp16 storage: the hash is over the bytes as stored, so another implementation can check it.
    half = model.save_pretrained(tmp_path / "half", dtype=torch.float16)
    half_meta = read_metadata(half)
    assert half_meta[CONTENT_HASH_KEY] == reference_hash(half) != meta[CONTENT_HASH_KEY]
    assert half_meta[CONTENT_HASH_KEY] == content_sha256({k: v.half() for k, v in model.state_dict().items()})
    # extra_metadata cannot replace it.
    forced = model.save_pretrained(tmp_path / "forced.safetensors", extra_metadata={CONTENT_HASH_KEY: "0" * 64})
    assert read_metadata(forced)[CONTENT_HASH_KEY] == meta[CONTENT_HASH_KEY]
    # Neither the other metadata nor the file's layout is part of it.
    other = rewritten(saved, tmp_path / "other.safetensors", training_step="7")
    assert other.read_bytes() != saved.read_bytes() and reference_hash(other) == meta[CONTENT_HASH_KEY]


def test_untouched_file_loads_and_round_trips(model: Music2Latent2, saved: Path) -> None:
    loaded = Music2Latent2.from_pretrained(saved)
    state = loaded.state_dict()
    assert state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key
    assert content_sha256(state) == read_metadata(saved)[CONTENT_HASH_KEY]


def test_hash_does_not_depend_on_insertion_order_but_on_every_part_of_each_tensor() -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {"b.weight": torch.randn(3, 4, generator=g), "a.bias": torch.randn(4, generator=g),
               "c.scalar": torch.tensor(2.5), "d.index": torch.arange(6), "e.mask": torch.tensor([True, False]),
               "f.half": torch.randn(5, generator=g).bfloat16(), "g.empty": torch.zeros(0, 3)}
    digest = content_sha256(tensors)
    assert digest == content_sha256(dict(reversed(list(tensors.items()))))
    shuffled = [list(tensors)[i] for i in (3, 0, 6, 2, 5, 1, 4)]
    assert digest == content_sha256({k: tensors[k] for k in shuffled})
    # A non-contiguous view hashes as its contiguous copy (what the file would hold).
    assert content_sha256({**tensors, "b.weight": tensors["b.weight"].t().contiguous().t()}) == digest
    changed = {
        "a byte": {**tensors, "a.bias": tensors["a.bias"].clone().index_fill_(0, torch.tensor([1]), 0.0)},
        "a name": {**{k: v for k, v in tensors.items() if k != "a.bias"}, "a.bia": tensors["a.bias"]},
        "a dtype": {**tensors, "d.index": tensors["d.index"].int()},
        "a shape": {**tensors, "b.weight": tensors["b.weight"].reshape(4, 3)},
        "an empty shape": {**tensors, "g.empty": torch.zeros(3, 0)},
        "a tensor less": {k: v for k, v in tensors.items() if k != "g.empty"},
        "bytes moved between tensors": {**tensors, "a.bias": tensors["a.bias"][:3], "b.weight": tensors["b.weight"],
                                        "a.bias2": tensors["a.bias"][3:]},
    }
    for what, other in changed.items():
        assert content_sha256(other) != digest, what
    assert len(digest) == 64 and digest == digest.lower()


def test_bundled_weights_and_files_without_the_key_load_as_before(saved: Path, model: Music2Latent2,
                                                                  tmp_path: Path) -> None:
    old = rewritten(saved, tmp_path / "old.safetensors", drop=(CONTENT_HASH_KEY,))
    assert CONTENT_HASH_KEY not in read_metadata(old)
    loaded = Music2Latent2.from_pretrained(old)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # The bundled weights predate the key; the manifest pins their whole-file sha256 instead.
    assert CONTENT_HASH_KEY not in read_metadata(BUNDLED)
    assert isinstance(Music2Latent2.from_pretrained(BUNDLED), Music2Latent2)


# --------------------------------------------------------------------------- corrupt tensor data
def test_a_flipped_byte_in_tensor_data_is_refused_naming_the_file(saved: Path, tmp_path: Path) -> None:
    _, head = header(saved)
    name = next(k for k, v in head.items() if k != "__metadata__" and v["dtype"] == "F32" and v["shape"])
    bad = flipped(saved, tmp_path / "flipped.safetensors", data_offset(saved, name))  # lowest mantissa bit
    assert bad.stat().st_size == saved.stat().st_size
    value = load_file(str(bad))[name].reshape(-1)[0]
    assert torch.isfinite(value) and value != load_file(str(saved))[name].reshape(-1)[0]  # finite, just wrong
    for load in (lambda: Music2Latent2.from_pretrained(bad), lambda: EncoderDecoder(str(bad), device="cpu"),
                 lambda: read_tensors(bad, load_file(str(saved)))):
        with pytest.raises(ContentHashMismatchError) as info:
            load()
        message = str(info.value)
        assert str(bad) in message and "weights are corrupt" in message and "re-download or re-export" in message
        assert info.value.path == bad and info.value.expected == read_metadata(saved)[CONTENT_HASH_KEY]
        assert isinstance(info.value, ChecksumMismatchError) and isinstance(info.value, CheckpointError)
    # A flip that makes a NaN is reported as corruption too (the hash is checked first).
    nan = tmp_path / "nan.safetensors"
    data = bytearray(saved.read_bytes())
    start = data_offset(saved, name)
    data[start:start + 4] = struct.pack("<f", float("nan"))
    nan.write_bytes(bytes(data))
    with pytest.raises(ContentHashMismatchError, match="weights are corrupt"):
        Music2Latent2.from_pretrained(nan)


def test_every_tensor_is_covered(saved: Path, tmp_path: Path) -> None:
    """A flipped bit in the last byte of any of a spread of tensors (first, last, small, large) is caught."""
    _, head = header(saved)
    names = sorted(k for k in head if k != "__metadata__")
    sizes = {k: head[k]["data_offsets"][1] - head[k]["data_offsets"][0] for k in names}
    picks = {names[0], names[-1], min(names, key=sizes.__getitem__), max(names, key=sizes.__getitem__)}
    picks |= set(names[:: max(1, len(names) // 8)])
    n = header(saved)[0]
    for name in sorted(picks):
        last = 8 + n + head[name]["data_offsets"][1] - 1
        bad = flipped(saved, tmp_path / "bad.safetensors", last, 0x80)
        with pytest.raises(CheckpointError, match=f"{bad}: the weights are corrupt"):
            read_tensors(bad, load_file(str(saved)))


# --------------------------------------------------------------------------- other load failures
def test_a_flipped_byte_in_the_header_is_a_clear_error(saved: Path, tmp_path: Path) -> None:
    n, head = header(saved)
    text = saved.read_bytes()[8:8 + n]
    name = sorted(k for k in head if k != "__metadata__")[5]
    cases = {  # where in the header -> what the message says
        b'{"': ("header is corrupt", 1),  # JSON syntax: the first quote
        b'{': ("not a valid safetensors file (its first bytes are not a safetensors header)", 0),
        f'"{name}"'.encode(): ("missing tensors", 2),  # a letter of a tensor name
        b'"dtype":"F32"': ("header is corrupt", 10),  # F32 -> F#2
        b'"data_offsets":[': ("header is corrupt", len('"data_offsets":[')),  # an offset digit
        b'\\"dim\\": ': ("invalid model config", 3),  # a letter of a config field name
        b'\\"dim\\": 32': ("mis-shaped tensors", len('\\"dim\\": ')),  # 32 -> 22: the tensors do not fit
        CONTENT_HASH_KEY.encode() + b'":"': ("weights are corrupt", len(CONTENT_HASH_KEY) + 4),  # the hash itself
    }
    for i, (anchor, (message, shift)) in enumerate(cases.items()):
        at = text.index(anchor) + shift
        bad = flipped(saved, tmp_path / f"head{i}.safetensors", 8 + at, 0x10 if anchor == b'"dtype":"F32"' else 0x01)
        with pytest.raises(CheckpointError) as info:
            Music2Latent2.from_pretrained(bad)
        assert str(bad) in str(info.value) and message in str(info.value), (anchor, str(info.value))


def test_header_flips_anywhere_never_escape_as_raw_errors(saved: Path, tmp_path: Path) -> None:
    """A sweep of single-bit flips across the header: each is a CheckpointError naming the file, or
    (a config value that stays valid, e.g. a digit of sigma_data) a model that loads."""
    n, _ = header(saved)
    bad = tmp_path / "sweep.safetensors"
    outcomes = set()
    for at in range(8, 8 + n, max(1, n // 40)):
        flipped(saved, bad, at)
        try:
            Music2Latent2.from_pretrained(bad)
            outcomes.add("loaded")
        except CheckpointError as err:
            assert str(bad) in str(err), (at, str(err))
            outcomes.add(type(err).__name__)
    assert "CheckpointError" in outcomes


def test_truncated_padded_and_foreign_files(saved: Path, tmp_path: Path) -> None:
    data = saved.read_bytes()
    n, _ = header(saved)
    cases = {
        "in_data": (data[:-100], "the file is truncated"),
        "in_header": (data[: 8 + n // 2], "the file is truncated"),
        "before_header": (data[:5], "not a valid safetensors file (it is only 5 bytes long)"),
        "empty": (b"", "not a valid safetensors file (it is empty)"),
        "padded": (data + b"\0" * 16, "16 bytes after the tensor data"),
        "garbage": (b"\x13" * 4096, "not a valid safetensors file"),
        "text": (b"model weights\n" * 100, "not a valid safetensors file"),
    }
    for label, (content, message) in cases.items():
        bad = tmp_path / f"{label}.safetensors"
        bad.write_bytes(content)
        with pytest.raises(CheckpointError) as info:
            Music2Latent2.from_pretrained(bad)
        assert str(bad) in str(info.value) and message in str(info.value), (label, str(info.value))


def test_config_that_is_not_json_and_a_broken_config_json(saved: Path, tmp_path: Path) -> None:
    bad = rewritten(saved, tmp_path / "config.safetensors", config='{"dim": 32,')
    with pytest.raises(CheckpointError, match=f"{bad} has an invalid model config: model config is not valid JSON"):
        Music2Latent2.from_pretrained(bad)
    not_object = rewritten(saved, tmp_path / "list.safetensors", config="[1, 2]")
    with pytest.raises(CheckpointError, match="invalid model config: model config JSON must be an object"):
        read_config(not_object)
    # config.json beside model.safetensors is for people and other tools: the config that counts
    # is the one in the weights file, so a damaged config.json does not stop a load.
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(saved.read_bytes())
    (folder / "config.json").write_text('{"dim": ')
    assert read_config(folder) == read_config(saved)
    assert isinstance(Music2Latent2.from_pretrained(folder), Music2Latent2)


def test_a_folder_without_weights_names_the_file_it_looked_for(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.json").write_text(ModelConfig.from_preset("tiny").to_json())
    with pytest.raises(CheckpointError, match=f"checkpoint not found: {folder / 'model.safetensors'} "
                                              rf"\(the folder {folder} holds no model.safetensors\)"):
        Music2Latent2.from_pretrained(folder)


def test_missing_and_mistyped_tensors_name_the_file(saved: Path, tmp_path: Path) -> None:
    with safe_open(str(saved), framework="pt") as f:
        meta = {k: v for k, v in (f.metadata() or {}).items() if k != CONTENT_HASH_KEY}
    state = load_file(str(saved))
    first = sorted(state)[0]
    missing = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in state.items() if k != first}, str(missing), metadata=meta)
    with pytest.raises(CheckpointError, match=rf"checkpoint {missing} does not match its config: missing tensors "
                                              rf"\['{first}'\]"):
        Music2Latent2.from_pretrained(missing)
    shaped = tmp_path / "shaped.safetensors"
    save_file({**state, first: torch.zeros(7)}, str(shaped), metadata=meta)
    with pytest.raises(CheckpointError, match=f"{shaped} does not match its config: mis-shaped tensors .*{first}"):
        Music2Latent2.from_pretrained(shaped)
    typed = tmp_path / "typed.safetensors"
    save_file({**state, first: state[first].to(torch.int16)}, str(typed), metadata=meta)
    with pytest.raises(CheckpointError, match=f"{typed} does not match its config: .*must be floating point"):
        Music2Latent2.from_pretrained(typed)
    # Re-saving with the old hash after changing the data (here: to float64) is refused as corrupt.
    stale = tmp_path / "stale.safetensors"
    save_file({k: v.double() for k, v in state.items()}, str(stale),
              metadata={**meta, CONTENT_HASH_KEY: read_metadata(saved)[CONTENT_HASH_KEY]})
    with pytest.raises(ContentHashMismatchError, match=str(stale)):
        Music2Latent2.from_pretrained(stale)


# --------------------------------------------------------------------------- training states
MICRO = {"n_fft": 256, "hop_length": 64, "freq_bins": 128, "chunk_frames": 16}


@pytest.fixture(scope="module")
def state_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from music2latent2.training import TrainConfig, Trainer, crop_samples, save_state

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # restored below: later tests compare outputs with runs at the default count
    try:
        trainer = Trainer(TrainConfig(preset="tiny", model_overrides=dict(MICRO), batch_size=2, lr=1e-3,
                                      warmup_steps=1, total_steps=10, ema_momentum=0.9, precision="fp32", seed=0))
        c = trainer.model.config
        n = crop_samples(c.chunk_samples, c.n_fft, c.hop_length)
        trainer.train_step(0.1 * torch.randn(2, 1, n, generator=torch.Generator().manual_seed(0)))
        path = save_state(trainer, tmp_path_factory.mktemp("state") / "run")
    finally:
        torch.set_num_threads(threads)
    yield path


def _fresh_trainer() -> Any:
    from music2latent2.training import TrainConfig, Trainer

    return Trainer(TrainConfig(preset="tiny", model_overrides=dict(MICRO), batch_size=2, lr=1e-3, warmup_steps=1,
                               total_steps=10, ema_momentum=0.9, precision="fp32", seed=5))


def test_training_state_records_and_checks_the_hash(state_file: Path, tmp_path: Path) -> None:
    from music2latent2.training import load_state, read_state_configs

    with safe_open(str(state_file), framework="pt") as f:
        meta = dict(f.metadata() or {})
    assert meta[CONTENT_HASH_KEY] == content_sha256(load_file(str(state_file))) == reference_hash(state_file)
    trainer = _fresh_trainer()
    load_state(trainer, state_file)
    assert trainer.step == 1
    # One flipped bit in any tensor (here an optimiser moment, then an EMA weight) stops a resume.
    _, head = header(state_file)
    for prefix in ("optim/", "ema/"):
        name = next(k for k in sorted(head) if k.startswith(prefix) and head[k]["dtype"] == "F32")
        bad = flipped(state_file, tmp_path / "state.safetensors", data_offset(state_file, name))
        assert read_state_configs(bad)[1] == read_state_configs(state_file)[1]  # the header is fine
        with pytest.raises(ContentHashMismatchError, match=f"{bad}: the weights are corrupt"):
            load_state(_fresh_trainer(), bad)
    # A state written before the key existed still resumes.
    old = rewritten(state_file, tmp_path / "old.safetensors", drop=(CONTENT_HASH_KEY,))
    load_state(_fresh_trainer(), old)


def test_training_state_load_failures_name_the_file(state_file: Path, tmp_path: Path) -> None:
    from music2latent2.training import load_state, read_state_configs

    data = state_file.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {truncated}: the file is truncated"):
        read_state_configs(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 100)
    with pytest.raises(CheckpointError, match=f"{garbage}: not a valid safetensors file"):
        load_state(_fresh_trainer(), garbage)
    info = rewritten(state_file, tmp_path / "info.safetensors", info="{step: 1")
    with pytest.raises(CheckpointError, match=f"training state {info} is corrupt: its 'info' metadata is not valid"):
        load_state(_fresh_trainer(), info)
    config = rewritten(state_file, tmp_path / "config.safetensors", train_config="not json")
    with pytest.raises(CheckpointError, match=f"{config} is corrupt: its 'train_config' metadata is not valid JSON"):
        read_state_configs(config)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match=f"{foreign} is not a music2latent2 training state"):
        read_state_configs(foreign)
    with pytest.raises(CheckpointError, match="training state not found"):
        read_state_configs(tmp_path / "nowhere")
    # A tensor missing from a state whose metadata is otherwise intact.
    with safe_open(str(state_file), framework="pt") as f:
        meta = {k: v for k, v in (f.metadata() or {}).items() if k != CONTENT_HASH_KEY}
    tensors = load_file(str(state_file))
    gone = next(k for k in sorted(tensors) if k.startswith("ema/"))
    missing = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in tensors.items() if k != gone}, str(missing), metadata=meta)
    with pytest.raises(CheckpointError, match=f"(?s)training state {missing} cannot be restored into this run "
                                              rf"\(RuntimeError: .*{gone[len('ema/'):]}"):
        load_state(_fresh_trainer(), missing)
