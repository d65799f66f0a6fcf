"""The weights manifest: the table of released checkpoints, each a name pinned to a commit and a sha256.

``weights_manifest.json`` lives at the top of the repository and, byte-identical, inside the
package. :mod:`music2latent2.hub` turns its names into verified local files.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Union

__all__ = ["MANIFEST_ENV", "PACKAGE_MANIFEST", "MANIFEST_VERSION", "DEFAULT_ENDPOINT", "ManifestEntry", "Manifest",
           "manifest_path", "load_manifest", "parse_manifest", "available_models", "COMMIT_SHA", "SHA256_HEX"]

MANIFEST_ENV = "MUSIC2LATENT2_MANIFEST"
PACKAGE_MANIFEST = Path(__file__).with_name("weights_manifest.json")
MANIFEST_VERSION = 1
DEFAULT_ENDPOINT = "https://huggingface.co"

COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


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
    if entry.revision is not None and not COMMIT_SHA.fullmatch(entry.revision):
        raise ValueError(f"{where}: revision must be a 40-character lower-case hex commit sha, got {entry.revision!r}")
    if not SHA256_HEX.fullmatch(entry.sha256):
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
