"""A PyTorch dataset over a folder of ``.m2l`` latent files, for models that generate latents.

The usual loop of a generative-model author: ``music2latent2 encode music/ -o latents/`` once,
train on ``LatentDataset("latents/", crop_chunks=...)``, and decode what the model generates
with :meth:`~music2latent2.EncoderDecoder.decode`. Crops start on chunk boundaries: the K = 8
summary embeddings of a chunk are an unordered set, so a crop that starts inside a chunk would
cut a set in two and shift which positions belong together.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .fileio import find_files
from .latents_io import LatentMetadata, read_latent_header, read_latent_slice

__all__ = ["LatentDataset", "LatentStats", "find_latent_files"]

CHANNEL_POLICIES = ("split", "first")
Array = TypeVar("Array", np.ndarray, torch.Tensor)


def find_latent_files(root: Union[str, os.PathLike]) -> List[Path]:
    """Every ``.m2l`` file under ``root`` (recursive, any case, hidden files and folders skipped), sorted."""
    base = Path(root)
    if base.is_file():
        return [base]
    if not base.is_dir():
        raise FileNotFoundError(f"latent folder not found: {base}")
    return find_files(base, {".m2l"})


@dataclass(frozen=True)
class LatentStats:
    """Per-dimension mean and standard deviation of latents, over every position of a dataset.

    Attributes:
        mean, std: (d_lat,) float32.
        positions: latent vectors the statistics were computed over.
    """

    mean: torch.Tensor
    std: torch.Tensor
    positions: int

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write as JSON (keep it next to a model trained on normalised latents)."""
        Path(path).write_text(json.dumps({"mean": self.mean.tolist(), "std": self.std.tolist(),
                                          "positions": self.positions}, indent=1))

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> LatentStats:
        data = json.loads(Path(path).read_text())
        return cls(torch.tensor(data["mean"], dtype=torch.float32), torch.tensor(data["std"], dtype=torch.float32),
                   int(data["positions"]))


class LatentDataset(Dataset):
    """Latent sequences from ``.m2l`` files, cropped on chunk boundaries.

    Each item is a float32 tensor (d_lat, L) = (64, crop_chunks * K): one latent sequence,
    positions ``K*t .. K*t+K-1`` holding chunk t's summary embeddings, as ``encode`` returns them.

    Args:
        root: a folder searched recursively for ``.m2l`` files (hidden ones skipped), or one file.
        crop_chunks: chunks per item (each 32,768 samples, ~0.74 s); files with fewer chunks are
            left out and listed in :attr:`skipped`. None gives whole sequences (their lengths
            differ: use ``batch_size=1`` or a collate function of your own).
        channels: ``"split"`` (default) makes every latent sequence of a file its own item: each
            channel of a file made by a mono model (a stereo model gives one sequence per file);
            ``"first"`` takes only a file's first sequence.
        normalize: standardise each of the d_lat dimensions with :attr:`stats`; undo it with
            :meth:`denormalize` before decoding.
        stats: statistics to normalise with (e.g. the training set's, for a validation set);
            default: computed over every position of this dataset's files when first needed.
        random_crop: draw each crop's start at random (torch's global generator, so
            ``torch.manual_seed`` and DataLoader workers seed it); False starts every crop at
            the first chunk.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: no usable file, a bad argument, or files made by different models (their
            d_lat, K or latent_scale differ), naming the file.
        LatentFileError: a corrupt ``.m2l`` file, naming it.
    """

    def __init__(self, root: Union[str, os.PathLike], *, crop_chunks: Optional[int] = None,
                 channels: str = "split", normalize: bool = False, stats: Optional[LatentStats] = None,
                 random_crop: bool = True) -> None:
        if crop_chunks is not None and (isinstance(crop_chunks, bool) or not isinstance(crop_chunks, int)
                                        or crop_chunks < 1):
            raise ValueError(f"crop_chunks must be a positive integer or None, got {crop_chunks!r}")
        if channels not in CHANNEL_POLICIES:
            raise ValueError(f"channels must be one of {CHANNEL_POLICIES}, got {channels!r}")
        self.root = Path(root)
        self.crop_chunks = crop_chunks
        self.normalize = bool(normalize)
        self.random_crop = bool(random_crop)
        files = find_latent_files(root)
        if not files:
            raise ValueError(f"no .m2l files under {self.root}: make them with `music2latent2 encode AUDIO -o "
                             f"{self.root}`")
        self.files: List[Path] = []
        self.metadata: List[LatentMetadata] = []
        self.skipped: List[Path] = []
        self._items: List[Tuple[int, int, int]] = []  # (file index, sequence, chunks)
        first: Optional[Tuple[Path, LatentMetadata]] = None
        for path in files:
            shape, meta = read_latent_header(path)
            if first is None:
                first = (path, meta)
            else:
                _check_same_model(first, path, meta)
            chunks = shape[-1] // meta.summary_tokens
            if crop_chunks is not None and chunks < crop_chunks:
                self.skipped.append(path)
                continue
            index = len(self.files)
            self.files.append(path)
            self.metadata.append(meta)
            sequences = shape[0] if channels == "split" else 1
            self._items += [(index, s, chunks) for s in range(sequences)]
        assert first is not None
        self.summary_tokens = first[1].summary_tokens
        self.latent_dim = first[1].latent_dim
        self.latent_scale = first[1].latent_scale
        if not self._items:  # only crops can leave files out
            seconds = (crop_chunks or 0) * first[1].chunk_samples / first[1].model_sample_rate
            raise ValueError(f"all {len(files)} .m2l files under {self.root} are shorter than crop_chunks="
                             f"{crop_chunks} chunks ({seconds:.2f} s): use a smaller crop_chunks")
        self._stats = stats
        if stats is not None and tuple(stats.mean.shape) != (self.latent_dim,):
            raise ValueError(f"stats are for {tuple(stats.mean.shape)} dimensions, the latents have {self.latent_dim}")

    def __len__(self) -> int:
        return len(self._items)

    def source(self, index: int) -> Tuple[Path, int]:
        """The file and the sequence (channel) that item ``index`` comes from."""
        file_index, sequence, _ = self._items[index]
        return self.files[file_index], sequence

    def __getitem__(self, index: int) -> torch.Tensor:
        file_index, sequence, chunks = self._items[index]
        k = self.summary_tokens
        take = chunks if self.crop_chunks is None else self.crop_chunks
        start = 0
        if self.random_crop and take < chunks:
            start = int(torch.randint(chunks - take + 1, ()))
        z = read_latent_slice(self.files[file_index], sequence, start * k, (start + take) * k)  # (d_lat, take*K)
        if self.normalize:
            stats = self.stats
            z = (z - stats.mean[:, None]) / stats.std[:, None]
        return z

    @property
    def stats(self) -> LatentStats:
        """Per-dimension mean and std over every position of every item's whole sequence."""
        if self._stats is None:
            self._stats = _compute_stats([self.source(i) for i in range(len(self))], self.latent_dim)
        return self._stats

    def denormalize(self, latents: Array) -> Array:
        """Undo ``normalize=True`` on (..., d_lat, L) latents (e.g. a model's output) before decoding."""
        stats = self.stats
        if isinstance(latents, np.ndarray):
            return latents * stats.std.numpy()[:, None] + stats.mean.numpy()[:, None]
        std, mean = stats.std.to(latents), stats.mean.to(latents)
        return latents * std[:, None] + mean[:, None]

    def __repr__(self) -> str:
        crop = "whole sequences" if self.crop_chunks is None else f"crop_chunks={self.crop_chunks}"
        return (f"LatentDataset({str(self.root)!r}: {len(self)} sequences from {len(self.files)} files, {crop}, "
                f"{len(self.skipped)} too short)")


def _check_same_model(first: Tuple[Path, LatentMetadata], path: Path, meta: LatentMetadata) -> None:
    ref_path, ref = first
    for name in ("latent_dim", "summary_tokens"):
        if getattr(meta, name) != getattr(ref, name):
            raise ValueError(f"{path} has {name}={getattr(meta, name)} but {ref_path} has {getattr(ref, name)}: "
                             "a dataset's latents must all come from one model")
    if not math.isclose(meta.latent_scale, ref.latent_scale, rel_tol=1e-6):
        raise ValueError(f"{path} has latent_scale={meta.latent_scale} but {ref_path} has {ref.latent_scale}: "
                         "a dataset's latents must all come from one model")


def _compute_stats(sources: Sequence[Tuple[Path, int]], latent_dim: int) -> LatentStats:
    total = torch.zeros(latent_dim, dtype=torch.float64)
    squares = torch.zeros(latent_dim, dtype=torch.float64)
    count = 0
    for path, sequence in sources:
        z = read_latent_slice(path, sequence, 0, None).double()  # (d_lat, L)
        total += z.sum(dim=1)
        squares += (z * z).sum(dim=1)
        count += z.shape[1]
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)  # a dead dimension stays finite
    return LatentStats(mean.float(), std.float(), count)
