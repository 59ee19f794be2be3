"""The `igpt` command: thin typer commands over the library's stages.

Conventions: results (JSON) go to stdout, progress, tables and logs to stderr; bad input
is one line on stderr and exit status 2, never a traceback. Command functions are named
`<command>_command` and use the library's parameter names, so a library error about
`batch_size=` is reported with the flag the user typed (`ui.say_with_flags`).
"""
from __future__ import annotations

import signal
import sys
from typing import Annotated

import typer
from typer.core import TyperGroup

from .. import __version__
from .ui import click_errors, err, quiet_unraisable, raise_interrupted, raise_terminated, stdout_closed


class OneLineErrors(TyperGroup):
    """Usage errors (unknown option, a value that is not one of the choices, …) as one line, exit 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as e:  # typer has printed the help already
            if e.format_message().strip():
                typer.echo(e.format_message(), err=True)
            raise SystemExit(2)
        except click_errors.UsageError as e:
            where = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
            err.print(f"[bold red]error:[/] {e.format_message().replace('Value error, ', '')}{where}", highlight=False, soft_wrap=True)
            raise SystemExit(2)
        except click_errors.ClickException as e:
            err.print(f"[bold red]error:[/] {e.format_message()}", highlight=False, soft_wrap=True)
            raise SystemExit(e.exit_code)
        except typer.Abort:
            err.print("aborted")
            raise SystemExit(1)
        raise SystemExit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name="igpt",
    cls=OneLineErrors,
    help="Image GPT as an unsupervised feature extractor: quantize → extract → probe; train and demo.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"igpt {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """igpt — quantize images to palette tokens, extract iGPT features, probe them, train and demo."""


def main() -> None:
    """Console-script entry point (`igpt`): SIGTERM unwinds like Ctrl-C, so temp files are removed."""
    signal.signal(signal.SIGTERM, raise_terminated)
    signal.signal(signal.SIGINT, raise_interrupted)
    sys.unraisablehook = quiet_unraisable
    try:
        app(prog_name="igpt")
    except BrokenPipeError:  # outside a command (help, usage): the same quiet end
        sys.exit(stdout_closed())


# Commands live in one module per theme, each adding its own with `register(app)`; the order
# here is the order of `igpt --help`.
from . import convert, dataset, features, files, generation, probing, sweep, training  # noqa: E402

for _module in (dataset, files, features, convert, probing, generation, training, sweep):
    _module.register(app)
