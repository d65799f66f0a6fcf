"""ONNX export of the encoder, run with onnxruntime against the eager encoder."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from music2latent2 import EncoderDecoder, Music2Latent2
from music2latent2.cli import main
from music2latent2.model import optimize_for_cpu
from music2latent2.onnx_export import export_onnx_encoder

ort = pytest.importorskip("onnxruntime")  # installed with the dev extra, so CI runs these


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory, tiny_model: Music2Latent2) -> Path:
    return export_onnx_encoder(tiny_model, tmp_path_factory.mktemp("onnx") / "encoder.onnx")


def test_onnx_encoder_equals_encode(onnx_file: Path, tiny_model: Music2Latent2) -> None:
    # The reference is the network in its default layout: the CPU layout EncoderDecoder picks
    # rounds differently again (tests/test_cpu_decode.py), and this random tiny model amplifies
    # rounding differences, so both differences at once would not show what the export does.
    tiny_encdec = EncoderDecoder(optimize_for_cpu(copy.deepcopy(tiny_model), enabled=False), device="cpu",
                                 optimize_cpu=False)
    session = ort.InferenceSession(str(onnx_file))
    assert [i.name for i in session.get_inputs()] == ["audio"]
    assert [o.name for o in session.get_outputs()] == ["latents", "features"]
    for samples in (20_000, 100_000):  # 1 and 4 chunks: the chunk axis is dynamic
        wav = torch.randn(1, samples, generator=torch.Generator().manual_seed(samples)) * 0.3
        padded, chunks = tiny_model.geometry.pad(wav)
        windows = tiny_model.geometry.windows(padded).transpose(0, 1).contiguous()  # (chunks, 1, 34304)
        latents, features = session.run(None, {"audio": windows.numpy()})
        assert latents.shape == (chunks, 8, 64) and features.shape == (chunks, 8, 32)
        z = tiny_encdec.encode(wav, normalize=False)[0]  # (64, 8 * chunks); the graph is the network alone
        f = tiny_encdec.encode(wav, extract_features=True, normalize=False)[0]  # (8 * 32, chunks)
        # onnxruntime's kernels round differently from PyTorch's: equal to float32 tolerance.
        np.testing.assert_allclose(latents.reshape(-1, 64).T, z.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(features.reshape(chunks, -1).T, f.numpy(), atol=1e-4, rtol=0)


def test_export_onnx_cli_and_missing_extra(tmp_path: Path, tiny_model: Music2Latent2, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)
    out = tmp_path / "enc.onnx"
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if the onnx extra were not installed
    assert main(["export-onnx", "-o", str(out), "--model", str(model_dir)]) == 2
    assert "pip install 'music2latent2[onnx]'" in capsys.readouterr().err and not out.exists()
    monkeypatch.undo()
    with pytest.raises(ValueError, match="opset"):
        export_onnx_encoder(tiny_model, out, opset=16)
    assert main(["export-onnx", "-o", str(out), "--model", str(model_dir)]) == 0
    session = ort.InferenceSession(str(out))
    # Not silence: on an all-zero window this random tiny model amplifies rounding differences
    # (its GroupNorms see constant maps) to ~0.04; the trained small checkpoint agrees to 1e-5 there.
    window = torch.randn(1, 1, 34304, generator=torch.Generator().manual_seed(0)) * 0.3
    latents, _ = session.run(None, {"audio": window.numpy()})
    saved = Music2Latent2.from_pretrained(model_dir)  # as stored (save_pretrained may round the weights)
    with torch.no_grad():
        expected = saved.encoder(saved.spectral(window))[0].numpy()
    np.testing.assert_allclose(latents, expected, atol=1e-4, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc.onnx", "model"]
