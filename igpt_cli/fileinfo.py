"""Looking inside igpt files: `file_info` summarizes any tokens or features file
(kind, dataset shapes, class counts, attrs); `show_tokens` decodes the first rows of a
tokens file through its own palette into a PNG grid, to see what the model sees.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from . import formats
from .errors import check_positive
from .formats import FormatError, open_igpt
from .outputs import atomic_output, check_output_path
from .palette import Palette
from .results import Result

_JSON_ATTRS = ("class_names", "layers", "model_config")  # attrs stored as JSON text, shown decoded
_LABEL_CHUNK = 1 << 20  # labels counted this many at a time (bounded memory for huge files)


@dataclass
class FileInfo(Result):
    path: str
    kind: Optional[str]                # "igpt-tokens" or "igpt-features"
    format_version: Optional[int]
    datasets: dict                     # HDF5 dataset name ("features/12" in groups) -> {"shape", "dtype"}
    n: Optional[int]                   # rows (None without a labels dataset)
    class_counts: Optional[dict]       # class name -> rows, plus "(unlabeled)" when any; left out when n is None
    classes: list                      # class names
    attrs: dict                        # the other file attributes (provenance, model config, …)

    _omit_if_none = ("class_counts",)


@dataclass
class ShowResult(Result):
    path: str      # the PNG written
    n: int         # images shown
    rows: int
    cols: int
    width: int     # PNG size in pixels
    height: int


def file_info(path: str | Path) -> FileInfo:
    """Summary of an igpt tokens or features file (any format_version this igpt reads)."""
    with open_igpt(path) as f:
        attrs = formats.read_attrs(f)
        names = formats.class_names(f)
        datasets = {}
        for key in f:
            if isinstance(f[key], h5py.Dataset):
                datasets[key] = {"shape": list(f[key].shape), "dtype": str(f[key].dtype)}
            else:
                for sub in f[key]:
                    ds = f[key][sub]
                    datasets[f"{key}/{sub}"] = {"shape": list(ds.shape), "dtype": str(ds.dtype)}
        n = int(f["labels"].shape[0]) if "labels" in f else None
        counts = _class_counts(f["labels"], n, names) if n is not None else None
    other = {k: v for k, v in attrs.items() if k not in ("format", "format_version")}
    for k in _JSON_ATTRS:
        if isinstance(other.get(k), str):
            try:
                other[k] = json.loads(other[k])
            except ValueError:
                pass
    return FileInfo(path=str(path), kind=attrs.get("format"), format_version=attrs.get("format_version"),
                    datasets=datasets, n=n, class_counts=counts, classes=names, attrs=other)


def _class_counts(labels: h5py.Dataset, n: int, names: list[str]) -> dict[str, int]:
    """Rows per class name; labels outside the classes count as "(unlabeled)" (only when any)."""
    bc = np.zeros(len(names) + 1, dtype=np.int64)  # [0]: unlabeled, [i + 1]: class i
    for i in range(0, n, _LABEL_CHUNK):
        lab = labels[i:i + _LABEL_CHUNK]
        lab = np.where((lab >= 0) & (lab < len(names)), lab, -1)
        bc += np.bincount(lab + 1, minlength=len(names) + 1)
    counts = {c: int(bc[i + 1]) for i, c in enumerate(names)}
    if bc[0]:
        counts["(unlabeled)"] = int(bc[0])
    return counts


def show_tokens(path: str | Path, out: str | Path, *, n: int = 64, cols: int | None = None, scale: int = 2,
                overwrite: bool = False) -> ShowResult:
    """Decode the first `n` rows of a tokens file through its palette into a PNG grid
    (`cols` columns, default about square; 2-pixel white gaps; `scale`× nearest upscaling)."""
    from PIL import Image

    check_positive("n", n, allow_none=False)
    check_positive("scale", scale, allow_none=False)
    out = check_output_path(out, overwrite)
    with open_igpt(path, expected=formats.TOKENS_FORMAT) as f:
        h, w = int(f.attrs["height"]), int(f.attrs["width"])
        total = f["tokens"].shape[0]
        if total == 0:
            raise FormatError(f"{path}: tokens file has no rows")
        m = min(n, total)
        tokens = f["tokens"][:m]
        pal = Palette(f["palette"][:], source=f"{path}:palette")
    try:
        imgs = pal.decode(tokens, h, w)  # [m, H*W] -> [m, H, W, 3]
    except ValueError as e:
        raise FormatError(f"{path}: {e}") from None
    cols = cols or math.ceil(math.sqrt(m))
    rows = math.ceil(m / cols)
    gap = 2
    grid = np.full((rows * (h + gap) + gap, cols * (w + gap) + gap, 3), 255, dtype=np.uint8)
    for i, im in enumerate(imgs):
        r, c = divmod(i, cols)
        grid[gap + r * (h + gap):gap + r * (h + gap) + h, gap + c * (w + gap):gap + c * (w + gap) + w] = im
    img = Image.fromarray(grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), resample=Image.NEAREST)
    with atomic_output(out) as tmp:
        img.save(tmp, format="PNG")
    return ShowResult(path=str(out), n=m, rows=rows, cols=cols, width=img.width, height=img.height)
