"""Every command the documentation marks runnable runs offline, as written (issue 22).

The marker is the HTML comment `<!-- runs-offline -->` alone on a line, followed (blank lines
allowed) by a fenced code block. In a `console` block only the `$ ` lines (and their `\\`
continuation lines) are commands; any other block runs as a whole bash script (`set -euo
pipefail`: every command of a pipeline must succeed, so do not cut output short with `| head`
in a marked block — the writer then dies of SIGPIPE, exit 141 — use `grep` or `--json` instead). The marked blocks of one Markdown file run in order, in one fresh working directory
(`docs_workspace`) that holds:

- `demo-cifar10.tar`: the shipped demo data (CIFAR-10, `train/<class>/*.jpg`, `test/<class>/*.jpg`);
- `photos/<class>/` (cat, dog, ship; 10 photos each) and `new-photos/<class>/` (2 each): plain
  image folders taken from the demo tar's test split;
- `igpt` (this checkout) and `python` on PATH; the shipped model is `igpt-cifar8`; no network
  (`HF_HUB_OFFLINE=1`).

README.md, every docs/**/*.md and this test's fixture page are scanned; a file with no marked
block has nothing to run (it is not collected). The `Example:` lines of every command's `-h` run
too, in the same kind of workspace (the end of this file).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from helpers import ENV, ROOT

MARKER = "<!-- runs-offline -->"
DEMO_DATA = ROOT / "igpt_cli" / "assets" / "demo-cifar10.tar"
FIXTURE = Path(__file__).parent / "fixtures" / "docs_commands.md"
PHOTO_CLASSES, PHOTOS, NEW_PHOTOS = ("cat", "dog", "ship"), 10, 2


def marked_blocks(text: str, where: str = "<text>") -> list[tuple[int, str]]:
    """(line number of the fence, the script) of each block marked runnable, in order.

    ValueError for a marker not followed by a fenced block, or a block never closed."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() != MARKER:
            i += 1
            continue
        marker_line = i + 1
        i += 1
        while i < len(lines) and not lines[i].strip():
            i += 1
        opening = lines[i].strip() if i < len(lines) else ""
        fence = opening[:3]
        if fence not in ("```", "~~~"):
            raise ValueError(f"{where}:{marker_line}: {MARKER} is not followed by a fenced code block")
        fence = opening[:len(opening) - len(opening.lstrip(fence[0]))]   # ``` or ```` …
        info, start = opening[len(fence):].strip().split(" ")[0], i + 1
        i += 1
        while i < len(lines) and not (lines[i].strip().startswith(fence) and not lines[i].strip().strip(fence[0])):
            i += 1
        if i == len(lines):
            raise ValueError(f"{where}:{start}: the code block marked runnable is never closed")
        body = lines[start:i]
        blocks.append((start, _console_commands(body) if info == "console" else "\n".join(body)))
        i += 1
    return blocks


def _console_commands(body: list[str]) -> str:
    """The commands of a console transcript: `$ ` lines and the lines their trailing `\\` continues."""
    out, continued = [], False
    for line in body:
        if continued or line.lstrip().startswith("$ "):
            text = line if continued else line.lstrip()[2:]
            out.append(text)
            continued = text.rstrip().endswith("\\")
    return "\n".join(out)


def documented_pages() -> list[Path]:
    """README.md, docs/**/*.md and the fixture page, those with a marked block."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), FIXTURE]
    return [p for p in pages if p.is_file() and MARKER in p.read_text(encoding="utf-8")]


def docs_workspace(tmp: Path) -> tuple[Path, dict]:
    """The working directory the marked blocks run in, and their environment (see the module docstring)."""
    work, bin_dir = tmp / "work", tmp / "bin"
    work.mkdir()
    bin_dir.mkdir()
    (work / "demo-cifar10.tar").symlink_to(DEMO_DATA)
    with tarfile.open(DEMO_DATA) as tar:
        names = sorted(m.name for m in tar.getmembers() if m.isfile())
        for c in PHOTO_CLASSES:
            mine = [n for n in names if n.startswith(f"test/{c}/")]
            for folder, picked in (("photos", mine[:PHOTOS]), ("new-photos", mine[-NEW_PHOTOS:])):
                (work / folder / c).mkdir(parents=True)
                for n in picked:
                    (work / folder / c / Path(n).name).write_bytes(tar.extractfile(n).read())
    # wrappers, not symlinks: a symlinked venv python would not find its venv (its packages)
    for name, command in (("igpt", f'"{sys.executable}" -m igpt_cli'), ("python", f'"{sys.executable}"')):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    env = dict(ENV, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", COLUMNS="100")
    return work, env


def test_marked_blocks_are_found_as_written():
    text = FIXTURE.read_text()
    blocks = marked_blocks(text, "fixture")
    assert [line for line, _ in blocks] == [7, 16]   # the fences
    assert blocks[0][1] == ("igpt features photos/ -m igpt-cifar8 --layer 6 -o feats.h5   # a comment is fine\n"
                            'igpt info feats.h5 | grep "30 rows"')
    assert blocks[1][1] == "igpt probe feats.h5 \\\n    --save-probes probes.h5"   # output lines are not run
    assert all("no-such-command" not in script for _, script in blocks)  # unmarked blocks do not run
    assert marked_blocks("````sh\nx\n````\n" + MARKER + "\n````sh\na\n```\nb\n````\n") == [(5, "a\n```\nb")]
    assert marked_blocks("$ x\n" + MARKER + "\n```console\n$ igpt a \\\n  --b\nout\n$ igpt c\n```") == \
        [(3, "igpt a \\\n  --b\nigpt c")]
    with pytest.raises(ValueError, match=r"page:1: <!-- runs-offline --> is not followed by a fenced code block"):
        marked_blocks(MARKER + "\nprose\n```sh\nx\n```", "page")
    with pytest.raises(ValueError, match="never closed"):
        marked_blocks(MARKER + "\n```sh\nx\n")


def test_a_failing_marked_command_fails(tmp_path):
    """The runner really checks exit codes: a block whose command fails (mid-block, mid-pipe) is reported."""
    work, env = docs_workspace(tmp_path)
    assert sorted(p.name for p in work.iterdir()) == ["demo-cifar10.tar", "new-photos", "photos"]
    assert len(list((work / "photos" / "cat").iterdir())) == PHOTOS
    for script in ("false\ntrue", "false | cat"):
        assert run_block(script, work, env).returncode != 0, script
    r = run_block('python -c "import h5py, igpt_cli; print(igpt_cli.__file__)"', work, env)   # this checkout's igpt
    assert r.returncode == 0 and Path(r.stdout.strip()).parent == ROOT / "igpt_cli"
    assert Path(run_block("command -v igpt", work, env).stdout.strip()) == tmp_path / "bin" / "igpt"


def run_block(script: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("page", documented_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_commands_run_as_written(tmp_path, page):
    blocks = marked_blocks(page.read_text(encoding="utf-8"), str(page.relative_to(ROOT)))
    work, env = docs_workspace(tmp_path)
    for line, script in blocks:
        r = run_block(script, work, env)
        assert r.returncode == 0, (f"{page.relative_to(ROOT)}:{line}: exit {r.returncode}\n{script}\n"
                                   f"--- stderr ---\n{r.stderr[-3000:]}")


# --- The `Example:` lines of `igpt CMD -h` ---------------------------------------------------------
# Each command's help ends with one or more `Example: igpt …` lines (its docstring, so the help a user
# reads is what runs here). Run in the order `igpt -h` lists the commands, they form one session in
# one docs_workspace: quantize writes train.h5/test.h5, extract their features, probe saves probes.h5
# for predict, train writes runs/tiny for info, … A `# comment` after the command is for the reader
# (the shell ignores it). `demo` is the one left out here: test_demo.py runs `igpt demo --out DIR`
# end to end (a minute or more), and the check below holds its example to that form.
EXAMPLE = re.compile(r"^\s*Example: (igpt .*)$", re.M)
RUN_ELSEWHERE = {"demo": re.compile(r"igpt demo --out [\w./-]+")}


def help_examples() -> list[tuple[str, str]]:
    """(command, example line) of every command of the app, in `igpt -h` order (PANELS), each
    command's examples in the order its help gives them."""
    from typer.main import get_command

    from igpt_cli.cli import app
    from igpt_cli.cli.app import PANELS

    commands = {}
    for name, cmd in get_command(app).commands.items():
        for sub, c in (getattr(cmd, "commands", None) or {None: cmd}).items():
            commands[f"{name} {sub}" if sub else name] = c
    rank = {p: i for i, p in enumerate(PANELS)}
    order = sorted(commands, key=lambda n: rank.get(n.split()[0], len(rank)))
    return [(name, line.strip()) for name in order for line in EXAMPLE.findall(commands[name].help or "")]


def test_every_command_has_help_examples_in_one_chain():
    from typer.main import get_command

    from igpt_cli.cli import app

    examples = help_examples()
    named = {n for n, _ in examples}
    groups = get_command(app).commands
    assert named == {f"{g} {s}" if getattr(c, "commands", None) else g
                     for g, c in groups.items() for s in (getattr(c, "commands", None) or [None])}
    for name, line in examples:
        assert shlex.split(line, comments=True)[:len(name.split()) + 1] == ["igpt", *name.split()], line
    for name, pattern in RUN_ELSEWHERE.items():
        assert all(pattern.fullmatch(shlex.join(shlex.split(l, comments=True))) for n, l in examples if n == name)
    assert [n for n, _ in examples][:3] == ["demo", "quantize", "quantize"]  # -h order, several per command


def test_help_examples_run_in_order_as_written(tmp_path, monkeypatch):
    """Every `Example:` line, in order, in one workspace, in this process (an interpreter per command
    would cost ~2 s of imports each); the stand-in for an OpenAI checkpoint is the 2-layer one that
    TensorFlow wrote for test_convert.py, where convert's example expects the real one."""
    from helpers import invoke

    work, env = docs_workspace(tmp_path)
    ckpt = work / "models" / "s"
    ckpt.mkdir(parents=True)
    for p in (ROOT / "tests" / "fixtures" / "tf" / "ar").glob("model.ckpt-7.*"):
        shutil.copy(p, ckpt / p.name.replace("ckpt-7", "ckpt-1000000"))
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "COLUMNS"):
        monkeypatch.setenv(k, env[k])
    monkeypatch.chdir(work)
    examples, ran = help_examples(), set()
    for name, line in examples:
        if name in RUN_ELSEWHERE:
            continue
        t0 = time.perf_counter()
        r = invoke(*shlex.split(line, comments=True)[1:])
        print(f"{time.perf_counter() - t0:5.1f} s  {line}")   # pytest -s: where the time goes
        assert r.returncode == 0, f"`{line}` (igpt {name} -h): exit {r.returncode}\n{r.stderr[-3000:]}"
        ran.add(name)
    assert ran == {n for n, _ in examples} - set(RUN_ELSEWHERE) and len(ran) >= 16
