"""Music2Latent2: a consistency-model audio autoencoder with summary embeddings.

    >>> from music2latent2 import EncoderDecoder
    >>> encdec = EncoderDecoder()
    >>> z = encdec.encode("song.wav")           # (C, 64, L), L = 8 per 32,768 samples
    >>> wav = encdec.decode(z, length=n)        # (C, n) at 44.1 kHz
    >>> wav, sr = encdec.decode_file("song.m2l")  # a .m2l file back at its original rate and length
"""

from ._version import __version__
from .config import ModelConfig
from .datasets import LatentDataset, LatentStats
from .features import clip_features
from .hub import ModelSource
from .inference import EncoderDecoder
from .latents_io import LatentMetadata, load_latents, save_latents
from .model import Music2Latent2
from .streaming import StreamingDecoder, StreamingEncoder

__all__ = ["EncoderDecoder", "StreamingEncoder", "StreamingDecoder", "Music2Latent2", "ModelConfig", "ModelSource",
           "LatentMetadata", "save_latents", "load_latents", "LatentDataset", "LatentStats", "clip_features",
           "__version__"]
