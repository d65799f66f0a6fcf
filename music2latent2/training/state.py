"""Resumable training state in one ``state.safetensors`` file, without pickles.

Tensors (model, EMA, optimiser state, RNG state) are safetensors entries; everything else
(step counters, configs, optimiser hyperparameters and scalar state) is JSON in the file's
metadata. The file is written to a temp name and renamed, so a crash never leaves a torn state.
The metadata records the tensors' ``content_sha256`` (defined in :mod:`music2latent2.checkpoint`);
a resume recomputes it and refuses a file whose data was damaged since it was written.
Data order needs no saved state: the batch of each step is drawn from ``(seed, step, rank)``
(``data.StepBatches``). A data-parallel run saves every rank's noise generator into rank 0's file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..checkpoint import CONTENT_HASH_KEY, CheckpointError, content_sha256, read_safetensors_metadata, verify_content
from ..config import ModelConfig
from ..fileio import atomic_write
from .trainer import TrainConfig, Trainer, noise_seed

__all__ = ["STATE_NAME", "STATE_FORMAT", "save_state", "load_state", "read_state_configs"]

STATE_NAME = "state.safetensors"
STATE_FORMAT = "music2latent2-train-state-1"


def _state_path(path: Union[str, os.PathLike]) -> Path:
    p = Path(path)
    return p / STATE_NAME if p.suffix != ".safetensors" else p


def _flatten_optimizer(state: Dict[str, Any]) -> tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    tensors: Dict[str, torch.Tensor] = {}
    scalars: Dict[str, Dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{idx}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> Dict[str, Any]:
    state: Dict[int, Dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim/"):
            _, idx, key = name.split("/", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_state(trainer: Trainer, path: Union[str, os.PathLike]) -> Path:
    """Write the full training state atomically to ``path`` (a directory or a .safetensors file).

    In a data-parallel run every rank must call it (the ranks' noise generators are gathered);
    rank 0 writes the file.
    """
    p = _state_path(path)
    generators = trainer.ranks.all_gather(trainer.generator.get_state(), "gathering the noise generators to save")
    if not trainer.ranks.is_main:
        return p
    p.parent.mkdir(parents=True, exist_ok=True)
    tensors: Dict[str, torch.Tensor] = {}
    for name, t in trainer.model.state_dict().items():
        tensors[f"model/{name}"] = t.detach().cpu().contiguous()
    for name, t in trainer.ema.state_dict().items():
        tensors[f"ema/{name}"] = t.detach().cpu().contiguous()
    optim_tensors, optim_meta = _flatten_optimizer(trainer.optimizer.state_dict())
    tensors.update(optim_tensors)
    tensors["rng/generator"] = generators[0]
    for rank, state in enumerate(generators[1:], start=1):
        tensors[f"rng/generator/{rank}"] = state
    info = {"step": trainer.step, "skipped": trainer.skipped, "samples_seen": trainer.samples_seen,
            "best_metric": trainer.best_metric, "optimizer": optim_meta, "optimizer_steps": trainer.optimizer_steps,
            "rng_device": trainer.generator.device.type, "world_size": trainer.ranks.world_size}
    metadata = {"format": "pt", "music2latent2_train_state": STATE_FORMAT, "info": json.dumps(info),
                "train_config": trainer.config.to_json(), "model_config": trainer.model.config.to_json(),
                CONTENT_HASH_KEY: content_sha256(tensors)}
    return atomic_write(p, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _state_metadata(p: Path) -> Dict[str, str]:
    if not p.is_file():
        raise CheckpointError(f"training state not found: {p}")
    meta = read_safetensors_metadata(p)  # CheckpointError naming the file: truncated, not safetensors, ...
    if meta.get("music2latent2_train_state") != STATE_FORMAT:
        raise CheckpointError(f"{p} is not a music2latent2 training state ({STATE_FORMAT})")
    return meta


def _json_entry(p: Path, meta: Dict[str, str], key: str) -> Any:
    try:
        return json.loads(meta[key])
    except (KeyError, ValueError) as err:
        problem = "is missing" if isinstance(err, KeyError) else f"is not valid JSON ({err})"
        raise CheckpointError(f"training state {p} is corrupt: its {key!r} metadata {problem}") from err


def read_state_configs(path: Union[str, os.PathLike]) -> tuple[TrainConfig, ModelConfig]:
    """The training and model configs stored in a state file.

    Raises:
        CheckpointError (a ValueError) naming the file: missing, not a whole safetensors file,
            not a training state, or configs that are missing, not JSON or invalid.
    """
    p = _state_path(path)
    return _configs(p, _state_metadata(p))


def _configs(p: Path, meta: Dict[str, str]) -> tuple[TrainConfig, ModelConfig]:
    for key in ("train_config", "model_config"):
        _json_entry(p, meta, key)
    try:
        return TrainConfig.from_json(meta["train_config"]), ModelConfig.from_json(meta["model_config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"training state {p} has an invalid config: {err}") from err


def load_state(trainer: Trainer, path: Union[str, os.PathLike]) -> None:
    """Restore model, EMA, optimiser, RNG and counters into ``trainer`` (strict).

    Raises:
        CheckpointError (a ValueError) naming the file: unreadable or corrupt (including tensor
            data that does not match the recorded ``content_sha256``), saved for another model
            config, or tensors that do not fit the model or optimiser.
    """
    p = _state_path(path)
    meta = _state_metadata(p)
    _, model_config = _configs(p, meta)
    if model_config.to_dict() != trainer.model.config.to_dict():
        raise CheckpointError(f"{p} was saved for a different model config")
    info = _json_entry(p, meta, "info")
    try:
        tensors = load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read training state {p}: {err}") from err
    verify_content(p, tensors, meta)
    try:
        _restore(trainer, p, tensors, info)
    except (KeyError, RuntimeError, ValueError, TypeError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"training state {p} cannot be restored into this run ({type(err).__name__}: "
                              f"{err})") from err


def _restore(trainer: Trainer, p: Path, tensors: Dict[str, torch.Tensor], info: Dict[str, Any]) -> None:
    for prefix, module in (("model/", trainer.model), ("ema/", trainer.ema)):
        sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        module.load_state_dict(sub, strict=True)
    trainer.optimizer.load_state_dict(_unflatten_optimizer(tensors, info["optimizer"]))
    steps = [float(s["step"]) for s in trainer.optimizer.state.values() if "step" in s]
    # Skipped steps count for the rectification but not in the fused optimiser's own step.
    trainer.optimizer_steps = int(info.get("optimizer_steps", max(steps) if steps else 0))
    trainer.step = int(info["step"])
    rank, world = trainer.ranks.rank, trainer.ranks.world_size
    saved_world = int(info.get("world_size", 1))
    key = "rng/generator" if rank == 0 else f"rng/generator/{rank}"
    if info.get("rng_device", "cpu") == trainer.generator.device.type and saved_world == world:
        trainer.generator.set_state(tensors[key])
    else:
        # A CUDA generator's state cannot be loaded into a CPU one (or back): e.g. exporting a
        # GPU run on a CPU machine; nor do N ranks' generators make M. Noise continues from a
        # fresh seed fixed by (seed, step, rank).
        cfg = trainer.config
        trainer.generator.manual_seed(noise_seed(cfg.seed, trainer.step, rank) if cfg.noise_seed_v2
                                      else cfg.seed + 1 + trainer.step + 7919 * rank)
        why = (f"a {info.get('rng_device')} noise generator" if saved_world == world
               else f"the noise generators of {saved_world} rank(s), not {world}")
        trainer.ranks.print(f"note: {p} holds {why}; training noise on {trainer.generator.device.type} is reseeded "
                            "from (seed, step)")
    trainer.skipped = int(info["skipped"])
    trainer.samples_seen = int(info["samples_seen"])
    trainer.best_metric = info["best_metric"]
