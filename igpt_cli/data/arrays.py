"""NumPy arrays: uint8 images ``N×H×W×C`` or ``N×H×W`` in a ``.npy`` file, or in a
``.npz`` archive with labels from ``y``, ``labels``, ``y_train``…; ``x_train``/``x_test``
pairs give splits. A ``.npy`` is memory-mapped, so only a batch at a time is read.

Labels are -1 (unlabelled) or class indices below the number of class names (from
``class_names``…, else ``max label + 1`` numbered classes, at most `MAX_NUMBERED_CLASSES`);
anything else is refused, naming the file, key and label. Object arrays are never loaded
(no pickles).
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from ..choices import SPLIT_NAMES
from .base import Batch, DataError, Dataset, EmptyDatasetError, UnknownFormatError, array_to_rgb, resize_batch
from .tokens import TokenArrays

IMAGE_KEYS = ("x", "X", "images", "image", "imgs", "data", "arr_0")
LABEL_KEYS = ("y", "Y", "labels", "label", "targets", "target", "arr_1")
NAME_KEYS = ("class_names", "label_names", "classes")

MAX_NUMBERED_CLASSES = 100_000  # without class names, a larger label is a mistake, not a class

# (npz key or "" for a .npy, images [N, H, W(, C)], labels [N] or None, the labels' key)
Part = tuple[str, np.ndarray, "np.ndarray | None", str]


class ArrayDataset(Dataset):
    """Both ``npz`` and ``npy``: the file's content decides which (`kind`)."""

    @classmethod
    def claims(cls, path: Path, fmt: str) -> bool:
        # a 2-D integer .npy is pre-quantized tokens (`tokens.TokenArrays`), not images
        return path.is_file() and path.name.lower().endswith(f".{fmt}") and not TokenArrays.claims(path, fmt)

    def __init__(self, path, split, size, resize, limit, skip_bad, **options):
        super().__init__(path, split, size, resize, limit, skip_bad, **options)
        p = self.path
        self.kind = "npy" if p.suffix.lower() == ".npy" else "npz"
        try:
            parts = self._read_parts()
        except DataError:  # a ValueError too: already names the file
            raise
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
            raise DataError(f"{p}: not a readable {self.kind} file ({e})") from None
        self._parts = [self._checked(*part) for part in parts]
        total = sum(len(x) for _, x, _, _ in self._parts)
        if total == 0:
            raise EmptyDatasetError(f"{p}: no images (empty array)")
        self._check_labels()
        self._order: np.ndarray | None = None  # planned images: indices over the parts, concatenated
        if self.selecting:
            self._order = self._plan(np.concatenate([y if y is not None else np.full(len(x), -1, np.int64)
                                                     for _, x, y, _ in self._parts]))
            total = len(self._order)
        self.n = total if self.limit is None else min(self.limit, total)

    def _check_labels(self) -> None:
        """Labels are -1 or below the number of class names (numbered classes when there are none)."""
        named = len(self.class_names)
        top = 0
        for _, _, y, ykey in self._parts:
            if y is None or not len(y):
                continue
            where = f"{self.path}[{ykey}]"
            bad = np.flatnonzero((y < -1) | (y >= (named or MAX_NUMBERED_CLASSES)))
            if len(bad):
                i = int(bad[0])
                allowed = (f"0..{named - 1} for {named} class names" if named
                           else f"0..{MAX_NUMBERED_CLASSES - 1} without class names")
                raise DataError(f"{where}: label {int(y[i])} at index {i} is not -1 (unlabelled) or a class index "
                                f"({allowed})")
            top = max(top, int(y.max()) + 1)
        if not named and top:
            self.class_names = [str(i) for i in range(top)]

    def _read_parts(self) -> list[Part]:
        """The image arrays of the selected split (sets `kind`, `splits`, `class_names`)."""
        p = self.path
        loaded = np.load(p, mmap_mode="r", allow_pickle=False)  # a .npz ignores mmap_mode
        if isinstance(loaded, np.ndarray):
            self.kind = "npy"
            self._check_split()
            return [("", loaded, None, "")]
        self.kind = "npz"
        with loaded as z:
            keys = list(z.files)
            nk = next((k for k in NAME_KEYS if k in keys), None)
            if nk:
                self.class_names = [str(s) for s in z[nk].tolist()]
            split_keys = [s for s in SPLIT_NAMES if f"x_{s}" in keys]
            self.splits = split_keys
            self._check_split()
            if split_keys:
                return [(f"x_{s}", z[f"x_{s}"], z[f"y_{s}"] if f"y_{s}" in keys else None, f"y_{s}")
                        for s in split_keys if self.split in ("all", s)]
            xk = next((k for k in IMAGE_KEYS if k in keys), None)
            if xk is None:
                cands = [k for k in keys if z[k].dtype == np.uint8 and z[k].ndim in (3, 4)]
                if len(cands) != 1:
                    raise UnknownFormatError(f"{p}: cannot tell which array holds the images "
                                             f"(keys: {', '.join(keys)}; expected one of {', '.join(IMAGE_KEYS)})")
                xk = cands[0]
            yk = next((k for k in LABEL_KEYS if k in keys and k != xk), None)
            return [(xk, z[xk], z[yk] if yk else None, yk or "")]

    def _checked(self, key: str, x: np.ndarray, y: np.ndarray | None, ykey: str) -> Part:
        """Images as N×H×W or N×H×W×C (channel-first turned channel-last), labels as int64 [N]."""
        where = f"{self.path}[{key}]" if key else str(self.path)
        if x.dtype != np.uint8:
            raise DataError(f"{where}: images must be uint8, got {x.dtype}")
        if x.ndim == 4 and x.shape[-1] not in (1, 3, 4) and x.shape[1] in (1, 3, 4):
            x = x.transpose(0, 2, 3, 1)  # [N, C, H, W] -> [N, H, W, C]
        if not (x.ndim == 3 or (x.ndim == 4 and x.shape[-1] in (1, 3, 4))):
            raise DataError(f"{where}: images must be N×H×W or N×H×W×C (C in 1, 3, 4), got shape {x.shape}")
        if y is not None:
            y = np.asarray(y).reshape(-1)
            if len(y) != len(x):
                raise DataError(f"{where}: {len(x)} images but {len(y)} labels")
            if not np.issubdtype(y.dtype, np.integer):
                raise DataError(f"{where}: labels must be integers, got {y.dtype}")
            y = y.astype(np.int64)
        return key, x, y, ykey

    def _batches(self, batch_size: int) -> Iterator[Batch]:
        if self._order is not None:
            yield from self._planned_batches(batch_size)
            return
        for key, x, y, _ in self._parts:
            for i in range(0, len(x), batch_size):
                yield self._batch(key, x, y, np.arange(i, min(i + batch_size, len(x))))

    def _planned_batches(self, batch_size: int) -> Iterator[Batch]:
        """The planned images in their order; a batch may mix parts (x_train, x_test)."""
        starts = np.cumsum([0] + [len(x) for _, x, _, _ in self._parts])
        take = self._order if self.limit is None else self._order[:self.limit]
        for i in range(0, len(take), batch_size):
            chunk = take[i:i + batch_size]
            part = np.searchsorted(starts, chunk, side="right") - 1
            imgs = np.empty((len(chunk), self.size, self.size, 3), dtype=np.uint8)
            labels = np.empty(len(chunk), dtype=np.int64)
            sources = [""] * len(chunk)
            for j in np.unique(part):
                pos = np.flatnonzero(part == j)
                key, x, y, _ = self._parts[j]
                imgs[pos], labels[pos], src = self._batch(key, x, y, chunk[pos] - starts[j])
                for p, s in zip(pos.tolist(), src):
                    sources[p] = s
            yield imgs, labels, sources

    def _batch(self, key: str, x: np.ndarray, y: np.ndarray | None, idx: np.ndarray) -> Batch:
        """Images `idx` of one part, converted and resized, with their labels and sources."""
        tag = f"{self.path.name}[{key}]" if key else self.path.name
        order = np.argsort(idx, kind="stable")  # read a memory-mapped array front to back
        raw = np.empty((len(idx),) + x.shape[1:], dtype=np.uint8)
        raw[order] = x[idx[order]]
        b = array_to_rgb(raw)
        lab = y[idx] if y is not None else np.full(len(b), -1, dtype=np.int64)
        return resize_batch(b, self.size, self.resize), lab, [f"{tag}[{j}]" for j in idx.tolist()]
