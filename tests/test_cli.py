"""The command line's own conventions: version, help, choices, one-line errors, flag names in messages."""
from __future__ import annotations

import pytest

from helpers import assert_clean_failure, error_lines, invoke, run_igpt


def test_version():
    from igpt_cli import __version__

    r = run_igpt("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"igpt {__version__}"


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_short_and_long(flag):
    r = invoke(flag)
    assert r.returncode == 0 and "quantize" in r.stdout and "probe" in r.stdout


@pytest.mark.parametrize("command", ["quantize", "extract", "probe", "train", "demo", "info", "show"])
def test_every_command_has_help_with_an_example(command):
    r = invoke(command, "-h")
    assert r.returncode == 0, r.stderr
    assert "Example:" in r.stdout and f"igpt {command}" in r.stdout


def test_choices_listed_in_help():
    out = invoke("extract", "-h").stdout
    for choice in ("float32", "bfloat16", "float16", "resid"):
        assert choice in out


def test_bad_choice_is_rejected_by_the_parser_in_one_line():
    r = run_igpt("extract", "t.h5", "-m", "m", "-o", "o.h5", "--dtype", "float99")
    assert_clean_failure(r, "float99")
    for choice in ("auto", "float32", "bfloat16", "float16"):
        assert choice in r.stderr  # the message lists the choices


@pytest.mark.parametrize("args", [["bogus"], ["quantize", "x", "-o", "y.h5", "--no-such-flag"],
                                  ["quantize", "x", "-o", "y.h5", "--split", "banana"]])
def test_usage_errors_are_one_line_exit_2(args):
    r = run_igpt(*args)
    assert_clean_failure(r)


def test_no_arguments_shows_help():
    r = run_igpt()
    assert r.returncode == 2 and "Usage" in r.stdout + r.stderr and "Traceback" not in r.stderr


def test_library_parameter_names_become_flags(tmp_path):
    from igpt_cli.cli.ui import say_with_flags

    # outside a command there is nothing to rewrite
    assert say_with_flags("batch_size=0: must be at least 1") == "batch_size=0: must be at least 1"
    r = run_igpt("train", tmp_path / "missing.h5", "-o", tmp_path / "m", "--steps", "2", "--width", "30",
                 "--heads", "4")
    assert r.returncode == 2  # the missing file is reported first, naming the file
    assert "missing.h5" in error_lines(r.stderr)[0]


def test_shell_completion_is_available():
    r = invoke("--help")
    assert "--install-completion" in r.stdout


# --- hardening: one line for everything, signals, pictures by extension, -q / --overwrite everywhere -----
import errno  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from helpers import ENV, hf_model, make_tokens, rows_done  # noqa: E402


@pytest.fixture(scope="module")
def pixel_feats(tmp_path_factory):
    d = tmp_path_factory.mktemp("pix")
    tok = make_tokens(d / "t.h5", 120, 4)
    r = run_igpt("extract", tok, "--model", "pixels", "-o", d / "f.h5", "-q")
    assert r.returncode == 0, r.stderr
    return d / "f.h5"


def test_log_lines_are_never_wrapped():
    from rich.console import Console

    from igpt_cli.cli.ui import ProgressBar
    from igpt_cli.progress import ProgressEvent

    buf = io.StringIO()
    bar = ProgressBar(console=Console(file=buf, width=20))
    record = json.dumps({"step": 100, "train_loss": 2.123456, "lr": 0.002, "seconds": 12.5, "val_loss": 2.2})
    with bar:
        bar(ProgressEvent("train", 100, 200, "step", message=record))
    assert buf.getvalue() == record + "\n"


@pytest.mark.parametrize("exc, needle", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/out.h5"), "no space left on device (/data/out.h5)"),
    (OSError(errno.EIO, "Input/output error", "/data/in.h5"), "/data/in.h5: Input/output error"),
    (MemoryError(), "out of memory"),
])
def test_last_resort_errors_are_one_line(monkeypatch, tmp_path, exc, needle):
    import igpt_cli.fileinfo

    def boom(*a, **k):
        raise exc

    monkeypatch.setattr(igpt_cli.fileinfo, "file_info", boom)
    r = invoke("info", tmp_path / "x.h5")
    assert_clean_failure(r, needle)


def test_errors_have_no_stray_blank_lines(tmp_path):
    r = run_igpt("quantize", tmp_path / "missing", "-o", tmp_path / "o.h5")
    assert r.returncode == 2 and r.stderr.splitlines() == [r.stderr.strip()], repr(r.stderr)


def test_sigterm_unwinds_like_ctrl_c_and_keeps_the_resumable_partial(tmp_path):
    _, model = hf_model(tmp_path, n_layer=2, n_embd=64, n_head=2, n_positions=64)
    tok = make_tokens(tmp_path / "t.h5", 3000, 8)
    out = tmp_path / "f.h5"
    args = [sys.executable, "-m", "igpt_cli", "extract", str(tok), "-m", str(model), "-o", str(out),
            "--batch-size", "1", "--dtype", "float32", "-q"]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tmp = out.with_name(f".{out.name}.tmp")
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and done < 8:
        time.sleep(0.1)
        done = rows_done(tmp)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr and stdout == ""
    (line,) = stderr.strip().splitlines()  # one line: how far it got, and how to resume
    assert line.startswith("terminated") and line.endswith("rerun the same command to resume (finished work is kept)")
    assert tmp.exists() and not out.exists()  # resumable partial kept, nothing at the final path
    r = run_igpt("extract", tok, "-m", model, "-o", out, "--batch-size", "1", "--dtype", "float32", "-q")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["resumed_from"] >= 8


def test_probe_plot_format_follows_the_extension(pixel_feats, tmp_path):
    r = invoke("probe", pixel_feats, "--plot", tmp_path / "p.pdf", "-q")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "p.pdf").read_bytes()[:5] == b"%PDF-"
    r = invoke("probe", pixel_feats, "--plot", tmp_path / "p.svg", "-q")
    assert b"<svg" in (tmp_path / "p.svg").read_bytes()[:2000]
    r = invoke("probe", pixel_feats, "--plot", tmp_path / "p.xyz")
    assert_clean_failure(r, "--plot", out=tmp_path / "p.xyz")
    assert "unknown picture format" in r.stderr


def test_probe_quiet_prints_nothing_and_outputs_need_overwrite(pixel_feats, tmp_path):
    r = invoke("probe", pixel_feats, "-q")
    assert r.returncode == 0 and r.stderr == "" and r.stdout == ""
    csv = tmp_path / "p.csv"
    csv.write_text("precious\n")
    t0 = time.perf_counter()
    r = invoke("probe", pixel_feats, "--csv", csv)
    assert_clean_failure(r, "--overwrite")
    assert time.perf_counter() - t0 < 5 and csv.read_text() == "precious\n"  # refused before any fit
    r = invoke("probe", pixel_feats, "--csv", csv, "--overwrite", "-q")
    assert r.returncode == 0 and csv.read_text().startswith("layer,")
    (tmp_path / "d.png").mkdir()
    assert_clean_failure(invoke("probe", pixel_feats, "--plot", tmp_path / "d.png", "--overwrite"), "directory")


@pytest.mark.parametrize("command", ["quantize", "extract", "probe", "train", "demo", "info", "show"])
def test_every_command_takes_quiet(command):
    assert "--quiet" in invoke(command, "-h").stdout


@pytest.mark.parametrize("command", ["extract", "info", "models"])
def test_a_closed_stdout_ends_quietly_after_the_work_is_done(tmp_path, command):
    """`igpt … | head`: the reader went away; no error line, SIGPIPE's exit status, the output complete."""
    import os

    tokens = make_tokens(tmp_path / "t.h5", 5, 8)
    out = tmp_path / "f.h5"
    args = {"extract": ["extract", tokens, "-m", "pixels", "-o", out, "-q"], "info": ["info", tokens, "--json"],
            "models": ["models", "--json"]}[command]
    r_end, w_end = os.pipe()
    os.close(r_end)  # nobody reads: the first write to stdout fails with EPIPE
    try:
        p = subprocess.run([sys.executable, "-m", "igpt_cli", *map(str, args)], stdout=w_end, stderr=subprocess.PIPE,
                           text=True, env=ENV, timeout=120)
    finally:
        os.close(w_end)
    assert p.returncode == 141 and p.stderr == "", (p.returncode, p.stderr)
    if command == "extract":
        r = run_igpt("info", out, "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["n"] == 5
