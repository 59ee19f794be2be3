"""The runnable examples in examples/ run (on the shipped demo data and model), so they cannot rot."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

from helpers import ENV, ROOT

EXAMPLES = ROOT / "examples"
DEMO_DATA = ROOT / "igpt_cli" / "assets" / "demo-cifar10.tar"
SHIPPED_MODEL = ROOT / "igpt_cli" / "assets" / "igpt-cifar8"
# the scripts call `igpt` and `python`: the ones of this environment
EXAMPLE_ENV = dict(ENV, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def run(*cmd, cwd: Path, env=None) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=600,
                       env=dict(EXAMPLE_ENV, **(env or {})))
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_cifar10_shell_pipeline_and_torchrun(tmp_path):
    out = tmp_path / "pipe"
    r = run(EXAMPLES / "cifar10_pipeline.sh", DEMO_DATA, SHIPPED_MODEL, out, cwd=tmp_path, env={"LIMIT": "400"})
    report = json.loads((out / "probe.json").read_text())
    assert [l["layer"] for l in report["layers"]] == list(range(9))
    assert report["layers"][0]["n_train"] == 400
    assert f"best layer {report['best_layer']}" in r.stdout
    for name in ("probe.png", "probe.csv", "train-feats.h5", "test-feats.h5"):
        assert (out / name).is_file(), name
    # the torchrun example on the same tokens gives the same features as the one-process run
    run(EXAMPLES / "torchrun_extract.sh", out / "test.h5", SHIPPED_MODEL, out / "test-feats-2.h5", 2,
        cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    with h5py.File(out / "test-feats.h5") as a, h5py.File(out / "test-feats-2.h5") as b:
        for layer in a["features"]:
            np.testing.assert_allclose(a["features"][layer][:], b["features"][layer][:], rtol=1e-2, atol=1e-2)


def test_python_api_example(tmp_path):
    r = run(sys.executable, EXAMPLES / "python_api.py", DEMO_DATA, SHIPPED_MODEL, tmp_path / "api", cwd=tmp_path)
    assert "best layer" in r.stdout and "LinearProbe test accuracy" in r.stdout
    assert "(4, 192)" in r.stdout  # in-memory features of 4 images from layers 0 and 4


def test_generate_example(tmp_path):
    r = run(sys.executable, EXAMPLES / "generate.py", SHIPPED_MODEL, DEMO_DATA, tmp_path / "gen", cwd=tmp_path)
    assert "bits/token" in r.stdout
    assert (tmp_path / "gen" / "completions.png").is_file() and (tmp_path / "gen" / "samples.png").is_file()


def test_fit_palette_example(tmp_path):
    r = run(EXAMPLES / "fit_palette.sh", DEMO_DATA, tmp_path / "pal", 16, cwd=tmp_path)
    assert np.load(tmp_path / "pal" / "palette.npy").shape == (16, 3)
    assert (tmp_path / "pal" / "tokens.png").is_file()
    assert "igpt-tokens" in r.stdout


def test_slurm_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(EXAMPLES / "slurm_extract.sbatch")], check=True)


def test_your_own_images_example(tmp_path):
    r = run(EXAMPLES / "your_own_images.sh", DEMO_DATA, tmp_path / "own", 20, cwd=tmp_path)
    report = json.loads((tmp_path / "own" / "probe.json").read_text())
    assert [l["layer"] for l in report["layers"]] == [4, 6]
    assert f"best layer {report['best_layer']}" in r.stdout
    assert "command: igpt features" in r.stdout and "source:" in r.stdout
    with h5py.File(tmp_path / "own" / "feats.h5") as f:
        assert f["features"]["4"].shape == (60, 192) and sorted(set(f["labels"][:])) == [0, 1, 2]
    # the README's recipe as written: probes of layers 4 and 6, new features of layer 6 only (issue 22.1)
    pred = json.loads((tmp_path / "own" / "predictions.json").read_text())
    assert pred["layer"] == 6 and all(p["source"] for p in pred["predictions"]) and "new photo 0 (" in r.stdout


def test_sweep_example(tmp_path):
    r = run(EXAMPLES / "sweep.sh", DEMO_DATA, tmp_path / "sw", 10, cwd=tmp_path, env={"PER_CLASS": "12"})
    d = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [c["step"] for c in d["checkpoints"]] == [2, 4, 6, 8, 10]
    assert d["correlations"][0]["n"] == 5 and "Spearman rho" in r.stdout
    assert (tmp_path / "sw" / "sweep" / "sweep-accuracy-vs-loss.png").is_file()
