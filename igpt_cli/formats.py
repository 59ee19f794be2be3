"""The one place where igpt's HDF5 file formats are defined.

Every igpt file describes itself: `attrs["format"]` names its kind and
`attrs["format_version"]` its schema version, counted per kind (`FORMAT_VERSIONS`);
provenance lives in attrs too. Files are written under a temporary name next to the
destination and renamed into place only when complete, under a lock
(`igpt_cli.outputs`), so a crash never leaves a half-written file at the final path.

Versions: tokens files are at version 1. Features files are at version 2, which added
the `pool` attr; version-1 features files are still read, as if they said
`pool="mean"` (`"flatten"` for the pixel baseline; `read_attrs` fills it in).

The module is long (about 450 lines) on purpose: it is the one place every file kind's
layout, attrs and checks are written down, side by side.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import h5py
import numpy as np

from . import __version__, outputs
from .errors import InputError, ParameterError
from .jsonfile import loads_bounded
from .provenance import provenance

TOKENS_FORMAT = "igpt-tokens"
FEATURES_FORMAT = "igpt-features"
TOKENS_VERSION = 1
FEATURES_VERSION = 2  # 2: the `pool` attr
# written by `igpt_cli.probe.store` (the probe's classifiers and their predictions)
PROBES_FORMAT, PROBES_VERSION = "igpt-probes", 2
SWEEP_FORMAT, SWEEP_VERSION = "igpt-sweep", 1  # sweep.json (JSON, not HDF5); a checkpoint's result.json: "-checkpoint"
PREDICTIONS_FORMAT, PREDICTIONS_VERSION = "igpt-predictions", 1
FORMAT_VERSIONS = {TOKENS_FORMAT: TOKENS_VERSION, FEATURES_FORMAT: FEATURES_VERSION, PROBES_FORMAT: PROBES_VERSION,
                   PREDICTIONS_FORMAT: PREDICTIONS_VERSION}

STR_DTYPE = h5py.string_dtype("utf-8")
ROW_CHUNK = 256  # rows per HDF5 chunk for row-streamed datasets (fewer for very wide rows)
CHUNK_BYTES = 4 << 20  # at most this much per chunk: 256 rows of 1024x1024 uint16 tokens would be 512 MiB


def chunk_rows(row_bytes: int) -> int:
    """Rows per HDF5 chunk: ROW_CHUNK, or fewer so that one chunk stays within CHUNK_BYTES."""
    return max(1, min(ROW_CHUNK, CHUNK_BYTES // max(1, row_bytes)))


class FormatError(InputError):
    """A file that is not the igpt file it should be."""


def storable_text(s):
    """`s` as HDF5 can store it (UTF-8), other values unchanged. A name read from the file system or
    typed on the command line may hold bytes that are not UTF-8 (Python keeps each as a lone
    surrogate, `surrogateescape`); they are stored as the four characters `\\xNN`, never a crash."""
    if not isinstance(s, str):
        return s
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        try:
            return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a surrogate that no file system byte stands for
            return s.encode("utf-8", "backslashreplace").decode("utf-8")


def storable_attrs(attrs: dict) -> dict:
    """`attrs` with every text value made storable (`storable_text`): what `h5py` attrs receive."""
    return {k: storable_text(v) for k, v in attrs.items()}


def storable_names(names) -> np.ndarray:
    """A 1-D object array of names (`sources`) made storable (`storable_text`)."""
    arr = np.asarray(names, dtype=object)
    try:
        "\n".join(arr.tolist()).encode("utf-8")  # the common case: all of them are UTF-8 already
        return arr
    except (UnicodeEncodeError, TypeError):
        return np.array([storable_text(s) for s in arr.tolist()], dtype=object)


MAX_COMMAND = 4000  # characters of the command line kept in a file (a shell glob can expand to megabytes)


def stamp_provenance(f: h5py.File, device: str | None = None) -> None:
    """Write `igpt_cli.provenance` attrs (command line, versions, device name, created_utc) into `f`.

    `device` None: the GPU this process has initialised, if any, else the CPU."""
    attrs = {k: v if isinstance(v, int) else str(v)  # TorchVersion: a str
             for k, v in provenance(device=device or _device_in_use()).items()}
    if len(attrs["command"]) > MAX_COMMAND:
        attrs["command"] = attrs["command"][:MAX_COMMAND] + f" … ({len(attrs['command'])} characters)"
    f.attrs.update(storable_attrs(attrs))


def _device_in_use() -> str | None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return f"cuda:{torch.cuda.current_device()}"
    return None


def _attr(v):
    return v.decode() if isinstance(v, bytes) else v


def read_attrs(f: h5py.File) -> dict:
    """The file's attrs as plain Python values; a version-1 features file gets its implied `pool`."""
    out = {}
    for k, v in f.attrs.items():
        v = _attr(v)
        if isinstance(v, np.generic):
            v = v.item()
        elif isinstance(v, np.ndarray):  # array attrs (not written by igpt) as lists: comparable, JSON-able
            v = [_attr(x) for x in v.tolist()] if v.ndim == 1 else v.tolist()
        out[k] = v
    if out.get("format") == FEATURES_FORMAT and "pool" not in out:
        out["pool"] = implied_pool(out.get("site"))
    return out


def open_igpt(path: str | Path, expected: str | None = None) -> h5py.File:
    """Open an igpt HDF5 file read-only, checking its kind and version.

    Refuses (FormatError, one line) a missing file, one another igpt run is still
    writing (its output lock is held), a file HDF5 cannot open (not HDF5, truncated), and
    a file whose `format` / `format_version` attrs are not an igpt kind and version.
    """
    p = Path(path)
    writer = outputs.writer_of(p)
    if writer is not None:
        raise FormatError(f"{p}: another igpt run is writing this file ({writer}); wait for it to finish")
    if not p.exists():
        raise FormatError(f"{p}: no such file")
    if p.is_dir():
        raise FormatError(f"{p}: is a directory, not an HDF5 file")
    try:
        f = h5py.File(p, "r")
    except OSError as e:
        why = h5_reason(e)
        if "truncated" in why:
            raise FormatError(f"{p}: truncated HDF5 file ({why})") from None
        raise FormatError(f"{p}: not an HDF5 file" + (f" ({why})" if why and "signature" not in why else "")) \
            from None
    try:
        kind = _attr(f.attrs.get("format"))
        if not isinstance(kind, str) or kind not in FORMAT_VERSIONS or (expected and kind != expected):
            want = expected or f"{TOKENS_FORMAT} or {FEATURES_FORMAT}"
            raise FormatError(f"{p}: not an {want} file (format={kind!r})")
        version, readable = _int_attr(f, "format_version", p), FORMAT_VERSIONS[kind]
        if version > readable:
            raise FormatError(f"{p}: format_version {version} is newer than this igpt reads ({readable})")
    except BaseException:
        f.close()
        raise
    return f


def h5_reason(e: BaseException) -> str:
    """The useful part of an h5py error message (its first line, without the call site)."""
    text = " ".join(str(e).split())
    if "(" in text and text.endswith(")"):
        text = text[text.index("(") + 1:-1]
    return text[:200]


def read_dataset(ds: h5py.Dataset, index=slice(None), path: str | Path | None = None) -> np.ndarray:
    """`ds[index]`, with an HDF5 read error (a damaged file) as one FormatError naming the file and dataset."""
    try:
        return ds[index]
    except OSError as e:
        where = path if path is not None else ds.file.filename
        raise FormatError(f"{where}: cannot read {ds.name.lstrip('/')} (damaged or truncated file: "
                          f"{h5_reason(e)})") from None


def _int_attr(f: h5py.File, key: str, path: Path, *, minimum: int | None = None) -> int:
    """An integer attr (numpy and Python ints; not bools, floats or strings), else FormatError."""
    v = _attr(f.attrs.get(key))
    if isinstance(v, np.ndarray) and v.shape == ():
        v = v.item()
    if isinstance(v, np.generic):
        v = v.item()
    if not isinstance(v, int) or isinstance(v, bool):
        what = "missing" if v is None else f"{v!r} is not an integer"
        raise FormatError(f"{path}: attr {key} {what}")
    if minimum is not None and v < minimum:
        raise FormatError(f"{path}: attr {key}={v} must be at least {minimum}")
    return v


def json_attr(f: h5py.File, key: str, path: str | Path | None = None, *, kind: type | None = None, default=None):
    """A JSON-text attr decoded (`default` when absent); FormatError naming the file and attr when
    it is not JSON, or (with `kind`) not of that type."""
    where = path if path is not None else f.filename
    v = _attr(f.attrs.get(key))
    if v is None:
        return default
    if not isinstance(v, str):
        raise FormatError(f"{where}: attr {key} is not JSON text ({type(v).__name__})")
    try:
        d = loads_bounded(v, f"{where}: attr {key}")
    except ValueError:
        short = v if len(v) < 40 else v[:37] + "…"
        raise FormatError(f"{where}: attr {key} is not valid JSON ({short!r})") from None
    if kind is not None and not isinstance(d, kind):
        raise FormatError(f"{where}: attr {key} must be a JSON {kind.__name__}, not {type(d).__name__}")
    return d


# ---------------------------------------------------------------------------
# Tokens file
# ---------------------------------------------------------------------------
# tokens   uint16 [N, H*W]  palette indices in raster order, chunked by rows
# labels   int64  [N]       class index, -1 where unknown
# palette  float32 [K, 3]   RGB centres in [-1, 1]
# sources  utf-8 [N]        file name, "archive:member" or "name[index]"
# attrs: format, format_version, height, width, class_names (JSON), split,
#        source, resize, igpt_version, and provenance (`provenance.PROVENANCE_KEYS`)


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
    device: str | None = None,
) -> None:
    """Lay out an empty tokens file; rows are added with `append_rows`. Provenance attrs are
    written too (`stamp_provenance`, `device`: the compute device that made the tokens)."""
    n_pos = height * width
    f.create_dataset("tokens", shape=(0, n_pos), maxshape=(None, n_pos), dtype="uint16",
                     chunks=(chunk_rows(2 * n_pos), n_pos))
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
        source=storable_text(str(source)),
        resize=resize,
        igpt_version=__version__,
    )
    stamp_provenance(f, device)


def append_rows(f: h5py.File, **columns: np.ndarray) -> int:
    """Append equally long row blocks to the named row datasets; returns the new row count."""
    n = f[next(iter(columns))].shape[0]
    k = len(next(iter(columns.values())))
    for name, block in columns.items():
        ds = f[name]
        if ds.dtype.kind == "O":  # text (sources)
            block = storable_names(block)
        ds.resize(n + k, axis=0)
        ds[n:n + k] = block
    return n + k


def class_names(f: h5py.File, path: str | Path | None = None) -> list[str]:
    """The file's class names ([] when it has none); FormatError when the attr is malformed."""
    names = json_attr(f, "class_names", path, kind=list, default=[])
    if not all(isinstance(n, str) for n in names):
        raise FormatError(f"{path if path is not None else f.filename}: attr class_names must be a JSON list "
                          "of strings")
    return names


def tokens_layout(f: h5py.File, path: str | Path) -> tuple[h5py.Dataset, int, int, np.ndarray]:
    """tokens [N, H*W], height, width, palette [K, 3] of an open tokens file, after checking its
    layout (FormatError naming the file and what is wrong)."""
    missing = [k for k in ("tokens", "palette") if not isinstance(f.get(k), h5py.Dataset)]
    missing += [a for a in ("height", "width") if a not in f.attrs]
    if missing:
        raise FormatError(f"{path}: tokens file lacks {', '.join(missing)}")
    h, w = _int_attr(f, "height", Path(path), minimum=1), _int_attr(f, "width", Path(path), minimum=1)
    tok = f["tokens"]
    if tok.ndim != 2 or tok.dtype.kind not in "ui":
        raise FormatError(f"{path}: tokens must be a 2-D integer array [N, height*width], "
                          f"not {tok.dtype} {list(tok.shape)}")
    if tok.shape[1] != h * w:
        raise FormatError(f"{path}: tokens rows have {tok.shape[1]} values but height x width is {h}x{w} = {h * w}")
    pal = f["palette"]
    if pal.ndim != 2 or pal.shape[1] != 3 or pal.shape[0] < 1 or pal.dtype.kind != "f":
        raise FormatError(f"{path}: palette must be a float array [K, 3], not {pal.dtype} {list(pal.shape)}")
    palette = np.asarray(pal, dtype=np.float32)
    if not np.isfinite(palette).all():
        raise FormatError(f"{path}: palette holds NaN or infinite values")
    for k in ("labels", "sources"):
        if k in f and (not isinstance(f[k], h5py.Dataset) or f[k].shape[:1] != tok.shape[:1] or f[k].ndim != 1):
            raise FormatError(f"{path}: {k} must be a 1-D array of {tok.shape[0]} rows like tokens")
    if "labels" in f and f["labels"].dtype.kind not in "ui":
        raise FormatError(f"{path}: labels must be integers, not {f['labels'].dtype}")
    return tok, h, w, palette


# ---------------------------------------------------------------------------
# Features file
# ---------------------------------------------------------------------------
# features/<l>  float32 (or float16) [N, D] per requested layer, chunked by rows;
#               pool "none": the token maps [N, T, D] (float16 by default), one image per chunk
# labels        int64 [N], sources utf-8 [N]   (copied from the tokens file)
# attrs: format, format_version, layers (JSON list), site, sos, pool, compute_dtype,
#        store_dtype, device_type, batch_size, model, model_config (JSON), model_sha256,
#        tokens_file, tokens_sha256, class_names (JSON), height, width, n_total, n_done,
#        complete, igpt_version, and provenance (`provenance.PROVENANCE_KEYS`)
# pool: "mean" (iGPT features averaged over positions), "max" (their maximum over positions),
# "none" (token maps: every position kept), or "flatten" for the raw-pixel baseline (site
# "pixels"), whose features are the whole image; version 1 had no pool.
TOKEN_MAPS_POOL = "none"


def feature_layers(f: h5py.File) -> list[int]:
    """The layers of a features file: the integer names of `features/` (FormatError otherwise)."""
    keys = list(f["features"].keys())
    bad = [k for k in keys if not (k.isdigit() or (k.startswith("-") and k[1:].isdigit()))]
    if bad:
        raise FormatError(f"{f.filename}: features/{bad[0]} is not a layer number")
    return sorted(int(k) for k in keys)


def implied_pool(site: str | None) -> str:
    """The `pool` of a version-1 features file, which did not record one."""
    return "flatten" if site == "pixels" else "mean"


def is_token_maps(attrs: dict) -> bool:
    """Whether a features file (its `read_attrs`) holds token maps [N, T, D] rather than vectors [N, D]."""
    return attrs.get("pool") == TOKEN_MAPS_POOL


def features_bytes(n: int, dims: dict[int, int], store_dtype: str, positions: int | None = None) -> int:
    """Bytes a features file of n rows needs on disk: the features (`positions` per row for token
    maps), labels, and room for sources/metadata."""
    per_row = sum(dims.values()) * (positions or 1) * np.dtype(store_dtype).itemsize
    return n * (per_row + 8 + 48) + (1 << 16)


def _chunked_preallocated(group: h5py.Group, name: str, shape: tuple[int, ...], dtype, chunk_rows: int):
    """A row-chunked dataset whose chunks are all allocated at creation and never filled.

    Later row writes then touch raw data only, never HDF5 metadata (no chunk-index
    updates between flushes), so a process killed mid-write leaves a file that still
    opens at its last flushed state. Rows not yet written hold garbage, hence `n_done`.
    """
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_chunk((max(1, min(chunk_rows, shape[0])), *shape[1:]))
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
    device: str | None = None,
    positions: int | None = None,
) -> None:
    """Lay out an empty features file of `len(labels)` rows; `attrs` must hold the identity keys.
    `positions`: token maps [N, positions, D] per layer, one image per chunk (None: vectors [N, D]).
    Provenance attrs are written too (`stamp_provenance`)."""
    n = len(labels)
    g = f.create_group("features")
    for layer, d in sorted(dims.items()):
        if positions:
            _chunked_preallocated(g, str(layer), (n, positions, d), store_dtype, 1)
        else:
            _chunked_preallocated(g, str(layer), (n, d), store_dtype, chunk_rows(d * np.dtype(store_dtype).itemsize))
    f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
    f.create_dataset("sources", data=storable_names(sources), dtype=STR_DTYPE)
    f.attrs.update(format=FEATURES_FORMAT, format_version=FEATURES_VERSION, igpt_version=__version__)
    f.attrs.update(storable_attrs({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in attrs.items()}))
    f.attrs.update(n_total=n, n_done=0, complete=False)
    stamp_provenance(f, device)


def identity_mismatch(have: dict, identity: dict) -> str | None:
    """Why a partial file with attrs `have` (`read_attrs`) cannot be resumed by a run with `identity`
    (None: it can). Lists and dicts compare as the JSON they are stored as; an absent key matches
    only an absent (None) one. The one identity check of every resumable stage (`igpt_cli.stage`)."""
    for key, want in identity.items():
        want = storable_text(json.dumps(want) if isinstance(want, (list, dict, tuple)) else want)
        if have.get(key) != want:
            old = str(have.get(key))
            old = old if len(old) < 60 else old[:57] + "…"
            new = str(want) if len(str(want)) < 60 else str(want)[:57] + "…"
            return f"{key} differs (partial file: {old}, this run: {new})"
    return None


def upgrade_in_place(f: h5py.File, attrs: dict) -> None:
    """Bring a partial file an older igpt started (that matches this run) to the current version of
    its kind: write the attrs it lacked (a version-1 features file: `pool`) and the version."""
    kind = _attr(f.attrs.get("format"))
    f.attrs.update({k: v for k, v in attrs.items() if k not in f.attrs})
    if kind in FORMAT_VERSIONS:
        f.attrs["format_version"] = FORMAT_VERSIONS[kind]


def labels_and_sources(f: h5py.File, n: int, path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The first n labels and sources of an open tokens file (-1 / "name[i]" where it has none)."""
    labels = np.asarray(f["labels"][:n]) if "labels" in f else np.full(n, -1)
    sources = (np.asarray(f["sources"].asstr()[:n], dtype=object) if "sources" in f
               else np.array([f"{Path(path).name}[{i}]" for i in range(n)], dtype=object))
    return labels, sources


def check_complete_features(f: h5py.File, path: Path, *, token_maps: bool = False) -> dict:
    """The attrs of an open features file that is complete and has features and labels (else FormatError).

    A file of token maps (pool "none") is refused unless `token_maps`: readers of one vector per
    image (the probe, predict) get one line saying how to get vectors."""
    attrs = read_attrs(f)
    maps = is_token_maps(attrs)
    if maps and not token_maps:
        raise FormatError(f"{path}: holds token maps (pool none: [N, T, D] per layer), not one vector per image; "
                          "pool them yourself (igpt_cli.load_features gives the maps) or extract with --pool mean")
    if not attrs.get("complete", False):
        raise FormatError(f"{path}: incomplete features file ({attrs.get('n_done', '?')}/"
                          f"{attrs.get('n_total', '?')} rows); finish it with igpt extract first")
    if not isinstance(f.get("features"), h5py.Group) or not len(f["features"]) or \
            not isinstance(f.get("labels"), h5py.Dataset):
        raise FormatError(f"{path}: features file without features/ or labels")
    labels = f["labels"]
    if labels.ndim != 1 or labels.dtype.kind not in "ui":
        raise FormatError(f"{path}: labels must be a 1-D integer array, not {labels.dtype} {list(labels.shape)}")
    for layer in feature_layers(f):
        ds = f["features"][str(layer)]
        ndim = 3 if maps else 2
        if not isinstance(ds, h5py.Dataset) or ds.ndim != ndim or ds.dtype.kind != "f":
            raise FormatError(f"{path}: features/{layer} is not a {ndim}-D float array"
                              + (" (pool none: token maps [N, T, D])" if maps else ""))
        if ds.shape[0] != labels.shape[0]:
            raise FormatError(f"{path}: features/{layer} has {ds.shape[0]} rows but labels has {labels.shape[0]}")
    return attrs


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file's bytes (the provenance of weights and tokens files)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def check_token_values(tokens, palette_size: int, path: str | Path, n: int | None = None) -> None:
    """Every token of the first `n` rows (an h5py dataset or an array [N, T]) lies in 0..palette_size-1.

    Read in blocks of about 16 M tokens; the error names the file, the row and the value."""
    n = len(tokens) if n is None else n
    step = max(1, (1 << 24) // max(1, tokens.shape[1]))
    for i in range(0, n, step):
        block = np.asarray(read_dataset(tokens, slice(i, min(i + step, n)), path) if isinstance(tokens, h5py.Dataset)
                           else tokens[i:min(i + step, n)])
        if block.size and (int(block.min()) < 0 or int(block.max()) >= palette_size):
            bad = (block < 0) | (block >= palette_size)
            row = int(np.argwhere(bad.any(axis=1))[0][0])
            value = int(block[row][bad[row]][0])
            raise InputError(f"{path}: token value {value} at row {i + row} is not in 0..{palette_size - 1} "
                             f"(the palette has {palette_size} colours)")


def load_features(path: str | Path, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """One layer of a complete features file (version 1 or 2) in memory: X [N, D] float32, labels [N] int64.

    A file of token maps (pool "none") gives X [N, T, D] float32, to pool as one likes.
    Labels are -1 where the tokens file had none.
    """
    p = Path(path)
    with open_igpt(p, FEATURES_FORMAT) as f:
        check_complete_features(f, p, token_maps=True)
        layers = feature_layers(f)
        if int(layer) not in layers:
            raise ParameterError("layer", layer, f"not in {p}, which holds layers "
                                                 f"{', '.join(map(str, layers)) or '(none)'}")
        X = np.asarray(f["features"][str(int(layer))][:], dtype=np.float32)  # [N, D] (token maps: [N, T, D])
        labels = np.asarray(f["labels"][:], dtype=np.int64)  # [N]
    return X, labels


# ---------------------------------------------------------------------------
# Scores file (`igpt score`): per-image negative log-likelihood under a model
# ---------------------------------------------------------------------------
# nats_per_token  float64 [N]  mean cross-entropy of image i's tokens (SOS-shifted input), nats
# bits_per_token  float64 [N]  the same in bits (nats / ln 2)
# labels int64 [N], sources utf-8 [N]   copied from the tokens file
# attrs: format, format_version, model, model_sha256, model_config (JSON), tokens_file,
#        tokens_sha256, class_names (JSON), height, width, compute_dtype, device_type,
#        batch_size, n_total, n_done, complete, igpt_version, and provenance
SCORES_FORMAT = "igpt-scores"
SCORES_VERSION = 1
FORMAT_VERSIONS[SCORES_FORMAT] = SCORES_VERSION


def create_scores_file(f: h5py.File, *, labels: np.ndarray, sources: np.ndarray, device: str | None = None) -> None:
    """Lay out a scores file of `len(labels)` rows (scores NaN until computed), with provenance attrs."""
    n = len(labels)
    for name in ("nats_per_token", "bits_per_token"):
        f.create_dataset(name, data=np.full(n, np.nan))
    f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
    f.create_dataset("sources", data=storable_names(sources), dtype=STR_DTYPE)
    f.attrs.update(format=SCORES_FORMAT, format_version=SCORES_VERSION, igpt_version=__version__)
    stamp_provenance(f, device)
