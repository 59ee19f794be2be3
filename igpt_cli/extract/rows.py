"""The row loop and the partial files it fills, shared by the one-process stage and every rank.

A features file is filled in place: `create_partial` lays out all N rows up front
(`formats.create_features_file`), `fill_rows` computes rows [start, stop) batch by batch,
and after each batch flushes the rows first and `attrs["n_done"]` second, so `n_done`
never runs ahead of the data and a killed run leaves a file that says how far it got.
`open_partial` reopens such a file when the settings match (else it names the
difference), `stored_batch_size` reads the batch size it was started with: resuming on
the same batch boundaries makes the finished file the same as an uninterrupted run's.

Disk space: partial files are opened without HDF5's chunk cache (rows go to their
preallocated chunks when written, not at a later flush), and their whole length is
allocated on disk when created or resumed (`outputs.reserve_space`), so a full file
system is found before any row is computed; where it still strikes mid-run (a file
system without fallocate), the write fails cleanly, the file keeps its last flushed
state and `DiskFullError` says so: free space and rerun to resume.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np

from .. import formats, outputs
from ..errors import InputError
from ..progress import Reporter

Source = Callable[[np.ndarray], dict[int, np.ndarray]]  # tokens [B, T] -> {layer: [B, D]}


@dataclass
class RowsRun:
    """What one run of the row loop did (summed over ranks for a sharded run)."""

    computed: int  # rows computed now
    resumed_from: int  # rows already done in the partial file(s)
    loop_seconds: float  # time in the row loop (the slowest rank's)
    batch_size: int  # the batch size used (a partial file's, when resuming)
    shard: tuple[int, int] | None = None  # this rank's rows [start, stop) in a sharded run
    n: int | None = None  # rows in the finished file (one-process runs)


def batches(source: Source, tokens, start: int, stop: int, batch_size: int) -> Iterator[tuple[int, int, dict]]:
    """(i, j, features of tokens rows [i, j)) for the batches [start, start + B), … up to `stop`.

    `tokens` is an h5py dataset, an array, or any object sliced as consecutive [i, j)
    (`images.StreamedTokens`); a stream that ends early gives a short last batch and stops."""
    for i in range(start, stop, batch_size):
        j = min(i + batch_size, stop)
        rows = formats.read_dataset(tokens, slice(i, j)) if isinstance(tokens, h5py.Dataset) else tokens[i:j]
        if not len(rows):
            return
        yield i, i + len(rows), source(rows)


def fill_rows(source: Source, tokens: h5py.Dataset, out: h5py.File, start: int, stop: int, batch_size: int,
              reporter: Reporter, *, out_offset: int = 0, info: str = "",
              columns: Callable[[int, int], dict[str, np.ndarray]] | None = None) -> float:
    """Fill features rows [start, stop) of the open file `out`, then mark it complete.

    Tokens row r lands in features row r - out_offset (a part file of a sharded run
    sets out_offset = its first row). `columns(i, j)`, when given, are more row datasets
    of `out` to write for the same rows (a streamed dataset's labels and sources). After
    each batch the rows are flushed, then `attrs["n_done"]` (rows of `out` done, counted
    from its row 0), and `reporter` advances. A stream that ends before `stop` leaves
    `n_done` short (see `shrink_partial`). Returns the seconds spent in the loop.
    """
    dsets = {int(k): v for k, v in out["features"].items()}
    t0 = time.perf_counter()
    try:
        for i, j, feats in batches(source, tokens, start, stop, batch_size):
            for layer, ds in dsets.items():
                ds[i - out_offset:j - out_offset] = feats[layer].astype(ds.dtype, copy=False)
            for name, block in (columns(i, j) if columns is not None else {}).items():
                if out[name].dtype.kind == "O":  # text (sources): names that are not UTF-8 made storable
                    block = formats.storable_names(block)
                out[name][i - out_offset:j - out_offset] = block
            out.flush()  # data first …
            out.attrs["n_done"] = j - out_offset
            out.flush()  # … then the counter: n_done never runs ahead of the rows
            reporter.advance(j - i, info=info)
        seconds = time.perf_counter() - t0
        out.attrs["complete"] = True
        out.flush()
    except Exception as e:
        if isinstance(e, InputError) or not outputs.is_disk_full(e):
            raise
        raise outputs.disk_full(out.filename, hint=RESUME_HINT.format(path=out.filename)) from None
    return seconds


RESUME_HINT = "; the partial file {path} is kept: free some space and run the same command again to resume"


def close_quietly(f: h5py.File) -> None:
    """Close an HDF5 file after a failure (a second error from closing would hide the first)."""
    with contextlib.suppress(Exception):
        f.close()


def features_bytes(n: int, dims: dict[int, int], store_dtype: str) -> int:
    """Bytes a features file of n rows needs on disk: the features, labels, and room for sources/metadata."""
    return n * sum(dims.values()) * np.dtype(store_dtype).itemsize + n * (8 + 48) + (1 << 16)


def labels_and_sources(tf: h5py.File, n: int, tokens_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The first n labels and sources of a tokens file (-1 / "name[i]" where it has none)."""
    labels = np.asarray(tf["labels"][:n]) if "labels" in tf else np.full(n, -1)
    sources = (np.asarray(tf["sources"].asstr()[:n], dtype=object) if "sources" in tf
               else np.array([f"{tokens_path.name}[{i}]" for i in range(n)], dtype=object))
    return labels, sources


def create_partial(path: Path, **create_kw) -> h5py.File:
    """Start a fresh partial features file at `path` (see `formats.create_features_file` for the
    keywords); nothing is left behind if that fails."""
    path.unlink(missing_ok=True)
    try:
        of = h5py.File(path, "w", rdcc_nbytes=0)
    except OSError as e:
        if outputs.is_disk_full(e):
            raise outputs.disk_full(path) from None
        raise
    try:
        formats.create_features_file(of, **create_kw)
        of.flush()
        outputs.reserve_space(path)
    except BaseException as e:
        close_quietly(of)
        path.unlink(missing_ok=True)
        if isinstance(e, Exception) and not isinstance(e, InputError) and outputs.is_disk_full(e):
            raise outputs.disk_full(path) from None
        raise
    return of


def open_partial(path: Path, mismatch: Callable[[h5py.File], str | None]) -> h5py.File | None:
    """Reopen a partial features file for resumption; None if there is nothing usable to resume.

    `mismatch(f)` says why the file cannot be resumed by this run (None: it can); a
    file with other settings is in the way: InputError naming the difference. A
    version-1 file that matches is upgraded to the current version (its `pool` written).
    """
    if not path.exists():
        return None
    try:
        f = h5py.File(path, "r+", rdcc_nbytes=0)
    except OSError:
        return None  # killed before its first flush: nothing to keep
    try:
        attrs = formats.read_attrs(f)
        if attrs.get("format") != formats.FEATURES_FORMAT or "n_done" not in attrs or "features" not in f:
            f.close()
            return None
        why = mismatch(f)
    except Exception:
        f.close()
        return None
    if why:
        f.close()
        raise InputError(f"{path}: a partial run with different settings is in the way: {why}. "
                         "Run the original command again to resume it, or pass restart=True to discard it")
    try:
        outputs.reserve_space(path, hint=RESUME_HINT.format(path=path))  # rows still to come cannot fail for space
        if attrs.get("format_version") != formats.FEATURES_VERSION:
            f.attrs.update(format_version=formats.FEATURES_VERSION, pool=attrs["pool"])
    except BaseException:
        close_quietly(f)
        raise
    return f


def shrink_partial(f: h5py.File, path: Path, n: int, block: int = 4096) -> h5py.File:
    """The complete partial file `f` at `path` cut to its first `n` rows (a stream that held fewer
    images than announced: `skip_bad`), rewritten under `path` and reopened read-write."""
    attrs = {k: v for k, v in f.attrs.items() if k not in ("n_total", "n_done", "complete")}
    small = path.with_name(path.name + ".shrink")
    dims = {int(k): ds.shape[1] for k, ds in f["features"].items()}
    dtype = next(iter(f["features"].values())).dtype
    of = create_partial(small, dims=dims, labels=f["labels"][:n], sources=f["sources"].asstr()[:n],
                        store_dtype=str(dtype), attrs={})
    try:
        of.attrs.update(formats.storable_attrs(attrs))
        for layer, ds in of["features"].items():
            for i in range(0, n, block):
                ds[i:i + block] = f["features"][layer][i:min(i + block, n)]
        of.attrs.update(n_total=n, n_done=n, complete=True)
        of.close()
    except BaseException:
        close_quietly(of)
        small.unlink(missing_ok=True)
        raise
    f.close()
    small.replace(path)
    return h5py.File(path, "r+")


def stored_batch_size(path: Path) -> int | None:
    """The batch size a partial file at `path` was started with (None: no readable file)."""
    if not path.exists():
        return None
    try:
        with h5py.File(path, "r") as f:
            return int(f.attrs["batch_size"])
    except Exception:
        return None
