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
