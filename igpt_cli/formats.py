"""The one place where igpt's HDF5 file formats are defined.

Every igpt file describes itself: `attrs["format"]` names its kind and
`attrs["format_version"]` its schema version, counted per kind (`FORMAT_VERSIONS`);
provenance lives in attrs too. Files are written under a temporary name next to the
destination and renamed into place only when complete, under a lock
(`igpt_cli.outputs`), so a crash never leaves a half-written file at the final path.

Versions: tokens files are at version 1. Features files are at version 2, which added
the `pool` attr; version-1 features files are still read, as if they said
`pool="mean"` (`"flatten"` for the pixel baseline; `read_attrs` fills it in).
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from . import __version__
from .errors import InputError, ParameterError

TOKENS_FORMAT = "igpt-tokens"
FEATURES_FORMAT = "igpt-features"
TOKENS_VERSION = 1
FEATURES_VERSION = 2  # 2: the `pool` attr
FORMAT_VERSIONS = {TOKENS_FORMAT: TOKENS_VERSION, FEATURES_FORMAT: FEATURES_VERSION}

STR_DTYPE = h5py.string_dtype("utf-8")
ROW_CHUNK = 256  # rows per HDF5 chunk for row-streamed datasets


class FormatError(InputError):
    """A file that is not the igpt file it should be."""


def _attr(v):
    return v.decode() if isinstance(v, bytes) else v


def read_attrs(f: h5py.File) -> dict:
    """The file's attrs as plain Python values; a version-1 features file gets its implied `pool`."""
    out = {}
    for k, v in f.attrs.items():
        v = _attr(v)
        if isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    if out.get("format") == FEATURES_FORMAT and "pool" not in out:
        out["pool"] = implied_pool(out.get("site"))
    return out


def open_igpt(path: str | Path, expected: str | None = None) -> h5py.File:
    """Open an igpt HDF5 file read-only, checking its kind."""
    p = Path(path)
    if not p.exists():
        raise FormatError(f"{p}: no such file")
    try:
        f = h5py.File(p, "r")
    except OSError:
        raise FormatError(f"{p}: not an HDF5 file") from None
    kind = _attr(f.attrs.get("format"))
    if kind not in (TOKENS_FORMAT, FEATURES_FORMAT) or (expected and kind != expected):
        f.close()
        want = expected or f"{TOKENS_FORMAT} or {FEATURES_FORMAT}"
        raise FormatError(f"{p}: not an {want} file (format={kind!r})")
    version, readable = int(f.attrs.get("format_version", -1)), FORMAT_VERSIONS[kind]
    if version > readable:
        f.close()
        raise FormatError(f"{p}: format_version {version} is newer than this igpt reads ({readable})")
    return f




# ---------------------------------------------------------------------------
# Tokens file
# ---------------------------------------------------------------------------
# tokens   uint16 [N, H*W]  palette indices in raster order, chunked by rows
# labels   int64  [N]       class index, -1 where unknown
# palette  float32 [K, 3]   RGB centres in [-1, 1]
# sources  utf-8 [N]        file name, "archive:member" or "name[index]"
# attrs: format, format_version, height, width, class_names (JSON), split,
#        source, resize, igpt_version


def create_tokens_file(
    f: h5py.File,
    *,
    height: int,
    width: int,
    palette: np.ndarray,
    class_names: list[str],
    split: str,
    source: str,
    resize: str,
) -> None:
    """Lay out an empty tokens file; rows are added with `append_rows`."""
    n_pos = height * width
    f.create_dataset("tokens", shape=(0, n_pos), maxshape=(None, n_pos), dtype="uint16",
                     chunks=(ROW_CHUNK, n_pos))
    f.create_dataset("labels", shape=(0,), maxshape=(None,), dtype="int64", chunks=(4096,))
    f.create_dataset("sources", shape=(0,), maxshape=(None,), dtype=STR_DTYPE, chunks=(4096,))
    f.create_dataset("palette", data=np.asarray(palette, dtype=np.float32))
    f.attrs.update(
        format=TOKENS_FORMAT,
        format_version=TOKENS_VERSION,
        height=height,
        width=width,
        class_names=json.dumps(list(class_names)),
        split=split,
        source=str(source),
        resize=resize,
        igpt_version=__version__,
    )


def append_rows(f: h5py.File, **columns: np.ndarray) -> int:
    """Append equally long row blocks to the named row datasets; returns the new row count."""
    n = f[next(iter(columns))].shape[0]
    k = len(next(iter(columns.values())))
    for name, block in columns.items():
        ds = f[name]
        ds.resize(n + k, axis=0)
        ds[n:n + k] = block
    return n + k


def class_names(f: h5py.File) -> list[str]:
    return json.loads(_attr(f.attrs.get("class_names", "[]")))


# ---------------------------------------------------------------------------
# Features file
# ---------------------------------------------------------------------------
# features/<l>  float32 (or float16) [N, D] per requested layer, chunked by rows
# labels        int64 [N], sources utf-8 [N]   (copied from the tokens file)
# attrs: format, format_version, layers (JSON list), site, sos, pool, compute_dtype,
#        store_dtype, device_type, batch_size, model, model_config (JSON), model_sha256,
#        tokens_file, tokens_sha256, class_names (JSON), height, width, n_total, n_done,
#        complete, igpt_version
# pool: "mean" (iGPT features averaged over positions), or "flatten" for the raw-pixel
# baseline (site "pixels"), whose features are the whole image; version 1 had no pool.


def feature_layers(f: h5py.File) -> list[int]:
    return [int(k) for k in sorted(f["features"].keys(), key=int)]


def implied_pool(site: str | None) -> str:
    """The `pool` of a version-1 features file, which did not record one."""
    return "flatten" if site == "pixels" else "mean"


# Attributes that pin down what a features file holds: a partial file is resumed
# only when all of them match the new run (anything else would mix two results).
FEATURES_IDENTITY = ("layers", "site", "sos", "pool", "compute_dtype", "store_dtype", "device_type",
                     "batch_size", "model_sha256", "model_config", "tokens_sha256", "n_total")


def _chunked_preallocated(group: h5py.Group, name: str, shape: tuple[int, int], dtype, chunk_rows: int):
    """A row-chunked dataset whose chunks are all allocated at creation and never filled.

    Later row writes then touch raw data only, never HDF5 metadata (no chunk-index
    updates between flushes), so a process killed mid-write leaves a file that still
    opens at its last flushed state. Rows not yet written hold garbage, hence `n_done`.
    """
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_chunk((max(1, min(chunk_rows, shape[0])), shape[1]))
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    space = h5py.h5s.create_simple(shape)
    tid = h5py.h5t.py_create(np.dtype(dtype))
    h5py.h5d.create(group.id, name.encode(), tid, space, dcpl=dcpl)
    return group[name]


def create_features_file(
    f: h5py.File,
    *,
    dims: dict[int, int],
    labels: np.ndarray,
    sources: np.ndarray,
    store_dtype: str,
    attrs: dict,
) -> None:
    """Lay out an empty features file of `len(labels)` rows; `attrs` must hold the identity keys."""
    n = len(labels)
    g = f.create_group("features")
    for layer, d in sorted(dims.items()):
        _chunked_preallocated(g, str(layer), (n, d), store_dtype, ROW_CHUNK)
    f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
    f.create_dataset("sources", data=np.asarray(sources, dtype=object), dtype=STR_DTYPE)
    f.attrs.update(format=FEATURES_FORMAT, format_version=FEATURES_VERSION, igpt_version=__version__)
    f.attrs.update({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in attrs.items()})
    f.attrs.update(n_total=n, n_done=0, complete=False)


def features_mismatch(f: h5py.File, expected: dict) -> str | None:
    """Why the partial features file `f` cannot be resumed by a run with `expected` attrs (None: it can)."""
    have = read_attrs(f)
    if have.get("format") != FEATURES_FORMAT:
        return f"not an {FEATURES_FORMAT} file"
    for key in FEATURES_IDENTITY:
        want = expected.get(key)
        want = json.dumps(want) if isinstance(want, (list, dict)) else want
        if have.get(key) != want:
            old = str(have.get(key))
            old = old if len(old) < 60 else old[:57] + "…"
            new = str(want) if len(str(want)) < 60 else str(want)[:57] + "…"
            return f"{key} differs (partial file: {old}, this run: {new})"
    return None


def check_complete_features(f: h5py.File, path: Path) -> dict:
    """The attrs of an open features file that is complete and has features and labels (else FormatError)."""
    attrs = read_attrs(f)
    if not attrs.get("complete", False):
        raise FormatError(f"{path}: incomplete features file ({attrs.get('n_done', '?')}/"
                          f"{attrs.get('n_total', '?')} rows); finish it with igpt extract first")
    if "features" not in f or not len(f["features"]) or "labels" not in f:
        raise FormatError(f"{path}: features file without features/ or labels")
    return attrs


def load_features(path: str | Path, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """One layer of a complete features file (version 1 or 2) in memory: X [N, D] float32, labels [N] int64.

    Labels are -1 where the tokens file had none.
    """
    p = Path(path)
    with open_igpt(p, FEATURES_FORMAT) as f:
        check_complete_features(f, p)
        layers = feature_layers(f)
        if int(layer) not in layers:
            raise ParameterError("layer", layer, f"not in {p}, which holds layers "
                                                 f"{', '.join(map(str, layers)) or '(none)'}")
        X = np.asarray(f["features"][str(int(layer))][:], dtype=np.float32)  # [N, D]
        labels = np.asarray(f["labels"][:], dtype=np.int64)  # [N]
    return X, labels
