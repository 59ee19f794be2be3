"""Reading tar archives with bounded memory, and fast.

`scan_plain_tar` lists the regular files of an uncompressed tar from its 512-byte
headers alone (much faster than `tarfile` for archives of many small files), so image
folders can then read members by offset. `iter_tar` walks any tar (compressed too)
without `tarfile` keeping every member in memory.
"""
from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Iterator

from .base import DataError


class FastTarUnsupported(Exception):
    """The archive uses a feature `scan_plain_tar` leaves to `tarfile`."""


_REGULAR = (b"0", b"\0", b"7")  # type flags of regular files


def scan_plain_tar(path: Path) -> Iterator[tuple[str, int, int]]:
    """(member name, data offset, size) of the regular files of an *uncompressed* tar,
    from its 512-byte headers alone (ustar prefix, GNU long names and pax paths handled).
    Raises `FastTarUnsupported` for anything unusual (the caller falls back to `tarfile`)
    and `DataError` on a corrupt header."""
    with open(path, "rb") as f:
        pos, longname, paxname = 0, None, None
        while True:
            f.seek(pos)
            h = f.read(512)
            if len(h) < 512 or h.count(0) == 512:
                return
            chk = h[148:156].split(b"\0", 1)[0].strip()
            try:
                ok = int(chk or b"-1", 8) == sum(h[:148]) + 256 + sum(h[156:])
            except ValueError:
                ok = False
            if not ok:
                raise DataError(f"{path}: corrupt tar header at byte {pos}")
            if h[124] & 0x80:
                raise FastTarUnsupported("base-256 size")
            size = int(h[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            typ = h[156:157]
            name = h[0:100].split(b"\0", 1)[0]
            if h[257:262] == b"ustar":
                prefix = h[345:500].split(b"\0", 1)[0]
                if prefix:
                    name = prefix + b"/" + name
            data = pos + 512
            if typ == b"L":
                longname = f.read(size).split(b"\0", 1)[0]
            elif typ == b"x":
                for key, value in _pax_records(f.read(size)):
                    if key == b"path":
                        paxname = value
                    elif key == b"size":
                        raise FastTarUnsupported("pax size")
            elif typ in (b"g", b"K"):
                pass
            elif typ == b"S":
                raise FastTarUnsupported("sparse member")
            else:
                name = paxname or longname or name
                longname = paxname = None
                if typ in _REGULAR:
                    yield name.decode("utf-8", "surrogateescape"), data, size
            pos = data + (size + 511) // 512 * 512


def _pax_records(buf: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) of the "<length> <key>=<value>\\n" records of a pax header."""
    i = 0
    while i < len(buf):
        sp = buf.find(b" ", i)
        if sp < 0:
            return
        n = int(buf[i:sp])
        kv = buf[sp + 1:i + n - 1]
        k, _, v = kv.partition(b"=")
        yield k, v
        i += n


def is_plain_tar(path: Path) -> bool:
    """Not gzip, bzip2 or xz compressed (by magic bytes)."""
    with open(path, "rb") as f:
        head = f.read(6)
    return not (head.startswith(b"\x1f\x8b") or head.startswith(b"BZh") or head.startswith(b"\xfd7zXZ"))


def iter_tar(tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Iterate tar members without tarfile keeping them all in memory."""
    while True:
        m = tf.next()
        if m is None:
            return
        yield m
        tf.members = []  # bounded memory for huge archives
