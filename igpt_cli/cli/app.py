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
from typer.core import TyperGroup, TyperOption

from .. import __version__
from .ui import (click_errors, err, quiet_unraisable, raise_interrupted, raise_terminated, show_flags_without_type,
                 stdout_closed)

show_flags_without_type(TyperOption)


HELP = (
    "Image GPT as an unsupervised feature extractor: quantize → extract → probe; train, generate and demo.\n\n"
    "Start with `igpt demo` (offline, about a minute); every command takes -h.\n\n"
    "Flags mean the same everywhere: -o/--out is what a command writes, -m/--model the model (a directory, the "
    "bundled igpt-cifar8, an OpenAI checkpoint or a hub id), -l/--layer a layer spec (12, 8-16, -1, 0,4,8, all). "
    "-q/--quiet leaves only errors and warnings on stderr. --json: stdout is one JSON document (commands that "
    "write a file print it always; info, models, score, probe, predict and demo print for people without it). "
    "Long runs resume when rerun as they were (--restart starts anew); Ctrl-C says how far they got."
)


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
    help=HELP,
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
    """igpt's options before any command (--version)."""


def main() -> None:
    """Console-script entry point (`igpt`): SIGTERM unwinds like Ctrl-C, so temp files are removed."""
    signal.signal(signal.SIGTERM, raise_terminated)
    signal.signal(signal.SIGINT, raise_interrupted)
    sys.unraisablehook = quiet_unraisable
    try:
        app(prog_name="igpt")
    except BrokenPipeError:  # outside a command (help, usage): the same quiet end
        sys.exit(stdout_closed())


# Commands live in one module per theme, each adding its own with `register(app)`; `igpt -h`
# shows them in panels by theme (PANELS: command -> panel), `demo` first as the place to start.
from . import convert, dataset, features, files, generation, probing, sweep, training  # noqa: E402

PANELS = {
    "demo": "Start here",
    "quantize": "Data", "palette": "Data",
    "extract": "Features", "features": "Features", "models": "Features", "convert": "Features",
    "probe": "Probing", "finetune": "Probing", "predict": "Probing",
    "sample": "Generation", "complete": "Generation", "score": "Generation",
    "train": "Training", "sweep": "Training",
    "info": "Files", "show": "Files",
}
PANEL_ORDER = ("Start here", "Data", "Features", "Probing", "Generation", "Training", "Files")

for _module in (training, dataset, files, features, convert, probing, generation, sweep):
    _module.register(app)


def _panel_of(name: str | None) -> str:
    return PANELS.get(name or "", "Other")


def _arrange_commands(app: typer.Typer) -> None:
    """Put every command and group in its panel, panels in PANEL_ORDER and commands in PANELS' order
    (a new command without a panel is shown under "Other", last)."""
    for c in app.registered_commands:
        c.rich_help_panel = _panel_of(c.name)
    for g in app.registered_groups:
        g.rich_help_panel = _panel_of(g.name)
    rank = {p: i for i, p in enumerate(PANEL_ORDER)}
    order = {name: i for i, name in enumerate(PANELS)}
    app.registered_commands.sort(key=lambda c: (rank.get(c.rich_help_panel, len(rank)), order.get(c.name, len(order))))


_arrange_commands(app)
