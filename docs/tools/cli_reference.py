"""Write the CLI reference pages (docs/reference/cli/*.md) from the Typer app itself.

Never written by hand: every page is made from the commands' own help, parameters, choices
and defaults, so the reference cannot drift from `igpt COMMAND -h`. Run by `make docs`:

    python docs/tools/cli_reference.py docs/reference/cli
"""
from __future__ import annotations

import html
import sys
from pathlib import Path

import typer

from igpt_cli.cli import app


def _context(cmd, name: str):
    return cmd.context_class(cmd, info_name=name)


def _commands(group, prefix: str = ""):
    """(full name, command) of every visible command, sub-commands of groups included.
    Typer carries its own copy of click, so kinds are told by what they have, not by class."""
    ctx = _context(group, "igpt")
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if cmd is None or cmd.hidden:
            continue
        full = f"{prefix} {name}".strip()
        if hasattr(cmd, "list_commands"):
            yield from _commands(cmd, full)
        else:
            yield full, cmd


def _cell(text: str) -> str:
    return " ".join(str(text or "").split()).replace("|", "\\|")


def _code(text: str) -> str:
    """A table cell in code type: raw <code>, since a `\\|` inside backticks would show its backslash."""
    return "<code>" + html.escape(" ".join(str(text).split())).replace("|", "&#124;") + "</code>"


def command_page(name: str, cmd) -> str:
    ctx = _context(cmd, f"igpt {name}")
    usage = " ".join(cmd.collect_usage_pieces(ctx))
    help_text = (cmd.help or "").strip()
    summary, _, rest = help_text.partition("\n\n")
    lines = [f"# igpt {name}", "", summary.strip(), "", "```", f"igpt {name} {usage}", "```", ""]
    paragraphs = [par.strip() for par in rest.split("\n\n") if par.strip()]
    examples = [par.removeprefix("Example:").strip() for par in paragraphs if par.startswith("Example: ")]
    lines += [par + "\n" for par in paragraphs if not par.startswith("Example: ")]
    if examples:   # the help's `Example:` lines, a shell session that runs as written (tests/test_docs_commands.py)
        lines += ["## Examples", "", "```sh", *examples, "```", ""]
    rows = [(p.param_type_name, p.get_help_record(ctx)) for p in cmd.params if not p.hidden]
    for kind, title in (("argument", "Arguments"), ("option", "Options")):
        records = [r for k, r in rows if k == kind and r]
        if records:
            lines += [f"## {title}", "", f"| {kind} | meaning |", "|---|---|"]
            lines += [f"| {_code(flags)} | {_cell(text)} |" for flags, text in records]
            lines.append("")
    return "\n".join(lines)


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    group = typer.main.get_command(app)
    index = ["# Command reference", "", "Generated from the `igpt` application itself "
             "(`docs/tools/cli_reference.py`); `igpt COMMAND -h` shows the same.", "",
             "| command | what it does |", "|---|---|"]
    for name, cmd in _commands(group):
        slug = name.replace(" ", "-")
        (out / f"{slug}.md").write_text(command_page(name, cmd) + "\n")
        summary = (cmd.help or "").strip().split("\n\n")[0]
        index.append(f"| [`igpt {name}`]({slug}.md) | {_cell(summary)} |")
    (out / "index.md").write_text("\n".join(index) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/reference/cli")
