"""JSON read from disk, bounded: the one reader for every config and record igpt reads.

`read_json(path, what)` (and `read_bounded`, its bytes) refuses (InputError, one line naming the file) anything that is not a
regular file (a symlink to /dev/zero, a FIFO, a directory: never read, never waited on), a file
over `MAX_JSON_BYTES`, and text that is not UTF-8 JSON. `loads_bounded(text, what)` applies the
same cap to JSON held elsewhere (an HDF5 attribute). Symlinks to regular files are followed (the
Hugging Face cache is made of them).
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from .errors import InputError

MAX_JSON_BYTES = 16 << 20  # configs are KB; the largest igpt reads (a 512-colour preprocessor config) ~30 KB


class JSONFileError(InputError):
    """A JSON file (or attribute) that is not a regular file, too large, or not JSON."""


def read_json(path: str | Path, what: str = "JSON file", *, max_bytes: int | None = None) -> Any:
    """The JSON value in the regular file `path` (at most `max_bytes`, default MAX_JSON_BYTES), or JSONFileError."""
    return _parse(read_bounded(path, what, max_bytes=max_bytes), f"{path}: the {what}")


def read_bounded(path: str | Path, what: str, *, max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file `path` (at most `max_bytes`), or JSONFileError."""
    max_bytes = MAX_JSON_BYTES if max_bytes is None else max_bytes
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise JSONFileError(f"{path}: cannot read the {what} ({e.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise JSONFileError(f"{path}: the {what} is not a regular file; refused")
    with os.fdopen(fd, "rb") as f:
        if st.st_size > max_bytes:
            raise JSONFileError(f"{path}: the {what} is {st.st_size:,} bytes, more than the "
                                f"{max_bytes:,} a JSON file may have here; refused")
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise JSONFileError(f"{path}: cannot read the {what} ({e.strerror})") from None
    if len(data) > max_bytes:  # grew while read
        raise JSONFileError(f"{path}: the {what} is more than {max_bytes:,} bytes; refused")
    return data


def loads_bounded(text: str | bytes, what: str, *, max_bytes: int | None = None) -> Any:
    """json.loads of `text` (at most `max_bytes` long), or JSONFileError naming `what`."""
    max_bytes = MAX_JSON_BYTES if max_bytes is None else max_bytes
    if len(text) > max_bytes:
        raise JSONFileError(f"{what}: {len(text):,} bytes of JSON, more than {max_bytes:,}; refused")
    return _parse(text, what)


def _parse(data: str | bytes, where: str) -> Any:
    try:
        if isinstance(data, bytes):
            data = data.decode("utf-8")
        return json.loads(data)
    except UnicodeDecodeError:
        raise JSONFileError(f"{where} is not UTF-8 text") from None
    except (json.JSONDecodeError, RecursionError) as e:
        msg = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
        raise JSONFileError(f"{where} is not valid JSON ({msg})") from None
