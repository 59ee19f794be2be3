"""One flag vocabulary, read from every command's parameters (the typer app itself, so a new
command is checked as soon as it is registered), and the front door's small promises: `igpt -h`
by theme, Ctrl-C's one line, output folders created, the bundled model's name everywhere."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.main import get_command

from helpers import assert_clean_failure, invoke, make_tokens
from igpt_cli.cli import app
from igpt_cli.cli.app import PANEL_ORDER
from igpt_cli.outputs import OutputError, check_output_path

# Commands whose result is a file or directory they write: -o/--out names it. `probe` names its
# files by what they are (--csv, --plot, --save-probes): its result is the report.
WRITERS = {"quantize", "palette fit", "extract", "features", "convert", "show", "sample", "complete", "score",
           "train", "sweep", "demo", "predict"}
# Commands that run a model given by the user: -m/--model names it (train's is --init: its -o is the model).
MODEL_TAKERS = {"extract", "features", "sample", "complete", "score", "demo", "predict"}


def all_commands() -> dict[str, object]:
    """'name' (or 'group name') -> click command, for every command of the app."""
    out = {}

    def walk(cmd, prefix):
        for name, sub in getattr(cmd, "commands", {}).items():
            full = f"{prefix} {name}".strip()
            if getattr(sub, "commands", None):
                walk(sub, full)
            else:
                out[full] = sub

    walk(get_command(app), "")
    return out


COMMANDS = all_commands()


def options(cmd) -> list:
    return [p for p in cmd.params if getattr(p, "param_type_name", "") == "option" and not p.hidden]


def by_flag(cmd, flag: str):
    return next((p for p in cmd.params if flag in p.opts), None)


def test_every_command_is_checked():
    assert set(COMMANDS) >= WRITERS | MODEL_TAKERS | {"info", "models", "probe"}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_quiet_and_json(name):
    cmd = COMMANDS[name]
    quiet, as_json = by_flag(cmd, "--quiet"), by_flag(cmd, "--json")
    assert quiet is not None and "-q" in quiet.opts and quiet.is_flag, name
    assert as_json is not None and as_json.opts == ["--json"] and as_json.is_flag, name


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_writers_have_o_out(name):
    out = by_flag(COMMANDS[name], "--out")
    assert out is not None and sorted(out.opts) == ["--out", "-o"], name


@pytest.mark.parametrize("name", sorted(MODEL_TAKERS))
def test_model_takers_have_m_model(name):
    model = by_flag(COMMANDS[name], "--model")
    assert model is not None and sorted(model.opts) == ["--model", "-m"], name


def test_short_flags_mean_one_thing():
    meaning: dict[str, set[str]] = {}
    for cmd in COMMANDS.values():
        for p in options(cmd):
            longs = [o for o in p.opts if o.startswith("--")]
            for short in (o for o in p.opts if not o.startswith("--")):
                meaning.setdefault(short, set()).update(longs)
    assert {s: m for s, m in meaning.items() if len(m) > 1} == {}


def test_layer_device_dtype_are_one_spec_each():
    seen: dict[str, set] = {"--layer": set(), "--device": set(), "--dtype": set()}
    for name, cmd in COMMANDS.items():
        for flag in seen:
            p = by_flag(cmd, flag)
            if p is None:
                continue
            if flag == "--layer":
                seen[flag].add((tuple(sorted(p.opts)), p.metavar, p.multiple))
            elif flag == "--device":
                seen[flag].add((p.metavar, p.type_descriptor.parameter_info.parser))
            else:
                assert p.type_descriptor.is_choice, name  # an Enum: the parser checks it
                seen[flag].add(tuple(p.type_descriptor.choices))
    assert all(len(v) == 1 for v in seen.values()), seen
    assert len(seen["--layer"]) == 1 and next(iter(seen["--layer"]))[2]  # repeatable everywhere
    assert next(iter(seen["--device"]))[0] == "<auto|cpu|cuda|cuda:N|mps>"


def test_device_is_checked_by_the_parser_everywhere():
    r = invoke("probe", "x.h5", "--device", "gpu")
    assert_clean_failure(r, "'gpu' is not one of auto, cpu, cuda, cuda:N, mps")
    r = invoke("extract", "x.h5", "-m", "igpt-cifar8", "-o", "y.h5", "--device", "cuda:x")
    assert_clean_failure(r, "is not one of")


def test_one_metavar_style():
    for name, cmd in COMMANDS.items():
        for p in cmd.params:
            if getattr(p, "param_type_name", "") == "argument":
                assert p.metavar is None or re.fullmatch(r"[a-z][a-z0-9_]*", p.metavar), (name, p.metavar)
            elif p.metavar is not None:
                assert re.fullmatch(r"<[^<>\s]+>", p.metavar), (name, p.metavar)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_shows_flags_without_a_bool_value_and_examples_that_run_offline(name):
    r = invoke(*name.split(), "-h")
    assert r.returncode == 0
    assert "<bool>" not in r.stdout and "imagegpt-small/" not in r.stdout
    for line in re.findall(r"Example: (igpt .*)", COMMANDS[name].help or ""):
        if name == "predict" and " -m " in line:   # a fine-tuned model: the directory finetune's example writes
            finetuned = re.search(r"Example: igpt finetune .* -o (\S+)", COMMANDS["finetune"].help).group(1)
            assert f" -m {finetuned} " in line, line
        elif " -m " in line or "--model" in line:
            assert "-m igpt-cifar8" in line, line  # the shipped model, nothing to download


def test_complete_example_keeps_rows_within_the_shipped_model():
    line = re.search(r"Example: (igpt complete .*)", COMMANDS["complete"].help).group(1)
    assert 0 < int(re.search(r"--keep-rows (\d+)", line).group(1)) < 8  # igpt-cifar8 draws 8×8 images


def test_top_level_help_groups_commands_by_theme_with_demo_first():
    r = invoke("-h")
    panels = [m for m in re.findall(r"╭─ ([^─]+?) ─", r.stdout) if m not in ("Options",)]
    assert panels == list(PANEL_ORDER)
    first = re.search(r"╭─ Start here ─.*?\n│ (\w+)", r.stdout).group(1)
    assert first == "demo"
    assert "--json: stdout is one JSON document" in " ".join(r.stdout.split())


def test_old_spellings_still_work(tmp_path):
    # predict's --output and train's --resume are hidden aliases; sample's model may still be positional
    assert by_flag(COMMANDS["predict"], "--output").hidden
    assert by_flag(COMMANDS["train"], "--resume").hidden
    r = invoke("sample", "igpt-cifar8", "-m", "other", "-n", "1", "-o", tmp_path / "s.h5")
    assert_clean_failure(r, "two models given", tmp_path / "s.h5")
    r = invoke("sample", "-n", "1", "-o", tmp_path / "s.h5")
    assert_clean_failure(r, "-m/--model", tmp_path / "s.h5")


def test_predict_layer_takes_the_spec_but_one_layer(tmp_path):
    r = invoke("predict", tmp_path / "f.h5", "--probes", tmp_path / "p.h5", "--layer", "2-4", "--json")
    assert_clean_failure(r, "give one layer number")


# --- finding 6: Ctrl-C says how far it got and how to resume -------------------------------------
def _interrupted(capsys, fn):
    with pytest.raises(typer.Exit) as e:
        fn()
    return e.value.exit_code, capsys.readouterr().err.strip().splitlines()


def test_ctrl_c_says_how_far_and_that_rerunning_resumes(capsys):
    from igpt_cli.cli.ui import ProgressBar, handles_input_errors
    from igpt_cli.progress import ProgressEvent

    @handles_input_errors
    def extract_command(restart: bool = False):
        bar = ProgressBar()
        bar(ProgressEvent("extract", 512, 3000, unit="image"))
        raise KeyboardInterrupt

    code, lines = _interrupted(capsys, extract_command)
    assert code == 130
    assert lines == ["interrupted at extract 512/3,000 images; rerun the same command to resume "
                     "(finished work is kept)"]

    @handles_input_errors
    def quantize_command():
        raise KeyboardInterrupt  # before any progress: no count, and nothing is resumable

    code, lines = _interrupted(capsys, quantize_command)
    assert (code, lines) == (130, ["interrupted; nothing was written"])


def test_train_says_how_it_resumes():
    text = " ".join(COMMANDS["train"].help.split())
    assert "rerunning it resumes" in text and "--restart" in text


# --- finding 7: output folders are created --------------------------------------------------------
def test_missing_output_folders_are_created(tmp_path):
    out = tmp_path / "runs" / "big" / "t.h5"
    assert check_output_path(out, False) == out and out.parent.is_dir() and not out.exists()
    assert check_output_path(tmp_path / "models" / "m", False, directory=True).parent.is_dir()


def test_a_folder_under_a_file_or_a_readonly_place_stays_an_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is not a directory"):
        check_output_path(tmp_path / "file" / "sub" / "t.h5", False)
    assert (tmp_path / "file").read_text() == "x"
    with pytest.raises(OutputError, match="cannot be created|cannot create"):
        check_output_path("/proc/igpt-no-such-dir/t.h5", False)


def test_cli_writes_into_a_new_folder(tmp_path):
    tok = make_tokens(tmp_path / "t.h5", 5, 8)
    out = tmp_path / "nodir" / "deeper" / "grid.png"
    r = invoke("show", tok, "-o", out, "-q")
    assert r.returncode == 0, r.stderr
    assert out.is_file()


# --- finding 8: the bundled model's name everywhere ------------------------------------------------
def test_bundled_name_names_a_palette_and_a_model(tmp_path):
    import igpt_cli
    from igpt_cli.bundled import BUNDLED
    from igpt_cli.palette import Palette

    by_name, by_dir = Palette.load("igpt-cifar8"), Palette.load(BUNDLED["igpt-cifar8"])
    np.testing.assert_array_equal(by_name.centers, by_dir.centers)
    assert by_name.source == str(BUNDLED["igpt-cifar8"] / "preprocessor_config.json")  # the model's own file
    from igpt_cli.palette import PaletteError

    with pytest.raises(PaletteError, match="no such palette"):
        Palette.load("igpt-cifar9")
    model = igpt_cli.load_pretrained("igpt-cifar8")
    assert model.config.n_positions == 64


def test_quantize_takes_a_bundled_palette(tmp_path):
    from helpers import make_image_folder, read_tokens

    src = make_image_folder(tmp_path / "imgs", splits=("test",), per_class=1)
    out = tmp_path / "new" / "t.h5"
    r = invoke("quantize", src, "--size", "8", "--palette", "igpt-cifar8", "-o", out, "-q")
    assert r.returncode == 0, r.stderr
    tokens, _, _, attrs = read_tokens(out)
    from igpt_cli.palette import Palette

    assert tokens.shape == (3, 64) and tokens.max() < len(Palette.load("igpt-cifar8"))


def test_demo_commands_name_the_shipped_model():
    from igpt_cli.demo import pipeline_commands

    cmds = pipeline_commands(Path("demo-out"), "igpt-cifar8", 8)
    assert any("--palette igpt-cifar8" in c for c in cmds) and any("--model igpt-cifar8" in c for c in cmds)
    assert not any("assets/igpt-cifar8" in c for c in cmds)


# --- finding 10: a table written to a file is not cut ------------------------------------------------
def test_tables_in_a_file_are_never_cut():
    import io

    from rich.console import Console
    from rich.table import Table

    from igpt_cli.cli.ui import print_table

    t = Table()
    for col in ("family", "checkpoint", "step", "params", "loss nats", "bits", "best layer", "val acc", "test acc"):
        t.add_column(col)
    row = ("family-with-a-long-name", "runs/a-rather-long-checkpoint-name/step-002400", "2400", "12.34 M",
           "4.856789", "7.006789", "6", "45.67%", "44.44%")
    t.add_row(*row)
    f = io.StringIO()
    print_table(t, Console(file=f, width=80))
    text = f.getvalue()
    assert "…" not in text and all(v in text for v in row)
