"""Few-shot linear probes: n training images per class, mean and std of test accuracy over seeds.

For each shot count n and each seed s (0 .. seeds-1), n training rows of every class are
drawn (without replacement, from `numpy.random.default_rng([seed, n, s])`), a linear probe
is fitted on them with the protocol of `protocol.probe_layer` and scored on the whole test
set. C is chosen inside the shots: with n >= 2, by stratified min(5, n)-fold
cross-validation over the n x classes rows (`choose_c`; fewer than `KFOLD_BELOW` rows);
with n = 1 no row is left to validate on, so C is fixed at `ONE_SHOT_C`.
The std is the sample standard deviation over seeds (ddof 1; 0 with one seed).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import ParameterError
from .protocol import _default_estimator, _fit_at, apply_standardization, class_label, moments, probe_layer

ONE_SHOT_C = 1.0


def check_shots(shots: Sequence[int], seeds: int, y_train: np.ndarray | None = None,
                class_names: Sequence[str] | None = None) -> list[int]:
    """The shot counts, sorted and unique: positive integers no larger than the smallest class of
    `y_train` (where given); `seeds` at least 1."""
    shots = list(shots)
    if not shots or any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 for n in shots):
        raise ParameterError("shots", ",".join(map(str, shots)), "must be positive integers (images per class)")
    if isinstance(seeds, bool) or not isinstance(seeds, (int, np.integer)) or seeds < 1:
        raise ParameterError("seeds", seeds, "must be at least 1")
    if y_train is not None:
        classes, counts = np.unique(y_train, return_counts=True)
        i = int(np.argmin(counts))
        if max(shots) > counts[i]:
            raise ParameterError("shots", ",".join(map(str, shots)),
                                 f"{max(shots)} is larger than the smallest class: "
                                 f"{class_label(int(classes[i]), class_names)} has {int(counts[i])} training rows")
    return sorted({int(n) for n in shots})


def draw_shots(y_train: np.ndarray, n: int, seed: int, draw: int) -> np.ndarray:
    """Sorted indices of `n` rows of every class, the `draw`-th draw for this `seed`."""
    rng = np.random.default_rng([int(seed), int(n), int(draw)])
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(y_train == c), n, replace=False)
                                   for c in np.unique(y_train)]))


def few_shot(X_train, y_train: np.ndarray, X_test, y_test: np.ndarray, shots: Sequence[int], seeds: int = 5,
             seed: int = 0, *, estimator=None, class_names: Sequence[str] | None = None, **probe_kw) -> list[dict]:
    """One entry per shot count: {"shots", "seeds", "selection", "n_train" (drawn rows), "n_val" (rows that
    validated C), "test_acc_mean", "test_acc_std",
    "test_accs" (per seed), "c" (per seed)}. `probe_kw`: grid/refine/tol/max_iter of `probe_layer`."""
    y_train = np.asarray(y_train, dtype=np.int64)
    y_test = np.asarray(y_test, dtype=np.int64)
    shots = check_shots(shots, seeds, y_train, class_names)
    tol, max_iter = probe_kw.pop("tol", None), probe_kw.pop("max_iter", None)
    estimator = _default_estimator(estimator, tol, max_iter)
    X_train = np.asarray(X_train)
    out = []
    for n in shots:
        accs, cs, selection = [], [], None
        for s in range(seeds):
            idx = draw_shots(y_train, n, seed, s)
            if n == 1:
                mean, scale = moments(X_train[idx])
                fit = _fit_at(estimator, ONE_SHOT_C, apply_standardization(X_train[idx], mean, scale), y_train[idx])
                pred = np.asarray(fit.predict(apply_standardization(X_test, mean, scale)))
                acc, c, selection = float(np.mean(pred == y_test)), ONE_SHOT_C, f"C fixed at {ONE_SHOT_C:g}"
            else:
                r = probe_layer(X_train[idx], y_train[idx], X_test, y_test, seed, estimator=estimator,
                                class_names=class_names, **probe_kw)
                acc, c, selection = r.test_acc, r.c, f"{r.selection} cross-validation within the shots"
            accs.append(acc)
            cs.append(c)
        n_train = n * len(np.unique(y_train))
        out.append({"shots": n, "seeds": int(seeds), "selection": selection, "n_train": n_train,
                    "n_val": 0 if n == 1 else n_train,   # k-fold within the shots: every drawn row validates once
                    "test_acc_mean": float(np.mean(accs)),
                    "test_acc_std": float(np.std(accs, ddof=1)) if seeds > 1 else 0.0,
                    "test_accs": accs, "c": cs})
    return out
