"""Optional training code for Music2Latent2 (``pip install music2latent2[train]``).

Run ``python -m music2latent2.training train --data DIR[:WEIGHT] ... --out runs/NAME``.
Nothing outside this package imports it.
"""

from .data import AudioSource, CropDataset, build_sources, crop_samples, make_loader, parse_data_spec
from .export import export_checkpoint, measure_latent_scale
from .losses import NoiseIndexSampler, consistency_loss, consistency_step_delta, pseudo_huber
from .state import load_state, read_state_configs, save_state
from .trainer import TrainConfig, Trainer

__all__ = ["AudioSource", "CropDataset", "build_sources", "crop_samples", "make_loader", "parse_data_spec",
           "export_checkpoint", "measure_latent_scale", "NoiseIndexSampler", "consistency_loss",
           "consistency_step_delta", "pseudo_huber", "load_state", "read_state_configs", "save_state",
           "TrainConfig", "Trainer"]
