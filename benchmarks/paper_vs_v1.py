"""The ``paper`` preset against music2latent v1 on a CPU, by layer.

    pip install music2latent        # v1 (CC BY-NC): only measured here, never used by the package
    python benchmarks/paper_vs_v1.py [--seconds 6] [--threads 2] [--presets paper small]

Both networks have random weights (speed depends only on the architecture) and go through their
whole-file API on the same audio (the Brahms example, tiled) with the same torch threads: ours
through :class:`EncoderDecoder` (autoregressive decode, the CPU layout it picks), v1 the way its
own inference code drives it (benchmarks/bench.py's ``V1``). After one warm-up call each, one
encode and one decode are timed, and forward hooks time each part of the network during them;
a FLOP count (torch.utils.flop_counter) of the same calls gives each part's work. The table says
where the time goes and why one model is slower than the other.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import V1, Ours  # noqa: E402
from bench_report import git_commit  # noqa: E402
from streaming import _music  # noqa: E402

SR = 44100
Parts = List[Tuple[str, List[nn.Module], str]]  # (label, modules, FLOP-counter key prefix)


def _ours_parts(model: nn.Module) -> Dict[str, Parts]:
    enc, dec, cm = model.encoder, model.decoder, model.consistency
    return {
        "encode": [("encoder patchifier (convs)", [enc.patchifier], "Encoder.patchifier"),
                   ("encoder transformer", list(enc.blocks), "Encoder.blocks.")],
        "decode": [("decoder transformer", list(dec.blocks), "Decoder.blocks."),
                   ("decoder de-patchifier (convs)", [dec.depatchifier], "Decoder.depatchifier"),
                   ("consistency patchifier (convs, 2 chunks)", [cm.patchifier], "ConsistencyModel.patchifier"),
                   ("consistency transformer", list(cm.blocks), "ConsistencyModel.blocks."),
                   ("consistency de-patchifier (convs)", [cm.depatchifier], "ConsistencyModel.depatchifier")],
    }


def _v1_parts(net: nn.Module) -> Dict[str, Parts]:
    return {
        "encode": [("v1 encoder", [net.encoder], "Encoder")],
        "decode": [("v1 decoder (latents to features)", [net.decoder], "UNet.decoder"),
                   ("v1 U-Net denoiser (one step)", [net], "UNet")],
    }


def _timed_parts(parts: Parts, fn: Callable[[], object]) -> Tuple[float, Dict[str, float]]:
    """Wall time of ``fn`` and of each part inside it (hooks on the part's modules)."""
    spent: Dict[str, float] = {label: 0.0 for label, _, _ in parts}
    handles, starts = [], {}
    for label, modules, _ in parts:
        for module in modules:
            def pre(mod: nn.Module, args: object, key: int = id(module)) -> None:
                starts[key] = time.perf_counter()

            def post(mod: nn.Module, args: object, out: object, key: int = id(module), label: str = label) -> None:
                spent[label] += time.perf_counter() - starts.pop(key)

            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        start = time.perf_counter()
        fn()
        total = time.perf_counter() - start
    finally:
        for h in handles:
            h.remove()
    return total, spent


def _flops(parts: Parts, fn: Callable[[], object]) -> Tuple[float, Dict[str, float]]:
    counter = FlopCounterMode(display=False, depth=4)
    with counter:
        fn()
    counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    out = {}
    for label, _, key in parts:
        if key.endswith("."):  # a ModuleList's blocks: each block is its own key
            out[label] = sum(v for k, v in counts.items() if k.startswith(key) and "." not in k[len(key):])
        else:
            out[label] = counts.get(key, 0)
    return float(counter.get_total_flops()), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--presets", nargs="+", default=["paper"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    wav = torch.from_numpy(_music(args.seconds, SR))[None]  # (1, T)
    summary, layers = [], []
    runners = [(name, Ours(name, cpu, 32, False)) for name in args.presets] + [("music2latent v1", V1(cpu, 32, 60.0))]
    for name, runner in runners:
        is_v1 = isinstance(runner, V1)
        parts = _v1_parts(runner.net) if is_v1 else _ours_parts(runner.model)
        latents = runner.encode(wav)
        runner.decode(latents, wav.shape[-1])  # warm-up of both
        calls = {"encode": lambda: runner.encode(wav), "decode": lambda: runner.decode(latents, wav.shape[-1])}
        for op, fn in calls.items():
            total, spent = _timed_parts(parts[op], fn)
            flops, part_flops = _flops(parts[op], fn)
            if is_v1 and op == "decode":  # the U-Net's hook includes its decoder: keep them apart
                body, inner = "v1 U-Net denoiser (one step)", "v1 decoder (latents to features)"
                spent[body] -= spent[inner]
                part_flops[body] -= part_flops[inner]
            summary.append(f"| {name} | {op} | {args.seconds:g} | {total:.2f} | {args.seconds / total:.2f} | "
                           f"{flops / 1e9 / args.seconds:.0f} | {flops / 1e9 / total:.0f} |")
            rest = total - sum(spent.values())
            for label in list(spent) + ["everything else (STFT, sampler, glue)"]:
                t = spent.get(label, rest)
                f = part_flops.get(label, flops - sum(part_flops.values()))
                layers.append(f"| {name} | {op} | {label} | {f / 1e9 / args.seconds:.1f} | {100 * f / flops:.0f} % | "
                              f"{1000 * t / args.seconds:.0f} | {100 * t / total:.0f} % | "
                              f"{f / 1e9 / t if t > 0 else 0:.0f} |")
    print(f"{platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}, torch {torch.__version__}, "
          f"commit {git_commit()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; random weights, float32\n")
    print("| model | op | audio s | wall s | x real time | GFLOP per audio second | GFLOP/s achieved |")
    print("|---|---|---:|---:|---:|---:|---:|")
    print("\n".join(summary))
    print("\n| model | op | part | GFLOP per audio second | share of FLOPs | ms per audio second | share of time | "
          "GFLOP/s |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    print("\n".join(layers))


if __name__ == "__main__":
    main()
