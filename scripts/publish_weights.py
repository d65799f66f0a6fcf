#!/usr/bin/env python3
"""Publish a Music2Latent2 checkpoint to the Hugging Face Hub and record it in the weights manifest.

The checkpoint is first loaded strictly (so a broken file is never published), then uploaded with
``HfApi.create_repo`` + ``HfApi.upload_file``; the manifest entry pins the commit sha the upload
returned, with the file's sha256 and size. Both manifests (the top-level source and the copy in the
package) are rewritten atomically and stay byte-identical.

    python scripts/publish_weights.py runs/small/model.safetensors --name m2l2-small \\
        --repo-id ORG/music2latent2-small --description "..." --default

With ``--no-upload --revision SHA`` nothing is uploaded: the entry is written for a file already
pushed in commit SHA (also how the manifest-writing part is tested offline). With ``--bundle-only``
the checkpoint ships inside the package and is not on the Hub (yet): its entry has null
``repo_id`` and ``revision``, and loading it never touches the network.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from music2latent2.checkpoint import CheckpointError  # noqa: E402
from music2latent2.config import PRESETS, ModelConfig  # noqa: E402
from music2latent2.fileio import atomic_write  # noqa: E402
from music2latent2.manifest import ManifestEntry, load_manifest, parse_manifest  # noqa: E402
from music2latent2.model import Music2Latent2  # noqa: E402

TOP_MANIFEST = ROOT / "weights_manifest.json"
PACKAGE_MANIFEST = ROOT / "music2latent2" / "weights_manifest.json"


def infer_preset(config: ModelConfig) -> str:
    """Name of the preset the config equals (ignoring the fitted ``latent_scale``), else "custom"."""
    mine = config.to_dict()
    mine.pop("latent_scale", None)
    for name in PRESETS:
        theirs = ModelConfig.from_preset(name).to_dict()
        theirs.pop("latent_scale", None)
        if theirs == mine:
            return name
    return "custom"


def upload(checkpoint: Path, repo_id: str, filename: str, token: str | None, endpoint: str | None,
           private: bool, message: str, api: Any = None) -> str:
    """Create the repo if needed, upload the file, and return the commit sha of the upload."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_file(path_or_fileobj=str(checkpoint), path_in_repo=filename, repo_id=repo_id,
                           repo_type="model", commit_message=message)
    revision = getattr(info, "oid", None)
    if not isinstance(revision, str) or len(revision) != 40:
        raise RuntimeError(f"upload returned no commit sha (got {info!r}); cannot pin the manifest entry")
    return revision


def write_manifests(entry: ManifestEntry, make_default: bool, paths: List[Path]) -> Dict[str, Any]:
    """Add or replace ``entry`` in the first manifest and write the result to every path in ``paths``."""
    current = load_manifest(paths[0])
    models = dict(current.models)
    models[entry.name] = entry
    default = entry.name if make_default else current.default
    updated = type(current)(path=current.path, default=default, models=models, note=_note(models))
    data = updated.to_dict()
    text = json.dumps(data, indent=2) + "\n"
    for path in paths:
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return data


def _note(models: Dict[str, ManifestEntry]) -> str:
    # The empty-manifest note tells readers no weights exist; once some do it would be false.
    return "" if models else "No pretrained weights are released yet."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="model.safetensors file (or a directory holding one)")
    p.add_argument("--name", required=True, help="manifest name users pass, e.g. m2l2-small")
    p.add_argument("--repo-id", default=None, help="Hugging Face model repo, ORG/NAME (not with --bundle-only)")
    p.add_argument("--filename", default="model.safetensors", help="path of the file in the repo")
    p.add_argument("--description", required=True, help="one-line description")
    p.add_argument("--license", default="MIT", help="licence of the weights (default MIT)")
    p.add_argument("--preset", default=None, help="config preset name (default: inferred from the config)")
    p.add_argument("--default", action="store_true", help="make this entry the default model")
    p.add_argument("--bundle", action="store_true",
                   help="also copy the file into music2latent2/weights/ so the wheel ships it")
    p.add_argument("--manifest", type=Path, action="append", default=None,
                   help="manifest(s) to update; repeat for several (default: the top-level and the package one)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN / the saved login)")
    p.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    p.add_argument("--no-upload", action="store_true", help="do not upload; --revision names the commit holding it")
    p.add_argument("--revision", default=None, help="with --no-upload: the 40-hex commit sha that holds the file")
    p.add_argument("--bundle-only", action="store_true",
                   help="ship the file in the package only (implies --bundle; no Hub repo, nothing uploaded)")
    return p


def main(argv: List[str] | None = None, api: Any = None) -> int:
    args = build_parser().parse_args(argv)
    checkpoint = args.checkpoint / "model.safetensors" if args.checkpoint.is_dir() else args.checkpoint
    if args.bundle_only:
        if args.repo_id or args.revision or args.no_upload:
            raise SystemExit("error: --bundle-only takes no --repo-id, --revision or --no-upload")
        args.bundle = True
    elif not args.repo_id:
        raise SystemExit("error: --repo-id is required (or --bundle-only)")
    if args.no_upload and not args.revision:
        raise SystemExit("error: --no-upload needs --revision (the commit sha that holds the file)")
    if args.revision and not args.no_upload:
        raise SystemExit("error: --revision is only for --no-upload; an upload pins the commit it creates")
    try:
        model = Music2Latent2.from_pretrained(checkpoint)
    except (CheckpointError, FileNotFoundError) as err:
        raise SystemExit(f"error: refusing to publish an unloadable checkpoint: {err}") from err
    config = model.config
    assert model.source is not None  # set by from_pretrained
    sha, size = model.source.sha256, checkpoint.stat().st_size
    paths = args.manifest or [TOP_MANIFEST, PACKAGE_MANIFEST]
    bundled = f"{args.name}.safetensors" if args.bundle else None
    if args.bundle_only:
        revision = None
    elif args.no_upload:
        revision = args.revision
    else:
        revision = upload(checkpoint, args.repo_id, args.filename, args.token, args.endpoint, args.private,
                          f"music2latent2 checkpoint {args.name} (sha256 {sha})", api=api)
    entry_data = {"repo_id": args.repo_id, "revision": revision, "filename": args.filename, "sha256": sha,
                  "size": size, "config": args.preset or infer_preset(config), "sample_rate": config.sample_rate,
                  "channels": config.audio_channels, "license": args.license, "description": args.description}
    if bundled is not None:
        entry_data["bundled"] = bundled
    # Validate through the same parser users' loads go through (revision format, sha format, ...).
    try:
        parsed = parse_manifest({"manifest_version": 1, "models": {args.name: entry_data}}, "<new entry>")
        entry = parsed.models[args.name]
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    if bundled is not None:
        # Only once the upload and the entry are good, and atomically: a failed run must not leave
        # a stray checkpoint in the package (it would ship in the wheel without a manifest entry).
        # The bundle sits beside the package manifest, where the loader looks for it.
        target = paths[-1].parent / "weights" / bundled
        atomic_write(target, lambda tmp: shutil.copyfile(checkpoint, tmp))
    write_manifests(entry, args.default, paths)
    print(json.dumps({args.name: entry.to_dict()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
