"""Looking inside igpt files: `file_info` summarizes any tokens or features file
(kind, dataset shapes, class counts, attrs); `show_tokens` decodes the first rows of a
tokens file through its own palette into an image grid, to see what the model sees.

`show_tokens` writes the format the output's extension names (`IMAGE_FORMATS`: .png,
.jpg, .webp, .bmp, .tif, .gif, .ppm) and refuses others, and a grid larger than
`MAX_SIDE` pixels a side or `MAX_PIXELS` in all, before any work.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from . import formats
from .errors import ParameterError, check_positive
from .formats import FormatError, open_igpt
from .outputs import atomic_output, check_output_path
from .palette import Palette
from .results import Result

_JSON_ATTRS = ("class_names", "layers", "model_config")  # attrs stored as JSON text, shown decoded
_LABEL_CHUNK = 1 << 20  # labels counted this many at a time (bounded memory for huge files)
# output extension -> PIL format of `show_tokens`
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
                 ".tiff": "TIFF", ".gif": "GIF", ".ppm": "PPM"}
MAX_SIDE = 16383      # pixels a side of a `show` grid (WEBP's limit; JPEG's is 65535)
MAX_PIXELS = 100_000_000  # pixels of a `show` grid (300 MB of RGB in memory)


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
    """Summary of an igpt tokens or features file (any format_version this igpt reads).

    FormatError (one line) for a file that is not one, or whose `class_names`, `layers` or
    `model_config` attr is not the JSON it should be."""
    with open_igpt(path) as f:
        attrs = formats.read_attrs(f)
        names = formats.class_names(f, path)
        decoded = {k: formats.json_attr(f, k, path) for k in _JSON_ATTRS if k in f.attrs}
        datasets = {}

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                datasets[name] = {"shape": list(obj.shape), "dtype": str(obj.dtype)}

        f.visititems(visit)
        lab = f.get("labels")
        labelled = isinstance(lab, h5py.Dataset) and lab.ndim == 1 and lab.dtype.kind in "ui"
        n = int(lab.shape[0]) if labelled else None
        counts = _class_counts(lab, n, names) if labelled else None
    other = {k: v for k, v in attrs.items() if k not in ("format", "format_version")}
    other.update(decoded)
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


def image_format(out: str | Path) -> str:
    """The PIL format an output's extension names (ParameterError `out` for any other extension)."""
    fmt = IMAGE_FORMATS.get(Path(out).suffix.lower())
    if fmt is None:
        exts = ", ".join(sorted(IMAGE_FORMATS))
        raise ParameterError("out", str(out), f"unknown image extension {Path(out).suffix or '(none)'!r}; "
                                              f"use one of {exts}")
    return fmt


def grid_shape(m: int, h: int, w: int, cols: int | None) -> tuple[int, int, int, int]:
    """(rows, cols, grid height, grid width) of m cells of h x w pixels with 2-pixel gaps."""
    cols = cols or math.ceil(math.sqrt(m))
    rows = math.ceil(m / cols)
    return rows, cols, rows * (h + _GAP) + _GAP, cols * (w + _GAP) + _GAP


_GAP = 2


def _check_grid_size(height: int, width: int, param: str, value) -> None:
    if max(height, width) > MAX_SIDE or height * width > MAX_PIXELS:
        raise ParameterError(param, value, f"the grid would be {width}x{height} pixels; at most {MAX_SIDE} a side "
                                           f"and {MAX_PIXELS // 1_000_000} Mpx in all")


def show_tokens(path: str | Path, out: str | Path, *, n: int = 64, cols: int | None = None, scale: int = 2,
                overwrite: bool = False) -> ShowResult:
    """Decode the first `n` rows of a tokens file through its palette into an image grid
    (`cols` columns, default about square; 2-pixel white gaps; `scale`× nearest upscaling),
    written in the format `out`'s extension names (`IMAGE_FORMATS`)."""
    from PIL import Image

    check_positive("n", n, allow_none=False)
    check_positive("scale", scale, allow_none=False)
    check_positive("cols", cols)
    fmt = image_format(out)
    out = check_output_path(out, overwrite)
    with open_igpt(path, expected=formats.TOKENS_FORMAT) as f:
        tok, h, w, palette = formats.tokens_layout(f, path)
        total = tok.shape[0]
        if total == 0:
            raise FormatError(f"{path}: tokens file has no rows")
        m = min(n, total)
        given_cols = cols
        rows, cols, gh, gw = grid_shape(m, h, w, cols)
        _check_grid_size(gh, gw, *(("cols", given_cols) if given_cols else ("n", n)))
        _check_grid_size(gh * scale, gw * scale, "scale", scale)
        tokens = tok[:m]
        pal = Palette(palette, source=f"{path}:palette")
    try:
        imgs = pal.decode(tokens, h, w)  # [m, H*W] -> [m, H, W, 3]
    except ValueError as e:
        raise FormatError(f"{path}: {e}") from None
    grid = np.full((gh, gw, 3), 255, dtype=np.uint8)
    for i, im in enumerate(imgs):
        r, c = divmod(i, cols)
        y, x = _GAP + r * (h + _GAP), _GAP + c * (w + _GAP)
        grid[y:y + h, x:x + w] = im
    img = Image.fromarray(grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), resample=Image.NEAREST)
    with atomic_output(out) as tmp:
        img.save(tmp, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    return ShowResult(path=str(out), n=m, rows=rows, cols=cols, width=img.width, height=img.height)
