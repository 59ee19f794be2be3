"""k-nearest-neighbour evaluation of one layer's features (the DINO protocol).

Features are L2-normalised, similarity is the cosine (a dot product of unit rows); each test
row takes its `k` most similar training rows and votes:
- "weighted" (DINO, Caron et al. 2021): class score = sum over the k neighbours of that class
  of exp(similarity / temperature); k = 20, temperature = 0.07 by default;
- "majority": one vote per neighbour, ties to the smaller class id (scikit-learn's
  `KNeighborsClassifier(metric="cosine")`).
The neighbours are the k largest similarities, ties to the smaller training index.

Exact similarities: unit rows are rounded to multiples of 2^-26 and multiplied in float64, where
every product and every partial sum of such numbers is exact (|partial sums| <= 1 for unit rows),
so a similarity does not depend on how the rows are blocked, the BLAS or the device. Hence the
streamed and in-memory paths give identical neighbours and identical scores.

Memory: test rows are processed in chunks (`chunk_rows` x n_train similarities at a time) on
the given torch device. The training rows are either held (one array, or `train_rows` per block)
or, for a training set that does not fit (`plan_knn_memory`), streamed from a row source
(`stream.H5Rows`: read from the file block by block, once per chunk of query rows): each block's
top k is merged with the running top k (values and training indices) of every query row.

There is no hyper-parameter search: `val_acc` is the leave-one-out accuracy on the training rows
(each training row classified by the others), which is what picks the best layer.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..choices import KNN_K, KNN_TEMPERATURE, KNN_VOTES
from ..errors import InputError, ParameterError
from .protocol import LayerResult, check_labels, wilson_interval

CHUNK_ELEMENTS = 1 << 23   # similarities held at once (64 MiB of float64)
QUANTUM = 2.0 ** -26       # unit rows are rounded to multiples of this: float64 dot products are exact
SIM_BYTES = 24             # per similarity held: the float64 value and top-k/sort temporaries (value, index)
BLOCK_ROWS = 4096          # training rows per streamed block, at most
KNN_MIN_ROWS = 8           # a streamed block or query chunk smaller than this is refused (a cap too small)


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


# ---------------------------------------------------------------------------
# Memory plan
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class KnnMemory:
    """How one layer's k-NN runs under a memory cap: `train_rows` None holds the training rows in
    memory, else they stream from the file in blocks of that many rows; `query_rows` query rows
    at a time."""
    train_rows: int | None
    query_rows: int


def plan_knn_memory(max_memory: int | None, n_train: int, n_query: int, d: int, k: int,
                    layer: int) -> KnnMemory | None:
    """None without a cap; else whether layer `layer` fits in `max_memory` bytes (its rows as read,
    float32, plus the training rows' exact float64 copy, plus one chunk of similarities) or streams,
    and the block and chunk sizes. A cap below one streamed block and chunk of KNN_MIN_ROWS rows is
    a ParameterError."""
    if max_memory is None:
        return None
    per_query = SIM_BYTES * n_train + 12 * d + 32 * k
    rest = max_memory - 2 * (n_train + n_query) * d * 4 - n_train * d * 8
    if rest >= per_query:
        return KnnMemory(None, int(max(1, min(rest // per_query, CHUNK_ELEMENTS // max(1, n_train)))))
    b = min(BLOCK_ROWS, n_train, max_memory // 4 // (12 * d))
    q = (max_memory - 12 * b * d) // (12 * d + SIM_BYTES * b + 32 * k)
    low = min(KNN_MIN_ROWS, n_train)
    if b < low or q < KNN_MIN_ROWS:
        need = max(4 * 12 * d * low, 12 * low * d + KNN_MIN_ROWS * (12 * d + SIM_BYTES * low + 32 * k))
        raise ParameterError("max_memory", max_memory, f"below one chunk: k-NN on layer {layer} needs at least "
                                                       f"{need} bytes ({KNN_MIN_ROWS} rows of {d} dims at a time)")
    return KnnMemory(int(b), int(q))


# ---------------------------------------------------------------------------
# Exact similarities and the running top k
# ---------------------------------------------------------------------------

def _unit(X, device):
    """Rows scaled to unit L2 norm, rounded to multiples of QUANTUM, float64 (zero rows stay zero)."""
    import torch

    t = torch.as_tensor(np.asarray(X, dtype=np.float32), device=device).double()
    t = torch.nn.functional.normalize(t, dim=1)
    return t.div_(QUANTUM).round_().mul_(QUANTUM)   # exact: scaling by a power of two


def _is_source(X) -> bool:
    """A row source (`stream.H5Rows`: rows read from a file in chunks) rather than an array."""
    return hasattr(X, "numpy_chunks")


def _rows(X) -> int:
    return int(X.shape[0]) if _is_source(X) or hasattr(X, "shape") else len(X)


def _query_chunks(X, rows: int):
    """X's rows in order, `rows` at a time (a row source's chunks re-batched to that size)."""
    if not _is_source(X):
        for s in range(0, _rows(X), rows):
            yield X[s:s + rows]
        return
    buf: list[np.ndarray] = []
    held = 0
    for C in X.numpy_chunks():
        buf.append(C)
        held += len(C)
        while held >= rows:
            A = np.concatenate(buf)
            yield A[:rows]
            buf, held = [A[rows:]], held - rows
    if held:
        yield np.concatenate(buf)


def _ordered(v, i):
    """Candidates (values, train indices) of each row ordered by value desc, ties by index asc."""
    i, o = i.sort(dim=1)
    v = v.gather(1, o)
    v, o = v.sort(dim=1, descending=True, stable=True)
    return v, i.gather(1, o)


def block_top(sim, k: int, offset: int = 0):
    """The k largest similarities of each row of one block ([n_query, n_block]) and their training
    indices (`offset` + column), ordered by similarity desc, ties to the smaller index (also at the
    k-th place, where `topk` alone would keep any of the tied ones)."""
    import torch

    k = min(k, sim.shape[1])
    v, i = sim.topk(min(k + 1, sim.shape[1]), dim=1)
    if v.shape[1] > k:   # a tie at the k-th place: the (k+1)-th similarity equals the k-th
        tied = v[:, k] == v[:, k - 1]
        v, i = v[:, :k], i[:, :k]
        if bool(tied.any()):
            rows = tied.nonzero().squeeze(1)
            sv, si = torch.sort(sim[rows], dim=1, descending=True, stable=True)
            v[rows], i[rows] = sv[:, :k], si[:, :k]
    v, i = _ordered(v, i)
    return v, i + offset


def merge_top(v0, i0, v1, i1, k: int):
    """The running top k (v0, i0) merged with a later block's (v1, i1; larger indices): the k best of
    both, in the same order (a stable sort keeps earlier, smaller indices first among ties)."""
    import torch

    v, o = torch.cat([v0, v1], dim=1).sort(dim=1, descending=True, stable=True)
    return v[:, :k], torch.cat([i0, i1], dim=1).gather(1, o)[:, :k]


def knn_scores(X_train, y_train: np.ndarray, X_query, *, k: int = KNN_K, vote: str = "weighted",
               temperature: float = KNN_TEMPERATURE, device: str = "cpu", exclude_self: bool = False,
               chunk_rows: int | None = None, train_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(classes [C], vote scores [n_query, C]) of the k-NN vote. `exclude_self`: the query rows are the
    training rows and each row's own similarity is left out (leave-one-out).

    `X_train` and `X_query`: arrays, or row sources (`stream.H5Rows`) read chunk by chunk (a training
    source once per chunk of query rows). `chunk_rows`: query rows at a time (default: CHUNK_ELEMENTS
    similarities); `train_rows`: an array's training rows per block (default: all at once). Neither
    changes the result."""
    import torch

    check_knn(k, vote, temperature, len(y_train) - (1 if exclude_self else 0))
    classes, y_idx = np.unique(np.asarray(y_train), return_inverse=True)
    n_train = len(y_idx)
    if _rows(X_train) != n_train:
        raise InputError(f"k-NN: {_rows(X_train)} training rows but {n_train} labels")
    dev = torch.device(device)
    labels = torch.as_tensor(y_idx.reshape(-1), device=dev)
    if _is_source(X_train):
        def blocks():
            return (_unit(B, dev) for B in X_train.numpy_chunks())
        widest = min(n_train, X_train.chunk_rows)
    else:
        b = train_rows or max(1, n_train)
        held = [_unit(X_train[s:s + b], dev) for s in range(0, n_train, b)]

        def blocks():
            return iter(held)
        widest = min(n_train, b)
    chunk = chunk_rows or max(1, CHUNK_ELEMENTS // max(1, widest))
    n_q = _rows(X_query)
    out = np.empty((n_q, len(classes)), dtype=np.float32)
    s = 0
    for Q in _query_chunks(X_query, chunk):
        q = _unit(Q, dev)
        nq = q.shape[0]
        top_v = top_i = None
        start = 0
        for B in blocks():
            sim = q @ B.T
            if exclude_self:   # query row s + r is training row s + r
                lo, hi = max(s, start), min(s + nq, start + B.shape[0])
                if lo < hi:
                    p = torch.arange(lo, hi, device=dev)
                    sim[p - s, p - start] = -float("inf")
            v, i = block_top(sim, k, start)
            top_v, top_i = (v, i) if top_v is None else merge_top(top_v, top_i, v, i, k)
            start += B.shape[0]
        if start != n_train:
            raise InputError(f"k-NN: the training rows changed while reading them ({start} of {n_train})")
        w = torch.exp(top_v / temperature) if vote == "weighted" else torch.ones_like(top_v)
        scores = torch.zeros(nq, len(classes), device=dev, dtype=torch.float64)
        scores.scatter_add_(1, labels[top_i], w)
        out[s:s + nq] = scores.cpu().numpy()
        s += nq
    if s != n_q:
        raise InputError(f"k-NN: {s} query rows read, {n_q} expected")
    return classes, out


def knn_predict(X_train, y_train: np.ndarray, X_query, **kw) -> np.ndarray:
    """Predicted class of each query row (ties: the smaller class id)."""
    classes, scores = knn_scores(X_train, y_train, X_query, **kw)
    return classes[np.argmax(scores, axis=1)]


def knn_layer(X_train, y_train: np.ndarray, X_test, y_test: np.ndarray, *, k: int = KNN_K, vote: str = "weighted",
              temperature: float = KNN_TEMPERATURE, device: str = "cpu", layer: int = 0,
              class_names: Sequence[str] | None = None, chunk_rows: int | None = None) -> LayerResult:
    """The k-NN evaluation of one layer, as a `LayerResult` (method "knn", `c` None, `k` set).
    `X_train`/`X_test`: arrays or row sources (`stream.H5Rows`, streamed); `chunk_rows`: query rows at
    a time (`knn_scores`)."""
    from .protocol import _per_class_and_confusion

    t0 = time.perf_counter()
    y_train = np.asarray(y_train, dtype=np.int64)
    y_test = np.asarray(y_test, dtype=np.int64)
    check_labels(y_train, class_names=class_names)
    if k > len(y_train) - 1:
        raise InputError(f"k={k} is larger than the training set allows ({len(y_train)} rows; "
                         f"leave-one-out validation needs k <= {len(y_train) - 1})")
    kw = dict(k=k, vote=vote, temperature=temperature, device=device, chunk_rows=chunk_rows)
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
