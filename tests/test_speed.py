"""Speed plumbing: static batch padding changes no result, the decode loops never need a value
on the host (they run on the meta device, where any .item()/.cpu()/.tolist() raises), and the
compile option is wired (its padding path is exercised without paying for torch.compile)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from music2latent2.config import ModelConfig
from music2latent2.inference import EncoderDecoder
from music2latent2.model import Music2Latent2
from music2latent2.sampling import iter_autoregressive, iter_parallel, map_batches


@pytest.fixture(scope="module")
def model() -> Music2Latent2:
    torch.manual_seed(0)
    return Music2Latent2(ModelConfig.from_preset("tiny")).eval()


def test_map_batches_padding_keeps_shapes_static_and_results_equal() -> None:
    seen = []

    def fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        seen.append(a.shape[0])
        return a * 2 + b

    a, b = torch.randn(7, 3), torch.randn(7, 3)
    plain = map_batches(fn, 3, a, b)
    seen.clear()
    padded = map_batches(fn, 3, a, b, pad=True)
    assert seen == [3, 3, 3]  # the last slice of 1 row was padded to 3
    assert torch.equal(plain, padded)
    seen.clear()
    small = map_batches(fn, 16, a, b, pad=True)  # fewer rows than one batch: still padded
    assert seen == [16] and torch.equal(small, plain)
    lists = map_batches(lambda x: [x, x + 1], 4, a, pad=True)
    assert torch.equal(lists[0], a) and torch.equal(lists[1], a + 1)


@pytest.mark.parametrize("mode", ["autoregressive", "parallel"])
def test_static_batch_padding_does_not_change_decoding(model: Music2Latent2, mode: str) -> None:
    codec = EncoderDecoder(model, device="cpu", max_batch_size=4)
    wav = torch.randn(1, 2 * codec.chunk_samples - 5000, generator=torch.Generator().manual_seed(2)) * 0.1
    z = codec.encode(wav)
    y = codec.decode(z, seed=4, mode=mode)
    codec.static_shapes = True  # what compile=True turns on, without compiling
    torch.testing.assert_close(codec.encode(wav), z, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(codec.decode(z, seed=4, mode=mode), y, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("sampler", [iter_autoregressive, iter_parallel])
def test_decode_loop_needs_no_host_values(model: Music2Latent2, sampler) -> None:
    meta = Music2Latent2(model.config).to("meta").eval()
    latents = torch.zeros(2, 3, model.config.summary_tokens, model.config.latent_dim, device="meta")
    with torch.inference_mode():
        chunks = list(sampler(meta, latents, max_batch_size=2, denoising_steps=2, pad=True))
    assert [t for t, _ in chunks] == [0, 1, 2]
    assert all(c.device.type == "meta" and c.shape == (2, 2, 1024, 64) for _, c in chunks)
    with pytest.raises(RuntimeError, match="meta"):
        torch.zeros(1, device="meta").item()  # the property the test relies on


def test_compile_flag_turns_on_static_shapes(model: Music2Latent2, monkeypatch: pytest.MonkeyPatch) -> None:
    compiled = []
    # torch.compile takes minutes on 2 CPU cores; record the calls instead of compiling.
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append((type(self).__name__, kw)))
    codec = EncoderDecoder(model, device="cpu", compile=True)
    assert codec.static_shapes and codec.compile
    assert sorted(name for name, _ in compiled) == ["ConsistencyModel", "Decoder", "Encoder"]
    assert all(kw == {"dynamic": False} for _, kw in compiled)
    assert "compile=True" in repr(codec)
    assert not EncoderDecoder(model, device="cpu").static_shapes


def test_compiled_decode_does_not_recompile_for_new_lengths(monkeypatch: pytest.MonkeyPatch) -> None:
    # Real torch.compile, with a backend that only counts graphs (no inductor, so it is quick):
    # static batch padding must give every audio length the same shapes and strides.
    from conftest import make_tiny

    graphs = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        graphs.append(gm)
        return gm.forward

    real_compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **kw: real_compile(self, backend=counting_backend, **kw))
    torch._dynamo.reset()
    codec = EncoderDecoder(make_tiny(), device="cpu", compile=True, max_batch_size=2)
    cfg = codec.config
    rng = torch.Generator().manual_seed(0)
    z2 = torch.rand(2, cfg.latent_dim, 2 * cfg.summary_tokens, generator=rng) * 2 - 1  # S == max_batch_size
    z3 = torch.rand(2, cfg.latent_dim, 3 * cfg.summary_tokens, generator=rng) * 2 - 1
    y2 = codec.decode(z2, seed=0)
    after_first = len(graphs)
    assert after_first >= 3  # decoder features, one-chunk window, two-chunk window
    codec.decode(z3, seed=0)
    assert len(graphs) == after_first, "a new audio length recompiled the network"
    torch._dynamo.reset()
    plain = EncoderDecoder(make_tiny(), device="cpu", max_batch_size=2)
    np.testing.assert_allclose(plain.decode(z2.numpy(), seed=0), y2.numpy(), atol=1e-5)
