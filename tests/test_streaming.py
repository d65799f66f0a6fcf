"""Streaming encode/decode: equal to the offline API for any block size, with the documented latency."""

from __future__ import annotations

from typing import Callable, List

import numpy as np
import pytest
import torch

from music2latent2 import EncoderDecoder, StreamingDecoder, StreamingEncoder
from music2latent2.sampling import AutoregressiveSampler

CS = 32768  # chunk samples
LEAD, LOOKAHEAD = 1024, 512

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _blocks(n: int, rng: np.random.Generator, largest: int) -> List[slice]:
    """Random block boundaries over n samples: sizes from 0 (empty) up to ``largest``."""
    out, pos = [], 0
    while pos < n:
        size = int(rng.integers(0, largest))
        out.append(slice(pos, pos + size))
        pos += size
    return out


def _stream(push: Callable, flush: Callable, x, blocks: List[slice]):
    parts = [push(x[..., b]) for b in blocks] + [flush()]
    return torch.cat(parts, -1) if isinstance(parts[0], torch.Tensor) else np.concatenate(parts, -1)


@pytest.mark.parametrize("shape, largest", [((100_000,), 40_000), ((2, 70_000), 9_000), ((2, 2, 65_536), 70_000)])
def test_stream_encoder_equals_offline_encode(tiny_encdec: EncoderDecoder, shape, largest) -> None:
    wav = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 0.3
    offline = tiny_encdec.encode(wav, normalize=False)  # a stream's gain is a setting (1 by default)
    enc = StreamingEncoder(tiny_encdec)
    streamed = _stream(enc.push, enc.flush, wav, _blocks(shape[-1], np.random.default_rng(0), largest))
    assert streamed.shape == offline.shape
    # Not bitwise: chunks are batched differently (per block instead of max_batch_size at a
    # time), and the encoder's matmuls round a row differently in batches of other sizes.
    torch.testing.assert_close(streamed, offline, atol=1e-5, rtol=0)
    assert enc.chunks == offline.shape[-1] // 8 and enc.samples == shape[-1]


def test_stream_encoder_features_stereo_and_numpy(stereo_encdec: EncoderDecoder) -> None:
    wav = (np.random.default_rng(2).standard_normal((2, 50_000)) * 0.3).astype(np.float32)
    enc = StreamingEncoder(stereo_encdec, extract_features=True, max_batch_size=1)
    streamed = _stream(enc.push, enc.flush, wav, _blocks(50_000, np.random.default_rng(3), 30_000))
    offline = stereo_encdec.encode(wav, extract_features=True, normalize=False)
    assert isinstance(streamed, np.ndarray) and streamed.shape == offline.shape == (1, 8 * 32, 2)
    np.testing.assert_allclose(streamed, offline, atol=1e-5, rtol=0)


def test_stream_encoder_emits_each_chunk_at_its_lookahead(tiny_encdec: EncoderDecoder) -> None:
    enc = StreamingEncoder(tiny_encdec)
    assert enc.lookahead == LOOKAHEAD
    z = enc.push(np.zeros(CS + LOOKAHEAD - 1, np.float32))
    assert z.shape == (1, 64, 0)  # chunk 0 needs one more sample
    assert enc.push(np.zeros(1, np.float32)).shape == (1, 64, 8)
    assert enc.push(np.zeros(2 * CS, np.float32)).shape == (1, 64, 16)  # two chunks from one block
    assert enc.flush().shape == (1, 64, 8)  # 3 * CS + 512 samples: four chunks in all, as encode gives


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("batched", [False, True])
def test_stream_decoder_equals_offline_decode_bitwise(tiny_encdec: EncoderDecoder, steps: int, batched: bool) -> None:
    gen = torch.Generator().manual_seed(4)
    z = torch.tanh(torch.randn(*((2, 2, 64, 40) if batched else (2, 64, 40)), generator=gen))
    offline = tiny_encdec.decode(z, seed=9, denoising_steps=steps)
    dec = StreamingDecoder(tiny_encdec, seed=9, denoising_steps=steps)
    groups = [slice(8 * a, 8 * b) for a, b in [(0, 0), (0, 1), (1, 1), (1, 3), (3, 4), (4, 5)]]
    streamed = _stream(dec.push, dec.flush, z, groups)
    assert streamed.shape == offline.shape
    assert torch.equal(streamed, offline)


def test_stream_decoder_latency_and_reset(tiny_encdec: EncoderDecoder) -> None:
    z = np.tanh(np.random.default_rng(5).standard_normal((1, 64, 24))).astype(np.float32)
    dec = StreamingDecoder(tiny_encdec, seed=1)
    assert dec.latency == CS + LEAD
    sizes = [dec.push(z[..., 8 * t:8 * t + 8]).shape[-1] for t in range(3)]
    # After chunk t the audio is final up to t * CS - LEAD: chunk t - 1 needed chunk t's window.
    assert sizes == [0, CS - LEAD, CS]
    first = np.concatenate([dec.push(z[..., :0]), dec.flush()], -1)
    assert first.shape[-1] == LEAD + CS  # the last chunk and the overhang
    dec.reset()  # re-seeds: the same latents decode the same again
    again = np.concatenate([dec.push(z), dec.flush()], -1)
    offline = tiny_encdec.decode(z, seed=1)
    assert isinstance(again, np.ndarray) and np.array_equal(again, offline)


def test_low_latency_emits_unrefined_chunks(tiny_model, tiny_encdec: EncoderDecoder) -> None:
    gen = torch.Generator().manual_seed(6)
    z = torch.tanh(torch.randn(1, 64, 32, generator=gen))
    dec = StreamingDecoder(tiny_encdec, seed=2, low_latency=True)
    assert dec.latency == LEAD
    pieces = [dec.push(z[..., 8 * t:8 * t + 8]) for t in range(4)]
    assert [p.shape[-1] for p in pieces] == [CS - LEAD, CS, CS, CS]  # chunk t out as soon as it is decoded
    streamed = torch.cat(pieces + [dec.flush()], -1)
    # Expected: the sampler's first estimate of every chunk, overlap-added as one spectrogram.
    sampler = AutoregressiveSampler(tiny_model, 1, torch.device("cpu"),
                                    generator=torch.Generator().manual_seed(2))
    seq = z.reshape(1, 64, 4, 8).permute(0, 2, 3, 1)
    estimates = [sampler.step(seq[:, t])[1] for t in range(4)]
    wav = tiny_model.spectral.inverse(torch.cat(estimates, -1))  # (1, 1, 4 * CS + overhang)
    expected = tiny_model.geometry.crop(wav, 4 * CS)[0]
    torch.testing.assert_close(streamed, expected, atol=1e-5, rtol=1e-5)
    refined = tiny_encdec.decode(z, seed=2)
    assert not torch.allclose(streamed[:, :3 * CS], refined[:, :3 * CS])  # it is a different output


def test_encoder_to_decoder_pipeline(tiny_encdec: EncoderDecoder) -> None:
    wav = torch.randn(1, 80_000, generator=torch.Generator().manual_seed(7)) * 0.03
    # With the gain offline encode picked from the whole signal, the stream gives the offline
    # result, at the original level.
    latents, gain = tiny_encdec.encode(wav, return_gain=True)
    assert gain > 1  # quiet input is brought up to the model's level
    enc, dec = StreamingEncoder(tiny_encdec, gain=gain), StreamingDecoder(tiny_encdec, seed=0, gain=gain)
    out = [dec.push(enc.push(wav[..., i:i + 4096])) for i in range(0, 80_000, 4096)]
    out += [dec.push(enc.flush()), dec.flush()]
    streamed = torch.cat(out, -1)
    expected = tiny_encdec.decode(latents, seed=0, gain=gain)
    assert streamed.shape == expected.shape == (1, 3 * CS)
    torch.testing.assert_close(streamed, expected, atol=1e-5, rtol=1e-4)
    unrestored = tiny_encdec.decode(latents, seed=0)
    torch.testing.assert_close(expected * gain, unrestored, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="gain must be finite and positive"):
        StreamingDecoder(tiny_encdec, gain=0.0)


def test_stream_misuse_is_refused_with_a_clear_error(tiny_encdec: EncoderDecoder) -> None:
    enc = StreamingEncoder(tiny_encdec)
    with pytest.raises(RuntimeError, match="nothing to encode"):
        enc.flush()
    enc.push(np.zeros((2, 10), np.float32))
    with pytest.raises(ValueError, match="leading dims"):
        enc.push(np.zeros((1, 10), np.float32))
    with pytest.raises(ValueError, match="leading dims"):
        enc.push(torch.zeros(2, 10))
    with pytest.raises(ValueError, match="NaN"):
        enc.push(np.full((2, 10), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"\(T,\), \(C, T\) or \(B, C, T\)"):
        StreamingEncoder(tiny_encdec).push(np.zeros((1, 1, 1, 5), np.float32))
    enc.flush()
    with pytest.raises(RuntimeError, match="reset"):
        enc.push(np.zeros((2, 10), np.float32))
    enc.reset()
    assert enc.push(np.zeros((1, 10), np.float32)).shape == (1, 64, 0)

    dec = StreamingDecoder(tiny_encdec)
    with pytest.raises(RuntimeError, match="nothing to decode"):
        dec.flush()
    with pytest.raises(ValueError, match="multiple of K"):
        dec.push(np.zeros((1, 64, 5), np.float32))
    with pytest.raises(ValueError, match="shape"):
        dec.push(np.zeros((1, 32, 8), np.float32))
    with pytest.raises(ValueError, match="far outside"):
        dec.push(np.full((1, 64, 8), 1e6, np.float32))
    dec.push(np.zeros((1, 64, 8), np.float32))
    with pytest.raises(ValueError, match="leading dims"):
        dec.push(np.zeros((2, 64, 8), np.float32))
    dec.flush()
    with pytest.raises(RuntimeError, match="reset"):
        dec.flush()
    with pytest.raises(ValueError, match="sigma_cond"):
        StreamingDecoder(tiny_encdec, sigma_cond=float("nan"))
