"""Training data: weighted folders of audio files -> endless random two-chunk crops.

Each item is ``(audio_channels, 67072)`` float32: 67,072 = 2 * 32,768 + 2,048 - 512 samples,
exactly the span behind two consecutive chunks of 64 STFT frames. Files of any format and
sample rate soundfile reads are resampled to 44.1 kHz once and cached (decoded audio is kept
in memory up to a byte budget; preloading before the DataLoader forks shares it with workers).
"""

from __future__ import annotations

import math
import signal
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..audio import find_audio_files, load_audio, resample
from ..spectral import ChunkGeometry

__all__ = ["crop_samples", "parse_data_spec", "AudioSource", "CropDataset", "StepBatches", "make_loader",
           "make_step_loader", "build_sources", "describe_sources", "worker_seed", "batch_seed"]


def crop_samples(chunk_samples: int = 32768, n_fft: int = 2048, hop_length: int = 512) -> int:
    """Samples behind the two consecutive chunks of one training item: 67,072 for the paper."""
    return ChunkGeometry(chunk_samples, n_fft, hop_length).span(2)


def parse_data_spec(spec: str) -> Tuple[Path, float]:
    """``"DIR"`` or ``"DIR:WEIGHT"`` -> (path, weight). Weight defaults to 1 and must be > 0."""
    path, weight = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
            path = head
        except ValueError:
            path = spec  # a colon that is part of the path
    if not weight > 0 or not math.isfinite(weight):
        raise ValueError(f"data weight must be a positive number, got {weight} in {spec!r}")
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"data folder not found: {p}")
    return p, weight


@dataclass
class AudioSource:
    """One data folder: its files, their lengths at the model rate, and a decoded-audio cache."""

    folder: Path
    weight: float
    sample_rate: int = 44100
    files: List[Path] = field(default_factory=list)
    lengths: List[int] = field(default_factory=list)
    cache: Dict[int, np.ndarray] = field(default_factory=dict)
    cache_budget: int = 0  # bytes of decoded audio this source may keep in memory
    cached_bytes: int = 0

    def __post_init__(self) -> None:
        if not self.files:
            for path in find_audio_files(self.folder):
                try:
                    info = sf.info(str(path))
                except Exception:  # unreadable file: leave it out rather than fail mid-training
                    continue
                if info.frames > 0:
                    self.files.append(path)
                    self.lengths.append(int(info.frames * self.sample_rate / info.samplerate))
        if not self.files:
            raise ValueError(f"no readable audio files in {self.folder}")

    def shard(self, rank: int, world_size: int) -> bool:
        """Keep every ``world_size``-th file from the ``rank``-th on (one data-parallel rank's share,
        so each rank decodes and caches only its own files). A folder with fewer files than ranks
        is left whole (every rank draws from all of it). Returns whether it was split."""
        if world_size <= 1 or len(self.files) < world_size:
            return False
        self.files, self.lengths = self.files[rank::world_size], self.lengths[rank::world_size]
        return True

    @property
    def seconds(self) -> float:
        return sum(self.lengths) / self.sample_rate

    def _decode(self, index: int) -> np.ndarray:
        data, sr = load_audio(self.files[index])
        if sr != self.sample_rate:
            data = resample(torch.from_numpy(data), sr, self.sample_rate).numpy()
        return np.ascontiguousarray(data, dtype=np.float32)

    def _keep(self, index: int, data: np.ndarray) -> bool:
        if self.cached_bytes + data.nbytes > self.cache_budget:
            return False
        self.cache[index] = data
        self.cached_bytes += data.nbytes
        return True

    def load(self, index: int) -> np.ndarray:
        """(C, T) float32 at the model rate, cached while the cache stays within ``cache_budget``."""
        if index in self.cache:
            return self.cache[index]
        data = self._decode(index)
        self._keep(index, data)
        return data

    def preload(self, threads: int = 1) -> None:
        """Decode files into the cache until one does not fit (call before workers fork, so they
        share the decoded audio copy-on-write; decoding further files would only be thrown away).

        ``threads > 1`` decodes files concurrently (libsndfile and soxr release the GIL): hours
        of Vorbis take minutes on one core but seconds on a GPU machine's sixteen. Files enter
        the cache in order, so the result does not depend on the thread count.
        """
        threads = max(1, threads)
        if threads == 1:
            for i in range(len(self.files)):
                if not self._keep(i, self._decode(i)):
                    return
            return
        # At most `threads` files in flight: when one does not fit, fewer than `threads` decodes
        # are wasted, not the rest of the corpus.
        with ThreadPoolExecutor(threads) as pool:
            pending: deque = deque()
            next_index = 0
            while pending or next_index < len(self.files):
                while next_index < len(self.files) and len(pending) < threads:
                    pending.append((next_index, pool.submit(self._decode, next_index)))
                    next_index += 1
                i, future = pending.popleft()
                if not self._keep(i, future.result()):
                    for _, rest in pending:
                        rest.cancel()
                    return


class CropDataset(IterableDataset):
    """Endless random crops from weighted sources; each DataLoader worker has its own seed.

    Args:
        sources: data folders with weights (a source is drawn with probability weight / sum).
        audio_channels: 1 -> mono mix; 2 -> both channels (mono files are duplicated).
        crop: samples per item (:func:`crop_samples`).
        seed: base seed; worker ``w`` uses ``(seed, w)`` so restarting with the same seed
            replays the same stream.
        gain_db: random gain range in dB applied after peak-normalising each crop.
        silence_db: crops whose RMS is below this (dBFS) are skipped.

    The decoded-audio cache belongs to the sources (:func:`build_sources` sets its budget).
    """

    def __init__(self, sources: Sequence[AudioSource], audio_channels: int, crop: int, seed: int = 0,
                 gain_db: Tuple[float, float] = (-12.0, 0.0), silence_db: float = -60.0) -> None:
        super().__init__()
        if not sources:
            raise ValueError("need at least one data source")
        self.sources = list(sources)
        self.audio_channels = audio_channels
        self.crop = crop
        self.seed = seed
        self.gain_db = gain_db
        self.silence = 10 ** (silence_db / 20)
        weights = np.array([s.weight for s in self.sources], dtype=np.float64)
        self.source_probs = weights / weights.sum()
        # Files are drawn in proportion to their length, so every second of audio is equally likely.
        self.file_probs = [np.maximum(np.array(s.lengths, dtype=np.float64), crop) for s in self.sources]
        self.file_probs = [p / p.sum() for p in self.file_probs]

    def _channels(self, data: np.ndarray) -> np.ndarray:
        if self.audio_channels == 1:
            return data.mean(0, keepdims=True)
        if data.shape[0] == 1:
            return np.repeat(data, 2, axis=0)
        return data[:2]

    def sample(self, rng: np.random.Generator, max_tries: int = 50) -> Tuple[np.ndarray, int]:
        """One crop ``(audio_channels, crop)`` and the index of the source it came from."""
        for _ in range(max_tries):
            s = int(rng.choice(len(self.sources), p=self.source_probs))
            source = self.sources[s]
            f = int(rng.choice(len(source.files), p=self.file_probs[s]))
            try:
                data = source.load(f)
            except ValueError:
                continue
            n = data.shape[-1]
            if n >= self.crop:  # crop first, mix channels after: never copy a whole file per item
                start = int(rng.integers(0, n - self.crop + 1))
                out = self._channels(data[:, start:start + self.crop]).astype(np.float32, copy=True)
            else:  # short file (a single note): place it at a random offset in silence
                out = np.zeros((self.audio_channels, self.crop), dtype=np.float32)
                start = int(rng.integers(0, self.crop - n + 1))
                out[:, start:start + n] = self._channels(data)
            if float(np.sqrt(np.mean(out ** 2))) < self.silence:
                continue  # near-silent: nothing to learn
            peak = float(np.abs(out).max())
            gain = 10 ** (rng.uniform(*self.gain_db) / 20) / max(peak, 1e-8)
            return (out * gain).astype(np.float32), s
        raise ValueError(f"no non-silent crop found in {max_tries} tries; is the data silent?")

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        rng = np.random.default_rng([self.seed, worker])
        while True:
            crop, _ = self.sample(rng)
            yield torch.from_numpy(crop)


def _ignore_stop_signals(worker_id: int) -> None:
    # A scheduler's SIGTERM/SIGUSR1 (SLURM signals every process of a job step) is the training
    # process's to handle: it finishes its step and saves. A loader worker killed by it would
    # instead fail the main process's next batch. Workers still end with their parent.
    for name in ("SIGTERM", "SIGUSR1", "SIGINT"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)


class StepBatches(IterableDataset):
    """Endless training batches, the batch of step ``s`` drawn from a generator seeded by
    ``(seed, s, rank)`` alone.

    So the data of a step depends on nothing but the step: a run resumed at step ``s`` sees the
    batches the uninterrupted run saw, with any number of loader workers (worker ``w`` of ``W``
    makes the batches of steps ``start_step + w``, ``+ W``, ...; the DataLoader returns them in
    that round-robin order), and each data-parallel rank its own.

    Args:
        crops: the crop source (its ``sample`` draws one crop from a generator).
        batch_size: crops per batch (one rank's).
        seed: the run's seed.
        start_step: the step of the first batch.
        rank: this data-parallel rank.
    """

    def __init__(self, crops: CropDataset, batch_size: int, seed: int, start_step: int = 0, rank: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.crops, self.batch_size, self.seed, self.start_step, self.rank = crops, batch_size, seed, start_step, rank

    def batch(self, step: int) -> torch.Tensor:
        """The ``(batch_size, audio_channels, crop)`` batch of ``step``."""
        rng = np.random.default_rng(batch_seed(self.seed, step, self.rank))
        return torch.from_numpy(np.stack([self.crops.sample(rng)[0] for _ in range(self.batch_size)]))

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        step = self.start_step + worker
        while True:
            yield self.batch(step)
            step += workers


def make_step_loader(batches: StepBatches, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over :class:`StepBatches` (whole batches come from the workers, in step order)."""
    return DataLoader(batches, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None,
                      worker_init_fn=_ignore_stop_signals if num_workers > 0 else None)


def make_loader(dataset: CropDataset, batch_size: int, num_workers: int = 0,
                pin_memory: bool = False) -> DataLoader:
    """A DataLoader over the endless crop stream (workers get their seeds from the dataset)."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                      drop_last=True, persistent_workers=num_workers > 0,
                      prefetch_factor=4 if num_workers > 0 else None)


def build_sources(specs: Sequence[str], sample_rate: int = 44100, preload_bytes: int = 0,
                  threads: int = 1, rank: int = 0, world_size: int = 1) -> List[AudioSource]:
    """``["DIR[:WEIGHT]", ...]`` -> sources, optionally preloading decoded audio (``threads`` at a
    time); with ``world_size > 1`` each source keeps rank ``rank``'s share of its files
    (:meth:`AudioSource.shard`) before anything is decoded."""
    sources = []
    for spec in specs:
        folder, weight = parse_data_spec(spec)
        # The budget is split between sources and fixed here: workers (forked later) can then add
        # at most what is left of their source's share, never a whole budget each.
        source = AudioSource(folder, weight, sample_rate, cache_budget=preload_bytes // max(len(specs), 1))
        source.shard(rank, world_size)
        if preload_bytes > 0:
            source.preload(threads)
        sources.append(source)
    return sources


def describe_sources(sources: Sequence[AudioSource]) -> str:
    total = sum(s.weight for s in sources)
    return ", ".join(f"{s.folder} ({len(s.files)} files, {s.seconds / 3600:.2f} h, weight {s.weight / total:.2f})"
                     for s in sources)


def batch_seed(seed: int, step: int, rank: int = 0) -> int:
    """Seed of the data generator of one step's batch on one rank (:class:`StepBatches`)."""
    return int(np.random.SeedSequence([seed, step, rank, 2]).generate_state(1)[0])


def worker_seed(base: int, step: int) -> int:
    """Seed for a loader (re)started at ``step``: a resumed run replays a fixed, new stream."""
    return int(np.random.SeedSequence([base, step]).generate_state(1)[0])

