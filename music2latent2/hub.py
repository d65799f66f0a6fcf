"""Resolving a model argument (None, a name, a path) to a loaded :class:`Music2Latent2`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from .checkpoint import load_checkpoint
from .model import Music2Latent2

__all__ = ["load_model"]


def load_model(name_or_path: Union[str, os.PathLike, None] = None) -> Music2Latent2:
    """Load a model from a local checkpoint file or directory."""
    if name_or_path is not None and Path(name_or_path).exists():
        return load_checkpoint(name_or_path)
    raise ValueError(f"no local checkpoint at {name_or_path!r}; pass a Music2Latent2 module or a checkpoint path")


_ = Optional
