"""Typed results: every stage returns a dataclass; `to_dict()` is the JSON the CLI prints."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np


def _plain(o):
    if isinstance(o, Result):
        return o.to_dict()
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return {f.name: _plain(getattr(o, f.name)) for f in dataclasses.fields(o)}
    if isinstance(o, dict):
        return {k: _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_plain(v) for v in o]
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return o


class Result:
    """Mixin for result dataclasses: fields in declaration order; fields listed in
    `_omit_if_none` are left out of `to_dict()` when they are None."""

    _omit_if_none: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        for k in self._omit_if_none:
            if d.get(k) is None:
                d.pop(k, None)
        return d

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)
