"""CIFAR-10 / CIFAR-100 in their "python version": ``cifar-10-python.tar.gz``,
``cifar-100-python.tar.gz`` or their extracted folders, read in place.

The batches are pickles; `_ArraysOnlyUnpickler` loads exactly the numpy
reconstructors they need and refuses everything else, so a hostile file cannot run code.

Images are read batch file by batch file. With a selection (``limit``,
``limit_per_class``, ``shuffle``) the labels are read first (one extra pass); a shuffled
selection is gathered in memory (at most the whole dataset's 3 KB per image, 180 MB for
CIFAR-10) and read in the shuffled order.
"""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Iterator

import numpy as np

from ._tar import walk_tar
from .base import (TAR_SUFFIXES, Batch, DataError, Dataset, EmptyDatasetError, UnknownFormatError, is_image_name,
                   resize_batch)

CIFAR_FILES = {
    "cifar10": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"], "meta": "batches.meta",
                "labels": b"labels", "names": b"label_names"},
    "cifar100": {"train": ["train"], "test": ["test"], "meta": "meta",
                 "labels": b"fine_labels", "names": b"fine_label_names"},
}
CIFAR_DIRS = ("cifar-10-batches-py", "cifar-100-python")  # the folder each archive unpacks to
CIFAR10_MARKERS = ("batches.meta", "data_batch_1", "test_batch")


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles of dicts of lists and numpy arrays. Allow exactly the
    numpy reconstructors they need and nothing else, so a hostile file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(data: bytes, where: str) -> dict:
    try:
        d = _ArraysOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{where}: not a CIFAR pickle ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise DataError(f"{where}: not a CIFAR pickle (not a dict)")
    return d


def _looks_like_cifar_tar(p: Path) -> bool:
    """By name, or by a CIFAR batch among the first members (an image member says no)."""
    if p.name.lower().startswith(("cifar-10-python", "cifar-100-python")):
        return True
    try:
        for i, (m, _) in enumerate(walk_tar(p)):
            if os.path.basename(m.name) in CIFAR10_MARKERS or m.name.endswith("cifar-100-python/meta"):
                return True
            if is_image_name(m.name) or i > 20:
                return False
    except (DataError, OSError):
        return False
    return False


def _is_cifar_dir(p: Path) -> bool:
    if any((p / f).is_file() for f in CIFAR10_MARKERS):
        return True
    return (p / "meta").is_file() and ((p / "train").is_file() or (p / "test").is_file())


class CifarPython(Dataset):
    kind = "cifar"

    @classmethod
    def claims(cls, path: Path, fmt: str) -> bool:
        if path.is_dir():
            return _is_cifar_dir(path) or any((path / sub).is_dir() for sub in CIFAR_DIRS)
        return path.name.lower().endswith(TAR_SUFFIXES) and _looks_like_cifar_tar(path)

    def __init__(self, path, split, size, resize, limit, skip_bad, **options):
        path = Path(path)
        if path.is_dir():  # the folder holding the extracted archive
            path = next((path / sub for sub in CIFAR_DIRS if (path / sub).is_dir()), path)
        super().__init__(path, split, size, resize, limit, skip_bad, **options)
        p = self.path
        self.archive = not p.is_dir()
        if self.archive:
            members = [m.name for m, _ in walk_tar(p) if m.isfile()]
        else:
            members = [str(f.relative_to(p)).replace(os.sep, "/") for f in sorted(p.rglob("*")) if f.is_file()]
        base = {os.path.basename(m): m for m in members}
        if any(f in base for f in CIFAR10_MARKERS):
            self.variant = "cifar10"
        elif "meta" in base and ("train" in base or "test" in base):
            self.variant = "cifar100"
        else:
            raise UnknownFormatError(f"{p}: not a CIFAR-10/100 python archive (no batches.meta, data_batch_*, "
                                     "test_batch, or meta/train/test)")
        spec = CIFAR_FILES[self.variant]
        self.splits = [s for s in ("train", "test") if any(f in base for f in spec[s])]
        self._check_split()
        wanted = [s for s in ("train", "test") if self.split in ("all", s)]
        self._files = [base[f] for s in wanted for f in spec[s] if f in base]
        if not self._files:
            raise EmptyDatasetError(f"{p}: no CIFAR batches for split {self.split!r}")
        self._meta = base.get(spec["meta"])
        self._read_meta()
        self._order: np.ndarray | None = None  # the planned images (global indices over the batch files)
        if self.selecting:
            self._order = self._plan(np.concatenate([y for _, _, y in self._arrays()]))
            self.n = len(self._order) if self.limit is None else min(self.limit, len(self._order))

    def _read_bytes(self, wanted: list[str]) -> Iterator[tuple[str, bytes]]:
        """Yield (member, bytes) for the wanted members, in the given order for folders and
        in archive order for archives (one sequential pass, nothing extracted)."""
        if not self.archive:
            for m in wanted:
                try:
                    yield m, (self.path / m).read_bytes()
                except OSError as e:
                    raise DataError(f"{self._where(m)}: cannot read ({e.strerror or e})") from None
            return
        wanted = list(wanted)
        want = set(wanted)
        got = {}
        for m, data in walk_tar(self.path, want=lambda m: m.name in want):
            if data is not None:
                got[m.name] = data
                while wanted and wanted[0] in got:  # yield in requested order as soon as possible
                    k = wanted.pop(0)
                    yield k, got.pop(k)
        for k in wanted:
            if k in got:
                yield k, got.pop(k)

    def _where(self, member: str) -> str:
        return f"{self.path}:{member}" if self.archive else str(self.path / member)

    def _read_meta(self) -> None:
        spec = CIFAR_FILES[self.variant]
        if self._meta is None:
            self.class_names = [str(i) for i in range(10 if self.variant == "cifar10" else 100)]
            return
        for m, data in self._read_bytes([self._meta]):
            d = _unpickle(data, self._where(m))
            names = d.get(spec["names"])
            if not isinstance(names, (list, tuple)) or not names:
                what = "no" if names is None else "a malformed"
                raise DataError(f"{self._where(m)}: {what} {spec['names'].decode()} key (a list of class names)")
            self.class_names = [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names]

    def _arrays(self) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """(member, images uint8 [N, 3072], labels int64 [N]) of each batch file of the split, checked."""
        spec = CIFAR_FILES[self.variant]
        k = len(self.class_names)
        for m, data in self._read_bytes(list(self._files)):
            where = self._where(m)
            d = _unpickle(data, where)
            del data
            x = d.get(b"data")
            y = d.get(spec["labels"], d.get(b"labels"))
            if x is None or y is None:
                raise DataError(f"{where}: CIFAR batch lacks 'data' or labels")
            try:
                x = np.asarray(x, dtype=np.uint8)
                y = np.asarray(y, dtype=np.int64).reshape(-1)
            except (TypeError, ValueError, OverflowError) as e:
                raise DataError(f"{where}: CIFAR 'data' and labels must be uint8 and integers ({e})") from None
            if x.ndim != 2 or x.shape[1] != 3072:
                raise DataError(f"{where}: CIFAR 'data' must be N×3072 uint8, got {x.shape}")
            if len(y) != len(x):
                raise DataError(f"{where}: {len(x)} images but {len(y)} labels")
            bad = np.flatnonzero((y < 0) | (y >= k))
            if len(bad):
                raise DataError(f"{where}: label {y[bad[0]]} at index {bad[0]} is not a class index "
                                f"(0..{k - 1} for {k} class names)")
            yield m, x, y

    def _batches(self, batch_size: int) -> Iterator[Batch]:
        tag = f"{self.path.name}:" if self.archive else ""
        if self._order is not None and self.shuffle:  # gather the selection, then read it in its order
            take = self._order if self.limit is None else self._order[:self.limit]
            x_all = np.empty((len(take), 3072), dtype=np.uint8)
            y_all = np.empty(len(take), dtype=np.int64)
            sources = [""] * len(take)
            offset = 0
            for m, x, y in self._arrays():
                pos = np.flatnonzero((take >= offset) & (take < offset + len(x)))
                local = take[pos] - offset
                x_all[pos], y_all[pos] = x[local], y[local]
                for p, j in zip(pos.tolist(), local.tolist()):
                    sources[p] = f"{tag}{m}[{j}]"
                offset += len(x)
            yield from self._emit(x_all, y_all, sources, batch_size)
            return
        keep = self._order  # increasing when not shuffled
        offset = 0
        for m, x, y in self._arrays():
            idx = np.arange(len(x)) if keep is None else keep[(keep >= offset) & (keep < offset + len(x))] - offset
            offset += len(x)
            yield from self._emit(x[idx], y[idx], [f"{tag}{m}[{j}]" for j in idx.tolist()], batch_size)

    def _emit(self, x: np.ndarray, y: np.ndarray, sources: list[str], batch_size: int) -> Iterator[Batch]:
        imgs = x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # [N, 3072] -> [N, 32, 32, 3]
        for i in range(0, len(imgs), batch_size):
            b = np.ascontiguousarray(imgs[i:i + batch_size])
            yield resize_batch(b, self.size, self.resize), y[i:i + batch_size], sources[i:i + batch_size]
