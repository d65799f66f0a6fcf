"""Parallel decoding mode: shapes, reproducibility, its relation to autoregressive decoding,
and that every chunk is conditioned on its predecessor's first-pass estimate."""

from __future__ import annotations

from typing import List

import pytest
import torch
from torch import nn

from music2latent2.config import ModelConfig
from music2latent2.inference import EncoderDecoder
from music2latent2.model import Music2Latent2
from music2latent2.sampling import iter_autoregressive, iter_parallel

SR = 44100


@pytest.fixture(scope="module")
def codec() -> EncoderDecoder:
    torch.manual_seed(0)
    return EncoderDecoder(Music2Latent2(ModelConfig.from_preset("tiny")), device="cpu", max_batch_size=4)


@pytest.fixture(scope="module")
def latents(codec: EncoderDecoder) -> torch.Tensor:
    wav = torch.randn(2 * codec.chunk_samples + 1000, generator=torch.Generator().manual_seed(1)) * 0.1
    return codec.encode(wav)  # (1, 64, 24): 3 chunks, mono


def test_parallel_shapes_length_and_seed(codec: EncoderDecoder, latents: torch.Tensor) -> None:
    length = 2 * codec.chunk_samples + 1000
    a = codec.decode(latents, length=length, seed=5, mode="parallel")
    b = codec.decode(latents, length=length, seed=5, mode="parallel")
    c = codec.decode(latents, length=length, seed=6, mode="parallel")
    assert a.shape == (1, length)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    batched = codec.decode(torch.cat([latents, latents])[:, None, :, :16], seed=5, mode="parallel")  # (B, C, d, L)
    assert batched.shape == (2, 1, 2 * codec.chunk_samples)


def test_parallel_does_not_depend_on_batch_size(codec: EncoderDecoder, latents: torch.Tensor) -> None:
    # Noise is drawn per chunk in time order, so grouping windows differently changes nothing.
    # 3 chunks: groups of one chunk, then groups [0, 1] and [2] (an estimate carried across).
    a = codec.decode(latents, seed=3, mode="parallel", max_batch_size=1)
    b = codec.decode(latents, seed=3, mode="parallel", max_batch_size=2)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_single_chunk_parallel_equals_autoregressive(codec: EncoderDecoder, latents: torch.Tensor) -> None:
    # One chunk: both modes denoise it alone from the same first noise draw.
    one = latents[..., :8]
    ar = codec.decode(one, seed=11)
    par = codec.decode(one, seed=11, mode="parallel")
    assert torch.equal(ar, par)


def test_two_chunks_second_chunk_equals_autoregressive(codec: EncoderDecoder, latents: torch.Tensor) -> None:
    # Two chunks: the second chunk's window [e_0 + sigma_cond eps, sigma_max eps'] is the same in
    # both modes; only chunk 0 differs (autoregressive mode refines it once more at sigma_cond).
    model = codec.model
    # Distinct random latents per chunk, so mixing up the two chunks' features would show.
    seq = torch.rand(1, 2, 8, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1  # (S=1, T=2, K, d)
    with torch.inference_mode():
        ar = dict(iter_autoregressive(model, seq, generator=torch.Generator().manual_seed(7)))
        par = dict(iter_parallel(model, seq, generator=torch.Generator().manual_seed(7)))
    torch.testing.assert_close(par[1], ar[1], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(par[0], ar[0])


def test_unknown_mode_is_rejected(codec: EncoderDecoder, latents: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="mode"):
        codec.decode(latents, mode="fast")


class _Stub(nn.Module):
    """A fake network with a known output: chunk t's first-pass estimate is the constant id_t
    (read from its latents); a two-chunk window returns id_t + 10 * (mean of the context chunk)
    + 100 * (id carried by the context's decoder features), so the context's audio AND its
    features must both come from chunk t - 1."""

    def __init__(self) -> None:
        super().__init__()
        self.config = ModelConfig.from_preset("tiny", freq_bins=16, chunk_frames=8, time_down=[2, 2, 2],
                                              freq_down=[2, 2, 2])

    def decoder_features(self, latents: torch.Tensor) -> List[torch.Tensor]:
        return [latents[:, :1, :1, None]]  # (N, 1, 1, 1) = id of the chunk

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cross: List[torch.Tensor],
                last_only: bool = False) -> torch.Tensor:
        b, w = x.shape[:2]
        ids = cross[0].reshape(b, w, 1, 1, 1).expand_as(x)
        if w == 1:
            return ids.clone()
        out = ids.clone()
        out[:, 1] = ids[:, 1] + 10 * x[:, 0].mean(dim=(-3, -2, -1), keepdim=True) + 100 * ids[:, 0]
        return out[:, -1:] if last_only else out


@pytest.mark.parametrize("max_batch_size", [1, 3, None])
def test_parallel_wiring_with_known_model(max_batch_size: int) -> None:
    stub = _Stub()
    s_count, t_count = 2, 5
    ids = torch.arange(s_count * t_count, dtype=torch.float32).reshape(s_count, t_count) + 1
    lat = ids[:, :, None, None].expand(s_count, t_count, 8, 64).contiguous()
    chunks = list(iter_parallel(stub, lat, sigma_cond=0.0, generator=torch.Generator().manual_seed(0),
                                max_batch_size=max_batch_size))
    assert [t for t, _ in chunks] == list(range(t_count))
    for t, chunk in chunks:
        assert chunk.shape == (s_count, 2, 16, 8)
        expected = ids[:, t] + (110 * ids[:, t - 1] if t > 0 else 0)
        torch.testing.assert_close(chunk.mean(dim=(1, 2, 3)), expected)
