"""WebDataset tar shards: samples of files sharing a key (``0001.jpg`` + ``0001.cls``),
one shard or several read as one dataset (``shard-{000..099}.tar``, ``'shards/*.tar'``,
a folder of shards); plain or compressed tars, read in place with `_tar`.

A sample's key is its member name up to the first dot of the file name, the rest its
extension (WebDataset's own rule). The image is the member with `image_column` as its
extension, else the first of `IMAGE_EXT_ORDER` present. The label comes from
`label_column` (an extension whose text is the label, or a field of the ``.json``
sidecar), else ``.cls``, else the ``.json`` sidecar's `JSON_LABEL_KEYS` field, else a
``.txt`` holding an integer (other ``.txt`` are captions, not labels). A label is a class
index, or a class name. Class names: ``classes.txt`` (one a line) or ``classes.json`` (a
list) beside the shards, else the names found (sorted), else the indices as strings.

Shards are listed first (plain tars from their headers, sidecars read by offset;
compressed ones in one pass reading only the sidecars), then read in order.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from ._tar import FastTarUnsupported, is_plain_tar, scan_plain_tar, walk_tar
from .base import TAR_SUFFIXES, DataError, EmptyDatasetError, is_unsafe_name
from .encoded import EncodedImages, Member
from ..jsonfile import loads_bounded, read_bounded, read_json

IMAGE_EXT_ORDER = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm")
SIDECARS = ("cls", "json", "txt")
JSON_LABEL_KEYS = ("label", "cls", "class", "target", "labels", "fine_label")
SNIFF_MEMBERS = 64  # members looked at to tell a WebDataset shard from an image-folder tar
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def split_key(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name, WebDataset's way: ``a/b/0001.seg.png`` -> (``a/b/0001``, ``seg.png``)."""
    m = _KEY.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


def _is_tar(p: Path) -> bool:
    return p.is_file() and p.name.lower().endswith(TAR_SUFFIXES)


def _members_of(p: Path, want) -> Iterator[tuple[str, "int | None", int, "bytes | None"]]:
    """(name, offset or None, size, bytes when `want(name)`) of the regular members of the tar `p`."""
    if is_plain_tar(p):
        try:
            with open(p, "rb") as fh:
                for name, off, size in scan_plain_tar(p):
                    data = None
                    if want(name):
                        fh.seek(off)
                        data = fh.read(size)
                    yield name, off, size, data
            return
        except FastTarUnsupported:
            pass
    for m, data in walk_tar(p, want=lambda m: m.isfile() and want(m.name)):
        if m.isfile():
            yield m.name, None, m.size, data


def _looks_like_shard(p: Path) -> bool:
    """An image and a label sidecar sharing a key among the first members."""
    images, sidecars = set(), set()
    try:
        for i, (name, _, _, _) in enumerate(_members_of(p, lambda n: False)):
            kx = split_key(name)
            if kx:
                (images if kx[1] in IMAGE_EXT_ORDER else sidecars if kx[1] in SIDECARS else set()).add(kx[0])
            if images & sidecars:
                return True
            if i >= SNIFF_MEMBERS:
                break
    except (DataError, OSError):
        return False
    return False


class WebDataset(EncodedImages):
    kind = "webdataset"
    columns = True
    several = True

    @classmethod
    def claims(cls, path: Path, fmt: str) -> bool:
        if path.is_dir():
            shards = [q for q in path.iterdir() if _is_tar(q)]
            return bool(shards) and _looks_like_shard(sorted(shards)[0])
        return _is_tar(path) and _looks_like_shard(path)

    def __init__(self, path, split, size, resize, limit, skip_bad, **options):
        super().__init__(path, split, size, resize, limit, skip_bad, **options)
        shards = []
        for q in self.paths:
            shards += sorted(s for s in q.iterdir() if _is_tar(s)) if q.is_dir() else [q]
        self._shards = shards
        self._check_split()
        self.class_names = self._class_file(shards[0].parent)
        raw = []  # (shard index, member name, offset, size, label value)
        for i, shard in enumerate(shards):
            raw += [(i, *entry) for entry in self._list_shard(shard)]
        if not raw:
            raise EmptyDatasetError(f"{self.path}: no images in {len(shards)} WebDataset shard"
                                    f"{'s' if len(shards) > 1 else ''}")
        labels = self._label_indices([r[4] for r in raw])
        unlabelled = sum(r[4] is None for r in raw)
        if unlabelled:
            self.warnings.append(f"{self.path}: {unlabelled} of {len(raw)} samples have no label (no .cls, .json "
                                 "or numeric .txt); they get label -1 (unlabelled)")
        self._entries = [(i, name, off, size, int(y)) for (i, name, off, size, _), y in zip(raw, labels)]
        if self.selecting:
            order = self._plan(labels)
            if self.limit is not None:
                order = order[:self.limit]  # shards are read front to back: fix the selection first
            self._entries = [self._entries[j] for j in sorted(order.tolist())]
        self.n = len(self._entries) if self.limit is None else min(self.limit, len(self._entries))

    def _class_file(self, folder: Path) -> list[str]:
        try:
            if (folder / "classes.txt").is_file():
                text = read_bounded(folder / "classes.txt", "class list").decode("utf-8")
                return [s.strip() for s in text.splitlines() if s.strip()]
            if (folder / "classes.json").is_file():
                names = read_json(folder / "classes.json", "class list")
                if isinstance(names, dict):  # {"cat": 0, …} or {"0": "cat", …}
                    pairs = [(v, k) if isinstance(v, int) else (int(k), v) for k, v in names.items()]
                    names = [name for _, name in sorted(pairs)]
                return [str(s) for s in names]
        except (OSError, ValueError, TypeError) as e:
            raise DataError(f"{folder}: unreadable classes.txt / classes.json ({e})") from None
        return []

    def _list_shard(self, shard: Path) -> list[tuple[str, "int | None", int, object]]:
        """(image member, offset, size, raw label or None) of each sample of `shard`, in order."""
        samples: dict[str, dict[str, tuple]] = {}
        for name, off, size, data in _members_of(shard, lambda n: (split_key(n) or ("", ""))[1] in SIDECARS
                                                 or (split_key(n) or ("", ""))[1] == self.label_column):
            kx = split_key(name)
            if kx is None or is_unsafe_name(name):
                continue
            samples.setdefault(kx[0], {})[kx[1]] = (name, off, size, data)
        out = []
        for key, files in samples.items():
            ext = self.image_column or next((e for e in IMAGE_EXT_ORDER if e in files), None)
            if ext is None:
                continue
            if ext not in files:
                raise DataError(f"{shard}: sample {key!r} has no .{ext} member (image_column); "
                                f"it has {', '.join(sorted(files))}")
            name, off, size, _ = files[ext]
            out.append((name, off, size, self._raw_label(shard, key, files)))
        return out

    def _raw_label(self, shard: Path, key: str, files: dict) -> object:
        """The label of a sample as found (an int, a class name, or None)."""
        def text(ext):
            return files[ext][3].decode("utf-8", "replace").strip()

        def from_json(fields):
            try:
                d = loads_bounded(files["json"][3], f"{shard}: {key}.json")
            except ValueError as e:
                raise DataError(f"{shard}: {key}.json is not JSON ({e})") from None
            return next((d[k] for k in fields if isinstance(d, dict) and k in d), None)

        col = self.label_column
        if col is not None:
            if col in files:
                return _int_or_name(text(col))
            if "json" in files:
                value = from_json([col])
                if value is not None:
                    return value
            raise DataError(f"{shard}: sample {key!r} has no label {col!r} (label_column: neither a .{col} member "
                            "nor a field of its .json)")
        if "cls" in files:
            return _int_or_name(text("cls"))
        if "json" in files:
            value = from_json(JSON_LABEL_KEYS)
            if value is not None:
                return value
        if "txt" in files and re.fullmatch(r"-?\d+", text("txt")):
            return int(text("txt"))
        return None

    def _label_indices(self, raw: list) -> np.ndarray:
        names = [v for v in raw if isinstance(v, str)]
        if names and not self.class_names:
            self.class_names = sorted(set(names))
        index = {c: i for i, c in enumerate(self.class_names)}
        out = np.full(len(raw), -1, np.int64)
        for j, v in enumerate(raw):
            if isinstance(v, bool) or v is None:
                continue
            if isinstance(v, str):
                if v not in index:
                    raise DataError(f"{self.path}: label {v!r} is not in classes.txt / classes.json")
                out[j] = index[v]
            elif isinstance(v, int):
                if not -1 <= v < LABEL_MAX:
                    raise DataError(f"{self.path}: label {v} is not -1 or a class index")
                out[j] = v
            else:
                raise DataError(f"{self.path}: label {v!r} is neither a class index nor a class name")
        return self._check_class_indices(out, str(self.path))

    def _members(self) -> Iterator[Member]:
        by_shard: dict[int, list] = {}
        for e in self._entries:
            by_shard.setdefault(e[0], []).append(e)
        for i, shard in enumerate(self._shards):
            entries = by_shard.get(i)
            if not entries:
                continue
            if all(off is not None for _, _, off, _, _ in entries):
                with open(shard, "rb") as fh:
                    for _, name, off, size, y in entries:
                        fh.seek(off)
                        data = self._too_big(size) or fh.read(size)
                        ok = isinstance(data, Exception) or len(data) == size
                        yield f"{shard.name}:{name}", data if ok else OSError("truncated member"), y
                continue
            wanted = {name: y for _, name, _, _, y in entries}
            for m, data in walk_tar(shard, want=lambda m: m.name in wanted and not self._too_big(m.size)):
                if m.name in wanted:
                    yield (f"{shard.name}:{m.name}", self._too_big(m.size) or
                           (data if data is not None else OSError("not a regular file")), wanted[m.name])

    def _where(self, name: str) -> str:
        return os.path.join(str(self._shards[0].parent), name)


LABEL_MAX = 1 << 31  # class indices beyond this are not class indices (and would not fit int64 at 2**63)


def _int_or_name(s: str) -> object:
    return int(s) if re.fullmatch(r"-?\d+", s) else s
