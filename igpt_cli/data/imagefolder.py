"""Image folders: ``<split>/<class>/<file>`` or ``<class>/<file>`` trees, as a directory,
a ``.tar`` (optionally compressed) or a ``.zip`` archive read in place (no extraction).

Directories and zips are read in sorted order, tar archives in archive order (with
``shuffle``, in the shuffled order; a compressed tar, which can only be read front to
back, then reads the shuffled selection in archive order). Class indices come from the
sorted class folders of *all* splits, so train and test agree. Decoding (which dominates
once quantizing is a table lookup) runs in a small process pool for large datasets.

Archives are never extracted. Member names that point outside the tree (``../x.jpg``,
``/abs/x.jpg``) are skipped and counted in a warning; a cut archive is an error
(`TruncatedArchiveError`), never a smaller dataset.
"""
from __future__ import annotations

import os
import re
import signal
import struct
import sys
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from ..choices import SPLIT_NAMES
from ._tar import FastTarUnsupported, is_plain_tar, scan_plain_tar, walk_tar
from .base import (IMAGE_EXTS, TAR_SUFFIXES, BadImageError, Batch, DataError, Dataset, EmptyDatasetError,
                   TruncatedArchiveError, decode_image, is_image_name, is_unsafe_name)

POOL_MIN_IMAGES = 4096  # below this many images a decode pool costs more than it saves

# (member name, encoded bytes, or the text of the error that kept them from being read)
Chunk = list[tuple[str, "bytes | str"]]


def decode_workers(n_images: int | None) -> int:
    """Decode processes for a dataset of `n_images`: 0 (decode in this process) for small ones."""
    return min(2, os.cpu_count() or 1) if (n_images or 0) >= POOL_MIN_IMAGES else 0


class ImageFolder(Dataset):
    kind = "imagefolder"
    catch_all = True

    @classmethod
    def claims(cls, path: Path, fmt: str) -> bool:
        return path.is_dir() or path.name.lower().endswith((".zip", *TAR_SUFFIXES))

    def __init__(self, path, split, size, resize, limit, skip_bad, **options):
        super().__init__(path, split, size, resize, limit, skip_bad, **options)
        p = self.path
        self._offsets: dict[str, tuple[int, int]] | None = None  # plain tar: member -> (offset, size)
        if p.is_dir():
            self.container = "dir"
            names = []
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                rel = os.path.relpath(root, p)
                for f in sorted(files):
                    if is_image_name(f):
                        names.append(f if rel == "." else f"{rel}/{f}".replace(os.sep, "/"))
        elif p.name.lower().endswith(".zip"):
            self.container = "zip"
            try:
                with zipfile.ZipFile(p) as z:
                    names = sorted(n for n in z.namelist() if not n.endswith("/") and is_image_name(n))
            except (zipfile.BadZipFile, OSError) as e:
                _raise_if_truncated_zip(p)
                raise DataError(f"{p}: not a readable zip archive ({e})") from None
        else:
            self.container = "tar"
            names = self._list_tar()
        unsafe = [n for n in names if is_unsafe_name(n)]
        if unsafe:
            self.warnings.append(f"{p}: skipped {len(unsafe)} member{'s' if len(unsafe) > 1 else ''} whose names "
                                 f"point outside the archive (absolute or with '..'), e.g. {unsafe[0]!r}")
            names = [n for n in names if not is_unsafe_name(n)]
        self._layout(names)

    def _list_tar(self) -> list[str]:
        """The image members of the tar archive (recording their offsets when it is plain)."""
        p, names = self.path, []
        try:
            plain = is_plain_tar(p)
        except OSError as e:
            raise DataError(f"{p}: not a readable tar archive ({e})") from None
        if plain:
            try:
                offsets = {}
                for n, off, sz in scan_plain_tar(p):
                    if is_image_name(n):
                        names.append(n)
                        offsets[n] = (off, sz)
                self._offsets = offsets
                return names
            except FastTarUnsupported:
                names = []
            except OSError as e:
                raise DataError(f"{p}: not a readable tar archive ({e})") from None
        return [m.name for m, _ in walk_tar(p) if m.isfile() and is_image_name(m.name)]

    def _layout(self, names: list[str]) -> None:
        parts = [(n[2:] if n.startswith("./") else n).split("/") for n in names]
        # strip common wrapper folders (e.g. an archive holding "cifar10/train/cat/0.jpg")
        strip = 0
        while parts and all(len(q) - strip >= 3 for q in parts):
            first = {q[strip] for q in parts}
            if len(first) != 1 or next(iter(first)) in SPLIT_NAMES:
                break
            strip += 1
        rel = [q[strip:] for q in parts]
        split_layout = bool(rel) and all(len(q) >= 2 for q in rel) and any(q[0] in SPLIT_NAMES for q in rel)
        if split_layout:
            self.splits = sorted({q[0] for q in rel})
            classes = sorted({q[1] for q in rel if len(q) >= 3})
        else:
            self.splits = []
            classes = sorted({q[0] for q in rel if len(q) >= 2})
        self.class_names = classes
        self._check_split()
        index = {c: i for i, c in enumerate(classes)}
        self._entries: dict[str, int] = {}  # member name -> label (only the selected split)
        for n, q in zip(names, rel):
            if split_layout:
                if self.split != "all" and q[0] != self.split:
                    continue
                label = index[q[1]] if len(q) >= 3 else -1
            else:
                label = index[q[0]] if len(q) >= 2 else -1
            self._entries[n] = label
        if not self._entries:
            what = f"split {self.split!r} of " if self.split != "all" else ""
            raise EmptyDatasetError(f"{self.path}: no images found in {what}this {self.container} "
                                    f"(looked for {', '.join(sorted(IMAGE_EXTS))})")
        if self.selecting:
            names, labels = list(self._entries), np.fromiter(self._entries.values(), np.int64, len(self._entries))
            order = self._plan(labels)
            if self.shuffle and self._sequential and self.limit is not None:
                order = order[:self.limit]  # read front to back: the selection must be fixed before reading
            self._entries = {names[i]: int(labels[i]) for i in order}
        self.n = len(self._entries) if self.limit is None else min(self.limit, len(self._entries))

    @property
    def _sequential(self) -> bool:
        """A tar archive read front to back with `tarfile` (compressed, or unusual features)."""
        return self.container == "tar" and self._offsets is None

    def _members(self) -> Iterator[tuple[str, bytes | Exception]]:
        """(member name, encoded bytes or the error reading them) of the selected images, in
        order. A member larger than any image within `max_pixels` can be is not read (a zip
        or tar.gz member of a few KB can inflate to gigabytes)."""
        p, too_big = self.path, self._too_big
        if self.container == "dir":
            for n in self._entries:
                try:
                    yield n, too_big((p / n).stat().st_size) or (p / n).read_bytes()
                except OSError as e:
                    yield n, e
        elif self.container == "zip":
            with zipfile.ZipFile(p) as z:
                for n in self._entries:
                    try:
                        yield n, too_big(z.getinfo(n).file_size) or z.read(n)
                    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:  # CRC errors etc.
                        yield n, e
        elif self._offsets is not None:
            with open(p, "rb") as fh:
                for n in self._entries:
                    off, sz = self._offsets[n]
                    fh.seek(off)
                    data = too_big(sz) or fh.read(sz)
                    yield n, data if isinstance(data, Exception) or len(data) == sz else OSError("truncated member")
        else:
            entries = self._entries
            for m, data in walk_tar(p, want=lambda m: m.name in entries and not too_big(m.size)):
                if m.name in entries:
                    yield m.name, too_big(m.size) or (data if data is not None else OSError("not a regular file"))

    def _too_big(self, nbytes: int) -> ValueError | None:
        cap = self.max_pixels * 8 + (1 << 20)  # 16-bit RGBA without compression, plus headers
        if nbytes <= cap:
            return None
        return ValueError(f"{nbytes:,} bytes, more than an image within max_pixels={self.max_pixels} can need"
                          ": a possible decompression bomb; a larger max_pixels=N reads it")

    def _source(self, member: str) -> str:
        return member if self.container == "dir" else f"{self.path.name}:{member}"

    def _where(self, member: str) -> str:
        return str(self.path / member) if self.container == "dir" else f"{self.path}:{member}"

    def _chunks(self, batch_size: int) -> Iterator[Chunk]:
        chunk = []
        for name, data in self._members():
            if isinstance(data, Exception):
                data = str(data) or type(data).__name__
            chunk.append((name, data))
            if len(chunk) == batch_size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def _decoded(self, batch_size: int) -> Iterator[tuple[Chunk, tuple]]:
        """(chunk, `_decode_chunk` result) pairs in order; decoding runs in a small process
        pool for large datasets (`decode_workers`)."""
        args = (self.size, self.resize, self.max_pixels)
        workers = decode_workers(self.n)
        if workers <= 1:
            for chunk in self._chunks(batch_size):
                yield chunk, _decode_chunk(chunk, *args)
            return
        import multiprocessing as mp
        from collections import deque

        # fork: no re-import of __main__ (works from scripts without a main guard); the
        # workers only run _decode_chunk. Progress callbacks run in this process. Leaving
        # the block for any reason (an error, Ctrl-C, SIGTERM, the consumer stopping)
        # terminates the workers, which end silently (`_quiet_worker`).
        with mp.get_context("fork").Pool(workers, initializer=_quiet_worker) as pool:
            pending: deque = deque()
            for chunk in self._chunks(batch_size):
                pending.append((chunk, pool.apply_async(_decode_chunk, (chunk, *args))))
                if len(pending) > 2 * workers:
                    c, r = pending.popleft()
                    yield c, r.get()
            while pending:
                c, r = pending.popleft()
                yield c, r.get()

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
                yield (imgs, np.asarray([self._entries[n] for n, _ in chunk], dtype=np.int64),
                       [self._source(n) for n, _ in chunk])


def _quiet_worker() -> None:
    """Decode workers never speak: Ctrl-C reaches the whole process group but only the
    parent acts on it; SIGTERM (how the parent's pool ends them) kills them without a
    handler the parent may have installed; and a worker whose parent died (a broken pipe)
    prints no traceback. Their results and errors travel back through the pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the life of the worker


def _decode_chunk(chunk: Chunk, size: int, resize: str, max_pixels: int | None = None
                  ) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode a chunk: (uint8 [k, S, S, 3] of the good ones, [(index, message)] of the bad ones)."""
    out = np.empty((len(chunk), size, size, 3), dtype=np.uint8)
    errors, k = [], 0
    for i, (name, data) in enumerate(chunk):
        try:
            if isinstance(data, str):
                raise OSError(data)
            out[k] = decode_image(data, size, resize, name, max_pixels)
            k += 1
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad image
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            errors.append((i, re.sub(r" ?<[\w.]+ object at 0x[0-9a-fA-F]+>", "", msg)))  # never Python internals
    return out[:k], errors


def _raise_if_truncated_zip(path: Path) -> None:
    """A zip whose central directory is missing but which starts like a zip was cut short:
    raise TruncatedArchiveError at the first member whose local header or data is incomplete."""
    try:
        with open(path, "rb") as f:
            end = os.fstat(f.fileno()).st_size
            pos, index = 0, 1
            while True:
                f.seek(pos)
                head = f.read(30)
                if head[:4] == b"PK\x01\x02" or (head[:4] != b"PK\x03\x04" and pos > 0):
                    raise TruncatedArchiveError(path, index, detail=f": the central directory after member {index - 1} "
                                                                    "is cut")
                if head[:4] != b"PK\x03\x04":
                    return  # not a zip at all
                if len(head) < 30:
                    raise TruncatedArchiveError(path, index)
                flags, csize, nlen, xlen = (struct.unpack("<H", head[6:8])[0], struct.unpack("<I", head[18:22])[0],
                                            *struct.unpack("<HH", head[26:30]))
                raw = f.read(nlen)
                name = raw.decode("utf-8", "replace") if len(raw) == nlen and nlen else None
                if flags & 0x08 or csize == 0xFFFFFFFF:  # sizes not in the local header: cannot walk on
                    raise TruncatedArchiveError(path, index, name, " (or later)")
                pos += 30 + nlen + xlen + csize
                if pos > end:
                    raise TruncatedArchiveError(path, index, name)
                index += 1
    except OSError:
        return
