"""Saving, loading and publishing a network: the Hugging Face ``from_pretrained`` conventions.

:class:`PretrainedModule` is the base of :class:`~music2latent2.model.Music2Latent2`. It joins
the three parts that each know one thing: :mod:`~music2latent2.hub` turns a model argument into
a verified local file, :mod:`~music2latent2.checkpoint` reads and writes (config, tensors), and
the subclass builds the network from its :class:`~music2latent2.config.ModelConfig`. None of
those modules imports the network, so there is no import cycle.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Dict, Optional, Type, TypeVar, Union

import torch
from torch import nn

from .checkpoint import read_config, read_tensors, save_checkpoint
from .config import ModelConfig
from .hub import ModelArgument, ModelSource, resolve, upload_folder
from .manifest import Manifest

__all__ = ["PretrainedModule", "ModelSource"]

Model = TypeVar("Model", bound="PretrainedModule")


class PretrainedModule(nn.Module):
    """An ``nn.Module`` described completely by a :class:`ModelConfig`, with its checkpoint I/O.

    Attributes:
        config: the configuration the network was built from; it is saved with the weights.
        source: where the weights were loaded from (name, sha256, file, Hub repo and commit);
            None for a model built or trained in memory.
    """

    source: Optional[ModelSource] = None

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config

    def save_pretrained(self, directory: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None,
                        extra_metadata: Optional[Dict[str, str]] = None) -> Path:
        """Write ``model.safetensors`` (config and format version in its metadata) and ``config.json``.

        Args:
            directory: created if missing; a path ending in ``.safetensors`` writes just that file.
            dtype: store floating-point weights in this dtype (e.g. torch.float16); they load as float32.
            extra_metadata: more string key/values for the safetensors metadata.

        Returns:
            The path of the written ``.safetensors`` file (written atomically: temp file + rename).
        """
        return save_checkpoint(directory, self.config, self.state_dict(), dtype=dtype, extra_metadata=extra_metadata)

    @classmethod
    def from_pretrained(cls: Type[Model], name_or_path: ModelArgument = None, *, revision: Optional[str] = None,
                        sha256: Optional[str] = None, manifest: Union[str, os.PathLike, Manifest, None] = None,
                        map_location: Union[str, torch.device] = "cpu") -> Model:
        """Load a model strictly, from a local checkpoint, a released name, or a Hugging Face repo.

        Args:
            name_or_path: a local ``.safetensors`` file or a directory holding ``model.safetensors``;
                a name from the weights manifest (None = its default), taken from the package or
                the Hub at its pinned commit with its sha256 checked; or a Hub repo id
                ``"org/name"`` holding ``model.safetensors``.
            revision: for a repo id: branch, tag or commit sha (a commit sha pins it).
            sha256: if given, the checkpoint file's hex sha256 must equal it.
            manifest: the weights manifest to use (default: ``$MUSIC2LATENT2_MANIFEST`` or the packaged one).
            map_location: device the returned model is moved to.

        Returns:
            The model in eval mode, float32, with ``source`` recording where it came from.

        Raises:
            music2latent2.hub.WeightsNotAvailableError: no weights released yet / none reachable
                (the message lists what was tried and how to fix it).
            music2latent2.checkpoint.CheckpointError: corrupt or mismatched file (what is wrong is
                named); ChecksumMismatchError (a subclass) for a sha256 that differs.
            ValueError: an unknown name; TypeError: an argument of another type.
        """
        source = resolve(name_or_path, revision=revision, sha256=sha256, manifest=manifest)
        config = read_config(source.path)
        # Names, shapes and dtypes come from a model built on the meta device: no memory, and a
        # config that disagrees with the file is reported before anything large is allocated.
        with torch.device("meta"):
            expected = cls(config).state_dict()
        tensors = read_tensors(source.path, expected)
        model = cls(config)
        # assign=True adopts the loaded tensors instead of copying them into freshly initialised ones.
        model.load_state_dict(tensors, strict=True, assign=True)
        model.source = source
        return model.to(map_location).eval()

    def push_to_hub(self, repo_id: str, *, revision: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                    commit_message: Optional[str] = None, private: bool = False, token: Optional[str] = None,
                    create_pr: bool = False) -> str:
        """Save the model and commit ``model.safetensors``, ``config.json`` and a model card to a Hub repo.

        The checkpoint is written and read back strictly before anything is uploaded, so a file
        that would not load is never published.

        Args:
            repo_id: ``"org/name"``; created if missing.
            revision: branch to commit to (default: main).
            dtype: e.g. torch.float16 to halve the upload.
            commit_message: default names the file's sha256.
            private: create the repo private.
            token: Hub token (default: HF_TOKEN or the saved login).
            create_pr: open a pull request instead of committing to the branch.

        Returns:
            The sha of the new commit: ``from_pretrained(repo_id, revision=commit)`` loads exactly
            these bytes (the file's sha256 is in the commit message and the model card).
        """
        with tempfile.TemporaryDirectory(prefix="m2l2-push-") as tmp:
            path = self.save_pretrained(tmp, dtype=dtype)
            source = type(self).from_pretrained(path).source  # strict read-back, and the file's sha256
            assert source is not None
            digest = source.sha256
            Path(tmp, "README.md").write_text(_model_card(repo_id, self.config, digest), encoding="utf-8")
            commit = upload_folder(tmp, repo_id, revision=revision, private=private, token=token,
                                   create_pr=create_pr,
                                   commit_message=commit_message or f"music2latent2 checkpoint (sha256 {digest})")
        return commit


def _model_card(repo_id: str, config: ModelConfig, sha256: str) -> str:
    kind = {1: "mono", 2: "stereo"}.get(config.audio_channels, f"{config.audio_channels}-channel")
    return f"""---
library_name: music2latent2
license: mit
tags:
- audio
- music
- autoencoder
- consistency-model
---

# {repo_id}

A [Music2Latent2](https://arxiv.org/abs/2501.17578) checkpoint: {kind} audio at {config.sample_rate} Hz,
{config.summary_tokens} summary embeddings of {config.latent_dim} dimensions per chunk of {config.chunk_frames}
STFT frames ({config.latents_per_second:.1f} latent vectors per second).

```python
from music2latent2 import EncoderDecoder

encdec = EncoderDecoder("{repo_id}", revision="<commit>")
```

`model.safetensors` sha256: `{sha256}`
"""
