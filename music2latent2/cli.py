"""The ``music2latent2`` command line: encode, decode, reconstruct and featurize whole datasets.

    music2latent2 encode      IN... -o OUT   # audio  -> .m2l latent files
    music2latent2 decode      IN... -o OUT   # .m2l   -> audio at the original rate and length
    music2latent2 reconstruct IN... -o OUT   # audio  -> audio (encode + decode)
    music2latent2 features    IN... -o OUT   # audio  -> .npy per-chunk MIR features
    music2latent2 export-torchscript -o model.ts   # a streaming TorchScript file for nn~ hosts
    music2latent2 export-onnx -o encoder.onnx       # the encoder as an ONNX graph

IN may be files or directories (searched recursively); a directory's tree is mirrored under OUT.
Every output is written atomically, finished outputs are skipped on re-runs (unless
``--overwrite``), and a bad input is reported and skipped; the exit status is 1 when any input
failed. ``--shard I/N`` splits the work deterministically across N processes/machines; under
``torchrun --nproc_per_node N -m music2latent2 ...`` each rank takes shard RANK/WORLD_SIZE by
itself (docs/distributed.md).
"""

from __future__ import annotations

import argparse
import hashlib
import signal
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch

from .audio import AUDIO_EXTENSIONS, check_finite, check_sample_rate, load_audio, resample
from .devices import resolve_device
from .distributed import LaunchEnv, launch_env
from .features import clip_features
from .fileio import atomic_write, check_output_dir, find_files, nearest_existing
from .latents_io import LatentMetadata, load_latents, save_latents
from .sampling import (
    DEFAULT_DENOISING_STEPS,
    DEFAULT_SIGMA_COND,
    MAX_DENOISING_STEPS,
    check_denoising_steps,
    check_sigma_cond,
)

__all__ = ["main", "build_parser", "collect_jobs", "shard_of", "AUDIO_EXTENSIONS"]

_PROGRESS_EVERY_S = 30.0  # a progress line in a log (no terminal: SLURM, nohup, torchrun ranks)

COMMANDS = {  # command -> (input extensions, output suffix or None for --format)
    "encode": (AUDIO_EXTENSIONS, ".m2l"),
    "decode": (frozenset({".m2l"}), None),
    "reconstruct": (AUDIO_EXTENSIONS, None),
    "features": (AUDIO_EXTENSIONS, ".npy"),
}


@dataclass(frozen=True)
class Job:
    """One input file and the output it maps to; ``key`` (posix relative output path) drives sharding."""

    src: Path
    dst: Path
    key: str


# --------------------------------------------------------------------------- planning
def shard_of(key: str, num_shards: int) -> int:
    """The shard (0..N-1) a file belongs to: sha1 of its relative output path, modulo N.

    Hash-based (not index-based) so a file's shard depends only on its own path: machines that
    list a directory at slightly different times still never process a file twice or not at all.
    """
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") % num_shards


def _parse_shard(text: str) -> Tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from err
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard I/N needs N >= 1 and 0 <= I < N, got {text!r}")
    return i, n


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def _non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _parse_int(text: str, what: str = "an integer") -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def _int_at_least(text: str, low: int) -> int:
    value = _parse_int(text)
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {'positive' if low == 1 else f'>= {low}'}, got {value}")
    return value


def _denoising_steps(text: str) -> int:
    try:
        return check_denoising_steps(_parse_int(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _sigma_cond(text: str) -> float:
    """Positive and finite here; the model's own [sigma_min, sigma_max] is checked once it is loaded."""
    try:
        return check_sigma_cond(float(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _sample_rate(text: str) -> int:
    value = _parse_int(text, "an integer number of Hz")
    try:
        return check_sample_rate(value, "rate")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def collect_jobs(inputs: Sequence[str], out: str, command: str, out_suffix: str) -> List[Job]:
    """Map inputs to outputs, mirroring directory trees under ``out``.

    A directory input contributes every file with a matching extension below it (hidden files and
    folders skipped), written to ``out/<path relative to that directory>``; a file input goes to
    ``out/<its name>``, or to ``out`` itself when it is the only input and ``out`` already ends in
    the output suffix. Output suffixes replace input suffixes.

    Raises:
        ValueError: a missing input, no input files at all, or two inputs mapping to one output.
    """
    exts = COMMANDS[command][0]
    out_path = Path(out)
    single_file = len(inputs) == 1 and Path(inputs[0]).is_file() and out_path.suffix.lower() == out_suffix
    pairs: List[Tuple[Path, str]] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            pairs += [(f, f.relative_to(p).with_suffix(out_suffix).as_posix()) for f in find_files(p, exts)]
        elif p.is_file():
            pairs.append((p, out_path.name if single_file else Path(p.name).with_suffix(out_suffix).as_posix()))
        else:
            raise ValueError(f"input not found: {p}")
    if not pairs:
        raise ValueError(f"no input files found (looked for {', '.join(sorted(exts))})")
    jobs: List[Job] = []
    seen: Dict[str, Path] = {}
    for src, key in pairs:
        dst = out_path if single_file else out_path / key
        if key in seen:
            raise ValueError(f"{seen[key]} and {src} would both be written to {dst}; rename one or run them apart")
        seen[key] = src
        jobs.append(Job(src, dst, key))
    return jobs


# --------------------------------------------------------------------------- loading
def _prefetch(jobs: Sequence[Job], load: Callable[[Job], Any], workers: int) -> Iterator[Tuple[Job, Any]]:
    """Yield (job, load(job) or the exception it raised), in order, loading ahead in threads.

    While the model works on file i, up to ``2 * workers`` later files are read and resampled
    (soundfile and soxr release the GIL, so this overlaps with the network).
    """

    def safe(job: Job) -> Any:
        try:
            return load(job)
        except Exception as err:  # reported per file by the caller; the run goes on
            return err

    if workers <= 0:
        for job in jobs:
            yield job, safe(job)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="m2l-load") as pool:
        pending: List[Tuple[Job, Future]] = []
        it = iter(jobs)
        try:
            while True:
                while len(pending) < 2 * workers:
                    upcoming = next(it, None)
                    if upcoming is None:
                        break
                    pending.append((upcoming, pool.submit(safe, upcoming)))
                if not pending:
                    return
                job, fut = pending.pop(0)
                yield job, fut.result()
        finally:
            for _, fut in pending:
                fut.cancel()


@dataclass
class LoadedAudio:
    wav: torch.Tensor  # (C, T) at the model's rate
    sr: int  # original rate
    length: int  # original length in samples
    channels: int

    @property
    def seconds(self) -> float:
        return self.length / self.sr


def _load_audio_job(job: Job, model_sr: int, mono: bool) -> LoadedAudio:
    data, sr = load_audio(job.src)
    if mono:
        data = data.mean(axis=0, keepdims=True)
    wav = torch.from_numpy(data)
    check_finite(wav, f"audio file {job.src}")
    wav = resample(wav, sr, model_sr)
    return LoadedAudio(wav, sr, data.shape[-1], data.shape[0])


# --------------------------------------------------------------------------- writers
def _write_audio(path: Path, wav: np.ndarray, sr: int, fmt: str) -> None:
    """(C, T) float -> 16-bit PCM WAV/FLAC, atomically. Clipped first: PCM conversion would wrap."""
    import soundfile as sf

    data = np.clip(wav, -1.0, 1.0).T
    atomic_write(path, lambda tmp: sf.write(tmp, data, sr, format=fmt.upper(), subtype="PCM_16"))


def _write_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object, so numpy does not append another ".npy"
            np.save(f, array)

    atomic_write(path, write)


class Runner:
    """Holds the model and per-run settings; ``process(job, loaded)`` writes one output and returns
    the seconds of audio it covered."""

    def __init__(self, args: argparse.Namespace) -> None:
        from .inference import EncoderDecoder

        self.args = args
        self.encdec = EncoderDecoder(args.model, device=args.device, precision=args.precision,
                                     max_batch_size=args.batch_size, revision=args.revision)
        self.cfg = self.encdec.config
        source = self.encdec.model.source  # name and sha256 of the checkpoint, recorded when it was loaded
        self.model_name, self.model_sha = (source.name, source.sha256) if source else ("", "")
        self._warned_sha = False

    def load(self, job: Job) -> Any:
        if self.args.command == "decode":
            return load_latents(job.src)
        return _load_audio_job(job, self.cfg.sample_rate, getattr(self.args, "mono", False))

    def _decode(self, latents: np.ndarray, meta: LatentMetadata) -> Tuple[np.ndarray, int]:
        """Latents -> (C, T) at --sr (default the original rate), exactly the original duration."""
        if meta.model_sha256 and self.model_sha and meta.model_sha256 != self.model_sha and not self._warned_sha:
            print(f"warning: latents were made with model sha256 {meta.model_sha256[:12]}..., decoding with "
                  f"{self.model_sha[:12]}...", file=sys.stderr)
            self._warned_sha = True
        return self.encdec.decode_file((latents, meta), sr=self.args.sr, denoising_steps=self.args.denoising_steps,
                                       sigma_cond=self.args.sigma_cond, seed=self.args.seed)  # seeded per file

    def _metadata(self, job: Job, audio: LoadedAudio, gain: float) -> LatentMetadata:
        cfg = self.cfg
        return LatentMetadata(sample_rate=audio.sr, length=audio.length, channels=audio.channels,
                              summary_tokens=cfg.summary_tokens, latent_dim=cfg.latent_dim,
                              latent_scale=cfg.latent_scale, model_sample_rate=cfg.sample_rate,
                              chunk_samples=cfg.chunk_samples, model_name=self.model_name,
                              model_sha256=self.model_sha, model_audio_channels=cfg.audio_channels,
                              gain=gain, extra={"source": job.key})

    def process(self, job: Job, loaded: Any) -> float:
        cmd, ed = self.args.command, self.encdec
        if cmd == "decode":
            latents, meta = loaded
            wav, sr = self._decode(latents, meta)
            _write_audio(job.dst, wav, sr, self.args.format)
            return meta.duration
        audio: LoadedAudio = loaded
        normalize = not self.args.no_normalize
        if cmd == "features":
            feats = ed.encode(audio.wav, sr=self.cfg.sample_rate, extract_features=True,
                              normalize=normalize).float().cpu().numpy()  # (C, K*dim, chunks), C = 1 for mono
            if self.args.clip:
                feats = clip_features(feats, audio.wav.shape[-1], self.cfg.chunk_samples)  # (C, K*dim)
            _write_npy(job.dst, feats)
            return audio.seconds
        latents, gain = ed.encode(audio.wav, sr=self.cfg.sample_rate, normalize=normalize, return_gain=True)
        meta = self._metadata(job, audio, float(gain))
        latents = latents.float().cpu()  # (C, d_lat, L)
        if cmd == "encode":
            save_latents(job.dst, latents, meta)
        else:
            wav, sr = self._decode(latents.numpy(), meta)
            _write_audio(job.dst, wav, sr, self.args.format)
        return audio.seconds


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="music2latent2", epilog="exit status: 0 ok, 1 some inputs failed, 2 usage error, 130 interrupted",
        description="Encode, decode, reconstruct and featurize audio files and whole datasets with Music2Latent2.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {"encode": "audio -> .m2l latent files", "decode": ".m2l latent files -> audio",
             "reconstruct": "audio -> audio through the autoencoder", "features": "audio -> .npy MIR features"}
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("inputs", nargs="+", metavar="IN", help="files or directories (searched recursively)")
        p.add_argument("-o", "--output", required=True, metavar="OUT",
                       help="output directory (input trees are mirrored), or a file name for a single input")
        p.add_argument("--model", default=None,
                       help="manifest name, checkpoint file/directory, or Hugging Face repo id org/name")
        p.add_argument("--revision", default=None,
                       help="with a Hugging Face repo id: branch, tag or commit sha (a commit pins it)")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda if available)")
        p.add_argument("--batch-size", type=_positive_int, default=32,
                       help="chunks (encode) or sequences (decode) per forward pass (default 32)")
        p.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "float16"])
        p.add_argument("--overwrite", action="store_true", help="redo outputs that already exist")
        p.add_argument("--shard", type=_parse_shard, default=(0, 1), metavar="I/N",
                       help="process only shard I of N (0-based; sha1 of the relative path mod N)")
        p.add_argument("--workers", type=_non_negative_int, default=2,
                       help="threads loading audio ahead of the model (0 = none)")
        p.add_argument("--threads", type=_positive_int, default=None,
                       help="torch CPU threads for the model (default: PyTorch's, one per core); use 1 per process "
                            "when several run at once or the machine is busy")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
        if name in ("encode", "features"):
            p.add_argument("--mono", action="store_true", help="average channels before encoding")
        if name == "features":
            p.add_argument("--clip", action="store_true",
                           help="write one clip vector (C, D) per file: the chunk features averaged, each chunk "
                                "weighted by its share of real audio (default: per-chunk features (C, D, chunks))")
        if name in ("encode", "features", "reconstruct"):
            p.add_argument("--no-normalize", action="store_true",
                           help="encode at the audio's own level (default: bring each file's peak to the model's "
                                "input level first; decode restores the original level)")
        if name in ("decode", "reconstruct"):
            p.add_argument("--format", default=None, choices=["wav", "flac"],
                           help="output audio format (default: from -o when it names one .wav/.flac file, else wav)")
            p.add_argument("--sr", type=_sample_rate, default=None,
                           help="output sample rate, 1000..768000 Hz (default: the original's)")
            p.add_argument("--seed", type=int, default=0, help="decoder noise seed, the same for every file")
            p.add_argument("--denoising-steps", type=_denoising_steps, default=DEFAULT_DENOISING_STEPS,
                           help=f"consistency steps per chunk, 1..{MAX_DENOISING_STEPS} (paper: 1)")
            p.add_argument("--sigma-cond", type=_sigma_cond, default=DEFAULT_SIGMA_COND,
                           help="re-noising level of the previous chunk (paper: 0.4)")
    sub.add_parser("evaluate", add_help=False, help="reconstruction quality of a model on audio files, with an HTML "
                   "report (music2latent2 evaluate --help)")
    exports = {"export-torchscript": "a streaming TorchScript file for real-time hosts (nn~ for Max/MSP, Pure Data)",
               "export-onnx": "the encoder as an ONNX graph (chunk windows -> latents, features)"}
    for name, text in exports.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("-o", "--output", required=True, metavar="OUT", help="the file to write (.ts / .onnx)")
        p.add_argument("--model", default=None,
                       help="manifest name, checkpoint file/directory, or Hugging Face repo id org/name")
        p.add_argument("--revision", default=None,
                       help="with a Hugging Face repo id: branch, tag or commit sha (a commit pins it)")
        p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
        if name == "export-torchscript":
            p.add_argument("--low-latency", action="store_true",
                           help="emit each chunk without its refinement: one chunk (743 ms) less decoder latency")
            p.add_argument("--sigma-cond", type=_sigma_cond, default=DEFAULT_SIGMA_COND,
                           help="re-noising level of the previous chunk (paper: 0.4)")
    return parser


def _export(args: argparse.Namespace) -> int:
    """export-torchscript / export-onnx: check the output and options, load the model, write."""
    out = Path(args.output)
    if out.is_dir():
        print(f"error: -o {out} is a folder; name the file to write", file=sys.stderr)
        return 2
    if out.exists() and not args.overwrite:
        print(f"error: {out} exists (--overwrite to replace it)", file=sys.stderr)
        return 2
    sigma_cond = getattr(args, "sigma_cond", DEFAULT_SIGMA_COND)
    try:
        check_output_dir(out.parent)
    except OSError as err:
        print(f"error: -o {out}: {err.strerror if err.strerror else err}", file=sys.stderr)
        return 2
    from .model import Music2Latent2

    try:
        model = Music2Latent2.from_pretrained(args.model, revision=args.revision)
    except Exception as err:  # noqa: BLE001 - reported, exit 2, as for the other commands
        print(f"error: cannot load {args.model or 'the default model'}: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    if args.command == "export-onnx":
        from .onnx_export import export_onnx_encoder

        try:
            path = export_onnx_encoder(model, out)
        except ImportError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    else:
        from .torchscript import export_torchscript

        path = export_torchscript(model, out, low_latency=args.low_latency, sigma_cond=sigma_cond)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)
    return 0


def _output_format(args: argparse.Namespace) -> str:
    """--format, else the suffix of -o when it names the single output file, else wav."""
    if args.format:
        return args.format
    suffix = Path(args.output).suffix.lower()
    if len(args.inputs) == 1 and Path(args.inputs[0]).is_file() and suffix in (".wav", ".flac"):
        return suffix[1:]
    return "wav"


def _preflight(args: argparse.Namespace, jobs: Sequence[Job]) -> str | None:
    """What would make every file fail, found before the model is loaded: a --device this machine
    lacks, an output folder that is a file or cannot be written, no model to load. None if fine."""
    try:
        resolve_device(args.device)
    except ValueError as err:
        return f"--device: {err}"
    probed = set()
    for folder in sorted({job.dst.parent for job in jobs}):
        anchor = nearest_existing(folder)
        if anchor in probed:  # a new tree of 10,000 folders is one probe of the folder it goes in
            continue
        probed.add(anchor)
        try:
            check_output_dir(folder)
        except OSError as err:
            return f"-o {args.output}: {err.strerror if err.strerror else err}"
    for job in jobs:
        if job.dst.is_dir():
            return f"output {job.dst} is an existing folder; it cannot be replaced by a file"
    if args.model is None:
        from .manifest import load_manifest

        try:
            manifest = load_manifest()
        except ValueError as err:
            return f"{err}; pass --model NAME_OR_PATH (a checkpoint file or folder)"
        if manifest.default is None:
            names = f" or one of the manifest's models {sorted(manifest.models)}" if manifest.models else ""
            return (f"no --model given and the weights manifest {manifest.path} names no default model; pass "
                    f"--model with a checkpoint file or folder (model.safetensors){names}")
    return None


def _run(args: argparse.Namespace) -> int:
    """One process's share of the work: all of it, its ``--shard``, or under torchrun its rank's."""
    try:
        env = launch_env()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not env.distributed:
        index, num = args.shard
        return _run_shard(args, index, num, env)[0]
    if args.shard != (0, 1):
        print(f"{env.tag()}error: --shard and torchrun's ranks would both split the inputs; under torchrun leave "
              "--shard out (each rank takes shard RANK/WORLD_SIZE)", file=sys.stderr)
        return 2
    if args.device in (None, "cuda") and torch.cuda.is_available():
        args.device = f"cuda:{env.local_rank}"  # one GPU per rank
    return _all_ranks(env, *_run_shard(args, env.rank, env.world_size, env))


def _all_ranks(env: LaunchEnv, status: int, counts: List[int]) -> int:
    """Wait for every rank, sum their counts, and give every rank the worst exit status: a rank
    that finishes early (or with a failed file) must not make torchrun stop the others mid-file."""
    import datetime

    import torch.distributed as dist

    try:
        if not dist.is_initialized():
            # gloo over TCP, whatever the device: four numbers per rank, once. A week's timeout:
            # shards of a large collection can end hours apart.
            dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
        totals = torch.tensor(counts + [status], dtype=torch.int64)
        dist.all_reduce(totals[:3])
        dist.all_reduce(totals[3:], op=dist.ReduceOp.MAX)
        dist.destroy_process_group()
    except RuntimeError as err:
        print(f"{env.tag()}warning: could not gather the other ranks' results ({err}); this rank's exit status "
              "covers its own files only", file=sys.stderr)
        return status
    done, skipped, failed, worst = (int(v) for v in totals.tolist())
    if env.is_main:
        print(f"all {env.world_size} ranks: {done} done, {skipped} skipped (already done), {failed} failed"
              + ("; re-run the same command to retry or resume" if worst else ""), file=sys.stderr)
    return worst


def _run_shard(args: argparse.Namespace, index: int, num: int, env: LaunchEnv) -> Tuple[int, List[int]]:
    """Process shard ``index`` of ``num``. Returns (exit status, [done, skipped, failed])."""
    tag = env.tag()
    if COMMANDS[args.command][1] is None:
        args.format = _output_format(args)
    suffix = COMMANDS[args.command][1] or f".{args.format}"
    try:
        jobs = collect_jobs(args.inputs, args.output, args.command, suffix)
    except ValueError as err:
        print(f"{tag}error: {err}", file=sys.stderr)
        return 2, [0, 0, 0]
    total = len(jobs)
    jobs = [j for j in jobs if shard_of(j.key, num) == index]
    todo = jobs if args.overwrite else [j for j in jobs if not j.dst.exists()]
    skipped = len(jobs) - len(todo)
    if not todo:  # a finished run: nothing to load, hash or download
        print(f"{tag}{args.command}: nothing to do, {skipped} output(s) already exist "
              "(--overwrite to redo them)", file=sys.stderr)
        return 0, [0, skipped, 0]
    problem = _preflight(args, todo)
    if problem:
        print(f"{tag}error: {problem}", file=sys.stderr)
        return 2, [0, skipped, 0]
    try:
        runner = Runner(args)
    except Exception as err:  # noqa: BLE001 - a corrupt file, a missing download...: reported, exit 2
        what = f"model {args.model!r}" if args.model is not None else "the default model"
        print(f"{tag}error: cannot load {what}: {type(err).__name__}: {err}\n"
              f"(choose a model with --model NAME_OR_PATH: a checkpoint file or folder, a name from the weights "
              f"manifest, or a Hugging Face repo id org/name with --revision)", file=sys.stderr)
        return 2, [0, skipped, 0]

    from tqdm.auto import tqdm

    failures: List[Tuple[Path, str]] = []
    seconds, start = 0.0, time.perf_counter()
    # On a terminal a tqdm bar (under torchrun one per rank, a line each). tqdm turns itself off
    # when stderr is not a terminal, where its carriage returns would garble a log; a SLURM or
    # nohup log then gets a plain line every _PROGRESS_EVERY_S instead of nothing until the end.
    bar = tqdm(total=len(todo), unit="file", desc=f"{tag}{args.command}", disable=args.quiet or None,
               dynamic_ncols=True, position=env.local_rank if env.distributed else None)
    log_lines = bool(bar.disable) and not args.quiet
    last_line = start
    interrupted, processed = False, 0
    try:
        for job, loaded in _prefetch(todo, runner.load, args.workers):
            try:
                if isinstance(loaded, Exception):
                    raise loaded
                seconds += runner.process(job, loaded)
            except Exception as err:  # one bad file must not stop a dataset run; listed in the summary
                failures.append((job.src, f"{type(err).__name__}: {err}"))
                bar.write(f"{tag}failed: {job.src}: {err}", file=sys.stderr)
            processed += 1
            bar.update(1)
            rate = f"{seconds / 3600 / max(time.perf_counter() - start, 1e-9):.3g} audio-h/s"
            bar.set_postfix_str(rate)
            if log_lines and time.perf_counter() - last_line >= _PROGRESS_EVERY_S:
                print(f"{tag}{args.command}: {processed}/{len(todo)} files, {len(failures)} failed, "
                      f"{seconds / 3600:.3g} h of audio in {time.perf_counter() - start:.0f} s, {rate}",
                      file=sys.stderr, flush=True)
                last_line = time.perf_counter()
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM from a scheduler (see main)
        interrupted = True
    finally:
        bar.close()
    elapsed = time.perf_counter() - start
    done = processed - len(failures)
    shard = f" (shard {index}/{num} of {total} files)" if num > 1 else ""
    print(f"{tag}{args.command}: {done} done, {skipped} skipped (already done), {len(failures)} failed{shard}; "
          f"{seconds / 3600:.3f} h of audio in {elapsed:.1f} s "
          f"({seconds / 3600 / max(elapsed, 1e-9):.3g} audio-h/s)", file=sys.stderr)
    if failures:
        print(f"{tag}{len(failures)} file(s) failed:", file=sys.stderr)
        for src, msg in failures:
            print(f"  {src}: {msg}", file=sys.stderr)
    counts = [done, skipped, len(failures)]
    if interrupted:
        print(f"{tag}interrupted after {processed} of {len(todo)} files; finished outputs are complete, "
              "run the same command again to resume", file=sys.stderr)
        return 130, counts
    return (1 if failures else 0), counts


def _raise_interrupt(signum: int, frame: Any) -> None:
    # SLURM/Kubernetes stop jobs with SIGTERM: turn it into an exception so in-flight temp files are removed.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``music2latent2`` console script; returns the exit status
    (0 all done, 1 some inputs failed, 2 bad arguments / no inputs / model not loadable,
    130 interrupted by Ctrl-C or SIGTERM: finished outputs are kept, re-run to resume)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["evaluate"]:  # its own parser (python -m music2latent2.evaluate), so both spell it alike
        from .evaluate import main as evaluate_main

        return evaluate_main(argv[1:], prog="music2latent2 evaluate")
    args = build_parser().parse_args(argv)
    previous: Dict[int, Any] = {}
    try:
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread: leave signal handling alone
        pass
    threads = torch.get_num_threads()
    try:
        if getattr(args, "threads", None) is not None:
            torch.set_num_threads(args.threads)
        return _export(args) if args.command.startswith("export-") else _run(args)
    finally:
        torch.set_num_threads(threads)  # main() may be called from a program that has its own setting
        for sig, handler in previous.items():
            signal.signal(sig, handler)
