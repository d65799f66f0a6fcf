"""Pretrained weights: the manifest, verified downloads, and turning a model argument into a local file.

:func:`resolve` takes what a user passed to ``from_pretrained`` and returns a
:class:`ModelSource`: a local, sha256-verified checkpoint file and where it came from. In order:

1. an existing local file or directory (``model.safetensors`` inside) is used as it is, and hashed;
2. a name in the weights manifest (``None`` = its default) is taken from the checkpoint bundled in
   the package where the entry names one (same sha256, so the same bytes as the Hub's, and no
   network), else from the Hugging Face cache or downloaded with ``hf_hub_download`` at the
   pinned commit. An entry may be bundled only (not on the Hub yet): its ``repo_id`` and
   ``revision`` are then null;
3. a Hugging Face repo id ``"org/name"`` is downloaded (its ``model.safetensors``) at
   ``revision``: a branch or tag, or a commit sha that pins it.

HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and HF_ENDPOINT are read at call time. When no source
has the file, a :class:`WeightsNotAvailableError` lists what was tried and how to fix it.

Every manifest checkpoint's sha256 is checked before it is parsed; a downloaded file that fails the
check is deleted from the cache so the next load fetches it again. :func:`upload_folder` is the
other direction (``push_to_hub``). This module knows no network class.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Union

from .checkpoint import (
    WEIGHTS_NAME,
    CheckpointError,
    ChecksumMismatchError,
    sha256_file,
    verify_sha256,
    weights_path,
)
from .manifest import (
    COMMIT_SHA,
    DEFAULT_ENDPOINT,
    MANIFEST_ENV,
    SHA256_HEX,
    Manifest,
    ManifestEntry,
    load_manifest,
)

__all__ = ["ModelSource", "ModelArgument", "WeightsNotAvailableError", "hf_cache_dir", "resolve", "upload_folder"]

ModelArgument = Union[str, os.PathLike, None]

_TRUE = {"1", "true", "yes", "on"}
# "org/name": what the Hub calls a repo id (letters, digits, "-", "_", "."; one slash).
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


class WeightsNotAvailableError(FileNotFoundError):
    """No usable checkpoint could be found for a model argument; the message says what was tried."""


@dataclass(frozen=True)
class ModelSource:
    """Where a loaded model came from; travels with it as ``model.source``.

    Attributes:
        name: how to ask for it again: the local path as given, the manifest name
            (``"default:<name>"`` when the default was taken), or ``"org/name@<commit>"``.
        sha256: hex sha256 of the checkpoint file, verified or computed when it was loaded.
        path: the local file that was read.
        repo_id: Hugging Face repo it was published in, if known.
        revision: the commit sha of that repo it came from, if known.
    """

    name: str
    sha256: str
    path: Path
    repo_id: Optional[str] = None
    revision: Optional[str] = None


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


def _hub_said_missing(err: Exception) -> bool:
    """True when the Hub was reached and answered that the repo, revision or file does not exist
    (as opposed to "could not reach it" or "not in the cache")."""
    from huggingface_hub.utils import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # GatedRepoError is a RepositoryNotFoundError; LocalEntryNotFoundError (a cache miss) subclasses
    # EntryNotFoundError but means the Hub was never asked.
    missing = (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError)
    return isinstance(err, missing) and not isinstance(err, LocalEntryNotFoundError)


@dataclass
class _Attempts:
    """The sources tried for one model argument, each with why it failed."""

    lines: List[str] = field(default_factory=list)
    hub_said_missing: bool = False

    def add(self, line: str) -> None:
        self.lines.append(line)

    def __str__(self) -> str:
        return "\n".join(f"  - {line}" for line in self.lines)


def _download(repo_id: str, filename: str, revision: Optional[str], sha256: Optional[str], size: Optional[int],
              attempts: _Attempts, pinned: bool = False) -> Path | None:
    """Cached or downloaded file from the Hub, its sha256 checked when one is given; None (and the
    reason in ``attempts``) when the Hub cannot provide it. ``pinned``: the revision comes from the
    manifest (so a missing one means a wrong entry or rewritten history)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import LocalEntryNotFoundError, RevisionNotFoundError

    from ._version import __version__

    cache, offline, endpoint = hf_cache_dir(), _hf_offline(), _hf_endpoint()
    url = f"{endpoint}/{repo_id}/resolve/{revision or 'main'}/{filename}"
    where = f"Hugging Face Hub {url} (cache {cache}{'; offline: HF_HUB_OFFLINE is set, cache only' if offline else ''})"
    try:
        local = Path(hf_hub_download(repo_id=repo_id, filename=filename, revision=revision, cache_dir=str(cache),
                                     endpoint=endpoint, local_files_only=offline, library_name="music2latent2",
                                     library_version=__version__))
    except Exception as err:  # noqa: BLE001 - every failure means "not available from the hub"; reported below
        reason = " ".join(str(err).split())[:400]
        if isinstance(err, RevisionNotFoundError):
            cause = "the manifest entry is wrong or the repo history was rewritten" if pinned else "check revision="
            what = "pinned revision" if pinned else "revision"
            reason = f"the {what} {revision} does not exist in {repo_id}: {cause} ({reason})"
        elif offline and isinstance(err, LocalEntryNotFoundError):
            reason = "not in the cache, and offline mode forbids downloading"
        attempts.add(f"{where}: {type(err).__name__}: {reason}")
        attempts.hub_said_missing = _hub_said_missing(err)
        return None
    if sha256 is not None:
        actual = sha256_file(local)
        if actual != sha256:
            got = local.stat().st_size
            _purge_cached(local, cache)
            published = f" vs {size} published" if size is not None else ""
            raise ChecksumMismatchError(local, sha256, actual,
                                        note=f"size {got} bytes{published}; the file was deleted from the Hugging "
                                             "Face cache and is downloaded again on the next load")
    return local


def _from_bundle(entry: ManifestEntry, manifest: Manifest, attempts: _Attempts) -> Path | None:
    if entry.bundled is None:
        attempts.add("checkpoint bundled in the package: this entry has none")
        return None
    path = manifest.bundled_dir / entry.bundled
    if not path.is_file():
        attempts.add(f"checkpoint bundled in the package: {path} does not exist")
        return None
    actual = sha256_file(path)
    if actual != entry.sha256:
        # Never rewrite an installed package: report it and let the user reinstall.
        raise ChecksumMismatchError(path, entry.sha256, actual, note="the installed package is damaged; reinstall it")
    return path


def _no_weights_message(manifest: Manifest) -> str:
    if manifest.models:
        return (f"the weights manifest {manifest.path} has no default model; pass one of "
                f"{sorted(manifest.models)}, a checkpoint path, a Hugging Face repo id, or a Music2Latent2 module")
    return ("no pretrained Music2Latent2 weights have been released yet (the weights manifest "
            f"{manifest.path} lists no models). Pass a checkpoint instead: EncoderDecoder('path/to/model.safetensors'"
            " or a directory holding model.safetensors), Music2Latent2.from_pretrained(path), or "
            f"EncoderDecoder(model) with a Music2Latent2 module; set {MANIFEST_ENV} to use another manifest")


_OFFLINE_FIX = ("connect to the network (and unset HF_HUB_OFFLINE) to download the file once into the cache (set "
                "HF_HOME or HF_HUB_CACHE to choose where; HF_ENDPOINT for a mirror); or fill the cache on another "
                "machine and copy it, then set HF_HUB_OFFLINE=1")


def _resolve_entry(name: str | None, man: Manifest) -> ModelSource:
    if name is None:
        if man.default is None:
            raise WeightsNotAvailableError(_no_weights_message(man))
        name, label = man.default, f"default:{man.default}"
    else:
        label = name
    if name not in man.models:
        known = sorted(man.models) or "none released yet"
        raise ValueError(f"{name!r} is neither an existing local checkpoint path, a Hugging Face repo id (org/name) "
                         f"nor a model in the weights manifest {man.path} (known models: {known})")
    entry = man.models[name]
    attempts = _Attempts()
    path = _from_bundle(entry, man, attempts)
    if path is None and entry.repo_id is not None:
        path = _download(entry.repo_id, entry.filename, entry.revision, entry.sha256, entry.size, attempts,
                         pinned=True)
    elif path is None:
        attempts.add("Hugging Face Hub: this entry is not published there (bundled only)")
    if path is not None:
        return ModelSource(label, entry.sha256, path, entry.repo_id, entry.revision)
    if entry.repo_id is None:
        fix = "reinstall music2latent2 (this model ships inside the package) or pass a local checkpoint path"
    elif attempts.hub_said_missing:
        fix = ("the Hub answered but has no such file at the pinned revision: upgrade music2latent2 (its manifest "
               "may have moved on) or pass a local checkpoint path, e.g. EncoderDecoder('/path/to/model.safetensors')")
    else:
        fix = (f"{_OFFLINE_FIX}; or download {entry.url(_hf_endpoint())} (sha256 {entry.sha256}) yourself and pass "
               f"its path, e.g. EncoderDecoder('/path/to/{Path(entry.filename).name}')")
    raise WeightsNotAvailableError(f"pretrained weights {name!r} are not available. Tried:\n{attempts}\nTo fix: {fix}.")


def _resolve_repo(repo_id: str, revision: Optional[str], sha256: Optional[str]) -> ModelSource:
    attempts = _Attempts([f"local path {repo_id!r}: no such file or directory"])
    path = _download(repo_id, WEIGHTS_NAME, revision, sha256, None, attempts)
    if path is None:
        if attempts.hub_said_missing:
            fix = (f"check the repo id and revision (the repo must hold {WEIGHTS_NAME} at the top level), or log in "
                   "(HF_TOKEN) for a private or gated repo")
        else:
            fix = _OFFLINE_FIX
        raise WeightsNotAvailableError(f"no checkpoint for {repo_id!r}"
                                       f"{f' at revision {revision}' if revision else ''}. Tried:\n{attempts}\n"
                                       f"To fix: {fix}.")
    # The cache keeps each file under snapshots/<commit>/: that names the exact revision read.
    commit = path.parent.name if COMMIT_SHA.fullmatch(path.parent.name) else revision
    digest = sha256 if sha256 is not None else sha256_file(path)
    return ModelSource(f"{repo_id}@{commit}" if commit else repo_id, digest, path, repo_id, commit)


def _resolve_local(given: Union[str, os.PathLike], sha256: Optional[str]) -> ModelSource:
    path = weights_path(given)
    if not path.is_file():
        where = f" (the folder {given} holds no {WEIGHTS_NAME})" if Path(given).is_dir() else ""
        raise CheckpointError(f"checkpoint not found: {path}{where}")
    digest = verify_sha256(path, sha256) if sha256 is not None else sha256_file(path)
    return ModelSource(os.fspath(given), digest, path)


def resolve(name_or_path: ModelArgument = None, revision: Optional[str] = None, sha256: Optional[str] = None,
            manifest: Union[str, os.PathLike, Manifest, None] = None) -> ModelSource:
    """Turn a model argument into a local, verified checkpoint file (see the module docstring).

    Args:
        name_or_path: a local ``.safetensors`` file or directory holding ``model.safetensors``, a
            manifest name, a Hugging Face repo id ``"org/name"``, or None for the manifest default.
        revision: for a repo id only: branch, tag or commit sha (default: the repo's main branch).
            Manifest names are pinned already.
        sha256: if given, the file's hex sha256 must equal it.
        manifest: the weights manifest to use (see :func:`manifest_path`).

    Raises:
        TypeError: an argument of another type.
        ValueError: an unknown name, or ``revision`` with something that is not a repo id.
        WeightsNotAvailableError: nothing found (the message lists what was tried and how to fix it).
        CheckpointError: a directory without ``model.safetensors``; ChecksumMismatchError (a
            subclass) when a sha256 differs from the expected one.
    """
    if name_or_path is not None and not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"model must be a Music2Latent2, a checkpoint path, a manifest name, a Hugging Face repo id "
                        f"or None, got {type(name_or_path).__name__}")
    if sha256 is not None:
        sha256 = sha256.strip().lower()
        if not SHA256_HEX.fullmatch(sha256):
            raise ValueError(f"sha256 must be 64 hex characters, got {sha256!r}")
    text = None if name_or_path is None else os.fspath(name_or_path)
    if text is not None and Path(text).exists():
        if revision is not None:
            raise ValueError(f"revision= is for Hugging Face repo ids; {text!r} is a local path")
        return _resolve_local(text, sha256)
    man = load_manifest(manifest)
    if text is None or (isinstance(name_or_path, str) and text in man.models):
        if revision is not None:
            raise ValueError(f"manifest models are pinned to a commit; revision= is for Hugging Face repo ids, "
                             f"not {text or 'the default model'!r}")
        source = _resolve_entry(text, man)
        if sha256 is not None and sha256 != source.sha256:
            raise ChecksumMismatchError(source.path, sha256, source.sha256, note="the manifest pins the other one")
        return source
    if isinstance(name_or_path, str) and _REPO_ID.fullmatch(text) and not text.endswith(".safetensors"):
        return _resolve_repo(text, revision, sha256)
    # Something that can only be a path should not be reported as an unknown model name.
    if isinstance(name_or_path, os.PathLike) or text.endswith(".safetensors") or os.sep in text.strip("/"):
        raise WeightsNotAvailableError(f"no checkpoint file or directory at {text!r}")
    return _resolve_entry(text, man)  # raises: unknown name, listing the known ones


def upload_folder(folder: Union[str, os.PathLike], repo_id: str, *, revision: Optional[str] = None,
                  commit_message: str = "Upload music2latent2 checkpoint", private: bool = False,
                  token: Optional[str] = None, create_pr: bool = False) -> str:
    """Commit the files of ``folder`` to a Hub model repo (created if missing) in one commit.

    Args:
        folder: local folder; its top-level files are uploaded.
        repo_id: ``"org/name"``.
        revision: branch to commit to (default: main).
        commit_message: the commit's summary line.
        private: create the repo private (an existing repo keeps its visibility).
        token: Hub token (default: HF_TOKEN or the saved login).
        create_pr: open a pull request instead of committing to the branch.

    Returns:
        The 40-hex sha of the new commit: pass it as ``revision=`` to pin exactly these files.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    root = Path(folder)
    names = sorted(p.name for p in root.iterdir() if p.is_file())
    api = HfApi(endpoint=_hf_endpoint(), token=token, library_name="music2latent2")
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(root / name)) for name in names]
    info = api.create_commit(repo_id=repo_id, repo_type="model", operations=operations, commit_message=commit_message,
                             revision=revision, create_pr=create_pr)
    return str(info.oid)
