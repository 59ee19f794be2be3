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

from pathlib import Path
from typing import Callable

from .checkpoint import CheckpointError
from .hub import cached_models, hub_snapshot, is_hub_id, model_summary

from ..bundled import BUNDLED  # the bundled models live in one place (light: no torch)


def resolve_model_dir(model: str | Path, *, revision: str | None = None, local_files_only: bool = False,
                      quiet: bool = False, on_progress=None) -> Path:
    """The Hugging Face ImageGPT directory that `model` names (see the module docstring).

    `revision`, `local_files_only` and `quiet` (no download progress bars) apply to hub ids."""
    p = Path(model)
    if p.is_dir():
        return p
    if str(model) in BUNDLED:
        return BUNDLED[str(model)]
    if Path(f"{model}.index").is_file():
        from .convert import converted_model_dir

        return converted_model_dir(p, on_progress=on_progress)
    if is_hub_id(str(model)) and not p.exists():
        return hub_snapshot(str(model), revision=revision, local_files_only=local_files_only, quiet=quiet)
    names = ", ".join(BUNDLED)
    raise CheckpointError(f"{model}: model not found (expected a model directory, a bundled name ({names}), "
                          "a TensorFlow checkpoint prefix or a Hugging Face hub id like openai/imagegpt-small)")


def list_models(on_warning: Callable[[str], None] | None = None) -> list[dict]:
    """The bundled models and every ImageGPT snapshot in the Hugging Face cache, one dict each
    (name, source, layers, width, heads, positions, resolution, palette, parameters, size_bytes,
    revision, path): what `igpt models` shows. A cache entry that cannot be read safely is
    skipped and said to `on_warning` (one line each)."""
    bundled = [model_summary(name, d, source="bundled") for name, d in BUNDLED.items()]
    return [r for r in bundled if r is not None] + cached_models(on_warning)
