"""Pretrained-weight resolution and publishing against a local fake Hub, driven by the real
huggingface_hub client.

A ThreadingHTTPServer on 127.0.0.1 answers ``HEAD``/``GET {endpoint}/{repo}/resolve/{rev}/{file}``
with the headers hf_hub_download needs (X-Repo-Commit, ETag, Content-Length), resolving branch
names through ``refs``, and can serve wrong bytes, drop the connection mid-file, or report an
unknown revision. For ``push_to_hub`` it answers the calls of ``HfApi.create_repo`` +
``create_commit`` with regular (non-LFS) files: repo creation, model-card validation, preupload
and the ndjson commit.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Iterator, List, Tuple
from urllib.parse import urlsplit

import pytest
import torch

from music2latent2 import EncoderDecoder, ModelConfig, Music2Latent2
from music2latent2.checkpoint import ChecksumMismatchError
from music2latent2.hub import WeightsNotAvailableError, resolve
from music2latent2.manifest import MANIFEST_ENV, load_manifest

REPO = "test-org/m2l2-tiny"
COMMIT = hashlib.sha1(b"m2l2 test commit").hexdigest()
NAME = "tiny-test"
PACKAGE_DIR = Path(__file__).resolve().parent.parent / "music2latent2"


class FakeHub:
    """State shared with the request handler: served files, failure mode, request log."""

    def __init__(self) -> None:
        self.files: Dict[Tuple[str, str, str], bytes] = {}
        self.refs: Dict[Tuple[str, str], str] = {}  # (repo, branch) -> commit
        self.endpoint = ""
        self.mode = "ok"  # "ok" or "drop" (GET bodies are cut off half-way)
        self.requests: List[Tuple[str, str]] = []


class Handler(BaseHTTPRequestHandler):
    server: HubServer

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output quiet
        pass

    def _find(self) -> Tuple[int, Dict[str, str], bytes]:
        hub = self.server.hub
        hub.requests.append((self.command, self.path))
        parts = urlsplit(self.path).path.lstrip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return 404, {"X-Error-Code": "RepoNotFound"}, b""
        repo, rev, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        rev = hub.refs.get((repo, rev), rev)
        repos = {key[0] for key in hub.files}
        if repo not in repos:
            return 404, {"X-Error-Code": "RepoNotFound"}, b""
        if not any(key[:2] == (repo, rev) for key in hub.files):
            return 404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}, b""
        data = hub.files.get((repo, rev, filename))
        if data is None:
            return 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": rev}, b""
        headers = {"X-Repo-Commit": rev, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Content-Length": str(len(data)), "Content-Type": "application/octet-stream"}
        return 200, headers, data

    def _head(self, status: int, headers: Dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self) -> None:
        status, headers, _ = self._find()
        self._head(status, headers)

    def do_GET(self) -> None:
        status, headers, data = self._find()
        if self.server.hub.mode == "drop" and status == 200:
            if self.headers.get("Range") is None:
                # Promise the whole file, send half, hang up: the client sees a truncated body.
                self._head(status, headers)
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
            # Resume attempts (Range requests) get no answer at all.
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._head(status, headers)
        self.wfile.write(data)


    def _json(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self._head(status, {"Content-Type": "application/json", "Content-Length": str(len(data))})
        self.wfile.write(data)

    def do_POST(self) -> None:
        hub = self.server.hub
        hub.requests.append((self.command, self.path))
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        parts = urlsplit(self.path).path.strip("/").split("/")
        if parts[:3] == ["api", "repos", "create"]:
            request = json.loads(body)  # {"name": ..., "organization": ...}
            return self._json(200, {"url": f"{hub.endpoint}/{request['organization']}/{request['name']}"})
        if parts == ["api", "validate-yaml"]:  # the client checks a README's metadata before committing it
            return self._json(200, {"warnings": []})
        if parts[:2] != ["api", "models"] or len(parts) < 6:
            return self._json(404, {"error": "unknown endpoint"})
        repo, action, branch = "/".join(parts[2:4]), parts[4], "/".join(parts[5:])
        if action == "preupload":
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                     for f in json.loads(body)["files"]]
            return self._json(200, {"files": files})
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        added = {item["value"]["path"]: base64.b64decode(item["value"]["content"])
                 for item in lines if item["key"] == "file"}
        commit = hashlib.sha1(body).hexdigest()
        parent = hub.refs.get((repo, branch))
        for (r, c, name), data in list(hub.files.items()):  # a commit keeps the files it does not replace
            if (r, c) == (repo, parent) and name not in added:
                hub.files[(repo, commit, name)] = data
        for name, data in added.items():
            hub.files[(repo, commit, name)] = data
        hub.refs[(repo, branch)] = commit
        self._json(200, {"commitUrl": f"{hub.endpoint}/{repo}/commit/{commit}", "commitOid": commit,
                         "pullRequestUrl": None})


class HubServer(ThreadingHTTPServer):
    daemon_threads = True
    hub: FakeHub


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Music2Latent2, bytes]:
    torch.manual_seed(0)
    model = Music2Latent2(ModelConfig.from_preset("tiny")).eval()
    path = model.save_pretrained(tmp_path_factory.mktemp("ckpt"))
    return model, path.read_bytes()


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_checkpoint: Tuple[Music2Latent2, bytes]
        ) -> Iterator[Tuple[FakeHub, Path]]:
    """Serve the tiny checkpoint; point HF_ENDPOINT/HF_HOME and the manifest at temporary places."""
    from huggingface_hub import constants

    fake = FakeHub()
    fake.files[(REPO, COMMIT, "model.safetensors")] = tiny_checkpoint[1]
    fake.refs[(REPO, "main")] = COMMIT
    server = HubServer(("127.0.0.1", 0), Handler)
    server.hub = fake
    fake.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # in case the outer environment set it
    monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    manifest = write_manifest(tmp_path / "manifest" / "weights_manifest.json", tiny_checkpoint[1])
    monkeypatch.setenv(MANIFEST_ENV, str(manifest))
    try:
        yield fake, tmp_path / "hf-home" / "hub"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def write_manifest(path: Path, data: bytes, revision: str = COMMIT, bundled: str | None = None) -> Path:
    entry = {"repo_id": REPO, "revision": revision, "filename": "model.safetensors",
             "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "config": "tiny",
             "sample_rate": 44100, "channels": 1, "license": "MIT", "description": "test weights"}
    if bundled is not None:
        entry["bundled"] = bundled
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"manifest_version": 1, "default": NAME, "models": {NAME: entry}}))
    return path


def cached_files(cache: Path) -> List[Path]:
    return sorted(p for p in cache.rglob("*") if p.is_file() and ".locks" not in p.parts and p.name != "CACHEDIR.TAG"
                  and "refs" not in p.parts)


def assert_same_weights(a: Music2Latent2, b: Music2Latent2) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_download_then_offline_from_cache(hub, tiny_checkpoint, monkeypatch) -> None:
    fake, cache = hub
    before = sorted(p.name for p in PACKAGE_DIR.rglob("*") if "__pycache__" not in p.parts)
    model = Music2Latent2.from_pretrained(NAME)
    assert_same_weights(model, tiny_checkpoint[0])
    assert [m for m, _ in fake.requests] == ["HEAD", "GET"]
    snapshot = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT / "model.safetensors"
    assert snapshot.is_file() and snapshot.read_bytes() == tiny_checkpoint[1]
    # Nothing is ever written beside the package.
    assert sorted(p.name for p in PACKAGE_DIR.rglob("*") if "__pycache__" not in p.parts) == before

    fake.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encdec = EncoderDecoder(NAME, device="cpu")  # manifest name through the public API
    assert_same_weights(encdec.model, tiny_checkpoint[0])
    assert_same_weights(EncoderDecoder(device="cpu").model, tiny_checkpoint[0])  # None = manifest default
    assert fake.requests == []


def test_corrupt_download_is_rejected_and_not_cached(hub, tiny_checkpoint) -> None:
    fake, cache = hub
    good = tiny_checkpoint[1]
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    fake.files[(REPO, COMMIT, "model.safetensors")] = bytes(bad)
    with pytest.raises(ChecksumMismatchError) as info:
        Music2Latent2.from_pretrained(NAME)
    msg = str(info.value)
    assert hashlib.sha256(good).hexdigest() in msg and hashlib.sha256(bad).hexdigest() in msg
    assert "model.safetensors" in msg and "deleted from the Hugging Face cache" in msg
    assert cached_files(cache) == []  # neither the snapshot link nor the blob survives

    fake.files[(REPO, COMMIT, "model.safetensors")] = good
    fake.requests.clear()
    assert_same_weights(Music2Latent2.from_pretrained(NAME), tiny_checkpoint[0])
    assert ("GET" in [m for m, _ in fake.requests])


def test_corrupted_cache_entry_is_detected_and_refetched(hub, tiny_checkpoint) -> None:
    fake, cache = hub
    path = resolve(NAME).path
    blob = path.resolve()
    data = bytearray(blob.read_bytes())
    data[100] ^= 0x01
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match=hashlib.sha256(bytes(data)).hexdigest()):
        Music2Latent2.from_pretrained(NAME)
    assert not path.exists() and not blob.exists()
    fake.requests.clear()
    assert_same_weights(Music2Latent2.from_pretrained(NAME), tiny_checkpoint[0])
    assert [m for m, _ in fake.requests] == ["HEAD", "GET"]


def test_dropped_connection_errors_then_retry_succeeds(hub, tiny_checkpoint, monkeypatch) -> None:
    fake, cache = hub
    fake.mode = "drop"
    real_sleep = time.sleep
    # huggingface_hub waits 1 s between its resume attempts; skip the waiting, not the attempts.
    monkeypatch.setattr(time, "sleep", lambda s: real_sleep(0))
    with pytest.raises(WeightsNotAvailableError) as info:
        Music2Latent2.from_pretrained(NAME)
    msg = str(info.value)
    assert f"/{REPO}/resolve/{COMMIT}/model.safetensors" in msg and "HF_HUB_OFFLINE" in msg
    assert cached_files(cache) == []  # no partial download is kept
    assert len([m for m, _ in fake.requests if m == "GET"]) >= 2  # the client did try to resume

    fake.mode = "ok"
    assert_same_weights(Music2Latent2.from_pretrained(NAME), tiny_checkpoint[0])


def test_wrong_revision_is_a_clear_error(hub, tiny_checkpoint, tmp_path) -> None:
    wrong = "0" * 40
    manifest = write_manifest(tmp_path / "wrong" / "weights_manifest.json", tiny_checkpoint[1], revision=wrong)
    with pytest.raises(WeightsNotAvailableError, match=f"pinned revision {wrong} does not exist in {REPO}") as info:
        Music2Latent2.from_pretrained(NAME, manifest=manifest)
    assert "Hub answered but has no such file" in str(info.value)


def test_unreachable_hub_without_cache_says_what_was_tried(hub, monkeypatch) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    real_sleep = time.sleep
    monkeypatch.setattr(time, "sleep", lambda s: real_sleep(0))  # huggingface_hub backs off up to ~23 s
    with pytest.raises(WeightsNotAvailableError) as info:
        Music2Latent2.from_pretrained(NAME)
    msg = str(info.value)
    assert f"Hugging Face Hub http://127.0.0.1:{port}/{REPO}/resolve/{COMMIT}/model.safetensors" in msg
    assert "bundled in the package: this entry has none" in msg and "HF_HUB_OFFLINE=1" in msg


def test_offline_without_cache_says_what_was_tried(hub, monkeypatch) -> None:
    fake, _ = hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotAvailableError) as info:
        EncoderDecoder(NAME, device="cpu")
    msg = str(info.value)
    assert "Tried:" in msg and "not in the cache, and offline mode forbids downloading" in msg
    assert "bundled in the package: this entry has none" in msg
    assert "unset HF_HUB_OFFLINE" in msg and "pass its path" in msg
    assert fake.requests == []


def test_bundled_checkpoint_is_used_offline_and_verified(hub, tiny_checkpoint, tmp_path, monkeypatch) -> None:
    fake, _ = hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manifest = write_manifest(tmp_path / "pkg" / "weights_manifest.json", tiny_checkpoint[1],
                              bundled="tiny.safetensors")
    (tmp_path / "pkg" / "weights").mkdir()
    bundled = tmp_path / "pkg" / "weights" / "tiny.safetensors"
    bundled.write_bytes(tiny_checkpoint[1])
    assert_same_weights(Music2Latent2.from_pretrained(None, manifest=manifest), tiny_checkpoint[0])
    assert fake.requests == []

    bundled.write_bytes(tiny_checkpoint[1][:-1] + b"\x00")
    with pytest.raises(ChecksumMismatchError, match="reinstall"):
        Music2Latent2.from_pretrained(NAME, manifest=manifest)
    assert bundled.exists()  # installed files are reported, never deleted


def test_packaged_default_is_bundled_and_loads_without_network(monkeypatch) -> None:
    # The shipped default model comes from inside the package: no Hub call, sha256 checked.
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("the packaged default must not need the network")

    monkeypatch.delenv(MANIFEST_ENV, raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    manifest = load_manifest()
    entry = manifest.models[manifest.default]
    assert entry.bundled and (manifest.bundled_dir / entry.bundled).is_file()
    encdec = EncoderDecoder(device="cpu")
    assert encdec.config.latent_scale != 1.0  # a trained, exported model (measured latent scale)
    assert Music2Latent2.from_pretrained().num_parameters() == encdec.model.num_parameters()


def test_empty_manifest_says_no_weights_are_released(tmp_path, monkeypatch) -> None:
    empty = tmp_path / "weights_manifest.json"
    empty.write_text(json.dumps({"manifest_version": 1, "default": None, "models": {}}))
    monkeypatch.setenv(MANIFEST_ENV, str(empty))
    with pytest.raises(WeightsNotAvailableError, match="no pretrained Music2Latent2 weights have been released yet"):
        EncoderDecoder(device="cpu")
    with pytest.raises(WeightsNotAvailableError, match="released yet"):
        Music2Latent2.from_pretrained()


def test_unknown_names_and_missing_paths(hub, tmp_path) -> None:
    with pytest.raises(ValueError, match="known models: \\['tiny-test'\\]"):
        Music2Latent2.from_pretrained("no-such-model")
    with pytest.raises(WeightsNotAvailableError, match="no checkpoint file or directory"):
        Music2Latent2.from_pretrained(tmp_path / "missing.safetensors")
    with pytest.raises(TypeError, match="got int"):
        Music2Latent2.from_pretrained(3)  # type: ignore[arg-type]


def test_repo_id_with_revision(hub, tiny_checkpoint, tmp_path) -> None:
    fake, cache = hub
    digest = hashlib.sha256(tiny_checkpoint[1]).hexdigest()
    pinned = Music2Latent2.from_pretrained(REPO, revision=COMMIT)
    assert_same_weights(pinned, tiny_checkpoint[0])
    assert pinned.source is not None
    assert (pinned.source.name, pinned.source.repo_id, pinned.source.revision) == (f"{REPO}@{COMMIT}", REPO, COMMIT)
    assert pinned.source.sha256 == digest
    # No revision: the main branch, resolved to the commit it points at and recorded as such.
    main = Music2Latent2.from_pretrained(REPO)
    assert main.source is not None and main.source.revision == COMMIT
    assert EncoderDecoder(REPO, device="cpu", revision="main").model.source.name == f"{REPO}@{COMMIT}"

    with pytest.raises(ChecksumMismatchError, match="0{64}"):
        Music2Latent2.from_pretrained(REPO, revision=COMMIT, sha256="0" * 64)
    assert cached_files(cache) == []  # the file that failed the check was removed from the cache
    with pytest.raises(WeightsNotAvailableError, match=f"(?s)revision {'1' * 40} does not exist.*check the repo id"):
        Music2Latent2.from_pretrained(REPO, revision="1" * 40)
    with pytest.raises(WeightsNotAvailableError, match="(?s)no checkpoint for 'test-org/nothing'.*no such file"):
        Music2Latent2.from_pretrained("test-org/nothing")
    with pytest.raises(ValueError, match="pinned to a commit"):
        Music2Latent2.from_pretrained(NAME, revision=COMMIT)
    local = tiny_checkpoint[0].save_pretrained(tmp_path / "local")
    with pytest.raises(ValueError, match="is a local path"):
        Music2Latent2.from_pretrained(local, revision=COMMIT)
    with pytest.raises(ValueError, match="cannot apply to a loaded module"):
        EncoderDecoder(tiny_checkpoint[0], device="cpu", revision=COMMIT)


def test_push_to_hub_round_trip(hub, tiny_checkpoint, tmp_path) -> None:
    from music2latent2 import cli, load_latents

    fake, _ = hub
    model = tiny_checkpoint[0]
    commit = model.push_to_hub("test-org/pushed", token="hf_test")
    assert fake.refs[("test-org/pushed", "main")] == commit
    names = sorted(name for repo, rev, name in fake.files if (repo, rev) == ("test-org/pushed", commit))
    assert names == ["README.md", "config.json", "model.safetensors"]
    pushed = fake.files[("test-org/pushed", commit, "model.safetensors")]
    card = fake.files[("test-org/pushed", commit, "README.md")].decode()
    assert "library_name: music2latent2" in card and hashlib.sha256(pushed).hexdigest() in card
    loaded = Music2Latent2.from_pretrained("test-org/pushed", revision=commit,
                                           sha256=hashlib.sha256(pushed).hexdigest())
    assert_same_weights(loaded, model)

    # A second push (half precision) is a new commit; the first stays loadable by its sha.
    second = model.push_to_hub("test-org/pushed", dtype=torch.float16, token="hf_test")
    assert second != commit and Music2Latent2.from_pretrained("test-org/pushed").source.revision == second
    assert_same_weights(Music2Latent2.from_pretrained("test-org/pushed", revision=commit), model)

    # The CLI takes a repo id and --revision, and records exactly what it used in the latents.
    import soundfile as sf

    sf.write(tmp_path / "in.wav", torch.zeros(4410).numpy(), 44100)
    argv = ["encode", str(tmp_path / "in.wav"), "-o", str(tmp_path / "out"), "--model", "test-org/pushed",
            "--revision", commit, "--device", "cpu", "-q"]
    assert cli.main(argv) == 0
    _, meta = load_latents(tmp_path / "out" / "in.m2l")
    assert (meta.model_name, meta.model_sha256) == (f"test-org/pushed@{commit}", hashlib.sha256(pushed).hexdigest())
