"""The generative-model loop end to end on a CPU: pre-encode, train on latents, decode what it makes.

    python examples/latent_model.py [AUDIO_FILE_OR_DIR] [--model NAME_OR_PATH] [--steps 300] [-o latent_model_out]

1. ``music2latent2 encode`` turns the audio (default: the bundled 8 s Brahms clip) into ``.m2l``
   files, once (re-running skips them).
2. :class:`~music2latent2.LatentDataset` serves random chunk-aligned crops of 3 chunks,
   standardised per latent dimension with the dataset's statistics.
3. A tiny next-chunk model (an MLP from one chunk's K=8 summary embeddings to the next chunk's)
   trains for ``--steps`` steps: a stand-in for the diffusion or flow model you would train.
4. It continues the first chunk of the clip for ``--chunks`` chunks; the latents are
   de-normalised and decoded to ``OUT/generated.wav`` at 44.1 kHz.

Runs in about a minute on a laptop CPU. The point is the plumbing (shapes, crops, statistics,
decoding), not the music: a one-clip MLP mostly learns the clip's average chunk.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from music2latent2 import EncoderDecoder, LatentDataset
from music2latent2.cli import main as cli_main

EXAMPLE_CLIP = Path(__file__).resolve().parent / "brahms_hungarian_dance_5_8s.flac"


class NextChunk(nn.Module):
    """Predicts chunk t+1's K latent vectors from chunk t's: (B, d, K) -> (B, d, K)."""

    def __init__(self, latent_dim: int, summary_tokens: int, hidden: int = 256) -> None:
        super().__init__()
        size = latent_dim * summary_tokens
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(size, hidden), nn.GELU(), nn.Linear(hidden, size))
        self.shape = (latent_dim, summary_tokens)

    def forward(self, chunk: torch.Tensor) -> torch.Tensor:
        return chunk + self.net(chunk).view(-1, *self.shape)  # a residual step from the current chunk


def pairs(crops: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, d, n*K) crops -> (B*(n-1), d, K) inputs and next-chunk targets."""
    b, d, length = crops.shape
    chunks = crops.view(b, d, length // k, k).permute(0, 2, 1, 3)  # (B, n, d, K)
    return chunks[:, :-1].reshape(-1, d, k), chunks[:, 1:].reshape(-1, d, k)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("audio", nargs="?", default=str(EXAMPLE_CLIP), help="an audio file or folder")
    parser.add_argument("--model", default=None, help="autoencoder: manifest name, checkpoint or Hub repo id "
                                                      "(default: the bundled model)")
    parser.add_argument("-o", "--out", default="latent_model_out", help="output folder")
    parser.add_argument("--steps", type=int, default=300, help="training steps of the next-chunk model")
    parser.add_argument("--chunks", type=int, default=8, help="chunks to generate (0.74 s each)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    torch.manual_seed(args.seed)

    # 1. Pre-encode (what you would run once over a whole dataset, on a GPU).
    latent_dir = out / "latents"
    cmd = ["encode", args.audio, "-o", str(latent_dir), "-q"] + (["--model", args.model] if args.model else [])
    status = cli_main(cmd)
    if status != 0:
        return status

    # 2. Crops of 3 chunks, each latent dimension standardised with the dataset's statistics.
    data = LatentDataset(latent_dir, crop_chunks=3, normalize=True)
    k = data.summary_tokens
    print(f"{data}; latent stats: mean |mean| {data.stats.mean.abs().mean():.3f}, mean std {data.stats.std.mean():.3f}")
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True)

    # 3. Train the stand-in generative model.
    model = NextChunk(data.latent_dim, k)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    probe = pairs(torch.stack([data[i] for i in range(len(data))]), k)  # a fixed batch to report the loss on
    start, step, losses = time.perf_counter(), 0, []
    while step < args.steps:
        for crops in loader:  # (B, d, 3K)
            x, y = pairs(crops, k)
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step in (1, args.steps):
                with torch.no_grad():
                    losses.append(float(nn.functional.mse_loss(model(probe[0]), probe[1])))
            if step >= args.steps:
                break
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.1f} s: next-chunk loss "
          f"{losses[0]:.3f} -> {losses[-1]:.3f} (standardised latents; 1.0 is predicting the mean)")

    # 4. Generate from the first chunk of the first sequence, de-normalise, decode.
    whole = LatentDataset(latent_dir, normalize=True, stats=data.stats, random_crop=False)
    chunk = whole[0][:, :k][None]  # (1, d, K)
    generated = [chunk]
    with torch.no_grad():
        for _ in range(args.chunks - 1):
            chunk = model(chunk)
            generated.append(chunk)
    z = data.denormalize(torch.cat(generated, dim=-1))  # (1, d, chunks*K), the encoder's scale again
    encdec = EncoderDecoder(args.model)
    wav = encdec.decode(z, seed=args.seed)  # (1 * audio_channels, chunks * 32768) at 44.1 kHz
    import soundfile as sf

    path = out / "generated.wav"
    sf.write(path, np.clip(wav.numpy().T, -1, 1), encdec.sample_rate)
    print(f"generated latents {tuple(z.shape)} -> {path} ({wav.shape[-1] / encdec.sample_rate:.2f} s)")
    np.save(out / "generated_latents.npy", z.numpy())
    return 0


if __name__ == "__main__":
    sys.exit(main())
