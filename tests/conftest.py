"""Shared fixtures: tiny models with every weight random (no zero-initialised shortcuts)."""

from __future__ import annotations

import os

# Some VMs (this project's CI among them) advertise AMX in cpuid without enabling it, and
# oneDNN's AMX bf16 kernels then die with SIGILL. Capping oneDNN at AVX512-BF16 keeps the
# bfloat16 CPU tests running there; it must be set before the first oneDNN primitive is built.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")

import pytest  # noqa: E402
import torch  # noqa: E402

from music2latent2 import EncoderDecoder, ModelConfig, Music2Latent2  # noqa: E402


def make_tiny(audio_channels: int = 1, seed: int = 0) -> Music2Latent2:
    """A tiny model whose zero-initialised layers (AdaLN gates, last convs) are made random,
    so every path through the network actually carries signal."""
    torch.manual_seed(seed)
    model = Music2Latent2(ModelConfig.from_preset("tiny", audio_channels=audio_channels))
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and bool((p == 0).all()):
                p.normal_(0.0, 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module single-threaded: its tensors are small, and on a loaded 2-core machine
    spinning OpenMP threads slow every op down instead of speeding it up."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_model() -> Music2Latent2:
    return make_tiny()


@pytest.fixture(scope="session")
def tiny_encdec(tiny_model: Music2Latent2) -> EncoderDecoder:
    return EncoderDecoder(tiny_model, device="cpu", max_batch_size=4)


@pytest.fixture(scope="session")
def stereo_encdec() -> EncoderDecoder:
    return EncoderDecoder(make_tiny(audio_channels=2), device="cpu")
