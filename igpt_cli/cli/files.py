"""`igpt info` and `igpt show`: what an igpt file holds."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import Json, Overwrite, Quiet, out_option
from .ui import err, handles_input_errors, print_json, render_file_info


@handles_input_errors
def info_command(
    file: Annotated[Path, typer.Argument(help=(
        "Any igpt file (tokens, features, scores, probes, predictions, a partial .tmp file), a palette .npy, "
        "a model directory or bundled name, a train_state.pt or a sweep.json."))],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON document on stdout.")] = False,
    quiet: Quiet = False,
) -> None:
    """Summarize an igpt file: kind, shapes, classes and counts, provenance and other attrs.

    A partial file (an interrupted run's .OUT.tmp) says how many rows are done of how many.

    Example: igpt info train.h5 --json

    Example: igpt info igpt-cifar8   # a bundled model (also: a palette .npy, a sweep.json)

    Example: igpt info runs/tiny/train_state.pt   # a training run (igpt train's example)
    """
    from ..fileinfo import file_info

    d = file_info(file).to_dict()
    if as_json:
        print_json(d)
    else:
        render_file_info(d)


@handles_input_errors
def show_command(
    file: Annotated[Path, typer.Argument(help="A tokens file, or a features file (shows the images it came from).")],
    out: Annotated[Path, out_option("Picture to write; its extension names the format (.png, .jpg, .webp, …).")],
    n: Annotated[int, typer.Option("--n", help="Number of images.")] = 64,
    cols: Annotated[Optional[int], typer.Option("--cols", help="Columns of the grid (default: about square).")] = None,
    shuffle: Annotated[bool, typer.Option("--shuffle", help="A random sample of rows (fixed by --seed) instead of the first ones.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of --shuffle.")] = 0,
    per_class: Annotated[Optional[int], typer.Option("--per-class", help=(
        "One labelled row of N images per class, in label order (unlabelled images last); replaces --n."))] = None,
    scale: Annotated[Optional[int], typer.Option("--scale", help=(
        "Integer upscaling of the grid (default: tiles at least 64 px a side, e.g. 8 for 8×8 images, 2 for 32×32)."))] = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    as_json: Json = False,
) -> None:
    """Draw images of a tokens file (decoded through its palette) as a grid picture.

    A features file shows the images its rows came from (its tokens file, or its dataset opened again).

    Example: igpt show train.h5 -o classes.png --per-class 8 --shuffle

    Example: igpt show feats.h5 -o photos.png
    """
    from ..show import show_tokens

    r = show_tokens(file, out, n=n, cols=cols, scale=scale, shuffle=shuffle, seed=seed, per_class=per_class,
                    overwrite=overwrite)
    for w in r.warnings:  # warnings are said even with --quiet
        err.print(f"warning: {w}", highlight=False, markup=False, soft_wrap=True)
    print_json(r)


def register(app: typer.Typer) -> None:
    """Add `info`, `show` to the `igpt` app."""
    app.command("info")(info_command)
    app.command("show")(show_command)
