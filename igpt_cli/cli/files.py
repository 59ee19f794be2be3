"""`igpt info` and `igpt show`: what an igpt file holds."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import Overwrite, Quiet
from .ui import handles_input_errors, print_json, render_file_info


@handles_input_errors
def info_command(
    file: Annotated[Path, typer.Argument(help="Any igpt file (tokens or features).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    quiet: Quiet = False,
) -> None:
    """Summarize an igpt file: kind, shapes, classes and counts, attrs.

    Example: igpt info train.h5 --json
    """
    from ..fileinfo import file_info

    d = file_info(file).to_dict()
    if as_json:
        print_json(d)
    else:
        render_file_info(d)


@handles_input_errors
def show_command(
    tokens: Annotated[Path, typer.Argument(help="A tokens file.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Picture to write; its extension names the format (.png, .jpg, .webp, …).")],
    n: Annotated[int, typer.Option("--n", help="Number of images.")] = 64,
    scale: Annotated[int, typer.Option("--scale", help="Integer upscaling of the grid.")] = 2,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Decode tokens through their palette into a PNG grid.

    Example: igpt show train.h5 -o grid.png --n 64
    """
    from ..fileinfo import show_tokens

    print_json(show_tokens(tokens, out, n=n, scale=scale, overwrite=overwrite))


def register(app: typer.Typer) -> None:
    """Add `info`, `show` to the `igpt` app."""
    app.command("info")(info_command)
    app.command("show")(show_command)
