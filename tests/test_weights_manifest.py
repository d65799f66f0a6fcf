"""weights_manifest.json (both copies), its validation, and scripts/publish_weights.py."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, Dict, List

import numpy as np
import pytest
import torch

from music2latent2 import ModelConfig, Music2Latent2
from music2latent2.checkpoint import ChecksumMismatchError
from music2latent2.manifest import PACKAGE_MANIFEST, available_models, load_manifest, parse_manifest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "publish_weights.py"
COMMIT = "3" * 40


def entry(**changes: Any) -> Dict[str, Any]:
    data = {"repo_id": "org/m", "revision": "a" * 40, "filename": "model.safetensors", "sha256": "b" * 64,
            "size": 10, "config": "small", "sample_rate": 44100, "channels": 1, "license": "MIT",
            "description": "x"}
    data.update(changes)
    return data


def test_top_level_and_packaged_manifests_are_identical() -> None:
    assert (ROOT / "weights_manifest.json").read_bytes() == PACKAGE_MANIFEST.read_bytes()
    manifest = load_manifest(PACKAGE_MANIFEST)
    # The default is a released model whose file ships in the package, with a matching sha256,
    # and the "nothing released" note is gone.
    assert manifest.default in manifest.models and "No pretrained weights" not in manifest.note
    assert available_models(PACKAGE_MANIFEST) == sorted(manifest.models)
    entry = manifest.models[manifest.default]
    bundled = manifest.bundled_dir / entry.bundled
    assert bundled.stat().st_size == entry.size
    assert hashlib.sha256(bundled.read_bytes()).hexdigest() == entry.sha256


@pytest.mark.parametrize("change, message", [
    ({"revision": "main"}, "revision must be a 40-character"),
    ({"sha256": "abc"}, "sha256 must be 64"),
    ({"size": "10"}, "'size' must be int"),
    ({"channels": 3}, "channels 1 or 2"),
    ({"bundled": "../evil.safetensors"}, "plain file name"),
    ({"extra": 1}, "unknown fields \\['extra'\\]"),
])
def test_invalid_entries_are_rejected(change: Dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_manifest({"manifest_version": 1, "default": None, "models": {"m": entry(**change)}}, "test.json")
    missing = entry()
    del missing["sha256"]
    with pytest.raises(ValueError, match="missing field 'sha256'"):
        parse_manifest({"manifest_version": 1, "models": {"m": missing}}, "test.json")


def test_manifest_level_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="default 'other' is not one of its models"):
        parse_manifest({"manifest_version": 1, "default": "other", "models": {"m": entry()}}, "t.json")
    with pytest.raises(ValueError, match="manifest_version 2"):
        parse_manifest({"manifest_version": 2, "models": {}}, "t.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_manifest(bad)
    ok = parse_manifest({"manifest_version": 1, "default": "m", "models": {"m": entry(bundled="m.safetensors")}}, "t")
    assert ok.models["m"].to_dict() == entry(bundled="m.safetensors")


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("publish_weights", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(2)
    return Music2Latent2(ModelConfig.from_preset("tiny")).save_pretrained(tmp_path_factory.mktemp("pub"))


def copy_manifests(tmp_path: Path) -> List[Path]:
    paths = [tmp_path / "top" / "weights_manifest.json", tmp_path / "pkg" / "weights_manifest.json"]
    for p in paths:
        p.parent.mkdir(parents=True)
        p.write_bytes(PACKAGE_MANIFEST.read_bytes())
    return paths


def test_publish_no_upload_writes_both_manifests(checkpoint: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    top, pkg = copy_manifests(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(SCRIPT), str(checkpoint.parent), "--name", "tiny-test", "--repo-id", "org/tiny",
           "--description", "tiny test weights", "--default", "--bundle", "--no-upload", "--revision", COMMIT,
           "--manifest", str(top), "--manifest", str(pkg)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert top.read_bytes() == pkg.read_bytes()
    data = json.loads(top.read_text())
    assert data["default"] == "tiny-test"
    got = data["models"]["tiny-test"]
    raw = checkpoint.read_bytes()
    assert got == {"repo_id": "org/tiny", "revision": COMMIT, "filename": "model.safetensors",
                   "sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw), "config": "tiny",
                   "sample_rate": 44100, "channels": 1, "license": "MIT", "description": "tiny test weights",
                   "bundled": "tiny-test.safetensors"}
    assert json.loads(done.stdout) == {"tiny-test": got}
    assert (pkg.parent / "weights" / "tiny-test.safetensors").read_bytes() == raw
    # The entry it wrote resolves offline through the bundled copy, with its sha256 checked.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    model = Music2Latent2.from_pretrained(None, manifest=pkg)
    assert model.config == ModelConfig.from_preset("tiny")

    # Refuses a broken checkpoint and a --no-upload without a pinned revision.
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(raw[:1000])
    script = load_script()
    for args, why in (([str(broken), "--no-upload", "--revision", COMMIT], "unloadable checkpoint"),
                      ([str(checkpoint), "--no-upload"], "needs --revision")):
        with pytest.raises(SystemExit, match=why):
            script.main([*args, "--name", "x", "--repo-id", "org/x", "--description", "d", "--manifest", str(top)])
    assert json.loads(top.read_text()) == data  # unchanged by the failed runs


def test_publish_upload_pins_the_returned_commit(checkpoint: Path, tmp_path: Path) -> None:
    script = load_script()
    calls: List[Any] = []

    class FakeApi:
        def create_repo(self, **kwargs: Any) -> None:
            calls.append(("create_repo", kwargs))

        def upload_file(self, **kwargs: Any) -> SimpleNamespace:
            calls.append(("upload_file", kwargs))
            return SimpleNamespace(oid="c" * 40)

    top, pkg = copy_manifests(tmp_path)
    default_before = load_manifest(pkg).default
    rc = script.main([str(checkpoint), "--name", "tiny-up", "--repo-id", "org/up", "--description", "d",
                      "--license", "CC-BY-4.0", "--manifest", str(top), "--manifest", str(pkg)], api=FakeApi())
    assert rc == 0
    assert [name for name, _ in calls] == ["create_repo", "upload_file"]
    assert calls[0][1]["repo_id"] == "org/up" and calls[0][1]["exist_ok"] is True
    assert calls[1][1]["path_in_repo"] == "model.safetensors" and calls[1][1]["path_or_fileobj"] == str(checkpoint)
    manifest = load_manifest(pkg)
    assert manifest.default == default_before  # --default was not given: unchanged
    assert manifest.models["tiny-up"].revision == "c" * 40 and manifest.models["tiny-up"].license == "CC-BY-4.0"
    assert top.read_bytes() == pkg.read_bytes()
    assert script.infer_preset(ModelConfig.from_preset("small", latent_scale=2.0)) == "small"
    assert script.infer_preset(ModelConfig.from_preset("tiny", depth=3)) == "custom"
    probe = tmp_path / "probe"
    probe.touch()  # manifests get ordinary permissions, not a temp file's private 0600
    assert pkg.stat().st_mode & 0o777 == probe.stat().st_mode & 0o777


def test_publish_failed_upload_leaves_no_bundle(checkpoint: Path, tmp_path: Path) -> None:
    script = load_script()

    class BrokenApi:
        def create_repo(self, **kwargs: Any) -> None:
            pass

        def upload_file(self, **kwargs: Any) -> SimpleNamespace:
            raise ConnectionError("network down")

    top, pkg = copy_manifests(tmp_path)
    before = pkg.read_bytes()
    with pytest.raises(ConnectionError):
        script.main([str(checkpoint), "--name", "tiny-up", "--repo-id", "org/up", "--description", "d",
                     "--bundle", "--manifest", str(top), "--manifest", str(pkg)], api=BrokenApi())
    assert not (pkg.parent / "weights").exists() or not any((pkg.parent / "weights").iterdir())
    assert pkg.read_bytes() == before


def test_loaded_model_records_its_source(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The model knows which checkpoint it is (name, sha256), so the CLI records it in .m2l files
    # without re-hashing the file or re-reading the manifest.
    from music2latent2 import cli, load_latents

    data = checkpoint.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    pkg = tmp_path / "pkg" / "weights_manifest.json"
    (pkg.parent / "weights").mkdir(parents=True)
    (pkg.parent / "weights" / "t.safetensors").write_bytes(data)
    pkg.write_text(json.dumps({"manifest_version": 1, "default": "t", "models": {
        "t": entry(repo_id=None, revision=None, bundled="t.safetensors", sha256=digest, size=len(data))}}))
    named = Music2Latent2.from_pretrained("t", manifest=pkg).source
    assert named is not None and (named.name, named.sha256, named.repo_id) == ("t", digest, None)
    assert named.path == pkg.parent / "weights" / "t.safetensors"
    with pytest.raises(ChecksumMismatchError, match="the manifest pins the other one"):
        Music2Latent2.from_pretrained("t", manifest=pkg, sha256="0" * 64)
    with pytest.raises(ValueError, match="sha256 must be 64 hex"):
        Music2Latent2.from_pretrained("t", manifest=pkg, sha256="abc")
    default = Music2Latent2.from_pretrained(manifest=pkg).source
    assert default is not None and (default.name, default.sha256) == ("default:t", digest)
    local = Music2Latent2.from_pretrained(checkpoint.parent).source
    assert local is not None and (local.name, local.sha256, local.path) == (str(checkpoint.parent), digest, checkpoint)
    assert Music2Latent2(ModelConfig.from_preset("tiny")).source is None  # built in memory

    monkeypatch.setenv("MUSIC2LATENT2_MANIFEST", str(pkg))
    import soundfile as sf

    from music2latent2 import hub

    hashed: List[Path] = []
    real = hub.sha256_file
    monkeypatch.setattr(hub, "sha256_file", lambda path: (hashed.append(Path(path)), real(path))[1])

    sf.write(tmp_path / "in.wav", np.zeros((4410, 1), np.float32), 44100)
    assert cli.main(["encode", str(tmp_path / "in.wav"), "-o", str(tmp_path / "out"), "--device", "cpu", "-q"]) == 0
    _, meta = load_latents(tmp_path / "out" / "in.m2l")
    assert (meta.model_name, meta.model_sha256) == ("default:t", digest)
    assert hashed == [pkg.parent / "weights" / "t.safetensors"]  # hashed once, while loading


def test_bundle_only_entry_loads_without_network(checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    # Not on the Hub yet: repo_id and revision are null, the file ships in the package, and
    # resolving it never calls the Hub (the download function would raise if it were called).
    import huggingface_hub

    from music2latent2.hub import WeightsNotAvailableError

    publish_main = load_script().main
    top, pkg = tmp_path / "top" / "weights_manifest.json", tmp_path / "pkg" / "weights_manifest.json"
    for m in (top, pkg):
        m.parent.mkdir(parents=True)
        m.write_text(json.dumps({"manifest_version": 1, "default": None, "models": {}}))
    assert publish_main([str(checkpoint), "--name", "only-here", "--description", "bundled", "--default",
                         "--bundle-only", "--manifest", str(top), "--manifest", str(pkg)]) == 0
    entry = json.loads(pkg.read_text())["models"]["only-here"]
    assert entry["repo_id"] is None and entry["revision"] is None and entry["bundled"] == "only-here.safetensors"

    def no_network(*args, **kwargs):
        raise AssertionError("the Hub must not be asked for a bundled checkpoint")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    model = Music2Latent2.from_pretrained(None, manifest=pkg)
    assert model.num_parameters() > 0
    (pkg.parent / "weights" / "only-here.safetensors").unlink()
    with pytest.raises(WeightsNotAvailableError, match="(?s)not published there.*reinstall"):
        Music2Latent2.from_pretrained(None, manifest=pkg)
    with pytest.raises(SystemExit, match="bundle-only takes no"):
        publish_main([str(checkpoint), "--name", "x", "--description", "d", "--bundle-only", "--repo-id", "a/b",
                      "--manifest", str(top)])
    with pytest.raises(ValueError, match="both be set"):
        parse_manifest({"manifest_version": 1, "models": {"m": dict(entry, revision="0" * 40)}}, "t")
    with pytest.raises(ValueError, match="must be bundled"):
        parse_manifest({"manifest_version": 1, "models": {"m": {k: v for k, v in entry.items() if k != "bundled"}}},
                       "t")
