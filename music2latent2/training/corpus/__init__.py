"""Training corpus from offline sources: Debian packages of freely licensed music and speech,
music21 scores rendered through General MIDI soundfonts, synthetic speech.

    python -m music2latent2.training.corpus build --out corpus/v2
    python -m music2latent2.training.corpus pack corpus/v2 --out .carry --part-mib 60
    python -m music2latent2.training.corpus unpack .carry/p1 .carry/p2 --into /tmp/corpus
    python -m music2latent2.training.corpus verify /tmp/corpus

See docs/corpus.md for the sources, the rules and measured build times.
"""

from .build import BuildConfig, build
from .parts import pack, unpack, verify
from .sources import MUSIC_SOURCES, SPEECH_SOURCES, CorpusError, Source

__all__ = ["BuildConfig", "build", "pack", "unpack", "verify", "CorpusError", "Source", "MUSIC_SOURCES",
           "SPEECH_SOURCES"]
