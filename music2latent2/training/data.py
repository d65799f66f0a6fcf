"""Training data: weighted folders of audio files -> endless random two-chunk crops.

Each item is ``(audio_channels, 67072)`` float32: 67,072 = 2 * 32,768 + 2,048 - 512 samples,
exactly the span behind two consecutive chunks of 64 STFT frames. Files of any format and
sample rate soundfile reads are resampled to 44.1 kHz once and cached (decoded audio is kept
in memory up to a byte budget; preloading before the DataLoader forks shares it with workers).
"""

from __future__ import annotations

import math
import os
import signal
import time
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
    """One data folder: its files, their lengths at the model rate, and a decoded-audio cache.

    ``allow_empty``: a folder that is still being filled (a lease's corpus arriving part by part)
    may start without files; :meth:`refresh` takes in what has arrived since.
    """

    folder: Path
    weight: float
    sample_rate: int = 44100
    files: List[Path] = field(default_factory=list)
    lengths: List[int] = field(default_factory=list)
    cache: Dict[int, np.ndarray] = field(default_factory=dict)
    cache_budget: int = 0  # bytes of decoded audio this source may keep in memory
    cached_bytes: int = 0
    allow_empty: bool = False
    native_rates: List[int] = field(default_factory=list)  # each file's own rate (0: not known)
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if not self.files:
            self._add(find_audio_files(self.folder))
        if len(self.native_rates) != len(self.files):  # files given by the caller: rates unknown
            self.native_rates = [0] * len(self.files)
        if not self.files and not self.allow_empty:
            raise ValueError(f"no readable audio files in {self.folder}")

    def _add(self, paths: Sequence[Path]) -> int:
        added = 0
        for path in paths:
            try:
                info = sf.info(str(path))
            except Exception:  # unreadable file: leave it out rather than fail mid-training
                continue
            if info.frames > 0:
                self.files.append(path)
                self.lengths.append(int(info.frames * self.sample_rate / info.samplerate))
                self.native_rates.append(int(info.samplerate))
                added += 1
        return added

    def shard(self, rank: int, world_size: int) -> bool:
        """Keep every ``world_size``-th file from the ``rank``-th on (one data-parallel rank's share,
        so each rank decodes and caches only its own files). A folder with fewer files than ranks
        is left whole (every rank draws from all of it). Returns whether it was split."""
        self.rank, self.world_size = rank, world_size
        if world_size <= 1 or len(self.files) < world_size:
            return False
        self.files, self.lengths = self.files[rank::world_size], self.lengths[rank::world_size]
        self.native_rates = self.native_rates[rank::world_size]
        return True

    def refresh(self) -> int:
        """Take in audio files that appeared in the folder since it was scanned (this rank's share
        of them, in sorted order). Returns how many were added."""
        known = set(self.files)
        new = [p for p in find_audio_files(self.folder) if p not in known]
        if self.world_size > 1:
            new = sorted(new)[self.rank::self.world_size]
        return self._add(new)

    def streamable(self, index: int, frames: int) -> bool:
        """Whether windows of ``frames`` are read from the file rather than from its decoded
        whole: a file not cached, at the model rate, and long enough."""
        return index not in self.cache and self.native_rates[index] == self.sample_rate and \
            self.lengths[index] >= frames

    def read_window(self, index: int, start: int, frames: int) -> np.ndarray | None:
        """``(C, frames)`` float32 from ``start`` without decoding the whole file; None where the
        file cannot be read so (then :meth:`load` it). Libsndfile seeks within Vorbis, FLAC and
        WAV: a 1.5 s window of a 3-minute Vorbis file took 5 ms here against 0.29 s for the
        whole file, sample for sample the same audio."""
        try:
            data, _ = sf.read(str(self.files[index]), start=start, frames=frames, dtype="float32", always_2d=True)
        except Exception:
            return None
        if data.shape[0] != frames:  # a length the header got wrong: decode it whole instead
            return None
        return np.ascontiguousarray(data.T)

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
        watch: a file rewritten whenever new audio arrives in the sources' folders; at most every
            ``watch_every_s`` each loader worker looks at it and, when it changed, rescans the
            folders (:meth:`AudioSource.refresh`). New files are read window by window, not cached.
            Which files a batch can draw from then depends on when they arrived, so batches are no
            longer a function of the step alone (a lease's leg is never resumed bit for bit).

    The decoded-audio cache belongs to the sources (:func:`build_sources` sets its budget).
    """

    def __init__(self, sources: Sequence[AudioSource], audio_channels: int, crop: int, seed: int = 0,
                 gain_db: Tuple[float, float] = (-12.0, 0.0), silence_db: float = -60.0,
                 watch: str | os.PathLike | None = None, watch_every_s: float = 5.0) -> None:
        super().__init__()
        if not sources:
            raise ValueError("need at least one data source")
        self.sources = list(sources)
        self.audio_channels = audio_channels
        self.crop = crop
        self.seed = seed
        self.gain_db = gain_db
        self.silence = 10 ** (silence_db / 20)
        self.watch = None if watch is None else Path(watch)
        self.watch_every_s = watch_every_s
        # Unknown at first: the first look rescans, so files that arrived between the folders'
        # scan and this moment are not missed.
        self._watch_stamp: Tuple[int, int] | None = None
        self._watch_checked = time.monotonic()
        self._weigh()
        if not self.source_probs.sum() > 0:
            raise ValueError("no audio in any data source yet")

    def _weigh(self) -> None:
        # Sources without files (still arriving) are not drawn from.
        weights = np.array([s.weight if s.files else 0.0 for s in self.sources], dtype=np.float64)
        self.source_probs = weights / weights.sum() if weights.sum() > 0 else weights
        # Files are drawn in proportion to their length, so every second of audio is equally likely.
        probs = [np.maximum(np.array(s.lengths, dtype=np.float64), self.crop) for s in self.sources]
        self.file_probs = [p / p.sum() if p.size else p for p in probs]

    def _stamp(self) -> Tuple[int, int] | None:
        try:
            st = self.watch.stat() if self.watch is not None else None
        except OSError:
            return None
        return None if st is None else (st.st_mtime_ns, st.st_size)

    def take_in_new_files(self) -> int:
        """Rescan the sources if the watch file changed; returns the number of files added."""
        self._watch_checked = time.monotonic()
        stamp = self._stamp()
        if stamp == self._watch_stamp:
            return 0
        self._watch_stamp = stamp
        before = sum(s.seconds for s in self.sources)
        added = sum(s.refresh() for s in self.sources)
        if added:
            self._weigh()
            info = get_worker_info()
            if info is None or info.id == 0:  # one line per arrival, not one per worker
                hours = sum(s.seconds for s in self.sources) / 3600
                print(f"data: +{added} files (+{hours - before / 3600:.2f} h), {hours:.2f} h in all", flush=True)
        return added

    def _channels(self, data: np.ndarray) -> np.ndarray:
        if self.audio_channels == 1:
            return data.mean(0, keepdims=True)
        if data.shape[0] == 1:
            return np.repeat(data, 2, axis=0)
        return data[:2]

    def _window(self, source: AudioSource, index: int, rng: np.random.Generator) -> np.ndarray | None:
        # The header's length of a file at the model rate is its decoded length, so the start is
        # the one the whole-file path below would draw; only the window is read.
        start = int(rng.integers(0, source.lengths[index] - self.crop + 1))
        window = source.read_window(index, start, self.crop)
        if window is None:  # not readable by window: the whole file, from the same start
            try:
                data = source.load(index)
            except ValueError:
                return None
            if data.shape[-1] < start + self.crop:
                return None
            window = data[:, start:start + self.crop]
        return self._channels(window).astype(np.float32, copy=True)

    def sample(self, rng: np.random.Generator, max_tries: int = 50) -> Tuple[np.ndarray, int]:
        """One crop ``(audio_channels, crop)`` and the index of the source it came from."""
        if self.watch is not None and time.monotonic() - self._watch_checked >= self.watch_every_s:
            self.take_in_new_files()
        for _ in range(max_tries):
            s = int(rng.choice(len(self.sources), p=self.source_probs))
            source = self.sources[s]
            f = int(rng.choice(len(source.files), p=self.file_probs[s]))
            out = self._window(source, f, rng) if source.streamable(f, self.crop) else None
            if out is None:
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
                  threads: int = 1, rank: int = 0, world_size: int = 1,
                  allow_empty: bool = False) -> List[AudioSource]:
    """``["DIR[:WEIGHT]", ...]`` -> sources, optionally preloading decoded audio (``threads`` at a
    time); with ``world_size > 1`` each source keeps rank ``rank``'s share of its files
    (:meth:`AudioSource.shard`) before anything is decoded. ``allow_empty``: folders still being
    filled may hold no audio yet (at least one must)."""
    sources = []
    for spec in specs:
        folder, weight = parse_data_spec(spec)
        # The budget is split between sources and fixed here: workers (forked later) can then add
        # at most what is left of their source's share, never a whole budget each.
        source = AudioSource(folder, weight, sample_rate, cache_budget=preload_bytes // max(len(specs), 1),
                             allow_empty=allow_empty)
        source.shard(rank, world_size)
        if preload_bytes > 0:
            source.preload(threads)
        sources.append(source)
    if not any(s.files for s in sources):
        raise ValueError(f"no readable audio files in any of {list(specs)}")
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

