"""Resumable outputs of the generate stages: a temp file filled batch by batch.

The output (a tokens file for `sample`/`complete`, a scores file for `score`) is laid
out in full in `.<out>.tmp` before the first batch: every dataset at its final size,
written once so that all its storage exists, and the run's identity attrs plus
`n_done = 0`. `run_batches` then computes rows [n_done, N) batch by batch, flushing the
rows first and `n_done` second, so a killed run leaves a file that says how far it got.
Run again with the same settings, the stage reopens it and goes on from `n_done` on the
same batch boundaries (the batch size is part of the identity; a stored one wins), so
the finished file equals an uninterrupted run's. A partial file from other settings is
named, with the setting that differs; `restart=True` discards it. The whole run holds
the output's lock (`outputs.output_lock`); the file is renamed onto the output only when
complete.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from .. import formats, outputs
from ..errors import InputError
from ..progress import Reporter

Fill = Callable[[h5py.File, int, int], None]  # compute and write rows [i, j) of the open file


def _plain(v):
    v = v.decode() if isinstance(v, bytes) else v
    return v.item() if isinstance(v, np.generic) else v


def mismatch(f: h5py.File, identity: dict) -> str | None:
    """Why the partial file `f` cannot be resumed by a run with `identity` (None: it can)."""
    for key, want in identity.items():
        have = _plain(f.attrs.get(key))
        want = formats.storable_text(want)
        if have != want:
            short = lambda v: str(v) if len(str(v)) < 60 else str(v)[:57] + "…"  # noqa: E731
            return f"{key} differs (partial file: {short(have)}, this run: {short(want)})"
    return None


def _open(tmp: Path, kind: str, identity: dict) -> h5py.File | None:
    """The partial file at `tmp` reopened for resumption; None when there is nothing usable."""
    if not tmp.exists():
        return None
    try:
        f = h5py.File(tmp, "r+")
    except OSError:
        return None  # killed before its first flush: nothing to keep
    why = None
    try:
        usable = _plain(f.attrs.get("format")) == kind and "n_done" in f.attrs
        why = mismatch(f, identity) if usable else None
    except Exception:
        usable = False
    if not usable or why:
        f.close()
        if why:
            raise InputError(f"{tmp}: a partial run with different settings is in the way: {why}. "
                             "Run the original command again to resume it, or pass restart=True to discard it")
        return None
    return f


def _create(tmp: Path, layout: Callable[[h5py.File], None], identity: dict, attrs: dict) -> h5py.File:
    tmp.unlink(missing_ok=True)
    f = h5py.File(tmp, "w")
    try:
        layout(f)
        f.attrs.update(formats.storable_attrs(attrs))
        f.attrs.update(formats.storable_attrs(identity))
        f.attrs.update(n_done=0, complete=False)
        f.flush()
    except BaseException:
        with contextlib.suppress(Exception):
            f.close()
        tmp.unlink(missing_ok=True)
        raise
    return f


def stored_batch_size(tmp: Path) -> int | None:
    try:
        with h5py.File(tmp, "r") as f:
            return int(f.attrs["batch_size"])
    except Exception:
        return None


def run_batches(out: Path, kind: str, identity: dict, attrs: dict, layout: Callable[[h5py.File], None],
                fill: Fill, *, restart: bool, batch_size_given: bool, reporter: Reporter,
                rows_to_units: Callable[[int], int] = lambda k: k) -> tuple[int, int, float]:
    """Fill (or resume) `.<out>.tmp` and rename it onto `out`, under the output's lock.

    `identity` must hold `n_total` and `batch_size`. `layout(f)` creates the datasets of a
    fresh file; `fill(f, i, j)` computes rows [i, j) (advancing `reporter` itself).
    Returns (batch size used, rows resumed from, seconds in the batch loop).
    """
    tmp = outputs.temp_path_for(out)
    n_total, bs = int(identity["n_total"]), int(identity["batch_size"])
    with outputs.output_lock(out):
        if restart:
            tmp.unlink(missing_ok=True)
        stored = stored_batch_size(tmp) if tmp.exists() else None
        if stored is not None and stored != bs:  # resume on the partial file's batch boundaries
            if batch_size_given:
                reporter.log(f"resuming with the partial file's batch size {stored} (not {bs})")
            identity, bs = dict(identity, batch_size=stored), stored
        f = _open(tmp, kind, identity)
        resumed = 0
        if f is None:
            f = _create(tmp, layout, identity, attrs)
        else:
            resumed = int(f.attrs["n_done"])
            if resumed:
                reporter.log(f"resuming {tmp} at row {resumed} of {n_total}")
        try:
            reporter.start(done=rows_to_units(resumed))
            t0 = time.perf_counter()
            for i in range(resumed, n_total, bs):
                j = min(i + bs, n_total)
                fill(f, i, j)
                f.flush()  # rows first …
                f.attrs["n_done"] = j
                f.flush()  # … then the counter
            seconds = time.perf_counter() - t0
            f.attrs["complete"] = True
        finally:
            f.close()
        os.replace(tmp, out)
    return bs, resumed, seconds


def preallocate(f: h5py.File, name: str, n: int, block: Callable[[int, int], dict]) -> None:
    """Write `append_rows` blocks of up to 4096 rows until dataset `name` has n rows (storage allocated)."""
    for i in range(f[name].shape[0], n, 4096):
        formats.append_rows(f, **block(i, min(i + 4096, n)))
