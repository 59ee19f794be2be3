"""k-nearest-neighbour evaluation of one layer's features (the DINO protocol).

Features are L2-normalised, similarity is the cosine (a dot product of unit rows); each test
row takes its `k` most similar training rows and votes:
- "weighted" (DINO, Caron et al. 2021): class score = sum over the k neighbours of that class
  of exp(similarity / temperature); k = 20, temperature = 0.07 by default;
- "majority": one vote per neighbour, ties to the smaller class id (scikit-learn's
  `KNeighborsClassifier(metric="cosine")`).
Test rows are processed in chunks (`chunk_rows` x n_train similarities at a time), on the
given torch device, so memory stays bounded whatever the number of test rows. There is no
hyper-parameter search: `val_acc` is the leave-one-out accuracy on the training rows (each
training row classified by the others), which is what picks the best layer.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from ..choices import KNN_VOTES
from ..errors import InputError, ParameterError
from .protocol import LayerResult, check_labels, wilson_interval

KNN_K = 20
KNN_TEMPERATURE = 0.07
CHUNK_ELEMENTS = 1 << 24   # similarities held at once (64 MiB of float32)


def check_knn(k: int, vote: str, temperature: float, n_train: int | None = None) -> None:
    """Refuse a k < 1 or larger than the training set, an unknown vote, a temperature <= 0."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ParameterError("k", k, "must be a positive integer")
    if vote not in KNN_VOTES:
        raise ParameterError("knn_vote", vote, f"must be one of {', '.join(KNN_VOTES)}")
    if not temperature > 0:
        raise ParameterError("knn_temperature", temperature, "must be > 0")
    if n_train is not None and k > n_train:
        raise ParameterError("k", k, f"is larger than the training set ({n_train} rows)")


def _unit(X, device):
    import torch

    t = torch.as_tensor(np.asarray(X, dtype=np.float32), device=device)
    return torch.nn.functional.normalize(t, dim=1)


def knn_scores(X_train, y_train: np.ndarray, X_query, *, k: int = KNN_K, vote: str = "weighted",
               temperature: float = KNN_TEMPERATURE, device: str = "cpu", exclude_self: bool = False,
               chunk_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(classes [C], vote scores [n_query, C]) of the k-NN vote. `exclude_self`: the query rows are the
    training rows and each row's own similarity is left out (leave-one-out)."""
    import torch

    check_knn(k, vote, temperature, len(y_train) - (1 if exclude_self else 0))
    classes, y_idx = np.unique(np.asarray(y_train), return_inverse=True)
    dev = torch.device(device)
    train = _unit(X_train, dev)
    labels = torch.as_tensor(y_idx, device=dev)
    n_q = len(X_query)
    chunk = chunk_rows or max(1, CHUNK_ELEMENTS // max(1, train.shape[0]))
    out = np.empty((n_q, len(classes)), dtype=np.float32)
    for s in range(0, n_q, chunk):
        q = _unit(X_query[s:s + chunk], dev)
        sim = q @ train.T
        if exclude_self:
            rows = torch.arange(sim.shape[0], device=dev)
            sim[rows, rows + s] = -float("inf")
        top, idx = sim.topk(k, dim=1)
        w = torch.exp(top / temperature) if vote == "weighted" else torch.ones_like(top)
        scores = torch.zeros(sim.shape[0], len(classes), device=dev, dtype=torch.float32)
        scores.scatter_add_(1, labels[idx], w)
        out[s:s + len(q)] = scores.cpu().numpy()
    return classes, out


def knn_predict(X_train, y_train: np.ndarray, X_query, **kw) -> np.ndarray:
    """Predicted class of each query row (ties: the smaller class id)."""
    classes, scores = knn_scores(X_train, y_train, X_query, **kw)
    return classes[np.argmax(scores, axis=1)]


def knn_layer(X_train, y_train: np.ndarray, X_test, y_test: np.ndarray, *, k: int = KNN_K, vote: str = "weighted",
              temperature: float = KNN_TEMPERATURE, device: str = "cpu", layer: int = 0,
              class_names: Sequence[str] | None = None) -> LayerResult:
    """The k-NN evaluation of one layer, as a `LayerResult` (method "knn", `c` None, `k` set)."""
    from .protocol import _per_class_and_confusion

    t0 = time.perf_counter()
    y_train = np.asarray(y_train, dtype=np.int64)
    y_test = np.asarray(y_test, dtype=np.int64)
    check_labels(y_train, class_names=class_names)
    if k > len(y_train) - 1:
        raise InputError(f"k={k} is larger than the training set allows ({len(y_train)} rows; "
                         f"leave-one-out validation needs k <= {len(y_train) - 1})")
    kw = dict(k=k, vote=vote, temperature=temperature, device=device)
    val_pred = knn_predict(X_train, y_train, X_train, exclude_self=True, **kw)
    pred = knn_predict(X_train, y_train, X_test, **kw)
    correct = pred == y_test
    per_class, confusion = _per_class_and_confusion(pred, y_train, y_test, class_names)
    return LayerResult(
        layer=int(layer), c=None, val_acc=float(np.mean(val_pred == y_train)),
        test_acc=float(correct.mean()) if len(correct) else float("nan"), per_class_acc=per_class,
        n_train=int(len(y_train)), n_val=int(len(y_train)), n_test=int(len(y_test)), dim=int(X_train.shape[1]),
        seconds=round(time.perf_counter() - t0, 3), n_iter=0, converged=True, not_converged_fits=0,
        test_acc_ci=wilson_interval(int(correct.sum()), len(correct)), confusion=confusion,
        selection="leave-one-out", method="knn", k=int(k))
