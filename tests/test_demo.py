import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from igpt_cli.demo import DEMO_DATA, SHIPPED_MODEL
from igpt_cli.model import load_pretrained, sos_shift

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_model_is_a_valid_hf_imagegpt():
    import transformers
    ours = load_pretrained(SHIPPED_MODEL)
    hf = transformers.ImageGPTForCausalImageModeling.from_pretrained(SHIPPED_MODEL, dtype=torch.float32).eval()
    x = sos_shift(torch.randint(0, 512, (2, ours.config.n_positions)), ours.config.sos_token)
    with torch.no_grad():
        assert torch.allclose(ours(x), hf(x).logits, atol=1e-4)
    proc = transformers.ImageGPTImageProcessor.from_pretrained(SHIPPED_MODEL)
    assert np.asarray(proc.clusters).shape == (512, 3)
    assert DEMO_DATA.stat().st_size < 8 << 20 and (SHIPPED_MODEL / "model.safetensors").stat().st_size < 20 << 20


def test_demo_runs_offline_end_to_end(tmp_path):
    from helpers import ENV  # this checkout's igpt_cli, whatever the environment has installed

    r = subprocess.run([sys.executable, "-m", "igpt_cli", "demo", "--out", str(tmp_path / "demo"), "--json"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    rep, pix = out["model"], out["pixels"]
    assert [l["layer"] for l in rep["layers"]] == list(range(9))
    assert rep["layers"][0]["n_train"] == 3000 and rep["layers"][0]["n_test"] == 1000
    best = next(l for l in rep["layers"] if l["layer"] == rep["best_layer"])
    # the pretrained features beat raw pixels on the shipped subset (measured: +5.6 points)
    assert best["test_acc"] > pix["layers"][0]["test_acc"] + 0.02
    for name in ("train.h5", "test.h5", "train-feats.h5", "test-feats.h5", "probe.png", "probe.json",
                 "completions.png"):
        assert (tmp_path / "demo" / name).is_file(), name
    assert "igpt probe" in r.stderr and "layer" in r.stderr  # table and the equivalent commands
    assert "--palette igpt-cifar8" in r.stderr and "--model igpt-cifar8" in r.stderr  # the model by its name


def test_demo_refuses_to_overwrite_an_earlier_demo_without_overwrite(tmp_path):
    from helpers import assert_clean_failure, run_igpt

    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "train.h5").write_text("precious")
    r = run_igpt("demo", "--out", tmp_path / "demo", cwd=tmp_path)
    assert_clean_failure(r, "--overwrite")
    assert (tmp_path / "demo" / "train.h5").read_text() == "precious"


def test_demo_refuses_a_plot_or_completions_that_is_an_input_or_another_output(tmp_path):
    from helpers import assert_clean_failure, invoke

    data_copy = tmp_path / "model"
    import shutil

    shutil.copytree(SHIPPED_MODEL, data_copy)
    before = (data_copy / "config.json").read_bytes()
    r = invoke("demo", "--model", data_copy, "--plot", data_copy / "config.json", "--overwrite", "-q")
    assert_clean_failure(r, "plot would overwrite the input model config.json")
    assert (data_copy / "config.json").read_bytes() == before
    r = invoke("demo", "--out", tmp_path / "d", "--plot", tmp_path / "d" / "train.h5", "-q")
    assert_clean_failure(r, "name the same file")
    assert not (tmp_path / "d").exists()  # the --out it made for the run is not left behind, empty


def test_demo_with_a_missing_model_leaves_no_empty_out_directory(tmp_path):
    from helpers import assert_clean_failure, invoke

    r = invoke("demo", "--out", tmp_path / "d" / "e", "--model", tmp_path / "no-such-model", "-q")
    assert_clean_failure(r, "model not found")
    assert not (tmp_path / "d").exists()
