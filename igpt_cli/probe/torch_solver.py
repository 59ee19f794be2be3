"""Every C of a search in one pass over X: batched multinomial logistic regression in torch.

The objective per C is `LinearProbe`'s (scikit-learn's lbfgs one, mean-scaled):

    f_C(W, b) = mean_i CE(x_i W^T + b, y_i) + ||W||^2 / (2 C n)      (intercept unpenalised)

with the same stopping rule: stop once max |gradient| <= tol (W and b, this scaling), or
when the relative decrease of f is below 64 eps (scipy's ftol), or at `max_iter`.

All C values share each pass over X: their weights are stacked into one [n_C * K, D]
matrix, so one product X @ W^T gives every C's scores, one E^T @ X every C's gradient.
Each C runs its own L-BFGS (float64 state, history 10 like scipy's, backtracking line
search) and leaves the batch when it stops. Products are float32 (TF32 on CUDA when
`tol` >= TF32_MIN_TOL; `matmul_precision`).

L-BFGS runs on the same preconditioned parametrisation as the numpy solver, written in
the eigenbasis of the feature covariance S = V diag(e) V^T:  W = (U * r_C) V^T with
r_C = (a e + 1/(C n))^-1/2, a the initial softmax curvature; b = b' / sqrt(a).
Same optimum, far better conditioned.

Rows come from a *row source*: anything with `n`, `d` and `chunks(device)` yielding
float32 tensors [rows, D] in a fixed order (`ArrayRows` here; `stream.H5Rows` reads a
layer from HDF5 in chunks, so a layer larger than memory still gets the full-batch
gradient, accumulated chunk by chunk).
"""
from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

HISTORY = 10          # L-BFGS memory (scipy's default)
FTOL = 64 * np.finfo(float).eps
MAX_LINE_SEARCH = 30
CHUNK_BYTES = 256 << 20   # in-memory rows: score tensors of at most ~this size per chunk


def score_row_bytes(d: int, n_outputs: int) -> int:
    """Bytes one row costs in a pass: its features and its float32 scores/softmax (x3 for temporaries)."""
    return 4 * d + 12 * n_outputs


class ArrayRows:
    """An in-memory [N, D] float32 array as a row source (on `device` once, chunked per pass)."""

    def __init__(self, X, chunk_rows: int | None = None):
        self.X = X if isinstance(X, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
        self.n, self.d = self.X.shape
        self.chunk_rows = chunk_rows
        self._on = {}

    def chunks(self, device: torch.device, n_outputs: int = 1):
        X = self._on.get(device)
        if X is None:
            X = self._on[device] = self.X.to(device)
        step = self.chunk_rows or max(1, CHUNK_BYTES // score_row_bytes(self.d, n_outputs))
        for a in range(0, self.n, step):
            yield X[a:a + step]


def as_rows(X):
    """A row source for X (row sources pass through)."""
    return X if hasattr(X, "chunks") else ArrayRows(X)


def gram(rows, device: torch.device) -> np.ndarray:
    """X^T X / n [D, D] float64, accumulated chunk by chunk."""
    S = torch.zeros(rows.d, rows.d, dtype=torch.float64, device=device)
    for Xc in rows.chunks(device):
        S += (Xc.T @ Xc).double()
    return (S / rows.n).cpu().numpy()


# TF32 products round to ~2^-11 relative: below this tolerance the line search can stall on that noise
# (converged=False, coefficients ~1e-3 off), so tighter fits keep full FP32 products
TF32_MIN_TOL = 1e-5

_precision_lock = threading.Lock()
_precision_users: list[str] = []      # the precision each fit running now asked for
_precision_saved: list = []           # what the process had before the first of them


def _cuda_matmul():
    return torch.backends.cuda.matmul


def _set_cuda_precision(value) -> None:
    m = _cuda_matmul()
    if hasattr(m, "fp32_precision"):  # the current API (the legacy allow_tf32 warns, and raises once it is used)
        m.fp32_precision = value
    else:  # pragma: no cover - torch without fp32_precision
        m.allow_tf32 = value == "tf32"


def _get_cuda_precision():
    m = _cuda_matmul()
    return m.fp32_precision if hasattr(m, "fp32_precision") else ("tf32" if m.allow_tf32 else "ieee")


def matmul_precision_for(device: torch.device, tol: float) -> str | None:
    """The float32 product precision a fit to `tol` uses: "tf32" on CUDA unless `tol` is below
    TF32_MIN_TOL ("ieee"); None off CUDA (nothing to set)."""
    if device.type != "cuda":
        return None
    return "tf32" if tol >= TF32_MIN_TOL else "ieee"


@contextlib.contextmanager
def matmul_precision(device: torch.device, tol: float):
    """CUDA float32 products at `matmul_precision_for(device, tol)` while any fit runs, process-wide.

    The flag is the process's, not a thread's: fits running at once in threads (`--jobs`) share
    one setting, taken by the first to start and restored when the last one ends; while any of
    them asked for full FP32 it stays FP32 (never looser than a fit asked for)."""
    want = matmul_precision_for(device, tol)
    if want is None:
        yield
        return
    with _precision_lock:
        if not _precision_users:
            _precision_saved[:] = [_get_cuda_precision()]
        _precision_users.append(want)
        _set_cuda_precision("ieee" if "ieee" in _precision_users else "tf32")
    try:
        yield
    finally:
        with _precision_lock:
            _precision_users.remove(want)
            if _precision_users:
                _set_cuda_precision("ieee" if "ieee" in _precision_users else "tf32")
            else:
                _set_cuda_precision(_precision_saved.pop())


@dataclass
class _LBFGS:
    """One C's optimiser state (float64, flat parameter vector [K*D + K] in the preconditioned space)."""
    x: torch.Tensor
    t: float = 0.0                      # current trial step along d
    d: torch.Tensor | None = None       # search direction
    f: float = math.inf
    g: torch.Tensor | None = None
    s_hist: list = field(default_factory=list)
    y_hist: list = field(default_factory=list)
    n_iter: int = 0
    n_eval: int = 0
    n_ls: int = 0
    done: bool = False
    converged: bool = True

    def trial(self) -> torch.Tensor:
        return self.x if self.d is None else self.x + self.t * self.d

    def direction(self) -> torch.Tensor:
        """The two-loop recursion: -H g from the stored (s, y) pairs."""
        q = -self.g
        alphas = []
        for s, y in zip(reversed(self.s_hist), reversed(self.y_hist)):
            a = torch.dot(s, q) / torch.dot(y, s)
            alphas.append(a)
            q = q - a * y
        if self.s_hist:
            s, y = self.s_hist[-1], self.y_hist[-1]
            q = q * (torch.dot(s, y) / torch.dot(y, y))
        for (s, y), a in zip(zip(self.s_hist, self.y_hist), reversed(alphas)):
            b = torch.dot(y, q) / torch.dot(y, s)
            q = q + (a - b) * s
        return q

    def new_direction(self) -> None:
        self.d = self.direction()
        if torch.dot(self.d, self.g) >= 0:        # not a descent direction: restart from steepest descent
            self.s_hist.clear()
            self.y_hist.clear()
            self.d = -self.g
        self.t = 1.0 if self.s_hist else min(1.0, 1.0 / float(torch.linalg.vector_norm(self.g)))
        self.n_ls = 0

    def update(self, f: float, g: torch.Tensor, gmax: float, tol: float, max_iter: int) -> None:
        """Take the result of evaluating the trial point: accept, backtrack or stop."""
        self.n_eval += 1
        if self.d is None:                        # the starting point
            self.f, self.g = f, g
            if gmax <= tol:
                self.done = True
            else:
                self.new_direction()
            return
        slope = float(torch.dot(self.g, self.d))
        if gmax <= tol:                           # scikit-learn's rule, checked at every evaluated point
            self.x, self.f, self.g, self.done = self.trial(), f, g, True
            return
        if not (f <= self.f + 1e-4 * self.t * slope):   # Armijo fails: backtrack (safeguarded quadratic)
            self.n_ls += 1
            if self.n_ls > MAX_LINE_SEARCH or not math.isfinite(self.f):
                self.done, self.converged = True, False
                return
            denom = 2.0 * (f - self.f - self.t * slope) if math.isfinite(f) else math.inf
            t_q = -slope * self.t ** 2 / denom if denom > 0 else 0.5 * self.t
            self.t = min(max(t_q, 0.1 * self.t), 0.5 * self.t)
            return
        s, y = self.t * self.d, g - self.g
        if torch.dot(s, y) > 1e-10 * torch.dot(y, y):
            self.s_hist.append(s)
            self.y_hist.append(y)
            if len(self.s_hist) > HISTORY:
                self.s_hist.pop(0)
                self.y_hist.pop(0)
        f_old = self.f
        self.x, self.f, self.g = self.trial(), f, g
        self.n_iter += 1
        if (f_old - f) / max(abs(f_old), abs(f), 1.0) <= FTOL:
            self.done = True
        elif self.n_iter >= max_iter:
            self.done, self.converged = True, False
        else:
            self.new_direction()


def fit_many(rows, y: np.ndarray, k: int, Cs, *, tol: float, max_iter: int, eig: tuple[np.ndarray, np.ndarray],
             device: torch.device, coef_init=None, intercept_init=None):
    """Fit one multinomial model per C of `Cs`, all sharing each pass over the rows.

    `rows`: a row source (standardised features), `y` [N] class indices 0..k-1, `eig` the
    (eigenvalues, eigenvectors) of X^T X / n (the preconditioner), `coef_init` /
    `intercept_init`: per C a [K, D] / [K] warm start or None. Returns per C
    (W [K, D] float64, b [K] float64, passes over the data, converged).
    """
    n, d = rows.n, rows.d
    Cs = [float(c) for c in Cs]
    a = (k - 1) / k ** 2 if k > 1 else 0.25
    bs = 1.0 / math.sqrt(a)
    f64 = dict(dtype=torch.float64, device=device)
    evals, V = (torch.as_tensor(np.asarray(m), **f64) for m in eig)
    lams = [1.0 / (c * n) for c in Cs]
    r = torch.stack([1.0 / torch.sqrt(a * evals.clamp(min=0) + lam) for lam in lams])   # [n_C, D]
    y_t = torch.as_tensor(np.asarray(y), dtype=torch.int64, device=device)
    states = []
    for i in range(len(Cs)):
        W0 = None if coef_init is None or coef_init[i] is None else torch.as_tensor(np.asarray(coef_init[i]), **f64)
        b0 = None if intercept_init is None or intercept_init[i] is None else \
            torch.as_tensor(np.asarray(intercept_init[i]), **f64)
        U0 = torch.zeros(k, d, **f64) if W0 is None else (W0 @ V) / r[i]
        bp0 = torch.zeros(k, **f64) if b0 is None else b0 / bs
        states.append(_LBFGS(x=torch.cat([U0.reshape(-1), bp0])))

    with torch.no_grad(), matmul_precision(device, tol):
        while True:
            active = [i for i, s in enumerate(states) if not s.done]
            if not active:
                break
            X_pts = torch.stack([states[i].trial() for i in active])          # [A, K*D + K]
            U, bp = X_pts[:, :k * d].reshape(-1, k, d), X_pts[:, k * d:]      # [A, K, D], [A, K]
            W = (U * r[active, None, :]) @ V.T                                 # [A, K, D]
            b = bp * bs
            loss, gW, gb = _pass(rows, y_t, W, b, device)                     # one pass serves every active C
            lam = torch.as_tensor([lams[i] for i in active], **f64)
            loss = loss + 0.5 * lam * (W * W).sum(dim=(1, 2))
            gW = gW + lam[:, None, None] * W
            gmax = torch.maximum(gW.abs().amax(dim=(1, 2)), gb.abs().amax(dim=1)).tolist()
            gU = (gW @ V) * r[active, None, :]
            g = torch.cat([gU.reshape(len(active), -1), gb * bs], dim=1)     # [A, K*D + K]
            for j, i in enumerate(active):
                states[i].update(float(loss[j]), g[j], gmax[j], tol, max_iter)

    out = []
    for i, s in enumerate(states):
        U, bp = s.x[:k * d].reshape(k, d), s.x[k * d:]
        W = (U * r[i]) @ V.T
        out.append((W.cpu().numpy(), (bp * bs).cpu().numpy(), s.n_eval, s.converged))
    return out


def _pass(rows, y: torch.Tensor, W: torch.Tensor, b: torch.Tensor, device: torch.device):
    """Mean cross-entropy and its gradient for A stacked models over all rows, chunk by chunk.

    W [A, K, D], b [A, K] float64 -> loss [A], gW [A, K, D], gb [A, K] (float64; float32 products).
    Scores are laid out [A, K, m] (rows innermost), so the softmax over K reduces across
    contiguous rows of m values: vectorised, unlike a reduction over a last axis of 10."""
    A, k, d = W.shape
    Wf = W.reshape(A * k, d).float()                # [A*K, D]
    bf = b.reshape(A * k, 1).float()
    loss = torch.zeros(A, dtype=torch.float64, device=device)
    gW = torch.zeros(A * k, d, dtype=torch.float64, device=device)
    gb = torch.zeros(A, k, dtype=torch.float64, device=device)
    start = 0
    for Xc in rows.chunks(device, A * k):
        m = len(Xc)
        idx = y[start:start + m].view(1, 1, m).expand(A, 1, m)
        start += m
        z = torch.addmm(bf, Wf, Xc.T).view(A, k, m)                 # [A, K, m] scores
        z.sub_(z.amax(1, keepdim=True))                              # shifted: exp cannot overflow
        zy = z.gather(1, idx)                                        # [A, 1, m] the true class's score
        z.exp_()
        total = z.sum(1, keepdim=True)                               # [A, 1, m]
        loss += (total.log() - zy).sum(dim=(1, 2), dtype=torch.float64)
        z.div_(total)                                                # softmax
        z.scatter_add_(1, idx, torch.full((A, 1, m), -1.0, device=device))   # p - onehot(y)
        gb += z.sum(2, dtype=torch.float64)
        gW += (z.view(A * k, m) @ Xc).double()
    n = start
    return loss / n, gW.view(A, k, d) / n, gb / n


def decision(rows, W: np.ndarray, b: np.ndarray, device: torch.device) -> np.ndarray:
    """Scores [N, K] float32 of one model over a row source."""
    Wt = torch.as_tensor(W, dtype=torch.float32, device=device)
    bt = torch.as_tensor(b, dtype=torch.float32, device=device)
    with torch.no_grad():
        return torch.cat([torch.addmm(bt, Xc, Wt.T) for Xc in rows.chunks(device, len(b))]).cpu().numpy()
