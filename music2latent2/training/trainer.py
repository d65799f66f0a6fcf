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
from typing import Any, Callable, Dict, Iterable, List, Tuple, cast

import numpy as np
import torch

from ..config import ModelConfig
from ..latent_health import HEALTH_KEYS, latent_health
from ..model import Music2Latent2
from .losses import LOSS_WEIGHTINGS, ContextPairs, NoiseIndexSampler, consistency_loss, consistency_step_delta

__all__ = ["TrainConfig", "Trainer", "noise_seed", "LEGACY_TRAIN_FIELDS"]

# Values a training state written before a field existed was trained with: such a state resumes
# with these, not with today's defaults (docs/recipe.md says what changed and why).
LEGACY_TRAIN_FIELDS: Dict[str, Any] = {
    "sigma_sampler": "legacy_density",
    "sigma_uniform_share": 0.0,
    "loss_weighting": "inverse_delta",
    "context_share": 0.0,
    "context_sigma": 0.4,
    "summary_init_std": None,
    "gain_db": [-12.0, 0.0],
    "noise_seed_v2": False,
}
SIGMA_SAMPLERS = ("lognormal", "legacy_density")


def noise_seed(seed: int, start_step: int) -> int:
    """Seed of the training-noise generator: a relay leg that starts at another step draws a
    fresh noise stream instead of replaying the first leg's."""
    return int(np.random.SeedSequence([seed, start_step, 1]).generate_state(1)[0])


@dataclass
class TrainConfig:
    """Every training hyperparameter (stored as JSON in the training state).

    Defaults follow the paper (v1 where it defers to v1; docs/training.md); short runs want a
    smaller ``total_steps``, ``warmup_steps`` and ``ema_momentum``, or a time budget
    (``max_minutes``) over which the schedules are laid out.

    Schedules run from ``start_step`` (0 for a fresh run; a relay leg that starts from a shipped
    checkpoint continues the step count) to ``total_steps``.
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
    start_step: int = 0
    init_from: str | None = None  # checkpoint the weights started from (recorded, not re-read on resume)
    init_sha256: str | None = None
    max_minutes: float | None = None  # time budget: total_steps is set from the measured speed
    calibrate_steps: int = 100
    reserve_minutes: float = 0.5  # kept free at the end of the budget for the final export
    snapshot_minutes: float | None = None  # fp16 EMA snapshots in pieces, for machines that may vanish
    snapshot_piece_mib: float = 15.0
    latent_penalty: float = 0.0
    pre_tanh_limit: float = 2.0
    # The recipe of docs/recipe.md (each measured there against the first leg's).
    sigma_sampler: str = "lognormal"  # "legacy_density": the first leg's sampler (see NoiseIndexSampler)
    sigma_uniform_share: float = 0.0
    loss_weighting: str = "inverse_delta"
    context_share: float = 0.0
    context_sigma: float = 0.4
    summary_init_std: float | None = 0.5  # (re-)draw the summary tokens at this std; None: keep (docs/recipe.md)
    gain_db: List[float] = field(default_factory=lambda: [-30.0, 0.0])  # crop peak level range, dBFS (docs/levels.md)
    noise_seed_v2: bool = True  # noise seeded from (seed, start_step); False: seed + 1 (first leg)

    def validate(self) -> None:
        for name in ("batch_size", "total_steps", "save_every", "eval_every", "log_every", "calibrate_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.start_step < self.total_steps:
            raise ValueError(f"need 0 <= start_step < total_steps, got {self.start_step} and {self.total_steps}")
        for name in ("max_minutes", "snapshot_minutes"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of minutes, got {value}")
        if not 0 < self.delta_end <= self.delta_start:
            raise ValueError(f"need 0 < delta_end <= delta_start, got {self.delta_end} and {self.delta_start}")
        if self.latent_penalty < 0 or self.pre_tanh_limit <= 0 or self.snapshot_piece_mib <= 0:
            raise ValueError("latent_penalty must be >= 0; pre_tanh_limit and snapshot_piece_mib > 0")
        if not 0 <= self.ema_momentum < 1:
            raise ValueError(f"ema_momentum must be in [0, 1), got {self.ema_momentum}")
        if not 0 < self.min_lr <= self.lr:
            raise ValueError(f"need 0 < min_lr <= lr, got {self.min_lr} and {self.lr}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.sigma_sampler not in SIGMA_SAMPLERS:
            raise ValueError(f"sigma_sampler must be one of {SIGMA_SAMPLERS}, got {self.sigma_sampler!r}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}")
        for name in ("sigma_uniform_share", "context_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not (math.isfinite(self.sigma_log_mean) and math.isfinite(self.sigma_log_std) and self.sigma_log_std > 0):
            raise ValueError(f"need a finite sigma_log_mean and sigma_log_std > 0, got {self.sigma_log_mean} and "
                             f"{self.sigma_log_std}")
        if self.summary_init_std is not None and not (math.isfinite(self.summary_init_std)
                                                      and self.summary_init_std > 0):
            raise ValueError(f"summary_init_std must be a positive number, got {self.summary_init_std}")
        if (len(self.gain_db) != 2 or not all(math.isfinite(g) for g in self.gain_db)
                or not -80 <= self.gain_db[0] <= self.gain_db[1] <= 0):
            raise ValueError(f"gain_db must be [low, high] dBFS with -80 <= low <= high <= 0, got {self.gain_db}")

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
        for name, value in LEGACY_TRAIN_FIELDS.items():  # a state from before the field existed
            data.setdefault(name, copy.deepcopy(value))
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
        if config.summary_init_std is not None:
            self.model.init_summary_tokens(config.summary_init_std)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        betas = cast(Tuple[float, float], tuple(config.betas))  # TrainConfig.betas is (beta1, beta2)
        self.optimizer = torch.optim.RAdam(self.model.parameters(), lr=config.lr, betas=betas)
        # Noise is drawn on the training device: no host-side randn and copy per step.
        seed = noise_seed(config.seed, config.start_step) if config.noise_seed_v2 else config.seed + 1
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.sampler = NoiseIndexSampler(self.model.config, config.sigma_log_mean, config.sigma_log_std,
                                         uniform_share=config.sigma_uniform_share,
                                         legacy_density=config.sigma_sampler == "legacy_density")
        self.context = ContextPairs(self.model.config, config.context_share, config.context_sigma) \
            if config.context_share > 0 else None
        self.step = config.start_step
        self.skipped = 0
        self.samples_seen = 0
        self.best_metric: float | None = None
        # The last few training batches (CPU), for measuring the latent scale at export time
        # without opening a second iterator on the running DataLoader.
        self.recent_batches: deque = deque(maxlen=8)
        if self.device.type == "cuda":
            # Fixed input shapes every step: let cuDNN pick its fastest convolution algorithms, and
            # let fp32 matmuls (outside autocast) use TF32.
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        use_bf16 = config.precision == "bf16" or (config.precision == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        if config.compile:
            # In-place compile keeps parameter names, so checkpoints stay loadable without it.
            for module in (self.model.encoder, self.model.decoder, self.model.consistency):
                module.compile()

    def init_weights_from(self, model: Music2Latent2) -> None:
        """Start the online and EMA weights from ``model`` (a shipped checkpoint); the optimiser
        stays fresh, which is why a relay leg warms its learning rate up again. With
        ``config.summary_init_std`` set, the loaded summary tokens and positions are re-drawn."""
        if model.config.replace(latent_scale=1.0).to_dict() != self.model.config.replace(latent_scale=1.0).to_dict():
            raise ValueError("the checkpoint's model config differs from the run's")
        state = model.state_dict()
        self.model.load_state_dict(state, strict=True)
        if self.config.summary_init_std is not None:
            # Re-drawn on purpose: a checkpoint whose K slots collapsed into copies of one vector
            # gets distinct slots again, keeping everything else it learned (docs/recipe.md).
            self.model.init_summary_tokens(self.config.summary_init_std,
                                           torch.Generator().manual_seed(self.config.seed))
        self.ema.load_state_dict(self.model.state_dict(), strict=True)

    # ----------------------------------------------------------------- schedules
    def lr_at(self, step: int) -> float:
        """Linear warm-up to ``lr`` from ``start_step``, then cosine decay to ``min_lr`` at ``total_steps``."""
        c = self.config
        k = step - c.start_step
        if k < c.warmup_steps:
            return c.lr * (k + 1) / c.warmup_steps
        progress = min(1.0, (k - c.warmup_steps) / max(1, c.total_steps - c.start_step - c.warmup_steps))
        return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1 + math.cos(math.pi * progress))

    def delta_at(self, step: int) -> float:
        c = self.config
        return consistency_step_delta(step, c.total_steps, c.delta_start, c.delta_end, c.start_step)

    def ema_momentum_at(self, updates: int) -> float:
        """v1 warm-up: min(m, (1 + n) / (10 + n)), so early EMA weights follow the model."""
        m = self.config.ema_momentum
        return min(m, (1 + updates) / (10 + updates)) if self.config.ema_warmup else m

    @torch.no_grad()
    def update_ema(self) -> None:
        m = self.ema_momentum_at(self.step - self.skipped)
        ema_params: List[torch.Tensor] = list(self.ema.parameters())
        params = [p.detach() for p in self.model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - m)
        for eb, b in zip(self.ema.buffers(), self.model.buffers()):
            eb.copy_(b)

    # ----------------------------------------------------------------- one step
    def train_step(self, wav: torch.Tensor, health: bool = False) -> Dict[str, float]:
        """One optimiser step on a batch ``(B, audio_channels, 67072)``.

        A step whose loss or gradients are not finite is skipped (no update, no EMA update) and
        counted in ``self.skipped``; the step counter still advances so schedules stay aligned.
        ``health=True`` adds the latent-health numbers of the batch (:func:`latent_health`, each
        two-chunk crop a clip): an extra copy of the latents to the host, so only on log steps.
        """
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        delta = self.delta_at(self.step)
        wav = wav.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        loss, stats = consistency_loss(self.model, wav, delta, self.sampler, self.generator, self.autocast_dtype,
                                       self.config.latent_penalty, self.config.pre_tanh_limit,
                                       weighting=self.config.loss_weighting, context=self.context,
                                       keep_latents=health)
        latents = stats.pop("latents", None)
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
        if latents is not None:
            out.update(latent_health(list(latents.double().cpu().numpy())))
        return out

    # ----------------------------------------------------------------- loop
    def audio_hours_seen(self, crop: int) -> float:
        return self.samples_seen * crop / self.model.config.sample_rate / 3600

    def _calibrate(self, steps_per_s: float, elapsed_s: float) -> None:
        """Lay the schedules out over what is left of the time budget at the measured speed."""
        c = self.config
        assert c.max_minutes is not None
        remaining = (c.max_minutes - c.reserve_minutes) * 60 - elapsed_s
        c.total_steps = max(self.step + 1, self.step + int(steps_per_s * remaining))
        print(f"time budget {c.max_minutes:g} min at {steps_per_s:.2f} steps/s: schedules end at step "
              f"{c.total_steps}", flush=True)

    def fit(self, batches: Iterable[torch.Tensor], crop: int, on_save: Callable[[Trainer], None],
            on_eval: Callable[[Trainer], None] | None = None, log_file: Path | None = None,
            on_snapshot: Callable[[Trainer], None] | None = None) -> None:
        """Train until ``total_steps`` (or the time budget), logging, saving, evaluating and
        snapshotting on schedule.

        With ``max_minutes`` the steps/s of ``calibrate_steps`` steps (after 10 warm-up steps)
        fix ``total_steps``, so a run stopped by its budget has finished its lr and consistency
        schedules; the budget is also a hard stop should the speed drop later.
        """
        c = self.config
        window: List[float] = []
        sums: Dict[str, float] = {}
        t_begin = time.perf_counter()
        t0, s0 = t_begin, self.step
        first = self.step
        calib_t: float | None = None
        last_snapshot = t_begin
        for wav in batches:
            if self.step >= c.total_steps:
                break
            now = time.perf_counter()
            if c.max_minutes is not None:
                if now - t_begin > c.max_minutes * 60:
                    print(f"time budget of {c.max_minutes:g} min spent at step {self.step} of {c.total_steps}; "
                          "stopping", flush=True)
                    break
                if self.step == first + 10:
                    calib_t = now
                elif calib_t is not None and self.step == first + 10 + c.calibrate_steps:
                    self._calibrate(c.calibrate_steps / (now - calib_t), now - t_begin)
                    calib_t = None
            logs_next = (self.step + 1) % c.log_every == 0 or self.step + 1 == c.total_steps
            stats = self.train_step(wav, health=logs_next)
            self.recent_batches.append(wav.detach().cpu())
            if stats["skipped"] == 0:
                window.append(stats["loss"])
                for key in ("saturated", "pre_tanh_std", "high_sigma_share"):
                    sums[key] = sums.get(key, 0.0) + stats[key]
            if self.step % c.log_every == 0 or self.step == c.total_steps:
                rate = (self.step - s0) / max(time.perf_counter() - t0, 1e-9)
                loss = sum(window) / len(window) if window else float("nan")
                means = {k: v / max(len(window), 1) for k, v in sums.items()}
                line = (f"step {self.step}/{c.total_steps}  loss {loss:.4f}  lr {stats['lr']:.2e}  "
                        f"delta {stats['delta']:.4f}  sat {means.get('saturated', float('nan')):.4f}  "
                        f"pre-tanh std {means.get('pre_tanh_std', float('nan')):.3f}  "
                        f"high-sigma {means.get('high_sigma_share', float('nan')):.3f}  "
                        f"rank {stats.get('effective_rank', float('nan')):.2f}  "
                        f"slot-cos {stats.get('slot_cosine', float('nan')):.2f}  "
                        f"{rate:.2f} steps/s  audio {self.audio_hours_seen(crop):.2f} h  skipped {self.skipped}")
                print(line, flush=True)
                if log_file is not None:
                    health = {k: stats[k] for k in HEALTH_KEYS if k in stats}
                    record = {"step": self.step, "loss": loss, "lr": stats["lr"], "delta": stats["delta"],
                              "steps_per_s": rate, "audio_hours": self.audio_hours_seen(crop),
                              "skipped": self.skipped, "minutes": (time.perf_counter() - t_begin) / 60, **means,
                              **health}
                    with open(log_file, "a") as f:
                        f.write(json.dumps(record) + "\n")
                window, sums, t0, s0 = [], {}, time.perf_counter(), self.step
            if self.step % c.save_every == 0 or self.step == c.total_steps:
                on_save(self)
            if on_eval is not None and (self.step % c.eval_every == 0 or self.step == c.total_steps):
                on_eval(self)
            if (on_snapshot is not None and c.snapshot_minutes is not None
                    and time.perf_counter() - last_snapshot >= c.snapshot_minutes * 60):
                on_snapshot(self)
                last_snapshot = time.perf_counter()
