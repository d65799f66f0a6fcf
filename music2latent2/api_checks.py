"""Argument checks and output conventions shared by :class:`~music2latent2.EncoderDecoder`'s methods.

Kept apart from the inference code so that reading ``inference.py`` means reading the algorithm;
here are the rules every public method applies the same way: integers that must not be
truncated, music2latent (v1) calls that must fail loudly rather than mean something else, and
outputs that must be ordinary tensors.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Optional, Tuple, TypeVar, Union, cast

import numpy as np
import torch

__all__ = ["PRECISIONS", "parse_precision", "require_int", "check_batch_size", "refuse_positional",
           "ignore_v1_memory_knob", "ordinary", "inference_api", "chunk_progress", "cpu_has_fast_bfloat16"]

PRECISIONS = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
              "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_precision(precision: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(precision, torch.dtype):
        if precision not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"precision must be float32, bfloat16 or float16, got {precision}")
        return precision
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def require_int(value: object, what: str) -> int:
    """``value`` as an int, else a TypeError starting with ``what``. Floats such as 1.7 and bools are
    refused rather than truncated by int()."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what}, got {value!r} ({type(value).__name__})")
    return int(value)


def check_batch_size(size: object) -> int:
    size = require_int(size, "max_batch_size must be an integer")
    if size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {size}")
    return size


def refuse_positional(method: str, extra: Tuple[Any, ...], v1_note: str) -> None:
    """A TypeError naming the keywords to use when ``extra`` positional arguments were given."""
    if extra:
        raise TypeError(f"{method}() takes only its first argument by position, got {1 + len(extra)} positional "
                        f"arguments: {v1_note}")


def ignore_v1_memory_knob(max_waveform_length: Optional[int]) -> None:
    if max_waveform_length is not None:
        warnings.warn("max_waveform_length is a music2latent (v1) option and is ignored: music2latent2 processes "
                      "max_batch_size chunks at a time, so memory does not grow with the audio length; use "
                      "max_batch_size= to bound memory", FutureWarning, stacklevel=3)


def ordinary(result: Any) -> Any:
    """Inference tensors (made under ``torch.inference_mode``) raise "Inference tensors cannot be
    saved for backward" in any trainable layer; a clone made outside the mode is an ordinary tensor.
    The copy costs one output buffer, far less than the network evaluations that made it."""
    if torch.is_inference_mode_enabled():  # a caller's inference mode: a clone would be one too
        return result
    if isinstance(result, tuple):
        return tuple(ordinary(r) for r in result)
    if isinstance(result, torch.Tensor) and result.is_inference():
        return result.clone()
    return result


F = TypeVar("F", bound=Callable[..., Any])


def inference_api(fn: F) -> F:
    """Run ``fn`` under ``torch.inference_mode()`` (no autograd bookkeeping at all) and hand back
    ordinary tensors (:func:`ordinary`), made outside the mode."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode():
            result = fn(*args, **kwargs)
        return ordinary(result)

    return cast(F, wrapper)


class _NoProgress:
    n = 0

    def update(self, count: int) -> None:
        self.n += count

    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def chunk_progress(total: int, what: str, enabled: bool) -> Any:
    """A tqdm bar over ``total`` chunks when ``enabled``, else a counter with the same interface."""
    if not enabled:
        return _NoProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="chunk", desc=what)


def cpu_has_fast_bfloat16() -> bool:
    """Whether oneDNN runs bfloat16 convolutions natively here (AVX-512 or AMX), not emulated."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
