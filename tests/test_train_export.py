"""`python -m igpt_cli.export`: a shipped model directory, written whole or not at all."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from igpt_cli.errors import InputError
from igpt_cli.export import export_model
from igpt_cli.model import IGPT, IGPTConfig, load_pretrained, save_pretrained
from igpt_cli.outputs import OutputError, output_lock

from helpers import ENV, ROOT, assert_clean_failure


@pytest.fixture
def run(tmp_path):
    torch.manual_seed(0)
    d = tmp_path / "run"
    save_pretrained(IGPT(IGPTConfig(vocab_size=17, n_positions=16, n_embd=16, n_layer=1, n_head=2)), d)
    (d / "train_meta.json").write_text('{"step": 3}\n')
    (d / "train_state.pt").write_bytes(b"state")
    return d


def export_cli(*args):
    return subprocess.run([sys.executable, "-m", "igpt_cli.export", *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True)


def test_export_is_fp16_without_run_state_and_leaves_nothing_behind(tmp_path, run):
    out = export_model(run, tmp_path / "ship")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "train_meta.json"]
    a, b = load_pretrained(run), load_pretrained(out)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x.half().float(), y), name
    assert sorted(os.listdir(tmp_path)) == ["run", "ship"]  # no temp directory, no lock file


def test_existing_outputs_are_replaced_only_when_asked(tmp_path, run):
    out = tmp_path / "ship"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="exists and is not empty"):
        export_model(run, out)
    assert os.listdir(out) == ["keep.txt"]
    export_model(run, out, overwrite=True)
    assert "keep.txt" not in os.listdir(out) and (out / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["run", "ship"]
    with pytest.raises(InputError, match="is the run directory itself"):
        export_model(run, run, overwrite=True)
    with pytest.raises(InputError, match="exists and is not a directory"):
        export_model(run, run / "config.json", overwrite=True)


def test_half_written_or_locked_runs_are_one_line(tmp_path, run):
    (run / "model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(InputError, match="cannot read weights"):
        export_model(run, tmp_path / "ship")
    (run / "model.safetensors").unlink()
    with pytest.raises(InputError, match="no weights"):
        export_model(run, tmp_path / "ship")
    with pytest.raises(InputError, match="model directory not found"):
        export_model(tmp_path / "missing", tmp_path / "ship")
    with output_lock(run):  # a training run writing it
        with pytest.raises(OutputError, match="another igpt run"):
            export_model(run, tmp_path / "ship")
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_export_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, small_fs):
    d = tmp_path / "big"  # 1.2 MB of float16 weights cannot fit in 1 MiB
    save_pretrained(IGPT(IGPTConfig(vocab_size=17, n_positions=16, n_embd=160, n_layer=2, n_head=2)), d)
    r = export_cli(d, small_fs / "ship")
    assert_clean_failure(r, "no space left on device")
    assert os.listdir(small_fs) == []


def test_cli_prints_one_line_errors(tmp_path, run):
    assert_clean_failure(export_cli(tmp_path / "nope", tmp_path / "ship"), "nope: model directory not found")
    r = export_cli(run, tmp_path / "ship")
    assert r.returncode == 0 and r.stdout.strip() == str(tmp_path / "ship")
    assert_clean_failure(export_cli(run, tmp_path / "ship"), "pass overwrite=True")
    assert export_cli(run, tmp_path / "ship", "--overwrite").returncode == 0
    assert np.isfinite(load_pretrained(tmp_path / "ship").wte.weight.detach().numpy()).all()


def test_export_refuses_an_output_that_is_the_run_or_holds_it(tmp_path, run):
    os.symlink(run, tmp_path / "alias")
    before = sorted(p.name for p in run.iterdir())
    for out, needle in ((tmp_path / "alias", "is the run directory itself"), (tmp_path, "holds the run directory")):
        r = export_cli(run, out, "--overwrite")
        assert_clean_failure(r, needle)
        assert sorted(p.name for p in run.iterdir()) == before
