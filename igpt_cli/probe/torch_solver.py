"""Every C of a search in one pass over X: batched multinomial logistic regression in torch.

The objective per C is `LinearProbe`'s (scikit-learn's lbfgs one, mean-scaled):

    f_C(W, b) = mean_i CE(x_i W^T + b, y_i) + ||W||^2 / (2 C n)      (intercept unpenalised)

with the same stopping rule: stop once max |gradient| <= tol (W and b, this scaling), or
when the relative decrease of f is below 64 eps (scipy's ftol), or at `max_iter`.

All C values share each pass over X: their weights are stacked into one [n_C * K, D]
matrix, so one product X @ W^T gives every C's scores, one E^T @ X every C's gradient.
Each C runs its own L-BFGS (float64 state, history 10 like scipy's, backtracking line
search) and leaves the batch when it stops; all of them live in one `BatchedLBFGS`
(state stacked on the device, one host read per iteration). Several layers of the same
rows fit at once the same way (`fit_problems`: every layer's C values in one optimiser,
each layer's pass serving its own). Products are float32 (TF32 on CUDA when `tol` >=
TF32_MIN_TOL; `matmul_precision`); the preconditioner comes from `device_eig`.

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
from dataclasses import dataclass

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


def gram(rows, device: torch.device) -> torch.Tensor:
    """X^T X / n [D, D] float64 on `device`, accumulated chunk by chunk (float32 products)."""
    S = torch.zeros(rows.d, rows.d, dtype=torch.float64, device=device)
    for Xc in rows.chunks(device):
        S += (Xc.T @ Xc).double()
    return S / rows.n


def device_eig(rows, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The preconditioner on `device`: (eigenvalues clipped at 0 [D], eigenvectors [D, D]) of X^T X / n,
    float64, with no trip through the host (`torch.linalg.eigh` where the products ran)."""
    evals, V = torch.linalg.eigh(gram(rows, device))
    return evals.clamp(min=0.0), V


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


class BatchedLBFGS:
    """L-BFGS for P independent problems at once, all state on the device (float64).

    Each problem (a layer and a C) keeps its own iterate `x` [P, n], gradient, search
    direction, step `t`, history of the last HISTORY (s, y) pairs (ring buffers [P, H, n])
    and stopping state; one `update` takes the objective and gradient of every active
    problem's trial point and advances each: accept, backtrack (safeguarded quadratic,
    Armijo 1e-4) or stop (max |gradient| <= tol at any evaluated point, as scikit-learn;
    relative decrease below FTOL, as scipy; `max_iter`; a failed line search). The logic
    is scipy's/the former per-C loop's, written with masks instead of branches, so an
    iteration issues the same kernels for every problem and needs no host round trip;
    the caller reads the `done` flags once per iteration (`active`).
    """

    def __init__(self, x0: torch.Tensor, tol: float, max_iter: int):
        P, n = x0.shape
        dev, f64 = x0.device, dict(dtype=torch.float64, device=x0.device)
        self.tol, self.max_iter = tol, max_iter
        self.x = x0.clone()
        self.d = torch.zeros(P, n, **f64)
        self.g = torch.zeros(P, n, **f64)
        self.f = torch.full((P,), math.inf, **f64)
        self.t = torch.zeros(P, **f64)
        self.S = torch.zeros(P, HISTORY, n, **f64)
        self.Y = torch.zeros(P, HISTORY, n, **f64)
        self.n_hist = torch.zeros(P, dtype=torch.int64, device=dev)   # pairs stored (<= HISTORY)
        self.head = torch.zeros(P, dtype=torch.int64, device=dev)     # ring slot the next pair goes to
        self.started = torch.zeros(P, dtype=torch.bool, device=dev)
        self.done = torch.zeros(P, dtype=torch.bool, device=dev)
        self.converged = torch.ones(P, dtype=torch.bool, device=dev)
        self.n_iter = torch.zeros(P, dtype=torch.int64, device=dev)
        self.n_eval = torch.zeros(P, dtype=torch.int64, device=dev)
        self.n_ls = torch.zeros(P, dtype=torch.int64, device=dev)

    def active(self) -> list[int]:
        """Indices of the problems still running (the one host read of an iteration)."""
        return torch.nonzero(~self.done).flatten().tolist()

    def trial(self, idx: torch.Tensor) -> torch.Tensor:
        """Trial points [A, n] of problems `idx` (the start: x itself)."""
        return self.x[idx] + self.t[idx, None] * self.d[idx]

    def _direction(self, i: torch.Tensor, n_hist: torch.Tensor) -> torch.Tensor:
        """The two-loop recursion, -H g, for problems i, each with its own `n_hist` newest pairs
        (the newest in ring slot head - 1)."""
        g, head = self.g[i], self.head[i]
        q = -g
        saved = []
        for j in range(HISTORY):                        # newest to oldest
            slot = (head - 1 - j) % HISTORY
            s, y = self.S[i, slot], self.Y[i, slot]
            valid = j < n_hist
            ys = (y * s).sum(1)
            a = torch.where(valid, (s * q).sum(1) / torch.where(valid, ys, 1.0), 0.0)
            q = q - a[:, None] * y
            saved.append((s, y, ys, a, valid))
        s, y = saved[0][0], saved[0][1]                  # the newest pair scales the initial Hessian
        has = n_hist > 0
        gamma = torch.where(has, (s * y).sum(1) / torch.where(has, (y * y).sum(1), 1.0), 1.0)
        q = q * gamma[:, None]
        for s, y, ys, a, valid in reversed(saved):       # oldest to newest
            b = torch.where(valid, (y * q).sum(1) / torch.where(valid, ys, 1.0), 0.0)
            q = q + ((a - b) * valid)[:, None] * s
        return q

    def _new_direction(self, i: torch.Tensor, which: torch.Tensor) -> None:
        """A new search direction and first step for problems i[which]."""
        d = self._direction(i, self.n_hist[i])
        ascent = (d * self.g[i]).sum(1) >= 0             # not a descent direction: steepest descent, no history
        d = torch.where(ascent[:, None], -self.g[i], d)
        n_hist = torch.where(ascent, 0, self.n_hist[i])
        t0 = torch.where(n_hist > 0, 1.0, torch.clamp(1.0 / torch.linalg.vector_norm(self.g[i], dim=1), max=1.0))
        self.d[i] = torch.where(which[:, None], d, self.d[i])
        self.n_hist[i] = torch.where(which, n_hist, self.n_hist[i])
        self.t[i] = torch.where(which, t0, self.t[i])
        self.n_ls[i] = torch.where(which, 0, self.n_ls[i])

    def update(self, idx: list[int], f: torch.Tensor, g: torch.Tensor, gmax: torch.Tensor) -> None:
        """Take the objective f [A], gradient g [A, n] and max |gradient| gmax [A] (in the scale of the
        stopping rule) at the trial points of problems `idx` (the active ones)."""
        i = torch.as_tensor(idx, dtype=torch.int64, device=self.x.device)
        self.n_eval[i] += 1
        x_trial = self.trial(i)
        f_cur, g_cur, d, t = self.f[i], self.g[i], self.d[i], self.t[i]
        first = ~self.started[i]
        small = gmax <= self.tol
        slope = (g_cur * d).sum(1)
        armijo = f <= f_cur + 1e-4 * t * slope
        # the starting point: take it; stop if it already satisfies the gradient rule
        # a later point: stop at any point that satisfies it (scikit-learn's rule)
        stop_small = small
        later = ~first & ~small
        backtrack = later & ~armijo
        accept = later & armijo
        # --- backtracking ----------------------------------------------------------------
        n_ls = self.n_ls[i] + backtrack
        ls_fail = backtrack & ((n_ls > MAX_LINE_SEARCH) | ~torch.isfinite(f_cur))
        denom = torch.where(torch.isfinite(f), 2.0 * (f - f_cur - t * slope), math.inf)
        t_q = torch.where(denom > 0, -slope * t * t / torch.where(denom > 0, denom, 1.0), 0.5 * t)
        t_back = torch.minimum(torch.maximum(t_q, 0.1 * t), 0.5 * t)
        # --- accepting: store the (s, y) pair when the curvature is positive enough -------------
        s_new, y_new = t[:, None] * d, g - g_cur
        keep_pair = accept & ((s_new * y_new).sum(1) > 1e-10 * (y_new * y_new).sum(1))
        head = self.head[i]
        self.S[i, head] = torch.where(keep_pair[:, None], s_new, self.S[i, head])
        self.Y[i, head] = torch.where(keep_pair[:, None], y_new, self.Y[i, head])
        self.head[i] = torch.where(keep_pair, (head + 1) % HISTORY, head)
        self.n_hist[i] = torch.where(keep_pair, torch.clamp(self.n_hist[i] + 1, max=HISTORY), self.n_hist[i])
        n_iter = self.n_iter[i] + accept
        rel = (f_cur - f) / torch.maximum(torch.maximum(f_cur.abs(), f.abs()), torch.ones_like(f))
        flat = accept & (rel <= FTOL)
        out_of_iter = accept & ~flat & (n_iter >= self.max_iter)
        # --- the new state ---------------------------------------------------------------
        moved = accept | (stop_small & ~first)           # x becomes the trial point
        take = moved | first                             # f and g become the evaluated ones
        self.x[i] = torch.where(moved[:, None], x_trial, self.x[i])
        self.f[i] = torch.where(take, f, f_cur)
        self.g[i] = torch.where(take[:, None], g, g_cur)
        self.n_iter[i] = n_iter
        self.n_ls[i] = n_ls
        self.t[i] = torch.where(backtrack & ~ls_fail, t_back, t)
        done = stop_small | ls_fail | flat | out_of_iter
        self.done[i] = done
        self.converged[i] = self.converged[i] & ~(ls_fail | out_of_iter)
        self.started[i] = True
        self._new_direction(i, ~done & (first | accept))


@dataclass
class Problem:
    """One layer's fits: its rows (a row source), preconditioner `eig` = (eigenvalues [D],
    eigenvectors [D, D]) of X^T X / n (numpy or torch), the C values, and per C an optional
    warm start ([K, D] / [K])."""
    rows: object
    eig: tuple
    Cs: list
    coef_init: list | None = None
    intercept_init: list | None = None


def fit_many(rows, y: np.ndarray, k: int, Cs, *, tol: float, max_iter: int, eig: tuple[np.ndarray, np.ndarray],
             device: torch.device, coef_init=None, intercept_init=None):
    """Fit one multinomial model per C of `Cs`, all sharing each pass over the rows.

    `rows`: a row source (standardised features), `y` [N] class indices 0..k-1, `eig` the
    (eigenvalues, eigenvectors) of X^T X / n (the preconditioner), `coef_init` /
    `intercept_init`: per C a [K, D] / [K] warm start or None. Returns per C
    (W [K, D] float64, b [K] float64, passes over the data, converged).
    """
    return fit_problems([Problem(rows, eig, list(Cs), coef_init, intercept_init)], y, k, tol=tol,
                        max_iter=max_iter, device=device)[0]


def fit_problems(problems: list[Problem], y: np.ndarray, k: int, *, tol: float, max_iter: int,
                 device: torch.device) -> list[list[tuple]]:
    """Every C of every problem (layer) at once: one optimiser state for all of them (stacked
    [sum of C, K*D + K]), one pass over each layer's rows per iteration serving all its C
    still running, one host read per iteration. Each (layer, C) stops on its own criterion,
    so its result is the one it gets alone. The layers share the labels `y` (same rows).
    Returns per problem, per C: (W [K, D], b [K] float64 numpy, passes over the data, converged)."""
    a = (k - 1) / k ** 2 if k > 1 else 0.25
    bs = 1.0 / math.sqrt(a)
    f64 = dict(dtype=torch.float64, device=device)
    y_t = torch.as_tensor(np.asarray(y), dtype=torch.int64, device=device)
    owner, lams, r_rows, x0, Vs = [], [], [], [], []
    for pi, prob in enumerate(problems):
        n, d = prob.rows.n, prob.rows.d
        evals, V = (torch.as_tensor(m, **f64) for m in prob.eig)
        Vs.append(V)
        W0s = prob.coef_init or [None] * len(prob.Cs)
        b0s = prob.intercept_init or [None] * len(prob.Cs)
        for c, W0, b0 in zip(prob.Cs, W0s, b0s):
            lam = 1.0 / (float(c) * n)
            r = 1.0 / torch.sqrt(a * evals.clamp(min=0) + lam)                         # [D]
            U0 = torch.zeros(k, d, **f64) if W0 is None else (torch.as_tensor(np.asarray(W0), **f64) @ V) / r
            bp0 = torch.zeros(k, **f64) if b0 is None else torch.as_tensor(np.asarray(b0), **f64) / bs
            owner.append(pi)
            lams.append(lam)
            r_rows.append(r)
            x0.append(torch.cat([U0.reshape(-1), bp0]))
    if len({len(x) for x in x0}) > 1:
        raise ValueError("fit_problems: every problem must have the same feature dimension")
    if not x0:
        return [[] for _ in problems]
    d = problems[0].rows.d
    lam_t = torch.as_tensor(lams, **f64)                  # [P]
    r_all = torch.stack(r_rows)                           # [P, D]
    owner_arr = np.asarray(owner)
    opt = BatchedLBFGS(torch.stack(x0), tol, max_iter)

    with torch.no_grad(), matmul_precision(device, tol):
        while True:
            active = opt.active()
            if not active:
                break
            f_all, g_all, gmax_all, order = [], [], [], []
            for pi in sorted(set(owner_arr[active].tolist())):     # one pass over each layer's rows
                mine = [p for p in active if owner_arr[p] == pi]
                idx = torch.as_tensor(mine, dtype=torch.int64, device=device)
                X_pts = opt.trial(idx)                                           # [A, K*D + K]
                U, bp = X_pts[:, :k * d].reshape(-1, k, d), X_pts[:, k * d:]     # [A, K, D], [A, K]
                r = r_all[idx]
                W = (U * r[:, None, :]) @ Vs[pi].T                               # [A, K, D]
                b = bp * bs
                loss, gW, gb = _pass(problems[pi].rows, y_t, W, b, device)      # one pass serves every active C
                lam = lam_t[idx]
                loss = loss + 0.5 * lam * (W * W).sum(dim=(1, 2))
                gW = gW + lam[:, None, None] * W
                gmax = torch.maximum(gW.abs().amax(dim=(1, 2)), gb.abs().amax(dim=1))
                gU = (gW @ Vs[pi]) * r[:, None, :]
                f_all.append(loss)
                g_all.append(torch.cat([gU.reshape(len(mine), -1), gb * bs], dim=1))   # [A, K*D + K]
                gmax_all.append(gmax)
                order.extend(mine)
            opt.update(order, torch.cat(f_all), torch.cat(g_all), torch.cat(gmax_all))

    out, P = [[] for _ in problems], 0
    n_eval, conv = opt.n_eval.tolist(), opt.converged.tolist()
    for p, pi in enumerate(owner):
        U, bp = opt.x[p, :k * d].reshape(k, d), opt.x[p, k * d:]
        W = (U * r_all[p]) @ Vs[pi].T
        out[pi].append((W.cpu().numpy(), (bp * bs).cpu().numpy(), n_eval[p], conv[p]))
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
