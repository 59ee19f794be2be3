"""Reading tar archives with bounded memory, and fast, and never mistaking a cut archive
for a smaller dataset.

`scan_plain_tar` lists the regular files of an uncompressed tar from its 512-byte
headers alone (much faster than `tarfile` for archives of many small files), so image
folders can then read members by offset. `walk_tar` walks any tar (compressed too)
without `tarfile` keeping every member in memory.

Both insist on a complete archive: a tar ends with an end-of-archive block of zeros, so
an archive cut anywhere (inside a header, inside a member's data, or just before the end
block, as `head -c` or an interrupted download leaves it) raises `TruncatedArchiveError`
("archive truncated at member N", N counting members from 1, naming the member when its
header was read), where `tarfile` itself would quietly stop early.
"""
from __future__ import annotations

import os
import tarfile
import zlib
from pathlib import Path
from typing import Callable, Iterator

from .base import DataError, TruncatedArchiveError

BLOCK = 512


class FastTarUnsupported(Exception):
    """The archive uses a feature `scan_plain_tar` leaves to `tarfile`."""


_REGULAR = (b"0", b"\0", b"7")  # type flags of regular files
_EXTENSION = (b"L", b"K", b"x", b"g")  # headers that describe the next member, not members themselves


def scan_plain_tar(path: Path) -> Iterator[tuple[str, int, int]]:
    """(member name, data offset, size) of the regular files of an *uncompressed* tar,
    from its 512-byte headers alone (ustar prefix, GNU long names and pax paths handled).
    Raises `FastTarUnsupported` for anything unusual (the caller falls back to `tarfile`),
    `TruncatedArchiveError` when the archive is cut and `DataError` on a corrupt header."""
    with open(path, "rb") as f:
        end = os.fstat(f.fileno()).st_size
        pos, longname, paxname, member = 0, None, None, 0
        while True:
            f.seek(pos)
            h = f.read(BLOCK)
            if h.count(0) == len(h) and h:  # the end-of-archive block (or the start of one, cut)
                return
            if not h:
                if pos == 0:
                    raise DataError(f"{path}: empty file, not a tar archive")
                raise TruncatedArchiveError(path, member + 1)
            if len(h) < BLOCK:
                raise TruncatedArchiveError(path, member + 1)
            chk = h[148:156].split(b"\0", 1)[0].strip()
            try:
                ok = int(chk or b"-1", 8) == sum(h[:148]) + 256 + sum(h[156:])
            except ValueError:
                ok = False
            if not ok:
                where = f"member {member + 1}, " if member else ""
                raise DataError(f"{path}: corrupt tar header at {where}byte {pos}")
            if h[124] & 0x80:
                raise FastTarUnsupported("base-256 size")
            size = int(h[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            typ = h[156:157]
            name = h[0:100].split(b"\0", 1)[0]
            if h[257:262] == b"ustar":
                prefix = h[345:500].split(b"\0", 1)[0]
                if prefix:
                    name = prefix + b"/" + name
            data = pos + BLOCK
            if typ not in _EXTENSION:
                member += 1
            if data + size > end:  # this member's data (or long name) is cut
                shown = (paxname or longname or name) if typ not in _EXTENSION else None
                raise TruncatedArchiveError(path, member + (typ in _EXTENSION),
                                            shown.decode("utf-8", "surrogateescape") if shown else None)
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
            pos = data + (size + BLOCK - 1) // BLOCK * BLOCK


def _pax_records(buf: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) of the "<length> <key>=<value>\\n" records of a pax header."""
    i = 0
    while i < len(buf):
        sp = buf.find(b" ", i)
        if sp < 0:
            return
        try:
            n = int(buf[i:sp])
        except ValueError:
            raise FastTarUnsupported("malformed pax record") from None
        if n <= 0:
            raise FastTarUnsupported("malformed pax record")
        kv = buf[sp + 1:i + n - 1]
        k, _, v = kv.partition(b"=")
        yield k, v
        i += n


_MAGIC = ((b"\x1f\x8b", "gz"), (b"BZh", "bz2"), (b"\xfd7zXZ", "xz"))


def compression(path: Path) -> str:
    """"gz", "bz2", "xz" (by magic bytes), or "" for an uncompressed tar."""
    with open(path, "rb") as f:
        head = f.read(6)
    return next((kind for magic, kind in _MAGIC if head.startswith(magic)), "")


def is_plain_tar(path: Path) -> bool:
    """Not gzip, bzip2 or xz compressed (by magic bytes)."""
    return compression(path) == ""


class _WatchedTarInfo(tarfile.TarInfo):
    """Records on the TarFile why reading a header failed: `tarfile` ends the member list
    quietly on a cut or corrupt header, and `walk_tar` needs to tell that from the end block."""

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as e:
            tf.igpt_header_error = e
            raise


def walk_tar(path: Path, want: Callable[[tarfile.TarInfo], bool] | None = None
             ) -> Iterator[tuple[tarfile.TarInfo, "bytes | None"]]:
    """(member, its bytes if `want(member)` else None) for every member of the tar archive
    at `path` (any compression), in archive order, in one sequential pass with bounded
    memory. A cut archive raises `TruncatedArchiveError`; anything else unreadable a
    `DataError` naming the archive (and the member, when known)."""
    index, name = 1, None  # the member being read (counted from 1), for messages
    try:
        # the compression named by the magic bytes: an error then says what is wrong with it
        with tarfile.open(path, f"r:{compression(path)}", tarinfo=_WatchedTarInfo) as tf:
            while True:
                if tf.offset != tf.fileobj.tell():  # the previous member's data must be all there
                    tf.fileobj.seek(tf.offset - 1)
                    if not tf.fileobj.read(1):
                        raise TruncatedArchiveError(path, index, name)
                index, name = index + (name is not None), None
                m = tf.next()
                if m is None:
                    break
                name = m.name
                data = None
                if want is not None and want(m):
                    fh = tf.extractfile(m)
                    data = fh.read() if fh is not None else None
                yield m, data
                tf.members = []  # bounded memory for huge archives
            ended = getattr(tf, "igpt_header_error", None)
    except TruncatedArchiveError:
        raise
    except EOFError:  # a compressed stream that stops early
        raise TruncatedArchiveError(path, index, name) from None
    except (tarfile.TarError, OSError, zlib.error) as e:
        why = " ".join(str(e).split()) or type(e).__name__
        if "unexpected end of data" in why or ("truncated header" in why and index == 1):
            raise TruncatedArchiveError(path, index, name) from None
        where = f" at member {index}" + (f" ({name})" if name else "") if index > 1 or name else ""
        raise DataError(f"{path}: not a readable tar archive{where} ({why})") from None
    if isinstance(ended, (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError)):
        raise TruncatedArchiveError(path, index)
    if isinstance(ended, tarfile.InvalidHeaderError):
        raise DataError(f"{path}: corrupt tar header at member {index} ({ended})")
