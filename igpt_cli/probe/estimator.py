"""`LinearProbe`: scikit-learn's multinomial lbfgs logistic regression, several times faster.

The objective is exactly `sklearn.linear_model.LogisticRegression(solver="lbfgs")`'s
multinomial one,  C * sum_i CE_i + 0.5 * ||W||^2  (intercept unpenalised), minimised by
L-BFGS (scipy's L-BFGS-B, as scikit-learn does) with the same stopping rule (max
|gradient| of the mean-scaled objective <= tol). It is faster on probe-sized problems
because L-BFGS runs on a preconditioned reparametrisation of W (same optimum, far better
conditioned) and the matrix products are float32 on one BLAS thread (float64 optimiser
state). Tests check it against scikit-learn at the same C.

It is a scikit-learn estimator (it passes `sklearn.utils.estimator_checks.check_estimator`;
`clone`, `cross_val_score`, pipelines work); labels may be any values (ints, strings),
kept in `classes_`. Unlike scikit-learn, two classes are fitted as a 2-row multinomial
model too (`coef_` is always [K, D]); as in scikit-learn, `decision_function` of two
classes is then 1-D (the score of `classes_[1]` minus that of `classes_[0]`).

Work the protocol can share between the fits of one layer (the preconditioner) comes
from `fit_context(X)`: a dict of keyword arguments for every `fit` on that layer.

Three solvers of the same objective (`solver=`): "torch" (`torch_solver.py`: every C of
`fit_path` in one pass over X per iteration, CPU or CUDA, rows may be streamed from
HDF5), "scipy" (the numpy/scipy L-BFGS below, one C after the other) and "sklearn"
(scikit-learn's own `LogisticRegression(solver="lbfgs")`, the reference).
"""
from __future__ import annotations

import contextlib
import math
import threading

import numpy as np
from scipy.optimize import minimize
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_is_fitted, check_X_y

from ..errors import ParameterError, check_choice

TOL = 1e-4
MAX_ITER = 1000
SOLVERS = ("torch", "scipy", "sklearn")
# every C of the search in one pass: 3.4x scipy's speed on the shipped model's CIFAR-10 features (9 layers x 192,
# 50k rows) on a CPU, test accuracy within 0.22 points of scipy's and of scikit-learn's (bench/check_probe_cifar10.py)
DEFAULT_SOLVER = "torch"


def one_blas_thread():
    """Limit BLAS to one thread (OpenBLAS threading is slower for these skinny products).

    threadpoolctl limits are process-wide, so only the main thread sets them; `probe_files`
    sets them once around its worker threads.
    """
    if threading.current_thread() is threading.main_thread():
        from threadpoolctl import threadpool_limits

        return threadpool_limits(limits=1)
    return contextlib.nullcontext()


def covariance_eig(X, device=None) -> tuple:
    """Eigen-decomposition of X'X/n (the preconditioner of `LinearProbe.fit`; compute once per layer):
    (eigenvalues clipped at 0 [D], eigenvectors [D, D]) float64.

    With a `device` (the torch solver) both the products and `eigh` run there and the result
    stays there (torch tensors); X may then be a row source (`torch_solver.ArrayRows`,
    `stream.H5Rows`), accumulated chunk by chunk. Without one: numpy on one BLAS thread."""
    if device is not None or is_rows(X):
        from .torch_solver import as_rows, device_eig

        return device_eig(as_rows(X), device if device is not None else resolve_probe_device("cpu"))
    with one_blas_thread():
        S = (X.T @ X).astype(np.float64) / len(X)   # [D, D]
        evals, V = np.linalg.eigh(S)
    return np.clip(evals, 0.0, None), V


def _numpy(a) -> np.ndarray:
    """A numpy array of a numpy array or a (device) tensor."""
    return a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)


def is_rows(X) -> bool:
    """True for a row source (features read chunk by chunk) rather than an array."""
    return hasattr(X, "chunks")


def resolve_probe_device(device):
    """A torch device for the probe: auto = cuda when there is one, else cpu (ParameterError for a missing GPU)."""
    from ..runtime import resolve_device

    name = str(getattr(device, "value", device) or "auto").lower()
    if name == "auto":
        import torch

        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("mps"):
        raise ParameterError("device", name, "the probe runs on cpu or cuda")
    return resolve_device(name)


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Multinomial L2 logistic regression: scikit-learn's lbfgs objective and stopping rule.

    Parameters: `C` (inverse regularisation strength, as in scikit-learn), `tol` (stop
    once max |gradient| <= tol), `max_iter` (L-BFGS iterations), `precondition` (solve
    in the preconditioned parametrisation; same optimum). Feed it standardised features.

    After `fit`: `coef_` [K, D], `intercept_` [K] (float64), `classes_` [K],
    `n_features_in_`, `n_iter_` (shape (1,): objective/gradient evaluations, i.e. passes
    over the data), `converged_` (False when L-BFGS stopped at `max_iter` or failed).
    """

    def __init__(self, C: float = 1.0, *, tol: float = TOL, max_iter: int = MAX_ITER, precondition: bool = True,
                 solver: str = DEFAULT_SOLVER, device: str = "auto"):
        self.C = C
        self.tol = tol
        self.max_iter = max_iter
        self.precondition = precondition
        self.solver = solver
        self.device = device

    def fit_context(self, X) -> dict:
        """Keyword arguments for `fit` that every fit on (a standardisation of) these rows can share."""
        if not self.precondition or self.solver == "sklearn":
            return {}
        dev = resolve_probe_device(self.device) if self.solver == "torch" else None
        X = X if is_rows(X) else np.ascontiguousarray(X, dtype=np.float32)
        return {"covariance_eig": covariance_eig(X, dev)}

    def fit(self, X, y, *, coef_init: np.ndarray | None = None, intercept_init: np.ndarray | None = None,
            covariance_eig: tuple[np.ndarray, np.ndarray] | None = None) -> LinearProbe:
        """Fit on X [N, D] (or a row source, torch solver only), labels y [N]; warm start from
        `coef_init` [K, D] / `intercept_init` [K]; `covariance_eig` is the preconditioner from
        `fit_context` (computed from X when None)."""
        fitted = self.fit_path([self.C], X, y, coef_init=[coef_init], intercept_init=[intercept_init],
                               covariance_eig=covariance_eig)[0]
        self.__dict__.update({k: v for k, v in fitted.__dict__.items() if k.endswith("_")})
        return self

    def fit_path(self, Cs, X, y, *, coef_init=None, intercept_init=None,
                 covariance_eig: tuple[np.ndarray, np.ndarray] | None = None) -> list[LinearProbe]:
        """Fitted copies of this probe, one per C of `Cs` (in that order).

        `coef_init` / `intercept_init`: per C a warm start or None. The torch solver fits
        every C at once (one pass over X per iteration for all of them); the others fit
        them one after the other, a C without a warm start starting from the previous C's
        solution (today's warm start along the grid)."""
        if self.solver == "torch":
            return self.fit_paths([(Cs, X, coef_init, intercept_init, covariance_eig)], y)[0]
        X, y, d, classes, y_index, k, W0, b0 = self._prepare(Cs, X, y, coef_init, intercept_init)
        solved, prev = [], None
        for c, w, b in zip(Cs, W0, b0):
            if w is None and b is None and prev is not None:
                w, b = prev[0], prev[1]
            fit = _fit_sklearn if self.solver == "sklearn" else _fit_logreg
            prev = fit(X, y_index, k, float(c), coef_init=w, intercept_init=b, tol=self.tol,
                       max_iter=self.max_iter, precondition=self.precondition, eig=covariance_eig)
            solved.append(prev)
        return self._fitted(Cs, solved, d, classes)

    def fit_paths(self, paths, y) -> list[list[LinearProbe]]:
        """`fit_path` for several feature sets of the same rows (layers) at once, torch solver only:
        `paths` is a list of (Cs, X, coef_init, intercept_init, covariance_eig), one per layer;
        every C of every layer runs in one batched L-BFGS (`torch_solver.fit_problems`), each
        stopping on its own, so each gets the result `fit_path` gives it alone."""
        from .torch_solver import Problem, as_rows, fit_problems

        if self.solver != "torch":
            raise ParameterError("solver", self.solver, "fitting several layers at once needs solver 'torch'")
        dev = resolve_probe_device(self.device)
        problems, shapes = [], []
        for Cs, X, coef_init, intercept_init, eig in paths:
            X, y_i, d, classes, y_index, k, W0, b0 = self._prepare(Cs, X, y, coef_init, intercept_init)
            if not self.precondition:
                eig = (np.ones(d), np.eye(d))
            elif eig is None:
                eig = _covariance_eig(X, dev)
            problems.append(Problem(as_rows(X), eig, list(Cs), W0, b0))
            shapes.append((Cs, d, classes))
        solved = fit_problems(problems, y_index, k, tol=self.tol, max_iter=self.max_iter, device=dev)
        return [self._fitted(Cs, out, d, classes) for (Cs, d, classes), out in zip(shapes, solved)]

    def _prepare(self, Cs, X, y, coef_init, intercept_init):
        """Checked inputs of a fit: (X, y, d, classes, class indices of y, K, warm W per C, warm b per C)."""
        check_choice("solver", self.solver, SOLVERS)
        for c in Cs:
            if not c > 0:
                raise ParameterError("C", c, "must be positive")
        if is_rows(X):
            if self.solver != "torch":
                raise ParameterError("solver", self.solver, "streamed features need solver 'torch'")
            y = np.asarray(y)
            d = X.d
        else:
            X, y = check_X_y(X, y, dtype=np.float32, order="C")   # [N, D] float32, C-contiguous
            d = X.shape[1]
        check_classification_targets(y)
        classes, y_index = np.unique(y, return_inverse=True)
        k = len(classes)
        if k < 2:
            raise ValueError(f"LinearProbe needs at least 2 classes in y, got {k} class")
        W0 = list(coef_init) if coef_init is not None else [None] * len(Cs)
        b0 = list(intercept_init) if intercept_init is not None else [None] * len(Cs)
        for w, b in zip(W0, b0):
            if w is not None and np.shape(w) != (k, d):
                raise ParameterError("coef_init", np.shape(w), f"expected shape ({k}, {d})")
            if b is not None and np.shape(b) != (k,):
                raise ParameterError("intercept_init", np.shape(b), f"expected shape ({k},)")
        return X, y, d, classes, y_index, k, W0, b0

    def _fitted(self, Cs, solved, d: int, classes) -> list[LinearProbe]:
        """Fitted clones, one per C, from the solver's (W, b, evaluations, converged)."""
        out = []
        for c, (W, b, n_eval, conv) in zip(Cs, solved):
            est = clone(self).set_params(C=c)
            est.n_features_in_, est.classes_ = d, classes
            est.coef_, est.intercept_ = np.asarray(W, dtype=np.float64), np.asarray(b, dtype=np.float64)
            est.converged_, est.n_iter_ = bool(conv), np.array([n_eval], dtype=np.int32)
            out.append(est)
        return out

    def class_scores(self, X) -> np.ndarray:
        """Every class's score [N, K] (the multinomial logits, also for two classes), in X's float
        dtype (float32 stays float32); X may be a row source."""
        check_is_fitted(self)
        rows = is_rows(X)
        if not rows:
            X = check_array(X, dtype=[np.float64, np.float32])
        width = X.d if rows else X.shape[1]
        if width != self.n_features_in_:   # scikit-learn's wording (check_n_features_in_after_fitting)
            raise ValueError(f"X has {width} features, but LinearProbe is expecting {self.n_features_in_} "
                             "features as input")
        if rows:
            from .torch_solver import decision

            return decision(X, self.coef_, self.intercept_, resolve_probe_device(self.device))
        return X @ self.coef_.T.astype(X.dtype, copy=False) + self.intercept_.astype(X.dtype, copy=False)

    def decision_function(self, X) -> np.ndarray:
        """scikit-learn's decision function: [N, K] class scores, or for two classes [N], the score
        of `classes_[1]` minus that of `classes_[0]` (positive: `classes_[1]`)."""
        z = self.class_scores(X)
        return z[:, 1] - z[:, 0] if z.shape[1] == 2 else z

    def predict(self, X) -> np.ndarray:
        """The class of highest score (of highest probability), one per row of X."""
        index = self.class_scores(X).argmax(axis=1)   # first: NotFittedError before classes_ is read
        return self.classes_[index]

    def predict_proba(self, X) -> np.ndarray:
        """Softmax of the class scores [N, K] (for two classes, the logistic of `decision_function`)."""
        z = self.class_scores(X)                    # [N, K]
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def predict_log_proba(self, X) -> np.ndarray:
        """Log of `predict_proba`, computed stably (log-softmax of the class scores)."""
        z = self.class_scores(X)
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


_covariance_eig = covariance_eig   # fit_path's parameter of that name shadows it


# ---------------------------------------------------------------------------
# The solvers
# ---------------------------------------------------------------------------

def _fit_sklearn(X: np.ndarray, y: np.ndarray, n_classes: int, C: float, *, coef_init, intercept_init, tol: float,
                 max_iter: int, **_) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """scikit-learn's own `LogisticRegression(solver="lbfgs")` (the reference), warm-started where
    it can be (3+ classes). Two classes: scikit-learn's binary model, returned as 2 rows (-w/2, w/2); the
    2-row model's penalty ||W||^2/2 is then ||w||^2/4, so the same objective is the binary one at 2C."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=2 * C if n_classes == 2 else C, tol=tol, max_iter=max_iter, solver="lbfgs", warm_start=True)
    if coef_init is not None and n_classes > 2:
        lr.coef_ = np.array(coef_init, dtype=np.float64)
        lr.intercept_ = np.zeros(n_classes) if intercept_init is None else np.array(intercept_init, dtype=np.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        lr.fit(X, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    W, b = lr.coef_, lr.intercept_
    if n_classes == 2:
        W, b = np.vstack([-W / 2, W / 2]), np.concatenate([-b / 2, b / 2])
    return W, b, int(np.max(lr.n_iter_)), converged


class _Converged(Exception):
    def __init__(self, w):
        self.w = w


def _fit_logreg(X: np.ndarray, y: np.ndarray, n_classes: int, C: float, *,
                coef_init: np.ndarray | None, intercept_init: np.ndarray | None, tol: float, max_iter: int,
                precondition: bool, eig: tuple[np.ndarray, np.ndarray] | None
                ) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """Minimise  mean_i CE(x_i W^T + b, y_i) + ||W||^2 / (2 C n)  with L-BFGS-B.

    This is scikit-learn's lbfgs objective (C * sum CE + ||W||^2 / 2, divided by n) and
    its stopping rule: stop once max |gradient| <= tol (gradient with respect to W and b
    of this mean-scaled objective; ftol=64 eps, maxls=50). `y` holds class indices
    0..n_classes-1; `X` is float32, C-contiguous. Returns (W [K, D], b [K], objective
    evaluations, converged).

    Speed: L-BFGS runs on the reparametrisation W = V' R (R = (a S + lam I)^-1/2, S the
    feature covariance, a the initial softmax curvature). That is the same objective and
    the same optimum, only far better conditioned, so it needs several times fewer passes
    over X. Matrix products are float32 on one BLAS thread (OpenBLAS threading is slower
    for these skinny products).
    """
    n, d = X.shape
    k = n_classes
    lam = 1.0 / (C * n)
    rows = np.arange(n)
    with one_blas_thread():
        if precondition:
            evals, V = (_numpy(m) for m in eig) if eig is not None else covariance_eig(X)
            a = (k - 1) / k**2 if k > 1 else 0.25
            r = 1.0 / np.sqrt(a * evals + lam)
            R = (V * r) @ V.T                     # [D, D];  W = V' R  (V' : [K, D], row-wise)
            Rinv = (V / r) @ V.T
            bs = 1.0 / math.sqrt(a)               # intercept scale b = bs * b'
        else:
            R = Rinv = None
            bs = 1.0
        if coef_init is None and intercept_init is None:
            w0 = np.zeros(k * d + k)              # [K*D + K]: W' row-major, then b'
        else:
            W0 = np.zeros((k, d)) if coef_init is None else np.asarray(coef_init, dtype=np.float64)
            W0 = W0 if R is None else W0 @ Rinv
            b0 = np.zeros(k) if intercept_init is None else np.asarray(intercept_init, dtype=np.float64)
            w0 = np.concatenate([W0.ravel(), b0 / bs]).astype(np.float64)
        state = {"nfev": 0}

        def fun(w: np.ndarray):
            state["nfev"] += 1
            Wp = w[: k * d].reshape(k, d)
            W = Wp if R is None else Wp @ R
            b = w[k * d:] * bs
            z = X @ W.T.astype(np.float32)       # [N, K]
            z += b.astype(np.float32)
            z -= z.max(axis=1, keepdims=True)
            e = np.exp(z)
            s = e.sum(axis=1, keepdims=True)
            loss = (np.log(s).sum(dtype=np.float64) - z[rows, y].sum(dtype=np.float64)) / n
            e /= s
            e[rows, y] -= 1.0
            e /= n
            gW = (e.T @ X).astype(np.float64) + lam * W   # [K, D]
            gb = e.sum(axis=0, dtype=np.float64)
            loss += 0.5 * lam * float(np.sum(W * W))
            if max(np.abs(gW).max(), np.abs(gb).max()) <= tol:
                raise _Converged(w.copy())    # scikit-learn's stopping rule, in W space
            gWp = gW if R is None else gW @ R   # R symmetric
            return loss, np.concatenate([gWp.ravel(), gb * bs])

        converged = True
        try:
            res = minimize(fun, w0, jac=True, method="L-BFGS-B",
                           options={"maxiter": max_iter, "maxls": 50, "gtol": 0.0,
                                    "ftol": 64 * np.finfo(float).eps})
            w = res.x
            converged = res.status == 0 and res.nit < max_iter
        except _Converged as c:
            w = c.w
    Wp = w[: k * d].reshape(k, d)
    W = Wp if R is None else Wp @ R
    return W.copy(), w[k * d:] * bs, int(state["nfev"]), bool(converged)
