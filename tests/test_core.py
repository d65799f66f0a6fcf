"""Core library: shapes, batching invariance, causality, alignment, reproducibility, errors."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

import music2latent2.inference as inference_module
from music2latent2 import EncoderDecoder, ModelConfig, Music2Latent2
from music2latent2.sampling import iter_autoregressive
from music2latent2.spectral import ChunkGeometry

SR = 44100
CHUNK = 32768


def _audio(*shape: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * 0.1).astype(np.float32)


def _bandlimited(x: np.ndarray, cutoff: float = 0.9) -> np.ndarray:
    """Remove content above cutoff * Nyquist: the representation drops the Nyquist bin (docs/design.md section 1),
    so only signals without energy there (like music) survive the round trip exactly."""
    spec = np.fft.rfft(x, axis=-1)
    spec[..., int(cutoff * spec.shape[-1]):] = 0
    return np.fft.irfft(spec, n=x.shape[-1], axis=-1).astype(np.float32)


# --------------------------------------------------------------------------- presets
def test_paper_preset_parameter_count() -> None:
    n = Music2Latent2(ModelConfig.from_preset("paper")).num_parameters()
    assert 80e6 <= n <= 120e6, n


@pytest.mark.parametrize("preset,low,high", [("small", 10e6, 25e6), ("tiny", 0, 1e6)])
def test_small_presets_parameter_count(preset: str, low: float, high: float) -> None:
    n = Music2Latent2(ModelConfig.from_preset(preset)).num_parameters()
    assert low <= n <= high, n


def test_stereo_preset_takes_four_spectrogram_channels() -> None:
    cfg = ModelConfig.from_preset("paper_stereo")
    assert cfg.spec_channels == 4 and cfg.tokens_per_chunk == 64 and cfg.chunk_samples == CHUNK


def test_config_json_round_trip_and_validation() -> None:
    cfg = ModelConfig.from_preset("small", latent_scale=3.5)
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.from_preset("huge")
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({"not_a_field": 1})
    with pytest.raises(ValueError, match="divide"):
        ModelConfig.from_preset("tiny", time_down=[2, 2, 3])


# --------------------------------------------------------------------------- shapes and kinds
@pytest.mark.parametrize("seconds,chunks", [(0.01, 1), (0.743, 1), (1.0, 2), (2.3, 4)])
def test_latent_length_covers_every_sample(tiny_encdec: EncoderDecoder, seconds: float, chunks: int) -> None:
    n = int(seconds * SR)
    z = tiny_encdec.encode(_audio(n))
    assert z.shape == (1, 64, 8 * chunks)
    assert -(-n // CHUNK) == chunks


def test_input_kinds_and_output_types(tiny_encdec: EncoderDecoder, tmp_path) -> None:
    x = _audio(2, SR)
    z_np = tiny_encdec.encode(x)
    assert isinstance(z_np, np.ndarray) and z_np.dtype == np.float32 and z_np.shape == (2, 64, 16)
    z_t = tiny_encdec.encode(torch.from_numpy(x))
    assert isinstance(z_t, torch.Tensor) and z_t.device.type == "cpu" and z_t.dtype == torch.float32
    np.testing.assert_allclose(z_t.numpy(), z_np, atol=1e-5)
    z_b = tiny_encdec.encode(x[None].repeat(3, axis=0))
    assert z_b.shape == (3, 2, 64, 16)
    np.testing.assert_allclose(z_b[1], z_np, atol=1e-5)
    z_1 = tiny_encdec.encode(x[0])
    assert z_1.shape == (1, 64, 16)
    np.testing.assert_allclose(z_1[0], z_np[0], atol=1e-5)

    pcm = (x * 32767).astype(np.int16)
    np.testing.assert_allclose(tiny_encdec.encode(pcm), z_np, atol=2e-3)

    path = tmp_path / "clip.flac"
    sf.write(path, x.T, SR, subtype="PCM_24")
    z_file = tiny_encdec.encode(str(path))
    assert isinstance(z_file, np.ndarray) and z_file.shape == (2, 64, 16)
    np.testing.assert_allclose(z_file, z_np, atol=1e-3)


def test_features_shape(tiny_encdec: EncoderDecoder) -> None:
    cfg = tiny_encdec.config
    feats = tiny_encdec.encode(_audio(2, 3 * CHUNK), extract_features=True)
    assert feats.shape == (2, cfg.summary_tokens * cfg.dim, 3)
    feats_b = tiny_encdec.encode(_audio(4, 1, CHUNK), extract_features=True)
    assert feats_b.shape == (4, 1, cfg.summary_tokens * cfg.dim, 1)


def test_latents_are_scaled_by_config(tiny_model: Music2Latent2) -> None:
    x = _audio(CHUNK)
    base = EncoderDecoder(tiny_model, device="cpu").encode(x)
    scaled_model = Music2Latent2(tiny_model.config.replace(latent_scale=4.0))
    scaled_model.load_state_dict(tiny_model.state_dict())
    scaled = EncoderDecoder(scaled_model, device="cpu")
    np.testing.assert_allclose(scaled.encode(x), 4.0 * base, rtol=1e-5, atol=1e-6)
    assert np.abs(base).max() < 1.0  # tanh range before scaling


def test_decode_shapes_and_types(tiny_encdec: EncoderDecoder) -> None:
    z = tiny_encdec.encode(_audio(2, SR))
    y = tiny_encdec.decode(z, length=SR, seed=0)
    assert isinstance(y, np.ndarray) and y.shape == (2, SR) and np.isfinite(y).all()
    y_full = tiny_encdec.decode(z, seed=0)
    assert y_full.shape == (2, 2 * CHUNK)
    yt = tiny_encdec.decode(torch.from_numpy(z)[None], length=1000, seed=0)
    assert isinstance(yt, torch.Tensor) and yt.shape == (1, 2, 1000)


def test_stereo_model_gives_one_sequence_for_two_channels(stereo_encdec: EncoderDecoder) -> None:
    z = stereo_encdec.encode(_audio(2, SR))
    assert z.shape == (1, 64, 16)
    assert stereo_encdec.encode(_audio(5, 2, SR)).shape == (5, 1, 64, 16)
    assert stereo_encdec.encode(_audio(SR)).shape == (1, 64, 16)  # mono is duplicated to both sides
    y = stereo_encdec.decode(z, length=SR, seed=1)
    assert y.shape == (2, SR)
    with pytest.raises(ValueError, match="stereo model needs 1 or 2"):
        stereo_encdec.encode(_audio(3, SR))


# --------------------------------------------------------------------------- batching invariance
def test_encode_independent_of_max_batch_size(tiny_encdec: EncoderDecoder) -> None:
    x = _audio(3, 5 * CHUNK - 100)
    ref = tiny_encdec.encode(x, max_batch_size=64)
    for size in (1, 7):
        np.testing.assert_allclose(tiny_encdec.encode(x, max_batch_size=size), ref, atol=1e-5)
    feats = tiny_encdec.encode(x, extract_features=True, max_batch_size=1)
    np.testing.assert_allclose(feats, tiny_encdec.encode(x, extract_features=True, max_batch_size=16), atol=1e-5)


def test_decode_independent_of_max_batch_size(tiny_encdec: EncoderDecoder) -> None:
    # Noise is drawn for the whole batch at once, so the batch split must not change the result.
    z = tiny_encdec.encode(_audio(3, 2 * CHUNK))
    ref = tiny_encdec.decode(z, seed=3, max_batch_size=8)
    np.testing.assert_allclose(tiny_encdec.decode(z, seed=3, max_batch_size=1), ref, atol=1e-4)


def test_batch_items_decode_independently(tiny_encdec: EncoderDecoder) -> None:
    # Sequences share model evaluations but must not share information: changing item 1's
    # latents leaves item 0's audio bit-identical (same seed, so the same noise draws).
    z = tiny_encdec.encode(_audio(2, 2 * CHUNK))
    both = tiny_encdec.decode(z, seed=0)
    changed = z.copy()
    changed[1] = np.random.default_rng(2).uniform(-1, 1, changed[1].shape)
    other = tiny_encdec.decode(changed, seed=0)
    np.testing.assert_array_equal(other[0], both[0])
    assert not np.allclose(other[1], both[1])
    assert np.isfinite(both).all()


# --------------------------------------------------------------------------- reproducibility
def test_seeded_decode_is_reproducible(tiny_encdec: EncoderDecoder) -> None:
    z = tiny_encdec.encode(_audio(2 * CHUNK))
    a = tiny_encdec.decode(z, seed=7)
    b = tiny_encdec.decode(z, seed=7)
    c = tiny_encdec.decode(z, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    np.testing.assert_array_equal(tiny_encdec.decode(z, generator=g1), tiny_encdec.decode(z, generator=g2))


def test_more_denoising_steps_runs_and_changes_output(tiny_encdec: EncoderDecoder) -> None:
    z = tiny_encdec.encode(_audio(2 * CHUNK))
    one = tiny_encdec.decode(z, seed=0)
    two = tiny_encdec.decode(z, seed=0, denoising_steps=2)
    assert two.shape == one.shape and np.isfinite(two).all() and not np.allclose(one, two)


# --------------------------------------------------------------------------- causality
def _decoded_chunks(model: Music2Latent2, latents: torch.Tensor, seed: int = 0) -> list:
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        return [c.clone() for _, c in iter_autoregressive(model, latents, generator=gen)]


def test_future_latents_never_change_past_chunks(tiny_model: Music2Latent2) -> None:
    cfg = tiny_model.config
    lat = torch.rand(2, 3, cfg.summary_tokens, cfg.latent_dim) * 2 - 1  # (S, T, K, d)
    ref = _decoded_chunks(tiny_model, lat)
    for t in range(2):
        changed = lat.clone()
        changed[:, t + 1:] = torch.rand_like(changed[:, t + 1:]) * 2 - 1
        out = _decoded_chunks(tiny_model, changed)
        for past in range(t + 1):
            torch.testing.assert_close(out[past], ref[past], rtol=0, atol=0)
        assert not torch.allclose(out[t + 1], ref[t + 1])


def test_chunk_depends_on_previous_chunk(tiny_model: Music2Latent2) -> None:
    cfg = tiny_model.config
    lat = torch.rand(1, 3, cfg.summary_tokens, cfg.latent_dim) * 2 - 1
    ref = _decoded_chunks(tiny_model, lat)
    changed = lat.clone()
    changed[:, 1] = -changed[:, 1]
    out = _decoded_chunks(tiny_model, changed)
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=0)  # the past is untouched
    assert (out[2] - ref[2]).abs().max() > 1e-4  # chunk 2 sees chunk 1 through attention


def test_waveform_prefix_unaffected_by_future_latents(tiny_encdec: EncoderDecoder) -> None:
    z = tiny_encdec.encode(_audio(3 * CHUNK))
    changed = z.copy()
    changed[:, :, 16:] = np.random.default_rng(1).uniform(-1, 1, changed[:, :, 16:].shape)
    a, b = tiny_encdec.decode(z, seed=0), tiny_encdec.decode(changed, seed=0)
    # Chunk 2's frames reach back n_fft/2 samples before its span: everything before is final.
    boundary = 2 * CHUNK - 1024
    np.testing.assert_array_equal(a[:, :boundary], b[:, :boundary])
    assert not np.allclose(a[:, 2 * CHUNK:], b[:, 2 * CHUNK:])


# --------------------------------------------------------------------------- alignment
def _oracle_sampler(x: torch.Tensor, model: Music2Latent2):
    """A 'model' with a known response: it returns the true spectrogram of x, chunk by chunk."""
    cfg = model.config
    padded, chunks = ChunkGeometry.from_config(cfg).pad(x)
    spec = model.spectral(padded)  # (S, C, F, chunks * 64)

    def sampler(model_, latents, **kwargs):
        assert latents.shape[1] == chunks
        for t in range(chunks):
            yield t, spec[..., t * cfg.chunk_frames:(t + 1) * cfg.chunk_frames]

    return sampler


@pytest.mark.parametrize("n", [1000, CHUNK, 2 * CHUNK + 12345])
def test_exact_length_and_zero_lag(tiny_encdec: EncoderDecoder, monkeypatch, n: int) -> None:
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((1, n)) * 0.1).astype(np.float32)
    x[0, n // 3] = 3.0  # an impulse: a lag would move it
    x = _bandlimited(x)
    z = tiny_encdec.encode(x)
    monkeypatch.setattr(inference_module, "iter_autoregressive",
                        _oracle_sampler(torch.from_numpy(x)[:, None], tiny_encdec.model))
    y = tiny_encdec.decode(z, length=n)
    assert y.shape == (1, n)
    assert int(np.argmax(np.abs(y[0]))) == n // 3
    err = np.abs(y - x).max() / np.abs(x).max()
    assert err < 1e-4, err


def test_spectral_round_trip_interior(tiny_model: Music2Latent2) -> None:
    spectral = tiny_model.spectral
    x = torch.from_numpy(_bandlimited(_audio(2, 1, 60000)))
    y = spectral.inverse(spectral(x))
    assert y.shape[-1] == (spectral.num_frames(60000) - 1) * 512 + 2048
    interior = slice(2048, y.shape[-1] - 2048)
    rel = (y[..., interior] - x[..., interior]).norm() / x[..., interior].norm()
    assert rel < 1e-4, float(rel)
    spec = spectral(x)
    assert spec.shape == (2, 2, 1024, spectral.num_frames(60000))


def test_spectral_compression_formula(tiny_model: Music2Latent2) -> None:
    spectral = tiny_model.spectral
    x = torch.randn(1, 1, 4096, dtype=torch.float64).float()
    spec = spectral(x)
    ref = torch.stft(x[0].double(), 2048, 512, window=torch.hann_window(2048, dtype=torch.float64),
                     center=False, return_complex=True)[:, :1024]
    ref = 0.34 * ref.abs() ** 0.65 * torch.exp(1j * ref.angle())
    got = torch.complex(spec[0, 0].double(), spec[0, 1].double())
    assert torch.allclose(got, ref[0], atol=1e-4)


# --------------------------------------------------------------------------- resampling
@pytest.mark.parametrize("sr", [48000, 22050])
def test_resampled_input_gives_expected_latent_length(tiny_encdec: EncoderDecoder, sr: int) -> None:
    seconds = 2.0
    z = tiny_encdec.encode(_audio(int(seconds * sr)), sr=sr)
    chunks = -(-int(round(seconds * SR)) // CHUNK)
    assert z.shape == (1, 64, 8 * chunks)


def test_resampled_file_input(tiny_encdec: EncoderDecoder, tmp_path) -> None:
    path = tmp_path / "a.wav"
    sf.write(path, _audio(3 * 16000), 16000)
    assert tiny_encdec.encode(str(path)).shape == (1, 64, 8 * (-(-3 * SR // CHUNK)))


# --------------------------------------------------------------------------- attention mask
def test_chunked_causal_mask_blocks_exactly_chunk1_to_chunk2() -> None:
    from music2latent2.modules import chunked_causal_mask

    mask = chunked_causal_mask(2, 64)
    assert mask.shape == (128, 128)
    assert not mask[:64, 64:].any()  # chunk 1 queries never see chunk 2 keys
    assert mask[:64, :64].all() and mask[64:, :].all()


def test_attention_split_equals_masked_attention() -> None:
    from music2latent2.modules import SelfAttention, chunked_causal_mask

    torch.manual_seed(0)
    attn = SelfAttention(32, 4)
    x = torch.randn(3, 128, 32)
    got = attn(x, causal_chunks=2)
    b, n, d = x.shape
    q, k, v = attn.qkv(x).reshape(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=chunked_causal_mask(2, 64))
    ref = attn.proj(ref.transpose(1, 2).reshape(b, n, d))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # Perturbing chunk-2 tokens leaves chunk-1 outputs unchanged; perturbing chunk 1 changes chunk 2.
    x2 = x.clone()
    x2[:, 64:] += 1.0
    torch.testing.assert_close(attn(x2, causal_chunks=2)[:, :64], got[:, :64])
    x3 = x.clone()
    x3[:, :64] += 1.0
    assert not torch.allclose(attn(x3, causal_chunks=2)[:, 64:], got[:, 64:])


# --------------------------------------------------------------------------- precision
def test_bfloat16_autocast_runs_on_cpu(tiny_model: Music2Latent2, monkeypatch) -> None:
    encdec = EncoderDecoder(tiny_model, device="cpu", precision="bfloat16")
    x = _audio(2 * CHUNK)
    ref = EncoderDecoder(tiny_model, device="cpu").encode(x)
    seen = []
    for name in ("encode_chunks", "decoder_features", "denoise"):
        real = getattr(tiny_model, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen.append((_name, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(tiny_model, name, spy)
    z = encdec.encode(x)
    assert z.dtype == np.float32 and np.abs(z - ref).max() < 0.1
    y = encdec.decode(z, seed=0, length=CHUNK)
    assert y.shape == (1, CHUNK) and np.isfinite(y).all() and y.dtype == np.float32
    # Every network call, encode and decode alike, ran under bfloat16 autocast.
    assert {name for name, _, _ in seen} == {"encode_chunks", "decoder_features", "denoise"}
    assert all(enabled and dtype == torch.bfloat16 for _, enabled, dtype in seen), seen


# --------------------------------------------------------------------------- bad input
def test_bad_audio_inputs(tiny_encdec: EncoderDecoder, tmp_path) -> None:
    with pytest.raises(ValueError, match="empty"):
        tiny_encdec.encode(np.zeros(0, dtype=np.float32))
    with pytest.raises(ValueError, match="empty"):
        tiny_encdec.encode(np.zeros((2, 0), dtype=np.float32))
    bad = _audio(SR)
    bad[10] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        tiny_encdec.encode(bad)
    bad[10] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        tiny_encdec.encode(torch.from_numpy(bad))
    with pytest.raises(ValueError, match="shape"):
        tiny_encdec.encode(np.zeros((1, 1, 2, 100), dtype=np.float32))
    with pytest.raises(ValueError, match="not found"):
        tiny_encdec.encode(str(tmp_path / "missing.wav"))
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunk")
    with pytest.raises(ValueError, match="cannot read audio file"):
        tiny_encdec.encode(str(corrupt))
    with pytest.raises(TypeError):
        tiny_encdec.encode([0.0, 1.0])
    with pytest.raises(TypeError):
        tiny_encdec.encode(np.zeros(100, dtype=np.complex64))
    with pytest.raises(ValueError, match="sr"):
        tiny_encdec.encode(_audio(100), sr=0)


def test_bad_latent_inputs(tiny_encdec: EncoderDecoder) -> None:
    z = tiny_encdec.encode(_audio(CHUNK))
    with pytest.raises(ValueError, match="shape"):
        tiny_encdec.decode(z[0])  # missing channel axis
    with pytest.raises(ValueError, match="shape"):
        tiny_encdec.decode(np.zeros((1, 32, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="multiple of K"):
        tiny_encdec.decode(z[:, :, :5])
    nan = z.copy()
    nan[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        tiny_encdec.decode(nan)
    with pytest.raises(ValueError, match="length"):
        tiny_encdec.decode(z, length=CHUNK + 1)
    with pytest.raises(ValueError, match="length"):
        tiny_encdec.decode(z, length=0)
    with pytest.raises(TypeError):
        tiny_encdec.decode(z.astype(np.int32))
    with pytest.raises(ValueError, match="denoising_steps"):
        tiny_encdec.decode(z, denoising_steps=0)


def test_bad_constructor_arguments(tiny_model: Music2Latent2) -> None:
    with pytest.raises(ValueError, match="precision"):
        EncoderDecoder(tiny_model, device="cpu", precision="int8")
    with pytest.raises(ValueError, match="max_batch_size"):
        EncoderDecoder(tiny_model, device="cpu", max_batch_size=0)
