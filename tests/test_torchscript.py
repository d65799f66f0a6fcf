"""TorchScript export for nn~ hosts: metadata, fixed latency, and equality with the eager model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import make_tiny

from music2latent2 import EncoderDecoder, Music2Latent2, StreamingDecoder
from music2latent2.cli import main
from music2latent2.torchscript import export_torchscript

CS, RATIO, LEAD = 32768, 4096, 1024

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_model: Music2Latent2) -> torch.jit.ScriptModule:
    path = export_torchscript(tiny_model, tmp_path_factory.mktemp("ts") / "tiny.ts")
    return torch.jit.load(str(path))


def _blockwise(method, x: torch.Tensor, block: int) -> torch.Tensor:
    return torch.cat([method(x[..., i:i + block]) for i in range(0, x.shape[-1], block)], -1)


def test_nn_tilde_metadata(exported: torch.jit.ScriptModule) -> None:
    assert exported.get_methods() == ["encode", "decode", "forward"] and exported.sample_rate == 44100
    assert exported.encode_params.tolist() == [1, 1, 64, RATIO]
    assert exported.decode_params.tolist() == [64, RATIO, 1, 1]
    assert exported.forward_params.tolist() == [1, 1, 1, 1]
    assert len(exported.encode_input_labels) == 1 and len(exported.encode_output_labels) == 64
    assert len(exported.decode_input_labels) == 64 and len(exported.decode_output_labels) == 1
    assert exported.get_attributes() == ["sigma_cond"] and exported.sigma_cond_params.tolist() == [2]
    assert exported.get_sigma_cond() == pytest.approx(0.4)
    assert exported.set_sigma_cond(-1.0) == -1 and exported.set_sigma_cond(0.3) == 0
    assert exported.get_sigma_cond() == pytest.approx(0.3)
    exported.set_sigma_cond(0.4)
    assert exported.encode_latency == CS and exported.decode_latency == LEAD + 7 * RATIO + CS
    # nn~'s own registration check: zeros of its test buffer size, batch 1 and 4 (mc.nn~).
    for method, channels, in_ratio, out_ratio, out_channels in (("encode", 1, 1, RATIO, 64),
                                                               ("decode", 64, RATIO, 1, 1),
                                                               ("forward", 1, 1, 1, 1)):
        for batch in (1, 4):
            exported.reset()
            y = getattr(exported, method)(torch.zeros(batch, channels, 8192 // in_ratio))
            assert y.shape == (batch, out_channels, 8192 // out_ratio) and y.dtype == torch.float32
    exported.reset()


def test_graphs_carry_no_device_constants(exported: torch.jit.ScriptModule) -> None:
    """nn~ moves the model to CUDA when it can: a traced `.to("cpu")` would break that."""
    graphs = [exported.encode.graph, exported.decode.graph]
    for name in ("chunk_encoder", "decoder_features", "denoise_one", "denoise_two", "synth"):
        graphs.append(getattr(exported, name).inlined_graph)
    for graph in graphs:
        assert not re.findall(r'Device = prim::Constant\[value="[^"]+"\]', str(graph))


@pytest.mark.parametrize("block", [RATIO, 4 * RATIO])
def test_encode_equals_eager_after_its_latency(exported: torch.jit.ScriptModule, tiny_encdec: EncoderDecoder,
                                               block: int) -> None:
    wav = torch.randn(2, 1, 20 * RATIO, generator=torch.Generator().manual_seed(0)) * 0.3  # mc: batch of 2
    exported.reset()
    frames = _blockwise(exported.encode, wav, block)  # (2, 64, 20)
    delay = exported.encode_latency // RATIO
    assert frames.shape == (2, 64, 20) and not frames[..., :delay].any()
    offline = tiny_encdec.encode(wav, normalize=False)[:, 0]  # (2, 64, 24); a live stream has no peak to normalise by
    torch.testing.assert_close(frames[..., delay:], offline[..., :20 - delay], atol=1e-5, rtol=0)
    with pytest.raises(Exception, match="multiple of the latent ratio"):
        exported.encode(torch.zeros(2, 1, 1000))
    exported.reset()


@pytest.mark.parametrize("block", [RATIO, 8 * RATIO])
def test_decode_equals_eager_after_its_latency(exported: torch.jit.ScriptModule, tiny_encdec: EncoderDecoder,
                                               block: int) -> None:
    z = torch.tanh(torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(1)))
    exported.reset()
    torch.manual_seed(3)  # the exported decoder draws from the global RNG, as decode() without a seed does
    audio = _blockwise(exported.decode, z, block // RATIO)  # (1, 1, 4 * CS)
    torch.manual_seed(3)
    offline = tiny_encdec.decode(z[None])[0]  # (1, 4 * CS)
    d = exported.decode_latency
    assert audio.shape == (1, 1, 4 * CS) and not audio[..., :d].any()
    assert torch.equal(audio[0, :, d:], offline[:, :4 * CS - d])
    exported.reset()


def test_sigma_cond_attribute_reaches_the_sampler(exported: torch.jit.ScriptModule,
                                                  tiny_encdec: EncoderDecoder) -> None:
    z = torch.tanh(torch.randn(1, 64, 24, generator=torch.Generator().manual_seed(8)))
    assert exported.set_sigma_cond(0.1) == 0
    exported.reset()
    torch.manual_seed(5)
    audio = exported.decode(z)  # (1, 1, 3 * CS)
    exported.set_sigma_cond(0.4)
    exported.reset()
    torch.manual_seed(5)
    offline = tiny_encdec.decode(z[None], sigma_cond=0.1)[0]
    d = exported.decode_latency
    assert torch.equal(audio[0, :, d:], offline[:, :3 * CS - d])
    torch.manual_seed(5)
    assert not torch.equal(offline, tiny_encdec.decode(z[None])[0])  # 0.1 and 0.4 do differ


def test_forward_round_trip_and_reset(exported: torch.jit.ScriptModule, tiny_encdec: EncoderDecoder) -> None:
    wav = torch.randn(1, 1, 40 * RATIO, generator=torch.Generator().manual_seed(2)) * 0.3
    exported.reset()
    torch.manual_seed(4)
    out = _blockwise(exported.forward, wav, 2 * RATIO)
    delay = exported.forward_latency
    assert delay == LEAD + 2 * CS < exported.encode_latency + exported.decode_latency
    torch.manual_seed(4)
    offline = tiny_encdec.decode(tiny_encdec.encode(wav[0], normalize=False))
    # Equal to float tolerance only: the encoder batches chunks differently (see test_streaming).
    torch.testing.assert_close(out[0, :, delay:], offline[:, :40 * RATIO - delay], atol=1e-4, rtol=1e-4)
    exported.reset()
    torch.manual_seed(4)
    assert torch.equal(_blockwise(exported.forward, wav, 2 * RATIO), out)  # reset: a fresh stream again


def test_low_latency_stereo_export_matches_streaming_decoder(tmp_path: Path) -> None:
    model = make_tiny(audio_channels=2)
    ts = torch.jit.load(str(export_torchscript(model, tmp_path / "stereo.ts", low_latency=True)))
    assert ts.encode_params.tolist() == [2, 1, 64, RATIO] and ts.decode_params.tolist() == [64, RATIO, 2, 1]
    assert ts.decode_latency == LEAD + 7 * RATIO
    z = torch.tanh(torch.randn(1, 64, 24, generator=torch.Generator().manual_seed(5)))
    torch.manual_seed(6)
    audio = _blockwise(ts.decode, z, 2)
    torch.manual_seed(6)
    dec = StreamingDecoder(EncoderDecoder(model, device="cpu"), low_latency=True)
    streamed = torch.cat([dec.push(z), dec.flush()], -1)  # (2, 3 * CS)
    d = ts.decode_latency
    assert torch.equal(audio[0, :, d:], streamed[:, :3 * CS - d])


def test_cli_export_torchscript(tmp_path: Path, tiny_model: Music2Latent2, capsys: pytest.CaptureFixture) -> None:
    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)
    out = tmp_path / "exported.ts"
    assert main(["export-torchscript", "-o", str(out), "--model", str(model_dir), "--low-latency"]) == 0
    assert torch.jit.load(str(out)).decode_latency == LEAD + 7 * RATIO
    before = out.read_bytes()
    assert main(["export-torchscript", "-o", str(out), "--model", str(model_dir)]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == before  # left untouched
    assert main(["export-torchscript", "-o", str(out), "--model", str(tmp_path / "missing"), "--overwrite"]) == 2
    assert "cannot load" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["export-torchscript", "-o", str(tmp_path), "--model", str(model_dir)]) == 2
    assert main(["export-torchscript", "-o", str(out), "--model", str(model_dir), "--overwrite"]) == 0
    assert torch.jit.load(str(out)).decode_latency == LEAD + 7 * RATIO + CS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported.ts", "model"]  # no temp files left
