"""Live use on a CPU: per-chunk compute, real-time factor and latency of streaming encode/decode.

    python benchmarks/streaming.py [--model NAME_OR_PATH] [--chunks 12] [--threads 1 2] [--torchscript]

Real music (the bundled Brahms example, tiled) goes through :class:`StreamingEncoder` in blocks of
4,096 samples, as a live host would send it, and its latents through :class:`StreamingDecoder` one
chunk at a time. Per chunk, the compute is timed: for the encoder, the block that completes the
chunk; for the decoder, the push of the chunk's latents (sampler step, decoder features, inverse
STFT). The first chunk of each is a warm-up and not counted. With ``--torchscript`` the nn~ export
is timed the same way, one 32,768-sample block (one chunk) per ``encode`` / ``decode`` call.

With ``--quality FILE...`` it also measures what the low-latency decoder costs: each file is
encoded once and decoded by a :class:`StreamingDecoder` in both modes (same seed), and SI-SDR and
the multi-resolution log-mel distance to the original are reported per file and on average.

A stream keeps up in real time when every chunk's compute fits in a chunk's duration (743 ms):
``x real time`` is chunk duration / median compute, ``worst`` the slowest chunk. The latency a
listener hears is the algorithmic latency (docs/streaming.md) plus one chunk's compute.

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Tuple

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import git_commit  # noqa: E402

from music2latent2 import EncoderDecoder, StreamingDecoder, StreamingEncoder  # noqa: E402
from music2latent2.audio import load_audio, resample  # noqa: E402
from music2latent2.metrics import multires_logmel_distance, si_sdr  # noqa: E402

EXAMPLE = ROOT / "examples" / "brahms_hungarian_dance_5_8s.flac"
BLOCK = 4096


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


def torchscript_chunk_times(codec: EncoderDecoder, wav: np.ndarray,
                            latents: np.ndarray) -> Tuple[List[float], List[float], int, int]:
    """(encode times, decode times, encode latency, decode latency) of the nn~ export, a chunk per call."""
    from music2latent2.torchscript import export_torchscript

    with tempfile.TemporaryDirectory() as tmp:
        ts = torch.jit.load(str(export_torchscript(codec.model, Path(tmp) / "m.ts")))
    cs, ratio = codec.chunk_samples, ts.encode_params.tolist()[3]
    audio, frames = torch.from_numpy(wav)[None, None], torch.from_numpy(latents)
    with torch.inference_mode():
        enc = [_timed(ts.encode, audio[..., i:i + cs]) for i in range(0, audio.shape[-1] - cs + 1, cs)]
        step = cs // ratio
        dec = [_timed(ts.decode, frames[..., t:t + step]) for t in range(0, frames.shape[-1], step)]
    # The first calls only fill the latency FIFOs or warm up.
    return enc[2:], dec[2:], int(ts.encode_latency), int(ts.decode_latency)


def quality_rows(codec: EncoderDecoder, files: List[str], max_seconds: float) -> List[str]:
    """Refined vs low-latency streaming decode of each file: SI-SDR (dB) and log-mel distance."""
    rows, totals = [], np.zeros(4)
    for path in files:
        data, sr = load_audio(path)
        data = resample(torch.from_numpy(data), sr, codec.sample_rate).numpy()
        data = data[:, : int(max_seconds * codec.sample_rate)]
        z = codec.encode(data)
        scores = []
        for low in (False, True):
            dec = StreamingDecoder(codec, seed=0, low_latency=low)
            rec = np.concatenate([dec.push(z), dec.flush()], -1)[:, : data.shape[-1]]
            scores += [si_sdr(data, rec), multires_logmel_distance(data, rec, codec.sample_rate)]
        totals += scores
        rows.append(f"| {Path(path).name} | {data.shape[-1] / codec.sample_rate:.1f} | {scores[0]:.2f} | "
                    f"{scores[2]:.2f} | {scores[1]:.3f} | {scores[3]:.3f} |")
    mean = totals / max(1, len(files))
    rows.append(f"| **mean** | | {mean[0]:.2f} | {mean[2]:.2f} | {mean[1]:.3f} | {mean[3]:.3f} |")
    return rows


def _row(what: str, threads: int, times: List[float], chunk_s: float, latency_samples: int, sr: int) -> str:
    med, worst = statistics.median(times), max(times)
    keeps_up = "yes" if worst < chunk_s else ("on average" if med < chunk_s else "no")
    heard = latency_samples / sr + med
    return (f"| {what} | {threads} | {len(times)} | {med * 1000:.0f} | {worst * 1000:.0f} | {chunk_s / med:.2f} | "
            f"{keeps_up} | {latency_samples} ({latency_samples / sr * 1000:.0f} ms) | {heard * 1000:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the bundled checkpoint")
    p.add_argument("--chunks", type=int, default=12, help="chunks of audio to stream (each 743 ms)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    p.add_argument("--torchscript", action="store_true", help="also time the nn~ TorchScript export")
    p.add_argument("--quality", nargs="*", default=[], metavar="FILE",
                   help="also compare refined and low-latency decoding on these audio files")
    p.add_argument("--max-seconds", type=float, default=30.0, help="longest excerpt of each --quality file")
    args = p.parse_args()

    codec = EncoderDecoder(args.model, device="cpu")
    sr, cs = codec.sample_rate, codec.chunk_samples
    chunk_s = cs / sr
    wav = _music(args.chunks * chunk_s, sr)
    latents = codec.encode(wav)  # (1, 64, 8 * chunks)
    enc_latency = cs + StreamingEncoder(codec).lookahead  # first sample of a chunk -> its latents
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        rows.append(_row("stream encode", threads, encoder_chunk_times(codec, wav), chunk_s, enc_latency, sr))
        for low in (False, True):
            dec = StreamingDecoder(codec, low_latency=low)
            rows.append(_row("stream decode" + (" low-latency" if low else ""), threads,
                             decoder_chunk_times(codec, latents, low), chunk_s, dec.latency, sr))
        if args.torchscript:
            enc_t, dec_t, enc_lat, dec_lat = torchscript_chunk_times(codec, wav, latents)
            rows.append(_row(f"nn~ encode ({cs}-sample blocks)", threads, enc_t, chunk_s, enc_lat, sr))
            rows.append(_row(f"nn~ decode ({cs}-sample blocks)", threads, dec_t, chunk_s, dec_lat, sr))

    commit = git_commit()
    source = codec.model.source.name if codec.model.source is not None else "in-memory"
    print(f"model {source} ({codec.model.num_parameters() / 1e6:.1f} M params), {args.chunks} chunks of "
          f"{chunk_s * 1000:.0f} ms, float32; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, commit {commit}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| stream | torch threads | chunks timed | median ms per chunk | worst ms | x real time | keeps up | "
          "algorithmic latency, samples | latency ms (algorithmic + median compute) |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|")
    print("\n".join(rows))
    if args.quality:
        torch.set_num_threads(max(args.threads))
        print("\n| file | seconds | SI-SDR dB refined | SI-SDR dB low-latency | log-mel dist. refined | "
              "log-mel dist. low-latency |")
        print("|---|---:|---:|---:|---:|---:|")
        print("\n".join(quality_rows(codec, args.quality, args.max_seconds)))


if __name__ == "__main__":
    main()
