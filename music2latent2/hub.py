"""Pretrained weights: the manifest, verified downloads, and resolving a model argument to a model.

A model argument is resolved in this order:

1. a :class:`Music2Latent2` module is returned as it is;
2. an existing local file or directory is loaded with :func:`~music2latent2.checkpoint.load_checkpoint`;
3. otherwise it is a manifest name (``None`` = the manifest's default). Its file is taken from the
   checkpoint bundled in the package where the entry names one (same sha256, so the same bytes as
   the Hub's, and no network), else from the Hugging Face cache or downloaded with
   ``hf_hub_download`` at the pinned commit (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and HF_ENDPOINT
   are read at call time), and failing both a :class:`WeightsNotAvailableError` lists what was
   tried and how to fix it. An entry may be bundled only (not on the Hub yet): its ``repo_id`` and
   ``revision`` are then null.

Every manifest checkpoint's sha256 is checked before it is parsed; a downloaded file that fails the
check is deleted from the cache so the next load fetches it again.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Union

import torch

from .checkpoint import ChecksumMismatchError, load_checkpoint, sha256_file
from .model import Music2Latent2

__all__ = ["MANIFEST_ENV", "PACKAGE_MANIFEST", "ManifestEntry", "Manifest", "WeightsNotAvailableError",
           "manifest_path", "load_manifest", "parse_manifest", "available_models", "hf_cache_dir",
           "resolve_checkpoint", "load_model"]

MANIFEST_ENV = "MUSIC2LATENT2_MANIFEST"
PACKAGE_MANIFEST = Path(__file__).with_name("weights_manifest.json")
MANIFEST_VERSION = 1
DEFAULT_ENDPOINT = "https://huggingface.co"

_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TRUE = {"1", "true", "yes", "on"}
# Errors meaning the Hub was reached and said no (as opposed to "could not reach it").
_HUB_ANSWERED_NOT_FOUND = ("RevisionNotFoundError", "RepositoryNotFoundError", "RemoteEntryNotFoundError",
                           "EntryNotFoundError", "GatedRepoError")


class WeightsNotAvailableError(FileNotFoundError):
    """No usable checkpoint could be found for a model argument; the message says what was tried."""


@dataclass(frozen=True)
class ManifestEntry:
    """One released checkpoint.

    Attributes:
        name: the key users pass (``EncoderDecoder("name")``).
        repo_id: Hugging Face model repo holding the file (None: bundled only, not on the Hub).
        revision: the 40-hex commit the file is pinned to (branch names are not accepted; None
            exactly when ``repo_id`` is None).
        filename: path of the checkpoint inside the repo.
        sha256: hex sha256 of the file, checked before every load.
        size: file size in bytes.
        config: name of the ModelConfig preset it was trained with (or "custom").
        sample_rate: audio sample rate in Hz.
        channels: audio channels (1 mono, 2 stereo).
        license: licence of the weights.
        description: one line.
        bundled: file name inside the ``weights/`` folder beside the manifest, if the package ships it.
    """

    name: str
    repo_id: str | None
    revision: str | None
    filename: str
    sha256: str
    size: int
    config: str
    sample_rate: int
    channels: int
    license: str
    description: str
    bundled: str | None = None

    def to_dict(self) -> Dict[str, Any]:
        """The entry as written in the manifest (without ``name``, which is its key)."""
        data = asdict(self)
        del data["name"]
        if data["bundled"] is None:
            del data["bundled"]
        return data

    def url(self, endpoint: str | None = None) -> str:
        """Download URL of the pinned file."""
        base = (endpoint or DEFAULT_ENDPOINT).rstrip("/")
        return f"{base}/{self.repo_id}/resolve/{self.revision}/{self.filename}"


@dataclass(frozen=True)
class Manifest:
    """A parsed ``weights_manifest.json``: entries by name and the default name (None if unset)."""

    path: Path
    default: str | None
    models: Dict[str, ManifestEntry] = field(default_factory=dict)
    note: str = ""

    @property
    def bundled_dir(self) -> Path:
        """Bundled checkpoints live in ``weights/`` beside the manifest (music2latent2/weights/ when installed)."""
        return self.path.parent / "weights"

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready form, entries sorted by name."""
        data: Dict[str, Any] = {"manifest_version": MANIFEST_VERSION}
        if self.note:
            data["note"] = self.note
        data["default"] = self.default
        data["models"] = {name: self.models[name].to_dict() for name in sorted(self.models)}
        return data


def _field(data: Dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in data:
        raise ValueError(f"{where}: missing field {key!r}")
    value = data[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{where}: field {key!r} must be {kind.__name__}, got {value!r}")
    return value


def _optional(data: Dict[str, Any], key: str, where: str) -> str | None:
    if key not in data:
        raise ValueError(f"{where}: missing field {key!r}")
    return None if data[key] is None else _field(data, key, str, where)


def _parse_entry(name: str, data: Any, source: str) -> ManifestEntry:
    where = f"weights manifest {source}, model {name!r}"
    if not isinstance(data, dict):
        raise ValueError(f"{where}: entry must be a JSON object")
    known = set(ManifestEntry.__dataclass_fields__) - {"name"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown fields {unknown}")
    entry = ManifestEntry(
        name=name, repo_id=_optional(data, "repo_id", where), revision=_optional(data, "revision", where),
        filename=_field(data, "filename", str, where), sha256=_field(data, "sha256", str, where),
        size=_field(data, "size", int, where), config=_field(data, "config", str, where),
        sample_rate=_field(data, "sample_rate", int, where), channels=_field(data, "channels", int, where),
        license=_field(data, "license", str, where), description=_field(data, "description", str, where),
        bundled=_field(data, "bundled", str, where) if "bundled" in data else None)
    if (entry.repo_id is None) != (entry.revision is None):
        raise ValueError(f"{where}: repo_id and revision must both be set (on the Hub) or both be null (bundled only)")
    if entry.repo_id is None and entry.bundled is None:
        raise ValueError(f"{where}: an entry that is not on the Hub (repo_id null) must be bundled")
    # A branch name would make the download move under the user's feet: pin commits only.
    if entry.revision is not None and not _COMMIT.fullmatch(entry.revision):
        raise ValueError(f"{where}: revision must be a 40-character lower-case hex commit sha, got {entry.revision!r}")
    if not _SHA256.fullmatch(entry.sha256):
        raise ValueError(f"{where}: sha256 must be 64 lower-case hex characters, got {entry.sha256!r}")
    if entry.size <= 0 or entry.sample_rate <= 0 or entry.channels not in (1, 2):
        raise ValueError(f"{where}: size and sample_rate must be positive and channels 1 or 2")
    if entry.bundled is not None and (not entry.bundled or Path(entry.bundled).name != entry.bundled):
        raise ValueError(f"{where}: bundled must be a plain file name inside weights/, got {entry.bundled!r}")
    return entry


def parse_manifest(data: Any, path: Union[str, os.PathLike]) -> Manifest:
    """Validate manifest JSON data (already decoded); ``path`` is where it came from.

    Raises:
        ValueError: naming the manifest and the offending field.
    """
    source = str(path)
    if not isinstance(data, dict):
        raise ValueError(f"weights manifest {source}: top level must be a JSON object")
    version = data.get("manifest_version")
    if version != MANIFEST_VERSION:
        raise ValueError(f"weights manifest {source}: manifest_version {version!r}; this library reads "
                         f"{MANIFEST_VERSION}")
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise ValueError(f"weights manifest {source}: 'models' must be an object of name -> entry")
    entries = {name: _parse_entry(name, entry, source) for name, entry in models.items()}
    default = data.get("default")
    if default is not None and default not in entries:
        raise ValueError(f"weights manifest {source}: default {default!r} is not one of its models {sorted(entries)}")
    note = data.get("note", "")
    return Manifest(path=Path(path), default=default, models=entries, note=note if isinstance(note, str) else "")


def manifest_path(manifest: Union[str, os.PathLike, None] = None) -> Path:
    """The manifest in use: the argument, else ``$MUSIC2LATENT2_MANIFEST``, else the packaged one."""
    if manifest is not None:
        return Path(manifest)
    env = os.environ.get(MANIFEST_ENV)
    return Path(env) if env else PACKAGE_MANIFEST


def load_manifest(manifest: Union[str, os.PathLike, Manifest, None] = None) -> Manifest:
    """Read and validate a weights manifest (see :func:`manifest_path` for which one)."""
    if isinstance(manifest, Manifest):
        return manifest
    path = manifest_path(manifest)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ValueError(f"cannot read weights manifest {path}: {err}") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"weights manifest {path} is not valid JSON: {err}") from err
    return parse_manifest(data, path)


def available_models(manifest: Union[str, os.PathLike, Manifest, None] = None) -> List[str]:
    """Names of the released models in the manifest (empty until weights are published)."""
    return sorted(load_manifest(manifest).models)


# ----------------------------------------------------------------------------- Hugging Face settings
# huggingface_hub reads these variables once, at import; reading them per call lets a process (or a
# test) change them later, and we pass the results explicitly to hf_hub_download.
def hf_cache_dir() -> Path:
    """Hub cache folder: HF_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(os.path.expandvars(env)).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(os.path.expandvars(home)).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(os.path.expandvars(xdg)).expanduser() / "huggingface" / "hub"


def _hf_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if env:  # the variable as it is now wins over the value huggingface_hub saw at import
        return env.strip().lower() in _TRUE
    return bool(constants.HF_HUB_OFFLINE)


def _hf_endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT or DEFAULT_ENDPOINT).rstrip("/")


def _purge_cached(path: Path, cache: Path) -> None:
    """Delete a cached snapshot file and the blob it links to, so it is never reused."""
    targets = [path, Path(os.path.realpath(path))]
    root = Path(os.path.realpath(cache))
    for target in targets:
        try:
            if Path(os.path.realpath(target.parent)).is_relative_to(root):
                target.unlink(missing_ok=True)
        except OSError:
            pass


def _from_hub(entry: ManifestEntry, attempts: List[str]) -> Path | None:
    """Cached or downloaded file of ``entry`` with a verified sha256, or None (reason added to attempts)."""
    from huggingface_hub import hf_hub_download

    from . import __version__

    if entry.repo_id is None or entry.revision is None:
        attempts.append("Hugging Face Hub: this entry is not published there (bundled only)")
        return None
    cache, offline, endpoint = hf_cache_dir(), _hf_offline(), _hf_endpoint()
    where = (f"Hugging Face Hub {entry.url(endpoint)} (cache {cache}"
             f"{'; offline: HF_HUB_OFFLINE is set, cache only' if offline else ''})")
    try:
        local = Path(hf_hub_download(repo_id=entry.repo_id, filename=entry.filename, revision=entry.revision,
                                     cache_dir=str(cache), endpoint=endpoint, local_files_only=offline,
                                     library_name="music2latent2", library_version=__version__))
    except Exception as err:  # noqa: BLE001 - every failure means "not available from the hub"; reported below
        kind = type(err).__name__
        reason = " ".join(str(err).split())[:400]
        if kind == "RevisionNotFoundError":
            reason = (f"the pinned revision {entry.revision} does not exist in {entry.repo_id}: the manifest "
                      f"entry is wrong or the repo history was rewritten ({reason})")
        elif offline and kind == "LocalEntryNotFoundError":
            reason = "not in the cache, and offline mode forbids downloading"
        attempts.append(f"{where}: {kind}: {reason}")
        return None
    actual = sha256_file(local)
    if actual != entry.sha256:
        size = local.stat().st_size
        _purge_cached(local, cache)
        raise ChecksumMismatchError(local, entry.sha256, actual,
                                    note=f"size {size} bytes vs {entry.size} published; the file was deleted from "
                                         "the Hugging Face cache and is downloaded again on the next load")
    return local


def _from_bundle(entry: ManifestEntry, manifest: Manifest, attempts: List[str]) -> Path | None:
    if entry.bundled is None:
        attempts.append("checkpoint bundled in the package: this entry has none")
        return None
    path = manifest.bundled_dir / entry.bundled
    if not path.is_file():
        attempts.append(f"checkpoint bundled in the package: {path} does not exist")
        return None
    actual = sha256_file(path)
    if actual != entry.sha256:
        # Never rewrite an installed package: report it and let the user reinstall.
        raise ChecksumMismatchError(path, entry.sha256, actual, note="the installed package is damaged; reinstall it")
    return path


def _no_weights_message(manifest: Manifest) -> str:
    if manifest.models:
        return (f"the weights manifest {manifest.path} has no default model; pass one of "
                f"{sorted(manifest.models)}, a checkpoint path, or a Music2Latent2 module")
    return ("no pretrained Music2Latent2 weights have been released yet (the weights manifest "
            f"{manifest.path} lists no models). Pass a checkpoint instead: EncoderDecoder('path/to/model.safetensors'"
            " or a directory holding model.safetensors), Music2Latent2.from_pretrained(path), or "
            f"EncoderDecoder(model) with a Music2Latent2 module; set {MANIFEST_ENV} to use another manifest")


def resolve_checkpoint(name: str | None = None,
                       manifest: Union[str, os.PathLike, Manifest, None] = None) -> Path:
    """Local path of a verified checkpoint for a manifest name (None = the default).

    Raises:
        WeightsNotAvailableError: no weights are released, or none of the sources had the file
            (the message lists each source tried and how to fix it).
        ValueError: unknown name or invalid manifest.
        ChecksumMismatchError: a file was found but its sha256 differs from the manifest's.
    """
    man = load_manifest(manifest)
    if name is None:
        if man.default is None:
            raise WeightsNotAvailableError(_no_weights_message(man))
        name = man.default
    if name not in man.models:
        known = sorted(man.models) or "none released yet"
        raise ValueError(f"{name!r} is neither an existing local checkpoint path nor a model in the weights manifest "
                         f"{man.path} (known models: {known})")
    entry = man.models[name]
    attempts: List[str] = []
    path = _from_bundle(entry, man, attempts) or _from_hub(entry, attempts)
    if path is not None:
        return path
    tried = "\n".join(f"  - {a}" for a in attempts)
    if entry.repo_id is None:
        fix = "reinstall music2latent2 (this model ships inside the package) or pass a local checkpoint path"
    elif any(f": {kind}: " in attempts[-1] for kind in _HUB_ANSWERED_NOT_FOUND):
        fix = ("the Hub answered but has no such file at the pinned revision: upgrade music2latent2 (its manifest "
               "may have moved on) or pass a local checkpoint path, e.g. EncoderDecoder('/path/to/model.safetensors')")
    else:
        fix = ("connect to the network (and unset HF_HUB_OFFLINE) to download the file once into the cache (set "
               "HF_HOME or HF_HUB_CACHE to choose where; HF_ENDPOINT for a mirror); or fill the cache on another "
               f"machine and copy it, then set HF_HUB_OFFLINE=1; or download {entry.url(_hf_endpoint())} (sha256 "
               f"{entry.sha256}) yourself and pass its path, e.g. "
               f"EncoderDecoder('/path/to/{Path(entry.filename).name}')")
    raise WeightsNotAvailableError(f"pretrained weights {name!r} are not available. Tried:\n{tried}\nTo fix: {fix}.")


def load_model(name_or_path: Union[str, os.PathLike, Music2Latent2, None] = None,
               manifest: Union[str, os.PathLike, Manifest, None] = None,
               map_location: Union[str, torch.device] = "cpu") -> Music2Latent2:
    """Resolve a model argument (module, local path, manifest name, or None) to a loaded model in eval mode.

    Args:
        name_or_path: a Music2Latent2 (returned unchanged), an existing ``.safetensors`` file or a
            directory holding ``model.safetensors``, a manifest name, or None for the default.
        manifest: the weights manifest to use (see :func:`manifest_path`).
        map_location: device for the loaded weights.

    Raises:
        TypeError: for an argument of another type.
        WeightsNotAvailableError, ValueError, CheckpointError: see :func:`resolve_checkpoint` and
            :func:`~music2latent2.checkpoint.load_checkpoint`.
    """
    if isinstance(name_or_path, Music2Latent2):
        return name_or_path
    if name_or_path is not None and not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"model must be a Music2Latent2, a checkpoint path, a manifest name or None, "
                        f"got {type(name_or_path).__name__}")
    if name_or_path is not None:
        local = Path(name_or_path)
        if local.exists():
            return load_checkpoint(local, map_location=map_location)
        text = os.fspath(name_or_path)
        # Something that can only be a path should not be reported as an unknown model name.
        if isinstance(name_or_path, os.PathLike) or text.endswith(".safetensors") or os.sep in text.strip("/"):
            if not (isinstance(name_or_path, str) and text in load_manifest(manifest).models):
                raise WeightsNotAvailableError(f"no checkpoint file or directory at {text!r}")
    path = resolve_checkpoint(None if name_or_path is None else os.fspath(name_or_path), manifest)
    # The sha256 was verified by resolve_checkpoint just before this read.
    return load_checkpoint(path, map_location=map_location)
