"""The exact CPU decode speed-ups (docs/streaming.md): a window's context chunk is de-patchified
only when its refinement is used, and a CPU codec computes its upsampling in the transposed form.
Both must leave every result equal to float rounding; the first must also really skip the work."""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, List

import pytest
import torch
from conftest import make_tiny

from music2latent2.inference import EncoderDecoder
from music2latent2.model import Music2Latent2, optimize_for_cpu
from music2latent2.modules import ResBlock, Upsample
from music2latent2.patchify import DePatchifier, Patchifier
from music2latent2.sampling import AutoregressiveSampler
from music2latent2.streaming import StreamingDecoder


@pytest.fixture(scope="module")
def model() -> Music2Latent2:
    return make_tiny(seed=3)


def _window(model: Music2Latent2, batch: int = 2):
    cfg, gen = model.config, torch.Generator().manual_seed(0)
    latents = torch.rand(2 * batch, cfg.summary_tokens, cfg.latent_dim, generator=gen) * 2 - 1
    with torch.no_grad():
        cross = model.decoder_features(latents)  # chunk-major pairs: (B * 2, ...)
    x = torch.randn(batch, 2, cfg.spec_channels, cfg.freq_bins, cfg.chunk_frames, generator=gen)
    sigma = torch.tensor([[0.4, cfg.sigma_max]]).expand(batch, 2)
    return x, sigma, cross


@contextlib.contextmanager
def _depatchifier_rows(model: Music2Latent2) -> Iterator[List[int]]:
    """The batch size of every consistency de-patchifier call inside the block."""
    rows: List[int] = []
    hook = model.consistency.depatchifier.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[0]))
    try:
        yield rows
    finally:
        hook.remove()


def test_last_only_is_the_last_chunk_of_the_whole_window(model: Music2Latent2) -> None:
    x, sigma, cross = _window(model)
    with torch.no_grad(), _depatchifier_rows(model) as rows:
        full = model.denoise(x, sigma, cross)
        last = model.denoise(x, sigma, cross, last_only=True)
        single = model.denoise(x[:, :1], sigma[:, :1], [c[::2] for c in cross], last_only=True)
    assert full.shape == x.shape and last.shape == (2, 1) + x.shape[2:]
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-5)
    # The work is really skipped: 2 windows of 2 chunks de-patchify 4 chunks, last-only 2 (and
    # 2 one-chunk windows, 2).
    assert rows == [4, 2, 2]
    # A one-chunk window is its own last chunk.
    torch.testing.assert_close(single, model.denoise(x[:, :1], sigma[:, :1], [c[::2] for c in cross]))


@pytest.mark.parametrize("steps", [1, 2])
def test_sampler_without_refinement_gives_the_same_estimates(model: Music2Latent2, steps: int) -> None:
    cfg = model.config
    seq = torch.rand(2, 4, cfg.summary_tokens, cfg.latent_dim, generator=torch.Generator().manual_seed(1)) * 2 - 1
    samplers = [AutoregressiveSampler(model, 2, torch.device("cpu"), denoising_steps=steps,
                                      generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    with torch.inference_mode():
        for t in range(4):
            refined, cur = samplers[0].step(seq[:, t])
            none, cur_fast = samplers[1].step(seq[:, t], refine=False)
            assert none is None and (refined is None) == (t == 0)
            # Same noise, same context: the estimates (which condition the next chunk) agree.
            torch.testing.assert_close(cur_fast, cur, atol=1e-5, rtol=1e-5)


def _layout(model: Music2Latent2) -> tuple:
    conv = model.consistency.patchifier.input_conv.weight
    return ({m.mode for m in model.modules() if isinstance(m, Upsample)},
            {m.channels_last for m in model.modules() if isinstance(m, (Patchifier, DePatchifier))},
            conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous())


def test_cpu_codec_lays_the_model_out_for_speed_with_the_same_output() -> None:
    z = torch.tanh(torch.randn(1, 64, 24, generator=torch.Generator().manual_seed(2)))
    wav = torch.randn(1, 3 * 32768, generator=torch.Generator().manual_seed(3)) * 0.3
    with torch.inference_mode():
        plain = EncoderDecoder(make_tiny(seed=4), device="cpu", optimize_cpu=False)
        assert _layout(plain.model) == ({"pixel_shuffle"}, {False}, False)
        codec = EncoderDecoder(make_tiny(seed=4), device="cpu")
        assert _layout(codec.model) == ({"transposed"}, {True}, True)
        torch.testing.assert_close(codec.decode(z, seed=3), plain.decode(z, seed=3), atol=1e-5, rtol=1e-4)
        # A random tiny model amplifies rounding in its encoder (near-constant GroupNorm inputs):
        # 3e-4 here, against 1e-4 for the trained small checkpoint's latents.
        torch.testing.assert_close(codec.encode(wav, normalize=False), plain.encode(wav, normalize=False),
                                   atol=1e-3, rtol=1e-3)
        optimize_for_cpu(codec.model, enabled=False)  # and back to the default (training) layout
        assert _layout(codec.model) == ({"pixel_shuffle"}, {False}, False)
        assert torch.equal(codec.decode(z, seed=3), plain.decode(z, seed=3))


def test_a_model_in_the_cpu_layout_saves_and_loads_as_before(tmp_path) -> None:
    model = EncoderDecoder(make_tiny(seed=4), device="cpu").model  # channels-last weights
    model.save_pretrained(tmp_path / "m")
    loaded = Music2Latent2.from_pretrained(tmp_path / "m")
    assert _layout(loaded) == ({"pixel_shuffle"}, {False}, False)  # a fresh load has the default layout
    expected = make_tiny(seed=4).state_dict()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())


def test_low_latency_stream_skips_the_refinement(model: Music2Latent2) -> None:
    codec = EncoderDecoder(model, device="cpu")
    z = torch.tanh(torch.randn(1, 64, 24, generator=torch.Generator().manual_seed(6)))
    with _depatchifier_rows(model) as rows:
        StreamingDecoder(codec, seed=0, low_latency=True).push(z)
    assert rows == [1, 1, 1]  # chunk 0 alone, then the windows' last chunks only
    with _depatchifier_rows(model) as rows:
        StreamingDecoder(codec, seed=0).push(z)
    assert rows == [1, 2, 2]  # refined: the context chunk is de-patchified too


def test_bfloat16_on_a_cpu_without_native_support_warns(model: Music2Latent2, monkeypatch: pytest.MonkeyPatch) -> None:
    import music2latent2.inference as inference

    monkeypatch.setattr(inference, "cpu_has_fast_bfloat16", lambda: False)
    with pytest.warns(UserWarning, match="emulates bfloat16"):
        EncoderDecoder(model, device="cpu", precision="bfloat16")
    monkeypatch.setattr(inference, "cpu_has_fast_bfloat16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EncoderDecoder(model, device="cpu", precision="bfloat16")
        EncoderDecoder(model, device="cpu")


@pytest.mark.parametrize("autocast", [False, True])
def test_inference_overwrites_temporaries_only_and_bit_for_bit(autocast: bool) -> None:
    torch.manual_seed(0)
    block = ResBlock(8, 8, norm_groups=4, cond_dim=16)
    for p in block.parameters():
        torch.nn.init.normal_(p, 0.0, 0.2)
    # Under autocast the stream between blocks is bfloat16 (conv outputs), as in the network.
    x, cond = torch.randn(2, 8, 16, 8, dtype=torch.bfloat16 if autocast else torch.float32), torch.randn(2, 16)
    before = x.clone()
    conv2_out: List[int] = []
    block.conv2.register_forward_hook(lambda mod, args, out: conv2_out.append(out.data_ptr()))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        trained = block(x, cond)  # autograd on: the out-of-place ops, as in training
        with torch.inference_mode():
            inferred = block(x, cond)
    # Inference returns the residual sum in conv2's own output buffer; training a new tensor.
    assert trained.data_ptr() != conv2_out[0] and inferred.data_ptr() == conv2_out[1]
    assert torch.equal(x, before)  # the block's input is never written to
    assert inferred.dtype == trained.dtype and torch.equal(inferred, trained.detach())
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.inference_mode():
        # A float32 input under autocast: the sum would be float32, so it must not reuse the
        # bfloat16 conv output; the dtype guard keeps the out-of-place add.
        promoted = block(x.float(), cond)
    assert promoted.dtype == torch.float32 and promoted.data_ptr() != conv2_out[-1]
    trained.sum().backward()  # and training still has its gradients
    assert block.conv1.weight.grad is not None and torch.isfinite(block.conv1.weight.grad).all()
