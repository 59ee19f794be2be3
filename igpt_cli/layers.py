"""`--layer` specs, shared by `extract` (layers of a model) and `probe` (layers in a file)."""
from __future__ import annotations

import re
from typing import Iterable, Sequence

from .errors import InputError

_RANGE = re.compile(r"^(-?\d+)\s*(?:-|\.\.|:)\s*(-?\d+)$")


def format_layers(layers: Sequence[int]) -> str:
    layers = list(layers)
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return ",".join(str(x) for x in layers)


def parse_layers(spec: str | int | Sequence[str | int] | None, available: Iterable[int],
                 where: str = "the model") -> list[int]:
    """Resolve layer specs against the `available` layers into a sorted unique list.

    Items: integers, negative integers (-1 is the last available layer), inclusive
    ranges "8-16" (also "8..16", "-4--1"; they select the available layers inside),
    "all"; items may be repeated or comma-separated. None/empty means "all".
    """
    avail = sorted(int(a) for a in available)
    if spec is None:
        items: list[str] = ["all"]
    elif isinstance(spec, (str, int)):
        items = [str(spec)]
    else:
        items = [str(s) for s in spec]
    parts = [p.strip() for item in items for p in item.split(",") if p.strip()] or ["all"]
    have = f"{where} has layers {format_layers(avail)}"

    def norm(v: int, part: str) -> int:
        if v < 0:
            if -v > len(avail):
                raise InputError(f"layer {part}: out of range, {have} (or -{len(avail)}..-1)")
            return avail[v]
        if v not in avail:
            raise InputError(f"layer {part}: out of range, {have}")
        return v

    out: set[int] = set()
    for p in parts:
        if p.lower() == "all":
            out.update(avail)
        elif re.fullmatch(r"-?\d+", p):
            out.add(norm(int(p), p))
        elif m := _RANGE.match(p):
            a, b = (int(g) for g in m.groups())
            a, b = (avail[x] if x < 0 and -x <= len(avail) else x for x in (a, b))
            if a > b:
                raise InputError(f"layer range {p}: start is after end")
            sel = [x for x in avail if a <= x <= b]
            if not sel:
                raise InputError(f"layer range {p}: no layer inside it, {have}")
            out.update(sel)
        else:
            raise InputError(f"layer {p!r}: expected an integer, a range like 8-16, or 'all'")
    return sorted(out)
