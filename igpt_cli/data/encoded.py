"""Datasets of encoded images (JPEG, PNG, … bytes): image folders, lists of files,
WebDataset shards, Hugging Face datasets. A reader lists its images and their labels up
front, then yields `(name, bytes or the error reading them, label)` from `_members` in
reading order; this base decodes them in chunks (in a pool of processes, one per core, for large
datasets), skips or refuses the unreadable ones (`skip_bad`) and forms the batches.
"""
from __future__ import annotations

import re
from typing import Iterator

import numpy as np

from .base import BadImageError, Batch, DataError, Dataset, decode_image
from .decode_pool import DecodePool, pool_size

POOL_MIN_IMAGES = 4096  # below this many images a decode pool costs more than it saves

# (member name, encoded bytes or the text of the error that kept them from being read, label)
Chunk = list[tuple[str, "bytes | str", int]]
Member = tuple[str, "bytes | Exception", int]


def decode_workers(n_images: int | None) -> int:
    """Decode processes for a dataset of `n_images`: 0 (decode in this process) for small ones,
    else one per available core (`decode_pool.pool_size`)."""
    return pool_size() if (n_images or 0) >= POOL_MIN_IMAGES else 0


class EncodedImages(Dataset):
    """A dataset of encoded images; subclasses implement `_members` (and may name images
    in messages and sources differently with `_where` / `_source`)."""

    def _members(self) -> Iterator[Member]:
        """(name, encoded bytes or the error reading them, label) of the selected images, in order."""
        raise NotImplementedError

    def _check_class_indices(self, labels: np.ndarray, where: str) -> np.ndarray:
        """`labels` (int64) when each is -1 or below the number of class names; with no class
        names, numbered classes up to the largest label are made."""
        top = int(labels.max()) if len(labels) else -1
        bottom = int(labels.min()) if len(labels) else -1
        if bottom < -1 or (self.class_names and top >= len(self.class_names)):
            raise DataError(f"{where}: label {bottom if bottom < -1 else top} is not -1 or a class index "
                            f"(0..{len(self.class_names) - 1})")
        if not self.class_names and top >= 0:
            self.class_names = [str(i) for i in range(top + 1)]
        return labels

    def _source(self, name: str) -> str:
        """The image's entry in a tokens file's `sources`."""
        return name

    def _where(self, name: str) -> str:
        """The image, for an error message."""
        return f"{self.path}:{name}"

    def _too_big(self, nbytes: int) -> ValueError | None:
        """An error when `nbytes` of encoded image is more than any image within `max_pixels`
        can need (a few KB of zip or tar.gz member can inflate to gigabytes): not read."""
        cap = self.max_pixels * 8 + (1 << 20)  # 16-bit RGBA without compression, plus headers
        if nbytes <= cap:
            return None
        return ValueError(f"{nbytes:,} bytes, more than an image within max_pixels={self.max_pixels} can need"
                          ": a possible decompression bomb; a larger max_pixels=N reads it")

    def _chunks(self, batch_size: int) -> Iterator[Chunk]:
        chunk = []
        for name, data, label in self._members():
            if isinstance(data, Exception):
                data = str(data) or type(data).__name__
            chunk.append((name, data, label))
            if len(chunk) == batch_size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def _decoded(self, batch_size: int) -> Iterator[tuple[Chunk, tuple]]:
        """(chunk, `_decode_chunk` result) pairs in order; decoding runs in a pool of processes
        (`decode_pool.DecodePool`, one per core) for large datasets (`decode_workers`)."""
        args = (self.size, self.resize, self.max_pixels)
        workers = decode_workers(self.n)
        if workers <= 1:
            for chunk in self._chunks(batch_size):
                yield chunk, _decode_chunk(chunk, *args)
            return
        # leaving this block for any reason (an error, Ctrl-C, SIGTERM, the consumer stopping)
        # kills the workers at once (see decode_pool)
        with DecodePool(workers) as pool:
            for (chunk, *_), result in pool.map_ordered(_decode_chunk, ((c, *args) for c in self._chunks(batch_size))):
                yield chunk, result

    def _batches(self, batch_size: int) -> Iterator[Batch]:
        for chunk, (imgs, errors) in self._decoded(batch_size):
            if errors:
                if not self.skip_bad:
                    i, msg = errors[0]
                    raise BadImageError(f"{self._where(chunk[i][0])}: cannot read image ({msg}); "
                                        "skip_bad=True skips such files")
                self.skipped += len(errors)
                bad = {i for i, _ in errors}
                chunk = [c for i, c in enumerate(chunk) if i not in bad]
            if chunk:
                yield (imgs, np.asarray([label for _, _, label in chunk], dtype=np.int64),
                       [self._source(n) for n, _, _ in chunk])


def _decode_chunk(chunk: Chunk, size: int, resize: str, max_pixels: int | None = None
                  ) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode a chunk: (uint8 [k, S, S, 3] of the good ones, [(index, message)] of the bad ones)."""
    out = np.empty((len(chunk), size, size, 3), dtype=np.uint8)
    errors, k = [], 0
    for i, (name, data, _) in enumerate(chunk):
        try:
            if isinstance(data, str):
                raise OSError(data)
            out[k] = decode_image(data, size, resize, name, max_pixels)
            k += 1
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad image
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            errors.append((i, re.sub(r" ?<[\w.]+ object at 0x[0-9a-fA-F]+>", "", msg)))  # never Python internals
    return out[:k], errors
