"""The training recipe of issue 32 (docs/recipe.md): noise draw, loss weighting, context pairs,
summary-token initialisation, latent health and the decoder diagnostics (micro models, CPU)."""

import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from music2latent2 import ModelConfig, Music2Latent2
from music2latent2.edm import index_from_sigma, sigma_from_index
from music2latent2.latent_health import HEALTH_KEYS, chunk_embeddings, latent_health
from music2latent2.spectral import ChunkGeometry
from music2latent2.training import TrainConfig, Trainer
from music2latent2.training.diagnostics import DIAGNOSTIC_SIGMAS, decoder_diagnostics, heldout_windows
from music2latent2.training.losses import ContextPairs, NoiseIndexSampler, consistency_loss, loss_weight
from music2latent2.training.trainer import LEGACY_TRAIN_FIELDS, noise_seed

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MICRO = {"n_fft": 256, "hop_length": 64, "freq_bins": 128, "chunk_frames": 16}


def _truncated_normal_moments(mean: float, std: float, lo: float, hi: float) -> tuple:
    """Mean and std of N(mean, std^2) truncated to [lo, hi], by quadrature on a fine grid."""
    x = torch.linspace(lo, hi, 200001, dtype=torch.float64)
    w = torch.exp(-0.5 * ((x - mean) / std) ** 2)
    m = float((w * x).sum() / w.sum())
    return m, math.sqrt(float((w * (x - m) ** 2).sum() / w.sum()))


def _log_sigmas(sampler: NoiseIndexSampler, cfg: ModelConfig, n: int = 400000) -> torch.Tensor:
    i = sampler.sample((n,), torch.Generator().manual_seed(0))
    return torch.log(sigma_from_index(i.double(), cfg.sigma_min, cfg.sigma_max, cfg.rho))


@pytest.mark.parametrize("mean,std", [(-1.1, 2.0), (0.5, 1.0)])
def test_sampler_draws_the_truncated_normal_it_is_told(mean, std):
    cfg = ModelConfig.from_preset("tiny")
    log_sigma = _log_sigmas(NoiseIndexSampler(cfg, mean, std), cfg)
    want_mean, want_std = _truncated_normal_moments(mean, std, math.log(cfg.sigma_min), math.log(cfg.sigma_max))
    assert float(log_sigma.mean()) == pytest.approx(want_mean, abs=0.02)
    assert float(log_sigma.std()) == pytest.approx(want_std, abs=0.02)
    # And the distribution, not only two moments: the share below the truncated median-ish point.
    lo, hi = math.log(cfg.sigma_min), math.log(cfg.sigma_max)
    x = torch.linspace(lo, hi, 200001, dtype=torch.float64)
    w = torch.exp(-0.5 * ((x - mean) / std) ** 2)
    cdf_at_mean = float(w[x <= mean].sum() / w.sum())
    assert float((log_sigma <= mean).double().mean()) == pytest.approx(cdf_at_mean, abs=0.01)


def test_legacy_density_sampler_keeps_the_first_legs_higher_noise():
    cfg = ModelConfig.from_preset("tiny")
    legacy = _log_sigmas(NoiseIndexSampler(cfg, legacy_density=True), cfg)
    fixed = _log_sigmas(NoiseIndexSampler(cfg), cfg)
    # The density without its change-of-variable factor: mean log-sigma about -0.56, not -1.1.
    assert -0.75 < float(legacy.mean()) < -0.4
    assert float(fixed.mean()) < float(legacy.mean()) - 0.3


def test_uniform_share_trains_high_sigma():
    cfg = ModelConfig.from_preset("tiny")
    g = torch.Generator().manual_seed(1)
    above_20 = 1 - float(index_from_sigma(torch.tensor(20.0), cfg.sigma_min, cfg.sigma_max, cfg.rho))
    plain = NoiseIndexSampler(cfg).sample((200000,), g)
    mixed = NoiseIndexSampler(cfg, uniform_share=0.3).sample((200000,), g)
    uniform = NoiseIndexSampler(cfg, uniform_share=1.0).sample((200000,), g)
    assert float(uniform.mean()) == pytest.approx(0.5, abs=0.01)
    share = float((uniform > 1 - above_20).float().mean())
    assert share == pytest.approx(above_20, abs=0.01)
    p_plain = float((plain > 1 - above_20).float().mean())
    p_mixed = float((mixed > 1 - above_20).float().mean())
    assert p_mixed == pytest.approx(0.7 * p_plain + 0.3 * above_20, abs=0.01)
    with pytest.raises(ValueError, match="uniform_share"):
        NoiseIndexSampler(cfg, uniform_share=1.5)


def test_loss_weightings():
    hi = torch.tensor([0.01, 1.0, 80.0])
    lo = hi * 0.9
    inv = loss_weight("inverse_delta", hi, lo, 0.5)
    assert torch.allclose(inv, 1 / (hi - lo))
    edm = loss_weight("edm", hi, lo, 0.5)
    assert torch.allclose(edm / inv, torch.sqrt(hi ** 2 + 0.25) / 0.5)
    # Low noise: the same as v1; sigma 80: 160x more, which is what trains the one-step decoder.
    assert float(edm[0] / inv[0]) == pytest.approx(1.0, abs=1e-3)
    assert float(edm[2] / inv[2]) == pytest.approx(160.0, rel=1e-3)
    with pytest.raises(ValueError, match="loss weighting"):
        loss_weight("l2", hi, lo, 0.5)


def test_context_pairs_look_like_inference():
    cfg = ModelConfig.from_preset("tiny")
    index = torch.full((20000, 2), 0.3)
    out = ContextPairs(cfg, share=1.0, sigma=0.4, log_std=0.5, min_index=0.5).apply(
        index, torch.Generator().manual_seed(0))
    left = sigma_from_index(out[:, 0].double(), cfg.sigma_min, cfg.sigma_max, cfg.rho)
    assert float(torch.log(left).median()) == pytest.approx(math.log(0.4), abs=0.05)
    assert float(out[:, 1].min()) >= 0.5 and float(out[:, 1].mean()) == pytest.approx(0.75, abs=0.01)
    half = ContextPairs(cfg, share=0.5).apply(index, torch.Generator().manual_seed(0))
    assert float((half[:, 1] != 0.3).float().mean()) == pytest.approx(0.5, abs=0.02)
    assert torch.equal(ContextPairs(cfg, share=0.0).apply(index), index)
    with pytest.raises(ValueError, match="context pairs"):
        ContextPairs(cfg, share=0.5, sigma=0.0)


def test_loss_reports_high_sigma_share_and_keeps_latents():
    torch.manual_seed(0)
    model = Music2Latent2(ModelConfig.from_preset("tiny", **MICRO))
    cfg = model.config
    n = ChunkGeometry.from_config(cfg).span(2)
    wav = 0.3 * torch.randn(3, 1, n, generator=torch.Generator().manual_seed(0))
    sampler = NoiseIndexSampler(cfg, uniform_share=1.0)
    loss, stats = consistency_loss(model, wav, 0.1, sampler, torch.Generator().manual_seed(0), weighting="edm",
                                   context=ContextPairs(cfg, 0.5), keep_latents=True)
    assert torch.isfinite(loss)
    assert 0.0 <= float(stats["high_sigma_share"]) <= 1.0
    assert stats["latents"].shape == (3, 2, cfg.summary_tokens, cfg.latent_dim)
    assert not stats["latents"].requires_grad


def test_summary_init_breaks_the_symmetry_of_the_slots():
    torch.manual_seed(0)
    model = Music2Latent2(ModelConfig.from_preset("tiny"))
    tokens = model.encoder.summary_tokens.detach()
    assert float(tokens.std()) < 0.05  # the default: near-copies
    model.init_summary_tokens(0.5, torch.Generator().manual_seed(0))
    for p in (model.encoder.summary_tokens, model.decoder.summary_pos):
        assert float(p.detach().std()) == pytest.approx(0.5, rel=0.2)
    trainer = Trainer(TrainConfig(preset="tiny", model_overrides=dict(MICRO), summary_init_std=0.5,
                                  precision="fp32", batch_size=2, total_steps=2, warmup_steps=1))
    assert float(trainer.model.encoder.summary_tokens.detach().std()) == pytest.approx(0.5, rel=0.2)
    assert torch.equal(trainer.ema.encoder.summary_tokens, trainer.model.encoder.summary_tokens)


def test_latent_health_tells_collapse_from_use():
    rng = np.random.default_rng(0)
    k, d = 8, 16
    healthy = [rng.standard_normal((20, k, d)) for _ in range(4)]
    h = latent_health(healthy)
    assert set(h) == set(HEALTH_KEYS)
    assert h["effective_rank"] > 0.8 * d
    assert abs(h["slot_cosine"]) < 0.05
    assert h["within_clip_share"] > 0.9 and h["time_share"] > 0.8
    # Collapse: every slot the same vector, and that vector fixed per clip.
    collapsed = [np.broadcast_to(rng.standard_normal(d), (20, k, d)) + 1e-6 * rng.standard_normal((20, k, d))
                 for _ in range(4)]
    c = latent_health(collapsed)
    assert c["slot_cosine"] > 0.99 and c["within_clip_share"] < 1e-6 and c["time_share"] < 1e-6
    assert c["effective_rank"] <= 3.5  # four clips span at most three directions around their mean
    # Scale does not matter.
    scaled = latent_health([3.0 * x for x in healthy])
    assert all(scaled[key] == pytest.approx(h[key]) for key in HEALTH_KEYS)
    # Slots that differ by a constant but never change over time: within-clip but not over time.
    offsets = rng.standard_normal((k, d))
    static = [np.broadcast_to(offsets, (20, k, d)) + 0.01 * rng.standard_normal((20, k, d)) for _ in range(2)]
    s = latent_health(static)
    assert s["within_clip_share"] > 0.9 and s["time_share"] < 0.01
    # Slots that move over time along one direction only: one time dimension, however many slots.
    direction = rng.standard_normal(d)
    ramp = [np.broadcast_to(offsets, (20, k, d)) + np.linspace(-1, 1, 20)[:, None, None] * direction
            + 1e-4 * rng.standard_normal((20, k, d)) for _ in range(2)]
    r = latent_health(ramp)
    assert r["effective_rank"] > 3 and r["time_rank"] < 1.1 and h["time_rank"] > 0.8 * d
    with pytest.raises(ValueError):
        latent_health([])


def test_chunk_embeddings_layout():
    # (C, d, K * chunks) with chunk-major slots, as encode returns them.
    z = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4 * 5)  # C=2, d=3, K=4, 5 chunks
    rows = chunk_embeddings(z, 4)
    assert rows.shape == (10, 4, 3)
    assert np.array_equal(rows[1, 2], z[0, :, 4 + 2])
    with pytest.raises(ValueError, match="K=3"):
        chunk_embeddings(z, 3)


def test_decoder_diagnostics_on_held_out_files(tmp_path):
    torch.manual_seed(0)
    model = Music2Latent2(ModelConfig.from_preset("tiny", **MICRO))
    t = np.arange(44100) / 44100
    sf.write(str(tmp_path / "a.wav"), (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 44100)
    sf.write(str(tmp_path / "b.wav"), np.zeros(44100, np.float32), 44100)  # silent: left out
    windows = heldout_windows(sorted(tmp_path.glob("*.wav")), model, windows_per_file=3)
    assert windows.shape[0] == 3
    assert float(windows.abs().max()) == pytest.approx(10 ** (-6 / 20), rel=1e-4)
    diag = decoder_diagnostics(model, windows, sigmas=(0.1, 80.0))
    again = decoder_diagnostics(model, windows, sigmas=(0.1, 80.0))
    assert json.dumps(diag, sort_keys=True) == json.dumps(again, sort_keys=True)  # fixed seed
    assert set(diag["one_step"]) == {0.1, 80.0}
    assert all(math.isfinite(v) for row in diag["one_step"].values() for v in row.values())
    assert set(diag["context"]) == {"nmse_alone", "nmse_with_context", "gain_db", "boundary_gain_db"}
    assert diag["latent_use"] >= 0 and set(diag["health"]) == set(HEALTH_KEYS)
    assert model.training  # restored
    assert DIAGNOSTIC_SIGMAS[-1] == 80.0


def test_noise_seed_differs_per_leg_and_old_states_resume_as_trained():
    assert noise_seed(0, 0) != noise_seed(0, 5000) != noise_seed(1, 5000)
    assert noise_seed(3, 7) == noise_seed(3, 7)
    new = TrainConfig(preset="tiny")
    old = json.loads(new.to_json())
    for name in LEGACY_TRAIN_FIELDS:
        del old[name]
    resumed = TrainConfig.from_json(json.dumps(old))
    assert resumed.sigma_sampler == "legacy_density" and not resumed.noise_seed_v2
    assert resumed.gain_db == [-12.0, 0.0] and resumed.loss_weighting == "inverse_delta"
    # A new state keeps whatever it was given.
    assert TrainConfig.from_json(new.to_json()) == new


@pytest.mark.parametrize("bad", [dict(sigma_sampler="cosine"), dict(loss_weighting="l2"),
                                 dict(sigma_uniform_share=-0.1), dict(context_share=2.0),
                                 dict(summary_init_std=0.0), dict(gain_db=[-10.0, 3.0]),
                                 dict(gain_db=[-5.0, -10.0])])
def test_bad_recipe_settings_are_refused(bad):
    with pytest.raises(ValueError):
        TrainConfig(preset="tiny", **bad).validate()


def test_training_logs_latent_health(tmp_path):
    from music2latent2.training.__main__ import main as train_main

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    sf.write(str(data / "x.flac"), 0.3 * rng.standard_normal(30000).astype(np.float32), 44100)
    run = tmp_path / "run"
    assert train_main(["train", "--data", str(data), "--out", str(run), "--preset", "tiny", "--model-overrides",
                       json.dumps(MICRO), "--steps", "3", "--batch-size", "2", "--warmup", "1", "--workers", "0",
                       "--log-every", "2", "--save-every", "100", "--eval-every", "100", "--cache-gb", "0.01",
                       "--sigma-uniform-share", "0.3", "--loss-weighting", "edm", "--context-share", "0.25",
                       "--summary-init-std", "0.5", "--gain-db", "-30", "0"]) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 3]
    for record in log:
        assert all(math.isfinite(record[k]) for k in ("effective_rank", "slot_cosine", "high_sigma_share"))
    from music2latent2.training.state import read_state_configs

    config, _ = read_state_configs(run / "state.safetensors")
    assert config.loss_weighting == "edm" and config.gain_db == [-30.0, 0.0]
    assert config.context_share == 0.25 and config.summary_init_std == 0.5 and config.sigma_uniform_share == 0.3


def test_init_from_keeps_or_redraws_the_summary_tokens():
    torch.manual_seed(3)
    source = Music2Latent2(ModelConfig.from_preset("tiny", **MICRO))
    base = dict(preset="tiny", model_overrides=dict(MICRO), precision="fp32", batch_size=2, total_steps=2,
                warmup_steps=1)
    kept = Trainer(TrainConfig(**base, summary_init_std=None))
    kept.init_weights_from(source)
    for a, b in zip(kept.model.state_dict().values(), source.state_dict().values()):
        assert torch.equal(a, b)
    redrawn = Trainer(TrainConfig(**base, summary_init_std=0.5))
    redrawn.init_weights_from(source)
    tokens = redrawn.model.encoder.summary_tokens.detach()
    assert float(tokens.std()) == pytest.approx(0.5, rel=0.2)
    assert torch.equal(redrawn.ema.encoder.summary_tokens, tokens)
    others = [k for k in source.state_dict() if "summary" not in k]
    assert others and all(torch.equal(redrawn.model.state_dict()[k], source.state_dict()[k]) for k in others)
