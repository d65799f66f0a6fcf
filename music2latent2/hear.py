"""The HEAR benchmark API (Turian et al., "HEAR: Holistic Evaluation of Audio Representations",
2022) over Music2Latent2's MIR features: the interface ``hear-eval-kit`` and ``hear-validator``
call (``python3 -m heareval.embeddings.runner music2latent2.hear``)::

    >>> import music2latent2.hear as m2l2_hear
    >>> model = m2l2_hear.load_model()          # or a checkpoint path, manifest name or Hub repo id
    >>> scene = m2l2_hear.get_scene_embeddings(audio, model)            # (n_sounds, 1536) for small
    >>> emb, ms = m2l2_hear.get_timestamp_embeddings(audio, model)      # (n_sounds, n, 1536), (n_sounds, n)

``audio`` is (n_sounds, n_samples) float at 44.1 kHz (``model.sample_rate``), on any device.
The embeddings are the features of ``EncoderDecoder.encode(..., extract_features=True)``: the
K summary embeddings of a 32,768-sample chunk taken before the encoder's last linear layer and
stacked (paper, section V-5), K * dim values per chunk.

**Time resolution.** The encoder summarises a whole chunk (743 ms) at once, so by default there
is one timestamp embedding per chunk, every 743.04 ms, each describing the 743 ms centred on its
timestamp (the first is centred on 0 ms over half a chunk of zeros, like a centred STFT frame).
``load_model(hop_ms=...)`` gives finer timestamps by encoding the audio again at shifted chunk
offsets: ``n = ceil(743.04 / hop_ms)`` passes, interleaved, so the hop is 743.04 / n ms (50 ->
49.54 ms, n = 15) and the cost is n times the default. Each embedding still summarises 743 ms
around its timestamp: a finer hop localises where that window sits, not what it can resolve
inside it. See docs/mir.md.
"""

from __future__ import annotations

import math
import os
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .api_checks import inference_api
from .devices import DeviceLike, resolve_device
from .features import clip_features
from .inference import EncoderDecoder
from .levels import normalization_gain
from .model import Music2Latent2

__all__ = ["HearModel", "load_model", "get_scene_embeddings", "get_timestamp_embeddings"]


class HearModel(nn.Module):
    """The network with the attributes HEAR asks for; move it with ``.to(device)`` as usual.

    Args:
        network: the Music2Latent2 model whose encoder gives the embeddings.
        hop_ms: spacing of timestamp embeddings; None (default) is one per chunk (743.04 ms).
            Smaller values cost ``ceil(743.04 / hop_ms)`` encoder passes (see the module docstring).
        precision: "float32" (default), "bfloat16" or "float16" autocast for the network.
        max_batch_size: chunks per encoder forward pass (bounds memory, not the batch of sounds).

    Attributes:
        sample_rate: 44,100 Hz.
        scene_embedding_size, timestamp_embedding_size: K * dim (1536 for small, 2048 for paper).
        phases: encoder passes per call of :func:`get_timestamp_embeddings`.
        hop_ms: the actual spacing of timestamps, 743.04 ms / ``phases``.
    """

    def __init__(self, network: Music2Latent2, hop_ms: Optional[float] = None, precision: str = "float32",
                 max_batch_size: int = 32) -> None:
        super().__init__()
        cfg = network.config
        chunk_ms = 1000.0 * cfg.chunk_samples / cfg.sample_rate
        if hop_ms is None:
            self.phases = 1
        elif isinstance(hop_ms, bool) or not isinstance(hop_ms, (int, float)) or not 0 < hop_ms < math.inf:
            raise ValueError(f"hop_ms must be a positive number of milliseconds or None, got {hop_ms!r}")
        else:
            self.phases = max(1, math.ceil(chunk_ms / float(hop_ms) - 1e-9))
            if self.phases > cfg.chunk_samples // 64:
                raise ValueError(f"hop_ms={hop_ms} would need {self.phases} encoder passes; the finest hop is "
                                 f"{chunk_ms / (cfg.chunk_samples // 64):.2f} ms (64 samples)")
        self.network = network.eval()
        self.sample_rate: int = cfg.sample_rate
        self.scene_embedding_size: int = cfg.summary_tokens * cfg.dim
        self.timestamp_embedding_size: int = cfg.summary_tokens * cfg.dim
        self.hop_ms: float = chunk_ms / self.phases
        self.precision = precision
        self.max_batch_size = max_batch_size
        self.codec()  # checks precision and max_batch_size now: a typo should fail at load time

    def codec(self) -> EncoderDecoder:
        """An :class:`EncoderDecoder` on the device the network is on now (HEAR moves the module)."""
        device = next(self.network.parameters()).device
        return EncoderDecoder(self.network, device=device, precision=self.precision,
                              max_batch_size=self.max_batch_size)

    def offsets(self) -> List[int]:
        """Start of each encoder pass within a chunk, in samples (rounded once each, so no drift)."""
        chunk = self.network.config.chunk_samples
        return [round(j * chunk / self.phases) for j in range(self.phases)]

    def extra_repr(self) -> str:
        return f"sample_rate={self.sample_rate}, embedding_size={self.scene_embedding_size}, hop_ms={self.hop_ms:.2f}"


def load_model(model_file_path: Union[str, os.PathLike] = "", hop_ms: Optional[float] = None,
               precision: str = "float32", max_batch_size: int = 32, device: DeviceLike = None) -> HearModel:
    """The HEAR entry point: a :class:`HearModel` ready for the two embedding functions.

    Args:
        model_file_path: "" for the default model, else anything
            :meth:`Music2Latent2.from_pretrained` loads (a ``.safetensors`` file or folder, a
            manifest name such as ``"m2l2-small"``, a Hub repo id).
        hop_ms, precision, max_batch_size: see :class:`HearModel`. hear-eval-kit passes them from
            ``--model-options '{"hop_ms": 50}'``.
        device: where to put the model; default CUDA when available, else CPU.
    """
    dev = resolve_device(device)  # checked before the checkpoint is read
    network = Music2Latent2.from_pretrained(str(model_file_path) if str(model_file_path) else None)
    return HearModel(network, hop_ms=hop_ms, precision=precision, max_batch_size=max_batch_size).to(dev)


def _check_audio(audio: Union[torch.Tensor, np.ndarray], model: HearModel) -> torch.Tensor:
    """(n_sounds, n_samples) float tensor, or a ValueError/TypeError naming what is wrong."""
    if not isinstance(model, HearModel):
        raise TypeError(f"model must come from music2latent2.hear.load_model, got {type(model).__name__}")
    if isinstance(audio, np.ndarray):
        audio = torch.from_numpy(np.ascontiguousarray(audio))
    if not isinstance(audio, torch.Tensor):
        raise TypeError(f"audio must be a torch.Tensor (or numpy array), got {type(audio).__name__}")
    if audio.ndim != 2:
        raise ValueError(f"audio must have shape (n_sounds, n_samples) (mono, {model.sample_rate} Hz), "
                         f"got {tuple(audio.shape)}")
    if audio.shape[0] == 0 or audio.shape[1] == 0:
        raise ValueError(f"audio is empty: shape {tuple(audio.shape)}")
    if not audio.is_floating_point():
        raise TypeError(f"audio must be floating point in [-1, 1], got {audio.dtype}")
    return audio.detach()


@inference_api
def get_scene_embeddings(audio: Union[torch.Tensor, np.ndarray], model: HearModel) -> torch.Tensor:
    """One embedding per sound: the chunk features averaged over the sound's chunks (paper, V-5),
    each chunk weighted by its share of real audio (:func:`~music2latent2.features.clip_features`:
    the zero padding of the last chunk gets no vote).

    Args:
        audio: (n_sounds, n_samples) mono audio at ``model.sample_rate``.
        model: from :func:`load_model`.

    Returns:
        (n_sounds, model.scene_embedding_size) float32, on the audio's device; an ordinary
        tensor (not an inference tensor), so it can feed a trainable layer.
    """
    wav = _check_audio(audio, model)
    # encode() brings each sound's peak to the model's input level: embeddings do not depend on the gain.
    features = model.codec().encode(wav[:, None, :], sr=model.sample_rate, extract_features=True)  # (B, 1, D, n)
    return clip_features(features[:, 0].float(), wav.shape[-1], model.network.config.chunk_samples)  # (B, D)


@inference_api
def get_timestamp_embeddings(audio: Union[torch.Tensor, np.ndarray],
                             model: HearModel) -> Tuple[torch.Tensor, torch.Tensor]:
    """Embeddings centred on regularly spaced timestamps, every ``model.hop_ms`` from 0 ms.

    The embedding at time t describes the audio in [t - 371.5 ms, t + 371.5 ms) (zeros outside
    the sound); timestamps run from 0 to the last one at or before the end of the sound, so there
    are ``floor(n_samples / hop) + 1`` of them.

    Args:
        audio: (n_sounds, n_samples) mono audio at ``model.sample_rate``.
        model: from :func:`load_model`.

    Returns:
        embeddings (n_sounds, n_timestamps, model.timestamp_embedding_size) float32 and
        timestamps (n_sounds, n_timestamps) in milliseconds, both on the audio's device (ordinary
        tensors, not inference tensors).
    """
    wav = _check_audio(audio, model)
    # Each sound at the model's input level, by its own peak, as in get_scene_embeddings; the
    # passes below are then encoded as they are (a pass's own peak may differ from the sound's).
    wav = wav * normalization_gain(wav[:, None], model.network.config.input_peak_db).to(wav.dtype)[:, None]
    b, n = wav.shape
    chunk = model.network.config.chunk_samples
    offsets = model.offsets()
    half = chunk // 2
    length = half + n
    # Pass j reads the audio from offset o_j - half: its chunk t is centred on sample t*chunk + o_j.
    # Zeros after the end as well, so every pass has the same length even when an offset lies
    # beyond the end of a short sound.
    padded = F.pad(wav, (half, chunk))  # (B, half + T + chunk)
    passes = torch.stack([padded[:, o:o + length] for o in offsets], dim=1)  # (B, P, half + T)
    features = model.codec().encode(passes.reshape(b * len(offsets), 1, -1), sr=model.sample_rate,
                                    extract_features=True, normalize=False)  # (B*P, 1, D, chunks)
    features = features.reshape(b, len(offsets), features.shape[-2], features.shape[-1]).float()
    chunks = features.shape[-1]
    centres = (torch.arange(chunks)[:, None] * chunk + torch.tensor(offsets)[None, :]).reshape(-1)  # (chunks*P,)
    count = int((centres <= n).sum())  # centres increase, so the kept ones are a prefix
    embeddings = features.permute(0, 3, 1, 2).reshape(b, chunks * len(offsets), -1)[:, :count]  # (B, N, D)
    timestamps = (centres[:count].double() * (1000.0 / model.sample_rate)).float()
    return embeddings.contiguous(), timestamps.to(embeddings.device)[None].expand(b, -1).contiguous()
