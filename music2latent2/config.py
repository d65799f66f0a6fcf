"""Model configuration: one dataclass that describes a Music2Latent2 network completely.

The config travels with the weights (it is stored as JSON in the safetensors metadata), so a
checkpoint can always be rebuilt without guessing hyperparameters.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["ModelConfig", "PRESETS", "FIELD_LIMITS", "ADDED_FIELDS"]


@dataclass
class ModelConfig:
    """Every hyperparameter of a Music2Latent2 model.

    Spectral, EDM and token-layout numbers default to the paper's (docs/design.md sections 1-3); the
    architecture sizes default to the ``"paper"`` preset.

    Attributes:
        audio_channels: 1 for the mono model, 2 for the stereo variant (4 spectrogram channels).
        sample_rate: audio sample rate the model works at.
        n_fft: STFT size and Hann window length.
        hop_length: STFT hop.
        freq_bins: rfft bins kept (the Nyquist bin is dropped).
        spec_alpha: amplitude-compression exponent.
        spec_beta: amplitude-compression gain.
        chunk_frames: STFT frames per chunk (the encoder's unit of work).
        summary_tokens: K, summary embeddings per chunk.
        latent_dim: d_lat, dimension of each summary embedding.
        latent_scale: user-facing latents are ``tanh(...) * latent_scale`` so they have roughly
            unit standard deviation (measured on training data at export time; 1.0 for an
            untrained model).
        channels: conv channels per resolution level of the (de-)patchifiers.
        layers: residual blocks per level.
        freq_down: frequency downsampling factor between level i and i+1.
        time_down: time downsampling factor between level i and i+1.
        dim: transformer width.
        depth: transformer blocks in each of the three modules.
        heads: attention heads.
        mlp_ratio: transformer MLP expansion.
        norm_groups: GroupNorm groups in conv blocks (reduced automatically for narrow layers).
        noise_embed_dim: channels of the sinusoidal noise-level embedding.
        cond_dim: width of the noise-conditioning vector fed to AdaLN.
        sigma_min / sigma_max / sigma_data / rho: EDM constants.
        input_peak_db: the peak level (dBFS) ``EncoderDecoder.encode`` brings each signal to
            before encoding, and ``decode(..., gain=)`` undoes: the level at which this model
            reconstructs best (the middle of its training gains, or measured on held-out music;
            docs/levels.md). None: audio is encoded at whatever level it comes.
    """

    audio_channels: int = 1
    sample_rate: int = 44100
    n_fft: int = 2048
    hop_length: int = 512
    freq_bins: int = 1024
    spec_alpha: float = 0.65
    spec_beta: float = 0.34
    chunk_frames: int = 64
    summary_tokens: int = 8
    latent_dim: int = 64
    latent_scale: float = 1.0
    channels: List[int] = field(default_factory=lambda: [64, 128, 256, 256, 256, 256])
    layers: List[int] = field(default_factory=lambda: [3, 3, 3, 4, 5, 1])
    freq_down: List[int] = field(default_factory=lambda: [4, 2, 2, 2, 2])
    time_down: List[int] = field(default_factory=lambda: [1, 2, 2, 2, 2])
    dim: int = 256
    depth: int = 16
    heads: int = 4
    mlp_ratio: int = 4
    norm_groups: int = 32
    noise_embed_dim: int = 256
    cond_dim: int = 256
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    rho: float = 7.0
    input_peak_db: Optional[float] = -6.0

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------- derived sizes
    @property
    def spec_channels(self) -> int:
        """Real/imaginary planes per audio channel: (B, spec_channels, freq_bins, frames)."""
        return 2 * self.audio_channels

    @property
    def chunk_samples(self) -> int:
        """Waveform samples one chunk stands for (its hop span): 64 * 512 = 32,768."""
        return self.chunk_frames * self.hop_length

    @property
    def token_grid(self) -> Tuple[int, int]:
        """(freq, time) size of the patch grid at the bottom of the patchifier."""
        f, t = self.freq_bins, self.chunk_frames
        for fd, td in zip(self.freq_down, self.time_down):
            f, t = f // fd, t // td
        return f, t

    @property
    def tokens_per_chunk(self) -> int:
        f, t = self.token_grid
        return f * t

    @property
    def latents_per_second(self) -> float:
        return self.summary_tokens * self.sample_rate / self.chunk_samples

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field of a wrong type, out of range, or inconsistent.

        Types and ranges come first (see ``FIELD_LIMITS``), so a corrupt or hand-edited config is
        refused with the field's name before a model of absurd size is ever built.
        """
        _check_fields(self)
        levels = len(self.channels)
        if levels < 1 or len(self.layers) != levels:
            raise ValueError(f"channels ({self.channels}) and layers ({self.layers}) must have the same "
                             "non-zero length")
        if len(self.freq_down) != levels - 1 or len(self.time_down) != levels - 1:
            raise ValueError("freq_down and time_down need one factor per transition between levels "
                             f"({levels - 1}), got {self.freq_down} and {self.time_down}")
        f, t = self.freq_bins, self.chunk_frames
        for fd, td in zip(self.freq_down, self.time_down):
            if fd < 1 or td < 1 or f % fd or t % td:
                raise ValueError(f"downsampling factors {self.freq_down}/{self.time_down} do not divide "
                                 f"the chunk ({self.freq_bins} bins x {self.chunk_frames} frames)")
            f, t = f // fd, t // td
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if self.audio_channels not in (1, 2):
            raise ValueError(f"audio_channels must be 1 or 2, got {self.audio_channels}")
        if self.freq_bins > self.n_fft // 2:
            raise ValueError(f"freq_bins ({self.freq_bins}) exceeds n_fft // 2 ({self.n_fft // 2})")
        if self.n_fft % self.hop_length:
            raise ValueError("n_fft must be a multiple of hop_length")
        if not self.sigma_min < self.sigma_max:
            raise ValueError(f"sigma_min ({self.sigma_min}) must be below sigma_max ({self.sigma_max})")

    # ----------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Dict[str, Any], require_all: bool = False) -> "ModelConfig":
        """Build a config from a dict of fields.

        Args:
            data: field name -> value.
            require_all: every field must be present (as in a checkpoint, which stores all of
                them): a missing one is an error instead of silently taking the default, which
                would build a different network than the one the weights belong to.
        """
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {unknown}")
        missing = [name for name in known if name not in data and name not in ADDED_FIELDS]
        if require_all and missing:
            raise ValueError(f"missing ModelConfig fields: {missing}")
        if require_all:  # a checkpoint written before a field existed behaves as it did then
            data = {**{k: v for k, v in ADDED_FIELDS.items() if k not in data}, **data}
        return cls(**data)

    @classmethod
    def from_json(cls, text: str, require_all: bool = False) -> "ModelConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"model config is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise ValueError("model config JSON must be an object")
        return cls.from_dict(data, require_all=require_all)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """Build a named preset: ``"paper"``, ``"paper_stereo"``, ``"small"`` or ``"tiny"``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        data = dict(PRESETS[name])
        data.update(overrides)
        return cls(**data)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# Allowed range of every field: scalars (low, high) inclusive; list fields bound each element. The
# bounds are far beyond any sensible model (the paper's is dim 256, depth 16, 6 levels) but stop a
# corrupt value such as dim=200000 before it asks for hundreds of gigabytes.
FIELD_LIMITS: Dict[str, Tuple[type, float, float]] = {
    "audio_channels": (int, 1, 2),
    "sample_rate": (int, 1_000, 768_000),
    "n_fft": (int, 2, 1 << 16),
    "hop_length": (int, 1, 1 << 16),
    "freq_bins": (int, 1, 1 << 15),
    "spec_alpha": (float, 1e-3, 1.0),
    "spec_beta": (float, 1e-6, 1e3),
    "chunk_frames": (int, 1, 4096),
    "summary_tokens": (int, 1, 4096),
    "latent_dim": (int, 1, 8192),
    "latent_scale": (float, 1e-6, 1e6),
    "channels": (int, 1, 8192),
    "layers": (int, 0, 64),
    "freq_down": (int, 1, 1024),
    "time_down": (int, 1, 1024),
    "dim": (int, 1, 8192),
    "depth": (int, 1, 256),
    "heads": (int, 1, 256),
    "mlp_ratio": (int, 1, 64),
    "norm_groups": (int, 1, 4096),
    "noise_embed_dim": (int, 2, 8192),
    "cond_dim": (int, 1, 8192),
    "sigma_min": (float, 1e-9, 1e6),
    "sigma_max": (float, 1e-9, 1e6),
    "sigma_data": (float, 1e-9, 1e6),
    "rho": (float, 1e-3, 1e3),
    "input_peak_db": (float, -80.0, 0.0),
}
# Fields that may be None.
_OPTIONAL_FIELDS = ("input_peak_db",)
# Fields added after checkpoints were first written, with the value that keeps such a checkpoint
# working exactly as before (no input normalisation).
ADDED_FIELDS: Dict[str, Any] = {"input_peak_db": None}
_LIST_FIELDS = ("channels", "layers", "freq_down", "time_down")
_MAX_LEVELS = 16


def _check_value(name: str, value: Any, kind: type, low: float, high: float) -> Any:
    """``value`` checked against (kind, low, high); ints are accepted for float fields."""
    allowed = (int, float) if kind is float else (int,)
    if isinstance(value, bool) or not isinstance(value, allowed):
        raise ValueError(f"ModelConfig field {name} must be {'a number' if kind is float else 'an integer'}, "
                         f"got {value!r} ({type(value).__name__})")
    if not low <= value <= high:  # also false for NaN
        raise ValueError(f"ModelConfig field {name}={value!r} is out of range: it must be between {low:g} and {high:g}")
    return kind(value)


def _check_fields(config: "ModelConfig") -> None:
    """Type- and range-check every field in place (ints become floats, tuples lists)."""
    for f in dataclasses.fields(config):
        kind, low, high = FIELD_LIMITS[f.name]
        value = getattr(config, f.name)
        if value is None and f.name in _OPTIONAL_FIELDS:
            continue
        if f.name in _LIST_FIELDS:
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"ModelConfig field {f.name} must be a list of integers, got {value!r}")
            if len(value) > _MAX_LEVELS:
                raise ValueError(f"ModelConfig field {f.name} has {len(value)} entries; at most {_MAX_LEVELS}")
            checked: Any = [_check_value(f"{f.name}[{i}]", v, kind, low, high) for i, v in enumerate(value)]
        else:
            checked = _check_value(f.name, value, kind, low, high)
        setattr(config, f.name, checked)


PRESETS: Dict[str, Dict[str, Any]] = {
    # The paper's sizes: 3 modules x 16 blocks, dim 256, 5 downsamplings -> a 16 x 4 patch grid.
    "paper": {},
    "paper_stereo": {"audio_channels": 2},
    # Same design, narrower and shallower: the first checkpoint we train.
    "small": {
        "channels": [32, 64, 96, 128, 160, 160],
        "layers": [1, 2, 2, 2, 2, 1],
        "dim": 192,
        "depth": 6,
        "heads": 4,
        "noise_embed_dim": 192,
        "cond_dim": 192,
    },
    # For tests: same token layout (64 tokens per chunk), a few hundred thousand parameters.
    "tiny": {
        "channels": [8, 16, 32, 32],
        "layers": [1, 1, 1, 1],
        "freq_down": [4, 4, 4],
        "time_down": [2, 2, 4],
        "dim": 32,
        "depth": 2,
        "heads": 2,
        "mlp_ratio": 2,
        "norm_groups": 8,
        "noise_embed_dim": 32,
        "cond_dim": 32,
    },
}
