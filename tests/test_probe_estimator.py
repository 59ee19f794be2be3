"""igpt_cli.probe.estimator: LinearProbe against scikit-learn's LogisticRegression, and as an estimator."""
from __future__ import annotations

import functools
import subprocess
import sys

import numpy as np
import pytest
from helpers import ENV, overlapping_classes
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.utils.estimator_checks import parametrize_with_checks

from igpt_cli.errors import ParameterError
from igpt_cli.probe import LinearProbe, standardize


@pytest.fixture(scope="module")
def data():
    X, y = overlapping_classes(1500)
    (A,) = standardize(X)
    return A, y


@pytest.mark.parametrize("C", [1e-3, 0.1, 10.0])
def test_solver_matches_sklearn_coefficients(data, C):
    A, y = data
    ours = LinearProbe(C, tol=1e-7).fit(A, y)
    ref = LogisticRegression(C=C, tol=1e-9, max_iter=10000).fit(A.astype(np.float64), y)
    scale = np.abs(ref.coef_).max()
    assert np.abs(ours.coef_ - ref.coef_).max() <= 2e-3 * scale + 1e-6
    assert np.abs(ours.intercept_ - ref.intercept_).max() <= 2e-3 * max(1.0, np.abs(ref.intercept_).max())
    assert ours.converged_
    assert ours.coef_.shape == (4, 20) and ours.intercept_.shape == (4,)
    assert ours.n_iter_.shape == (1,) and ours.n_iter_[0] > 0


def test_unpreconditioned_solver_reaches_the_same_optimum(data):
    A, y = data
    pre = LinearProbe(0.1, tol=1e-6).fit(A, y)
    plain = LinearProbe(0.1, tol=1e-6, precondition=False).fit(A, y)
    assert np.abs(pre.coef_ - plain.coef_).max() <= 1e-3 * np.abs(pre.coef_).max()


def test_clone_preserves_params():
    est = LinearProbe(C=0.5, tol=1e-3, max_iter=77, precondition=False)
    twin = clone(est)
    assert twin is not est
    assert twin.get_params() == {"C": 0.5, "tol": 1e-3, "max_iter": 77, "precondition": False, "solver": "torch",
                                 "device": "auto"}
    assert clone(LinearProbe(C=0.5)).get_params()["C"] == 0.5
    assert not hasattr(twin, "coef_")
    assert twin.set_params(C=2.0).C == 2.0 and est.C == 0.5


def test_cross_val_score_matches_sklearn():
    X, y = overlapping_classes(900, seed=4)
    ours = cross_val_score(LinearProbe(), X, y, cv=3)
    ref = cross_val_score(LogisticRegression(), X.astype(np.float64), y, cv=3)
    assert ours.shape == (3,) and 0.4 < ours.mean() < 0.99
    assert np.abs(ours - ref).max() <= 0.01, (ours, ref)


def test_string_labels_round_trip(data):
    A, y = data
    names = np.array(["cat", "dog", "ship", "truck"])
    by_name = LinearProbe(0.1).fit(A, names[y])
    by_index = LinearProbe(0.1).fit(A, y)
    assert list(by_name.classes_) == ["cat", "dog", "ship", "truck"]
    pred = by_name.predict(A)
    assert pred.dtype.kind == "U" and set(pred) <= set(names)
    assert (pred == names[by_index.predict(A)]).all()
    assert by_name.score(A, names[y]) == by_index.score(A, y) > 0.4


def test_predict_proba_matches_sklearn(data):
    A, y = data
    ours = LinearProbe(0.1, tol=1e-7).fit(A, y)
    ref = LogisticRegression(C=0.1, tol=1e-9, max_iter=10000).fit(A.astype(np.float64), y)
    p = ours.predict_proba(A)
    assert p.shape == (len(A), 4)
    assert np.allclose(p.sum(axis=1), 1.0, atol=1e-5)
    assert np.abs(p - ref.predict_proba(A.astype(np.float64))).max() <= 2e-3
    assert (ours.classes_[p.argmax(axis=1)] == ours.predict(A)).all()


def test_warm_start_and_shared_preconditioner(data):
    A, y = data
    cold = LinearProbe(1.0).fit(A, y)
    ctx = cold.fit_context(A)
    assert set(ctx) == {"covariance_eig"}
    shared = LinearProbe(1.0).fit(A, y, **ctx)
    assert np.array_equal(shared.coef_, cold.coef_)  # the same preconditioner, computed once
    warm = LinearProbe(1.0).fit(A, y, coef_init=cold.coef_, intercept_init=cold.intercept_, **ctx)
    assert warm.n_iter_[0] < cold.n_iter_[0]  # starts at the optimum: (nearly) nothing left to do
    assert np.abs(warm.coef_ - cold.coef_).max() <= 1e-2 * np.abs(cold.coef_).max()
    assert LinearProbe(precondition=False).fit_context(A) == {}


def test_bad_parameters(data):
    A, y = data
    with pytest.raises(ParameterError, match="C=0"):
        LinearProbe(C=0).fit(A, y)
    with pytest.raises(ParameterError, match=r"coef_init=\(3, 20\): expected shape \(4, 20\)"):
        LinearProbe().fit(A, y, coef_init=np.zeros((3, 20)))
    with pytest.raises(ValueError, match="at least 2 classes"):
        LinearProbe().fit(A, np.zeros(len(A), dtype=int))
    with pytest.raises(ValueError, match="features"):
        LinearProbe().fit(A, y).predict(A[:, :5])


def test_binary_decision_function_is_scikit_learns(data):
    """Two classes: decision_function is 1-D (classes_[1] minus classes_[0]), like LogisticRegression's,
    and predict/predict_proba agree with it; with string labels in any order. Our 2-row model's penalty
    ||W||^2/2 with W = (-w/2, w/2) is ||w||^2/4: the same objective as scikit-learn's binary one at 2C."""
    A, y = data
    keep = y < 2
    names = np.array(["zebra", "ant"])[y[keep]]          # "ant" sorts first: classes_ = [ant, zebra]
    X = A[keep].astype(np.float64)
    ours = LinearProbe(0.1, tol=1e-7).fit(X, names)
    ref = LogisticRegression(C=0.2, tol=1e-9, max_iter=10000).fit(X, names)
    reference_solver = LinearProbe(0.1, tol=1e-9, max_iter=10000, solver="sklearn").fit(X, names)
    assert np.abs(reference_solver.coef_ - ours.coef_).max() <= 2e-3 * np.abs(ours.coef_).max()
    assert list(ours.classes_) == list(ref.classes_) == ["ant", "zebra"]
    d = ours.decision_function(X)
    assert d.shape == (len(X),)
    assert np.abs(d - ref.decision_function(X)).max() <= 2e-3 * np.abs(ref.decision_function(X)).max()
    assert (ours.predict(X) == ours.classes_[(d > 0).astype(int)]).all()
    p = ours.predict_proba(X)
    assert p.shape == (len(X), 2) and np.allclose(p[:, 1], 1 / (1 + np.exp(-d)), atol=1e-9)
    assert np.allclose(ours.predict_log_proba(X), np.log(p), atol=1e-9)
    assert ours.coef_.shape == (2, X.shape[1])          # still the 2-row multinomial model


def test_unfitted_and_wrong_width_errors_are_scikit_learns(data):
    from sklearn.exceptions import NotFittedError

    A, y = data
    for method in ("predict", "predict_proba", "predict_log_proba", "decision_function", "score"):
        with pytest.raises(NotFittedError):
            getattr(LinearProbe(), method)(*((A, y) if method == "score" else (A,)))
    with pytest.raises(ValueError, match="X has 5 features, but LinearProbe is expecting 20 features as input"):
        LinearProbe().fit(A, y).decision_function(A[:, :5])
    with pytest.raises(ValueError, match="got 1 class"):
        LinearProbe().fit(A[:1], y[:1])


def _check_name(check) -> str:
    while isinstance(check, functools.partial):
        check = check.func
    return check.__name__


@parametrize_with_checks([LinearProbe(), LinearProbe(solver="scipy")])
def test_scikit_learn_estimator_checks(estimator, check):
    """scikit-learn's own estimator checks (`check_estimator`), every one, with the torch and scipy solvers.

    check_array_api_input needs SCIPY_ARRAY_API=1 set before scipy is first imported (scikit-learn
    skips it otherwise), so it runs in a fresh interpreter with that set."""
    if _check_name(check) != "check_array_api_input":
        check(estimator)
        return
    code = ("from sklearn.utils.estimator_checks import check_array_api_input\n"
            "from igpt_cli.probe import LinearProbe\n"
            f"check_array_api_input('LinearProbe', LinearProbe(solver={estimator.solver!r}), "
            "array_namespace='numpy', expect_only_array_outputs=False)\n")
    r = subprocess.run([sys.executable, "-c", code], env=dict(ENV, SCIPY_ARRAY_API="1"), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
