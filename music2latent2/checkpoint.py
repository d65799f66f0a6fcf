"""Inference checkpoints: ``model.safetensors`` with the ModelConfig in its metadata.

This module reads and writes (config, tensors) and knows no network class: building a model
from them is :meth:`~music2latent2.pretrained.PretrainedModule.from_pretrained`'s job, turning a
name into a local file is :mod:`music2latent2.hub`'s.

No pickles: tensors come from safetensors, the config from JSON in the file's metadata.
Reading is strict: a missing, unexpected or mis-shaped tensor is an error naming it, and every
other way a local file can be unreadable (truncated, not safetensors, a corrupt header, corrupt
tensor data) is a :class:`CheckpointError` that names the file.

Content hash
------------
Every checkpoint written here (and every training state, :mod:`music2latent2.training.state`)
records ``content_sha256`` in its safetensors metadata: a hash of the tensor data alone, so
that a file whose bytes were damaged after it was written (a flipped bit on disk, a bad copy) is
refused on load instead of loading wrong weights silently. Files without the key (written before
it existed, like the bundled weights, whose whole-file sha256 the weights manifest pins) load as
before. The metadata itself (the config) is not covered.

``content_sha256`` is the lower-case hex SHA-256 of the concatenation, over the tensors in
ascending order of the UTF-8 bytes of their names, of one record per tensor::

    u64(len(name)) name u64(len(dtype)) dtype u64(ndim) u64(dim_0) ... u64(dim_ndim-1) u64(nbytes) data

where ``u64`` is an unsigned 64-bit little-endian integer, ``name`` the tensor's name in UTF-8,
``dtype`` its safetensors dtype code in ASCII (``F32``, ``F16``, ``BF16``, ``I64``, ``BOOL``,
...), the dims its shape (none for a scalar), ``nbytes`` the byte length of its data and
``data`` its raw bytes exactly as stored in the safetensors data region (little-endian,
row-major). It depends only on the (name, dtype, shape, bytes) of each tensor: not on their order
in the file, the header's layout or the other metadata. :func:`content_sha256` computes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .fileio import atomic_write, safetensors_problem

__all__ = ["FORMAT_VERSION", "WEIGHTS_NAME", "CONTENT_HASH_KEY", "weights_path", "save_checkpoint", "read_metadata",
           "read_config", "read_tensors", "read_safetensors_metadata", "content_sha256", "verify_content",
           "sha256_file", "verify_sha256", "CheckpointError", "ChecksumMismatchError", "ContentHashMismatchError"]

FORMAT_VERSION = "1"
WEIGHTS_NAME = "model.safetensors"
CONTENT_HASH_KEY = "content_sha256"
_REDO = "re-download or re-export it"


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, corrupt, or does not match its config."""


class ChecksumMismatchError(CheckpointError):
    """A checkpoint's sha256 differs from the one it was published with.

    Attributes:
        path: the rejected file.
        expected: the published sha256 (hex).
        actual: the sha256 of the file on disk (hex).
    """

    def __init__(self, path: Union[str, os.PathLike], expected: str, actual: str, note: str = "") -> None:
        self.path = Path(path)
        self.expected = expected
        self.actual = actual
        msg = f"sha256 mismatch for checkpoint {self.path}: expected {expected}, got {actual}"
        super().__init__(msg + (f"; {note}" if note else ""))


class ContentHashMismatchError(ChecksumMismatchError):
    """A checkpoint's tensor data differs from the ``content_sha256`` recorded when it was written.

    Attributes:
        path: the rejected file.
        expected: the ``content_sha256`` in the file's metadata.
        actual: the content hash of the tensor data as read.
    """

    def __init__(self, path: Union[str, os.PathLike], expected: str, actual: str) -> None:
        self.path = Path(path)
        self.expected = expected
        self.actual = actual
        CheckpointError.__init__(self, f"checkpoint {self.path}: the weights are corrupt (its tensor data hashes to "
                                       f"{actual}, not to the {CONTENT_HASH_KEY} {expected} recorded when it was "
                                       f"written); {_REDO}")


def sha256_file(path: Union[str, os.PathLike], block_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in ``block_size`` blocks so large checkpoints stay out of memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(block_size), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: Union[str, os.PathLike], expected: str) -> str:
    """Check a file against an expected hex sha256; raise :class:`ChecksumMismatchError` if it differs.

    Returns:
        The file's sha256 (equal to ``expected``, lower-cased).
    """
    expected = expected.strip().lower()
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumMismatchError(path, expected, actual)
    return actual


# torch dtype -> safetensors dtype code (the names the file header uses).
_DTYPE_CODES: Dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL"}
for _name, _code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"), ("float8_e4m3fn", "F8_E4M3"),
                     ("float8_e5m2", "F8_E5M2")):
    if isinstance(getattr(torch, _name, None), torch.dtype):
        _DTYPE_CODES[getattr(torch, _name)] = _code


def content_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """The ``content_sha256`` of a set of named tensors (defined in the module docstring).

    About 40 ms for the 41 MiB of the bundled small model on one CPU core: the bytes are hashed
    in place, without copies (a non-contiguous or non-CPU tensor is copied first).
    """
    digest = hashlib.sha256()
    for name in sorted(tensors, key=lambda n: n.encode("utf-8")):
        t = tensors[name].detach()
        if t.dtype not in _DTYPE_CODES:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        data = t.cpu().contiguous().reshape(-1).view(torch.uint8)
        name_bytes, code = name.encode("utf-8"), _DTYPE_CODES[t.dtype].encode("ascii")
        digest.update(struct.pack("<Q", len(name_bytes)) + name_bytes + struct.pack("<Q", len(code)) + code
                      + struct.pack(f"<{t.dim() + 2}Q", t.dim(), *t.shape, data.numel()))
        digest.update(data.numpy().data)  # a memoryview: no copy
    return digest.hexdigest()


def verify_content(path: Union[str, os.PathLike], tensors: Mapping[str, torch.Tensor],
                   metadata: Mapping[str, str]) -> Optional[str]:
    """Check tensors read from ``path`` against the ``content_sha256`` in its metadata.

    Args:
        tensors: every tensor of the file, in the dtype it is stored in.

    Returns:
        The content hash, or None for a file that records none (written before the key existed).

    Raises:
        ContentHashMismatchError: the data differs from what was written (the file is corrupt).
    """
    recorded = metadata.get(CONTENT_HASH_KEY)
    if recorded is None:
        return None
    actual = content_sha256(tensors)
    if actual != recorded.strip().lower():
        raise ContentHashMismatchError(path, recorded, actual)
    return actual


def _all_finite(t: torch.Tensor) -> bool:
    """True if a tensor has no NaN/Inf. min/max propagate both, and one aminmax pass is several times
    faster than a full isfinite mask on CPU (it matters for 100M-parameter checkpoints)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    return bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())


def weights_path(path: Union[str, os.PathLike]) -> Path:
    """The weights file of a checkpoint path: ``path/model.safetensors`` for a directory, else ``path``."""
    p = Path(path)
    return p / WEIGHTS_NAME if p.is_dir() else p


def save_checkpoint(path: Union[str, os.PathLike], config: ModelConfig, tensors: Mapping[str, torch.Tensor],
                    dtype: torch.dtype | None = None, extra_metadata: Dict[str, str] | None = None) -> Path:
    """Write a config and its tensors atomically (temp file + rename).

    Args:
        path: a directory (``model.safetensors`` and ``config.json`` are written inside) or a
            ``.safetensors`` file path.
        config: stored as JSON in the safetensors metadata (and in ``config.json`` for a directory).
        tensors: a model's ``state_dict``; copied to CPU.
        dtype: store floating-point tensors in this dtype (e.g. torch.float16 to halve the size).
        extra_metadata: more string key/values for the safetensors metadata.

    The metadata also records the tensors' ``content_sha256`` (see the module docstring).

    Returns:
        The path of the written ``.safetensors`` file.
    """
    p = Path(path)
    if p.suffix != ".safetensors":
        p.mkdir(parents=True, exist_ok=True)
        config_text = json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
        atomic_write(p / "config.json", lambda tmp: Path(tmp).write_text(config_text))
        p = p / WEIGHTS_NAME
    p.parent.mkdir(parents=True, exist_ok=True)
    stored = {}
    for name, t in tensors.items():
        t = t.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        stored[name] = t.contiguous()
    metadata = {"format": "pt", "music2latent2_format_version": FORMAT_VERSION, "config": config.to_json()}
    metadata.update(extra_metadata or {})
    metadata[CONTENT_HASH_KEY] = content_sha256(stored)  # last: extra_metadata cannot replace it
    return atomic_write(p, lambda tmp: save_file(stored, tmp, metadata=metadata))


_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


def _check_layout(p: Path) -> None:
    """Raise CheckpointError if ``p`` is not a whole safetensors file: not one at all, truncated,
    longer than its header says, or with a header that is not valid JSON."""
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(9)
        n = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
        looks_right = head[8:9] == b"{" and 2 <= n <= _MAX_HEADER
        raw = f.read(n - 1) if looks_right else b""
    if not looks_right:
        problem = safetensors_problem(p)
        if problem is None or problem.startswith("it is not a safetensors file"):  # say it once
            problem = "its first bytes are not a safetensors header"
        raise CheckpointError(f"cannot read checkpoint {p}: not a valid safetensors file ({problem})")
    if 8 + n > size:
        raise CheckpointError(f"cannot read checkpoint {p}: the file is truncated ({size} bytes, shorter than its "
                              f"{n}-byte header); {_REDO}")
    try:
        header = json.loads(b"{" + raw)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot read checkpoint {p}: its header is corrupt (not valid JSON: {err}); "
                              f"{_REDO}") from err
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"
            and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2 and isinstance(entry["data_offsets"][1], int)]
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        raise CheckpointError(f"cannot read checkpoint {p}: the file is truncated ({size} bytes; its header "
                              f"describes {expected}); {_REDO}")
    if size > expected:
        raise CheckpointError(f"cannot read checkpoint {p}: the file has {size - expected} bytes after the tensor "
                              f"data its header describes ({size} bytes, not {expected}); {_REDO}")


def read_safetensors_metadata(path: Union[str, os.PathLike]) -> Dict[str, str]:
    """The metadata of any safetensors file (a checkpoint or a training state), after checking
    that the file is whole and its header valid.

    Raises:
        CheckpointError: naming the file: not found, not safetensors, truncated, trailing bytes,
            or a corrupt header.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        _check_layout(p)
        with safe_open(str(p), framework="pt") as f:
            return dict(f.metadata() or {})
    except CheckpointError:
        raise
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {p}: {err.strerror or err}") from err
    except (SafetensorError, ValueError) as err:  # e.g. offsets or shapes that do not fit together
        raise CheckpointError(f"cannot read checkpoint {p}: its header is corrupt ({err}); {_REDO}") from err


def read_metadata(path: Union[str, os.PathLike]) -> Dict[str, str]:
    """The safetensors metadata of a checkpoint, checked for a config and a known format version."""
    p = weights_path(path)
    meta = read_safetensors_metadata(p)
    if "config" not in meta:
        raise CheckpointError(f"checkpoint {p} has no model config in its metadata")
    version = meta.get("music2latent2_format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {p} has format version {version!r}; this library reads {FORMAT_VERSION!r}")
    return meta


_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def _check_tensors(path: Path, expected: Dict[str, torch.Tensor]) -> Dict[str, str]:
    """Raise CheckpointError naming every missing, unexpected, mis-shaped or wrongly typed tensor,
    reading only the file's header. Returns the file's metadata."""
    meta = read_safetensors_metadata(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {}
            for k in f.keys():
                header = f.get_slice(k)
                found[k] = (tuple(header.get_shape()), str(header.get_dtype()))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(f"{k}: checkpoint {found[k][0]} vs model {tuple(v.shape)}"
                   for k, v in expected.items() if k in found and found[k][0] != tuple(v.shape))
    dtypes = sorted(f"{k}: {found[k][1]}" for k, v in expected.items()
                    if k in found and v.is_floating_point() and found[k][1] not in _FLOAT_DTYPES)
    parts = []
    if missing:
        parts.append(f"missing tensors {missing}")
    if unexpected:
        parts.append(f"unexpected tensors {unexpected}")
    if wrong:
        parts.append(f"mis-shaped tensors {wrong}")
    if dtypes:
        parts.append(f"tensors that must be floating point (F16, BF16, F32 or F64) but are not: {dtypes}")
    if parts:
        raise CheckpointError(f"checkpoint {path} does not match its config: " + "; ".join(parts))
    return meta


def read_config(path: Union[str, os.PathLike]) -> ModelConfig:
    """The ModelConfig stored in a checkpoint, with every field present, typed and in range.

    Raises:
        CheckpointError: missing or unreadable file, unknown format version, no config, or a
            config with a missing, mistyped or out-of-range field (named).
    """
    p = weights_path(path)
    meta = read_metadata(p)
    try:
        return ModelConfig.from_json(meta["config"], require_all=True)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint {p} has an invalid model config: {err}") from err


def read_tensors(path: Union[str, os.PathLike], expected: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Read a checkpoint's tensors strictly, floating-point ones as float32, on the CPU.

    Args:
        path: a ``.safetensors`` file or a directory holding ``model.safetensors``.
        expected: the tensors the model needs (names, shapes, dtypes), e.g. the ``state_dict`` of
            the model built on the ``meta`` device: compared with the file's header before any
            data is read, so a config that disagrees with the file is reported, not turned into
            a huge allocation.

    Raises:
        CheckpointError: each missing, unexpected, mis-shaped or non-floating-point tensor is
            named; non-finite values are named too. ContentHashMismatchError (a subclass) if the
            file records a ``content_sha256`` that its tensor data does not match.
    """
    p = weights_path(path)
    meta = _check_tensors(p, dict(expected))
    try:
        tensors = load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint {p}: {err}") from err
    verify_content(p, tensors, meta)  # before the finite check: a flipped bit can make a NaN
    bad = [k for k, t in tensors.items() if not _all_finite(t)]
    if bad:
        raise CheckpointError(f"checkpoint {p} has non-finite values in {bad[:5]}")
    return {k: t.float() if t.is_floating_point() else t for k, t in tensors.items()}
