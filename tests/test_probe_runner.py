"""igpt_cli.probe.runner (and `igpt probe`): features files in, a report out; bad input refused cleanly."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import assert_clean_failure, invoke, run_igpt

from igpt_cli import formats
from igpt_cli.errors import ParameterError
from igpt_cli.outputs import OutputError
from igpt_cli.probe import LayerResult, LinearProbe, ProbeReport, probe_files, write_csv

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
    """A features file; attrs given as None are left out."""
    n = len(labels)
    base = dict(
        format=formats.FEATURES_FORMAT, format_version=formats.FEATURES_VERSION,
        layers=json.dumps(sorted(feats)), site="resid", pool="mean", sos=True, compute_dtype="float32",
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
    return invoke("probe", *args)


def strip(rep: ProbeReport) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rep.to_dict()["layers"]]


# ---------------------------------------------------------------------------
# probe_files
# ---------------------------------------------------------------------------

def test_deterministic_for_seed(pair):
    train, test = pair
    a = probe_files(train, test, seed=3)
    b = probe_files(train, test, seed=3)
    assert strip(a) == strip(b)
    c = probe_files(train, None, seed=3)
    d = probe_files(train, None, seed=3)
    assert strip(c) == strip(d)


def test_jobs_gives_same_result(pair):
    train, test = pair
    assert strip(probe_files(train, test, jobs=2)) == strip(probe_files(train, test, jobs=1))


def test_depth_curve_and_provenance(pair):
    train, test = pair
    rep = probe_files(train, test)
    assert isinstance(rep, ProbeReport) and all(isinstance(r, LayerResult) for r in rep.layers)
    accs = {r.layer: r.test_acc for r in rep.layers}
    assert accs[1] > accs[0] and accs[1] > accs[2]  # the middle layer is the separable one
    d = rep.to_dict()
    assert d["best_layer"] == 1
    assert d["model"] == "imagegpt-test" and d["site"] == "resid" and d["sos"] is True and d["pool"] == "mean"
    assert d["test_mode"] == "file" and d["test_tokens_file"] == "cifar-test.h5"
    assert list(d) == ["igpt_version", "train", "test", "test_mode", "test_fraction", "seed", "model",
                       "model_sha256", "model_config", "site", "pool", "sos", "compute_dtype", "tokens_file",
                       "tokens_sha256", "test_tokens_file", "class_names", "protocol", "best_layer",
                       "best_test_layer", "not_converged_fits", "seconds", "world_size", "warnings", "layers", "method"]
    assert d["layers"][0] == rep.layers[0].to_dict() and json.loads(rep.to_json(indent=2)) == d


def test_progress_one_event_per_layer(pair):
    train, test = pair
    for jobs in (1, 2):
        events = []
        rep = probe_files(train, test, jobs=jobs, on_progress=events.append)
        assert events[0].started and events[0].done == 0 and events[0].total == 3
        assert all(e.task == "probe" and e.unit == "layer" for e in events)
        done = events[1:]
        assert [e.done for e in done] == [1, 2, 3]
        assert sorted(e.result.layer for e in done) == [0, 1, 2]
        assert {e.result.layer: e.result for e in done} == {r.layer: r for r in rep.layers}


def test_version1_file_without_pool_still_probes(pair, tmp_path):
    feats, y = make_data(240, seed=0)
    v1 = write_features(tmp_path / "v1.h5", feats, y, format_version=1, pool=None)
    with h5py.File(v1) as f:
        assert "pool" not in f.attrs
    rep = probe_files(v1, pair[1])  # the test file says pool=mean explicitly: the same thing
    assert rep.pool == "mean" and strip(rep) == strip(probe_files(pair[0], pair[1]))
    assert probe_files(v1, None, ["1"]).to_dict()["pool"] == "mean"


def test_write_csv_from_the_library(pair, tmp_path):
    rep = probe_files(pair[0], pair[1], ["1"])
    write_csv(rep, tmp_path / "r.csv")
    (row,) = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert row["layer"] == "1" and float(row["c"]) == rep.layers[0].c and row["model"] == "imagegpt-test"
    assert float(row["acc_dog"]) == pytest.approx(rep.layers[0].per_class_acc["dog"], abs=1e-6)


def test_bad_parameters_name_the_parameter(pair):
    with pytest.raises(ParameterError, match="^jobs=0: must be at least 1$"):
        probe_files(pair[0], pair[1], jobs=0)
    with pytest.raises(ParameterError, match="^test_fraction=1.5: must be between 0 and 1$"):
        probe_files(pair[0], test_fraction=1.5)
    probe_files(pair[0], pair[1], ["0"], test_fraction=1.5)  # ignored with a test file, as before


# ---------------------------------------------------------------------------
# CLI and reports
# ---------------------------------------------------------------------------

def test_cli_json_on_stdout_only(pair):
    train, test = pair
    r = run_igpt("probe", train, "--test", test, "--json", "--layer", "0-1")
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
    rows = list(csv.DictReader(out_csv.open()))
    assert [int(x["layer"]) for x in rows] == [0, 1, 2]
    assert {"c", "val_acc", "test_acc", "n_train", "n_test", "acc_cat"} <= set(rows[0])
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
                       site="pixels", pool="flatten")
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


def test_bad_mismatched_model_site_or_pool(pair, tmp_path):
    feats, y = make_data(90)
    m = write_features(tmp_path / "m.h5", feats, y, model="imagegpt-medium", model_sha256="ef" * 32)
    assert_clean_failure(cli(pair[0], "--test", m), "same model")
    s = write_features(tmp_path / "s.h5", feats, y, site="mlp")
    assert_clean_failure(cli(pair[0], "--test", s), "site")
    p = write_features(tmp_path / "p.h5", feats, y, pool="max")
    assert_clean_failure(cli(pair[0], "--test", p), "pool='max' does not match")
    v1 = write_features(tmp_path / "v1.h5", feats, y, format_version=1, pool=None)  # no attr: mean
    assert_clean_failure(cli(p, "--test", v1), "pool='mean' does not match")


def test_bad_missing_layer(pair):
    assert_clean_failure(cli(pair[0], "--test", pair[1], "--layer", "7"), "layer 7: out of range")


def test_bad_jobs(pair):
    assert_clean_failure(cli(pair[0], "--jobs", "0"), "jobs")


def test_bad_single_class(tmp_path):
    feats, y = make_data(60)
    f = write_features(tmp_path / "one.h5", feats, np.zeros_like(y))
    assert_clean_failure(cli(f), "single class ('cat' (0))")


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
    assert_clean_failure(cli(f, "--test", pair[1]), "class 'ship' (2) has fewer than 2 samples")
    assert_clean_failure(cli(f), "class 'ship' (2) has fewer than 2 samples")


def test_bad_unlabelled_and_incomplete(tmp_path):
    feats, y = make_data(60)
    y2 = y.copy()
    y2[:4] = -1
    f = write_features(tmp_path / "unl.h5", feats, y2)
    assert_clean_failure(cli(f), "unlabelled")
    g = write_features(tmp_path / "inc.h5", feats, y, complete=False, n_done=30)
    assert_clean_failure(cli(g), "incomplete")


def test_model_config_is_an_object_in_the_report(pair):
    rep = probe_files(pair[0], pair[1], ["1"])
    assert rep.model_config == {"n_layer": 3} and rep.class_names == CLASSES
    r = cli(pair[0], "--test", pair[1], "--layer", "1", "--json", "-q")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["model_config"] == {"n_layer": 3}  # an object, as in `igpt info --json`
    assert d["model_config"] == json.loads(invoke("info", pair[0], "--json").stdout)["attrs"]["model_config"]


def test_write_csv_refuses_an_existing_file_without_overwrite(pair, tmp_path):
    rep = probe_files(pair[0], pair[1], ["1"])
    out = tmp_path / "r.csv"
    out.write_text("keep me")
    with pytest.raises(OutputError, match="overwrite=True"):
        write_csv(rep, out)
    assert out.read_text() == "keep me"
    write_csv(rep, out, overwrite=True)
    assert next(csv.DictReader(out.open()))["layer"] == "1"
    (tmp_path / "d.csv").mkdir()
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="is a directory"):
            write_csv(rep, tmp_path / "d.csv", overwrite=overwrite)


@pytest.mark.parametrize("flag", ["--csv", "--plot"])
def test_output_directory_is_refused_before_any_fit(pair, tmp_path, monkeypatch, flag):
    import igpt_cli.probe.runner as runner

    monkeypatch.setattr(runner, "probe_layer", lambda *a, **k: pytest.fail("fitted before checking the output"))
    d = tmp_path / ("out.csv" if flag == "--csv" else "out.png")
    d.mkdir()
    assert_clean_failure(cli(pair[0], "--test", pair[1], flag, d, "-q"), "is a directory")
    assert d.is_dir() and not any(d.iterdir())


@pytest.mark.parametrize("case", ["class_names", "model_config", "layer-name", "rows", "truncated", "labels-float"])
def test_bad_damaged_features_file(tmp_path, case):
    feats, y = make_data(60)
    path = tmp_path / f"{case}.h5"
    needle = {"class_names": "attr class_names is not valid JSON", "model_config": "attr model_config",
              "layer-name": "features/x is not a layer number", "rows": "features/1 has 59 rows but labels has 60",
              "truncated": "truncated HDF5 file", "labels-float": "labels must be a 1-D integer array"}[case]
    if case == "class_names":
        write_features(path, feats, y, class_names="{cat")
    elif case == "model_config":
        write_features(path, feats, y, model_config="[1, 2]")  # JSON, but not an object
    elif case == "layer-name":
        write_features(path, feats, y)
        with h5py.File(path, "r+") as f:
            f["features/x"] = feats[0]
    elif case == "rows":
        write_features(path, {**feats, 1: feats[1][:59]}, y)
    elif case == "truncated":
        write_features(path, feats, y)
        path.write_bytes(path.read_bytes()[:2500])
    elif case == "labels-float":
        write_features(path, feats, y)
        with h5py.File(path, "r+") as f:
            del f["labels"]
            f["labels"] = y.astype(np.float32)
    assert_clean_failure(cli(path), needle)
    assert str(path) in cli(path).stderr.replace("\n", "")


def test_layers_are_grouped_by_memory_and_width():
    from igpt_cli.probe.runner import LAYER_GROUP_COPIES, layer_groups

    per_layer = LAYER_GROUP_COPIES * 100 * 8 * 4   # 100 rows of 8 dims
    dims = {0: 8, 1: 8, 2: 8, 3: 16, 4: 16}
    assert layer_groups([0, 1, 2, 3, 4], 100, dims, 2 * per_layer) == [[0, 1], [2], [3], [4]]
    assert layer_groups([0, 1, 2, 3, 4], 100, dims, 100 * per_layer) == [[0, 1, 2], [3, 4]]  # same width only
    assert layer_groups([2], 100, dims, 1) == [[2]]   # a layer alone is always a group


def test_files_with_other_layer_sets_pair_on_the_layers_both_hold(pair, tmp_path):
    """`igpt probe train.h5 --test test-l1.h5 --layer 1`: the test file holds only layer 1 (issue 22.5)."""
    feats, y = make_data(90, seed=1)
    only1 = write_features(tmp_path / "test-l1.h5", {1: feats[1]}, y)
    rep = probe_files(pair[0], only1, ["1"])
    ref = probe_files(pair[0], pair[1], ["1"])
    assert [r.layer for r in rep.layers] == [1] and strip(rep) == strip(ref)
    r = cli(pair[0], "--test", only1, "--layer", "-1", "--json", "-q")   # -1: the last layer both hold
    assert r.returncode == 0, r.stderr and [x["layer"] for x in json.loads(r.stdout)["layers"]] == [1]
    assert_clean_failure(cli(pair[0], "--test", only1), "--layer 1")          # no --layer: a hint, not a guess
    assert_clean_failure(cli(pair[0], "--test", only1, "--layer", "0"), "layer 0: out of range")


def test_device_recorded_is_the_one_the_fits_ran_on(pair):
    """scipy and scikit-learn solvers are numpy code: the report says cpu whatever --device says."""
    rep = probe_files(pair[0], pair[1], ["1"], solver="scipy", device="cpu")
    assert rep.protocol["device"] == "cpu" and rep.world_size == 1
    assert probe_files(pair[0], pair[1], ["1"], solver="torch", device="cpu").protocol["device"] == "cpu"
    import torch
    from sklearn.linear_model import LogisticRegression

    from igpt_cli.probe.runner import fit_device
    from igpt_cli.sweep.stage import probe_device

    gpu = torch.device("cuda", 1)   # only named, never used: where would each solver run?
    assert fit_device(LinearProbe(solver="torch"), gpu) == "cuda:1"
    assert fit_device(LinearProbe(solver="scipy"), gpu) == fit_device(LinearProbe(solver="sklearn"), gpu) == "cpu"
    assert fit_device(LogisticRegression(), gpu) == "cpu"
    assert probe_device(torch.device("mps")) == "cpu" and probe_device(gpu) == "cuda:1"   # the sweep's probe


@pytest.mark.parametrize("flag", ["--save-probes", "--csv", "--plot", "--plot-confusion"])
def test_an_output_that_is_an_input_is_refused(pair, tmp_path, flag):
    """Issue 20.1: probe --save-probes = the train features, --csv = the test features (by any name)."""
    train, test = pair
    before = {p: p.read_bytes() for p in (train, test)}
    link = tmp_path / "link.h5"
    link.symlink_to(test)
    for out, needle in ((train, "would overwrite the input TRAIN_FEATS.h5"), (test, "would overwrite the input --test"),
                        (link, "would overwrite the input --test")):
        for extra in ((), ("--overwrite",)):
            assert_clean_failure(cli(train, "--test", test, "--layer", "1", flag, out, *extra, "-q"), needle)
    assert {p: p.read_bytes() for p in (train, test)} == before


def test_a_plot_named_like_an_input_is_refused(tmp_path):
    feats, y = make_data(90)
    train = write_features(tmp_path / "feats.png", feats, y)   # an input whose name looks like a picture
    before = train.read_bytes()
    assert_clean_failure(cli(train, "--layer", "1", "--plot", f"{tmp_path}/./feats.png", "--overwrite", "-q"),
                         "would overwrite the input TRAIN_FEATS.h5")
    assert train.read_bytes() == before
    with pytest.raises(OutputError, match="save_probes would overwrite the input train"):
        probe_files(train, None, ["1"], save_probes=tmp_path / "feats.png", overwrite=True)


# ---------------------------------------------------------------------------
# under torchrun (gloo on the CPU): layers spread over ranks, rank 0 writes the one report
# ---------------------------------------------------------------------------

TORCHRUN = Path(__import__("sys").executable).with_name("torchrun")


def _torchrun_probe(k, *args):
    import subprocess
    import sys

    from helpers import ENV

    launcher = [str(TORCHRUN), "--standalone", f"--nproc-per-node={k}"] if k > 1 else [sys.executable]
    return subprocess.run([*launcher, "-m", "igpt_cli", "probe", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=600)


def _without_timing(d: dict) -> dict:
    d = {k: v for k, v in d.items() if k not in ("seconds", "world_size")}
    d["layers"] = [{k: v for k, v in r.items() if k != "seconds"} for r in d["layers"]]
    return d


@pytest.fixture(scope="module")
def five_layers(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    ftr, ytr = make_data(121, d=8, layers=(0, 1, 2, 3, 4), seed=0)
    fte, yte = make_data(61, d=8, layers=(0, 1, 2, 3, 4), seed=1)
    train, test = write_features(d / "train.h5", ftr, ytr), write_features(d / "test.h5", fte, yte)
    outs = {}

    def run(k):
        o = d / f"k{k}"
        o.mkdir()
        r = _torchrun_probe(k, train, "--test", test, "--save-probes", o / "p.h5", "--csv", o / "r.csv", "--json",
                            "-q", "--device", "cpu")
        assert r.returncode == 0, r.stderr
        outs[k] = (json.loads(r.stdout), o)   # the whole of stdout is one JSON document: rank 0 alone prints
        return outs[k]

    run(1)
    return run, outs, (train, test)


@pytest.mark.parametrize("k", [2, 3])
def test_torchrun_equals_one_process(five_layers, k):
    """5 layers over 2 or 3 ranks: the same report, CSV and saved probes (bit for bit) as one process."""
    run, outs, _ = five_layers
    doc, o = run(k)
    ref, ro = outs[1]
    assert doc["world_size"] == k and ref["world_size"] == 1
    assert _without_timing(doc) == _without_timing(ref)
    strip_s = lambda p: [row[:8] + row[9:] for row in csv.reader(p.open())]   # noqa: E731 - all but seconds
    assert strip_s(o / "r.csv") == strip_s(ro / "r.csv")
    with h5py.File(o / "p.h5") as a, h5py.File(ro / "p.h5") as b:
        assert int(a.attrs["world_size"]) == k and int(b.attrs["world_size"]) == 1
        assert a.attrs["probes_sha256"] == b.attrs["probes_sha256"] and a.attrs["device"] == "cpu"
        for layer in b["probes"]:
            for key in ("mean", "scale", "coef", "intercept", "classes"):
                assert a[f"probes/{layer}/{key}"][()].tobytes() == b[f"probes/{layer}/{key}"][()].tobytes()
    assert sorted(p.name for p in o.iterdir()) == ["p.h5", "r.csv"]


def test_torchrun_bad_input_is_said_once(five_layers, tmp_path):
    """A NaN in layer 3 (fitted by rank 1 of 2): every rank exits 2, the error is one line, nothing is written."""
    _, _, (train, test) = five_layers
    feats, y = make_data(61, d=8, layers=(0, 1, 2, 3, 4), seed=1)
    feats[3][7, 1] = np.nan
    bad = write_features(tmp_path / "bad.h5", feats, y)
    r = _torchrun_probe(2, train, "--test", bad, "--save-probes", tmp_path / "p.h5", "-q", "--device", "cpu")
    assert r.returncode != 0 and r.stdout == ""
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "layer 3 has NaN/inf" in lines[0], r.stderr
    assert "igpt_cli/" not in r.stderr and not (tmp_path / "p.h5").exists()   # no traceback of ours
    r = _torchrun_probe(2, train, "--test", test, "--csv", test, "-q", "--device", "cpu")   # checked before any fit
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "would overwrite the input --test" in lines[0], r.stderr


def test_small_data_is_said(pair):
    """Issue 22.3: 240 training rows: C chosen by 5-fold cross-validation, and the table says so."""
    r = cli(pair[0], "--test", pair[1], "--layer", "1", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["layers"][0]["selection"] == "5-fold" and d["layers"][0]["n_val"] == 240
    assert any("5-fold cross-validation over the 240 training rows" in w for w in d["warnings"])
    assert "warning: C chosen by stratified 5-fold" in " ".join(r.stderr.split())


def test_torchrun_concat_and_knn_equal_one_process(five_layers, tmp_path):
    """--concat (one probe, fitted by rank 0) and --method knn (layers over ranks) under 2 ranks: the same
    report as one process."""
    _, _, (train, test) = five_layers
    for extra in (["--layer", "1,3", "--concat"], ["--method", "knn", "--k", "5"]):
        args = [train, "--test", test, "--json", "-q", "--device", "cpu", *extra]
        r, one = _torchrun_probe(2, *args), invoke("probe", *args)   # 2 ranks; one process (in this one)
        assert r.returncode == 0 and one.exit_code == 0, r.stderr
        docs = [json.loads(one.stdout), json.loads(r.stdout)]
        assert _without_timing(docs[0]) == _without_timing(docs[1])
    assert [x["layers"] for x in docs[0]["layers"]] == [[l] for l in range(5)] and docs[0]["protocol"]["method"] == "knn"


def test_knn_on_concatenated_layers(pair):
    """k-NN with --concat: each layer L2-normalised, then concatenated (each weighs the same in the cosine)."""
    from sklearn.neighbors import KNeighborsClassifier

    train, test = pair
    rep = probe_files(train, test, ["0", "1"], method="knn", k=5, knn_vote="majority", concat=True)
    (r,) = rep.layers
    with h5py.File(train) as a, h5py.File(test) as b:
        unit = lambda f: np.concatenate([f[f"features/{l}"][()] / np.linalg.norm(f[f"features/{l}"][()], axis=1,
                                                                                  keepdims=True) for l in (0, 1)], 1)  # noqa: E731
        ref = KNeighborsClassifier(n_neighbors=5, metric="cosine", algorithm="brute").fit(unit(a), a["labels"][()])
        assert r.layers == [0, 1] and r.test_acc == pytest.approx(ref.score(unit(b), b["labels"][()]))
