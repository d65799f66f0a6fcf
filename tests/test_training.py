"""Training: loss, gradients, overfitting, NaN safety, resume and export (tiny model, CPU).

The network is the "tiny" preset with a shrunken STFT (n_fft 256, 128 bins, 16-frame chunks):
the same code paths as the real model at ~1/60 of the cost, so these tests stay fast.
"""

import json

import numpy as np
import pytest
import torch

from music2latent2 import EncoderDecoder, Music2Latent2
from music2latent2.training import (
    TrainConfig,
    Trainer,
    consistency_step_delta,
    crop_samples,
    export_checkpoint,
    load_state,
    measure_latent_scale,
    save_state,
)
from music2latent2.training.losses import NoiseIndexSampler, pseudo_huber

pytestmark = pytest.mark.usefixtures("one_torch_thread")


MICRO = {"n_fft": 256, "hop_length": 64, "freq_bins": 128, "chunk_frames": 16}


def _config(**kw) -> TrainConfig:
    base = dict(preset="tiny", model_overrides=dict(MICRO), batch_size=2, lr=1e-3, warmup_steps=1,
                total_steps=50, ema_momentum=0.9, precision="fp32", seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _crop(trainer: Trainer) -> int:
    c = trainer.model.config
    return crop_samples(c.chunk_samples, c.n_fft, c.hop_length)


def _batch(trainer: Trainer, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = _crop(trainer)
    t = torch.arange(n) / 44100
    tone = torch.sin(2 * torch.pi * 440 * t)[None, None] * 0.3
    return (tone + 0.05 * torch.randn(2, 1, n, generator=g)).float()


def test_schedule_and_sampler():
    assert consistency_step_delta(0, 100) == pytest.approx(0.1)
    assert consistency_step_delta(50, 100) == pytest.approx(0.01)
    assert consistency_step_delta(100, 100) == pytest.approx(1e-3)
    assert consistency_step_delta(1000, 100) == pytest.approx(1e-3)
    cfg = _config().model_config()
    i = NoiseIndexSampler(cfg).sample((20000,), torch.Generator().manual_seed(0))
    assert float(i.min()) > 0 and float(i.max()) <= 1
    from music2latent2.edm import sigma_from_index
    log_sigma = torch.log(sigma_from_index(i, cfg.sigma_min, cfg.sigma_max, cfg.rho))
    # Truncated to [sigma_min, sigma_max], so the median sits a little above -1.1.
    assert -1.4 < float(log_sigma.median()) < -0.4


def test_pseudo_huber():
    a = torch.zeros(2, 2, 3, 4)
    assert torch.all(pseudo_huber(a, a, 0.1) == 0)
    b = a.clone()
    b[0, 1] = 1.0  # ||a - b|| = sqrt(12)
    d = pseudo_huber(a, b, 0.1)
    assert float(d[0, 1]) == pytest.approx((12 + 0.01) ** 0.5 - 0.1, rel=1e-5)
    assert float(d[1, 0]) == 0


def test_step_is_finite_and_grads_reach_all_modules():
    trainer = Trainer(_config())
    from music2latent2.training.losses import consistency_loss
    loss, _ = consistency_loss(trainer.model, _batch(trainer), 0.1, trainer.sampler, trainer.generator)
    assert torch.isfinite(loss) and float(loss.detach()) > 0
    loss.backward()
    # Every parameter is in the graph (zero-initialised layers get zero, but not None, gradients).
    assert all(p.grad is not None for p in trainer.model.parameters())
    for name in ("encoder", "decoder", "consistency"):
        grads = [p.grad for p in getattr(trainer.model, name).parameters() if p.grad is not None]
        assert grads, name
        total = sum(float(g.abs().sum()) for g in grads)
        assert np.isfinite(total) and total > 0, name
    # The encoder is trained only through the student branch: its first conv must get gradient.
    first = next(trainer.model.encoder.patchifier.parameters())
    assert first.grad is not None and float(first.grad.abs().sum()) > 0


def test_overfits_one_batch():
    # A constant consistency step: a shrinking delta alone would lower the 1/delta-weighted loss.
    trainer = Trainer(_config(lr=5e-3, delta_start=0.1, delta_end=0.1))
    wav = _batch(trainer)
    losses = []
    for _ in range(25):
        trainer.generator.manual_seed(123)  # same noise levels and eps every step: a fixed objective
        losses.append(trainer.train_step(wav)["loss"])
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[12] < losses[0], losses
    assert losses[-1] < 0.95 * losses[0], losses


def test_nan_batch_is_skipped_and_counted():
    trainer = Trainer(_config())
    before = [p.detach().clone() for p in trainer.model.parameters()]
    ema_before = [p.detach().clone() for p in trainer.ema.parameters()]
    bad = _batch(trainer)
    bad[0, 0, 100] = float("nan")
    stats = trainer.train_step(bad)
    assert stats["skipped"] == 1 and trainer.skipped == 1 and trainer.step == 1
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ema_before, trainer.ema.parameters()))
    assert trainer.train_step(_batch(trainer))["skipped"] == 0


def test_lr_and_ema_schedules():
    trainer = Trainer(_config(warmup_steps=10, total_steps=110, lr=1e-4))
    assert trainer.lr_at(0) == pytest.approx(1e-5)
    assert trainer.lr_at(9) == pytest.approx(1e-4)
    assert trainer.lr_at(60) == pytest.approx((1e-4 + 1e-6) / 2, rel=1e-3)
    assert trainer.lr_at(110) == pytest.approx(1e-6)
    assert trainer.ema_momentum_at(0) == pytest.approx(0.1)
    assert trainer.ema_momentum_at(10 ** 6) == pytest.approx(0.9)


def test_ema_follows_the_model_by_its_momentum():
    # Plain Adam moves the weights on its first step (radam_fused gathers moments for five steps).
    trainer = Trainer(_config(optimizer="adamw"))
    ema0 = [p.detach().clone() for p in trainer.ema.parameters()]
    trainer.train_step(_batch(trainer))
    m = trainer.ema_momentum_at(1)
    for e0, e, p in zip(ema0, trainer.ema.parameters(), trainer.model.parameters()):
        torch.testing.assert_close(e, e0 + (1 - m) * (p.detach() - e0))
    assert any(not torch.equal(e0, e) for e0, e in zip(ema0, trainer.ema.parameters()))


def test_resume_reproduces_next_step(tmp_path):
    cfg = _config()
    a = Trainer(cfg)
    for s in range(2):
        a.train_step(_batch(a, s))
    path = save_state(a, tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["state.safetensors"]  # no temp files
    a.train_step(_batch(a, 2))

    b = Trainer(_config(seed=99))  # different init and RNG: everything must come from the state
    load_state(b, tmp_path / "run")
    assert b.step == 2
    b.train_step(_batch(b, 2))
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(pa, pb), name
    for pa, pb in zip(a.ema.parameters(), b.ema.parameters()):
        assert torch.equal(pa, pb)
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    # The state file holds no pickles: it is plain safetensors.
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        assert "info" in f.metadata()


def test_export_loads_in_encoderdecoder(tmp_path):
    trainer = Trainer(_config())
    trainer.train_step(_batch(trainer))
    scale = measure_latent_scale(trainer.ema, [_batch(trainer, 5), _batch(trainer, 6)])
    assert np.isfinite(scale) and scale > 0
    path = export_checkpoint(trainer.ema, tmp_path / "ckpt", latent_scale=scale, dtype=torch.float16, step=1)
    assert trainer.ema.config.latent_scale == 1.0  # the EMA model itself is left unchanged
    model = Music2Latent2.from_pretrained(path)
    assert model.config.latent_scale == pytest.approx(scale)
    encdec = EncoderDecoder(tmp_path / "ckpt", device="cpu")
    wav = _batch(trainer)[0, 0, :3000].numpy()
    z = encdec.encode(wav)
    cfg = encdec.config
    chunks = -(-3000 // cfg.chunk_samples)
    assert z.shape == (1, cfg.latent_dim, cfg.summary_tokens * chunks)
    assert np.all(np.abs(z) <= scale + 1e-4)  # tanh range times the scale
    assert np.abs(z).max() > 1.0 or scale <= 1.0  # scale applied
    rec = encdec.decode(z, length=3000, seed=0)
    assert rec.shape == (1, 3000) and np.all(np.isfinite(rec))


def test_state_from_another_device_type_loads_with_reseeded_noise(tmp_path):
    # A GPU run's CUDA generator state cannot be set on a CPU generator: export on CPU must work.
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    a = Trainer(_config())
    a.train_step(_batch(a))
    path = save_state(a, tmp_path / "run")
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    info = json.loads(meta["info"])
    info["rng_device"] = "cuda"
    meta["info"] = json.dumps(info)
    meta.pop("content_sha256")  # the tensors change below, deliberately: as a CUDA run would have written them
    tensors["rng/generator"] = torch.zeros(16, dtype=torch.uint8)  # the size of a CUDA generator state
    save_file(tensors, str(path), metadata=meta)
    b = Trainer(_config(seed=99))
    load_state(b, tmp_path / "run")
    assert b.step == 1
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    assert np.isfinite(b.train_step(_batch(b))["loss"])
