"""Command-line interface: thin typer commands over the library functions.

Conventions: results (JSON) go to stdout, progress and tables to stderr; bad input
is one line on stderr and exit status 2 (`InputError`), never a traceback.
"""
from __future__ import annotations

import functools
import sys

import typer
from rich.console import Console

from .errors import InputError

app = typer.Typer(
    name="igpt",
    help="Image GPT as an unsupervised feature extractor: quantize → extract → probe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)


def fail(msg: str) -> None:
    err.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def handles_input_errors(fn):
    """Turn InputError (and Ctrl-C) into one clean line and an exit status."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as e:
            fail(str(e))
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130)

    return wrapper


@app.callback()
def main() -> None:
    """igpt — quantize images to palette tokens, extract iGPT features, probe them."""


# --- quantize / palette / info / show commands (issue 2) ---

# --- extract commands (issue 3) ---

# --- probe commands (issue 4) ---

# --- train / demo commands (issue 5) ---


def run() -> None:  # pragma: no cover
    app(prog_name="igpt")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
