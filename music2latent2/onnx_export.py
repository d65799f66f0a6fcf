"""ONNX export of the encoder: audio chunk windows in, latents and MIR features out.

Only the encoder is exported: it is one feed-forward pass per chunk, so any ONNX runtime can
encode a dataset or a live stream with it. The decoder is a sampler loop around three networks
(paper IV-4) and stays in Python (:class:`~music2latent2.inference.EncoderDecoder`) or in the
TorchScript export (:mod:`music2latent2.torchscript`).

The graph takes ``audio`` windows (N, audio_channels, 34,304) float32, N dynamic, and returns
``latents`` (N, K, latent_dim) as :meth:`EncoderDecoder.encode` scales them and ``features``
(N, K, dim). The window of chunk t holds original samples ``t * 32768 - 1024`` up to
``(t + 1) * 32768 + 512``, zeros outside the signal (:meth:`ChunkGeometry.pad` then
:meth:`ChunkGeometry.windows` cut them). Chunk t's latents are frames ``8t .. 8t+7`` of
``encode``'s output. Export needs the ``onnx`` extra (onnx and onnxscript; onnxruntime runs it).

The graph is the network alone: it does not level-normalise. To get what ``encode`` gives, scale
the audio first by the gain that brings its peak to ``config.input_peak_db`` dBFS
(:func:`music2latent2.levels.normalization_gain`), as ``encode(normalize=True)`` does; to get
``encode(normalize=False)``, feed it as it is.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Union

import torch

from .fileio import atomic_write
from .model import Music2Latent2
from .torchscript import ChunkEncoder

__all__ = ["export_onnx_encoder", "ONNX_OPSET"]

ONNX_OPSET = 18  # the dynamo exporter's default; STFT is an ONNX op since opset 17


def export_onnx_encoder(model: Union[Music2Latent2, str, os.PathLike, None], path: Union[str, os.PathLike],
                        opset: int = ONNX_OPSET) -> Path:
    """Write the encoder as an ONNX graph (see the module docstring for its inputs and outputs).

    Args:
        model: a :class:`Music2Latent2`, or anything :meth:`Music2Latent2.from_pretrained` loads.
        path: the ``.onnx`` file to write; written to a temp file and renamed, so an existing file
            is replaced only by a complete export.
        opset: ONNX opset version (>= 17 for the STFT).

    Returns:
        The path written.
    """
    try:
        import onnx  # noqa: F401 - the exporter needs both; say which extra is missing up front
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ImportError(f"ONNX export needs onnx and onnxscript: pip install 'music2latent2[onnx]' ({err})") from err
    if opset < 17:
        raise ValueError(f"opset must be >= 17 (the first with an STFT operator), got {opset}")
    if not isinstance(model, Music2Latent2):
        model = Music2Latent2.from_pretrained(model)
    cfg = model.config
    module = ChunkEncoder(model, features=True).eval()
    if next(module.parameters()).dtype != torch.float32 or model.device.type != "cpu":
        raise ValueError("export a float32 model on the CPU (model.float().cpu())")
    example = torch.zeros(2, cfg.audio_channels, model.geometry.span(1))
    batch = torch.export.Dim("chunks", min=1)
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    # The exporter prints progress, and logs a warning per optional torchvision op it skips.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        onnx_logger.setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(module, (example,), dynamo=True, opset_version=opset,
                                        input_names=["audio"], output_names=["latents", "features"],
                                        dynamic_shapes={"wav": {0: batch}}, verbose=False)
        finally:
            onnx_logger.setLevel(level)
    assert program is not None
    return atomic_write(path, lambda tmp: program.save(tmp))
