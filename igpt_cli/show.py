"""`show_tokens` / `igpt show`: a grid picture of the images in a tokens file (decoded through its
own palette: what the model sees), or of the images a features file came from (`show_sources`).

Which rows: the first `n`; with `shuffle`, a random `n` fixed by `seed`; with `per_class=N`, one
grid row of N images per class in label order, each labelled with its class name on the left
(unlabelled rows last, as "unlabelled"). Tiles are nearest-upscaled by `scale`, by default the
smallest integer that makes each tile at least `TILE_PX` pixels a side (8×8 images: 8, 32×32: 2),
lowered where the grid would be too large.

The picture is written in the format the output's extension names (`IMAGE_FORMATS`: .png, .jpg,
.webp, .bmp, .tif, .gif, .ppm); other extensions, and a grid larger than `MAX_SIDE` pixels a side
or `MAX_PIXELS` in all, are refused before any work.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import ParameterError, check_positive
from .formats import FormatError
from .outputs import atomic_output, check_distinct, check_output_path
from .results import Result
from .seeds import check_seed
from .show_sources import Images, open_images

# output extension -> PIL format of `show_tokens`
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
                 ".tiff": "TIFF", ".gif": "GIF", ".ppm": "PPM"}
MAX_SIDE = 16383      # pixels a side of a `show` grid (WEBP's limit; JPEG's is 65535)
MAX_PIXELS = 100_000_000  # pixels of a `show` grid (300 MB of RGB in memory)
TILE_PX = 64          # the automatic scale makes every tile at least this many pixels a side
UNLABELLED = "unlabelled"  # the last per-class row: rows without a known class
_GAP = 2              # white pixels between tiles (before scaling)
_PAD = 6              # pixels around a row label


@dataclass
class ShowResult(Result):
    path: str                 # the picture written
    n: int                    # images shown
    rows: int
    cols: int
    width: int                # picture size in pixels
    height: int
    scale: int                # the upscaling used
    indices: list             # the file rows shown, a list per grid row
    label_width: int          # pixels of the class-label strip on the left (0: none)
    row_labels: Optional[list] = None   # per_class: each grid row's class name
    images_from: Optional[str] = None   # a features file: the tokens file or dataset its images were read from
    warnings: list = dataclasses.field(default_factory=list)  # e.g. a tokens file whose sha256 changed

    _omit_if_none = ("row_labels", "images_from")


def image_format(out: str | Path) -> str:
    """The PIL format an output's extension names (ParameterError `out` for any other extension)."""
    fmt = IMAGE_FORMATS.get(Path(out).suffix.lower())
    if fmt is None:
        exts = ", ".join(sorted(IMAGE_FORMATS))
        raise ParameterError("out", str(out), f"unknown image extension {Path(out).suffix or '(none)'!r}; "
                                              f"use one of {exts}")
    return fmt


def _too_large(height: int, width: int) -> bool:
    return max(height, width) > MAX_SIDE or height * width > MAX_PIXELS


def _check_grid_size(height: int, width: int, param: str, value) -> None:
    if _too_large(height, width):
        raise ParameterError(param, value, f"the grid would be {width}x{height} pixels; at most {MAX_SIDE} a side "
                                           f"and {MAX_PIXELS // 1_000_000} Mpx in all")


def select_rows(images: Images, *, n: int, cols: int | None, shuffle: bool, seed: int,
                per_class: int | None) -> tuple[list[np.ndarray], list[str] | None]:
    """The row indices of each grid row, and (per_class) each grid row's class name."""
    rng = np.random.default_rng(seed)
    if per_class is None:
        m = min(n, images.n)
        idx = rng.choice(images.n, m, replace=False) if shuffle else np.arange(m)
        cols = cols or math.ceil(math.sqrt(m))
        return [idx[i:i + cols] for i in range(0, m, cols)], None
    labels = images.labels()                                           # [N]
    known = np.arange(len(images.names)) if images.names else np.unique(labels[labels >= 0])
    groups = [(images.names[c] if images.names else str(c), np.flatnonzero(labels == c)) for c in known]
    groups.append((UNLABELLED, np.flatnonzero(~np.isin(labels, known))))
    picked = [(name, rng.choice(rows, min(per_class, len(rows)), replace=False) if shuffle else rows[:per_class])
              for name, rows in groups if len(rows)]
    return [rows for _, rows in picked], [name for name, _ in picked]


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _label_width(row_labels: list[str] | None) -> int:
    """Pixels of the strip that holds the row labels (0 without labels)."""
    if not row_labels:
        return 0
    font = _font()
    return int(math.ceil(max(font.getlength(s) for s in row_labels))) + 2 * _PAD


def _auto_scale(h: int, w: int, gh: int, gw: int, label_w: int) -> int:
    """The smallest scale making tiles TILE_PX a side, lowered until the picture fits the size limits."""
    s = max(1, math.ceil(TILE_PX / min(h, w)))
    while s > 1 and _too_large(gh * s, gw * s + label_w):
        s -= 1
    return s


def show_tokens(path: str | Path, out: str | Path, *, n: int = 64, cols: int | None = None, scale: int | None = None,
                shuffle: bool = False, seed: int = 0, per_class: int | None = None,
                overwrite: bool = False) -> ShowResult:
    """Draw rows of a tokens file (or the images a features file came from) as a grid picture
    (see the module docstring): `n` images in `cols` columns (default about square), or
    `per_class` images of each class in labelled rows; `scale` None picks one (`TILE_PX`)."""
    from PIL import Image, ImageDraw

    check_positive("n", n, allow_none=False)
    check_positive("scale", scale)
    check_positive("cols", cols)
    check_positive("per_class", per_class)
    check_seed(seed)
    fmt = image_format(out)
    out = check_output_path(out, overwrite)
    with contextlib.ExitStack() as stack:
        images = open_images(path, stack)
        origin = images.origin if images.origin and Path(images.origin).exists() else None
        check_distinct({"out": out}, {"path": path, "origin": origin})  # a features file's images: its tokens file
        h, w = images.height, images.width
        groups, row_labels = select_rows(images, n=n, cols=cols, shuffle=shuffle, seed=seed, per_class=per_class)
        if not groups:
            raise FormatError(f"{path}: no rows to show")
        n_cols = per_class or cols or len(groups[0])
        gh, gw = len(groups) * (h + _GAP) + _GAP, n_cols * (w + _GAP) + _GAP
        label_w = _label_width(row_labels)
        given = ("per_class", per_class) if per_class else ("cols", cols) if cols else ("n", n)
        _check_grid_size(gh, gw + label_w, *given)
        if scale is None:
            scale = _auto_scale(h, w, gh, gw, label_w)
        _check_grid_size(gh * scale, gw * scale + label_w, "scale", scale)
        shown = np.concatenate(groups)
        idx = np.unique(shown)                      # sorted: HDF5 and datasets read in row order
        tiles = images.read(idx)[np.searchsorted(idx, shown)]  # [m, H, W, 3] in grid order
    grid = np.full((gh, gw, 3), 255, dtype=np.uint8)
    k = 0
    for r, g in enumerate(groups):
        for c in range(len(g)):
            y, x = _GAP + r * (h + _GAP), _GAP + c * (w + _GAP)
            grid[y:y + h, x:x + w] = tiles[k]
            k += 1
    img = Image.fromarray(grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), resample=Image.NEAREST)
    if row_labels:
        canvas = Image.new("RGB", (img.width + label_w, img.height), "white")
        canvas.paste(img, (label_w, 0))
        draw, font = ImageDraw.Draw(canvas), _font()
        for r, name in enumerate(row_labels):
            y = (_GAP + r * (h + _GAP) + h / 2) * scale   # the middle of the row's tiles
            draw.text((_PAD, y), name, fill="black", font=font, anchor="lm")
        img = canvas
    with atomic_output(out) as tmp:
        img.save(tmp, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    return ShowResult(path=str(out), n=len(shown), rows=len(groups), cols=n_cols, width=img.width,
                      height=img.height, scale=scale, indices=[[int(i) for i in g] for g in groups], label_width=label_w,
                      row_labels=row_labels, images_from=images.origin, warnings=images.warnings)
