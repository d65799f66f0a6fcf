"""The fast training step is the same function as the reference (issue 27), checked on CPU.

- the upsampling rewrites (pixel shuffle, transposed conv) against nearest-upsample + 3x3 conv,
  on random blocks and on the bundled weights;
- bf16 autocast keeps the conv residual stream in bf16;
- the loss compiled as one graph (fullgraph) against the eager loss, without recompiling as
  delta moves; the trainer's compiled step (inductor) against its eager step, with its cache;
- the fused AdamW skips a non-finite step on the device (parameters, moments, step count, EMA);
- ``python -m music2latent2.training bench --json``.
"""

from __future__ import annotations

import copy
import json
import math
from typing import List

import pytest
import torch
import torch.nn.functional as F
from test_training import MICRO, _batch, _config  # the same micro training config
from torch._dynamo.testing import CompileCounterWithBackend

from music2latent2 import EncoderDecoder
from music2latent2.modules import GroupNorm, ResBlock, Upsample, set_upsample_mode
from music2latent2.training import TrainConfig, Trainer, crop_samples
from music2latent2.training.__main__ import main as train_main
from music2latent2.training.losses import ConsistencyLoss, NoiseIndexSampler, draw_noise, spectrogram_windows

pytestmark = pytest.mark.usefixtures("one_torch_thread")



# ----------------------------------------------------------------------------- upsampling
@pytest.mark.parametrize("factors", [(4, 1), (2, 2), (4, 2), (4, 4), (2, 1), (1, 1)])
@pytest.mark.parametrize("mode", ["pixel_shuffle", "transposed"])
def test_upsample_rewrites_are_the_same_function(factors, mode):
    torch.manual_seed(0)
    up = Upsample(5, 7, *factors).double()
    x = torch.randn(2, 5, 6, 3, dtype=torch.double, requires_grad=True)
    up.mode = "interpolate"
    ref = up(x)
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), [x, up.conv.weight, up.conv.bias])
    up.mode = mode
    out = up(x)
    grads = torch.autograd.grad(out.pow(2).sum(), [x, up.conv.weight, up.conv.bias])
    assert out.shape == ref.shape == (2, 7, 6 * factors[0], 3 * factors[1])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for g, r in zip(grads, ref_grads):  # training sees the one 3x3 weight, whatever the mode
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    assert [n for n, _ in up.named_parameters()] == ["conv.weight", "conv.bias"]
    assert set(up.state_dict()) == {"conv.weight", "conv.bias"}  # the tap maps are not saved


def test_unknown_upsample_mode_is_refused():
    with pytest.raises(ValueError, match="upsample mode"):
        Upsample(4, 4, 2, 2, mode="bilinear")
    with pytest.raises(ValueError, match="upsample mode"):
        set_upsample_mode(Upsample(4, 4, 2, 2), "nearest")


def test_upsample_rewrite_is_bit_close_on_the_shipped_weights():
    """On the bundled m2l2-small (its weights load unchanged), every mode in float32 is as close
    to the float64 reference as the float32 reference itself: the rewrite adds no error beyond
    float32 rounding."""
    model = EncoderDecoder(device="cpu").model
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, cfg.spec_channels, cfg.freq_bins, cfg.chunk_frames, generator=g) * 0.3
    latents = torch.tanh(torch.randn(4, cfg.summary_tokens, cfg.latent_dim, generator=g))
    sigma = torch.tensor([[0.4, 80.0], [1.0, 5.0]])
    noisy = x + sigma.view(2, 2, 1, 1, 1) * torch.randn(x.shape, generator=g)

    def run(m, mode: str, dtype: torch.dtype) -> torch.Tensor:
        set_upsample_mode(m, mode)
        with torch.no_grad():
            return m.denoise(noisy.to(dtype), sigma.to(dtype), m.decoder_features(latents.to(dtype))).double()

    truth = run(copy.deepcopy(model).double(), "interpolate", torch.float64)
    errors = {mode: float((run(model, mode, torch.float32) - truth).norm() / truth.norm())
              for mode in ("interpolate", "pixel_shuffle", "transposed")}
    set_upsample_mode(model, "pixel_shuffle")
    assert errors["interpolate"] < 1e-3, errors  # float32 itself
    for mode in ("pixel_shuffle", "transposed"):
        assert errors[mode] <= 2 * errors["interpolate"] + 1e-6, errors


# ----------------------------------------------------------------------------- bf16
def test_groupnorm_is_nn_groupnorm_in_float32_and_keeps_bf16():
    torch.manual_seed(0)
    ours, ref = GroupNorm(4, 16), torch.nn.GroupNorm(4, 16)
    with torch.no_grad():
        ours.weight.normal_(), ours.bias.normal_()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(ours(x), ref(x))
    # CUDA autocast runs group_norm in float32 and returns float32; ours returns the input's
    # dtype, with the statistics still computed in float32.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref(x.bfloat16().float()).bfloat16())


def test_bf16_autocast_keeps_the_conv_residual_stream_in_bf16(tiny_model):
    model = copy.deepcopy(tiny_model)
    dtypes: List[torch.dtype] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
             for m in model.modules() if isinstance(m, (ResBlock, Upsample))]
    cfg = model.config
    x = torch.randn(1, 2, cfg.spec_channels, cfg.freq_bins, cfg.chunk_frames)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        latents, _ = model.encode_chunks(x.flatten(0, 1))
        out = model.denoise(x, torch.tensor([[0.4, 80.0]]), model.decoder_features(latents))
    for h in hooks:
        h.remove()
    assert dtypes and set(dtypes) == {torch.bfloat16}, set(dtypes)
    assert out.dtype == torch.float32  # the consistency output (c_skip x + c_out F) stays float32
    with torch.no_grad():
        ref = model.denoise(x, torch.tensor([[0.4, 80.0]]), model.decoder_features(model.encode_chunks(
            x.flatten(0, 1))[0]))
    assert float((out - ref).norm() / ref.norm()) < 0.03  # bf16 rounding, not another function


# ----------------------------------------------------------------------------- compiled loss
def _loss_inputs(model, seed: int = 1):
    c = model.config
    n = crop_samples(c.chunk_samples, c.n_fft, c.hop_length)
    wav = torch.randn(2, 1, n, generator=torch.Generator().manual_seed(seed)) * 0.1
    x = spectrogram_windows(model, wav)
    i_hi, eps = draw_noise(c, 2, NoiseIndexSampler(c), torch.Generator().manual_seed(seed))
    return x, i_hi, eps


def test_the_loss_compiles_as_one_graph_and_matches_eager(tiny_model):
    model = copy.deepcopy(tiny_model).train()
    loss_fn = ConsistencyLoss(model)
    x, i_hi, eps = _loss_inputs(model)
    ref, ref_stats = loss_fn(x, i_hi, eps, torch.full((), 0.05))
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=False, backend=counter)  # a break would raise
    loss, stats = compiled(x, i_hi, eps, torch.full((), 0.05))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    for key in ref_stats:
        torch.testing.assert_close(stats[key], ref_stats[key], rtol=1e-5, atol=1e-7)
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in ref_grads))
    diff = math.sqrt(sum(float((g - r).pow(2).sum()) for g, r in zip(grads, ref_grads)))
    assert diff / norm < 1e-5
    compiled(x, i_hi, eps, torch.full((), 0.001))  # delta is an input: the schedule never recompiles
    assert counter.frame_count == 1


def test_a_failing_compile_falls_back_to_eager(monkeypatch, capsys):
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("inductor exploded")
        return run

    eager = Trainer(_config())
    monkeypatch.setattr(torch, "compile", broken_compile)
    trainer = Trainer(_config(compile="on"))
    assert trainer.compiled
    stats = trainer.train_step(_batch(trainer))
    assert not trainer.compiled and "training eagerly" in capsys.readouterr().out
    assert stats["loss"] == eager.train_step(_batch(eager))["loss"]  # the same step, eagerly
    for p, q in zip(trainer.model.parameters(), eager.model.parameters()):
        assert torch.equal(p, q)


def test_compile_modes_and_old_states():
    assert not Trainer(_config()).compiled  # auto: compiled on CUDA only
    assert _config(compile=True).compile == "on" and _config(compile=False).compile == "off"
    with pytest.raises(ValueError, match="compile"):
        _config(compile="maybe").validate()
    with pytest.raises(ValueError, match="optimizer"):
        _config(optimizer="sgd").validate()
    old = json.loads(_config().to_json())
    del old["optimizer"], old["compile_cache"], old["channels_last"]
    old["compile"] = False
    cfg = TrainConfig.from_json(json.dumps(old))  # a state written before these fields existed
    cfg.validate()
    assert cfg.optimizer == "radam" and cfg.compile == "off"
    assert isinstance(Trainer(cfg).optimizer, torch.optim.RAdam)
    assert Trainer(_config()).config.optimizer == "radam_fused"  # the default


def test_compiled_training_step_matches_eager_and_keeps_its_cache(tmp_path, capsys):
    """Inductor on CPU (the GPU path but for the device): two compiled steps against two eager
    steps, then a second trainer that starts from the cache the first one wrote."""
    cache = tmp_path / "compile_cache.bin"
    eager, compiled = Trainer(_config()), Trainer(_config(compile="on", compile_cache=str(cache)))
    for step in range(2):
        a, b = eager.train_step(_batch(eager, step)), compiled.train_step(_batch(compiled, step))
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert compiled.compiled and compiled.compile_seconds is not None
    from music2latent2.training.compiling import COMPILE_DONE, COMPILE_START
    out = capsys.readouterr().out  # the lines a lease's supervisor times the compile by (scripts/gpu/leg.py)
    assert f"{COMPILE_START} (step 1)" in out and COMPILE_DONE in out
    for p, q in zip(compiled.model.parameters(), eager.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5)
    assert cache.is_file() and cache.stat().st_size > 0
    from music2latent2.training.compiling import cache_environment_file, compile_environment
    assert json.loads(cache_environment_file(cache).read_text()) == compile_environment(torch.device("cpu"))
    again = Trainer(_config(compile="on", compile_cache=str(cache)))
    assert again.train_step(_batch(again))["loss"] == pytest.approx(
        Trainer(_config()).train_step(_batch(eager))["loss"], rel=1e-4)
    assert again.compiled


# ----------------------------------------------------------------------------- optimiser
def _nan_batch(trainer: Trainer) -> torch.Tensor:
    bad = _batch(trainer)
    bad[0, 0, 100] = float("nan")
    return bad


@pytest.mark.parametrize("optimizer", ["radam_fused", "adamw"])
def test_fused_adam_skips_a_non_finite_step_on_the_device(optimizer):
    trainer = Trainer(_config(optimizer=optimizer, warmup_steps=1))
    assert isinstance(trainer.optimizer, torch.optim.AdamW) and trainer.device_skip
    assert trainer.optimizer.param_groups[0]["fused"]
    for step in range(6):  # past RAdam's first five steps, so that every step moves the weights
        trainer.train_step(_batch(trainer, step))
    params = [p.detach().clone() for p in trainer.model.parameters()]
    ema = [p.detach().clone() for p in trainer.ema.parameters()]
    moments = {k: v.clone() for k, v in trainer.optimizer.state[next(trainer.model.parameters())].items()}
    stats = trainer.step_on_device(_nan_batch(trainer))
    assert isinstance(stats["finite"], torch.Tensor) and not bool(stats["finite"])  # device tensors, no sync
    assert trainer.skipped == 1 and trainer.step == 7
    assert all(torch.equal(a, b) for a, b in zip(params, trainer.model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ema, trainer.ema.parameters()))
    after = trainer.optimizer.state[next(trainer.model.parameters())]
    assert all(torch.equal(moments[k], after[k]) for k in moments)  # exp_avg, exp_avg_sq and step
    assert trainer.train_step(_batch(trainer, 1))["skipped"] == 0  # and training goes on
    assert not all(torch.equal(a, b) for a, b in zip(params, trainer.model.parameters()))


def test_radam_fused_takes_the_steps_of_torch_radam():
    """From RAdam's 6th step on, Adam at lr * r_t is RAdam; before it, radam_fused gathers moments."""
    from music2latent2.training.trainer import radam_rectification

    torch.manual_seed(0)
    ref = torch.nn.Parameter(torch.randn(64))
    ours = torch.nn.Parameter(ref.detach().clone())
    radam = torch.optim.RAdam([ref], lr=1e-2)
    fused = torch.optim.AdamW([ours], lr=1e-2, weight_decay=0.0, fused=True)
    for t in range(1, 201):
        grad = torch.randn(64) + 0.1 * ref.detach()
        ref.grad, ours.grad = grad.clone(), grad.clone()
        fused.param_groups[0]["lr"] = 1e-2 * radam_rectification(t, 0.999)
        radam.step()
        fused.step()
        if t <= 5:
            assert radam_rectification(t, 0.999) == 0.0
            with torch.no_grad():
                ours.copy_(ref)  # RAdam's un-adapted momentum steps, which radam_fused does not take
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    assert radam_rectification(800, 0.999) == pytest.approx(0.588, abs=0.001)


def test_radam_still_skips_a_non_finite_step():
    trainer = Trainer(_config(optimizer="radam"))
    assert not trainer.device_skip
    before = [p.detach().clone() for p in trainer.model.parameters()]
    assert trainer.train_step(_nan_batch(trainer))["skipped"] == 1 and trainer.skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_fit_leaves_a_non_finite_step_out_of_the_logged_means(tmp_path, capsys):
    trainer = Trainer(_config(total_steps=4, log_every=4, save_every=100, eval_every=100))
    batches = [_batch(trainer, 0), _nan_batch(trainer), _batch(trainer, 1), _batch(trainer, 2)]
    trainer.fit(iter(batches), 100, on_save=lambda t: None, log_file=tmp_path / "log.jsonl")
    record = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 4 and record["skipped"] == 1
    assert math.isfinite(record["loss"]) and math.isfinite(record["saturated"])  # the NaN step left out
    assert "skipped 1" in capsys.readouterr().out


# ----------------------------------------------------------------------------- bench
def test_bench_prints_one_json_object(capsys):
    code = train_main(["bench", "--preset", "tiny", "--model-overrides", json.dumps(MICRO), "--batch-size", "2",
                       "--seconds", "0.5", "--warmup-steps", "1", "--device", "cpu", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("gflop_per_sample", "samples_per_s", "tflops", "peak_memory_mib", "compile_s", "device"):
        assert key in result
    assert result["gflop_per_sample"] > 0 and result["samples_per_s"] > 0 and result["peak_memory_mib"] > 0
    assert result["tflops"] == pytest.approx(result["gflop_per_sample"] * result["samples_per_s"] / 1000)
    assert result["compile_s"] is None and result["peak_share"] is None  # eager, on a CPU
    assert result["skipped"] == 0 and result["timed_steps"] >= 1


def test_flop_count_matches_the_conv_arithmetic():
    """The counter's number for one conv layer is 2 * MACs (forward): the unit the bench reports."""
    from torch.utils.flop_counter import FlopCounterMode

    x, w = torch.randn(1, 8, 16, 16), torch.randn(4, 8, 3, 3)
    with FlopCounterMode(display=False) as counter:
        F.conv2d(x, w, padding=1)
    assert counter.get_total_flops() == 2 * 16 * 16 * 4 * 8 * 9
