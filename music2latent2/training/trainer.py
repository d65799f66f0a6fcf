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
from ..distributed import LaunchEnv
from ..latent_health import HEALTH_KEYS, latent_health
from ..model import Music2Latent2
from .compiling import (
    COMPILE_DONE,
    COMPILE_START,
    SpeedProbe,
    compile_environment,
    load_compile_cache,
    save_compile_cache,
)
from .distributed import Ranks
from .losses import (
    LOSS_WEIGHTINGS,
    ConsistencyLoss,
    ContextPairs,
    NoiseIndexSampler,
    consistency_step_delta,
    draw_noise,
    spectrogram_windows,
)

__all__ = ["TrainConfig", "Trainer", "noise_seed", "LEGACY_TRAIN_FIELDS", "OPTIMIZERS", "COMPILE_MODES",
           "radam_rectification", "CONTROL_EVERY", "STOP_REASONS", "SUMMARY_TOKEN_MODES"]

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
    "optimizer": "radam",
}
SIGMA_SAMPLERS = ("lognormal", "legacy_density")
OPTIMIZERS = ("radam_fused", "radam", "adamw")
COMPILE_MODES = ("auto", "on", "off")
# Step statistics summed on the device between log lines (finite steps only).
_SUMMED = ("loss", "saturated", "pre_tanh_std", "high_sigma_share")
# In a data-parallel run the ranks agree every this many steps on whether to stop (time budget,
# end file, a signal): one tiny collective, and a host sync, per 10 steps rather than per step.
CONTROL_EVERY = 10
# Why Trainer.fit returned.
STOP_REASONS = ("steps", "time", "signal", "diverged", "data")
# What Trainer.init_weights_from does with a checkpoint's summary tokens (its docstring says when).
SUMMARY_TOKEN_MODES = ("auto", "redraw", "keep")


def radam_rectification(t: int, beta2: float) -> float:
    """RAdam's step-size factor at optimiser step ``t`` (1-based), 0 while RAdam would not adapt.

    From its 6th step on (rho_t > 5 at beta2 = 0.999), RAdam's update is Adam's times this
    rectification term r_t (Liu et al., 2020): 0.03 at step 6, 0.15 at 50, 0.59 at 800, 0.83 at
    2000, 0.98 at 5000: a long built-in warm-up, on top of the lr schedule's. Adam's fused
    kernel at lr * r_t therefore takes RAdam's steps (but for where eps enters, negligible at
    1e-8). Before that RAdam takes un-adapted momentum
    steps; ``radam_fused`` spends those few steps gathering moments (factor 0) instead.
    """
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * t * beta2 ** t / (1 - beta2 ** t)
    if rho_t <= 5:
        return 0.0
    return math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))


def synchronize_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def noise_seed(seed: int, start_step: int, rank: int = 0) -> int:
    """Seed of the training-noise generator: a relay leg that starts at another step draws a
    fresh noise stream instead of replaying the first leg's, and each data-parallel rank its own
    (rank 0's is a single process's)."""
    entropy = [seed, start_step, 1] + ([rank] if rank else [])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


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
    compile: str = "auto"  # the whole loss as one graph; auto = on CUDA (falls back to eager on failure)
    compile_cache: str | None = None  # compiled kernels read at start and written after compiling
    compile_after_steps: int = 0  # eager steps first (their speed is recorded beside the compiled speed)
    optimizer: str = "radam_fused"  # RAdam's steps on the fused Adam kernel (see radam_rectification)
    channels_last: bool = False  # convolution weights and activations in NHWC
    start_step: int = 0
    init_from: str | None = None  # checkpoint the weights started from (recorded, not re-read on resume)
    init_sha256: str | None = None
    max_minutes: float | None = None  # time budget: total_steps is set from the measured speed
    end_file: str | None = None  # a file holding the UNIX time to end by, re-read during the run (a lease's end)
    snapshot_request: str | None = None  # a file whose change asks for a snapshot at the next step
    data_watch: str | None = None  # a file whose change makes the loader take in new files of the data folders
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
    max_consecutive_skips: int = 100  # this many non-finite steps in a row stop the run (diverged)

    def __post_init__(self) -> None:
        if isinstance(self.compile, bool):  # states written when compile was a flag
            self.compile = "on" if self.compile else "off"

    def validate(self) -> None:
        for name in ("batch_size", "total_steps", "save_every", "eval_every", "log_every", "calibrate_steps",
                     "max_consecutive_skips"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.compile_after_steps < 0:
            raise ValueError(f"compile_after_steps must be >= 0, got {self.compile_after_steps}")
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
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
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

    In a data-parallel run (``ranks``, :mod:`.distributed`) every rank holds one: ``config.batch_size``
    is the global batch, and each rank steps on its ``batch_size / world_size`` share with its own
    noise; the loss module runs under DistributedDataParallel, so the gradients, and with them
    parameters, moments and EMA, stay the same on every rank.

    Args:
        config: training hyperparameters.
        device: where to train.
        model_config: network config; default ``config.model_config()``.
        ranks: the run's ranks; default a world of one.
    """

    def __init__(self, config: TrainConfig, device: torch.device | str = "cpu",
                 model_config: ModelConfig | None = None, ranks: Ranks | None = None) -> None:
        config.validate()
        self.config = config
        self.device = torch.device(device)
        self.ranks = ranks or Ranks(LaunchEnv(), self.device)
        if config.batch_size % self.ranks.world_size:
            raise ValueError(f"--batch-size {config.batch_size} (the global batch) does not split evenly over "
                             f"{self.ranks.world_size} ranks; use a multiple of {self.ranks.world_size}")
        self.rank_batch_size = config.batch_size // self.ranks.world_size
        torch.manual_seed(config.seed)  # weight init is part of the run's identity
        self.model = Music2Latent2(model_config or config.model_config()).to(self.device).train()
        if config.summary_init_std is not None:
            self.model.init_summary_tokens(config.summary_init_std)
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        betas = cast(Tuple[float, float], tuple(config.betas))  # TrainConfig.betas is (beta1, beta2)
        self.optimizer: torch.optim.Optimizer
        fused = self.device.type in ("cuda", "cpu")
        if config.optimizer in ("adamw", "radam_fused"):
            # Fused: one kernel for all parameters, and a non-finite step is skipped on the device
            # through ``found_inf`` (the GradScaler protocol), so no step waits for the host.
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, betas=betas, weight_decay=0.0,
                                               fused=fused or None)
        else:  # torch's RAdam: it cannot skip on the device, so one host sync per step
            self.optimizer = torch.optim.RAdam(self.model.parameters(), lr=config.lr, betas=betas)
        self.device_skip = config.optimizer != "radam" and fused
        # Optimiser steps taken (host count, for the rectification; load_state restores it). A
        # skipped step is counted too: r_t then runs one step ahead, which no longer matters by
        # the time steps are skipped (r_t changes by at most 1.1e-3 per step after step 100).
        self.optimizer_steps = 0
        # Noise is drawn on the training device: no host-side randn and copy per step.
        seed = (noise_seed(config.seed, config.start_step, self.ranks.rank) if config.noise_seed_v2
                else config.seed + 1 + 7919 * self.ranks.rank)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.sampler = NoiseIndexSampler(self.model.config, config.sigma_log_mean, config.sigma_log_std,
                                         uniform_share=config.sigma_uniform_share,
                                         legacy_density=config.sigma_sampler == "legacy_density")
        self.context = ContextPairs(self.model.config, config.context_share, config.context_sigma) \
            if config.context_share > 0 else None
        self.step = config.start_step
        self._skipped = torch.zeros((), dtype=torch.int64, device=self.device)  # read on log steps only
        self._skip_run = torch.zeros((), dtype=torch.int64, device=self.device)  # non-finite steps in a row
        self.stop_signal: str | None = None  # set by a signal handler: stop at the next agreed step
        self.samples_seen = 0
        self.snapshot_token: str | None = None  # the snapshot request being answered (fit)
        self._steps_per_s: float | None = None  # measured when a time budget is calibrated
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
        self.loss_module = ConsistencyLoss(self.model, self.autocast_dtype, config.latent_penalty,
                                           config.pre_tanh_limit, config.loss_weighting)
        # DDP around the loss module (a no-op in a world of one): its forward is the whole loss, so
        # the gradient all-reduce overlaps the backward pass.
        self.parallel_loss = self.ranks.wrap(self.loss_module)
        self._loss: Callable[..., Tuple[torch.Tensor, Dict[str, torch.Tensor]]] = self.parallel_loss
        self.compiled = config.compile == "on" or (config.compile == "auto" and self.device.type == "cuda")
        self.compile_seconds: float | None = None  # the first compiled step, compilation included
        # What the run measured of its own speed and compile (SpeedProbe; it travels in snapshots).
        self.speed: Dict[str, Any] = {"compile": "pending" if self.compiled else "off",
                                      "batch_size": config.batch_size, "preset": config.preset,
                                      **compile_environment(self.device)}
        self.steps_run = 0  # steps this process has taken (a resumed run counts from 0 again)
        self._compiled_loss: Callable[..., Tuple[torch.Tensor, Dict[str, torch.Tensor]]] | None = None
        if self.compiled:
            load_compile_cache(config.compile_cache, self.device, lambda line: print(line, flush=True))
            # fullgraph: a graph break would split the loss into pieces with host round trips;
            # better to fail (and fall back to eager) than to run that silently. Under DDP,
            # dynamo's DDPOptimizer splits the graph at the gradient buckets, keeping the overlap.
            self._compiled_loss = torch.compile(self.parallel_loss, fullgraph=True, dynamic=False)
            if config.compile_after_steps == 0:
                self._loss = self._compiled_loss

    @property
    def skipped(self) -> int:
        """Steps skipped for a non-finite loss or gradient (reading it waits for the device)."""
        return int(self._skipped.item())

    @skipped.setter
    def skipped(self, value: int) -> None:
        self._skipped.fill_(int(value))

    # ----------------------------------------------------------------- compilation
    def save_compile_cache(self) -> Path | None:
        """Write the compiled kernels to ``config.compile_cache`` (atomically, with the
        environment they were made in beside them), for the next leg."""
        if not self.compiled:
            return None
        return save_compile_cache(self.config.compile_cache, self.device)

    def _compile_due(self) -> bool:
        return self.compiled and self.compile_seconds is None and self.steps_run >= self.config.compile_after_steps

    def _fall_back_to_eager(self, err: BaseException, spent_s: float) -> None:
        # A window of device time is better spent training eagerly than lost to a compiler bug.
        print(f"warning: torch.compile of the training loss failed ({type(err).__name__}: "
              f"{str(err).splitlines()[0] if str(err) else ''}); training eagerly", flush=True)
        self.speed["compile"] = "failed"
        self.speed["compile_seconds"] = spent_s
        self.optimizer.zero_grad(set_to_none=True)
        self._loss, self.compiled = self.parallel_loss, False

    def init_weights_from(self, model: Music2Latent2, summary_tokens: str = "auto") -> bool:
        """Start the online and EMA weights from ``model`` (a shipped checkpoint); the optimiser
        stays fresh, which is why a relay leg warms its learning rate up again.

        Args:
            model: the checkpoint's network (the same config as the run's, but for ``latent_scale``).
            summary_tokens: what becomes of its encoder summary tokens and decoder summary positions.
                ``"auto"`` (the default): with ``config.summary_init_std`` set, tokens still at a
                small initial scale (std below half of it, as in every checkpoint trained before that
                option, ``m2l2-small`` among them) are re-drawn at it; tokens a run already trained at
                that scale are kept, so a relay of legs does not throw away what the previous leg
                learned. ``"redraw"``: re-drawn at ``config.summary_init_std`` whatever their scale.
                ``"keep"``: kept as the checkpoint has them.

        Returns:
            True if the summary tokens and positions were re-drawn.

        Raises:
            ValueError: another model config; an unknown ``summary_tokens``; ``"redraw"`` without a
                ``config.summary_init_std`` to draw them at.
        """
        if summary_tokens not in SUMMARY_TOKEN_MODES:
            raise ValueError(f"summary_tokens must be one of {SUMMARY_TOKEN_MODES}, got {summary_tokens!r}")
        target = self.config.summary_init_std
        if summary_tokens == "redraw" and target is None:
            raise ValueError("re-drawing the summary tokens needs a summary_init_std to draw them at")
        if model.config.replace(latent_scale=1.0).to_dict() != self.model.config.replace(latent_scale=1.0).to_dict():
            raise ValueError("the checkpoint's model config differs from the run's")
        state = model.state_dict()
        self.model.load_state_dict(state, strict=True)
        small = target is not None and float(self.model.encoder.summary_tokens.detach().std()) < 0.5 * target
        redraw = summary_tokens == "redraw" or (summary_tokens == "auto" and small)
        if redraw:
            assert target is not None
            # Re-drawn on purpose: a checkpoint whose K slots collapsed into copies of one vector
            # gets distinct slots again, keeping everything else it learned (docs/recipe.md).
            self.model.init_summary_tokens(target, torch.Generator().manual_seed(self.config.seed))
        self.ema.load_state_dict(self.model.state_dict(), strict=True)
        return redraw

    @torch.no_grad()
    def sync_ranks(self) -> None:
        """Make every rank start from rank 0's weights, and check that the rest of the state (optimiser
        moments, counters) is the same everywhere. Call once after initialising or resuming.

        Every rank builds and loads the same thing, so this only guards against what differs by
        accident: a state file one machine reads in another version (an ``--out`` that is not on a
        filesystem every machine sees), a weight init that drew from a rank-specific generator.
        """
        if not self.ranks.distributed:
            return
        self.ranks.broadcast_module(self.model)
        self.ranks.broadcast_module(self.ema)
        moments = [t.double().sum() for state in self.optimizer.state.values() for t in state.values()
                   if isinstance(t, torch.Tensor) and t.is_floating_point()]
        checksum = float(torch.stack(moments).sum()) if moments else 0.0
        self.ranks.check_same({"step": float(self.step), "optimizer steps": float(self.optimizer_steps),
                               "optimizer moments": checksum, "skipped steps": float(self.skipped)},
                              "the ranks loaded different training states (with several machines, --out must be "
                              "on a filesystem that every machine sees)")

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
    def update_ema(self, finite: torch.Tensor | None = None) -> None:
        """EMA step at the momentum of the updates so far; ``finite`` (a 0-d bool tensor) turns
        it into a no-op on the device when the step was skipped."""
        updates = self.step - self._skipped.double()  # (0-d) steps taken, on the device
        m = self.config.ema_momentum
        if self.config.ema_warmup:
            weight = 1.0 - torch.clamp((1 + updates) / (10 + updates), max=m)
        else:
            weight = torch.full_like(updates, 1.0 - m)
        if finite is not None:
            weight = weight * finite
        ema_params: List[torch.Tensor] = list(self.ema.parameters())
        params = [p.detach() for p in self.model.parameters()]
        # ema += w * (p - ema), with w a device tensor: torch._foreach_lerp_ takes a tensor weight
        # only by reading it back to the host (one sync per step); _foreach_mul_ takes it as is.
        step = torch._foreach_sub(params, ema_params)
        torch._foreach_mul_(step, weight.float())
        torch._foreach_add_(ema_params, step)
        for eb, b in zip(self.ema.buffers(), self.model.buffers()):
            eb.copy_(b)

    # ----------------------------------------------------------------- one step
    def _forward_backward(self, wav: torch.Tensor, delta: float) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        x = spectrogram_windows(self.model, wav)  # (B, 2, C, F, T), eager: the STFT stays out of the graph
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        i_hi, eps = draw_noise(self.model.config, x.shape[0], self.sampler, self.generator, self.context,
                               device=self.device)
        # delta as a device tensor (a fill kernel, no copy from the host): the compiled graph
        # takes it as an input and never recompiles as the schedule moves.
        delta_t = torch.full((), delta, device=self.device)
        first_compiled = self._compile_due()
        t0 = time.perf_counter() if first_compiled else 0.0
        if first_compiled:
            assert self._compiled_loss is not None
            self._loss = self._compiled_loss
            self.ranks.print(f"{COMPILE_START} (step {self.step + 1})")
        try:
            loss, stats = self._loss(x, i_hi, eps, delta_t)
            # backward() is harmless on a non-finite loss (the step is skipped, its grads unused).
            loss.backward()
            if first_compiled:
                synchronize_device(self.device)
        except Exception as err:
            if not first_compiled:
                raise
            self._fall_back_to_eager(err, time.perf_counter() - t0)
            loss, stats = self._loss(x, i_hi, eps, delta_t)
            loss.backward()
            return loss, stats
        if first_compiled:
            self.compile_seconds = time.perf_counter() - t0
            self.speed.update(compile="compiled", compile_seconds=self.compile_seconds)
            self.ranks.print(f"{COMPILE_DONE} {self.compile_seconds:.1f} s")
            saved = self.save_compile_cache() if self.ranks.is_main else None
            if saved is not None:
                print(f"compile cache -> {saved}", flush=True)
        return loss, stats

    def step_on_device(self, wav: torch.Tensor) -> Dict[str, torch.Tensor]:
        """One optimiser step on a batch ``(B, audio_channels, 67072)``, without waiting for the
        device (with the fused AdamW): the returned statistics are 0-d device tensors (plus
        ``latents``), with ``finite`` telling whether the step was taken.

        A step whose loss or gradients are not finite is skipped (no update, no EMA update) and
        counted in ``skipped``; the step counter still advances so schedules stay aligned.
        """
        lr = self.lr_at(self.step)
        if self.config.optimizer == "radam_fused":
            lr = lr * radam_rectification(self.optimizer_steps + 1, self.config.betas[1])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        delta = self.delta_at(self.step)
        wav = wav.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        loss, stats = self._forward_backward(wav, delta)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))  # the same on every rank
        # The loss is each rank's own: its mean over the ranks makes the skip decision (and the
        # logged loss) a collective one, so no rank steps while another skips.
        loss_mean = self.ranks.mean(loss.detach().float(), "the training step")
        finite = torch.isfinite(loss_mean) & torch.isfinite(grad_norm)
        self.step += 1
        self.steps_run += 1
        self.optimizer_steps += 1
        if self.device_skip:
            # The GradScaler protocol: the fused kernel leaves parameters, moments and the step
            # count untouched where found_inf is 1.
            self.optimizer.found_inf = (~finite).float()  # type: ignore[attr-defined]
            self.optimizer.step()
            self._skipped += (~finite).long()
            self.update_ema(finite)
        elif bool(finite):  # RAdam: the one host sync per step
            self.optimizer.step()
            self.update_ema()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self._skipped += 1
        self._skip_run = torch.where(finite, torch.zeros_like(self._skip_run), self._skip_run + 1)
        self.samples_seen += wav.shape[0] * self.ranks.world_size
        stats.update(loss=loss_mean, grad_norm=grad_norm.float(), finite=finite)
        return stats

    def train_step(self, wav: torch.Tensor, health: bool = False) -> Dict[str, float]:
        """:meth:`step_on_device`, then its statistics as floats (one host sync).

        ``health=True`` adds the latent-health numbers of the batch (:func:`latent_health`, each
        two-chunk crop a clip).
        """
        lr, delta = self.lr_at(self.step), self.delta_at(self.step)
        stats = self.step_on_device(wav)
        latents = stats.pop("latents")
        out = dict(zip(stats, torch.stack([v.float() for v in stats.values()]).tolist()))
        ok = bool(out.pop("finite"))
        if not ok:
            del out["grad_norm"]
        out.update(lr=lr, delta=delta, skipped=float(not ok))
        if health:
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
        self.ranks.print(f"time budget {c.max_minutes:g} min at {steps_per_s:.2f} steps/s: schedules end at step "
                         f"{c.total_steps}")

    def fit(self, batches: Iterable[torch.Tensor], crop: int, on_save: Callable[[Trainer], None],
            on_eval: Callable[[Trainer], None] | None = None, log_file: Path | None = None,
            on_snapshot: Callable[[Trainer], None] | None = None) -> str:
        """Train until ``total_steps`` (or the time budget), logging, saving, evaluating and
        snapshotting on schedule. Returns why it stopped (one of :data:`STOP_REASONS`).

        With ``max_minutes`` the steps/s of ``calibrate_steps`` steps (after 10 warm-up steps)
        fix ``total_steps``, so a run stopped by its budget has finished its lr and consistency
        schedules; the budget is also a hard stop should the speed drop later.

        With ``snapshot_request`` (a file), every change of its content asks for a snapshot at
        the next step (``on_snapshot``, with :attr:`snapshot_token` set to that content): a poll
        of a device lease gets weights as fresh as the moment it returns.
        :attr:`speed` gathers the measured eager and compiled speed (:class:`SpeedProbe`).

        It also stops when :attr:`stop_signal` is set (a handler of SIGTERM or SIGUSR1: the
        caller saves the state) and after ``max_consecutive_skips`` non-finite steps in a row.
        In a data-parallel run every such decision is taken on rank 0's clock and agreed by all
        ranks every :data:`CONTROL_EVERY` steps (and at the calibration's steps), so every rank
        stops after the same step. ``on_save`` and ``on_eval`` run on every rank (they may hold
        collectives); ``on_snapshot`` and the log only on rank 0.
        """
        c = self.config
        ranks = self.ranks
        # Sums of _SUMMED over the finite steps since the last log line, and their count: kept on
        # the device and read once per log line, so no step waits for the host.
        sums: torch.Tensor | None = None
        t_begin = time.perf_counter()
        t0, s0 = t_begin, self.step
        first = self.step
        calib_t: float | None = None
        last_snapshot = t_begin
        ender = _EndFile(c.end_file, time.time()) if c.end_file and ranks.is_main else None
        if ender is not None:
            ender.apply(self, None, 0.0)  # may set max_minutes: before the calibration steps are chosen
        # The calibration times steps after the compile (if one is pending), not the compile itself.
        calib_first = first + 10 + (c.compile_after_steps if self._compiled_loss is not None and self.compiled else 0)
        calib_steps = (calib_first, calib_first + c.calibrate_steps) if c.max_minutes is not None else ()
        request = _RequestFile(c.snapshot_request) if c.snapshot_request and ranks.is_main else None
        probe = SpeedProbe(lambda: synchronize_device(self.device), c.batch_size,
                           c.compile_after_steps if self.compiled and self.compile_seconds is None else None,
                           self.speed) if ranks.is_main else None
        reason = "data"  # the loader ran dry
        for wav in batches:
            if self.step >= c.total_steps:
                reason = "steps"
                break
            if not ranks.distributed or self.step % CONTROL_EVERY == 0 or self.step in calib_steps:
                if ender is not None and time.perf_counter() - ender.checked >= 5.0:
                    ender.apply(self, self._steps_per_s, time.perf_counter() - t_begin)
                if self.step in calib_steps:
                    synchronize_device(self.device)  # calibrate on finished GPU work, not on the host's queue
                now = time.perf_counter()
                time_up = c.max_minutes is not None and now - t_begin > c.max_minutes * 60
                if c.max_minutes is not None and not time_up:
                    if self.step == calib_first:
                        calib_t = now
                    elif calib_t is not None and self.step == calib_first + c.calibrate_steps:
                        self._steps_per_s = c.calibrate_steps / (now - calib_t)
                        self._calibrate(self._steps_per_s, now - t_begin)
                        calib_t = None
                (time_up_f, total), (signalled,) = ranks.agree([float(time_up), c.total_steps],
                                                               [self.stop_signal is not None])
                c.total_steps = int(total)
                if time_up_f:
                    ranks.print(f"time budget of {c.max_minutes:g} min spent at step {self.step} of "
                                f"{c.total_steps}; stopping")
                    reason = "time"
                    break
                if signalled:
                    reason = "signal"
                    break
                if self.step >= c.total_steps:
                    reason = "steps"
                    break
            lr, delta = self.lr_at(self.step), self.delta_at(self.step)
            stats = self.step_on_device(wav)
            self.recent_batches.append(wav.detach().cpu())
            line = probe.after_step(self.steps_run, self.compiled) if probe is not None else None
            if line is not None:
                print(line, flush=True)
            finite = stats["finite"]
            step_sums = torch.stack([torch.where(finite, stats[k].float(), 0.0) for k in _SUMMED]
                                    + [finite.float()])
            sums = step_sums if sums is None else sums + step_sums
            if self.step % c.log_every == 0 or self.step == c.total_steps:
                assert sums is not None
                # Rank 0's statistics but the loss, already the ranks' mean; finite steps are the
                # same on every rank. The one host sync of this log interval.
                *totals, count = sums.tolist()
                skip_run = int(self._skip_run.item())
                if ranks.is_main:
                    self._log_line(totals, count, lr, delta, stats, crop, (self.step - s0)
                                   / max(time.perf_counter() - t0, 1e-9), t_begin, log_file)
                sums, t0, s0 = None, time.perf_counter(), self.step
                if skip_run >= c.max_consecutive_skips:
                    ranks.print(f"error: the last {skip_run} steps (to step {self.step}) all had a non-finite loss "
                                "or gradient and were skipped: training has diverged; stopping (lower --lr, or "
                                "look for broken audio in --data)")
                    reason = "diverged"
                    break
            if self.step % c.save_every == 0 or self.step == c.total_steps:
                on_save(self)
            if on_eval is not None and (self.step % c.eval_every == 0 or self.step == c.total_steps):
                on_eval(self)
            requested = request is not None and time.perf_counter() - request.checked >= 1.0 and request.changed()
            if requested:
                assert request is not None
                self.snapshot_token = request.token
            if on_snapshot is not None and ranks.is_main and (requested or (
                    c.snapshot_minutes is not None and time.perf_counter() - last_snapshot >= c.snapshot_minutes * 60)):
                on_snapshot(self)
                last_snapshot = time.perf_counter()
        return reason

    def _log_line(self, totals: List[float], count: float, lr: float, delta: float, stats: Dict[str, torch.Tensor],
                  crop: int, rate: float, t_begin: float, log_file: Path | None) -> None:
        c = self.config
        means = {k: (v / count if count else float("nan")) for k, v in zip(_SUMMED, totals)}
        loss = means.pop("loss")
        health = latent_health(list(stats["latents"].double().cpu().numpy()))
        skipped = self.skipped
        line = (f"step {self.step}/{c.total_steps}  loss {loss:.4f}  lr {lr:.2e}  "
                f"delta {delta:.4f}  sat {means['saturated']:.4f}  "
                f"pre-tanh std {means['pre_tanh_std']:.3f}  "
                f"high-sigma {means['high_sigma_share']:.3f}  "
                f"rank {health.get('effective_rank', float('nan')):.2f}  "
                f"slot-cos {health.get('slot_cosine', float('nan')):.2f}  "
                f"{rate:.2f} steps/s  audio {self.audio_hours_seen(crop):.2f} h  skipped {skipped}")
        print(line, flush=True)
        if log_file is not None:
            record = {"step": self.step, "loss": loss, "lr": lr, "delta": delta,
                      "steps_per_s": rate, "audio_hours": self.audio_hours_seen(crop),
                      "skipped": skipped, "minutes": (time.perf_counter() - t_begin) / 60, **means,
                      **{k: health[k] for k in HEALTH_KEYS if k in health}}
            with open(log_file, "a") as f:
                f.write(json.dumps(record) + "\n")


class _RequestFile:
    """A file whose every new content asks for one snapshot (a poll about to return)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.token: str | None = None  # the content last answered; a request already there at the start counts
        self.checked = time.perf_counter()

    def changed(self) -> bool:
        self.checked = time.perf_counter()
        try:
            text = self.path.read_text().strip()
        except OSError:
            return False
        if not text or text == self.token:
            return False
        self.token = text
        return True


class _EndFile:
    """The end of a run's time budget as a UNIX time in a file that someone else may move (a
    device lease's end, corrected as the lease's spent time becomes known)."""

    def __init__(self, path: str, begin_unix: float) -> None:
        self.path, self.begin_unix = Path(path), begin_unix
        self.value: float | None = None
        self.checked = time.perf_counter()

    def read(self) -> float | None:
        try:
            value = float(self.path.read_text().strip())
        except (OSError, ValueError):  # absent or half-written: keep the last value
            return None
        return value if math.isfinite(value) else None

    def apply(self, trainer: "Trainer", steps_per_s: float | None, elapsed_s: float) -> None:
        """Re-read the file; on a new value move ``max_minutes`` and, once the speed is known,
        lay the schedules out again over what is left."""
        self.checked = time.perf_counter()
        value = self.read()
        if value is None or value == self.value:
            return
        self.value = value
        c = trainer.config
        c.max_minutes = max(0.0, (value - self.begin_unix) / 60)
        print(f"time budget: ends in {(value - time.time()) / 60:.2f} min ({self.path})", flush=True)
        if steps_per_s is not None:
            trainer._calibrate(steps_per_s, elapsed_s)
