"""The training loop: consistency training with RAdam, warm-up + cosine lr, EMA and NaN safety."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List

import torch

from ..config import ModelConfig
from ..model import Music2Latent2
from .losses import NoiseIndexSampler, consistency_loss, consistency_step_delta

__all__ = ["TrainConfig", "Trainer"]


@dataclass
class TrainConfig:
    """Every training hyperparameter (stored as JSON in the training state).

    Defaults follow SPEC section 4 (the paper / v1); short runs want a smaller ``total_steps``,
    ``warmup_steps`` and ``ema_momentum``.
    """

    preset: str = "small"
    model_overrides: Dict[str, Any] = field(default_factory=dict)
    data: List[str] = field(default_factory=list)
    eval_data: str | None = None
    out_dir: str = "runs/m2l2"
    batch_size: int = 16
    lr: float = 1e-4
    min_lr: float = 1e-6
    warmup_steps: int = 10000
    total_steps: int = 1_000_000
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    ema_momentum: float = 0.9999
    ema_warmup: bool = True
    delta_start: float = 0.1
    delta_end: float = 1e-3
    sigma_log_mean: float = -1.1
    sigma_log_std: float = 2.0
    seed: int = 0
    num_workers: int = 4
    cache_gb: float = 4.0
    save_every: int = 1000
    eval_every: int = 5000
    log_every: int = 50
    eval_seconds: float = 10.0
    eval_files: int = 16
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 elsewhere
    compile: bool = False

    def validate(self) -> None:
        for name in ("batch_size", "total_steps", "save_every", "eval_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.ema_momentum < 1:
            raise ValueError(f"ema_momentum must be in [0, 1), got {self.ema_momentum}")
        if not 0 < self.min_lr <= self.lr:
            raise ValueError(f"need 0 < min_lr <= lr, got {self.min_lr} and {self.lr}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_preset(self.preset, **self.model_overrides)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {unknown}")
        return cls(**data)


class Trainer:
    """Owns the online model, its EMA copy, the optimiser and the noise RNG.

    Args:
        config: training hyperparameters.
        device: where to train.
        model_config: network config; default ``config.model_config()``.
    """

    def __init__(self, config: TrainConfig, device: torch.device | str = "cpu",
                 model_config: ModelConfig | None = None) -> None:
        config.validate()
        self.config = config
        self.device = torch.device(device)
        torch.manual_seed(config.seed)  # weight init is part of the run's identity
        self.model = Music2Latent2(model_config or config.model_config()).to(self.device).train()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.optimizer = torch.optim.RAdam(self.model.parameters(), lr=config.lr, betas=tuple(config.betas))
        # Noise is drawn on the training device: no host-side randn and copy per step.
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed + 1)
        self.sampler = NoiseIndexSampler(self.model.config, config.sigma_log_mean, config.sigma_log_std)
        self.step = 0
        self.skipped = 0
        self.samples_seen = 0
        self.best_metric: float | None = None
        # The last few training batches (CPU), for measuring the latent scale at export time
        # without opening a second iterator on the running DataLoader.
        self.recent_batches: deque = deque(maxlen=8)
        use_bf16 = config.precision == "bf16" or (config.precision == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        if config.compile:
            # In-place compile keeps parameter names, so checkpoints stay loadable without it.
            for module in (self.model.encoder, self.model.decoder, self.model.consistency):
                module.compile()

    # ----------------------------------------------------------------- schedules
    def lr_at(self, step: int) -> float:
        """Linear warm-up to ``lr``, then cosine decay to ``min_lr`` at ``total_steps``."""
        c = self.config
        if step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        progress = min(1.0, (step - c.warmup_steps) / max(1, c.total_steps - c.warmup_steps))
        return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1 + math.cos(math.pi * progress))

    def ema_momentum_at(self, updates: int) -> float:
        """v1 warm-up: min(m, (1 + n) / (10 + n)), so early EMA weights follow the model."""
        m = self.config.ema_momentum
        return min(m, (1 + updates) / (10 + updates)) if self.config.ema_warmup else m

    @torch.no_grad()
    def update_ema(self) -> None:
        m = self.ema_momentum_at(self.step - self.skipped)
        ema_params = list(self.ema.parameters())
        params = [p.detach() for p in self.model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - m)
        for eb, b in zip(self.ema.buffers(), self.model.buffers()):
            eb.copy_(b)

    # ----------------------------------------------------------------- one step
    def train_step(self, wav: torch.Tensor) -> Dict[str, float]:
        """One optimiser step on a batch ``(B, audio_channels, 67072)``.

        A step whose loss or gradients are not finite is skipped (no update, no EMA update) and
        counted in ``self.skipped``; the step counter still advances so schedules stay aligned.
        """
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        delta = consistency_step_delta(self.step, self.config.total_steps, self.config.delta_start,
                                       self.config.delta_end)
        wav = wav.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        loss, stats = consistency_loss(self.model, wav, delta, self.sampler, self.generator, self.autocast_dtype)
        # backward() is harmless on a non-finite loss (the step is skipped and its grads dropped);
        # running it unconditionally leaves one host sync per step: the read-back below.
        loss.backward()
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
        names = ["loss", "grad_norm", "finite", *stats]
        values = torch.stack([loss.detach().float(), grad_norm.float(), finite.float(),
                              *(v.detach().float() for v in stats.values())]).tolist()
        out = dict(zip(names, values))
        ok = bool(out.pop("finite"))
        if ok:
            self.optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            del out["grad_norm"]
        self.step += 1
        if ok:
            self.update_ema()
        self.samples_seen += wav.shape[0]
        out.update(lr=lr, delta=delta, skipped=float(not ok))
        return out

    # ----------------------------------------------------------------- loop
    def audio_hours_seen(self, crop: int) -> float:
        return self.samples_seen * crop / self.model.config.sample_rate / 3600

    def fit(self, batches: Iterable[torch.Tensor], crop: int, on_save: Callable[[Trainer], None],
            on_eval: Callable[[Trainer], None] | None = None, log_file: Path | None = None) -> None:
        """Train until ``total_steps``, logging, saving and evaluating on schedule."""
        c = self.config
        window: List[float] = []
        t0, s0 = time.perf_counter(), self.step
        for wav in batches:
            if self.step >= c.total_steps:
                break
            stats = self.train_step(wav)
            self.recent_batches.append(wav.detach().cpu())
            if stats["skipped"] == 0:
                window.append(stats["loss"])
            if self.step % c.log_every == 0 or self.step == c.total_steps:
                rate = (self.step - s0) / max(time.perf_counter() - t0, 1e-9)
                loss = sum(window) / len(window) if window else float("nan")
                line = (f"step {self.step}/{c.total_steps}  loss {loss:.4f}  lr {stats['lr']:.2e}  "
                        f"{rate:.2f} steps/s  audio {self.audio_hours_seen(crop):.2f} h  skipped {self.skipped}")
                print(line, flush=True)
                if log_file is not None:
                    record = {"step": self.step, "loss": loss, "lr": stats["lr"], "steps_per_s": rate,
                              "audio_hours": self.audio_hours_seen(crop), "skipped": self.skipped}
                    with open(log_file, "a") as f:
                        f.write(json.dumps(record) + "\n")
                window, t0, s0 = [], time.perf_counter(), self.step
            if self.step % c.save_every == 0 or self.step == c.total_steps:
                on_save(self)
            if on_eval is not None and (self.step % c.eval_every == 0 or self.step == c.total_steps):
                on_eval(self)
