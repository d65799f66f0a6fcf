"""Live use on a CPU: per-chunk compute, real-time factor and latency of streaming encode/decode.

    python benchmarks/streaming.py [--model NAME_OR_PATH] [--chunks 12] [--threads 1 2] [--torchscript]
        [--baseline] [--candidates bfloat16 onnxruntime compile] [--quality FILE...] [--json]

Real music (the bundled Brahms example, tiled) goes through :class:`StreamingEncoder` in blocks of
4,096 samples, as a live host would send it, and its latents through :class:`StreamingDecoder` one
chunk at a time, in the refined (paper) and the low-latency mode. Per chunk, the compute is timed:
for the encoder, the block that completes the chunk; for the decoder, the push of the chunk's
latents (sampler step, decoder features, inverse STFT). The first chunk of each is a warm-up and
not counted. With ``--torchscript`` the nn~ export (refined and low-latency files) is timed the
same way, one 32,768-sample block (one chunk) per ``encode`` / ``decode`` call.

``--baseline`` also times the path before the exact CPU speed-ups (benchmarks/cpu_candidates.py),
in the same run. ``--candidates`` times decoding paths that are not the default: ``bfloat16``
(CPU autocast), ``onnxruntime`` (the decoder networks in ONNX Runtime), ``compile``
(``torch.compile``, minutes of compiling first).

``--quality FILE...`` measures what each decoding path costs in quality: each file's excerpt is
encoded once (float32, at the model's input level) and decoded by a :class:`StreamingDecoder`
(same seed) on every path; per path it reports the log-mel distance, the per-octave-band level
error and the overall level against the original, ViSQOL, and the largest difference to the
exact path's audio.

A stream keeps up in real time when every chunk's compute fits in a chunk's duration (743 ms):
``x real time`` is chunk duration / median compute, ``worst`` the slowest chunk. The latency a
listener hears is the algorithmic latency (docs/streaming.md) plus one chunk's compute.

Prints markdown tables, or with ``--json`` one JSON object for one thread count:
``encode_x_realtime``, ``decode_x_realtime``, ``decode_low_latency_x_realtime`` and the same keys
prefixed ``nntilde_`` for the nn~ export (plus ``baseline`` / ``candidates`` objects if asked for).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import git_commit  # noqa: E402
from cpu_candidates import before_cpu_speedups, bfloat16_codec, compiled_codec, onnxruntime_codec  # noqa: E402

from music2latent2 import EncoderDecoder, StreamingDecoder, StreamingEncoder  # noqa: E402
from music2latent2.audio import load_audio, resample  # noqa: E402
from music2latent2.evaluate import ViSQOL, level_difference_db  # noqa: E402
from music2latent2.metrics import band_level_error_db, multires_logmel_distance, octave_band_levels_db  # noqa: E402

EXAMPLE = ROOT / "examples" / "brahms_hungarian_dance_5_8s.flac"
BLOCK = 4096
CANDIDATES = ("bfloat16", "onnxruntime", "compile")


def _timed(fn: Callable[..., object], *args: object) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def _music(seconds: float, sr: int) -> np.ndarray:
    data, file_sr = load_audio(EXAMPLE)
    assert file_sr == sr, f"{EXAMPLE} is at {file_sr} Hz"
    mono = data.mean(axis=0)
    reps = int(np.ceil(seconds * sr / mono.shape[-1]))
    return np.tile(mono, reps)[: int(seconds * sr)].astype(np.float32)


def encoder_chunk_times(codec: EncoderDecoder, wav: np.ndarray) -> List[float]:
    enc, times = StreamingEncoder(codec), []
    for i in range(0, wav.shape[-1], BLOCK):
        start = time.perf_counter()
        z = enc.push(wav[i:i + BLOCK])
        if z.shape[-1]:
            times.append(time.perf_counter() - start)
    return times[1:]


def decoder_chunk_times(codec: EncoderDecoder, latents: np.ndarray, low_latency: bool) -> List[float]:
    dec = StreamingDecoder(codec, seed=0, low_latency=low_latency)
    k = codec.config.summary_tokens
    return [_timed(dec.push, latents[..., t:t + k]) for t in range(0, latents.shape[-1], k)][1:]


def torchscript_chunk_times(codec: EncoderDecoder, wav: np.ndarray, latents: np.ndarray,
                            low_latency: bool) -> Tuple[List[float], List[float], int, int]:
    """(encode times, decode times, encode latency, decode latency) of the nn~ export, a chunk per call."""
    from music2latent2.torchscript import export_torchscript

    with tempfile.TemporaryDirectory() as tmp:
        ts = torch.jit.load(str(export_torchscript(codec.model, Path(tmp) / "m.ts", low_latency=low_latency)))
    cs, ratio = codec.chunk_samples, ts.encode_params.tolist()[3]
    audio, frames = torch.from_numpy(wav)[None, None], torch.from_numpy(latents)
    with torch.inference_mode():
        enc = [_timed(ts.encode, audio[..., i:i + cs]) for i in range(0, audio.shape[-1] - cs + 1, cs)]
        step = cs // ratio
        dec = [_timed(ts.decode, frames[..., t:t + step]) for t in range(0, frames.shape[-1], step)]
    # The first calls only fill the latency FIFOs or warm up.
    return enc[2:], dec[2:], int(ts.encode_latency), int(ts.decode_latency)


class Row:
    """One timed stream: its chunk times and algorithmic latency."""

    def __init__(self, key: str, what: str, threads: int, times: List[float], latency: int) -> None:
        self.key, self.what, self.threads, self.times, self.latency = key, what, threads, times, latency

    def x_realtime(self, chunk_s: float) -> float:
        return chunk_s / statistics.median(self.times)

    def markdown(self, chunk_s: float, sr: int) -> str:
        med, worst = statistics.median(self.times), max(self.times)
        keeps_up = "yes" if worst < chunk_s else ("on average" if med < chunk_s else "no")
        heard = self.latency / sr + med
        return (f"| {self.what} | {self.threads} | {len(self.times)} | {med * 1000:.0f} | {worst * 1000:.0f} | "
                f"{chunk_s / med:.2f} | {keeps_up} | {self.latency} ({self.latency / sr * 1000:.0f} ms) | "
                f"{heard * 1000:.0f} |")


def time_paths(codec: EncoderDecoder, wav: np.ndarray, latents: np.ndarray, threads: int, label: str,
               prefix: str, encode: bool, torchscript: bool) -> List[Row]:
    """Rows for one codec: stream encode (if ``encode``), decode in both modes, and the nn~ export."""
    rows = []
    if encode:
        rows.append(Row(prefix + "encode_x_realtime", f"{label}stream encode", threads,
                        encoder_chunk_times(codec, wav), codec.chunk_samples + StreamingEncoder(codec).lookahead))
    for low in (False, True):
        mode = "_low_latency" if low else ""
        rows.append(Row(f"{prefix}decode{mode}_x_realtime", f"{label}stream decode{' low-latency' * low}", threads,
                        decoder_chunk_times(codec, latents, low), StreamingDecoder(codec, low_latency=low).latency))
    if torchscript:
        cs = codec.chunk_samples
        for low in (False, True):
            enc_t, dec_t, enc_lat, dec_lat = torchscript_chunk_times(codec, wav, latents, low)
            mode = "_low_latency" if low else ""
            if not low and encode:
                rows.append(Row(f"{prefix}nntilde_encode_x_realtime", f"{label}nn~ encode ({cs}-sample blocks)",
                                threads, enc_t, enc_lat))
            rows.append(Row(f"{prefix}nntilde_decode{mode}_x_realtime",
                            f"{label}nn~ decode{' low-latency' * low} ({cs}-sample blocks)", threads, dec_t, dec_lat))
    return rows


def build_candidate(name: str, model: Optional[str], threads: int) -> EncoderDecoder:
    if name == "bfloat16":
        return bfloat16_codec(model)
    if name == "onnxruntime":
        return onnxruntime_codec(model, threads)
    if name == "compile":
        return compiled_codec(model)
    raise ValueError(f"unknown candidate {name!r}; choose from {CANDIDATES}")


# ----------------------------------------------------------------------------- quality
def _scores(data: np.ndarray, rec: np.ndarray, exact: np.ndarray, sr: int, visqol: ViSQOL) -> Dict[str, object]:
    bands = octave_band_levels_db(data, rec, sr)
    return {"logmel": multires_logmel_distance(data, rec, sr), "band_err": band_level_error_db(bands),
            "level": level_difference_db(data, rec), "visqol": visqol.score(data, rec, sr)[0],
            "max_diff": float(np.max(np.abs(rec.astype(np.float64) - exact))),
            "logmel_to_exact": multires_logmel_distance(exact, rec, sr)}


def quality(codecs: Dict[str, EncoderDecoder], files: List[str], max_seconds: float,
            use_visqol: bool) -> Tuple[List[str], Dict[str, Dict[str, Optional[float]]]]:
    """Per-file log-mel rows and per-path means, for every decoding path in ``codecs`` (the first
    is the exact one: everything is compared with it too)."""
    exact_codec = next(iter(codecs.values()))
    visqol = ViSQOL(use_visqol)
    sums: Dict[str, List[Dict[str, object]]] = {name: [] for name in codecs}
    rows = []
    for path in files:
        data, sr = load_audio(path)
        data = resample(torch.from_numpy(data), sr, exact_codec.sample_rate).numpy()
        data = data[:, : int(max_seconds * exact_codec.sample_rate)]
        z, gain = exact_codec.encode(data, return_gain=True)
        recs = {}
        for name, codec in codecs.items():
            dec = StreamingDecoder(codec, seed=0, low_latency=name.endswith("low-latency"), gain=gain)
            with torch.inference_mode():
                recs[name] = np.concatenate([dec.push(z), dec.flush()], -1)[:, : data.shape[-1]]
        exact = recs[next(iter(codecs))].astype(np.float64)
        cells = []
        for name, rec in recs.items():
            scores = _scores(data, rec, exact, exact_codec.sample_rate, visqol)
            sums[name].append(scores)
            cells.append(f"{scores['logmel']:.3f}")
        rows.append(f"| {Path(path).name} | {data.shape[-1] / exact_codec.sample_rate:.1f} | " + " | ".join(cells) + " |")
    means: Dict[str, Dict[str, Optional[float]]] = {}
    for name, scores in sums.items():
        means[name] = {}
        for key in scores[0]:
            values = [s[key] for s in scores if s[key] is not None]
            means[name][key] = float(np.mean(values)) if values else None  # type: ignore[arg-type]
        means[name]["max_diff"] = max(float(s["max_diff"]) for s in scores)  # type: ignore[arg-type]
    return rows, means


def _cell(value: Optional[float], fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the bundled checkpoint")
    p.add_argument("--chunks", type=int, default=12, help="chunks of audio to stream (each 743 ms)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    p.add_argument("--torchscript", action="store_true", help="also time the nn~ TorchScript export")
    p.add_argument("--baseline", action="store_true", help="also time the path before the CPU speed-ups")
    p.add_argument("--candidates", nargs="*", default=[], choices=CANDIDATES, help="also time these decoding paths")
    p.add_argument("--quality", nargs="*", default=[], metavar="FILE",
                   help="also measure every decoding path's quality on these audio files")
    p.add_argument("--max-seconds", type=float, default=30.0, help="longest excerpt of each --quality file")
    p.add_argument("--no-visqol", action="store_true", help="--quality without ViSQOL (it is slow)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (one --threads value; implies --torchscript)")
    args = p.parse_args()
    if args.chunks < 4:
        p.error("--chunks must be at least 4: the first chunks are warm-up or fill the nn~ FIFOs")
    if args.json and len(args.threads) != 1:
        p.error("--json measures one thread count: give --threads N")

    codec = EncoderDecoder(args.model, device="cpu")
    sr, cs = codec.sample_rate, codec.chunk_samples
    chunk_s = cs / sr
    wav = _music(args.chunks * chunk_s, sr)
    latents = codec.encode(wav)  # (1, 64, 8 * chunks)
    torchscript = args.torchscript or args.json
    before = None
    if args.baseline:
        with before_cpu_speedups():
            before = EncoderDecoder(args.model, device="cpu")
    rows: List[Row] = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        rows += time_paths(codec, wav, latents, threads, "", "", True, torchscript)
        if before is not None:
            with before_cpu_speedups():
                rows += time_paths(before, wav, latents, threads, "before: ", "baseline.", False, torchscript)
        for name in args.candidates:
            candidate = build_candidate(name, args.model, threads)
            rows += time_paths(candidate, wav, latents, threads, f"{name}: ", f"candidates.{name}.", False, False)

    commit = git_commit()
    source = codec.model.source.name if codec.model.source is not None else "in-memory"
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    if args.json:
        out: Dict[str, object] = {"model": source, "threads": args.threads[0], "chunks": args.chunks,
                                  "cpu": cpu, "torch": torch.__version__, "commit": commit}
        for row in rows:
            *groups, key = row.key.split(".")
            target = out
            for group in groups:
                target = target.setdefault(group, {})  # type: ignore[assignment, union-attr]
            target[key] = round(row.x_realtime(chunk_s), 3)  # type: ignore[index]
        print(json.dumps(out, indent=2))
        return
    print(f"model {source} ({codec.model.num_parameters() / 1e6:.1f} M params), {args.chunks} chunks of "
          f"{chunk_s * 1000:.0f} ms, float32 unless named; {cpu}, torch {torch.__version__}, commit {commit}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| stream | torch threads | chunks timed | median ms per chunk | worst ms | x real time | keeps up | "
          "algorithmic latency, samples | latency ms (algorithmic + median compute) |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|")
    print("\n".join(row.markdown(chunk_s, sr) for row in rows))
    if args.quality:
        torch.set_num_threads(max(args.threads))
        codecs = {"exact": codec, "exact low-latency": codec}
        for name in args.candidates:
            codecs[name] = build_candidate(name, args.model, max(args.threads))
        file_rows, means = quality(codecs, args.quality, args.max_seconds, not args.no_visqol)
        print(f"\nLog-mel distance to the original, first {args.max_seconds:g} s of each file:\n")
        print("| file | seconds | " + " | ".join(codecs) + " |")
        print("|---|---:|" + "---:|" * len(codecs))
        print("\n".join(file_rows))
        print("\nMeans over the files (max |difference| to the exact path's audio: the largest over all files):\n")
        print("| decoding path | log-mel distance | band level error dB | level dB | ViSQOL | "
              "log-mel distance to exact | max abs difference to exact |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, m in means.items():
            print(f"| {name} | {_cell(m['logmel'], '.4f')} | {_cell(m['band_err'], '.3f')} | {_cell(m['level'], '.2f')} | "
                  f"{_cell(m['visqol'], '.3f')} | {_cell(m['logmel_to_exact'], '.4f')} | {_cell(m['max_diff'], '.2e')} |")


if __name__ == "__main__":
    main()
