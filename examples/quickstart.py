"""Quickstart: encode a clip to Music2Latent2 latents, decode it back, write the reconstruction.

    python examples/quickstart.py                      # the bundled 8 s Brahms clip
    python examples/quickstart.py song.wav --model path/to/checkpoint --out recon.wav

Without ``--model`` it uses the default pretrained model (bundled in the package, no network
needed). If no pretrained weights are available (a damaged install, or a manifest without
them), it says so and runs an untrained ``small`` model instead, so the whole pipeline and its
timings can still be seen: the reconstruction is then not music.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import soundfile as sf
import torch

from music2latent2 import EncoderDecoder, ModelConfig, Music2Latent2, clip_features
from music2latent2.hub import WeightsNotAvailableError

HERE = Path(__file__).resolve().parent
DEFAULT_CLIP = HERE / "brahms_hungarian_dance_5_8s.flac"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("audio", nargs="?", default=str(DEFAULT_CLIP), help="audio file to encode")
    parser.add_argument("--model", default=None, help="manifest name or checkpoint path (default: pretrained)")
    parser.add_argument("--out", default="reconstruction.wav", help="where to write the reconstruction")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--precision", default="float32", help="float32, bfloat16 or float16")
    args = parser.parse_args()

    try:
        encdec = EncoderDecoder(args.model, device=args.device, precision=args.precision)
        note = ""
    except WeightsNotAvailableError as err:
        print(f"note: {str(err).splitlines()[0]}")
        print("note: running an UNTRAINED 'small' model so the pipeline can be shown; "
              "its reconstruction will not sound like the input.")
        torch.manual_seed(0)
        model = Music2Latent2(ModelConfig.from_preset("small"))
        encdec = EncoderDecoder(model, device=args.device, precision=args.precision)
        note = " (untrained)"
    print(f"model{note}: {encdec}")

    info = sf.info(args.audio)
    print(f"input: {args.audio} ({info.channels} ch, {info.samplerate} Hz, {info.duration:.2f} s)")

    start = time.perf_counter()
    latents, gain = encdec.encode(args.audio, return_gain=True)  # (C, 64, L) numpy; the gain to the model's level
    t_enc = time.perf_counter() - start
    k = encdec.config.summary_tokens
    per_second = encdec.config.latents_per_second
    print(f"latents: {latents.shape} {latents.dtype}, std {latents.std():.3f}  "
          f"({per_second:.2f} latent vectors per second = {per_second / k:.2f} sets of {k})")

    length = math.ceil(info.frames * encdec.sample_rate / info.samplerate)  # samples at 44.1 kHz
    features = encdec.encode(args.audio, extract_features=True)  # (C, K*dim, chunks)
    print(f"MIR features: {features.shape} -> clip embedding {clip_features(features, length).shape}")

    start = time.perf_counter()
    recon = encdec.decode(latents, length=length, gain=gain, seed=0)  # (C, length) at 44.1 kHz, the input's level
    t_dec = time.perf_counter() - start
    sf.write(args.out, recon.T, encdec.sample_rate)
    print(f"reconstruction: {recon.shape} -> {args.out}")

    seconds = length / encdec.sample_rate
    print(f"encode {t_enc:.2f} s ({seconds / t_enc:.1f}x real time), "
          f"decode {t_dec:.2f} s ({seconds / t_dec:.1f}x real time) on {encdec.device}")


if __name__ == "__main__":
    main()
