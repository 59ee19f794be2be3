"""The quantize stage: any image dataset -> an `igpt-tokens` HDF5 file, streamed.

Library entry points (no CLI needed):
- `quantize_dataset(src, out, ...) -> QuantizeResult`
- `fit_palette_file(src, out, ...) -> PaletteFitResult` (a new palette for your own domain)

Reading and inspecting the files they write: `igpt_cli.fileinfo`.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import h5py
import numpy as np

from .data import EmptyDatasetError, open_dataset
from .errors import check_positive
from .formats import append_rows, create_tokens_file
from .outputs import atomic_output, check_output_path
from .palette import Palette, check_fit_parameters, fit_palette
from .progress import OnProgress, Reporter
from .results import Result


@dataclass
class QuantizeResult(Result):
    path: str           # the tokens file written
    n: int              # images quantized
    height: int
    width: int
    classes: int        # number of class names
    seconds: float
    skipped: int        # unreadable images skipped (skip_bad=True)
    unlabeled: int      # images without a class (label -1)
    format: str         # the dataset format read: imagefolder, cifar, npz, npy
    split: str


@dataclass
class PaletteFitResult(Result):
    path: str                # the palette .npy written
    k: int                   # colours fitted (fewer than asked when the data has fewer distinct colours)
    pixels: Optional[int]    # pixels sampled (None when the dataset size is unknown)
    seconds: float
    skipped: int             # unreadable images skipped (skip_bad=True)


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
    on_progress: OnProgress | None = None,
) -> QuantizeResult:
    """Quantize the dataset at `src` (see `igpt_cli.data.open_dataset` for the dataset
    parameters) into the tokens file `out`, with `palette` (None: the official iGPT one).

    Memory is bounded (one batch of images plus the palette's 32 MiB colour lookup
    table); `out` only appears when complete. Raises `InputError` subclasses on bad input.
    Progress: "quantize" events counting images, the first once the dataset is open.
    """
    t0 = time.perf_counter()
    check_positive("batch_size", batch_size, allow_none=False)
    out = check_output_path(out, overwrite)
    pal = _palette(palette)
    ds = open_dataset(src, split=split, size=size, resize=resize, fmt=fmt, limit=limit, skip_bad=skip_bad)
    split, resize = ds.split, ds.resize  # plain strings (Enum members accepted)
    progress = Reporter(on_progress, "quantize", total=ds.n, unit="image")
    progress.start()
    n = 0
    with atomic_output(out) as tmp:
        with h5py.File(tmp, "w") as f:
            create_tokens_file(f, height=size, width=size, palette=pal.centers, class_names=ds.class_names,
                               split=split, source=os.path.abspath(src), resize=resize)
            for imgs, labels, sources in ds.batches(batch_size):
                n = append_rows(f, tokens=pal.quantize(imgs), labels=labels,  # [B, S, S, 3] -> [B, S*S]
                                sources=np.asarray(sources, dtype=object))
                progress.advance(len(imgs))
            if n == 0:
                extra = f" ({ds.skipped} unreadable images skipped)" if ds.skipped else ""
                raise EmptyDatasetError(f"{src}: no images to quantize{extra}")
            unlabeled = int(np.count_nonzero(f["labels"][:] == -1))
    return QuantizeResult(path=str(out), n=n, height=size, width=size, classes=len(ds.class_names),
                          seconds=round(time.perf_counter() - t0, 3), skipped=ds.skipped, unlabeled=unlabeled,
                          format=ds.kind, split=split)


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
    on_progress: OnProgress | None = None,
) -> PaletteFitResult:
    """Fit a k-colour palette (MiniBatchKMeans on `sample_pixels` sampled pixels) on the
    dataset at `src` and save it as a `.npy` (float32 [k, 3] in [-1, 1]).
    Progress: "palette" events counting the images read."""
    t0 = time.perf_counter()
    check_fit_parameters(k, sample_pixels)
    out = check_output_path(out, overwrite)
    ds = open_dataset(src, split=split, size=size, resize=resize, fmt=fmt, limit=limit, skip_bad=skip_bad)
    progress = Reporter(on_progress, "palette", total=ds.n, unit="image")
    progress.start()

    def images() -> Iterator[np.ndarray]:
        for imgs in ds.images():
            yield imgs
            progress.advance(len(imgs))

    pal = fit_palette(images(), k=k, sample_pixels=sample_pixels, seed=seed)
    with atomic_output(out) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, pal.centers)
    return PaletteFitResult(path=str(out), k=pal.k, pixels=min(sample_pixels, (ds.n or 0) * size * size) or None,
                            seconds=round(time.perf_counter() - t0, 3), skipped=ds.skipped)
