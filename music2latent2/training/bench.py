"""Training throughput: real optimiser steps timed on one device (``python -m music2latent2.training bench``).

The steps are those of :class:`~music2latent2.training.trainer.Trainer` (compiled loss, fused
optimiser, EMA, statistics on the device) on random audio crops held in pinned host memory, so
the host-to-device copy of a real loader is included but no decoding is. Speed does not depend
on what the audio sounds like, and random weights cost what trained ones do.

FLOPs come from torch's own counter (``torch.utils.flop_counter``) over one eager loss evaluation
and its backward pass, at batch 1: student and teacher forwards, backward, everything the step
computes. ``tflops`` is that count times the samples per second measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from typing import Any, Dict, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..modules import UPSAMPLE_MODES, set_upsample_mode
from .data import crop_samples
from .losses import draw_noise, spectrogram_windows
from .trainer import COMPILE_MODES, OPTIMIZERS, TrainConfig, Trainer, synchronize_device

__all__ = ["DENSE_BF16_TFLOPS", "bench", "training_flops_per_sample", "add_bench_arguments"]

# Dense (not 2:4 sparse) bf16 tensor-core peak of the accelerators this project trains on, from
# the vendors' data sheets: the denominator of ``peak_share``.
DENSE_BF16_TFLOPS: Dict[str, float] = {
    "H200": 989.4,
    "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 NVL": 835.5, "H100 PCIe": 756.0,
    "A100": 312.0,
}


def _peak_tflops(device_name: str) -> Optional[float]:
    for key, value in DENSE_BF16_TFLOPS.items():  # the most specific names come first
        if key in device_name:
            return value
    return None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def training_flops_per_sample(trainer: Trainer) -> float:
    """FLOPs of one training sample (a two-chunk crop): loss forward (student, teacher) + backward."""
    model = trainer.model
    crop = torch.randn(1, model.config.audio_channels, _crop_samples(trainer), device=trainer.device) * 0.1
    x = spectrogram_windows(model, crop)
    i_hi, eps = draw_noise(model.config, 1, trainer.sampler, torch.Generator(trainer.device).manual_seed(0),
                           device=trainer.device)
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _ = trainer.loss_module(x, i_hi, eps, torch.full((), 0.01, device=trainer.device))
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def _crop_samples(trainer: Trainer) -> int:
    c = trainer.model.config
    return crop_samples(c.chunk_samples, c.n_fft, c.hop_length)


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (KiB on Linux)


def bench(config: TrainConfig, device: torch.device, seconds: float = 30.0, warmup_steps: int = 3,
          upsample: str = "pixel_shuffle") -> Dict[str, Any]:
    """Time real training steps of ``config`` on ``device`` for about ``seconds`` (after the first,
    compiling, step and ``warmup_steps`` more).

    Returns:
        A JSON-ready dict: ``gflop_per_sample``, ``samples_per_s``, ``steps_per_s``, ``tflops``,
        ``peak_share`` (of the chip's dense bf16 peak, GPUs in :data:`DENSE_BF16_TFLOPS` only),
        ``peak_memory_mib`` (CUDA: allocated; CPU: process RSS), ``compile_s`` (first step,
        compiling included; None when eager), ``first_step_s``, ``device`` and the settings.
    """
    if not seconds > 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    trainer = Trainer(config, device)
    set_upsample_mode(trainer.model, upsample)
    flops = training_flops_per_sample(trainer)
    b = config.batch_size
    crop = _crop_samples(trainer)
    pin = device.type == "cuda"
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(b, trainer.model.config.audio_channels, crop, generator=gen) * 0.1 for _ in range(4)]
    if pin:
        batches = [x.pin_memory() for x in batches]
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    trainer.step_on_device(batches[0])
    synchronize_device(device)
    first_step_s = time.perf_counter() - t0
    for i in range(warmup_steps):
        trainer.step_on_device(batches[(i + 1) % len(batches)])
    synchronize_device(device)
    steps = 0
    t0 = time.perf_counter()
    while True:
        trainer.step_on_device(batches[steps % len(batches)])
        steps += 1
        if steps % 4 == 0 or device.type != "cuda":  # the host runs ahead; look at the clock now and then
            synchronize_device(device)
            if time.perf_counter() - t0 >= seconds:
                break
    synchronize_device(device)
    elapsed = time.perf_counter() - t0
    samples_per_s = steps * b / elapsed
    tflops = flops * samples_per_s / 1e12
    name = _device_name(device)
    peak = _peak_tflops(name) if device.type == "cuda" else None
    return {
        "preset": config.preset, "batch_size": b, "device": name, "precision": config.precision,
        "autocast": str(trainer.autocast_dtype).replace("torch.", "") if trainer.autocast_dtype else "float32",
        "compiled": trainer.compiled, "optimizer": config.optimizer, "upsample": upsample,
        "channels_last": config.channels_last,
        "gflop_per_sample": flops / 1e9, "samples_per_s": samples_per_s, "steps_per_s": steps / elapsed,
        "tflops": tflops, "peak_share": tflops / peak if peak else None,
        "peak_memory_mib": _peak_memory_mib(device), "compile_s": trainer.compile_seconds,
        "first_step_s": first_step_s, "timed_steps": steps, "timed_s": elapsed,
        "skipped": trainer.skipped, "torch": torch.__version__,
    }


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="small", choices=["paper", "paper_stereo", "small", "tiny"])
    p.add_argument("--model-overrides", default=None, help='JSON, e.g. \'{"depth": 4}\'')
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seconds", type=float, default=30.0, help="timed part, after the first step and warm-up")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--compile", default="auto", choices=COMPILE_MODES)
    p.add_argument("--compile-cache", default=None, help="read (and write) compiled kernels here")
    p.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS)
    p.add_argument("--upsample", default="pixel_shuffle", choices=UPSAMPLE_MODES)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_bench(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size must be >= 1, got {args.batch_size}")
    overrides = json.loads(args.model_overrides) if args.model_overrides else {}
    config = TrainConfig(preset=args.preset, model_overrides=overrides, batch_size=args.batch_size,
                         total_steps=10 ** 6, warmup_steps=100, precision=args.precision, compile=args.compile,
                         compile_cache=args.compile_cache, optimizer=args.optimizer,
                         channels_last=args.channels_last)
    result = bench(config, device, args.seconds, args.warmup_steps, args.upsample)
    if args.json:
        print(json.dumps(result))
        return 0
    share = f" ({100 * result['peak_share']:.1f}% of the chip's dense bf16 peak)" if result["peak_share"] else ""
    compile_s = f"{result['compile_s']:.1f} s" if result["compile_s"] is not None else "eager"
    print(f"{result['preset']} batch {result['batch_size']} on {result['device']}: "
          f"{result['samples_per_s']:.2f} samples/s ({result['steps_per_s']:.3f} steps/s), "
          f"{result['gflop_per_sample']:.1f} GFLOP/sample, {result['tflops']:.3f} TFLOP/s{share}, "
          f"peak memory {result['peak_memory_mib']:.0f} MiB, compile {compile_s}")
    return 0
