"""What `--model` names, as a Hugging Face ImageGPT directory on disk.

`resolve_model_dir(model)` is the one place a model argument is interpreted; every stage
(extract, features, score, sample, complete, sweep) calls it. In order:

1. an existing directory: itself;
2. a bundled model's short name (`BUNDLED`, e.g. ``igpt-cifar8``): its folder in the package;
3. an OpenAI TensorFlow checkpoint prefix (``…/model.ckpt-1000000``, its ``.index`` beside it):
   converted once into igpt's cache (`convert.converted_model_dir`) and that directory returned;
4. a Hugging Face hub id (``openai/imagegpt-small``, optional `revision`): its snapshot in the
   hub cache, downloaded where allowed (`hub.py`).

Anything else is one CheckpointError naming what was looked for.
"""
from __future__ import annotations

import os
from pathlib import Path

from .checkpoint import CheckpointError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED: dict[str, Path] = {  # short name -> directory shipped in the package
    "igpt-cifar8": ASSETS / "igpt-cifar8",
}


def resolve_model_dir(model: str | Path, *, revision: str | None = None, on_progress=None) -> Path:
    """The Hugging Face ImageGPT directory that `model` names (see the module docstring)."""
    p = Path(model)
    if p.is_dir():
        return p
    if str(model) in BUNDLED:
        return BUNDLED[str(model)]
    if Path(f"{model}.index").is_file():
        from .convert import converted_model_dir

        return converted_model_dir(p, on_progress=on_progress)
    if "/" in str(model) and not str(model).startswith((".", "/", "~")):
        return _hub_snapshot(str(model), revision)
    raise CheckpointError(f"{model}: model directory not found")


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    # placeholder until hub.py: the newest snapshot in the local cache
    hub = Path(os.environ.get("HF_HUB_CACHE")
               or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    snaps = sorted((hub / f"models--{repo_id.replace('/', '--')}" / "snapshots").glob("*/config.json"),
                   key=lambda c: c.stat().st_mtime)
    if not snaps:
        raise CheckpointError(f"{repo_id}: model directory not found")
    return snaps[-1].parent
