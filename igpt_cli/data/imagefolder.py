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
import struct
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from ..choices import SPLIT_NAMES
from ._tar import FastTarUnsupported, is_plain_tar, scan_plain_tar, walk_tar
from .base import (IMAGE_EXTS, TAR_SUFFIXES, DataError, EmptyDatasetError, TruncatedArchiveError, is_image_name,
                   is_unsafe_name)
from .encoded import EncodedImages, Member

class ImageFolder(EncodedImages):
    kind = "imagefolder"
    catch_all = True

    @classmethod
    def claims(cls, path: Path, fmt: str) -> bool:
        return path.is_dir() or path.name.lower().endswith((".zip", *TAR_SUFFIXES))

    def __init__(self, path, split, size, resize, limit, skip_bad, **options):
        super().__init__(path, split, size, resize, limit, skip_bad, **options)
        self._offsets: dict[str, tuple[int, int]] | None = None  # plain tar: member -> (offset, size)
        names = self._list()
        unsafe = [n for n in names if is_unsafe_name(n)]
        if unsafe:
            self.warnings.append(f"{self.path}: skipped {len(unsafe)} member{'s' if len(unsafe) > 1 else ''} whose "
                                 f"names point outside the archive (absolute or with '..'), e.g. {unsafe[0]!r}")
            names = [n for n in names if not is_unsafe_name(n)]
        self._layout(names)

    def _list(self) -> list[str]:
        """The image names in the directory or archive (sets `container`)."""
        p = self.path
        if p.is_dir():
            self.container = "dir"
            names = []
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                rel = os.path.relpath(root, p)
                for f in sorted(files):
                    if is_image_name(f):
                        names.append(f if rel == "." else f"{rel}/{f}".replace(os.sep, "/"))
            return names
        if p.name.lower().endswith(".zip"):
            self.container = "zip"
            try:
                with zipfile.ZipFile(p) as z:
                    return sorted(n for n in z.namelist() if not n.endswith("/") and is_image_name(n))
            except (zipfile.BadZipFile, OSError) as e:
                _raise_if_truncated_zip(p)
                raise DataError(f"{p}: not a readable zip archive ({e})") from None
        self.container = "tar"
        return self._list_tar()

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

    def _members(self) -> Iterator[Member]:
        entries = self._entries
        for name, data in self._read():
            yield name, data, entries[name]

    def _read(self) -> Iterator[tuple[str, bytes | Exception]]:
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

    def _source(self, member: str) -> str:
        return member if self.container == "dir" else f"{self.path.name}:{member}"

    def _where(self, member: str) -> str:
        return str(self.path / member) if self.container == "dir" else f"{self.path}:{member}"


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


class ImageFiles(ImageFolder):
    """Image files named one by one (a single file, a ``@list.txt``, a glob, several paths):
    read like an image folder rooted at their deepest common folder, so files in class
    folders (``photos/cat/1.jpg photos/dog/2.jpg``) are labelled by them and files side by
    side (``photos/*.jpg``, a single file) are unlabelled (-1)."""

    kind = "files"
    catch_all = False
    several = True

    @classmethod
    def claims(cls, path: Path, fmt: str) -> bool:
        return path.is_file() and is_image_name(path.name)

    def _list(self) -> list[str]:
        self.container = "dir"
        files = [os.path.abspath(q) for q in self.paths]
        for q in files:
            if not is_image_name(q):
                raise DataError(f"{q}: not an image file (expected one of {', '.join(sorted(IMAGE_EXTS))})")
        self.path = Path(os.path.commonpath([os.path.dirname(q) for q in files]))
        return [Path(os.path.relpath(q, self.path)).as_posix() for q in files]
