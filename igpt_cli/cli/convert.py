"""`igpt convert`: OpenAI's original TensorFlow checkpoints into Hugging Face ImageGPT directories."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import Json, Quiet, out_option
from .ui import ProgressBar, handles_input_errors, maybe_bar, print_json


@handles_input_errors
def convert_command(
    prefix: Annotated[Path, typer.Argument(metavar="ckpt_prefix", help=(
        "TensorFlow checkpoint prefix from openai/image-gpt's download.py, e.g. models/s/model.ckpt-1000000 "
        "(its .index and .data-NNNNN-of-NNNNN shards beside it)."))],
    out: Annotated[Path, out_option("Directory to write (config.json, model.safetensors, "
                                    "preprocessor_config.json); must not exist or be empty.")],
    clusters: Annotated[Optional[Path], typer.Option("--clusters", help=(
        "Colour clusters (download.py --clusters: kmeans_centers.npy). Default: kmeans_centers.npy beside the "
        "checkpoint or in its parent directories, else the official palette shipped with igpt."))] = None,
    quiet: Quiet = False,
    as_json: Json = False,
) -> None:
    """Convert an original iGPT TensorFlow checkpoint (any size, any step, autoregressive or BERT) without
    TensorFlow. Autoregressive models load in transformers; BERT models in igpt (extract).

    Example: igpt convert models/s/model.ckpt-1000000 -o igpt-s/
    """
    from ..model.convert import convert_checkpoint

    bar = ProgressBar.maybe(quiet)
    with maybe_bar(bar):
        result = convert_checkpoint(prefix, out, clusters=clusters, on_progress=bar)
    print_json(result)


def register(app: typer.Typer) -> None:
    """Add `convert` to the `igpt` app (once: calling it again changes nothing)."""
    if "convert" not in {c.name for c in app.registered_commands}:
        app.command("convert")(convert_command)
