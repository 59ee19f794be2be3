"""igpt probe: protocol, parity with scikit-learn, determinism, reports, bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from igpt_cli import formats
from igpt_cli.errors import InputError
from igpt_cli.layers import parse_layers
from igpt_cli.probe import fit_logreg, probe_files, probe_layer, standardize

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "ship"]


# ---------------------------------------------------------------------------
# fixture files, written by hand following the features schema in formats.py
# ---------------------------------------------------------------------------

def make_data(n: int, d: int = 12, k: int = 3, layers=(0, 1, 2), seed: int = 0, sep=(0.2, 0.9, 0.5)):
    """Gaussian classes whose separability depends on the layer (a peak in the middle)."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(123).standard_normal((k, d))
    y = np.arange(n) % k
    rng.shuffle(y)
    feats = {l: (sep[i % len(sep)] * centers[y] + rng.standard_normal((n, d))).astype(np.float32)
             for i, l in enumerate(layers)}
    return feats, y.astype(np.int64)


def write_features(path: Path, feats: dict, labels: np.ndarray, **attrs) -> Path:
    n = len(labels)
    base = dict(
        format=formats.FEATURES_FORMAT, format_version=formats.FORMAT_VERSION,
        layers=json.dumps(sorted(feats)), site="resid", sos=True, compute_dtype="float32",
        model="imagegpt-test", model_config=json.dumps({"n_layer": 3}), model_sha256="ab" * 32,
        tokens_file="cifar-train.h5", tokens_sha256="cd" * 32, class_names=json.dumps(CLASSES),
        n_total=n, n_done=n, complete=True, igpt_version="0.1.0",
    )
    base.update(attrs)
    with h5py.File(path, "w") as f:
        g = f.create_group("features")
        for l, x in feats.items():
            g.create_dataset(str(l), data=x)
        f.create_dataset("labels", data=labels.astype(np.int64))
        f.create_dataset("sources", data=np.array([f"img{i}" for i in range(n)], dtype=object),
                         dtype=formats.STR_DTYPE)
        for k, v in base.items():
            if v is not None:
                f.attrs[k] = v
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("probe")
    ftr, ytr = make_data(240, seed=0)
    fte, yte = make_data(90, seed=1)
    return write_features(d / "train.h5", ftr, ytr), write_features(d / "test.h5", fte, yte, tokens_file="cifar-test.h5")


def cli(*args):
    from typer.testing import CliRunner

    from igpt_cli.cli import app

    r = CliRunner().invoke(app, ["probe", *map(str, args)])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=r.stderr)


def assert_clean_failure(r, needle: str):
    assert r.returncode == 2, (r.returncode, r.stderr, r.stdout)
    assert "Traceback" not in r.stderr and r.stdout == ""
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "error" in lines[0], r.stderr
    assert needle.lower() in r.stderr.lower(), r.stderr


# ---------------------------------------------------------------------------
# solver and protocol
# ---------------------------------------------------------------------------

def overlapping(n, d=20, k=4, seed=0):
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(7).standard_normal((k, d)) * 0.35
    y = rng.integers(0, k, n)
    return (centers[y] + rng.standard_normal((n, d))).astype(np.float32), y


@pytest.mark.parametrize("C", [1e-3, 0.1, 10.0])
def test_solver_matches_sklearn_coefficients(C):
    from sklearn.linear_model import LogisticRegression

    X, y = overlapping(1500)
    (A,) = standardize(X)
    ours = fit_logreg(A, y, 4, C, tol=1e-7)
    ref = LogisticRegression(C=C, tol=1e-9, max_iter=10000).fit(A.astype(np.float64), y)
    scale = np.abs(ref.coef_).max()
    assert np.abs(ours.coef - ref.coef_).max() <= 2e-3 * scale + 1e-6
    assert np.abs(ours.intercept - ref.intercept_).max() <= 2e-3 * max(1.0, np.abs(ref.intercept_).max())
    assert ours.converged


def test_probe_accuracy_matches_plain_sklearn_at_chosen_c():
    from sklearn.linear_model import LogisticRegression

    X, y = overlapping(2000, seed=0)
    Xt, yt = overlapping(1000, seed=1)
    r = probe_layer(X, y, Xt, yt, seed=0)
    A, B = standardize(X, Xt)
    ref = LogisticRegression(C=r.c).fit(A.astype(np.float64), y)  # plain scikit-learn defaults
    assert 0.4 < r.test_acc < 0.99  # not a trivially separable case
    assert abs(r.test_acc - ref.score(B.astype(np.float64), yt)) <= 0.002
    # the C search saw the coarse grid and a refinement, and picked the best validation accuracy
    stages = {s["stage"] for s in r.c_search}
    assert stages == {"coarse", "refine"}
    assert r.val_acc == max(s["val_acc"] for s in r.c_search)
    assert r.n_val == 200 and r.n_train == 2000 and r.n_test == 1000
    assert set(r.per_class_acc) == {"0", "1", "2", "3"}


def test_test_set_does_not_influence_choices():
    X, y = overlapping(600, seed=2)
    Xt, yt = overlapping(300, seed=3)
    a = probe_layer(X, y, Xt, yt, seed=0)
    b = probe_layer(X, y, Xt[::-1] * 3 + 1, yt[::-1], seed=0)
    assert a.c == b.c and a.val_acc == b.val_acc and a.c_search == b.c_search


def test_deterministic_for_seed(pair):
    train, test = pair
    a = probe_files(train, test, seed=3)
    b = probe_files(train, test, seed=3)
    strip = lambda rep: [{k: v for k, v in r.items() if k != "seconds"} for r in rep["layers"]]
    assert strip(a) == strip(b)
    c = probe_files(train, None, seed=3)
    d = probe_files(train, None, seed=3)
    assert strip(c) == strip(d)


def test_jobs_gives_same_result(pair):
    train, test = pair
    strip = lambda rep: [{k: v for k, v in r.items() if k != "seconds"} for r in rep["layers"]]
    assert strip(probe_files(train, test, jobs=2)) == strip(probe_files(train, test, jobs=1))


def test_depth_curve_and_provenance(pair):
    train, test = pair
    rep = probe_files(train, test)
    accs = {r["layer"]: r["test_acc"] for r in rep["layers"]}
    assert accs[1] > accs[0] and accs[1] > accs[2]  # the middle layer is the separable one
    assert rep["best_layer"] == 1
    assert rep["model"] == "imagegpt-test" and rep["site"] == "resid" and rep["sos"] is True
    assert rep["test_mode"] == "file"


@pytest.mark.parametrize("spec,avail,want", [
    (None, 4, [0, 1, 2, 3]), (["all"], [0, 4, 8], [0, 4, 8]), (["-1"], 25, [24]), (["8-10"], 25, [8, 9, 10]),
    (["0,2", "-2"], 5, [0, 2, 3]), (["0-8"], [0, 4, 8, 12], [0, 4, 8]), (["-1"], [0, 4, 8], [8]),
])
def test_parse_layers(spec, avail, want):
    assert parse_layers(spec, range(avail) if isinstance(avail, int) else avail) == want


@pytest.mark.parametrize("spec", [["30"], ["x"], ["5-3"], ["-9"], ["40-50"]])
def test_parse_layers_bad(spec):
    with pytest.raises(InputError):
        parse_layers(spec, range(8))


# ---------------------------------------------------------------------------
# CLI and reports
# ---------------------------------------------------------------------------

def test_cli_json_on_stdout_only(pair):
    train, test = pair
    r = subprocess.run([sys.executable, "-m", "igpt_cli", "probe", str(train), "--test", str(test), "--json",
                        "--layer", "0-1"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)  # the whole of stdout is one JSON document
    assert [x["layer"] for x in rep["layers"]] == [0, 1]
    row = rep["layers"][0]
    for key in ("layer", "c", "val_acc", "test_acc", "per_class_acc", "n_train", "n_test", "seconds"):
        assert key in row
    assert set(row["per_class_acc"]) == set(CLASSES)
    assert row["n_train"] == 240 and row["n_test"] == 90
    for key in ("model", "site", "sos", "model_sha256"):
        assert key in rep
    assert "test acc" in r.stderr and "layer" in r.stderr  # the table went to stderr


def test_cli_csv_and_plot(pair, tmp_path):
    train, test = pair
    out_csv, out_png = tmp_path / "p.csv", tmp_path / "p.png"
    r = cli(train, "--test", test, "--csv", out_csv, "--plot", out_png, "-q")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    import csv

    rows = list(csv.DictReader(out_csv.open()))
    assert [int(x["layer"]) for x in rows] == [0, 1, 2]
    assert {"c", "val_acc", "test_acc", "n_train", "n_test", "acc_cat"} <= set(rows[0])
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_plot_without_matplotlib(pair, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **kw):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    r = cli(pair[0], "--plot", tmp_path / "x.png")
    assert_clean_failure(r, "matplotlib")


def test_cli_test_fraction_mode(pair):
    train, _ = pair
    r = cli(train, "--json", "--test-fraction", "0.25", "--layer", "1")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["test_mode"] == "held_out" and rep["test_fraction"] == 0.25 and rep["test"] is None
    assert rep["layers"][0]["n_test"] == 60 and rep["layers"][0]["n_train"] == 180
    assert "held out" in " ".join(r.stderr.split())


def test_pixels_baseline_file(tmp_path):
    feats, y = make_data(150, d=48, layers=(0,), sep=(0.8,))
    f = write_features(tmp_path / "pix.h5", feats, y, model="pixels", model_sha256="", model_config="{}",
                       site="pixels")
    r = cli(f, "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["model"] == "pixels" and [x["layer"] for x in rep["layers"]] == [0]


# ---------------------------------------------------------------------------
# bad input: one line, exit 2, no traceback
# ---------------------------------------------------------------------------

def test_bad_not_a_features_file(pair, tmp_path):
    txt = tmp_path / "notes.h5"
    txt.write_text("hello")
    assert_clean_failure(cli(txt), "not an HDF5 file")
    tok = tmp_path / "tokens.h5"
    with h5py.File(tok, "w") as f:
        f.attrs["format"] = formats.TOKENS_FORMAT
        f.attrs["format_version"] = 1
    assert_clean_failure(cli(tok), "not an igpt-features file")
    assert_clean_failure(cli(pair[0], "--test", tok), "not an igpt-features file")
    assert_clean_failure(cli(tmp_path / "missing.h5"), "no such file")


def test_bad_mismatched_layers(pair, tmp_path):
    feats, y = make_data(90, layers=(0, 1))
    other = write_features(tmp_path / "t.h5", feats, y)
    assert_clean_failure(cli(pair[0], "--test", other), "layers")


def test_bad_mismatched_model_or_site(pair, tmp_path):
    feats, y = make_data(90)
    m = write_features(tmp_path / "m.h5", feats, y, model="imagegpt-medium", model_sha256="ef" * 32)
    assert_clean_failure(cli(pair[0], "--test", m), "same model")
    s = write_features(tmp_path / "s.h5", feats, y, site="mlp")
    assert_clean_failure(cli(pair[0], "--test", s), "site")


def test_bad_missing_layer(pair):
    assert_clean_failure(cli(pair[0], "--test", pair[1], "--layer", "7"), "layer 7: out of range")


def test_bad_single_class(tmp_path):
    feats, y = make_data(60)
    f = write_features(tmp_path / "one.h5", feats, np.zeros_like(y))
    assert_clean_failure(cli(f), "single class")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_bad_nonfinite(tmp_path, bad):
    feats, y = make_data(60)
    feats[1][5, 3] = bad
    f = write_features(tmp_path / "nan.h5", feats, y)
    assert_clean_failure(cli(f, "--layer", "1"), "NaN/inf")


def test_bad_class_with_one_sample(tmp_path, pair):
    feats, y = make_data(60)
    y = np.where(y == 2, 1, y)
    y[7] = 2  # one sample of class 2
    f = write_features(tmp_path / "few.h5", feats, y)
    assert_clean_failure(cli(f, "--test", pair[1]), "fewer than 2 samples")
    assert_clean_failure(cli(f), "fewer than 2 samples")


def test_bad_unlabelled_and_incomplete(tmp_path):
    feats, y = make_data(60)
    y2 = y.copy()
    y2[:4] = -1
    f = write_features(tmp_path / "unl.h5", feats, y2)
    assert_clean_failure(cli(f), "unlabelled")
    g = write_features(tmp_path / "inc.h5", feats, y, complete=False, n_done=30)
    assert_clean_failure(cli(g), "incomplete")
