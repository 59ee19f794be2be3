"""Out-of-core probing (--max-memory), saved probes and `igpt predict`, and their bad input."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from helpers import assert_clean_failure, invoke
from test_probe_runner import make_data, write_features

from igpt_cli.errors import InputError, ParameterError
from igpt_cli.probe import load_probes, predict_file, probe_files
from igpt_cli.probe.stream import parse_bytes


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("store")
    ftr, ytr = make_data(600, d=16, seed=0)
    fte, yte = make_data(200, d=16, seed=1)
    return write_features(d / "train.h5", ftr, ytr), write_features(d / "test.h5", fte, yte)


@pytest.fixture(scope="module")
def saved(files, tmp_path_factory):
    path = tmp_path_factory.mktemp("probes") / "probes.h5"
    rep = probe_files(*files, device="cpu", solver="torch", save_probes=path)
    return rep, path


def test_streamed_equals_in_memory(files, saved):
    mem, _ = saved
    streamed = probe_files(*files, device="cpu", max_memory="150K")   # < one layer: read in row chunks
    for a, b in zip(mem.layers, streamed.layers):
        assert a.c == b.c and a.test_acc == b.test_acc and a.val_acc == b.val_acc
        scale = np.abs(a.classifier["coef"]).max()
        assert np.abs(a.classifier["coef"] - b.classifier["coef"]).max() <= 1e-4 * scale
        assert np.allclose(a.classifier["mean"], b.classifier["mean"], atol=1e-5)


def test_save_then_predict_reproduces_test_accuracy_exactly(files, saved, tmp_path):
    rep, path = saved
    attrs, probes = load_probes(path)
    assert attrs["format"] == "igpt-probes" and attrs["format_version"] == 2 and "created_utc" in attrs
    assert sorted(probes) == [r.layer for r in rep.layers] and attrs["class_names"] == rep.class_names
    for r in rep.layers:
        out = tmp_path / f"pred{r.layer}.h5"
        p = predict_file(files[1], path, r.layer, out)
        assert p.accuracy == r.test_acc and p.n_unseen == 0
        with h5py.File(out) as f:
            assert f.attrs["format"] == "igpt-predictions"
            assert f["probabilities"].shape == (200, 3) and f["pred_name"][0].decode() in rep.class_names


def test_cli_predict_json_and_unseen_class(files, saved, tmp_path):
    _, path = saved
    fte, yte = make_data(60, d=16, seed=2)
    yte[:5] = 3                                           # a class the probes never saw
    odd = write_features(tmp_path / "odd.h5", fte, yte, class_names='["cat", "dog", "ship", "frog"]')
    r = invoke("predict", str(odd), "--probes", str(path), "--json")
    assert r.exit_code == 0, r.stderr
    import json

    d = json.loads(r.stdout)
    assert d["n_unseen"] == 5 and d["unseen_classes"] == ["3"] and d["n_known"] == 55
    assert len(d["predictions"]) == 60 and "never saw" in r.stderr


def test_bad_probes_from_another_model(files, saved, tmp_path):
    _, path = saved
    ftr, y = make_data(30, d=16, seed=3)
    other = write_features(tmp_path / "other.h5", ftr, y, model_sha256="ef" * 32)
    out = tmp_path / "p.h5"
    r = invoke("predict", str(other), "--probes", str(path), "-o", str(out))
    assert_clean_failure(r, "model_sha256", out)
    with pytest.raises(InputError, match="site"):
        predict_file(write_features(tmp_path / "o2.h5", ftr, y, site="ln"), path)


def test_bad_device_and_max_memory(files, tmp_path):
    r = invoke("probe", str(files[0]), "--device", "cuda") if not __import__("torch").cuda.is_available() else None
    if r is not None:
        assert_clean_failure(r, "--device")
    r = invoke("probe", str(files[0]), "--max-memory", "10K", "--save-probes", str(tmp_path / "x.h5"))
    assert_clean_failure(r, "below one chunk", tmp_path / "x.h5")
    with pytest.raises(ParameterError, match="max_memory"):
        probe_files(files[0], max_memory="lots")
    with pytest.raises(ParameterError, match="solver"):
        probe_files(files[0], max_memory="150K", solver="scipy")
    assert parse_bytes("2G") == 2 << 30 and parse_bytes("512M") == 512 << 20


def test_cli_plot_confusion(files, tmp_path):
    out = tmp_path / "cm.png"
    r = invoke("probe", str(files[0]), "--test", str(files[1]), "-l", "1", "--plot-confusion", str(out), "-q",
               "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    assert out.read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------
# predict: outputs vs inputs, damaged probes, layer choice, traceable rows (issues 20.1, 20.6, 22.1, 22.2)
# ---------------------------------------------------------------------------

def _copy(src, dst):
    dst.write_bytes(src.read_bytes())
    return dst


def test_predict_output_that_is_an_input_is_refused(files, saved, tmp_path):
    _, path = saved
    fte, probes = _copy(files[1], tmp_path / "fte.h5"), _copy(path, tmp_path / "p.h5")
    before = {p: p.read_bytes() for p in (fte, probes)}
    (tmp_path / "sub").mkdir()
    link = tmp_path / "sub/alias.h5"
    link.symlink_to(fte)
    for out, needle in ((fte, "input features"), (probes, "input probes"), (link, "input features"),
                        (tmp_path / "sub/../p.h5", "input probes")):
        for extra in ((), ("--overwrite",)):
            r = invoke("predict", fte, "--probes", probes, "-o", out, *extra)
            assert_clean_failure(r, needle)
    assert {p: p.read_bytes() for p in (fte, probes)} == before


def _damage(path, case):
    with h5py.File(path, "r+") as f:
        g = f["probes/1"]
        if case == "coef-columns":
            c = g["coef"][()]
            del g["coef"]
            g["coef"] = c[:, :-3]
        elif case == "scale-zeros":
            s = g["scale"][()]
            g["scale"][...] = np.zeros_like(s)
        elif case == "class-names":
            f.attrs["class_names"] = "[cat"
        elif case == "no-group":
            del f["probes"]
        elif case == "nan-coef":
            c = g["coef"][()]
            c[0, 0] = np.nan
            g["coef"][...] = c
        elif case == "edited":
            c = g["coef"][()]
            g["coef"][...] = c * 1.5          # plausible numbers: only the digest tells
        elif case == "no-digest":
            del f.attrs["probes_sha256"]


@pytest.mark.parametrize("case, needle", [
    ("coef-columns", "coef is 3 x 13"), ("scale-zeros", "scale holds 16 values <= 0"),
    ("class-names", "class_names is not valid JSON"), ("no-group", "no 'probes' group"),
    ("nan-coef", "coef holds NaN"), ("edited", "do not match the digest"), ("no-digest", "no probes_sha256"),
])
def test_predict_on_damaged_probes_is_one_line(files, saved, tmp_path, case, needle):
    _, path = saved
    bad = _copy(path, tmp_path / "bad.h5")
    _damage(bad, case)
    out = tmp_path / "pred.h5"
    r = invoke("predict", files[1], "--probes", bad, "-o", out, "--layer", "1")
    assert_clean_failure(r, needle, out)


def test_predict_on_nan_features_is_one_line(files, saved, tmp_path):
    _, path = saved
    fte, yte = make_data(30, d=16, seed=4)
    fte[1][3, 2] = np.nan
    nan = write_features(tmp_path / "nan.h5", fte, yte)
    assert_clean_failure(invoke("predict", nan, "--probes", path, "-o", tmp_path / "p.h5", "--layer", "1"),
                         "NaN/inf features in 1 rows", tmp_path / "p.h5")


def test_predict_uses_the_best_layer_the_features_have(files, saved, tmp_path):
    rep, path = saved
    assert rep.best_layer == 1
    fte, yte = make_data(40, d=16, seed=5)
    other = {l: x for l, x in fte.items() if l != 1}                   # the probes' best layer is missing
    feats = write_features(tmp_path / "no-best.h5", other, yte)
    want = max((r for r in rep.layers if r.layer != 1), key=lambda r: (r.val_acc, -r.layer)).layer
    p = predict_file(feats, path)
    assert p.layer == want and "not in no-best.h5" in p.layer_choice
    assert p.accuracy == predict_file(feats, path, want).accuracy
    r = invoke("predict", feats, "--probes", path, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["layer"] == want and f"layer {want} (the best" in r.stderr
    only6 = write_features(tmp_path / "l6.h5", {6: fte[0]}, yte)     # no layer in common: a hint
    assert_clean_failure(invoke("predict", only6, "--probes", path, "--json"), "none in common")
    assert_clean_failure(invoke("predict", feats, "--probes", path, "--layer", "1", "--json"),
                         f"has no layer 1 (it has layers 0,2); choose one they share with --layer 2")
    r = invoke("predict", feats, "--probes", path, "--layer", "-1", "--json")   # -1: the probes' last layer
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["layer"] == 2


def test_predictions_carry_sources_and_print_a_table(files, saved, tmp_path):
    _, path = saved
    out = tmp_path / "pred.h5"
    r = invoke("predict", files[1], "--probes", path, "-o", out, "--json")
    d = json.loads(r.stdout)
    rows = d["predictions"]
    assert [x["source"] for x in rows[:3]] == ["img0", "img1", "img2"] and rows[0]["label"] >= 0
    with h5py.File(out) as f, h5py.File(files[1]) as src:
        assert list(f["sources"].asstr()[:]) == list(src["sources"].asstr()[:])
        assert list(f["pred"][:]) == [x["class"] for x in rows]
    r = invoke("predict", files[1], "--probes", path, "--layer", "1")   # neither -o nor --json: a table
    assert r.exit_code == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if "img" in line]
    assert len(lines) == 200 and "img199" in lines[-1]
    assert any(name in lines[0] for name in ("cat", "dog", "ship"))


# ---------------------------------------------------------------------------
# --concat: one probe on several layers
# ---------------------------------------------------------------------------

def test_concat_equals_a_probe_on_the_standardised_concatenation(tmp_path):
    from igpt_cli.probe import probe_layer, standardize

    ftr, ytr = make_data(151, d=6, seed=0)
    fte, yte = make_data(61, d=6, seed=1)
    train, test = write_features(tmp_path / "tr.h5", ftr, ytr), write_features(tmp_path / "te.h5", fte, yte)
    rep = probe_files(train, test, ["2", "0"], concat=True, device="cpu", save_probes=tmp_path / "p.h5")
    (r,) = rep.layers
    assert r.layers == [0, 2] and r.layer == 0 and r.dim == 12 and rep.best_layer == 0   # in increasing order
    # reference: each layer standardised with its own train statistics, concatenated, probed as one layer
    parts = [standardize(ftr[l], fte[l]) for l in (0, 2)]
    ref = probe_layer(np.concatenate([p[0] for p in parts], 1), ytr, np.concatenate([p[1] for p in parts], 1), yte)
    assert r.c == pytest.approx(ref.c, rel=1e-6) and r.test_acc == ref.test_acc and r.val_acc == ref.val_acc
    # predict concatenates the same layers in the same order and reproduces the test accuracy
    _, probes = load_probes(tmp_path / "p.h5")
    assert sorted(probes) == [0] and probes[0].layers == [0, 2]
    pred = predict_file(test, tmp_path / "p.h5")
    assert pred.layer == 0 and pred.accuracy == r.test_acc
    # features without one of the layers: one line
    write_features(tmp_path / "te2.h5", {0: fte[0], 1: fte[1]}, yte)
    with pytest.raises(InputError, match="no layer 2"):
        predict_file(tmp_path / "te2.h5", tmp_path / "p.h5")


def test_cli_concat_with_one_layer_is_refused(files, tmp_path):
    train, test = files
    r = invoke("probe", train, "--test", test, "--layer", "1", "--concat", "--csv", tmp_path / "c.csv")
    assert_clean_failure(r, "--concat", tmp_path / "c.csv")


def test_disk_full_saving_probes_or_predictions_is_one_line(files, saved, tmp_path):
    """Issue 20.5: on a file system too small for the file, `probe --save-probes` and `predict -o` stop
    in one line, exit 2 (no crash at close), and leave nothing behind."""
    from helpers import run_igpt, small_tmpfs

    _, path = saved
    with small_tmpfs(tmp_path / "mnt", "64k") as mnt:
        r = run_igpt("probe", files[0], "--layer", "0", "--save-probes", mnt / "p.h5", "-q")
        assert_clean_failure(r, "no space left on device")
        assert list(mnt.iterdir()) == []
        (mnt / "fill").write_bytes(b"\0" * (60 << 10))  # 4 KiB left: less than the predictions need
        r = run_igpt("predict", files[1], "--probes", path, "-o", mnt / "pred.h5", "-q")
        assert_clean_failure(r, "no space left on device")
        assert sorted(p.name for p in mnt.iterdir()) == ["fill"]
