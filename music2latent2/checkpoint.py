"""Inference checkpoints: ``model.safetensors`` with the ModelConfig in its metadata.

This module reads and writes (config, tensors) and knows no network class: building a model
from them is :meth:`~music2latent2.pretrained.PretrainedModule.from_pretrained`'s job, turning a
name into a local file is :mod:`music2latent2.hub`'s.

No pickles: tensors come from safetensors, the config from JSON in the file's metadata.
Reading is strict: a missing, unexpected or mis-shaped tensor is an error naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Mapping, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .fileio import atomic_write, safetensors_problem

__all__ = ["FORMAT_VERSION", "WEIGHTS_NAME", "weights_path", "save_checkpoint", "read_metadata", "read_config",
           "read_tensors", "sha256_file", "verify_sha256", "CheckpointError", "ChecksumMismatchError"]

FORMAT_VERSION = "1"
WEIGHTS_NAME = "model.safetensors"


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
    return atomic_write(p, lambda tmp: save_file(stored, tmp, metadata=metadata))


def read_metadata(path: Union[str, os.PathLike]) -> Dict[str, str]:
    """The safetensors metadata of a checkpoint, checked for a config and a known format version."""
    p = weights_path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    problem = safetensors_problem(p)
    if problem:
        raise CheckpointError(f"cannot read checkpoint {p}: not a valid safetensors file ({problem})")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint {p}: not a valid safetensors file ({err})") from err
    if "config" not in meta:
        raise CheckpointError(f"checkpoint {p} has no model config in its metadata")
    version = meta.get("music2latent2_format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {p} has format version {version!r}; this library reads {FORMAT_VERSION!r}")
    return meta


_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def _check_tensors(path: Path, expected: Dict[str, torch.Tensor]) -> None:
    """Raise CheckpointError naming every missing, unexpected, mis-shaped or wrongly typed tensor,
    reading only the file's header."""
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
            named; non-finite values are named too.
    """
    p = weights_path(path)
    _check_tensors(p, dict(expected))
    try:
        tensors = load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint {p}: {err}") from err
    bad = [k for k, t in tensors.items() if not _all_finite(t)]
    if bad:
        raise CheckpointError(f"checkpoint {p} has non-finite values in {bad[:5]}")
    return {k: t.float() if t.is_floating_point() else t for k, t in tensors.items()}
