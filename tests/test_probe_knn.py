"""igpt_cli.probe.knn (and `igpt probe --method knn`): parity with scikit-learn and DINO's formula."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from helpers import assert_clean_failure, invoke, overlapping_classes
from sklearn.neighbors import KNeighborsClassifier
from test_probe_runner import make_data, write_features

from igpt_cli.errors import InputError, ParameterError
from igpt_cli.probe import knn_layer, knn_predict, knn_scores, probe_files


@pytest.fixture(scope="module")
def data():
    X, y = overlapping_classes(211, d=16, k=4, seed=3)
    return X[:150], y[:150], X[150:], y[150:]


@pytest.mark.parametrize("k", [1, 7, 20])
def test_majority_vote_equals_sklearn_cosine(data, k):
    Xtr, ytr, Xte, yte = data
    ref = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(Xtr, ytr).predict(Xte)
    # small chunks: the chunking must not change anything
    ours = knn_predict(Xtr, ytr, Xte, k=k, vote="majority", chunk_rows=13)
    np.testing.assert_array_equal(ours, ref)


def dino_weighted_vote(Xtr, ytr, Xte, k, T, n_classes):
    """DINO's eval_knn.py knn_classifier in numpy (float64): top-k cosine similarities, one-hot labels
    weighted by exp(sim / T), summed; prediction = the class of the largest sum."""
    a = Xtr / np.linalg.norm(Xtr, axis=1, keepdims=True)
    b = Xte / np.linalg.norm(Xte, axis=1, keepdims=True)
    sim = b.astype(np.float64) @ a.T.astype(np.float64)
    idx = np.argsort(-sim, axis=1)[:, :k]
    dist = np.take_along_axis(sim, idx, axis=1)
    one_hot = np.eye(n_classes)[ytr[idx]]                     # [n, k, C]
    probs = (one_hot * np.exp(dist / T)[:, :, None]).sum(1)
    return probs, probs.argmax(1)


@pytest.mark.parametrize("k,T", [(20, 0.07), (5, 0.5)])
def test_weighted_vote_equals_dino_formula(data, k, T):
    Xtr, ytr, Xte, yte = data
    probs, ref = dino_weighted_vote(Xtr, ytr, Xte, k, T, 4)
    classes, scores = knn_scores(Xtr, ytr, Xte, k=k, vote="weighted", temperature=T, chunk_rows=17)
    np.testing.assert_array_equal(classes, np.arange(4))
    np.testing.assert_allclose(scores, probs, rtol=2e-4)
    np.testing.assert_array_equal(classes[scores.argmax(1)], ref)


def test_knn_layer_result_and_leave_one_out(data):
    Xtr, ytr, Xte, yte = data
    r = knn_layer(Xtr, ytr, Xte, yte, k=5, vote="majority", layer=3)
    ref = KNeighborsClassifier(n_neighbors=5, metric="cosine", algorithm="brute").fit(Xtr, ytr)
    assert r.method == "knn" and r.k == 5 and r.c is None and r.layer == 3 and r.selection == "leave-one-out"
    assert r.test_acc == pytest.approx(ref.score(Xte, yte))
    # leave-one-out: each training row by the others (scikit-learn's kneighbors without the query itself)
    nb = ref.kneighbors(None, n_neighbors=5, return_distance=False)
    loo = np.array([np.bincount(ytr[row], minlength=4).argmax() for row in nb])
    assert r.val_acc == pytest.approx(np.mean(loo == ytr))
    assert sum(map(sum, r.confusion)) == len(yte)


def test_bad_parameters(data):
    Xtr, ytr, Xte, yte = data
    with pytest.raises(InputError, match="larger than the training set"):
        knn_layer(Xtr, ytr, Xte, yte, k=150)
    for kw, name in ((dict(k=0), "k"), (dict(vote="mean"), "knn_vote"), (dict(temperature=0.0), "knn_temperature")):
        with pytest.raises(ParameterError, match=name):
            knn_predict(Xtr, ytr, Xte, **kw)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("knn")
    ftr, ytr = make_data(121, seed=0)
    fte, yte = make_data(47, seed=1)
    return write_features(d / "train.h5", ftr, ytr), write_features(d / "test.h5", fte, yte), (ftr, ytr, fte, yte)


def test_probe_files_knn_per_layer(pair):
    train, test, (ftr, ytr, fte, yte) = pair
    rep = probe_files(train, test, method="knn", k=7, knn_vote="majority")
    d = rep.to_dict()
    assert d["protocol"]["method"] == "knn" and d["protocol"]["k"] == 7 and d["protocol"]["vote"] == "majority"
    for r in d["layers"]:
        ref = KNeighborsClassifier(n_neighbors=7, metric="cosine", algorithm="brute").fit(ftr[r["layer"]], ytr)
        assert r["method"] == "knn" and r["test_acc"] == pytest.approx(ref.score(fte[r["layer"]], yte))
    assert probe_files(train, test).to_dict()["protocol"]["method"] == "linear"


def test_cli_knn_json_csv_and_bad_k(pair, tmp_path):
    train, test, _ = pair
    r = invoke("probe", train, "--test", test, "--method", "knn", "--json", "--csv", tmp_path / "k.csv", "-q")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["protocol"]["k"] == 20 and d["protocol"]["temperature"] == 0.07
    assert all(x["method"] == "knn" and x["k"] == 20 for x in d["layers"])
    rows = list(csv.DictReader((tmp_path / "k.csv").open()))
    assert [(r["method"], r["c"], r["k"]) for r in rows] == [("knn", "", "20")] * 3
    assert_clean_failure(invoke("probe", train, "--test", test, "--method", "knn", "--k", "500"),
                         "larger than the training set")
    assert_clean_failure(invoke("probe", train, "--test", test, "--method", "knn", "--knn-temperature", "0"),
                         "--knn-temperature")


# ---------------------------------------------------------------------------
# few-shot linear probes (igpt_cli.probe.fewshot, `igpt probe --shots`)
# ---------------------------------------------------------------------------

def test_few_shot_draws_and_statistics(data):
    from igpt_cli.probe import probe_layer
    from igpt_cli.probe.fewshot import draw_shots, few_shot

    Xtr, ytr, Xte, yte = data
    out = few_shot(Xtr, ytr, Xte, yte, [5, 1], seeds=3, seed=2)
    assert [f["shots"] for f in out] == [1, 5]
    one, five = out
    assert one["c"] == [1.0] * 3 and "fixed" in one["selection"] and "5-fold" in five["selection"]
    assert five["test_acc_mean"] == pytest.approx(np.mean(five["test_accs"]))
    assert five["test_acc_std"] == pytest.approx(np.std(five["test_accs"], ddof=1))
    # each draw: 5 rows of every class, and the probe on them is the ordinary protocol
    idx = draw_shots(ytr, 5, 2, 1)
    assert np.bincount(ytr[idx]).tolist() == [5, 5, 5, 5]
    assert five["test_accs"][1] == probe_layer(Xtr[idx], ytr[idx], Xte, yte, 2).test_acc
    assert len({tuple(draw_shots(ytr, 5, 2, s)) for s in range(3)}) == 3   # draws differ


def test_cli_few_shot_json_and_too_many_shots(pair):
    train, test, (ftr, ytr, fte, yte) = pair
    r = invoke("probe", train, "--test", test, "--layer", "1", "--shots", "1,3", "--seeds", "2", "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["protocol"]["few_shot"]["shots"] == [1, 3] and d["protocol"]["few_shot"]["seeds"] == 2
    (layer,) = d["layers"]
    assert [f["shots"] for f in layer["few_shot"]] == [1, 3] and all(len(f["test_accs"]) == 2 for f in layer["few_shot"])
    assert "3-shot" in r.stderr
    smallest = int(np.bincount(ytr).min())
    assert_clean_failure(invoke("probe", train, "--test", test, "--shots", f"1,{smallest + 1}"),
                         "larger than the smallest class")
    assert_clean_failure(invoke("probe", train, "--test", test, "--shots", "1,x"), "--shots")


# ---------------------------------------------------------------------------
# streaming the training rows (blocks merged into a running top k; `--max-memory`)
# ---------------------------------------------------------------------------

def test_tied_neighbours_go_to_the_smaller_training_index_whatever_the_blocks(tmp_path):
    from igpt_cli.probe.stream import H5Rows

    a, b = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    Xtr = np.stack([b, a, 2 * a, a, b, 3 * a, b]).astype(np.float32)   # a at rows 1, 3, 5 (and 2): all tied
    ytr = np.array([0, 1, 2, 3, 0, 2, 0])
    path = write_features(tmp_path / "t.h5", {0: Xtr}, ytr)
    for k, want in ((1, 1), (2, 1), (3, 1)):   # rows 1 and 2 (both a): labels 1, 2; k=3 adds row 3 (label 3)
        for source in (Xtr, H5Rows(path, 0, 1), H5Rows(path, 0, 2), H5Rows(path, 0, 3)):
            for rows in (None, 1, 2):
                kw = dict(k=k, vote="majority", chunk_rows=1)
                if not hasattr(source, "numpy_chunks"):
                    kw["train_rows"] = rows
                classes, scores = knn_scores(source, ytr, np.array([a, 5 * a], np.float32), **kw)
                assert classes[scores.argmax(1)].tolist() == [want, want], (k, source, rows)
                assert scores[0, classes.tolist().index(1)] == 1 and scores[0].sum() == k


def test_streamed_equals_in_memory_with_many_blocks_and_ties(tmp_path):
    from igpt_cli.probe.stream import H5Rows

    X, y = overlapping_classes(260, d=10, k=4, seed=5)
    X[100:140] = X[:40]               # duplicated rows of other labels: exact ties across blocks
    y[100:140] = (y[:40] + 1) % 4
    X[140:150] = 0                    # zero rows: similarity 0 to everything
    Xtr, ytr, Xte, yte = X[:200], y[:200], np.concatenate([X[200:], X[:20]]), np.concatenate([y[200:], y[:20]])
    path = write_features(tmp_path / "f.h5", {0: Xtr}, ytr)
    for vote in ("weighted", "majority"):
        kw = dict(k=9, vote=vote, temperature=0.1)
        ref = knn_scores(Xtr, ytr, Xte, **kw)[1]
        for train in (H5Rows(path, 0, 7), H5Rows(path, 0, 64)):
            np.testing.assert_array_equal(knn_scores(train, ytr, Xte, chunk_rows=5, **kw)[1], ref)
        np.testing.assert_array_equal(knn_scores(Xtr, ytr, Xte, train_rows=13, chunk_rows=11, **kw)[1], ref)
        # leave-one-out with the queries streamed from the same file
        loo = knn_scores(Xtr, ytr, Xtr, exclude_self=True, **kw)[1]
        src = H5Rows(path, 0, 17)
        np.testing.assert_array_equal(knn_scores(src, ytr, src, exclude_self=True, chunk_rows=6, **kw)[1], loo)
    # a subset of the file's rows (the held-out split) streams the same rows as indexing them
    idx = np.arange(0, 200, 3)
    np.testing.assert_array_equal(knn_predict(H5Rows(path, 0, 16).take(idx), ytr[idx], Xte, k=5),
                                  knn_predict(Xtr[idx], ytr[idx], Xte, k=5))


def test_cli_max_memory_streams_the_training_rows_with_the_same_accuracy(tmp_path, monkeypatch):
    from igpt_cli.probe import stream

    ftr, ytr = make_data(1100, d=64, layers=(1,), seed=0)
    fte, yte = make_data(300, d=64, layers=(1,), seed=1)
    train = write_features(tmp_path / "train.h5", ftr, ytr)
    test = write_features(tmp_path / "test.h5", fte, yte)
    reads = []
    real = stream.H5Rows.numpy_chunks
    monkeypatch.setattr(stream.H5Rows, "numpy_chunks", lambda self: reads.append(self.path) or real(self))
    docs = {}
    for cap in (None, "1M"):
        for held_out in (False, True):
            args = ["probe", train, "--method", "knn", "--k", "10", "--json", "-q"]
            args += [] if held_out else ["--test", test]
            r = invoke(*args, *([] if cap is None else ["--max-memory", cap]))
            assert r.exit_code == 0, r.stderr
            docs[cap, held_out] = json.loads(r.stdout)
        assert bool(reads) == (cap is not None)   # 1M: too small to hold the layer, so it streams
    for held_out in (False, True):
        assert [(x["layer"], x["val_acc"], x["test_acc"]) for x in docs[None, held_out]["layers"]] == \
            [(x["layer"], x["val_acc"], x["test_acc"]) for x in docs["1M", held_out]["layers"]]
    assert_clean_failure(invoke("probe", train, "--test", test, "--method", "knn", "--max-memory", "2K"),
                         "--max-memory")
