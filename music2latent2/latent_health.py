"""Latent health: numbers that tell whether the summary embeddings carry the music.

A collapsed encoder gives the K summary embeddings of a chunk as near-copies of one vector that
barely changes over a clip: the decoder then learns timbre (what stays constant in a clip) but not
notes (what changes from chunk to chunk). These numbers catch this, all cheap enough to log during
training and to report with every evaluation (docs/recipe.md says how they were chosen):

- ``effective_rank``: exp of the entropy of the variance spectrum (eigenvalues of the covariance of
  all embeddings, normalised to sum to 1): how many of the d_lat directions carry variance.
  1 = all embeddings on one line; d_lat = every direction used equally.
- ``slot_cosine``: mean cosine similarity between the K embeddings of the same chunk, over every
  pair, after removing the mean embedding of the whole set (a constant offset shared by every
  embedding says nothing about the chunk). Near 1: the K slots say the same thing; near 0 or
  below: they differ.
- ``within_clip_share``: the share of the embeddings' variance that lies within clips (around
  each clip's own mean) rather than between clips. Near 0: the latents describe which clip it is,
  not what happens in it.
- ``time_share``: the share of the variance that changes over time for a fixed slot (around each
  clip's per-slot mean). It leaves out what merely differs between the K slots, so it is the part
  that can follow notes; ``within_clip_share - time_share`` is the constant difference between slots.
- ``time_rank``: the effective rank of that over-time part alone. ``effective_rank`` counts the
  directions of everything, so K slots that differ by constant offsets reach up to K - 1 of it
  without saying anything about the music; ``time_rank`` counts only directions that change
  from chunk to chunk.
"""

from __future__ import annotations

from typing import Dict, Sequence, Union

import numpy as np
import torch

__all__ = ["latent_health", "chunk_embeddings", "HEALTH_KEYS"]

HEALTH_KEYS = ("effective_rank", "slot_cosine", "within_clip_share", "time_share", "time_rank")

ArrayLike = Union[np.ndarray, torch.Tensor]


def chunk_embeddings(latents: ArrayLike, summary_tokens: int) -> np.ndarray:
    """Latents as :meth:`EncoderDecoder.encode` returns them, ``(C, d_lat, K * chunks)``, ->
    ``(C * chunks, K, d_lat)`` float64: one row of K embeddings per chunk and channel."""
    z = latents.detach().cpu().numpy() if isinstance(latents, torch.Tensor) else np.asarray(latents)
    if z.ndim == 2:
        z = z[None]
    if z.ndim != 3 or z.shape[-1] % summary_tokens:
        raise ValueError(f"latents must be (C, d_lat, K * chunks) with K={summary_tokens}, got {z.shape}")
    c, d, length = z.shape
    chunks = length // summary_tokens
    return z.astype(np.float64).reshape(c, d, chunks, summary_tokens).transpose(0, 2, 3, 1).reshape(
        c * chunks, summary_tokens, d)


def effective_rank(x: np.ndarray) -> float:
    """exp(entropy) of the normalised variance spectrum of the rows of ``x`` (N, d)."""
    x = x - x.mean(0, keepdims=True)
    var = np.linalg.svd(x, compute_uv=False) ** 2
    total = var.sum()
    if total <= 0 or not np.isfinite(total):
        return 0.0
    p = var[var > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def latent_health(clips: Sequence[np.ndarray]) -> Dict[str, float]:
    """The health numbers of a set of clips.

    Args:
        clips: one array per clip, ``(chunks, K, d_lat)`` (:func:`chunk_embeddings` of its latents;
            channels may be stacked as further chunks). Scale does not matter: every number is
            invariant to multiplying the latents by a constant (``latent_scale`` included).

    Returns:
        ``{"effective_rank", "slot_cosine", "within_clip_share", "time_share", "time_rank"}``; the
        last three are NaN when no clip has more than one chunk (there is no within-clip variation
        to measure).
    """
    clips = [np.asarray(c, dtype=np.float64) for c in clips if len(c)]
    if not clips:
        raise ValueError("latent_health needs at least one clip with at least one chunk")
    if any(c.ndim != 3 for c in clips) or len({c.shape[1:] for c in clips}) != 1:
        raise ValueError("every clip must be (chunks, K, d_lat) with the same K and d_lat")
    k = clips[0].shape[1]
    flat = np.concatenate([c.reshape(-1, c.shape[-1]) for c in clips])  # (N * K, d)

    # Pairwise cosine between the K slots of each chunk, diagonal excluded, around the global mean.
    chunks = np.concatenate(clips) - flat.mean(0)  # (N, K, d)
    unit = chunks / np.maximum(np.linalg.norm(chunks, axis=-1, keepdims=True), 1e-12)
    gram = unit @ unit.transpose(0, 2, 1)  # (N, K, K)
    slot_cosine = float((gram.sum((1, 2)) - np.trace(gram, axis1=1, axis2=2)).mean() / (k * (k - 1))) if k > 1 \
        else float("nan")

    total = ((flat - flat.mean(0)) ** 2).sum()
    multi = [c for c in clips if c.shape[0] > 1]
    within = sum(((c - c.mean((0, 1))) ** 2).sum() for c in multi)  # around the clip's mean
    over_time = sum(((c - c.mean(0)) ** 2).sum() for c in multi)  # around each slot's clip mean
    ok = bool(multi) and total > 0
    moving = np.concatenate([(c - c.mean(0)).reshape(-1, c.shape[-1]) for c in multi]) if multi else None
    return {"effective_rank": effective_rank(flat), "slot_cosine": slot_cosine,
            "within_clip_share": float(within / total) if ok else float("nan"),
            "time_share": float(over_time / total) if ok else float("nan"),
            "time_rank": effective_rank(moving) if ok and moving is not None else float("nan")}
