"""What a dataset argument names: one path, or several files read as one dataset.

`expand_sources(src)` turns `src` (a path, a string, or a list of them) into paths:
- ``@list.txt``: the paths listed in the file, one a line (blank lines and ``#`` comments
  skipped), relative to the list's folder;
- a glob (``photos/*.jpg``, ``shards/*.tar``, ``**`` for any depth), quoted so that igpt
  expands it, in sorted order;
- a brace pattern (``shard-{000..099}.tar``: a zero-padded numeric range, or
  ``{train,test}`` alternatives), possibly with glob characters too;
- anything else, as it is (a path that does not exist is reported by the reader).
A path that exists is never expanded (a file may be called ``[1].jpg``).
"""
from __future__ import annotations

import glob
import os
import re
from pathlib import Path

from .base import DataError

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
MAX_EXPANSION = 1_000_000  # brace patterns naming more paths than this are a mistake


def expand_braces(pattern: str) -> list[str]:
    """``a-{00..02}.tar`` -> [a-00.tar, a-01.tar, a-02.tar]; ``{x,y}`` -> alternatives (nested
    groups expand left to right). Text without a group, or with ``{}``, is one pattern."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    r = _RANGE.match(body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        width = len(r.group(1)) if r.group(1).lstrip("-").startswith("0") else 0
        step = 1 if hi >= lo else -1
        if abs(hi - lo) >= MAX_EXPANSION:
            raise DataError(f"{pattern}: the range {{{body}}} names more than {MAX_EXPANSION:,} paths")
        items = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    elif "," in body:
        items = body.split(",")
    else:
        return [head + "{" + body + "}" + t for t in expand_braces(tail)]
    return [head + item + t for item in items for t in expand_braces(tail)]


def _is_pattern(s: str) -> bool:
    return any(c in s for c in "*?[") or _BRACE.search(s) is not None


def _read_list(spec: str) -> list[Path]:
    path = Path(spec[1:])
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the list of files ({getattr(e, 'strerror', None) or e})") from None
    base = path.parent
    out = [base / line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not out:
        raise DataError(f"{path}: the list of files is empty")
    return out


def _expand_pattern(spec: str) -> list[Path]:
    found: list[str] = []
    for pat in expand_braces(spec):
        if any(c in pat for c in "*?["):
            found += sorted(glob.glob(pat, recursive=True))
        elif os.path.exists(pat):
            found.append(pat)
        else:
            raise DataError(f"{pat}: no such file or directory (from the pattern {spec})")
    if not found:
        raise DataError(f"{spec}: the pattern matches no files")
    return [Path(q) for q in found]


def expand_sources(src) -> list[Path]:
    """The paths `src` names (see the module docstring), in order, without duplicates."""
    items = list(src) if isinstance(src, (list, tuple)) else [src]
    if not items:
        raise DataError("no input paths given")
    out: list[Path] = []
    for item in items:
        s = os.fspath(item)
        if os.path.exists(s):
            out.append(Path(s))
        elif s.startswith("@") and len(s) > 1:
            out += _read_list(s)
        elif _is_pattern(s):
            out += _expand_pattern(s)
        else:
            out.append(Path(s))
    seen: set[str] = set()
    return [q for q in out if not (str(q) in seen or seen.add(str(q)))]


def describe_sources(src) -> str:
    """One string for a tokens file's `source` attr: the absolute path, or the list/pattern
    as given (absolute), or the paths joined by spaces."""
    items = list(src) if isinstance(src, (list, tuple)) else [src]
    shown = []
    for item in items:
        s = os.fspath(item)
        shown.append("@" + os.path.abspath(s[1:]) if s.startswith("@") and not os.path.exists(s)
                     else os.path.abspath(s))
    return " ".join(shown)
