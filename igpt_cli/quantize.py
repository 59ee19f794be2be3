"""The quantize stage: any image dataset -> an `igpt-tokens` HDF5 file, streamed.

Library entry points (no CLI needed):
- `quantize_dataset(src, out, ...) -> summary dict`
- `fit_palette_file(src, out, ...) -> summary dict`
- `file_info(path) -> dict` (tokens or features files)
- `show_tokens(tokens_h5, out_png, n=64) -> summary dict`
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from . import formats
from .data import EmptyDatasetError, open_dataset
from .formats import FormatError, append_rows, atomic_output, check_output_path, create_tokens_file, open_igpt
from .palette import Palette, fit_palette

Progress = Callable[[int], None]


def _palette(palette) -> Palette:
    return palette if isinstance(palette, Palette) else Palette.load(palette)


def quantize_dataset(
    src: str | Path,
    out: str | Path,
    *,
    split: str = "all",
    size: int = 32,
    palette: "Palette | str | Path | None" = None,
    limit: int | None = None,
    resize: str = "bilinear",
    fmt: str | None = None,
    skip_bad: bool = False,
    overwrite: bool = False,
    batch_size: int = 256,
    on_start: Callable[[int | None], None] | None = None,
    progress: Progress | None = None,
) -> dict:
    """Quantize the dataset at `src` into the tokens file `out`.

    Memory is bounded (one batch of images plus the palette's 32 MiB colour lookup
    table); `out` only appears when complete. Raises `InputError` subclasses on bad input.
    `on_start(total)` is called once the dataset is opened, `progress(k)` after each batch.
    """
    t0 = time.perf_counter()
    out = check_output_path(out, overwrite)
    pal = _palette(palette)
    ds = open_dataset(src, split=split, size=size, resize=resize, fmt=fmt, limit=limit, skip_bad=skip_bad)
    if on_start:
        on_start(ds.n)
    n = 0
    with atomic_output(out) as tmp:
        with h5py.File(tmp, "w") as f:
            create_tokens_file(f, height=size, width=size, palette=pal.centers, class_names=ds.class_names,
                               split=split, source=os.path.abspath(src), resize=resize)
            for imgs, labels, sources in ds.batches(batch_size):
                n = append_rows(f, tokens=pal.quantize(imgs), labels=labels,
                                sources=np.asarray(sources, dtype=object))
                if progress:
                    progress(len(imgs))
            if n == 0:
                extra = f" ({ds.skipped} unreadable images skipped)" if ds.skipped else ""
                raise EmptyDatasetError(f"{src}: no images to quantize{extra}")
            counts = np.bincount(f["labels"][:] + 1, minlength=len(ds.class_names) + 1) if n else None
    return {
        "path": str(out),
        "n": n,
        "height": size,
        "width": size,
        "classes": len(ds.class_names),
        "seconds": round(time.perf_counter() - t0, 3),
        "skipped": ds.skipped,
        "unlabeled": int(counts[0]),
        "format": ds.kind,
        "split": split,
    }


def fit_palette_file(
    src: str | Path,
    out: str | Path,
    *,
    k: int = 512,
    sample_pixels: int = 1_000_000,
    split: str = "all",
    size: int = 32,
    limit: int | None = None,
    resize: str = "bilinear",
    fmt: str | None = None,
    skip_bad: bool = False,
    overwrite: bool = False,
    seed: int = 0,
) -> dict:
    """Fit a k-colour palette (MiniBatchKMeans) on a dataset and save it as a `.npy`."""
    from .errors import InputError

    t0 = time.perf_counter()
    if not (1 <= k <= 65535):
        raise InputError(f"-k must be between 1 and 65535, got {k}")
    if sample_pixels < 1:
        raise InputError(f"--sample-pixels must be positive, got {sample_pixels}")
    out = check_output_path(out, overwrite)
    ds = open_dataset(src, split=split, size=size, resize=resize, fmt=fmt, limit=limit, skip_bad=skip_bad)
    pal = fit_palette(ds.images(), k=k, sample_pixels=sample_pixels, seed=seed)
    with atomic_output(out) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, pal.centers)
    return {"path": str(out), "k": pal.k, "pixels": min(sample_pixels, (ds.n or 0) * size * size) or None,
            "seconds": round(time.perf_counter() - t0, 3), "skipped": ds.skipped}


def file_info(path: str | Path) -> dict:
    """Summary of an igpt tokens or features file."""
    with open_igpt(path) as f:
        attrs = formats.read_attrs(f)
        kind = attrs.get("format")
        names = formats.class_names(f)
        info: dict = {"path": str(path), "kind": kind, "format_version": attrs.get("format_version")}
        shapes = {}
        for key in f:
            if isinstance(f[key], h5py.Dataset):
                shapes[key] = {"shape": list(f[key].shape), "dtype": str(f[key].dtype)}
            else:
                for sub in f[key]:
                    ds = f[key][sub]
                    shapes[f"{key}/{sub}"] = {"shape": list(ds.shape), "dtype": str(ds.dtype)}
        info["datasets"] = shapes
        n = int(f["labels"].shape[0]) if "labels" in f else None
        info["n"] = n
        if n is not None:
            counts = {}
            labels = f["labels"]
            bc = np.zeros(len(names) + 1, dtype=np.int64)
            for i in range(0, n, 1 << 20):
                lab = labels[i:i + (1 << 20)]
                lab = np.where((lab >= 0) & (lab < len(names)), lab, -1)
                bc += np.bincount(lab + 1, minlength=len(names) + 1)
            for i, c in enumerate(names):
                counts[c] = int(bc[i + 1])
            if bc[0]:
                counts["(unlabeled)"] = int(bc[0])
            info["class_counts"] = counts
        info["classes"] = names
        info["attrs"] = {k: v for k, v in attrs.items() if k not in ("format", "format_version")}
        for k in ("class_names", "layers", "model_config"):
            if isinstance(info["attrs"].get(k), str):
                try:
                    info["attrs"][k] = json.loads(info["attrs"][k])
                except ValueError:
                    pass
    return info


def show_tokens(path: str | Path, out: str | Path, *, n: int = 64, cols: int | None = None, scale: int = 2,
                overwrite: bool = False) -> dict:
    """Decode the first `n` rows of a tokens file through its palette into a PNG grid."""
    from PIL import Image

    from .errors import InputError

    if n < 1 or scale < 1:
        raise InputError("--n and --scale must be positive")
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
        imgs = pal.decode(tokens, h, w)
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
    return {"path": str(out), "n": m, "rows": rows, "cols": cols, "width": img.width, "height": img.height}
