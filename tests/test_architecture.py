"""Package structure: no import cycles, training code kept apart, one home for chunk geometry,
and packaging metadata (one version, typed package)."""

from __future__ import annotations

import ast
import importlib.metadata
from pathlib import Path
from typing import Dict, List, Set

import pytest
import torch

import music2latent2
from music2latent2 import ModelConfig, Music2Latent2
from music2latent2.spectral import ChunkGeometry, OverlapAddStream, SpectralTransform

PACKAGE = Path(music2latent2.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> Set[str]:
    """Package modules a file imports anywhere in it (function-level imports included)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
            found.add(target)
            if not node.module:  # "from . import x": x may be a module
                found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("music2latent2"):
            found.add(str(node.module))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("music2latent2"))
    return found


def _graph() -> Dict[str, Set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in files and m != name} for name, path in files.items()}


def test_no_import_cycles() -> None:
    # Package __init__ files re-export their modules, so edges into a package __init__ are
    # followed too; a cycle anywhere (e.g. model -> checkpoint -> model) fails.
    graph = _graph()
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_training_code_is_imported_only_by_itself() -> None:
    for name, deps in _graph().items():
        if not name.startswith("music2latent2.training"):
            assert not [d for d in deps if d.startswith("music2latent2.training")], name


def test_network_checkpoint_and_hub_modules_know_only_their_part() -> None:
    graph = _graph()
    assert "music2latent2.model" not in graph["music2latent2.checkpoint"] | graph["music2latent2.hub"]
    assert "music2latent2.pretrained" not in graph["music2latent2.checkpoint"] | graph["music2latent2.hub"]
    assert {"music2latent2.checkpoint", "music2latent2.hub"}.isdisjoint(graph["music2latent2.model"])
    assert graph["music2latent2.manifest"] == set()  # the table of names is plain data


def test_chunk_geometry_numbers() -> None:
    g = ChunkGeometry.from_config(ModelConfig())
    assert (g.chunk_samples, g.chunk_frames, g.lead, g.overhang) == (32768, 64, 1024, 1536)
    assert (g.span(1), g.span(2)) == (34304, 67072)
    assert [g.num_chunks(n) for n in (0, 1, 32768, 32769)] == [1, 1, 1, 2]
    x = torch.arange(40000.0)[None]
    padded, chunks = g.pad(x)
    assert chunks == 2 and padded.shape[-1] == g.span(2)
    assert torch.equal(g.crop(padded, 40000), x)
    windows = g.windows(padded)  # (1, chunks, span)
    assert windows.shape == (1, 2, g.span(1)) and torch.equal(windows[0, 1], padded[0, 32768:32768 + g.span(1)])


@pytest.mark.parametrize("chunks", [1, 2, 5])
def test_overlap_add_stream_matches_the_whole_inverse(chunks: int) -> None:
    g = ChunkGeometry(chunk_samples=16 * 64, n_fft=256, hop_length=64)
    spectral = SpectralTransform(n_fft=256, hop_length=64, freq_bins=128)
    torch.manual_seed(0)
    spec = torch.randn(3, 4, 128, chunks * g.chunk_frames)  # (S, 2C, F, T): stereo
    whole = spectral.inverse(spec)  # (S, C, span(chunks))
    stream = OverlapAddStream(spectral, g, torch.device("cpu"))
    pieces = [stream.push(spec[..., t * g.chunk_frames:(t + 1) * g.chunk_frames]) for t in range(chunks)]
    streamed = torch.cat([*pieces, stream.flush()], dim=-1)
    assert all(p.shape == (3, 2, g.chunk_samples) for p in pieces)
    assert streamed.shape == whole.shape
    torch.testing.assert_close(streamed, whole, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="flush"):
        stream.flush()


def test_model_geometry_follows_its_config() -> None:
    config = ModelConfig.from_preset("tiny", n_fft=256, hop_length=64, freq_bins=128, chunk_frames=16)
    assert Music2Latent2(config).geometry == ChunkGeometry(1024, 256, 64)


def test_one_version_and_typed_package() -> None:
    assert importlib.metadata.version("music2latent2") == music2latent2.__version__
    assert (PACKAGE / "py.typed").is_file()
