"""Everything the command line draws on stderr: error lines, the one progress bar, tables.

Library code only emits `ProgressEvent`s and raises `InputError`s; this module turns
them into what a user sees. stdout is reserved for results.

The rules every command follows (`igpt -h` says them too):
- `--json`: stdout is exactly one JSON document. Commands whose result is a file they write
  (quantize, palette fit, extract, features, show, convert, sample, complete, train, sweep)
  print that JSON summary always, and accept the flag; info, models, score, probe, predict
  and demo print for people unless it is given.
- `-q/--quiet`: nothing on stderr but errors and warnings (no progress bar, progress lines
  or tables); what a command prints on stdout is unchanged.
- Ctrl-C: one line saying how far the run got and how to resume it, exit 130.
"""
from __future__ import annotations

import errno
import functools
import json
import re
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TaskID, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

from .. import progress
from ..errors import InputError, plural  # noqa: F401  (plural: the CLI's counts too)
from ..progress import ProgressEvent

try:  # typer >= 0.22 vendors its own click; older ones use click itself
    from typer._click import exceptions as click_errors
    from typer._click.globals import get_current_context
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as click_errors
    from click import get_current_context

err = Console(stderr=True)


def print_json(result) -> None:
    """A result (dataclass with to_dict, or a dict) as one JSON document on stdout."""
    d = result.to_dict() if hasattr(result, "to_dict") else result
    typer.echo(json.dumps(d, default=str))


def show_flags_without_type(option_class) -> None:
    """On/off flags are shown as `--quiet`, not `--quiet <bool>`: typer's help prints a type for every
    option; this drops it for flags (options that take no value), once, for the class given."""
    if getattr(option_class, "_igpt_flags_untyped", False):
        return
    shown = option_class.display_type_rich

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) else shown(self, ctx)

    option_class.display_type_rich = display_type_rich
    option_class._igpt_flags_untyped = True


def print_table(table, console: Console = err) -> None:
    """A rich table on stderr, never cut: in a terminal at its width; in a file or pipe (no width to
    fit) at the table's own natural width, so a log holds every number in full."""
    if console.is_terminal:
        console.print(table)
        return
    from rich.measure import Measurement

    width = Measurement.get(console, console.options.update(width=10_000), table).maximum
    Console(file=console.file, width=max(width, console.width), no_color=console.no_color).print(table)


def fail(msg: str, code: int = 2) -> None:
    from rich.markup import escape

    # the message is text, not markup: "[N, 64]" or "score.weight [labels, dims]" stay as written
    err.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True, markup=True)
    raise typer.Exit(code)


def flag_names() -> dict[str, str]:
    """Python parameter name -> its long flag, for the command now running (`batch_size` -> `--batch-size`).

    Command functions use the library's parameter names, so a library message that names
    `batch_size=` can be said with the flag the user typed."""
    ctx = get_current_context(silent=True)
    if ctx is None:
        return {}
    out = {}
    for p in ctx.command.params:
        if getattr(p, "param_type_name", "") == "option" and p.name:
            longs = [o for o in p.opts if o.startswith("--")]
            out[p.name] = (longs or p.opts)[0]
    return out


def say_with_flags(message: str) -> str:
    """Rewrite `param=value` (and `param=True`) in a library message as the command's flags."""
    for name, flag in sorted(flag_names().items(), key=lambda kv: -len(kv[0])):
        message = re.sub(rf"(?<![\w-]){re.escape(name)}=True\b", flag, message)
        message = re.sub(rf"(?<![\w-]){re.escape(name)}=", f"{flag} ", message)
    return message


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that it unwinds like Ctrl-C (temp files removed)."""


def raise_terminated(signum, frame):
    """SIGTERM handler: raise now, and leave a request the library's next progress event honours
    in case this exception is swallowed where it lands (see `igpt_cli.progress.request_stop`)."""
    progress.request_stop(Terminated)
    raise Terminated()


def raise_interrupted(signum, frame):
    """SIGINT handler: Python's own, plus the same safety net as `raise_terminated`."""
    progress.request_stop(KeyboardInterrupt)
    raise KeyboardInterrupt()


def quiet_unraisable(unraisable) -> None:
    """`sys.unraisablehook`: a Ctrl-C or SIGTERM that lands in a destructor or a weakref callback
    cannot propagate there (Python would print "Exception ignored in: …"); it is dropped, and the
    stop request left by the handler ends the run at the library's next progress event."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        return
    sys.__unraisablehook__(unraisable)


SIGPIPE_EXIT = 128 + 13  # how a shell reports a Unix tool ended by SIGPIPE (`yes | head`)


def stdout_closed() -> int:
    """The reader of stdout went away (`igpt … | head`): what the command wrote to files is complete;
    say nothing (as Unix tools do), point stdout at /dev/null so that the interpreter's last flush
    cannot complain either, and return the exit status of a tool ended by SIGPIPE."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return SIGPIPE_EXIT


def os_error_line(e: OSError) -> str:
    """One line for an OSError that escaped the library (disk full, permissions, I/O errors)."""
    where = e.filename or ""
    if e.errno == errno.ENOSPC:
        return f"no space left on device ({where or 'while writing'})"
    what = e.strerror or str(e) or type(e).__name__
    return f"{where}: {what}" if where else what


RESUMES = "rerun the same command to resume (finished work is kept)"
NOT_RESUMABLE = "nothing was written"
_reached: list = [None]  # the last progress event the bar drew: how far an interrupted run got


def interrupted_line(what: str, hint: str) -> str:
    """`interrupted at extract 512/3,000 images; rerun the same command to resume …` (one line)."""
    ev = _reached[0]
    where = ""
    if ev is not None:
        count = f"{ev.done:,}" if ev.total is None else f"{ev.done:,}/{ev.total:,}"
        unit = ev.unit if ev.total == 1 or (ev.total is None and ev.done == 1) else f"{ev.unit}s"
        where = f" at {ev.task} {count} {unit}"
    return f"{what}{where}; {hint}"


def handles_input_errors(fn=None, *, resume: str | None = None):
    """One clean line on stderr and an exit status for everything a user can cause.

    InputError → its message with the command's flags, exit 2; Ctrl-C → 130, SIGTERM → 143
    (after the library's cleanup ran), in one line saying how far the run got and `resume`
    (how a rerun resumes; default: a resumable command's hint when the command has a
    `restart` parameter, else that nothing was written); and, as a last resort, MemoryError
    and OSError (disk full, I/O errors) → one line, exit 2, never a traceback.
    Use as `@handles_input_errors` or `@handles_input_errors(resume="…")`.
    """
    if fn is None:
        return functools.partial(handles_input_errors, resume=resume)
    import inspect

    hint = resume or (RESUMES if "restart" in inspect.signature(fn).parameters else NOT_RESUMABLE)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _reached[0] = None
        try:
            return fn(*args, **kwargs)
        except InputError as e:
            if e.quiet:  # another process already reported it (distributed runs)
                raise typer.Exit(2)
            fail(say_with_flags(str(e)))
        except Terminated:
            progress.clear_stop()
            err.print(interrupted_line("terminated", hint), highlight=False, markup=False, soft_wrap=True)
            raise typer.Exit(143)
        except KeyboardInterrupt:
            progress.clear_stop()
            err.print(interrupted_line("interrupted", hint), highlight=False, markup=False, soft_wrap=True)
            raise typer.Exit(130)
        except MemoryError:
            fail("out of memory (try a smaller --batch-size or fewer images)")
        except BrokenPipeError:
            raise typer.Exit(stdout_closed())
        except OSError as e:
            fail(os_error_line(e))

    return wrapper


class _Rate(ProgressColumn):
    def render(self, task):  # noqa: D401
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "")
        return Text(f"{speed:.1f} {unit}/s" if speed else f"– {unit}/s")


class ProgressBar:
    """The CLI's one progress bar: renders the library's ProgressEvents on stderr.

    One bar per run of a task (a new bar on `started` events or when the task changes);
    `message` events are printed as whole lines (never wrapped, so JSON log lines stay
    parseable); `result` events are handed to `on_result` (e.g. the probe prints one line
    per finished layer). Bars are drawn only when stderr is a terminal: in logs and pipes
    only the lines appear. Use as a context manager and pass the instance as `on_progress`;
    `ProgressBar.maybe(quiet)` is None when quiet, so the library skips all reporting.
    """

    def __init__(self, on_result=None, console: Console = err):
        self.on_result = on_result
        self.console = console
        self.progress: Progress | None = None
        if console.is_terminal:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(),
                                     TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                     TextColumn("{task.fields[info]}"), console=console, transient=False)
        self.task: TaskID | None = None
        self.task_name: str | None = None

    @classmethod
    def maybe(cls, quiet: bool, on_result=None) -> "ProgressBar | None":
        return None if quiet else cls(on_result)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.progress is not None and self.task is not None:
            if exc_type is not None:  # a failed stage leaves no half bar above its one-line error
                for task in list(self.progress.task_ids):
                    self.progress.remove_task(task)
            self.progress.stop()
        return False

    def __call__(self, ev: ProgressEvent) -> None:
        out = self.progress.console if self.progress is not None else self.console
        if ev.message:
            out.print(say_with_flags(ev.message), highlight=False, markup=False, soft_wrap=True)
        if ev.result is not None and self.on_result is not None:
            self.on_result(ev.result, out)
        if ev.total is not None or ev.done:
            _reached[0] = ev
        if self.progress is None or (ev.total is None and ev.done == 0 and not ev.started):
            return  # no terminal, or a pure log event of a task without a bar
        if ev.started or self.task is None or ev.task != self.task_name:
            if self.task is None:
                self.progress.start()
            else:
                self.progress.stop_task(self.task)
            self.task = self.progress.add_task(ev.task, total=ev.total, completed=ev.done, info=ev.info,
                                               unit=ev.unit)
            self.task_name = ev.task
            return
        self.progress.update(self.task, total=ev.total, completed=ev.done, info=ev.info)


def maybe_bar(bar: ProgressBar | None):
    """A context for an optional bar (quiet runs pass None)."""
    import contextlib

    return bar if bar is not None else contextlib.nullcontext()


def launched_run(quiet: bool):
    """`with launched_run(quiet) as (dist, bar):` this process's place in a launch (torchrun,
    srun, or one process: `DistContext.from_env`) and the progress bar (rank 0 only, unless
    quiet); the process group is left at the end. Callers print their JSON only on rank 0."""
    import contextlib

    from ..distributed import DistContext

    @contextlib.contextmanager
    def run():
        dist = DistContext.from_env()
        bar = ProgressBar.maybe(quiet or not dist.is_main)
        try:
            with maybe_bar(bar):
                yield dist, bar
        finally:
            dist.close()

    return run()


# --- tables --------------------------------------------------------------------------------
def probe_layer_line(r, console: Console) -> None:
    console.print(f"layer {_layer_text(r.to_dict())}: val {r.val_acc:.2%} ({_hyper_text(r.to_dict())}) "
                  f"test {r.test_acc:.2%} "
                  f"[{r.seconds:.1f} s]", highlight=False, soft_wrap=True)


def _layer_text(r: dict) -> str:
    """A result's layer, or its concatenated layers ("10+12+14")."""
    return "+".join(map(str, r["layers"])) if r.get("layers") else str(r["layer"])


def _hyper_text(r: dict) -> str:
    """What was chosen or set for a result: C (linear probe) or k (k-NN)."""
    return f"k={r['k']}" if r.get("method") == "knn" else f"C={r['c']:.3g}"


def _ci_text(ci) -> str:
    return f"{ci[0]:.1%}–{ci[1]:.1%}" if ci else ""


def render_probe_table(report: dict, console: Console = err) -> None:
    """The probe report as a table with an inline bar per layer (best layer starred)."""
    from rich.table import Table

    rows = report["layers"]
    if not rows:
        return
    test_accs = [r["test_acc"] for r in rows]
    lo, hi = min(test_accs), max(test_accs)
    width = max(4, min(30, console.width - 86))  # the bar gives way on a narrow terminal, never the numbers
    held = "held-out {:.0%} of train".format(report["test_fraction"]) if report["test_mode"] == "held_out" \
        else Path(report["test"]).name
    method = "k-NN" if report.get("protocol", {}).get("method") == "knn" else "linear probe"
    title = f"{method} · {report.get('model')} · site={report.get('site')} · test: {held}"
    t = Table(title=title, title_justify="left")
    t.add_column("layer", justify="right")
    t.add_column("val acc", justify="right")
    t.add_column("C / k", justify="right")
    t.add_column("test acc", justify="right")
    t.add_column("95 % CI", justify="right")
    t.add_column("passes", justify="right")
    t.add_column("s", justify="right")
    t.add_column(f"{lo:.0%}→{hi:.0%}", no_wrap=True)
    for r in rows:
        frac = 1.0 if hi == lo else (r["test_acc"] - lo) / (hi - lo)
        n = 1 + int(round(frac * (width - 1)))
        is_best = r["layer"] == report["best_layer"]
        style = "bold green" if is_best else None
        bar = Text("█" * n, style="green" if is_best else "cyan")
        t.add_row(_layer_text(r) + (" ★" if is_best else ""), f"{r['val_acc']:.2%}", _hyper_text(r),
                  f"{r['test_acc']:.2%}", _ci_text(r.get("test_acc_ci")), str(r.get("n_passes", "")),
                  f"{r['seconds']:.1f}", bar, style=style)
    console.print(t)
    r0 = rows[0]
    how = "a 10 % validation split" if r0.get("selection", "holdout") == "holdout" else \
        f"{r0['selection']} cross-validation"
    chosen = f"validation: leave-one-out k-NN on {r0['n_val']} training rows" if r0.get("method") == "knn" \
        else f"C chosen on {r0['n_val']} rows ({how})"
    best = next((_layer_text(r) for r in rows if r["layer"] == report["best_layer"]), report["best_layer"])
    notes = [f"best layer (by validation accuracy): {best}", chosen, f"{report['seconds']:.1f} s"]
    for r in rows:
        if r.get("few_shot"):
            notes.append(f"few-shot, layer {_layer_text(r)}: " + ", ".join(
                f"{f['shots']}-shot {f['test_acc_mean']:.1%} ± {f['test_acc_std']:.1%}" for f in r["few_shot"])
                + f" (test accuracy over {r['few_shot'][0]['seeds']} draws)")
    if report["test_mode"] == "held_out":
        notes.append(f"no --test file: a stratified {report['test_fraction']:g} of {Path(report['train']).name} "
                     "is held out as the test set")
    if report["not_converged_fits"]:
        notes.append(f"{report['not_converged_fits']} fits stopped at max_iter before converging")
    console.print("; ".join(notes), highlight=False)
    for w in report.get("warnings") or []:
        console.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)


_MAX_DATASET_LINES = 12  # `igpt info` lists a file's datasets one a line up to this many (--json: all)


def _info_value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_info_value(x)}" for k, x in v.items())
    return json.dumps(v) if isinstance(v, list) else str(v)


def _info_headline(d: dict) -> str:
    """The first line of `igpt info`: path, kind, version, rows (a partial file: rows done of its length)."""
    version = "" if d["format_version"] is None else f" (format_version {d['format_version']})"
    progress = d.get("progress")
    if progress:
        part = ""
        if "shard" in progress:
            part = f" (part file: rows {progress['shard'][0]}..{progress['shard'][1]} of {progress['rows_total']})"
        rows = (f", partial: {progress['n_done']} of {progress['n_total']} rows done{part}; "
                "run the same command again to finish it")
    else:
        rows = "" if d["n"] is None else f", {d['n']} row" + ("" if d["n"] == 1 else "s")
    return f"{d['path']}: {d['kind']}{version}{rows}"


def render_file_info(d: dict) -> None:
    """`igpt info` in words (stdout: it is the command's result)."""
    typer.echo(_info_headline(d))
    if len(d["datasets"]) <= _MAX_DATASET_LINES:
        for name, s in d["datasets"].items():
            typer.echo(f"  {name:<14} {s['dtype']:<8} {tuple(s['shape'])}")
    else:
        typer.echo(f"  {len(d['datasets'])} datasets (--json lists them)")
    if d.get("class_counts"):
        typer.echo("  classes: " + ", ".join(f"{c} {n}" for c, n in d["class_counts"].items()))
    summary = d.get("summary") or {}
    shown = set(summary) | set(summary.get("features", {}))  # attrs the summary shows: not again below
    for k, v in summary.items():
        if isinstance(v, list) and v and all(isinstance(r, dict) for r in v):  # a table, e.g. a probe per layer
            cols = list(dict.fromkeys(c for r in v for c in r))
            typer.echo(f"  {k}:")
            typer.echo("    " + "  ".join(f"{c:>9}" for c in cols))
            for r in v:
                typer.echo("    " + "  ".join(f"{_info_value(r.get(c, '')):>9}" for c in cols))
        else:
            typer.echo(f"  {k}: {_info_value(v)}")
    for k, v in d["attrs"].items():
        if k not in shown:
            typer.echo(f"  {k}: {v if not isinstance(v, (list, dict)) else json.dumps(v)}")


def render_models(rows: list[dict], console: Console = err) -> None:
    """`igpt models` as a table on stderr (`--json` gives the rows on stdout)."""
    from rich.table import Table

    t = Table(title="iGPT models (bundled, and in the Hugging Face cache)", title_justify="left")
    for col in ("name", "source", "shape", "heads", "res", "params", "size", "revision"):
        # a name is what a user copies: never cut short (the other columns give way)
        t.add_column(col, justify="right" if col in ("heads", "params", "size") else "left", no_wrap=col == "name")
    for r in rows:
        res = f"{r['resolution']}²" if r["resolution"] else f"{r['positions']} pos"
        params = f"{r['parameters'] / 1e6:.1f} M" if r["parameters"] else "?"
        t.add_row(r["name"], r["source"], f"{r['layers']}×{r['width']}", str(r["heads"]), res, params,
                  f"{r['size_bytes'] / 2**20:.1f} MiB", r["revision"] or "")
    print_table(t, console)
    if not any(r["source"] == "hub" for r in rows):
        console.print("no ImageGPT models in the Hugging Face cache; fetch one with: "
                      "hf download openai/imagegpt-small config.json model.safetensors preprocessor_config.json",
                      highlight=False, soft_wrap=True)
