"""Out of core: a features layer read from HDF5 in row chunks (a row source for the torch solver).

`H5Rows` is one layer's rows (a subset of them, optionally standardised) that the probe
never holds at once: every pass reads the file again chunk by chunk, so the solver
accumulates the same full-batch gradient as in memory (same optimum). `plan_memory`
decides, per layer, whether it fits in `max_memory` bytes and how many rows a chunk may
have.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .. import formats
from ..errors import InputError, ParameterError
from ..formats import FEATURES_FORMAT, open_igpt

MIN_CHUNK_ROWS = 64     # a chunk smaller than this is not worth a pass
IN_MEMORY_COPIES = 3    # raw layer + standardised search copy + standardised final copy
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(value) -> int | None:
    """Bytes from an int or a string like `512M`, `2G`, `1.5G`, `100000` (None stays None)."""
    if value is None or isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", str(value), re.IGNORECASE)
    if not m:
        raise ParameterError("max_memory", value, "expected bytes, e.g. 512M or 2G")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def state_bytes(d: int, k: int, n_c: int) -> int:
    """Bytes of the optimiser state of `n_c` simultaneous fits (L-BFGS history and iterates, float64)."""
    from .torch_solver import HISTORY

    return n_c * (2 * HISTORY + 6) * (k * d + k) * 8


def plan_memory(max_memory: int | None, n_rows: int, d: int, k: int, n_c: int, layer: int) -> int | None:
    """None when the layer fits in `max_memory` (or there is no cap), else the rows per streamed chunk.
    A cap below one chunk of MIN_CHUNK_ROWS rows plus the optimiser state is a ParameterError."""
    if max_memory is None:
        return None
    from .torch_solver import score_row_bytes

    state = state_bytes(d, k, n_c)
    if IN_MEMORY_COPIES * n_rows * d * 4 + state + n_rows * 12 * n_c * k <= max_memory:
        return None
    row = score_row_bytes(d, n_c * k) + 8 * d      # scores + the raw and the standardised chunk
    rows = (max_memory - state) // row
    if rows < MIN_CHUNK_ROWS:
        need = state + MIN_CHUNK_ROWS * row
        raise ParameterError("max_memory", max_memory, f"below one chunk: layer {layer} needs at least {need} bytes "
                                                       f"({MIN_CHUNK_ROWS} rows of {d} dims plus the optimiser state)")
    return int(rows)


class H5Rows:
    """Rows `index` (sorted) of layer `layer` of a features file, read `chunk_rows` file rows at a time;
    with `mean`/`scale` set, chunks come standardised ((x - mean) / scale, float32)."""

    def __init__(self, path: str | Path, layer: int, chunk_rows: int, index: np.ndarray | None = None,
                 mean: np.ndarray | None = None, scale: np.ndarray | None = None):
        self.path, self.layer, self.chunk_rows = Path(path), int(layer), int(chunk_rows)
        with open_igpt(self.path, FEATURES_FORMAT) as f:
            n_file, self.d = f["features"][str(layer)].shape
        self.index = np.arange(n_file) if index is None else np.asarray(index, dtype=np.int64)
        self.n = len(self.index)
        self.shape = (self.n, self.d)
        self.mean, self.scale = mean, scale

    def _copy(self, **kw) -> H5Rows:
        args = dict(index=self.index, mean=self.mean, scale=self.scale) | kw
        return H5Rows(self.path, self.layer, self.chunk_rows, **args)

    def take(self, idx: np.ndarray) -> H5Rows:
        """These rows' subset `idx` (positions into this source, sorted)."""
        return self._copy(index=self.index[np.sort(np.asarray(idx))])

    def standardized(self, mean: np.ndarray, scale: np.ndarray) -> H5Rows:
        return self._copy(mean=np.asarray(mean, np.float32), scale=np.asarray(scale, np.float32))

    def numpy_chunks(self):
        """The rows in order as float32 arrays, one file block at a time (NaN/inf refused)."""
        with open_igpt(self.path, FEATURES_FORMAT) as f:
            ds = f["features"][str(self.layer)]
            if self.n == 0:
                return
            lo, hi = int(self.index[0]), int(self.index[-1]) + 1
            for a in range(lo, hi, self.chunk_rows):
                b = min(a + self.chunk_rows, hi)
                sel = self.index[np.searchsorted(self.index, a):np.searchsorted(self.index, b)]
                if not len(sel):
                    continue
                X = np.asarray(formats.read_dataset(ds, slice(a, b), path=self.path), dtype=np.float32)[sel - a]
                if not np.isfinite(X).all():
                    raise InputError(f"{self.path}: layer {self.layer} has NaN/inf features")
                if self.mean is not None:
                    X = ((X - self.mean) / self.scale).astype(np.float32, copy=False)
                yield X

    def chunks(self, device, n_outputs: int = 1):
        import torch

        for X in self.numpy_chunks():
            yield torch.from_numpy(X).to(device)

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std [D] (float64) in one streaming pass (chunk statistics merged, Chan et al.)."""
        n, mean, m2 = 0, np.zeros(self.d), np.zeros(self.d)
        for X in self.numpy_chunks():
            m = len(X)
            cm = X.mean(axis=0, dtype=np.float64)
            c2 = ((X - cm) ** 2).sum(axis=0, dtype=np.float64)
            delta = cm - mean
            mean = mean + delta * m / (n + m)
            m2 = m2 + c2 + delta ** 2 * n * m / (n + m)
            n += m
        return mean, np.sqrt(m2 / max(n, 1))


def read_layer(f, path: str | Path, layer: int) -> np.ndarray:
    """Layer `layer` of the open features file `f` as float32 [N, D]; NaN/inf refused (one line
    naming the file, the layer and how many rows)."""
    X = np.asarray(formats.read_dataset(f["features"][str(layer)], path=path), dtype=np.float32)
    if not np.isfinite(X).all():
        bad = int((~np.isfinite(X)).any(axis=1).sum())
        raise InputError(f"{path}: layer {layer} has NaN/inf features in {bad} rows")
    return X
