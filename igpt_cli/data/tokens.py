"""OpenAI's pre-quantized datasets, as ``download.py`` of openai/image-gpt fetches them:
``{cifar10,imagenet}_{trX,vaX,teX}.npy`` hold palette tokens (integers below 512, [N, T]
with T = side², raster order) and ``…_{trY,vaY,teY}.npy`` beside them one-hot labels
[N, C]. The tokens are indices into the official 512-colour palette
(`igpt_cli.palette.DEFAULT_PALETTE`, the release's ``kmeans_centers.npy``).

`token_batches` yields the tokens themselves (`igpt quantize` copies them without
re-quantizing); `batches` yields them as images (each token its palette colour), so any
stage that reads images reads these too. Both are memory-mapped and checked chunk by
chunk (a token ≥ 512 is an error naming the row). ``trX`` is the ``train`` split,
``vaX`` ``validation``, ``teX`` ``test``. Class names: CIFAR-10's ten names for a
``cifar10_…`` file with 10 classes, else the indices as strings.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from ..palette import DEFAULT_PALETTE
from .base import Batch, DataError, Dataset, EmptyDatasetError, resize_batch

N_TOKENS = 512
SPLITS = {"tr": "train", "va": "validation", "te": "test"}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_NAME = re.compile(r"^(.*)_(tr|va|te)X\.npy$", re.IGNORECASE)


def _header(path: Path) -> tuple[tuple, np.dtype] | None:
    """(shape, dtype) of a .npy file from its header alone, or None when unreadable."""
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
        return shape, dtype
    except (OSError, ValueError):
        return None


def _token_shape(shape: tuple, dtype: np.dtype) -> bool:
    """A 2-D integer array whose rows are square images."""
    return (len(shape) == 2 and np.issubdtype(dtype, np.integer) and shape[1] > 0
            and math.isqrt(shape[1]) ** 2 == shape[1])


class TokenArrays(Dataset):
    kind = "openai-tokens"

    @classmethod
    def claims(cls, path: Path, fmt: str) -> bool:
        head = path.is_file() and path.suffix.lower() == ".npy" and _header(path)
        return bool(head) and _token_shape(*head)

    def __init__(self, path, split, size, resize, limit, skip_bad, **options):
        super().__init__(path, split, size, resize, limit, skip_bad, **options)
        p = self.path
        try:
            self._x = np.load(p, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{p}: not a readable .npy file ({e})") from None
        if not _token_shape(self._x.shape, self._x.dtype):
            raise DataError(f"{p}: pre-quantized tokens must be integers [N, T] with T a square (side×side), "
                            f"got {self._x.dtype} {self._x.shape}")
        self.side = math.isqrt(self._x.shape[1])
        m = _NAME.match(p.name)
        self.splits = [SPLITS[m.group(2).lower()]] if m else []
        self._check_split()
        self.palette = np.load(DEFAULT_PALETTE)
        self._y = self._labels(m)
        if len(self._x) == 0:
            raise EmptyDatasetError(f"{p}: no rows")
        self._order = self._plan(self._y) if self.selecting else None
        total = len(self._x) if self._order is None else len(self._order)
        self.n = total if self.limit is None else min(self.limit, total)

    def _labels(self, m: re.Match | None) -> np.ndarray:
        """Class indices from the one-hot ``…Y.npy`` beside the tokens (-1 without one)."""
        n = len(self._x)
        ypath = self.path.with_name(self.path.name[:-5] + ("Y" if self.path.name[-5] == "X" else "y") + ".npy")
        if m is None or not ypath.is_file():
            self.warnings.append(f"{self.path}: no labels file {ypath.name} beside it: rows are unlabelled")
            return np.full(n, -1, np.int64)
        try:
            y = np.load(ypath, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{ypath}: not a readable .npy file ({e})") from None
        if y.ndim != 2 or len(y) != n:
            raise DataError(f"{ypath}: labels must be one-hot [N, C] with N = {n} (the rows of {self.path.name}), "
                            f"got shape {y.shape}")
        labels = np.empty(n, np.int64)
        for i in range(0, n, 65536):
            block = np.asarray(y[i:i + 65536])
            ones = (block == 1).sum(1)
            bad = np.flatnonzero((ones != 1) | (((block != 0) & (block != 1)).any(1)))
            if len(bad):
                raise DataError(f"{ypath}: row {i + int(bad[0])} is not one-hot (exactly one 1, the rest 0)")
            labels[i:i + len(block)] = block.argmax(1)
        c = y.shape[1]
        named = c == len(CIFAR10_CLASSES) and self.path.name.lower().startswith("cifar10")
        self.class_names = list(CIFAR10_CLASSES) if named else [str(i) for i in range(c)]
        return labels

    def token_batches(self, batch_size: int = 256) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
        """(tokens uint16 [B, T], labels int64 [B], sources) of the selected rows, `limit` in all."""
        n = len(self._x)
        order = self._order if self._order is not None else None
        if self.limit is not None:
            order = (order if order is not None else np.arange(n))[:self.limit]
        count = n if order is None else len(order)
        for i in range(0, count, batch_size):
            idx = np.arange(i, min(i + batch_size, n)) if order is None else order[i:i + batch_size]
            if order is None:
                block = np.asarray(self._x[i:i + len(idx)])
            else:
                sort = np.argsort(idx, kind="stable")  # read the memory map front to back
                block = np.empty((len(idx), self._x.shape[1]), self._x.dtype)
                block[sort] = self._x[idx[sort]]
            bad = np.flatnonzero(((block < 0) | (block >= N_TOKENS)).any(1))
            if len(bad):
                row = int(idx[bad[0]])
                raise DataError(f"{self.path}: row {row} has token {int(block[bad[0]].max())} "
                                f"(pre-quantized tokens are palette indices 0..{N_TOKENS - 1})")
            yield block.astype(np.uint16), self._y[idx], [f"{self.path.name}[{j}]" for j in idx.tolist()]

    def _batches(self, batch_size: int) -> Iterator[Batch]:
        rgb = np.clip(np.rint((self.palette + 1.0) * 127.5), 0, 255).astype(np.uint8)  # [512, 3]
        for tokens, labels, sources in self.token_batches(batch_size):
            imgs = rgb[tokens].reshape(len(tokens), self.side, self.side, 3)
            yield resize_batch(imgs, self.size, self.resize), labels, sources

    def batches(self, batch_size: int = 256) -> Iterator[Batch]:
        return self._batches(batch_size)  # token_batches applies the limit
