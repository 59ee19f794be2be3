"""The torch solver (every C at once) against scikit-learn's LogisticRegression and today's scipy solver."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from igpt_cli.probe import LinearProbe, probe_layer
from igpt_cli.probe.protocol import wilson_interval


def blobs(n=900, d=20, k=4, sep=0.4, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    X = sep * np.random.default_rng(7).standard_normal((k, d))[y] + rng.standard_normal((n, d))
    X = (X - X.mean(0)) / X.std(0)
    return X.astype(np.float32), y


@pytest.mark.parametrize("C", [1e-3, 0.1, 10.0])
def test_torch_solver_matches_sklearn_at_the_same_c(C):
    X, y = blobs()
    ref = LogisticRegression(C=C, tol=1e-8, max_iter=5000).fit(X.astype(np.float64), y)
    ours = LinearProbe(C, tol=1e-6, solver="torch", device="cpu").fit(X, y)
    assert ours.converged_
    assert abs((ours.predict(X) == y).mean() - (ref.predict(X) == y).mean()) <= 0.002
    assert np.abs(ours.coef_ - ref.coef_).max() <= 1e-3 * max(1.0, np.abs(ref.coef_).max())
    assert np.abs(ours.intercept_ - ref.intercept_).max() <= 1e-3


def test_fit_path_fits_every_c_like_separate_fits():
    X, y = blobs(k=3)
    Cs = [1e-3, 1e-1, 10.0]
    path = LinearProbe(tol=1e-6, solver="torch", device="cpu").fit_path(Cs, X, y)
    assert [m.C for m in path] == Cs
    for m in path:
        alone = LinearProbe(m.C, tol=1e-6, solver="sklearn").fit(X, y)
        assert np.abs(m.coef_ - alone.coef_).max() <= 2e-3 * max(1.0, np.abs(alone.coef_).max())
        assert m.n_iter_[0] > 0


def test_sklearn_solver_is_sklearn():
    X, y = blobs(k=3)
    ref = LogisticRegression(C=0.5).fit(X, y)
    ours = LinearProbe(0.5, solver="sklearn").fit(X, y)
    assert np.allclose(ours.coef_, ref.coef_) and np.allclose(ours.intercept_, ref.intercept_)


def test_same_chosen_c_and_accuracy_as_the_scipy_solver():
    rng = np.random.default_rng(3)
    for layer, sep in enumerate((0.15, 0.5)):
        Xtr, ytr = blobs(n=600, d=16, k=3, sep=sep, seed=layer)
        Xte, yte = blobs(n=300, d=16, k=3, sep=sep, seed=10 + layer)
        Xtr = Xtr + 0.01 * rng.standard_normal(Xtr.shape).astype(np.float32)
        a = probe_layer(Xtr, ytr, Xte, yte, estimator=LinearProbe(solver="torch", device="cpu"))
        b = probe_layer(Xtr, ytr, Xte, yte, estimator=LinearProbe(solver="scipy"))
        assert a.c == b.c
        assert a.test_acc == pytest.approx(b.test_acc, abs=1 / len(yte) + 1e-9)
        assert a.n_passes < b.n_passes      # one pass serves every C of the grid


def test_report_has_wilson_interval_and_confusion():
    Xtr, ytr = blobs(n=300, k=3)
    Xte, yte = blobs(n=120, k=3, seed=5)
    r = probe_layer(Xtr, ytr, Xte, yte, estimator=LinearProbe(device="cpu"))
    lo, hi = r.test_acc_ci
    assert lo < r.test_acc < hi and r.ci_method == "wilson"
    cm = np.array(r.confusion)
    assert cm.shape == (3, 3) and cm.sum() == len(yte)
    assert np.trace(cm) / cm.sum() == pytest.approx(r.test_acc)
    assert wilson_interval(81, 100) == pytest.approx([0.7222, 0.8749], abs=1e-4)   # the textbook example


# ---------------------------------------------------------------------------
# CUDA float32 product precision (a process-wide flag: set through the current API, guarded)
# ---------------------------------------------------------------------------
def test_precision_is_tf32_only_for_loose_tolerances_and_restored_after():
    import warnings

    import torch

    from igpt_cli.probe.torch_solver import TF32_MIN_TOL, matmul_precision, matmul_precision_for

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert matmul_precision_for(cpu, 1e-4) is None          # nothing to set off CUDA
    assert matmul_precision_for(cuda, 1e-4) == "tf32"
    assert matmul_precision_for(cuda, TF32_MIN_TOL / 10) == "ieee"   # tight tolerances keep FP32 products
    flag = torch.backends.cuda.matmul
    before = flag.fp32_precision
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # the legacy allow_tf32 flag warns: not used
        with matmul_precision(cuda, 1e-4):
            assert flag.fp32_precision == "tf32"
        assert flag.fp32_precision == before
        with matmul_precision(cpu, 1e-4):
            assert flag.fp32_precision == before


def test_precision_of_fits_running_at_once_is_shared_and_never_looser_than_asked():
    """`--jobs 2`: two fits in threads overlap; the flag is set once, FP32 wins while any fit asked
    for it, and the process's value comes back when the last fit ends (not when the first one does)."""
    import threading

    import torch

    from igpt_cli.probe.torch_solver import matmul_precision

    cuda, flag = torch.device("cuda"), torch.backends.cuda.matmul
    before = flag.fp32_precision
    seen = []
    a_in, b_in, a_saw_b, b_out = (threading.Event() for _ in range(4))

    def fit_a():  # loose tolerance: TF32, outlives fit b
        with matmul_precision(cuda, 1e-4):
            seen.append(("a alone", flag.fp32_precision))
            a_in.set()
            b_in.wait()
            seen.append(("a with b", flag.fp32_precision))
            a_saw_b.set()
            b_out.wait()
            seen.append(("a after b", flag.fp32_precision))

    def fit_b():  # tight tolerance: FP32
        a_in.wait()
        with matmul_precision(cuda, 1e-6):
            b_in.set()
            a_saw_b.wait()
        b_out.set()

    threads = [threading.Thread(target=fit_a), threading.Thread(target=fit_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [("a alone", "tf32"), ("a with b", "ieee"), ("a after b", "tf32")]
    assert flag.fp32_precision == before
