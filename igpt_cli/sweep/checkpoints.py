"""Which checkpoints a sweep covers: arguments → a sorted list of `Checkpoint`s.

An argument is one of:
- a model directory (`runs/a/step-000200`, `imagegpt-small/`) or anything else
  `model.resolve_model_dir` accepts (an OpenAI TensorFlow prefix `…/model.ckpt-131000`, a
  bundled name such as `igpt-cifar8`, family "bundled");
- a training run directory holding `step-*` directories (`igpt train --save-every`):
  its whole series, plus the run's final model when the run is finished and no `step-*`
  directory has its step;
- a glob (`runs/a/step-*`), for shells that do not expand it;
- any of these as `NAME=ARG`: the checkpoints' family (series) is NAME.

Without NAME the family is the run directory: the parent of a `step-*` directory, the
run directory itself for an expanded run, else the checkpoint's parent directory. Each
checkpoint gets a step: `step` in its `train_meta.json`, else the number in its name
(`step-000200`, `model.ckpt-131000`), else None.
"""
from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..bundled import bundled_dir
from ..errors import InputError
from ..jsonfile import read_json

STEP_DIR = "step-*"
_STEP_IN_NAME = re.compile(r"(?:step-|ckpt-)(\d+)$")
_FAMILY = re.compile(r"^([A-Za-z0-9_.+-]+)=(.+)$")


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of a sweep: where it is, its series and its place in it."""
    path: str  # as given (a directory or a TensorFlow prefix)
    family: str  # the series it belongs to (one line / one heatmap per family)
    name: str  # unique within its family; the sweep keeps its files in OUT/<family>/<name>/
    step: int | None  # training step, where known


def read_step(path: Path) -> int | None:
    """The training step of a checkpoint: its train_meta.json, else the number in its name."""
    meta = path / "train_meta.json"
    if meta.is_file():
        try:
            step = read_json(meta, "training record").get("step")
            if isinstance(step, int):
                return step
        except (OSError, ValueError, AttributeError):
            pass
    m = _STEP_IN_NAME.search(path.name)
    return int(m.group(1)) if m else None


def _finished_step(run: Path) -> int | None:
    """The last step of a finished training run (its model is final), else None (still training)."""
    try:
        meta = read_json(run / "train_meta.json", "training record")
    except (OSError, ValueError):
        return None
    step, steps = (meta.get("step"), meta.get("steps")) if isinstance(meta, dict) else (None, None)
    done = isinstance(step, int) and isinstance(steps, int) and step >= steps and (run / "config.json").is_file()
    return step if done else None


def _is_series(p: Path) -> bool:
    return p.is_dir() and any(d.is_dir() for d in p.glob(STEP_DIR))


def _expand_one(arg: str) -> list[tuple[Path, str | None, str | None]]:
    """(path, family or None, name or None) for one argument, family and name None where the default applies."""
    family = None
    m = _FAMILY.match(arg)
    if m and not Path(arg).exists():
        family, arg = m.group(1), m.group(2)
    p = Path(arg)
    shipped = bundled_dir(arg)
    if shipped is not None:   # a bundled name (a local path of that name wins)
        return [(shipped, family or "bundled", arg)]
    if not p.exists() and not Path(f"{arg}.index").is_file() and glob.has_magic(arg):
        found = sorted(glob.glob(arg))
        if not found:
            raise InputError(f"{arg}: no checkpoint matches this pattern")
        return [x for f in found for x in _expand_one(f"{family}={f}" if family else f)]
    if _is_series(p):
        fam = family or p.resolve().name
        steps = sorted(d for d in p.glob(STEP_DIR) if d.is_dir())
        out = [(d, fam, d.name) for d in steps]
        final = _finished_step(p)
        if final is not None and final not in {read_step(d) for d in steps}:
            out.append((p, fam, f"step-{final:06d}"))
        return out
    return [(p, family, None)]


def expand_checkpoints(args: Sequence[str | Path]) -> list[Checkpoint]:
    """The checkpoints the arguments name (module docstring), each once, sorted by family
    (in the order first named) and step. Nothing is loaded; a missing path is an InputError."""
    if isinstance(args, (str, Path)):
        args = [args]
    if not args:
        raise InputError("no checkpoints given")
    seen: dict[str, Checkpoint] = {}
    for arg in args:
        for p, family, name in _expand_one(str(arg)):
            if not p.exists() and not Path(f"{p}.index").is_file():
                raise InputError(f"{p}: no such checkpoint (a model directory, a training run with step-* "
                                 "directories, a TensorFlow checkpoint prefix, or a glob)")
            fam = family or (p.resolve().parent.name or "checkpoints")
            ck = Checkpoint(path=str(p), family=fam, name=name or (p.name if p.name not in ("", ".", "..") else p.resolve().name), step=read_step(p))
            for what, v in (("family", ck.family), ("name", ck.name)):
                if v in ("", ".", "..") or "/" in v or "\0" in v:
                    raise InputError(f"{arg}: {what} {v!r} cannot name a folder inside the output directory; "
                                     "name the series FAMILY=PATH with letters, digits, '.', '_', '+' or '-'")
            key = str(p.resolve())
            if key in seen:
                continue
            clash = next((c for c in seen.values() if (c.family, c.name) == (ck.family, ck.name)), None)
            if clash is not None:
                raise InputError(f"{p}: has the same family and name ({ck.family}/{ck.name}) as {clash.path}; "
                                 "name the series apart (FAMILY=PATH)")
            seen[key] = ck
    families = list(dict.fromkeys(c.family for c in seen.values()))
    return sorted(seen.values(), key=lambda c: (families.index(c.family), c.step is None, c.step or 0, c.name))
