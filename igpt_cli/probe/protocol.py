"""The linear-probe protocol on one layer's features (the CLIP / DINOv2 / iGPT one).

1. standardise features with mean/std of the training rows only (the C search uses the
   statistics of its fitting rows, the final fit those of the whole training set);
2. fit a classifier: by default `LinearProbe`, multinomial logistic regression with L2
   penalty, exactly scikit-learn's lbfgs objective (see `estimator.py`);
3. choose C on held-out training rows: a coarse log grid (1e-4 .. 1e2, 7 points,
   warm-started along increasing C), then the two half-decade neighbours of the best
   value; when the best C is at an edge of what was tried and strictly better than its
   neighbour, the grid is extended a decade that way (up to `EXTEND_DECADES` times; a
   C still at the edge is flagged, `c_at_edge`). The held-out rows are
   - a stratified 10 % validation split ("holdout": max accuracy, ties: smaller C), or,
     with fewer than `KFOLD_BELOW` training rows, where 10 % would be a handful of rows
     whose accuracy ties at every C,
   - stratified k-fold cross-validation over all training rows ("5-fold": every row
     validates once; max accuracy, ties: lower validation log-loss, then smaller C);
4. refit on the whole training set with the chosen C, report test accuracy.

Nothing from the test set influences any choice. Any scikit-learn classifier with a `C`
parameter can stand in for `LinearProbe`: the search `clone`s it and sets C; warm starts
are passed when its `fit` takes `coef_init`/`intercept_init`, and work shared by the
fits of one layer comes from its `fit_context(X)` when it has one.
"""
from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from sklearn.base import clone

from ..errors import InputError, ParameterError
from ..results import Result
from ..seeds import random_state
from .estimator import MAX_ITER, TOL, LinearProbe

COARSE_GRID = tuple(float(c) for c in np.logspace(-4, 2, 7))
REFINE_STEPS = (-0.5, 0.5)  # decades around the best coarse C
VAL_FRACTION = 0.1
KFOLD_BELOW = 500   # fewer training rows: C is chosen by stratified k-fold cross-validation
KFOLDS = 5
EXTEND_DECADES = 2   # a best C at the edge of the grid: at most this many decades tried beyond it
FEW_VAL_ROWS = 100   # fewer rows validated C: the report warns that its choice is uncertain


def moments(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std [D] (float32; constant features -> std 1). X may be a row source
    (`stream.H5Rows`), whose statistics come from a streaming pass."""
    if hasattr(X, "chunks"):
        mean, std = X.moments()
    else:
        mean = X.mean(axis=0, dtype=np.float64)
        std = X.std(axis=0, dtype=np.float64)
    std = np.where(std == 0, 1.0, std)
    return mean.astype(np.float32), std.astype(np.float32)


def apply_standardization(X, mean: np.ndarray, scale: np.ndarray):
    """(X - mean) / scale in float32 (a row source gets the scaling applied as it streams)."""
    if hasattr(X, "chunks"):
        return X.standardized(mean, scale)
    return ((np.asarray(X, dtype=np.float32) - mean) / scale).astype(np.float32, copy=False)


def standardize(X_fit: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Scale all arrays with mean/std of `X_fit` (float32 out; constant features -> std 1)."""
    m, s = moments(X_fit)
    return [apply_standardization(a, m, s) for a in (X_fit, *others)]


def take(X, idx: np.ndarray):
    """Rows `idx` of an array or a row source."""
    return X.take(idx) if hasattr(X, "chunks") else X[idx]   # (ndarray.take would flatten)


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> list[float]:
    """95 % Wilson score interval [lo, hi] for k successes out of n."""
    if n == 0:
        return [float("nan"), float("nan")]
    p = k / n
    den = 1 + z * z / n
    center = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return [max(0.0, center - half), min(1.0, center + half)]


def class_label(cls: int, class_names: Sequence[str] | None = None) -> str:
    """How errors name class `cls`: its name in quotes with the index (`'cat' (2)`), else the index."""
    names = list(class_names or [])
    return f"{names[cls]!r} ({cls})" if 0 <= cls < len(names) else str(cls)


def check_labels(y: np.ndarray, what: str = "training split", class_names: Sequence[str] | None = None) -> None:
    """Refuse labels a stratified probe cannot use: one class only, or a class with a single row.
    Classes are named by `class_names` where given."""
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        only = class_label(int(classes[0]), class_names) if len(classes) else "none"
        raise InputError(f"{what} has a single class ({only}); a probe needs at least 2 classes")
    few = classes[counts < 2]
    if len(few):
        more = f" (and {len(few) - 1} more)" if len(few) > 1 else ""
        raise InputError(f"{what}: class {class_label(int(few[0]), class_names)}{more} has fewer than 2 samples "
                         "(a stratified validation split needs at least 2 per class)")


def stratified_split(y: np.ndarray, fraction: float, seed: int, *, min_rest_per_class: int = 1,
                     what: str = "training split", split: str = "validation") -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of row indices into sorted (rest, held_out); deterministic for `seed`.

    `held_out` has ceil(fraction * n) rows, at least one per class; `rest` must keep at
    least `min_rest_per_class` rows per class on average, else an InputError naming
    `what` and the `split` being held out.
    """
    from sklearn.model_selection import train_test_split

    n_classes = len(np.unique(y))
    n_held = max(int(math.ceil(fraction * len(y))), n_classes)
    if len(y) - n_held < min_rest_per_class * n_classes:
        raise InputError(f"{what}: too few rows ({len(y)}) to hold out a stratified {fraction:g} {split} "
                         f"split over {n_classes} classes")
    rest, held = train_test_split(np.arange(len(y)), test_size=n_held, stratify=y, random_state=random_state(seed))
    return np.sort(rest), np.sort(held)


# ---------------------------------------------------------------------------
# C search
# ---------------------------------------------------------------------------

@dataclass
class CSearch:
    """What `search_c` tried: one entry per C, the fitted estimators by C, the winner.

    Each entry: {"c", "val_acc", "val_loss" (mean validation cross-entropy), "stage": "coarse" |
    "refine" | "extend"}, pooled over the folds. `fits`: C -> the first fold's fitted estimator
    (the warm start of a refit at that C)."""

    entries: list[dict]
    fits: dict[float, Any]
    not_converged: int      # fits that stopped before converging
    passes: int = 0         # passes over the fitting rows (one batched call: its longest fit)
    by_loss: bool = False   # ties in accuracy go to the lower validation loss (k-fold), else to the smaller C
    at_edge: bool = False   # the best C is still at an edge of the grid after extending it

    def key(self, r: dict) -> tuple:
        """What makes an entry better (larger is better), without the final tie-break on C."""
        return (r["val_acc"], -r["val_loss"]) if self.by_loss else (r["val_acc"],)

    @property
    def best(self) -> dict:
        """Highest validation accuracy; ties -> lower validation loss (k-fold) -> smaller C."""
        return max(self.entries, key=lambda r: (*self.key(r), -r["c"]))


@dataclass
class Fold:
    """One split of the training rows for the C search: fit on one part, validate on the other."""
    X_fit: Any
    y_fit: np.ndarray
    X_val: Any
    y_val: np.ndarray
    context: dict | None = None
    fits: dict = field(default_factory=dict)


def _fit_at(estimator, C: float, X: np.ndarray, y: np.ndarray, *, warm=None, context: dict | None = None):
    """A fitted clone of `estimator` at this C, warm-started from the fitted `warm` where it can be."""
    return _fit_many(estimator, [C], X, y, [warm], context)[0]


def _fit_many(estimator, Cs: Sequence[float], X, y: np.ndarray, warms: list, context: dict | None = None) -> list:
    """Fitted clones of `estimator`, one per C, each warm-started from its fitted `warms[i]` (or None).

    Estimators with `fit_path` (`LinearProbe`) get all Cs in one call (the torch solver fits them
    at once); others are fitted one after the other, a C without a warm start taking the previous
    C's fit (the warm start along the grid)."""
    kw = dict(context or {})
    if hasattr(estimator, "fit_path"):
        return estimator.fit_path(list(Cs), X, y, coef_init=[w.coef_ if w is not None else None for w in warms],
                                  intercept_init=[w.intercept_ if w is not None else None for w in warms], **kw)
    takes_warm = "coef_init" in inspect.signature(estimator.fit).parameters
    fits, prev = [], None
    for c, warm in zip(Cs, warms):
        warm = warm if warm is not None else prev
        est = clone(estimator).set_params(C=c)
        extra = dict(coef_init=warm.coef_, intercept_init=warm.intercept_) if takes_warm and warm is not None else {}
        prev = est.fit(X, y, **kw, **extra)
        fits.append(prev)
    return fits


def _converged(est) -> bool:
    return bool(getattr(est, "converged_", True))


def _n_iter(est) -> int:
    return int(np.max(getattr(est, "n_iter_", 0)))


def _val_loss(est, X: np.ndarray, y: np.ndarray) -> float:
    """Summed cross-entropy of the validation rows (classes the fit never saw: their rows count as 0)."""
    if not hasattr(est, "predict_proba"):
        return 0.0
    P = np.asarray(est.predict_proba(X), dtype=np.float64)
    col = {c: i for i, c in enumerate(np.asarray(est.classes_).tolist())}
    idx = np.array([col.get(v, -1) for v in np.asarray(y).tolist()])
    ok = idx >= 0
    return float(-np.log(np.clip(P[np.flatnonzero(ok), idx[ok]], 1e-300, None)).sum())


def search_c(estimator, X_fit: np.ndarray, y_fit: np.ndarray, X_val: np.ndarray, y_val: np.ndarray,
             grid: Sequence[float] = COARSE_GRID, refine: Sequence[float] = REFINE_STEPS, *,
             context: dict | None = None, extend: int = 0) -> CSearch:
    """Fit `estimator` at every C of `grid` (increasing, each warm-started from the last), then at
    the best C times 10**step for each `refine` step (warm-started from the next smaller C);
    score each on the validation rows. `context`: shared fit arguments (default `fit_context(X_fit)`).
    `extend`: decades the grid may grow beyond a best C at its edge (`search_c_folds`)."""
    if context is None:
        context = estimator.fit_context(X_fit) if hasattr(estimator, "fit_context") else {}
    return search_c_folds(estimator, [Fold(X_fit, y_fit, X_val, y_val, context)], grid, refine, extend=extend)


def edge_c(search: CSearch) -> float | None:
    """The C one decade beyond a best C that sits at an edge of the Cs tried and beats its neighbour
    there (None: the best C is inside, or at the edge by the tie-break only)."""
    cs = sorted(r["c"] for r in search.entries)
    best = search.best
    if len(cs) < 2 or best["c"] not in (cs[0], cs[-1]):
        return None
    by_c = {r["c"]: r for r in search.entries}
    neighbour = by_c[cs[1] if best["c"] == cs[0] else cs[-2]]
    if search.key(best) <= search.key(neighbour):
        return None
    return best["c"] / 10 if best["c"] == cs[0] else best["c"] * 10


def search_c_folds(estimator, folds: Sequence[Fold], grid: Sequence[float] = COARSE_GRID,
                   refine: Sequence[float] = REFINE_STEPS, *, by_loss: bool = False, extend: int = 0) -> CSearch:
    """The C search (module docstring, step 3) over one or more folds: every C is fitted on each
    fold's fitting rows and scored on its validation rows, accuracy and loss pooled over the folds.
    `by_loss`: accuracy ties go to the lower validation loss before the smaller C."""
    for f in folds:
        if f.context is None:
            f.context = estimator.fit_context(f.X_fit) if hasattr(estimator, "fit_context") else {}
    search = CSearch(entries=[], fits={}, not_converged=0, by_loss=by_loss)
    n_val = sum(len(f.y_val) for f in folds)

    def warm(f: Fold, c: float, nearest: bool):
        """The fit to start C from: the next smaller C fitted so far (`nearest`: else the nearest one)."""
        below = [x for x in f.fits if x < c]
        if below:
            return f.fits[max(below)]
        return f.fits[min(f.fits, key=lambda x: abs(math.log(x / c)))] if nearest and f.fits else None

    def run(cs: list[float], stage: str) -> None:
        correct, loss = np.zeros(len(cs)), np.zeros(len(cs))
        batched = hasattr(estimator, "fit_path") and getattr(estimator, "solver", None) == "torch"
        for f in folds:
            warms = [None if stage == "coarse" else warm(f, c, stage == "extend") for c in cs]
            fits = _fit_many(estimator, cs, f.X_fit, f.y_fit, warms, f.context)
            search.passes += max(map(_n_iter, fits)) if batched else sum(map(_n_iter, fits))
            for i, (c, est) in enumerate(zip(cs, fits)):
                f.fits[c] = est
                search.not_converged += not _converged(est)
                correct[i] += float(np.sum(est.predict(f.X_val) == f.y_val))
                loss[i] += _val_loss(est, f.X_val, f.y_val)
        for i, c in enumerate(cs):
            search.fits[c] = folds[0].fits[c]
            search.entries.append({"c": c, "val_acc": float(correct[i] / n_val), "val_loss": float(loss[i] / n_val),
                                   "stage": stage})

    def tried(c: float) -> bool:
        return any(math.isclose(c, r["c"], rel_tol=1e-9) for r in search.entries)

    run(sorted(grid), "coarse")
    c_best = search.best["c"]
    refine_cs = []
    for step in sorted(refine):
        c = float(c_best * 10.0 ** step)
        if not tried(c) and not any(math.isclose(c, x, rel_tol=1e-9) for x in refine_cs):
            refine_cs.append(c)
    if refine_cs:
        run(refine_cs, "refine")

    for _ in range(extend):
        c = edge_c(search)
        if c is None or tried(c):
            break
        run([float(c)], "extend")
    search.at_edge = extend > 0 and edge_c(search) is not None
    return search


# ---------------------------------------------------------------------------
# One layer
# ---------------------------------------------------------------------------

@dataclass
class LayerResult(Result):
    """One result row of a probe report. `to_dict()` also carries the keys every evaluation's row
    shares (`result_row`: method, layers, pool, C, k, n_train/n_val/n_test, accuracy and its interval),
    and so does each entry of `few_shot` (method "fewshot")."""
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
    n_passes: int = 0          # passes over the training rows (all fits; a batched pass serving several C counts once)
    test_acc_ci: list[float] = field(default_factory=list)   # 95 % interval of test_acc
    ci_method: str = "wilson"
    confusion: list[list[int]] = field(default_factory=list)  # [true class][predicted class] counts on test
    selection: str = "holdout"   # how C was chosen: "holdout" (10 % validation split) or "5-fold"
    c_at_edge: bool = False      # the chosen C is at an edge of the (extended) grid: the optimum may lie beyond
    method: str = "linear"       # "linear" (the C-searched logistic probe) or "knn" (c None, k set)
    k: int | None = None         # k-NN: neighbours per vote
    layers: list[int] | None = None   # --concat: the layers concatenated (`layer`: the first of them)
    few_shot: list[dict] = field(default_factory=list)   # --shots: per shot count, mean/std test accuracy over seeds
    pool: str | None = None      # how the features were pooled (the features file's `pool`; set by `probe_files`)

    # set by `probe_layer`, not part of the report: the chosen classifier (`classifier_arrays`)
    classifier = None

    def to_dict(self) -> dict:
        d = super().to_dict()
        layers = list(self.layers) if self.layers else [self.layer]
        d.update(result_row(method=self.method, layers=layers, pool=self.pool,
                            c=self.c if self.method == "linear" else None, k=self.k, n_train=self.n_train,
                            n_val=self.n_val, n_test=self.n_test, accuracy=self.test_acc,
                            accuracy_interval=self.test_acc_ci))
        d["few_shot"] = [dict(e, **result_row(
            method="fewshot", layers=layers, pool=self.pool, c=None, k=None, n_train=e.get("n_train"),
            n_val=e.get("n_val"), n_test=self.n_test, accuracy=e["test_acc_mean"],
            accuracy_interval=wilson_interval(round(e["test_acc_mean"] * self.n_test), self.n_test)))
            for e in d["few_shot"]]
        return d


RESULT_KEYS = ("method", "layers", "pool", "C", "k", "n_train", "n_val", "n_test", "accuracy", "accuracy_interval")


def result_row(*, method: str, layers: Sequence[int], pool: str | None, c: float | None, k: int | None,
               n_train: int | None, n_val: int | None, n_test: int, accuracy: float,
               accuracy_interval: Sequence[float]) -> dict:
    """The keys every evaluation's result row carries (`RESULT_KEYS`; docs/formats.md, "Result rows"), so
    that probes, k-NN, few-shot and fine-tuning compare: `method` ("linear", "knn", "fewshot",
    "finetune"), `layers` (the layers read: one, or several concatenated), `pool`, `C` (the linear
    probe's; None otherwise) and `k` (k-NN's; None otherwise), the row counts, the test `accuracy` and
    its 95 % Wilson `accuracy_interval` [lo, hi] (`wilson_interval`)."""
    return {"method": method, "layers": [int(l) for l in layers], "pool": pool,
            "C": None if c is None else float(c), "k": None if k is None else int(k),
            "n_train": None if n_train is None else int(n_train), "n_val": None if n_val is None else int(n_val),
            "n_test": int(n_test), "accuracy": float(accuracy),
            "accuracy_interval": [float(v) for v in accuracy_interval]}


def probe_layer(X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, y_test: np.ndarray,
                seed: int = 0, *, estimator=None, layer: int = 0, class_names: Sequence[str] | None = None,
                grid: Sequence[float] = COARSE_GRID, refine: Sequence[float] = REFINE_STEPS,
                tol: float | None = None, max_iter: int | None = None) -> LayerResult:
    """Run the full protocol on one layer's features. Labels are class ids >= 0.

    `estimator`: the classifier (default `LinearProbe(tol=tol, max_iter=max_iter)`); give
    either an estimator or tol/max_iter, not both.
    """
    t0 = time.perf_counter()
    estimator = _default_estimator(estimator, tol, max_iter)
    y_train = np.asarray(y_train, dtype=np.int64)
    y_test = np.asarray(y_test, dtype=np.int64)
    check_labels(y_train, class_names=class_names)

    # --- choose C on held-out training rows ---------------------------------
    search, context, n_val, selection = choose_c(estimator, X_train, y_train, seed, grid, refine)
    best = search.best

    # --- refit on the whole training set with the chosen C ------------------
    mean, scale = moments(X_train)
    Xtr, Xte = apply_standardization(X_train, mean, scale), apply_standardization(X_test, mean, scale)
    if context is None:
        context = estimator.fit_context(Xtr) if hasattr(estimator, "fit_context") else {}
    final = _fit_at(estimator, best["c"], Xtr, y_train, warm=search.fits[best["c"]], context=context)
    pred = np.asarray(final.predict(Xte))
    return _layer_result(layer, search, final, pred, y_train, y_test, int(X_train.shape[1]), n_val, mean, scale,
                         class_names, time.perf_counter() - t0, selection)


def _layer_result(layer: int, search: CSearch, final, pred: np.ndarray, y_train: np.ndarray, y_test: np.ndarray,
                  dim: int, n_val: int, mean: np.ndarray, scale: np.ndarray, class_names, seconds: float,
                  selection: str = "holdout") -> LayerResult:
    """The LayerResult of a finished search and final fit (test predictions `pred`), with its classifier."""
    best = search.best
    correct = pred == y_test
    per_class, confusion = _per_class_and_confusion(pred, y_train, y_test, class_names)
    result = LayerResult(
        layer=int(layer), c=float(best["c"]), val_acc=float(best["val_acc"]),
        test_acc=float(correct.mean()) if len(correct) else float("nan"),
        per_class_acc=per_class, n_train=int(len(y_train)), n_val=int(n_val),
        n_test=int(len(y_test)), dim=int(dim), seconds=round(seconds, 3),
        n_iter=_n_iter(final), converged=_converged(final),
        not_converged_fits=search.not_converged + (not _converged(final)),
        evals=sum(_n_iter(f) for f in search.fits.values()) + _n_iter(final),
        c_search=sorted(search.entries, key=lambda r: r["c"]),
        n_passes=search.passes + _n_iter(final),
        test_acc_ci=wilson_interval(int(correct.sum()), len(correct)), confusion=confusion,
        selection=selection, c_at_edge=search.at_edge,
    )
    result.classifier = dict(mean=mean, scale=scale, coef=np.asarray(final.coef_),
                             intercept=np.asarray(final.intercept_),
                             classes=np.asarray(final.classes_), c=float(best["c"]))
    return result


def _per_class_and_confusion(pred: np.ndarray, y_train: np.ndarray, y_test: np.ndarray,
                             class_names) -> tuple[dict[str, float | None], list[list[int]]]:
    """Test accuracy per class (None: no test rows of it) and the [true][predicted] confusion counts."""
    classes = np.unique(y_train)
    correct = pred == y_test
    names = list(class_names) if class_names else []
    per_class: dict[str, float | None] = {}
    for cls in sorted(set(np.unique(y_test).tolist()) | set(classes.tolist())):
        m = y_test == cls
        key = names[cls] if 0 <= cls < len(names) else str(cls)
        per_class[key] = float(correct[m].mean()) if m.any() else None
    n_cls = int(max(len(names), int(y_test.max(initial=-1)) + 1, int(classes.max()) + 1))
    confusion = np.zeros((n_cls, n_cls), dtype=np.int64)
    np.add.at(confusion, (y_test, pred.astype(np.int64)), 1)
    return per_class, confusion.tolist()


def choose_c(estimator, X_train, y_train: np.ndarray, seed: int, grid: Sequence[float] = COARSE_GRID,
             refine: Sequence[float] = REFINE_STEPS) -> tuple[CSearch, dict | None, int, str]:
    """The C search on one layer's training rows (module docstring, step 3): (the search, the fit
    context the final fit can reuse or None, rows that validated C, "holdout" or "k-fold")."""
    if len(y_train) >= KFOLD_BELOW:
        fit_idx, v_idx = stratified_split(y_train, VAL_FRACTION, seed)
        Xf, Xv = standardize(take(X_train, fit_idx), take(X_train, v_idx))
        context = estimator.fit_context(Xf) if hasattr(estimator, "fit_context") else {}  # shared by every fit
        fold = Fold(Xf, y_train[fit_idx], Xv, y_train[v_idx], context)
        return search_c_folds(estimator, [fold], grid, refine, extend=EXTEND_DECADES), context, len(v_idx), "holdout"
    from sklearn.model_selection import StratifiedKFold

    k = int(min(KFOLDS, np.bincount(np.unique(y_train, return_inverse=True)[1]).min()))
    folds = []
    for fit_idx, v_idx in StratifiedKFold(n_splits=k, shuffle=True, random_state=random_state(seed)).split(
            np.zeros(len(y_train)), y_train):
        fit_idx, v_idx = np.sort(fit_idx), np.sort(v_idx)
        Xf, Xv = standardize(take(X_train, fit_idx), take(X_train, v_idx))
        folds.append(Fold(Xf, y_train[fit_idx], Xv, y_train[v_idx]))
    search = search_c_folds(estimator, folds, grid, refine, by_loss=True, extend=EXTEND_DECADES)
    return search, None, len(y_train), f"{k}-fold"


# ---------------------------------------------------------------------------
# Several layers at once
# ---------------------------------------------------------------------------

def fits_layers_at_once(estimator) -> bool:
    """Whether `estimator` fits several layers in one batched optimisation (`LinearProbe.fit_paths`)."""
    return hasattr(estimator, "fit_paths") and getattr(estimator, "solver", None) == "torch"


def probe_layers(X_train: dict, y_train: np.ndarray, X_test: dict, y_test: np.ndarray, seed: int = 0, *,
                 estimator=None, class_names: Sequence[str] | None = None, grid: Sequence[float] = COARSE_GRID,
                 refine: Sequence[float] = REFINE_STEPS, tol: float | None = None,
                 max_iter: int | None = None) -> list[LayerResult]:
    """`probe_layer` on several layers at once (`{layer: [N, D]}` train and test features, same rows):
    the same protocol, in lockstep, so every stage (coarse grid, refinement, final fit) of every
    layer is one batched optimisation (`LinearProbe.fit_paths`: all layers' C values share each
    iteration, each stopping on its own) — the same chosen C and coefficients as one layer at a
    time. Estimators without `fit_paths` run `probe_layer` per layer. A layer's `seconds` is its
    share of the whole (total / layers)."""
    estimator = _default_estimator(estimator, tol, max_iter)
    layers = list(X_train)
    # k-fold selection of C (small data) is one layer at a time
    if not fits_layers_at_once(estimator) or len(layers) < 2 or len(y_train) < KFOLD_BELOW:
        return [probe_layer(X_train[l], y_train, X_test[l], y_test, seed, estimator=estimator, layer=l,
                            class_names=class_names, grid=grid, refine=refine) for l in layers]
    t0 = time.perf_counter()
    y_train = np.asarray(y_train, dtype=np.int64)
    y_test = np.asarray(y_test, dtype=np.int64)
    check_labels(y_train, class_names=class_names)
    fit_idx, v_idx = stratified_split(y_train, VAL_FRACTION, seed)
    y_fit, y_val = y_train[fit_idx], y_train[v_idx]
    split = {l: standardize(take(X_train[l], fit_idx), take(X_train[l], v_idx)) for l in layers}   # (Xf, Xv)
    context = {l: estimator.fit_context(split[l][0]) for l in layers}
    searches = {l: CSearch(entries=[], fits={}, not_converged=0) for l in layers}

    def stage(cs: dict, warms: dict, X: dict, y: np.ndarray) -> dict:
        todo = [l for l in layers if cs[l]]
        fitted = estimator.fit_paths([(cs[l], X[l], [w.coef_ if w is not None else None for w in warms[l]],
                                       [w.intercept_ if w is not None else None for w in warms[l]],
                                       context[l].get("covariance_eig")) for l in todo], y)
        return dict(zip(todo, fitted))

    coarse = sorted(grid)
    fitted = stage({l: coarse for l in layers}, {l: [None] * len(coarse) for l in layers},
                   {l: split[l][0] for l in layers}, y_fit)
    for l in layers:
        _record(searches[l], estimator, coarse, fitted[l], split[l][1], y_val, "coarse")
    plans = {l: _refine_plan(searches[l], refine) for l in layers}
    fitted = stage({l: plans[l][0] for l in layers}, {l: plans[l][1] for l in layers},
                   {l: split[l][0] for l in layers}, y_fit)
    for l, fits in fitted.items():
        _record(searches[l], estimator, plans[l][0], fits, split[l][1], y_val, "refine")
    del split
    # a best C at an edge of the grid: that layer's search goes on beyond it, one layer at a time
    alone = {l: probe_layer(X_train[l], y_train, X_test[l], y_test, seed, estimator=estimator, layer=l,
                            class_names=class_names, grid=grid, refine=refine)
             for l in layers if edge_c(searches[l]) is not None}
    layers = [l for l in layers if l not in alone]
    if not layers:
        return [alone[l] for l in X_train]

    stats = {l: moments(X_train[l]) for l in layers}
    full = {l: apply_standardization(X_train[l], *stats[l]) for l in layers}
    best = {l: searches[l].best["c"] for l in layers}
    finals = stage({l: [best[l]] for l in layers}, {l: [searches[l].fits[best[l]]] for l in layers}, full, y_train)
    del full
    seconds = (time.perf_counter() - t0) / len(layers)
    out = dict(alone)
    for l in layers:
        pred = np.asarray(finals[l][0].predict(apply_standardization(X_test[l], *stats[l])))
        out[l] = _layer_result(l, searches[l], finals[l][0], pred, y_train, y_test, int(X_train[l].shape[1]),
                               len(v_idx), *stats[l], class_names, seconds)
    return [out[l] for l in X_train]


def _record(search: CSearch, estimator, cs: list[float], fits: list, X_val, y_val: np.ndarray, stage: str) -> None:
    """Score the fits of one stage of the search on the validation rows and add them to `search`."""
    batched = hasattr(estimator, "fit_path") and getattr(estimator, "solver", None) == "torch"
    search.passes += max(map(_n_iter, fits)) if batched else sum(map(_n_iter, fits))
    for c, est in zip(cs, fits):
        search.fits[c] = est
        search.not_converged += not _converged(est)
        search.entries.append({"c": c, "val_acc": float(np.mean(est.predict(X_val) == y_val)),
                               "val_loss": _val_loss(est, X_val, y_val) / len(y_val), "stage": stage})


def _refine_plan(search: CSearch, refine: Sequence[float]) -> tuple[list[float], list]:
    """The refinement Cs (the best coarse C times 10**step, skipping Cs already tried) and their warm
    starts: each from the next smaller C fitted so far."""
    c_best = search.best["c"]
    refine_cs: list[float] = []
    for step in sorted(refine):
        c = float(c_best * 10.0 ** step)
        if not any(math.isclose(c, r["c"], rel_tol=1e-9) for r in search.entries + [{"c": x} for x in refine_cs]):
            refine_cs.append(c)
    warms = [search.fits[max(below)] if (below := [cc for cc in search.fits if cc < c]) else None for c in refine_cs]
    return refine_cs, warms


def _default_estimator(estimator, tol: float | None, max_iter: int | None):
    if estimator is None:
        return LinearProbe(tol=TOL if tol is None else tol, max_iter=MAX_ITER if max_iter is None else max_iter)
    for name, value in (("tol", tol), ("max_iter", max_iter)):
        if value is not None:
            raise ParameterError(name, value, "set it on the estimator (both given)")
    return estimator
