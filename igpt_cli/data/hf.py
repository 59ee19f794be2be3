"""Hugging Face `datasets` on disk, read with `pyarrow` (the optional extra ``hf``):

- ``save_to_disk`` folders: ``state.json`` + ``dataset_info.json`` + ``data-*.arrow`` (Arrow
  IPC streams, memory-mapped), and DatasetDict folders (``dataset_dict.json`` + one such
  folder per split);
- Parquet files and hub dataset snapshots: any ``*.parquet`` under the folder
  (``data/train-00000-of-00002.parquet``, ``plain_text/test-*.parquet``, ``{split}/*.parquet``),
  or Parquet / Arrow files named one by one.

Splits come from the names: a DatasetDict's split folders, else the first of the file's
name prefix (``train-00000-of-00002``), its folder, its folder's folder… that is a split
name. Columns: the image column is the one with the ``Image`` feature (``{bytes, path}``
structs; a path alone is read relative to the data file's folder), else a struct with
``bytes``, else a column named like `IMAGE_NAMES`; the label column the ``ClassLabel``
one (named like `LABEL_NAMES` first when there are several), else an integer or string
column named like `LABEL_NAMES`. Class names come from the ``ClassLabel`` feature (the
``huggingface`` schema metadata, or ``dataset_info.json``); integer labels without names
are numbered, string labels become sorted class names. `image_column` / `label_column`
override the detection.

Only the label column is read up front; images are read record batch by record batch,
in storage order (a shuffled selection too: the planned rows, in storage order).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import numpy as np

from ..choices import SPLIT_NAMES
from ..errors import ParameterError
from .base import DataError, EmptyDatasetError
from .encoded import EncodedImages, Member
from ..jsonfile import loads_bounded, read_json

IMAGE_NAMES = ("image", "img", "images", "picture", "photo", "pixel_values", "png", "jpg", "jpeg", "webp")
LABEL_NAMES = ("label", "labels", "fine_label", "fine_labels", "class", "label_id", "target", "y", "cls")
ROWS_PER_READ = 64  # rows of images per record batch read


def pyarrow():
    """The `pyarrow` module (with `parquet` and `ipc`), or a one-line DataError saying how to get it."""
    try:
        import pyarrow as pa
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DataError("reading Hugging Face datasets (Parquet/Arrow) needs pyarrow: "
                        "pip install 'igpt-cli[hf]'") from None
    return pa


def _is_data_file(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in (".parquet", ".arrow")


def _split_of(path: Path, root: Path) -> str | None:
    """The split a data file belongs to, from its name prefix or its folders up to `root`."""
    names = [re.split(r"[-_.]", path.name, maxsplit=1)[0]]
    q = path.parent
    while q != root and root in q.parents:
        names.append(q.name)
        q = q.parent
    if q == root and path.parent != root:
        names.append(root.name)
    return next((n for n in names if n in SPLIT_NAMES), None)


def _data_files(root: Path) -> list[tuple[Path, str | None]]:
    """(data file, split) of the dataset at `root` (a folder or one file)."""
    if root.is_file():
        return [(root, _split_of(root, root.parent))]
    if (root / "dataset_dict.json").is_file():
        try:
            splits = read_json(root / "dataset_dict.json", "DatasetDict index")["splits"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{root / 'dataset_dict.json'}: not a DatasetDict index ({e})") from None
        return [(f, s) for s in splits for f, _ in _data_files(root / s)]
    if (root / "state.json").is_file():
        try:
            state = read_json(root / "state.json", "save_to_disk state")
            files = [root / d["filename"] for d in state["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{root / 'state.json'}: not a save_to_disk state file ({e})") from None
        split = state.get("_split") if isinstance(state, dict) else None
        return [(f, split if split in SPLIT_NAMES else _split_of(root, root.parent)) for f in files]
    found = sorted(q for q in root.rglob("*.parquet") if not any(s.startswith(".") for s in q.relative_to(root).parts))
    if not found:
        found = sorted(q for q in root.rglob("*.arrow") if not any(s.startswith(".") for s in q.relative_to(root).parts))
    return [(q, _split_of(q, root)) for q in found]


def _claims_dir(p: Path) -> bool:
    if (p / "dataset_dict.json").is_file() or ((p / "state.json").is_file() and any(p.glob("*.arrow"))):
        return True
    return any(True for _ in p.glob("*.parquet")) or any(True for _ in p.glob("*/*.parquet")) or \
        any(True for _ in p.glob("*/*/*.parquet"))


class HFDataset(EncodedImages):
    kind = "hf"
    columns = True
    several = True

    @classmethod
    def claims(cls, path: Path, fmt: str) -> bool:
        return _is_data_file(path) or (path.is_dir() and _claims_dir(path))

    def __init__(self, path, split, size, resize, limit, skip_bad, **options):
        super().__init__(path, split, size, resize, limit, skip_bad, **options)
        self._pa = pyarrow()
        files = [fs for q in self.paths for fs in _data_files(q)]
        # a data file's name in sources and messages: relative to the dataset folder it is in
        self._names = {f: (f.relative_to(q).as_posix() if q.is_dir() else f.name)
                       for q in self.paths for f, _ in _data_files(q)}
        if not files:
            raise EmptyDatasetError(f"{self.path}: no .parquet or .arrow files found")
        self.kind = "parquet" if files[0][0].suffix.lower() == ".parquet" else "arrow"
        self.splits = sorted({s for _, s in files if s})
        self._check_split()
        self._files = [f for f, s in files if self.split == "all" or s == self.split]
        schema = self._schema(self._files[0])
        features = self._features(schema, self._files[0])
        self._image = self._image_column(schema, features)
        self._label = self._label_column(schema, features)
        labels = self._read_labels(features)  # sets class_names
        self._counts = [len(y) for y in labels]
        all_labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        if not len(all_labels):
            raise EmptyDatasetError(f"{self.path}: no rows in {'split ' + repr(self.split) if self.split != 'all' else 'this dataset'}")
        self._labels = all_labels
        self._selected: np.ndarray | None = None  # rows to read (storage order), when selecting
        if self.selecting:
            order = self._plan(all_labels)
            if self.limit is not None:
                order = order[:self.limit]  # read in storage order: the selection is fixed before reading
            self._selected = np.zeros(len(all_labels), bool)
            self._selected[order] = True
        total = len(all_labels) if self._selected is None else int(self._selected.sum())
        self.n = total if self.limit is None else min(self.limit, total)

    # -- schema and columns -------------------------------------------------------------------

    def _open(self, f: Path):
        """A pyarrow reader of `f`: ParquetFile, or an IPC stream/file reader over a memory map."""
        pa = self._pa
        try:
            if f.suffix.lower() == ".parquet":
                return pa.parquet.ParquetFile(f)
            source = pa.memory_map(str(f))
            try:
                return pa.ipc.open_stream(source)
            except pa.ArrowInvalid:
                return pa.ipc.open_file(source)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{f}: not a readable {f.suffix[1:]} file ({' '.join(str(e).split())})") from None

    def _schema(self, f: Path):
        r = self._open(f)
        return r.schema_arrow if hasattr(r, "schema_arrow") else r.schema

    def _features(self, schema, f: Path) -> dict:
        """The `datasets` features: from the schema's ``huggingface`` metadata, else ``dataset_info.json``."""
        meta = (schema.metadata or {}).get(b"huggingface")
        try:
            if meta:
                return loads_bounded(meta, f"{f}: huggingface metadata")["info"]["features"]
            info = f.parent / "dataset_info.json"
            if info.is_file():
                return read_json(info, "dataset info").get("features") or {}
        except (ValueError, KeyError, TypeError, OSError):
            pass
        return {}

    def _missing(self, param: str, name: str, schema) -> ParameterError:
        return ParameterError(param, name, f"no such column in {self.path} (columns: {', '.join(schema.names)})")

    def _image_column(self, schema, features: dict) -> str:
        pa = self._pa
        if self.image_column is not None:
            if self.image_column not in schema.names:
                raise self._missing("image_column", self.image_column, schema)
            return self.image_column
        typed = [n for n in schema.names if isinstance(features.get(n), dict) and features[n].get("_type") == "Image"]
        structs = [n for n in schema.names if pa.types.is_struct(schema.field(n).type)
                   and schema.field(n).type.get_field_index("bytes") >= 0]
        named = [n for n in IMAGE_NAMES if n in schema.names]
        for found in (typed, structs, named):
            if found:
                return found[0]
        raise DataError(f"{self.path}: cannot tell which column holds the images (columns: "
                        f"{', '.join(schema.names)}); pass image_column=NAME")

    def _label_column(self, schema, features: dict) -> str | None:
        if self.label_column is not None:
            if self.label_column not in schema.names:
                raise self._missing("label_column", self.label_column, schema)
            return self.label_column
        typed = [n for n in schema.names if isinstance(features.get(n), dict) and features[n].get("_type") == "ClassLabel"]
        if typed:
            return next((n for n in LABEL_NAMES if n in typed), typed[0])
        pa = self._pa
        return next((n for n in LABEL_NAMES if n in schema.names and (pa.types.is_integer(schema.field(n).type)
                                                                      or pa.types.is_string(schema.field(n).type))),
                    None)

    def _record_batches(self, f: Path, columns: list[str]) -> Iterator:
        """Record batches of `columns` of `f`; a file cut short or damaged is a DataError naming it."""
        pa = self._pa
        r = self._open(f)
        try:
            if hasattr(r, "iter_batches"):
                yield from r.iter_batches(batch_size=ROWS_PER_READ, columns=columns)
                return
            for b in r:
                for start in range(0, b.num_rows, ROWS_PER_READ):
                    yield b.select(columns).slice(start, ROWS_PER_READ)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{f}: truncated or corrupt {f.suffix[1:]} file ({' '.join(str(e).split())[:200]})"
                            ) from None

    def _read_labels(self, features: dict) -> list[np.ndarray]:
        """The labels of each data file (int64, -1 for none); sets `class_names`."""
        pa = self._pa
        col = self._label
        feature = features.get(col) if col else None
        if col and isinstance(feature, dict) and feature.get("_type") == "ClassLabel":
            self.class_names = [str(n) for n in feature.get("names") or []]
        raw = []
        for f in self._files:
            if col is None:
                n = sum(b.num_rows for b in self._record_batches(f, [self._image]))
                raw.append(np.full(n, -1, np.int64))
                continue
            if col not in self._schema(f).names:
                raise self._missing("label_column", col, self._schema(f))
            parts = [b.column(0) for b in self._record_batches(f, [col])]
            raw.append(pa.chunked_array(parts, type=parts[0].type if parts else pa.int64()))
        if col is None:
            return raw
        if all(pa.types.is_string(a.type) or pa.types.is_large_string(a.type) for a in raw):
            values = [a.to_pylist() for a in raw]
            self.class_names = sorted({v for vs in values for v in vs if v is not None})
            index = {c: i for i, c in enumerate(self.class_names)}
            return [np.array([index[v] if v is not None else -1 for v in vs], np.int64) for vs in values]
        if not all(pa.types.is_integer(a.type) for a in raw):
            raise DataError(f"{self.path}: label column {col!r} holds {raw[0].type}, not integers or class names; "
                            "pass label_column=NAME")
        out = [a.fill_null(-1).to_numpy().astype(np.int64) for a in raw]
        self._check_class_indices(np.concatenate(out), f"{self.path}[{col}]")
        return out

    # -- reading ------------------------------------------------------------------------------

    def _members(self) -> Iterator[Member]:
        start = 0
        for f, count in zip(self._files, self._counts):
            row = start
            for b in self._record_batches(f, [self._image]):
                values = b.column(0).to_pylist()
                for v in values:
                    if self._selected is None or self._selected[row]:
                        yield self._image_bytes(f, row - start, v) + (int(self._labels[row]),)
                    row += 1
            start += count

    def _image_bytes(self, f: Path, row: int, v) -> tuple[str, "bytes | Exception"]:
        """(name, bytes or the error reading them) of a cell: {bytes, path}, bytes or a path."""
        name = f"{self._names[f]}[{row}]"
        path = v.get("path") if isinstance(v, dict) else v if isinstance(v, str) else None
        data = v.get("bytes") if isinstance(v, dict) else v if isinstance(v, bytes) else None
        hint = f"{name}:{Path(path).name}" if path else name  # the extension helps the decoder
        if data is not None:
            return hint, self._too_big(len(data)) or data
        if path is None:
            return name, ValueError("empty image cell")
        q = Path(path) if Path(path).is_absolute() else f.parent / path
        try:
            return hint, self._too_big(q.stat().st_size) or q.read_bytes()
        except OSError as e:
            return hint, OSError(f"{q}: {e.strerror or e}")

    def _source(self, name: str) -> str:
        return name.split(":", 1)[0]

    def _where(self, name: str) -> str:
        return f"{self.path}:{name.split(':', 1)[0]}"
