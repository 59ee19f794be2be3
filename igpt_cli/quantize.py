"""The quantize stage: any image dataset -> an `igpt-tokens` HDF5 file, streamed.

Library entry points (no CLI needed):
- `quantize_dataset(src, out, ...) -> QuantizeResult`
- `fit_palette_file(src, out, ...) -> PaletteFitResult` (a new palette for your own domain)

Reading and inspecting the files they write: `igpt_cli.fileinfo`.

Both refuse bad parameters and inputs before any output appears (a cut archive included),
report warnings (a limit that leaves classes empty, unsafe archive member names skipped)
as "warning: …" progress log lines and in the result's `warnings`, and turn a full disk
into one `DiskFullError`: up front when the data cannot fit, else at the first failed
write, the temp file closed without another write and removed.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from .data import (DEFAULT_SIZE, IMAGE_EXTS, TAR_SUFFIXES, EmptyDatasetError, check_dataset_parameters,
                   describe_sources, images_per_batch, open_dataset)
from .errors import ParameterError, check_positive
from .formats import append_rows, create_tokens_file
from .outputs import (OutputError, atomic_output, hdf5_output, check_distinct, check_free_space, check_output_path, disk_full,
                      is_disk_full)
from .palette import Palette, check_fit_parameters, fit_palette
from .progress import OnProgress, Reporter
from .results import Result



class _Warnings(Result):
    """Results with a `warnings` list, left out of `to_dict()` when empty."""

    def to_dict(self) -> dict:
        d = super().to_dict()
        if not d.get("warnings"):
            d.pop("warnings", None)
        return d


@dataclass
class QuantizeResult(_Warnings):
    path: str           # the tokens file written
    n: int              # images quantized
    height: int
    width: int
    classes: int        # number of class names
    seconds: float
    skipped: int        # unreadable images skipped (skip_bad=True)
    unlabelled: int      # images without a class (label -1)
    format: str         # the dataset format read: imagefolder, cifar, npz, npy
    split: str
    warnings: list[str] = field(default_factory=list)  # also logged as "warning: …"; omitted when empty


@dataclass
class PaletteFitResult(_Warnings):
    path: str                # the palette .npy written
    k: int                   # colours fitted (fewer than asked when the data has fewer distinct colours)
    pixels: Optional[int]    # pixels sampled (None when the dataset size is unknown)
    seconds: float
    skipped: int             # unreadable images skipped (skip_bad=True)
    warnings: list[str] = field(default_factory=list)  # also logged as "warning: …"; omitted when empty


def _palette(palette) -> Palette:
    return palette if isinstance(palette, Palette) else Palette.load(palette)


DATA_SUFFIXES = (*IMAGE_EXTS, *TAR_SUFFIXES, ".zip", ".npz", ".npy", ".parquet", ".arrow")  # what a reader reads


def _check_outputs(out: Path, src, ds, palette=None) -> None:
    """`out` is none of the dataset's inputs (the paths `src` names, an @list file, the palette file)
    and, when it exists, not a file a reader would take from an input directory (an image the run
    reads), however it is spelled (outputs.check_distinct)."""
    items = list(src) if isinstance(src, (list, tuple)) else [src]
    inputs = {("src" if len(ds.paths) == 1 else f"src[{i}]"): p for i, p in enumerate(ds.paths)}
    inputs.update({os.fspath(s): os.fspath(s)[1:] for s in items if os.fspath(s).startswith("@")})
    if isinstance(palette, (str, Path)):
        inputs["palette"] = palette
    check_distinct({"out": out}, inputs)
    if out.exists() and out.name.lower().endswith(DATA_SUFFIXES):
        real = os.path.realpath(out)
        for p in ds.paths:
            if p.is_dir() and real.startswith(os.path.realpath(p) + os.sep):
                raise OutputError(f"{out}: out would overwrite a file inside the input directory {p}, which the "
                                  "run reads; write it to another file")


def _report_warnings(ds, progress: Reporter, done: int = 0) -> int:
    """Log the dataset's warnings from index `done` on; returns how many are logged now."""
    for w in ds.warnings[done:]:
        progress.log(f"warning: {w}")
    return len(ds.warnings)


def quantize_dataset(
    src: "str | Path | list[str | Path]",
    out: str | Path,
    *,
    split: str = "all",
    size: int | None = None,
    palette: "Palette | str | Path | None" = None,
    limit: int | None = None,
    limit_per_class: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    resize: str = "bilinear",
    fmt: str | None = None,
    skip_bad: bool = False,
    max_pixels: int | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    overwrite: bool = False,
    batch_size: int = 256,
    on_progress: OnProgress | None = None,
) -> QuantizeResult:
    """Quantize the dataset at `src` (see `igpt_cli.data.open_dataset` for the dataset
    parameters: split, size, limit, limit_per_class, shuffle, seed, resize, fmt, skip_bad,
    max_pixels, image_column, label_column) into the tokens file `out`, with `palette`
    (None: the official iGPT one). `size` None: 32, or the side of pre-quantized tokens.

    OpenAI's pre-quantized datasets (``cifar10_trX.npy`` …, `igpt_cli.data.tokens`) are
    copied as they are, not re-quantized, with the official palette (a different
    `palette` or `size` is refused).

    Memory is bounded (one batch of images plus the palette's 32 MiB colour lookup
    table); `out` only appears when complete. Raises `InputError` subclasses on bad input
    (`DiskFullError` when the file system is full). Progress: "quantize" events counting
    images, the first once the dataset is open; warnings as "warning: …" log events.
    """
    t0 = time.perf_counter()
    check_positive("batch_size", batch_size, allow_none=False)
    image_size = DEFAULT_SIZE if size is None else size  # None: 32, or a pre-quantized file's own side
    check_dataset_parameters(size=image_size, limit=limit, limit_per_class=limit_per_class, seed=seed,
                             max_pixels=max_pixels)
    out = check_output_path(out, overwrite)
    pal = _palette(palette)
    ds = open_dataset(src, split=split, size=image_size, resize=resize, fmt=fmt, limit=limit, skip_bad=skip_bad,
                      limit_per_class=limit_per_class, shuffle=shuffle, seed=seed, max_pixels=max_pixels,
                      image_column=image_column, label_column=label_column)
    _check_outputs(out, src, ds, palette)
    split, resize = ds.split, ds.resize  # plain strings (Enum members accepted)
    tokens_in = getattr(ds, "token_batches", None)  # pre-quantized: copied, not re-quantized
    if tokens_in is not None:
        size = _check_pre_quantized(ds, size, palette)
        pal = Palette(ds.palette, source="igpt512")
        split = ds.splits[0] if split == "all" and ds.splits else split  # the file's own split
    size = image_size if size is None else size
    if ds.n is not None and not skip_bad:  # the rows alone (tokens, labels) must fit: refuse before writing
        check_free_space(out, ds.n * (size * size * 2 + 8))
    batch_size = images_per_batch(size, batch_size)
    progress = Reporter(on_progress, "quantize", total=ds.n, unit="image")
    progress.start()
    logged = _report_warnings(ds, progress)
    n = 0
    with atomic_output(out) as tmp, hdf5_output(tmp, out) as f:
        create_tokens_file(f, height=size, width=size, palette=pal.centers, class_names=ds.class_names,
                           split=split, source=describe_sources(src), resize=resize)
        rows = {name: f[name] for name in ("tokens", "labels", "sources")}  # kept open: no flush on every close
        batches = tokens_in(batch_size) if tokens_in else _quantized(ds.batches(batch_size), pal)
        with contextlib.closing(batches):  # closing ends the decode pool at once
            for tokens, labels, sources in batches:
                n = append_rows(rows, tokens=tokens, labels=labels, sources=np.asarray(sources, dtype=object))
                f.flush()
                progress.advance(len(tokens))
        logged = _report_warnings(ds, progress, logged)
        if n == 0:
            extra = f" ({ds.skipped} unreadable images skipped)" if ds.skipped else ""
            raise EmptyDatasetError(f"{src}: no images to quantize{extra}")
        unlabelled = int(np.count_nonzero(rows["labels"][:] == -1))
    return QuantizeResult(path=str(out), n=n, height=size, width=size, classes=len(ds.class_names),
                          seconds=round(time.perf_counter() - t0, 3), skipped=ds.skipped, unlabelled=unlabelled,
                          format=ds.kind, split=split, warnings=list(ds.warnings))


def _quantized(batches: Iterator, pal: Palette) -> Iterator:
    """(tokens [B, S*S], labels, sources) from (images [B, S, S, 3], labels, sources)."""
    with contextlib.closing(batches):
        for imgs, labels, sources in batches:
            yield pal.quantize(imgs), labels, sources


def _check_pre_quantized(ds, size: int | None, palette) -> int:
    """The side of pre-quantized tokens; a `size` or `palette` other than theirs is an error."""
    if size is not None and size != ds.side:
        raise ParameterError("size", size, f"{ds.path.name} holds pre-quantized {ds.side}×{ds.side} tokens; "
                                           "they are copied, not resized (leave size out)")
    if palette is not None and not np.array_equal(_palette(palette).centers, ds.palette):
        raise ParameterError("palette", str(palette), f"{ds.path.name} holds tokens of the official iGPT palette; "
                                                      "they are copied, not re-quantized (leave palette out)")
    return ds.side


def fit_palette_file(
    src: str | Path,
    out: str | Path,
    *,
    k: int = 512,
    sample_pixels: int = 1_000_000,
    split: str = "all",
    size: int = 32,
    limit: int | None = None,
    limit_per_class: int | None = None,
    shuffle: bool = False,
    resize: str = "bilinear",
    fmt: str | None = None,
    skip_bad: bool = False,
    max_pixels: int | None = None,
    overwrite: bool = False,
    seed: int = 0,
    on_progress: OnProgress | None = None,
) -> PaletteFitResult:
    """Fit a k-colour palette (MiniBatchKMeans on `sample_pixels` sampled pixels) on the
    dataset at `src` and save it as a `.npy` (float32 [k, 3] in [-1, 1]). `seed` seeds
    the shuffle, the pixel sampling and k-means. Progress: "palette" events counting the
    images read; warnings as "warning: …" log events."""
    t0 = time.perf_counter()
    check_fit_parameters(k, sample_pixels)
    check_dataset_parameters(size=size, limit=limit, limit_per_class=limit_per_class, seed=seed,
                             max_pixels=max_pixels)
    out = check_output_path(out, overwrite)
    ds = open_dataset(src, split=split, size=size, resize=resize, fmt=fmt, limit=limit, skip_bad=skip_bad,
                      limit_per_class=limit_per_class, shuffle=shuffle, seed=seed, max_pixels=max_pixels)
    _check_outputs(out, src, ds)
    progress = Reporter(on_progress, "palette", total=ds.n, unit="image")
    progress.start()
    logged = _report_warnings(ds, progress)

    def images() -> Iterator[np.ndarray]:
        with contextlib.closing(ds.images()) as it:
            for imgs in it:
                yield imgs
                progress.advance(len(imgs))

    pal = fit_palette(images(), k=k, sample_pixels=sample_pixels, seed=seed)
    _report_warnings(ds, progress, logged)
    with atomic_output(out) as tmp:
        try:
            with open(tmp, "wb") as fh:
                np.save(fh, pal.centers)
        except OSError as e:
            if is_disk_full(e):
                raise disk_full(out) from None
            raise
    return PaletteFitResult(path=str(out), k=pal.k, pixels=min(sample_pixels, (ds.n or 0) * size * size) or None,
                            seconds=round(time.perf_counter() - t0, 3), skipped=ds.skipped,
                            warnings=list(ds.warnings))
