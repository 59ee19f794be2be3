"""igpt_cli.probe.protocol: the C search and one layer's probe, against plain scikit-learn."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import overlapping_classes
from sklearn.linear_model import LogisticRegression

from igpt_cli.errors import InputError, ParameterError
from igpt_cli.probe import COARSE_GRID, LinearProbe, probe_layer, search_c, standardize, stratified_split


def without_seconds(r) -> dict:
    return {k: v for k, v in r.to_dict().items() if k != "seconds"}


def test_probe_accuracy_matches_plain_sklearn_at_chosen_c():
    X, y = overlapping_classes(2000, seed=0)
    Xt, yt = overlapping_classes(1000, seed=1)
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
    X, y = overlapping_classes(600, seed=2)
    Xt, yt = overlapping_classes(300, seed=3)
    a = probe_layer(X, y, Xt, yt, seed=0)
    b = probe_layer(X, y, Xt[::-1] * 3 + 1, yt[::-1], seed=0)
    assert a.c == b.c and a.val_acc == b.val_acc and a.c_search == b.c_search


def test_probe_layer_deterministic_for_seed():
    X, y = overlapping_classes(600, seed=2)
    Xt, yt = overlapping_classes(300, seed=3)
    a, b = (probe_layer(X, y, Xt, yt, seed=7, layer=3, class_names="abcd") for _ in range(2))
    assert without_seconds(a) == without_seconds(b)
    assert a.layer == 3 and set(a.per_class_acc) == set("abcd")


def test_ties_go_to_the_smaller_c():
    X, y = overlapping_classes(1000, seed=5, k=2)   # 1000 rows: C chosen on a 10 % hold-out (100 rows)
    X[:, 0] += 20 * y  # separable: every C but the smallest reaches validation accuracy 1
    r = probe_layer(X, y, X, y, seed=0)
    tied = [s for s in r.c_search if s["val_acc"] == 1.0]
    assert len(tied) >= 5 and r.val_acc == 1.0
    assert r.c == min(s["c"] for s in tied) > min(s["c"] for s in r.c_search) and r.selection == "holdout"
    assert not r.c_at_edge and "extend" not in {s["stage"] for s in r.c_search}   # a tie is no reason to extend


def test_search_c_takes_any_estimator_with_c():
    """The search clones the estimator and sets C; scikit-learn's own classifier fits in unchanged."""
    X, y = overlapping_classes(1000, seed=6)
    fit_rows, val_rows = stratified_split(y, 0.2, seed=0)
    Xf, Xv = standardize(X[fit_rows], X[val_rows])
    grid = (1e-3, 1e-1, 10.0)
    ours = search_c(LinearProbe(), Xf, y[fit_rows], Xv, y[val_rows], grid, refine=(0.5,))
    ref = search_c(LogisticRegression(), Xf.astype(np.float64), y[fit_rows], Xv.astype(np.float64), y[val_rows],
                   grid, refine=(0.5,))
    assert [e["c"] for e in ours.entries] == [e["c"] for e in ref.entries] == [*grid, ours.best["c"] * 10**0.5]
    assert [e["stage"] for e in ours.entries] == ["coarse"] * 3 + ["refine"]
    for a, b in zip(ours.entries, ref.entries):
        assert abs(a["val_acc"] - b["val_acc"]) <= 0.01
    assert isinstance(ref.fits[10.0], LogisticRegression) and ref.fits[10.0].C == 10.0
    assert ours.not_converged == 0


def test_probe_layer_with_an_estimator():
    X, y = overlapping_classes(600, seed=2)
    Xt, yt = overlapping_classes(300, seed=3)
    a = probe_layer(X, y, Xt, yt, estimator=LinearProbe(tol=1e-3, max_iter=50))
    b = probe_layer(X, y, Xt, yt, tol=1e-3, max_iter=50)
    assert without_seconds(a) == without_seconds(b)
    with pytest.raises(ParameterError, match="tol=0.001"):
        probe_layer(X, y, Xt, yt, estimator=LinearProbe(), tol=1e-3)


def test_stratified_split_is_stratified_and_deterministic():
    y = np.repeat([0, 1, 2], [50, 30, 20])
    np.random.default_rng(0).shuffle(y)
    rest, held = stratified_split(y, 0.1, seed=3)
    assert len(held) == 10 and len(rest) == 90
    assert np.array_equal(np.sort(np.concatenate([rest, held])), np.arange(100))
    assert (np.diff(rest) > 0).all() and (np.diff(held) > 0).all()  # sorted row indices
    assert np.bincount(y[held]).tolist() == [5, 3, 2]  # class proportions kept
    again = stratified_split(y, 0.1, seed=3)
    assert np.array_equal(again[0], rest) and np.array_equal(again[1], held)
    assert not np.array_equal(stratified_split(y, 0.1, seed=4)[1], held)
    # at least one held-out row per class, however small the fraction
    assert np.bincount(y[stratified_split(y, 0.001, seed=0)[1]]).tolist() == [1, 1, 1]


def test_stratified_split_too_few_rows():
    y = np.array([0, 0, 1, 1, 2, 2])
    rest, held = stratified_split(y, 0.5, seed=0)
    assert len(held) == 3 and sorted(y[held]) == [0, 1, 2]
    with pytest.raises(InputError, match="train.h5: too few rows \\(6\\) to hold out a stratified 0.5 test split"):
        stratified_split(y, 0.5, seed=0, min_rest_per_class=2, what="train.h5", split="test")
    with pytest.raises(InputError, match="training split: too few rows"):
        stratified_split(y, 0.9, seed=0)


def test_layers_at_once_choose_what_one_layer_at_a_time_chooses():
    """probe_layers runs every layer's search and final fit in one batched optimisation: same chosen C,
    validation/test accuracy and coefficients (within float rounding) as probe_layer on each layer."""
    from igpt_cli.probe import probe_layers

    rng = np.random.default_rng(5)
    X, y = overlapping_classes(603, d=12, k=3, seed=2)      # odd row count
    Xt, yt = overlapping_classes(301, d=12, k=3, seed=3)
    # three "layers": the features more or less mixed with noise, so their best C differ
    layers = {l: (X + s * rng.standard_normal(X.shape).astype(np.float32),
                  Xt + s * rng.standard_normal(Xt.shape).astype(np.float32))
              for l, s in ((0, 0.0), (4, 1.5), (7, 4.0))}
    est = LinearProbe(solver="torch", device="cpu")
    together = probe_layers({l: a for l, (a, _) in layers.items()}, y, {l: b for l, (_, b) in layers.items()}, yt,
                            seed=1, estimator=est)
    assert [r.layer for r in together] == [0, 4, 7]
    chosen = set()
    for r in together:
        alone = probe_layer(layers[r.layer][0], y, layers[r.layer][1], yt, seed=1, estimator=est, layer=r.layer)
        chosen.add(r.c)
        assert (r.c, r.val_acc, r.test_acc, r.n_passes) == (alone.c, alone.val_acc, alone.test_acc, alone.n_passes)
        assert r.c_search == alone.c_search and r.confusion == alone.confusion
        np.testing.assert_allclose(r.classifier["coef"], alone.classifier["coef"], atol=1e-9, rtol=0)
    assert len(chosen) > 1   # the layers really differ
    # an estimator that cannot batch layers: one layer at a time, same protocol
    scipy = probe_layers({0: layers[0][0]}, y, {0: layers[0][1]}, yt, seed=1, estimator=LinearProbe(solver="scipy"))
    assert scipy[0].c == probe_layer(layers[0][0], y, layers[0][1], yt, seed=1, estimator=LinearProbe(solver="scipy")).c


def test_small_data_chooses_c_by_kfold_and_says_how():
    """Issue 22.3: 40 training rows (4 validation rows in a 10 % split, where every C ties and the smallest
    wins with probabilities near 1/K): C is chosen by stratified 5-fold cross-validation over all 40
    rows, accuracy ties going to the lower validation loss."""
    from sklearn.model_selection import StratifiedKFold

    X, y = overlapping_classes(40, seed=7, k=2)
    X[:, 0] += 4 * y                                  # well separated: the accuracy ties at many C
    Xt, yt = overlapping_classes(200, seed=8, k=2)
    Xt[:, 0] += 4 * yt
    r = probe_layer(X, y, Xt, yt, seed=0)
    assert r.selection == "5-fold" and r.n_val == 40
    # the pooled accuracy and loss of one C, recomputed with scikit-learn's folds and a fresh LinearProbe
    entry = next(e for e in r.c_search if e["c"] == 1.0)
    correct = loss = 0.0
    for fit, val in StratifiedKFold(5, shuffle=True, random_state=0).split(X, y):
        A, B = standardize(X[np.sort(fit)], X[np.sort(val)])
        est = LinearProbe(C=1.0).fit(A, y[np.sort(fit)])
        correct += (est.predict(B) == y[np.sort(val)]).sum()
        loss -= np.log(est.predict_proba(B)[np.arange(len(val)), y[np.sort(val)]]).sum()
    assert entry["val_acc"] == pytest.approx(correct / 40) and entry["val_loss"] == pytest.approx(loss / 40, rel=1e-3)
    tied = [e for e in r.c_search if e["val_acc"] == r.val_acc]
    assert len(tied) >= 2 and r.c == min(tied, key=lambda e: (e["val_loss"], e["c"]))["c"]
    assert r.c > min(COARSE_GRID)                     # not the smallest C by default any more


def test_a_best_c_at_the_edge_extends_the_grid():
    X, y = overlapping_classes(300, seed=9, k=3)       # 5-fold: ties go to the lower loss, which falls with C here
    Xt, yt = overlapping_classes(100, seed=10, k=3)
    r = probe_layer(X, y, Xt, yt, seed=0, grid=(1e-6, 1e-5))        # a grid far below the optimum
    stages = [e["stage"] for e in r.c_search]
    assert "extend" in stages and max(e["c"] for e in r.c_search) == pytest.approx(1e-5 * 10 ** 0.5 * 100)
    assert r.c_at_edge and r.c == max(e["c"] for e in r.c_search)   # still rising: said, not hidden
    wide = probe_layer(X, y, Xt, yt, seed=0)
    assert "extend" not in {e["stage"] for e in wide.c_search} and not wide.c_at_edge
