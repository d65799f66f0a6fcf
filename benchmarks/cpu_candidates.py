"""Ways to run the decoder on a CPU that benchmarks/streaming.py measures beside the default path.

- :func:`before_cpu_speedups`: the decoding path before the exact CPU speed-ups (upsampling as a
  pixel shuffle, NCHW layout, every window de-patchified whole), rebuilt here so that one run can
  time both.
- :func:`bfloat16_codec`: the library's own ``precision="bfloat16"`` (CPU autocast).
- :func:`compiled_codec`: ``torch.compile`` (inductor, weights frozen into the graph).
- :func:`onnxruntime_codec`: the decoder's two networks exported to ONNX and run by ONNX Runtime
  (the ``onnx`` extra), plugged into the library's own sampler and streaming classes.

Nothing here is part of the package: these are measurements, and docs/streaming.md says which of
them the library adopted and why.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence

import torch

import music2latent2.inference as inference_module
import music2latent2.torchscript as torchscript_module
from music2latent2 import EncoderDecoder
from music2latent2.model import ConsistencyModel, Music2Latent2

__all__ = ["before_cpu_speedups", "bfloat16_codec", "compiled_codec", "onnxruntime_codec"]


@contextlib.contextmanager
def before_cpu_speedups() -> Iterator[None]:
    """Inside the block, codecs and nn~ exports built are the ones before the CPU speed-ups: the
    model keeps its default layout (pixel-shuffle upsampling, NCHW) and ``last_only`` evaluates
    the whole window, then keeps its last chunk (what the sampler computed before it could skip
    the context's de-patchifier)."""
    forward = ConsistencyModel.forward

    def whole_window(self: ConsistencyModel, x_noisy: torch.Tensor, sigma: torch.Tensor,
                     cross: Sequence[torch.Tensor], last_only: bool = False) -> torch.Tensor:
        out = forward(self, x_noisy, sigma, cross)
        return out[:, -1:] if last_only else out

    def default_layout(model: Music2Latent2, enabled: bool = True) -> Music2Latent2:
        return model  # pixel-shuffle upsampling, NCHW weights and activations

    patches = [(ConsistencyModel, "forward", whole_window),
               (inference_module, "optimize_for_cpu", default_layout),
               (torchscript_module, "optimize_for_cpu", default_layout)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def bfloat16_codec(model: Optional[str]) -> EncoderDecoder:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the no-native-bfloat16 warning: the benchmark reports the speed
        return EncoderDecoder(model, device="cpu", precision="bfloat16")


def compiled_codec(model: Optional[str]) -> EncoderDecoder:
    """``torch.compile`` with frozen weights (inductor then pre-packs them for oneDNN); one row per
    model call, so the streaming decoder's shapes never change."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    return EncoderDecoder(model, device="cpu", compile=True, max_batch_size=1)


class _OnnxNetworks:
    """Stands in for :class:`Music2Latent2` where the sampler calls it: ``decoder_features`` and
    ``denoise`` run ONNX Runtime sessions (graphs of batch 1, run once per sequence); the rest is
    the torch model's."""

    def __init__(self, model: Music2Latent2, threads: int) -> None:
        import onnxruntime as ort

        self.model, self.config = model, model.config
        self.spectral, self.geometry = model.spectral, model.geometry
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        cfg = model.config
        latents = torch.zeros(1, cfg.summary_tokens, cfg.latent_dim)
        with torch.no_grad():
            cross = model.decoder_features(latents)
        spec = torch.zeros(1, 1, cfg.spec_channels, cfg.freq_bins, cfg.chunk_frames)
        pair = [torch.cat([c, c]) for c in cross]
        with tempfile.TemporaryDirectory() as tmp:
            self.decoder = self._session(ort, options, _Decoder(model), (latents,), Path(tmp) / "d.onnx")
            self.one = self._session(ort, options, _Denoise(model, False), (spec, torch.ones(1, 1), *cross),
                                     Path(tmp) / "1.onnx")
            self.two = self._session(ort, options, _Denoise(model, False),
                                     (torch.cat([spec, spec], 1), torch.ones(1, 2), *pair), Path(tmp) / "2.onnx")
            self.last = self._session(ort, options, _Denoise(model, True),
                                      (torch.cat([spec, spec], 1), torch.ones(1, 2), *pair), Path(tmp) / "l.onnx")

    @staticmethod
    def _session(ort: Any, options: Any, module: torch.nn.Module, example: tuple, path: Path) -> Any:
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(module.eval(), example, str(path), dynamo=True, opset_version=18)
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    @staticmethod
    def _run(session: Any, *inputs: torch.Tensor) -> List[torch.Tensor]:
        names = [i.name for i in session.get_inputs()]
        outs = session.run(None, {n: t.detach().float().contiguous().numpy() for n, t in zip(names, inputs)})
        return [torch.from_numpy(o) for o in outs]

    def decoder_features(self, latents: torch.Tensor) -> List[torch.Tensor]:
        rows = [self._run(self.decoder, latents[i:i + 1]) for i in range(latents.shape[0])]  # graphs of batch 1
        return [torch.cat(level) for level in zip(*rows)]

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cross: Sequence[torch.Tensor],
                last_only: bool = False) -> torch.Tensor:
        w = x.shape[1]
        session = self.one if w == 1 else (self.last if last_only else self.two)
        return torch.cat([self._run(session, x[i:i + 1], sigma[i:i + 1], *[c[i * w:(i + 1) * w] for c in cross])[0]
                          for i in range(x.shape[0])])  # one window at a time: graphs of batch 1


class _Decoder(torch.nn.Module):
    def __init__(self, model: Music2Latent2) -> None:
        super().__init__()
        self.decoder = model.decoder

    def forward(self, latents: torch.Tensor) -> tuple:
        return tuple(self.decoder(latents))


class _Denoise(torch.nn.Module):
    def __init__(self, model: Music2Latent2, last_only: bool) -> None:
        super().__init__()
        self.consistency, self.last_only = model.consistency, last_only

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, *cross: torch.Tensor) -> torch.Tensor:
        return self.consistency(x, sigma, list(cross), last_only=self.last_only)


def onnxruntime_codec(model: Optional[str], threads: int) -> EncoderDecoder:
    """A float32 codec whose decoder networks run in ONNX Runtime."""
    codec = EncoderDecoder(model, device="cpu")
    codec.model = _OnnxNetworks(codec.model, threads)  # type: ignore[assignment]
    return codec
