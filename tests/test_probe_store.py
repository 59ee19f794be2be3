"""Out-of-core probing (--max-memory), saved probes and `igpt predict`, and their bad input."""
from __future__ import annotations

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
