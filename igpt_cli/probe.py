"""Linear probes on iGPT features: per-layer accuracy, the paper's central measurement.

Protocol (the CLIP / DINOv2 / iGPT one), per layer:

1. standardise features with mean/std of the training rows only (the C search uses the
   statistics of its 90 % fitting split, the final fit those of the whole training set);
2. multinomial logistic regression with L2 penalty, objective exactly scikit-learn's
   `LogisticRegression(solver="lbfgs")`:  C * sum_i CE_i + 0.5 * ||W||^2  (intercept
   unpenalised), minimised by L-BFGS (scipy's L-BFGS-B, as scikit-learn does) with the
   same stopping rule (max |gradient| of the mean-scaled objective <= tol);
3. choose C on a stratified 10 % validation split of the training set: a coarse log grid
   (1e-4 .. 1e2, 7 points, warm-started along increasing C), then the two half-decade
   neighbours of the best value; ties go to the smaller C;
4. refit on the whole training set with the chosen C, report test accuracy.

Nothing from the test set influences any choice. The solver is ours (float32 matrix
products, float64 optimiser state) because it is several times faster than
scikit-learn's on this problem; tests check it against `sklearn.linear_model.
LogisticRegression` at the same C (same optimum, same accuracy).
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy.optimize import minimize

from . import __version__
from .errors import InputError
from .layers import format_layers, parse_layers
from .formats import FEATURES_FORMAT, FormatError, atomic_output, feature_layers, open_igpt, read_attrs

COARSE_GRID = tuple(float(c) for c in np.logspace(-4, 2, 7))
REFINE_STEPS = (-0.5, 0.5)  # decades around the best coarse C
VAL_FRACTION = 0.1
TOL = 1e-4
MAX_ITER = 1000
# attrs that must agree between the train and test features files
MATCH_ATTRS = ("model", "model_sha256", "site", "sos")
PROVENANCE_ATTRS = ("model", "model_sha256", "model_config", "site", "sos", "compute_dtype",
                    "tokens_file", "tokens_sha256", "igpt_version")


# ---------------------------------------------------------------------------
# Layer specs
# ---------------------------------------------------------------------------

# ---------------------------------------------------------------------------
# Solver: scikit-learn's lbfgs multinomial logistic regression, float32 products
# ---------------------------------------------------------------------------

@dataclass
class Fit:
    coef: np.ndarray       # [K, D] float64
    intercept: np.ndarray  # [K] float64
    n_iter: int      # objective/gradient evaluations (passes over the data)
    converged: bool

    def predict(self, X: np.ndarray) -> np.ndarray:
        z = X @ self.coef.T.astype(X.dtype, copy=False) + self.intercept.astype(X.dtype, copy=False)
        return z.argmax(axis=1)


def one_blas_thread():
    """Limit BLAS to one thread (OpenBLAS threading is slower for these skinny products).

    threadpoolctl limits are process-wide, so only the main thread sets them; `probe_files`
    sets them once around its worker threads.
    """
    if threading.current_thread() is threading.main_thread():
        from threadpoolctl import threadpool_limits

        return threadpool_limits(limits=1)
    return contextlib.nullcontext()


class _Converged(Exception):
    def __init__(self, w):
        self.w = w


def fit_logreg(X: np.ndarray, y: np.ndarray, n_classes: int, C: float, *,
               init: Fit | None = None, tol: float = TOL, max_iter: int = MAX_ITER,
               precondition: bool = True, eig: tuple[np.ndarray, np.ndarray] | None = None) -> Fit:
    """Minimise  mean_i CE(x_i W^T + b, y_i) + ||W||^2 / (2 C n)  with L-BFGS-B.

    This is scikit-learn's lbfgs objective (C * sum CE + ||W||^2 / 2, divided by n) and
    its stopping rule: stop once max |gradient| <= tol (gradient with respect to W and b
    of this mean-scaled objective; ftol=64 eps, maxls=50). `y` holds class indices
    0..n_classes-1; `X` should be standardised float32.

    Speed: L-BFGS runs on the reparametrisation W = V' R (R = (a S + lam I)^-1/2, S the
    feature covariance, a the initial softmax curvature). That is the same objective and
    the same optimum, only far better conditioned, so it needs several times fewer passes
    over X. Matrix products are float32 on one BLAS thread (OpenBLAS threading is slower
    for these skinny products).
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    n, d = X.shape
    k = n_classes
    lam = 1.0 / (C * n)
    rows = np.arange(n)
    with one_blas_thread():
        if precondition:
            evals, V = eig if eig is not None else covariance_eig(X)
            a = (k - 1) / k**2 if k > 1 else 0.25
            r = 1.0 / np.sqrt(a * evals + lam)
            R = (V * r) @ V.T                     # W = V' R  (V' : [K, D], row-wise)
            Rinv = (V / r) @ V.T
            bs = 1.0 / math.sqrt(a)               # intercept scale b = bs * b'
        else:
            R = Rinv = None
            bs = 1.0
        if init is None:
            w0 = np.zeros(k * d + k)
        else:
            W0 = init.coef if R is None else init.coef @ Rinv
            w0 = np.concatenate([W0.ravel(), init.intercept / bs]).astype(np.float64)
        state = {"nfev": 0}

        def fun(w: np.ndarray):
            state["nfev"] += 1
            Wp = w[: k * d].reshape(k, d)
            W = Wp if R is None else Wp @ R
            b = w[k * d:] * bs
            z = X @ W.T.astype(np.float32)
            z += b.astype(np.float32)
            z -= z.max(axis=1, keepdims=True)
            e = np.exp(z)
            s = e.sum(axis=1, keepdims=True)
            loss = (np.log(s).sum(dtype=np.float64) - z[rows, y].sum(dtype=np.float64)) / n
            e /= s
            e[rows, y] -= 1.0
            e /= n
            gW = (e.T @ X).astype(np.float64) + lam * W
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
    return Fit(coef=W.copy(), intercept=w[k * d:] * bs, n_iter=int(state["nfev"]), converged=bool(converged))


def covariance_eig(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of X'X/n (the preconditioner of `fit_logreg`; compute once per layer)."""
    with one_blas_thread():
        S = (X.T @ X).astype(np.float64) / len(X)
        evals, V = np.linalg.eigh(S)
    return np.clip(evals, 0.0, None), V


def standardize(X_fit: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Scale all arrays with mean/std of `X_fit` (float32 out; constant features -> std 1)."""
    mean = X_fit.mean(axis=0, dtype=np.float64)
    std = X_fit.std(axis=0, dtype=np.float64)
    std[std == 0] = 1.0
    m, s = mean.astype(np.float32), std.astype(np.float32)
    return [((np.asarray(a, dtype=np.float32) - m) / s).astype(np.float32, copy=False) for a in (X_fit, *others)]


# ---------------------------------------------------------------------------
# One layer
# ---------------------------------------------------------------------------

@dataclass
class LayerResult:
    layer: int
    c: float
    val_acc: float
    test_acc: float
    per_class_acc: dict[str, float | None]
    n_train: int
    n_val: int
    n_test: int
    dim: int
    seconds: float
    n_iter: int
    converged: bool
    not_converged_fits: int
    evals: int = 0   # objective/gradient evaluations over all fits of this layer (passes over the data)
    c_search: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _check_train_labels(y: np.ndarray, what: str = "training split") -> None:
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise InputError(f"{what} has a single class ({int(classes[0]) if len(classes) else 'none'}); "
                         "a probe needs at least 2 classes")
    few = classes[counts < 2]
    if len(few):
        raise InputError(f"{what}: class {int(few[0])} has fewer than 2 samples "
                         "(a stratified validation split needs at least 2 per class)")


def val_split(y: np.ndarray, seed: int, fraction: float = VAL_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of row indices into (fit, validation); deterministic for `seed`."""
    from sklearn.model_selection import train_test_split

    n_classes = len(np.unique(y))
    n_val = max(int(math.ceil(fraction * len(y))), n_classes)
    if len(y) - n_val < n_classes:
        raise InputError(f"training split too small ({len(y)} rows) for a stratified "
                         f"{fraction:.0%} validation split over {n_classes} classes")
    idx = np.arange(len(y))
    fit_idx, v_idx = train_test_split(idx, test_size=n_val, stratify=y, random_state=seed)
    return np.sort(fit_idx), np.sort(v_idx)


def probe_layer(X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, y_test: np.ndarray,
                seed: int = 0, *, layer: int = 0, class_names: Sequence[str] | None = None,
                grid: Sequence[float] = COARSE_GRID, refine: Sequence[float] = REFINE_STEPS,
                tol: float = TOL, max_iter: int = MAX_ITER) -> LayerResult:
    """Run the full protocol on one layer's features. Labels are class ids >= 0."""
    t0 = time.perf_counter()
    y_train = np.asarray(y_train, dtype=np.int64)
    y_test = np.asarray(y_test, dtype=np.int64)
    _check_train_labels(y_train)
    classes = np.unique(y_train)
    k = len(classes)
    yi_train = np.searchsorted(classes, y_train)

    # --- choose C on a stratified 10 % of the training set -------------------
    fit_idx, v_idx = val_split(y_train, seed)
    Xf, Xv = standardize(X_train[fit_idx], X_train[v_idx])
    yf, yv = yi_train[fit_idx], yi_train[v_idx]
    search: list[dict] = []
    fits: dict[float, Fit] = {}
    not_conv = 0
    prev = None
    eig = covariance_eig(Xf)  # preconditioner, shared by every fit of this layer
    for c in sorted(grid):
        prev = fit_logreg(Xf, yf, k, c, init=prev, tol=tol, max_iter=max_iter, eig=eig)
        fits[c] = prev
        not_conv += not prev.converged
        search.append({"c": c, "val_acc": float((prev.predict(Xv) == yv).mean()), "stage": "coarse"})

    def best_entry():
        # highest validation accuracy; ties -> smaller C (stronger regularisation)
        return max(search, key=lambda r: (r["val_acc"], -r["c"]))

    c_best = best_entry()["c"]
    for step in sorted(refine):
        c = float(c_best * 10.0 ** step)
        if any(math.isclose(c, r["c"], rel_tol=1e-9) for r in search):
            continue
        below = [cc for cc in fits if cc < c]
        init = fits[max(below)] if below else None  # warm start from the next smaller C
        f = fit_logreg(Xf, yf, k, c, init=init, tol=tol, max_iter=max_iter, eig=eig)
        fits[c] = f
        not_conv += not f.converged
        search.append({"c": c, "val_acc": float((f.predict(Xv) == yv).mean()), "stage": "refine"})
    best = best_entry()
    del Xf, Xv

    # --- refit on the whole training set with the chosen C ------------------
    Xtr, Xte = standardize(X_train, X_test)
    final = fit_logreg(Xtr, yi_train, k, best["c"], init=fits[best["c"]], tol=tol, max_iter=max_iter, eig=eig)
    not_conv += not final.converged
    pred = classes[final.predict(Xte)]
    correct = pred == y_test
    names = list(class_names) if class_names else []
    per_class: dict[str, float | None] = {}
    for cls in sorted(set(np.unique(y_test).tolist()) | set(classes.tolist())):
        m = y_test == cls
        key = names[cls] if 0 <= cls < len(names) else str(cls)
        per_class[key] = float(correct[m].mean()) if m.any() else None
    return LayerResult(
        layer=int(layer), c=float(best["c"]), val_acc=float(best["val_acc"]),
        test_acc=float(correct.mean()) if len(correct) else float("nan"),
        per_class_acc=per_class, n_train=int(len(y_train)), n_val=int(len(v_idx)),
        n_test=int(len(y_test)), dim=int(X_train.shape[1]), seconds=round(time.perf_counter() - t0, 3),
        n_iter=final.n_iter, converged=final.converged, not_converged_fits=not_conv,
        evals=sum(f.n_iter for f in fits.values()) + final.n_iter,
        c_search=sorted(search, key=lambda r: r["c"]),
    )


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------

@dataclass
class FeatureSource:
    path: Path
    attrs: dict
    layers: list[int]
    dims: dict[int, int]
    labels: np.ndarray
    class_names: list[str]


def inspect_features(path: str | Path) -> FeatureSource:
    """Open a features file, check it is complete and labelled; read labels and metadata."""
    p = Path(path)
    with open_igpt(p, FEATURES_FORMAT) as f:
        attrs = read_attrs(f)
        if not attrs.get("complete", False):
            raise FormatError(f"{p}: incomplete features file ({attrs.get('n_done', '?')}/"
                              f"{attrs.get('n_total', '?')} rows); finish it with igpt extract first")
        if "features" not in f or not len(f["features"]) or "labels" not in f:
            raise FormatError(f"{p}: features file without features/ or labels")
        layers = feature_layers(f)
        dims = {}
        for l in layers:
            ds = f["features"][str(l)]
            if ds.ndim != 2:
                raise FormatError(f"{p}: features/{l} is not a 2-D array")
            dims[l] = int(ds.shape[1])
        labels = np.asarray(f["labels"][:], dtype=np.int64)
        if any(f["features"][str(l)].shape[0] != len(labels) for l in layers):
            raise FormatError(f"{p}: features and labels have different row counts")
        try:
            names = json.loads(attrs.get("class_names") or "[]")
        except (TypeError, ValueError):
            names = []
    n_unl = int((labels < 0).sum())
    if n_unl:
        raise InputError(f"{p}: {n_unl} of {len(labels)} rows are unlabelled (label -1); "
                         "probing needs labelled rows")
    if len(labels) == 0:
        raise InputError(f"{p}: no rows")
    return FeatureSource(p, attrs, layers, dims, labels, [str(n) for n in names])


def check_compatible(train: FeatureSource, test: FeatureSource) -> None:
    """Refuse train/test files from different models, sites, layers or class lists."""
    for key in MATCH_ATTRS:
        a, b = train.attrs.get(key), test.attrs.get(key)
        if key == "model_sha256" and (not a or not b):
            continue
        if key == "model" and train.attrs.get("model_sha256") and \
                train.attrs.get("model_sha256") == test.attrs.get("model_sha256"):
            continue  # same weights under a different path
        if a != b:
            raise InputError(f"{test.path}: {key}={b!r} does not match {train.path} ({key}={a!r}); "
                             "train and test features must come from the same model, site and settings")
    if train.layers != test.layers:
        raise InputError(f"{test.path}: layers {format_layers(test.layers)} do not match {train.path} "
                         f"(layers {format_layers(train.layers)})")
    for l in train.layers:
        if train.dims[l] != test.dims[l]:
            raise InputError(f"{test.path}: layer {l} has {test.dims[l]} dims, {train.path} has {train.dims[l]}")
    if train.class_names and test.class_names and train.class_names != test.class_names:
        raise InputError(f"{test.path}: class_names do not match {train.path}")


def _read_layer(src: FeatureSource, layer: int) -> np.ndarray:
    with open_igpt(src.path, FEATURES_FORMAT) as f:
        X = np.asarray(f["features"][str(layer)][:], dtype=np.float32)
    if not np.isfinite(X).all():
        bad = int((~np.isfinite(X)).any(axis=1).sum())
        raise InputError(f"{src.path}: layer {layer} has NaN/inf features in {bad} rows")
    return X


def probe_files(train: str | Path, test: str | Path | None = None, layers: Sequence[str] | None = None, *,
                test_fraction: float = 0.2, seed: int = 0, jobs: int = 1,
                on_layer: Callable[[LayerResult], None] | None = None, **probe_kw) -> dict:
    """Probe every requested layer of a features file; returns the report dict.

    Without `test`, a stratified `test_fraction` of `train` is held out as the test set.
    Reads one layer at a time (`jobs` layers at a time when jobs > 1).
    """
    tr = inspect_features(train)
    te = inspect_features(test) if test is not None else None
    if te is not None:
        check_compatible(tr, te)
    sel = parse_layers(layers, tr.layers, where=str(tr.path))
    if jobs < 1:
        raise InputError("--jobs must be >= 1")

    if te is None:
        if not 0 < test_fraction < 1:
            raise InputError(f"--test-fraction must be between 0 and 1 (got {test_fraction})")
        _check_train_labels(tr.labels, f"{tr.path}")
        from sklearn.model_selection import train_test_split

        n_cls = len(np.unique(tr.labels))
        n_test = max(int(math.ceil(test_fraction * len(tr.labels))), n_cls)
        if len(tr.labels) - n_test < 2 * n_cls:
            raise InputError(f"{tr.path}: too few rows ({len(tr.labels)}) to hold out a stratified "
                             f"{test_fraction:g} test split over {n_cls} classes")
        idx = np.arange(len(tr.labels))
        tr_idx, te_idx = train_test_split(idx, test_size=n_test, stratify=tr.labels, random_state=seed)
        tr_idx, te_idx = np.sort(tr_idx), np.sort(te_idx)
        y_train, y_test = tr.labels[tr_idx], tr.labels[te_idx]
    else:
        tr_idx = te_idx = None
        y_train, y_test = tr.labels, te.labels
    _check_train_labels(y_train, f"{tr.path}: training split" if te is None else f"{tr.path}")

    def run_layer(l: int) -> LayerResult:
        X = _read_layer(tr, l)
        if te is None:
            Xtr, Xte = X[tr_idx], X[te_idx]
            del X
        else:
            Xtr, Xte = X, _read_layer(te, l)
        r = probe_layer(Xtr, y_train, Xte, y_test, seed, layer=l, class_names=tr.class_names, **probe_kw)
        if on_layer is not None:
            on_layer(r)
        return r

    t0 = time.perf_counter()
    if jobs == 1:
        results = [run_layer(l) for l in sel]
    else:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1), ThreadPoolExecutor(max_workers=jobs) as ex:
            results = list(ex.map(run_layer, sel))
    wall = time.perf_counter() - t0

    best = max(results, key=lambda r: (r.val_acc, r.test_acc, -r.layer)) if results else None
    best_test = max(results, key=lambda r: (r.test_acc, -r.layer)) if results else None
    prov = {k: tr.attrs.get(k) for k in PROVENANCE_ATTRS}
    return {
        "igpt_version": __version__,
        "train": str(tr.path),
        "test": str(te.path) if te is not None else None,
        "test_mode": "file" if te is not None else "held_out",
        "test_fraction": None if te is not None else test_fraction,
        "seed": seed,
        **prov,
        "test_tokens_file": te.attrs.get("tokens_file") if te is not None else None,
        "class_names": tr.class_names,
        "protocol": {
            "standardize": "train statistics only",
            "classifier": "multinomial logistic regression, L2, lbfgs (C * sum CE + 0.5 ||W||^2)",
            "c_grid": list(COARSE_GRID if "grid" not in probe_kw else probe_kw["grid"]),
            "c_refine_decades": list(REFINE_STEPS if "refine" not in probe_kw else probe_kw["refine"]),
            "val_fraction": VAL_FRACTION,
            "tol": probe_kw.get("tol", TOL),
            "selection": "max validation accuracy (ties: smaller C); refit on full train",
        },
        "best_layer": best.layer if best else None,
        "best_test_layer": best_test.layer if best_test else None,
        "not_converged_fits": int(sum(r.not_converged_fits for r in results)),
        "seconds": round(wall, 3),
        "layers": [r.to_dict() for r in results],
    }


# ---------------------------------------------------------------------------
# Rendering: table, JSON, CSV, plot
# ---------------------------------------------------------------------------

def render_table(report: dict, console) -> None:
    from rich.table import Table
    from rich.text import Text

    rows = report["layers"]
    if not rows:
        return
    test_accs = [r["test_acc"] for r in rows]
    lo, hi = min(test_accs), max(test_accs)
    width = 30
    held = "held-out {:.0%} of train".format(report["test_fraction"]) if report["test_mode"] == "held_out" \
        else Path(report["test"]).name
    title = f"linear probe · {report.get('model')} · site={report.get('site')} · test: {held}"
    t = Table(title=title, title_justify="left")
    t.add_column("layer", justify="right")
    t.add_column("val acc", justify="right")
    t.add_column("C", justify="right")
    t.add_column("test acc", justify="right")
    t.add_column("fit s", justify="right")
    t.add_column(f"test acc {lo:.1%} → {hi:.1%}", no_wrap=True)
    for r in rows:
        frac = 1.0 if hi == lo else (r["test_acc"] - lo) / (hi - lo)
        n = 1 + int(round(frac * (width - 1)))
        is_best = r["layer"] == report["best_layer"]
        style = "bold green" if is_best else None
        bar = Text("█" * n, style="green" if is_best else "cyan")
        t.add_row(str(r["layer"]) + (" ★" if is_best else ""), f"{r['val_acc']:.2%}", f"{r['c']:.3g}",
                  f"{r['test_acc']:.2%}", f"{r['seconds']:.1f}", bar, style=style)
    console.print(t)
    notes = [f"best layer (by validation accuracy): {report['best_layer']}",
             f"{report['seconds']:.1f} s"]
    if report["test_mode"] == "held_out":
        notes.append(f"no --test file: a stratified {report['test_fraction']:g} of {Path(report['train']).name} "
                     "is held out as the test set")
    if report["not_converged_fits"]:
        notes.append(f"{report['not_converged_fits']} fits stopped at max_iter before converging")
    console.print("; ".join(notes), highlight=False)


def report_json(report: dict) -> str:
    return json.dumps(report, indent=2, default=_json_default)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def write_csv(report: dict, path: str | Path) -> None:
    names = list(report["layers"][0]["per_class_acc"]) if report["layers"] else []
    cols = ["layer", "c", "val_acc", "test_acc", "n_train", "n_val", "n_test", "dim", "seconds",
            "model", "site", "sos"] + [f"acc_{n}" for n in names]
    with atomic_output(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(cols)
            for r in report["layers"]:
                w.writerow([r["layer"], repr(r["c"]), f"{r['val_acc']:.6f}", f"{r['test_acc']:.6f}", r["n_train"],
                            r["n_val"], r["n_test"], r["dim"], r["seconds"], report.get("model"),
                            report.get("site"), report.get("sos")]
                           + ["" if r["per_class_acc"].get(n) is None else f"{r['per_class_acc'][n]:.6f}"
                              for n in names])


def check_plot_available() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'igpt-cli[plot]'") from None


def write_plot(report: dict, path: str | Path) -> None:
    check_plot_available()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["layers"]
    layers = [r["layer"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(layers, [100 * r["val_acc"] for r in rows], "o--", label="validation (10 % of train)")
    ax.plot(layers, [100 * r["test_acc"] for r in rows], "o-", label="test")
    best = next((r for r in rows if r["layer"] == report["best_layer"]), None)
    if best is not None:
        ax.axvline(best["layer"], color="grey", lw=0.8, ls=":")
        ax.plot([best["layer"]], [100 * best["test_acc"]], "*", ms=16, color="crimson",
                label=f"best layer {best['layer']}: {100 * best['test_acc']:.1f} %")
    ds = report.get("tokens_file") or report["train"]
    ax.set_title(f"Linear probe: {Path(str(report.get('model'))).name} on {Path(str(ds)).stem}")
    ax.set_xlabel("layer")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
