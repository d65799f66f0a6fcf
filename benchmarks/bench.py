"""Encode/decode throughput, peak memory and FLOPs: music2latent2 presets vs music2latent v1.

Everything is measured in one process, on one machine, with random weights (speed depends on
the architecture, not the weights). music2latent v1 (``pip install music2latent``, CC BY-NC) is
only imported and its network class instantiated from its own hyperparameters; no checkpoint
is downloaded and none of its code is copied here.

Usage::

    python benchmarks/bench.py                      # full run: 10 min file, 32 x 10 s, CPU + CUDA
    python benchmarks/bench.py --quick --devices cpu  # a CPU run in minutes

Results are printed and written to their own section of BENCHMARKS.md (machine, versions, date,
exact settings); the rest of the file (hand-written sections, `mir_probe.py` results) is kept.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import git_commit, replace_section  # noqa: E402

from music2latent2.config import ModelConfig  # noqa: E402
from music2latent2.inference import EncoderDecoder  # noqa: E402
from music2latent2.model import Music2Latent2  # noqa: E402

SR = 44100


# ----------------------------------------------------------------------------- measurement
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def measure(fn: Callable[[], object], device: torch.device) -> Tuple[float, float, object]:
    """Run ``fn`` once: (seconds, peak memory MiB above the level at the start, result).

    CPU: peak resident set size (VmHWM, reset through /proc/self/clear_refs) minus the RSS at
    the start. CUDA: torch.cuda.max_memory_allocated minus memory_allocated at the start.
    """
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = _rss_kb("VmRSS:") * 1024
    start = time.perf_counter()
    out = fn()
    _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _rss_kb("VmHWM:") * 1024
    return seconds, (peak - base) / 2 ** 20, out


def count_flops(fn: Callable[[], object]) -> int:
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(device: torch.device) -> float:
    """Measured bf16 matmul FLOP/s (8192^3, 20 iterations) on a CUDA device."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    _sync(device)
    return 20 * 2 * 8192 ** 3 / (time.perf_counter() - start)


# ----------------------------------------------------------------------------- runners
class Ours:
    """music2latent2 through its public EncoderDecoder API."""

    def __init__(self, preset: str, device: torch.device, max_batch_size: int, compile: bool) -> None:
        torch.manual_seed(0)
        self.name = preset
        self.model = Music2Latent2(ModelConfig.from_preset(preset)).eval()
        precision = "bfloat16" if device.type == "cuda" else "float32"
        self.codec = EncoderDecoder(self.model, device=device, precision=precision, max_batch_size=max_batch_size,
                                    compile=compile)
        self.device = device

    def encode(self, wav: torch.Tensor) -> torch.Tensor:  # (N, T) cpu -> latents on cpu
        return self.codec.encode(wav[:, None])

    def decode(self, latents: torch.Tensor, length: int, mode: str = "autoregressive") -> torch.Tensor:
        return self.codec.decode(latents, length=length, seed=0, mode=mode)

    def flops_per_second(self) -> Dict[str, float]:
        """FLOPs per second of audio: one chunk encode; one steady-state autoregressive step
        (decoder features + a two-chunk window); parallel adds a one-chunk window per chunk."""
        cfg, m = self.model.config, self.model
        seconds = cfg.chunk_samples / cfg.sample_rate
        spec = torch.randn(1, cfg.spec_channels, cfg.freq_bins, cfg.chunk_frames, device=self.device)
        lat = torch.rand(1, cfg.summary_tokens, cfg.latent_dim, device=self.device)
        with torch.inference_mode():
            cross = m.decoder_features(lat)
        cross2 = [torch.cat([c, c]) for c in cross]
        enc = count_flops(lambda: m.encode_chunks(spec))
        feats = count_flops(lambda: m.decoder_features(lat))
        w2 = count_flops(lambda: m.denoise(torch.randn(1, 2, *spec.shape[1:], device=self.device),
                                           torch.ones(1, 2, device=self.device), cross2))
        w1 = count_flops(lambda: m.denoise(spec[:, None], torch.ones(1, 1, device=self.device), cross))
        return {"encode": enc / seconds, "decode": (feats + w2) / seconds, "parallel": (feats + w1 + w2) / seconds}


class V1:
    """music2latent v1's network (random weights), driven the way its inference code does:
    whole-file spectrogram, split into ``segment_seconds`` pieces, one network call per piece."""

    def __init__(self, device: torch.device, max_batch_size: int, segment_seconds: float) -> None:
        from music2latent import hparams as hp
        from music2latent.audio import to_representation_encoder, to_waveform
        from music2latent.models import UNet

        torch.manual_seed(0)
        self.name = "music2latent v1"
        self.hp, self.to_spec, self.to_wav = hp, to_representation_encoder, to_waveform
        self.net = UNet().to(device).eval()
        self.device = device
        self.max_batch_size = max_batch_size
        self.down = 2 ** hp.freq_downsample_list.count(0)  # spectrogram frames per latent frame
        self.segment = max(1, int(segment_seconds * SR / hp.hop) // self.down)  # latent frames per piece

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def _pieces(self, x: torch.Tensor, size: int) -> Tuple[torch.Tensor, int]:
        # (N, ..., L) -> (N * pieces, ..., size), zero-padding the end; like v1, a signal no
        # longer than one piece is processed whole, unpadded.
        if x.shape[-1] <= size:
            return x, 1
        n_pieces = -(-x.shape[-1] // size)
        x = torch.nn.functional.pad(x, (0, n_pieces * size - x.shape[-1]))
        return torch.cat(x.split(size, dim=-1)), n_pieces

    @torch.inference_mode()
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        hop, n = self.hp.hop, wav.shape[-1]
        crop = (((n - 3 * hop) // hop) // self.down) * hop * self.down + 3 * hop  # v1's own crop rule
        spec = self.to_spec(wav[:, :crop].to(self.device))  # (N, 2, F, frames)
        frames = spec.shape[-1]
        pieces, count = self._pieces(spec, self.segment * self.down)
        with self._autocast():
            z = torch.cat([self.net.encoder(p).float() for p in pieces.split(self.max_batch_size)])
        z = torch.cat(z.split(wav.shape[0]), dim=-1)  # pieces back to time
        return z[..., : frames // self.down].cpu()

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, length: int, mode: str = "autoregressive") -> torch.Tensor:
        z = latents.to(self.device)
        frames = z.shape[-1] * self.down
        pieces, count = self._pieces(z, self.segment)
        outs = []
        for p in pieces.split(self.max_batch_size):
            x = torch.randn(p.shape[0], self.hp.data_channels, self.hp.hop * 2, p.shape[-1] * self.down,
                            device=self.device) * self.hp.sigma_max
            with self._autocast():
                outs.append(self.net(p, x, self.hp.sigma_max).float())
        spec = torch.cat(torch.cat(outs).split(z.shape[0]), dim=-1)[..., :frames]
        return self.to_wav(spec)[..., :length].cpu()

    def flops_per_second(self) -> Dict[str, float]:
        hop, frames = self.hp.hop, 64 * self.down  # a 64-latent-frame piece (about 6 s)
        seconds = frames * hop / SR
        spec = torch.randn(1, self.hp.data_channels, hop * 2, frames, device=self.device)
        z = torch.randn(1, self.hp.bottleneck_channels, 64, device=self.device)
        enc = count_flops(lambda: self.net.encoder(spec))
        dec = count_flops(lambda: self.net(z, spec, self.hp.sigma_max))
        return {"encode": enc / seconds, "decode": dec / seconds}


# ----------------------------------------------------------------------------- run
@dataclass
class Row:
    device: str
    model: str
    case: str
    op: str
    audio_s: float
    seconds: float
    mem_mib: float
    flops_per_audio_s: float

    @property
    def speed(self) -> float:
        return self.audio_s / self.seconds

    @property
    def flops_per_s(self) -> float:
        return self.flops_per_audio_s * self.speed


def machine() -> Dict[str, str]:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    commit = git_commit()
    try:
        from importlib.metadata import version
        v1 = version("music2latent")
    except Exception:  # noqa: BLE001 - any failure means "not installed"
        v1 = "not installed"
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": f"{cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
            "python": platform.python_version(), "torch": torch.__version__, "music2latent": v1,
            "music2latent2 commit": commit}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run(args: argparse.Namespace) -> Tuple[List[Row], Dict[str, Dict[str, float]], Dict[str, float],
                                           List[Tuple[str, str, float, float, float]]]:
    rows: List[Row] = []
    flops: Dict[str, Dict[str, float]] = {}
    peaks: Dict[str, float] = {}
    memory: List[Tuple[str, str, float, float, float]] = []
    gen = torch.Generator().manual_seed(0)
    cases = [("long", 1, args.long_seconds), ("short", args.short_count, args.short_seconds)]
    for dev_name in args.devices:
        if dev_name == "cuda" and not torch.cuda.is_available():
            print("cuda: not available, skipped")
            continue
        device = torch.device(dev_name)
        if device.type == "cuda":
            peaks[dev_name] = matmul_peak(device)
        names = list(args.presets) + ([] if args.no_v1 else ["v1"])
        for name in names:
            runner = (V1(device, args.max_batch_size, args.v1_segment_seconds) if name == "v1"
                      else Ours(name, device, args.max_batch_size, args.compile))
            flops[f"{dev_name}/{runner.name}"] = f = runner.flops_per_second()
            # First calls allocate, pick kernels or compile: keep them out of the timings, in every
            # decode mode that will be timed (2 s = 3 chunks, so parallel mode runs both passes).
            warm = torch.randn(1, 2 * SR) * 0.1
            warm_z = runner.encode(warm)
            for mode in ["autoregressive"] + (["parallel"] if name != "v1" and "parallel" in args.modes else []):
                runner.decode(warm_z, 2 * SR, mode)
            for case, count, seconds in cases:
                if count < 1 or seconds <= 0:
                    continue
                n = int(seconds * SR)
                wav = torch.randn(count, n, generator=gen) * 0.1
                t, mem, z = measure(partial(runner.encode, wav), device)
                rows.append(Row(dev_name, runner.name, f"{case} {count}x{seconds:g}s", "encode", count * seconds,
                                t, mem, f["encode"]))
                print(rows[-1], flush=True)
                modes = ["autoregressive"] + (["parallel"] if name != "v1" and "parallel" in args.modes
                                              and (case == "long" or args.parallel_short) else [])
                for mode in modes:
                    t, mem, _ = measure(partial(runner.decode, z, n, mode), device)
                    op = "decode" if mode == "autoregressive" else "decode (parallel)"
                    rows.append(Row(dev_name, runner.name, f"{case} {count}x{seconds:g}s", op, count * seconds, t, mem,
                                    f["decode" if mode == "autoregressive" else "parallel"]))
                    print(rows[-1], flush=True)
                del wav, z
        for preset in args.memory_presets:
            runner = Ours(preset, device, args.max_batch_size, args.compile)
            for seconds in args.memory_seconds:
                n = int(seconds * SR)
                wav = torch.randn(1, n, generator=gen) * 0.1
                te, me, z = measure(partial(runner.encode, wav), device)
                td, md, _ = measure(partial(runner.decode, z, n), device)
                memory.append((dev_name, preset, seconds, me, md))
                print("memory", memory[-1], f"(encode {te:.1f} s, decode {td:.1f} s)", flush=True)
                del wav, z
    return rows, flops, peaks, memory


def report(args: argparse.Namespace, rows: List[Row], flops: Dict[str, Dict[str, float]], peaks: Dict[str, float],
           memory: List[Tuple[str, str, float, float, float]]) -> str:
    lines = ["| device | model | input | op | audio s | wall s | audio s per s (= x real time) | peak mem MiB "
             "| GFLOP/s achieved |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        frac = f" ({100 * r.flops_per_s / peaks[r.device]:.1f}% of bf16 peak)" if r.device in peaks else ""
        lines.append(f"| {r.device} | {r.model} | {r.case} | {r.op} | {r.audio_s:g} | {r.seconds:.2f} | "
                     f"{r.speed:.3f} | {r.mem_mib:.0f} | {r.flops_per_s / 1e9:.1f}{frac} |")
    lines += ["", "FLOPs per second of audio (torch.utils.flop_counter: matmuls, convolutions, attention):", "",
              "| device/model | encode GFLOP | decode GFLOP | parallel decode GFLOP |", "|---|---:|---:|---:|"]
    for key, f in flops.items():
        par = f"{f['parallel'] / 1e9:.1f}" if "parallel" in f else "-"
        lines.append(f"| {key} | {f['encode'] / 1e9:.1f} | {f['decode'] / 1e9:.1f} | {par} |")
    if memory:
        lines += ["", "Peak memory vs audio length (one file, autoregressive decode):", "",
                  "| device | preset | audio s | encode peak MiB | decode peak MiB |", "|---|---|---:|---:|---:|"]
        lines += [f"| {d} | {p} | {s:g} | {me:.0f} | {md:.0f} |" for d, p, s, me, md in memory]
    for dev, peak in peaks.items():
        lines.append(f"\n{dev}: measured bf16 matmul peak {peak / 1e12:.1f} TFLOP/s")
    return "\n".join(lines)


def _fix_malloc() -> None:
    """Re-run this script with glibc's mmap threshold fixed (Linux, CPU peak memory).

    glibc raises its mmap threshold dynamically after large frees, after which freed tensors
    stay in the heap and RSS no longer falls: every later peak-RSS delta would read ~0. A fixed
    threshold (glibc's default value, 128 KiB) returns large blocks to the OS on free, so the
    RSS peak of each call is its own. It also makes CPU inference slower (every large tensor is
    a fresh mmap: small preset, 8 s decode 6.3 s -> 10.3 s here), for every model alike; use
    ``--default-malloc`` for timings closer to normal use (CPU peak memory is then unreliable).
    """
    if (sys.platform.startswith("linux") and "MALLOC_MMAP_THRESHOLD_" not in os.environ
            and "--default-malloc" not in sys.argv):
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:], env)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["small", "paper"])
    p.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    p.add_argument("--long-seconds", type=float, default=600.0)
    p.add_argument("--short-count", type=int, default=32)
    p.add_argument("--short-seconds", type=float, default=10.0)
    p.add_argument("--modes", nargs="+", default=["autoregressive", "parallel"])
    p.add_argument("--parallel-short", action="store_true", help="also time parallel decoding on the short batch")
    p.add_argument("--memory-presets", nargs="*", default=["small"])
    p.add_argument("--memory-seconds", type=float, nargs="*", default=[60.0, 600.0])
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--v1-segment-seconds", type=float, default=60.0, help="v1's max_waveform_length default")
    p.add_argument("--no-v1", action="store_true")
    p.add_argument("--compile", action="store_true", help="EncoderDecoder(compile=True) for our models")
    p.add_argument("--default-malloc", action="store_true",
                   help="keep glibc's dynamic mmap threshold: faster CPU timings, unreliable CPU peak memory")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quick", action="store_true",
                   help="CPU-sized run: 8 s file, 2 x 4 s batch, memory probe 15 s vs 120 s (explicit flags win)")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = p.parse_args(argv)
    if args.quick:
        given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
        for flag, attr, value in [("--long-seconds", "long_seconds", 8.0), ("--short-count", "short_count", 2),
                                  ("--short-seconds", "short_seconds", 4.0), ("--memory-seconds", "memory_seconds",
                                                                               [15.0, 120.0])]:
            if flag not in given:
                setattr(args, attr, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    command = "python benchmarks/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows, flops, peaks, memory = run(args)
    table = report(args, rows, flops, peaks, memory)
    print(table)
    settings = (f"long file {args.long_seconds:g} s; short batch {args.short_count} x {args.short_seconds:g} s; "
                f"memory probe {[f'{s:g}' for s in args.memory_seconds]} s for {args.memory_presets}; "
                f"max_batch_size {args.max_batch_size}; modes {args.modes}; compile {args.compile}; "
                f"v1 segment {args.v1_segment_seconds:g} s; precision: float32 on CPU, bfloat16 autocast on CUDA")
    text = "\n".join(["Generated by `benchmarks/bench.py` (random weights: speed depends only on "
                      "the architecture).", "", f"Command: `{command.strip()}`", "", f"Settings: {settings}", ""]
                     + [f"- {k}: {v}" for k, v in info.items()]
                     + ["", "Peak memory: CPU = peak RSS (VmHWM, reset via /proc/self/clear_refs) minus RSS at the "
                        "start of the call, with MALLOC_MMAP_THRESHOLD_=131072 so freed blocks leave the process; "
                        "CUDA = torch.cuda.max_memory_allocated minus allocated at the start. "
                        "Decode timings include the sampler noise, the inverse STFT and the copy back to the host.",
                        "", table, ""]
                     + ([] if peaks else ["CUDA was not available on this machine: no GPU numbers (and no fraction "
                                          "of the bf16 matmul peak) were measured in this run.", ""])
                     + ["Timings are single runs after one warm-up call per decode mode; on a machine shared "
                        "with other jobs they are noisy (seen here: up to ~2x between runs).", ""]
                     + ([] if args.default_malloc or not sys.platform.startswith("linux") else
                        ["CPU timings were taken with MALLOC_MMAP_THRESHOLD_ fixed (needed for the RSS peaks), which "
                         "slows CPU inference for every model alike (small preset, 8 s decode: 6.3 s without, 10.3 s "
                         "with, measured separately); `--default-malloc` times without it.", ""]))
    out = Path(args.out)
    replace_section(out, "bench.py", text)  # other sections of the file (hand-written, mir_probe.py) are kept
    print(f"wrote the bench.py section of {out}")


if __name__ == "__main__":
    _fix_malloc()
    main()
