"""Dataset readers: every input format as batches of uint8 RGB images, already resized.

`open_dataset(src, ...)` detects the format from the path (or takes `fmt`) and returns a
`Dataset` whose `.batches(batch_size)` yields `(images uint8 [B, S, S, 3], labels int64 [B],
sources list[str])`, plus `.class_names`. Readers stream: memory is bounded by a batch
(plus a list of member names), never by the dataset.

Formats (`READERS`: format name -> reader class; a new format is one module, one line
here and its name in `igpt_cli.choices.DatasetFormat`):
- ``imagefolder`` (`imagefolder.py`): class-folder trees as a directory, tar or zip.
- ``cifar`` (`cifar.py`): the CIFAR-10 / CIFAR-100 "python version", archive or folder.
- ``npz`` / ``npy`` (`arrays.py`): uint8 image arrays, with labels and splits in a ``.npz``.

Image conversion (`base.py`) follows Hugging Face's ImageGPT processor; its limits
(`MAX_SIZE`, `DEFAULT_MAX_PIXELS` against decompression bombs) and the selection
parameters (``limit``, ``limit_per_class``, ``shuffle``/``seed``) are documented there.
"""
from __future__ import annotations

from pathlib import Path

from ..choices import FORMATS, RESIZE_MODES, SPLIT_CHOICES, SPLIT_NAMES
from ..errors import ParameterError, check_choice, check_positive
from ..seeds import check_seed
from .arrays import ArrayDataset
from .base import (DEFAULT_MAX_PIXELS, DEFAULT_SIZE, IMAGE_EXTS, MAX_SIZE, TAR_SUFFIXES, BadImageError, Batch, DataError,
                   Dataset, EmptyDatasetError, images_per_batch, SplitError, TruncatedArchiveError, UnknownFormatError, decode_image)
from .cifar import CifarPython
from .hf import HFDataset
from .imagefolder import ImageFiles, ImageFolder
from .sources import describe_sources, expand_sources
from .tokens import TokenArrays
from .webdataset import WebDataset

READERS: dict[str, type[Dataset]] = {  # keys: FORMATS, in order
    "imagefolder": ImageFolder,
    "cifar": CifarPython,
    "npz": ArrayDataset,
    "npy": ArrayDataset,
    "files": ImageFiles,
    "hf": HFDataset,
    "webdataset": WebDataset,
    "openai-tokens": TokenArrays,
}

__all__ = [
    "open_dataset", "detect_format", "READERS", "FORMATS", "RESIZE_MODES", "SPLIT_CHOICES", "SPLIT_NAMES",
    "IMAGE_EXTS", "TAR_SUFFIXES", "MAX_SIZE", "DEFAULT_MAX_PIXELS", "DEFAULT_SIZE", "images_per_batch", "Dataset", "Batch", "decode_image", "DataError",
    "UnknownFormatError", "SplitError", "EmptyDatasetError", "BadImageError", "TruncatedArchiveError",
    "check_dataset_parameters", "expand_sources", "describe_sources",
]


COLUMN_FORMATS = tuple(name for name, r in READERS.items() if r.columns)


def detect_format(path: str | Path) -> str:
    """The format name of the dataset at `path`: the reader that claims it, preferring any
    specific reader over image folders (which take every directory and archive)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    claimed = [name for name, reader in READERS.items() if reader.claims(p, name)]
    specific = [name for name in claimed if not READERS[name].catch_all]
    if specific or claimed:
        return (specific or claimed)[0]
    raise UnknownFormatError(f"{p}: unknown input format (expected an image folder, .tar/.zip archive, "
                             f"CIFAR python archive or folder, .npz or .npy; or pass fmt=<one of {', '.join(FORMATS)}>)")


def check_dataset_parameters(*, size: int = 32, limit: int | None = None, limit_per_class: int | None = None,
                             seed: int = 0, max_pixels: int | None = None) -> None:
    """ParameterError for a bad value of one of `open_dataset`'s numeric parameters (before any work)."""
    check_positive("size", size, allow_none=False)
    if size > MAX_SIZE:
        raise ParameterError("size", size, f"must be at most {MAX_SIZE} (images become size×size tokens)")
    check_positive("limit", limit)
    check_positive("limit_per_class", limit_per_class)
    check_positive("max_pixels", max_pixels)
    check_seed(seed)


def open_dataset(src: "str | Path | list[str | Path]", split: str = "all", size: int = DEFAULT_SIZE, resize: str = "bilinear",
                 fmt: str | None = None, limit: int | None = None, skip_bad: bool = False, *,
                 limit_per_class: int | None = None, shuffle: bool = False, seed: int = 0,
                 max_pixels: int | None = None, image_column: str | None = None,
                 label_column: str | None = None) -> Dataset:
    """Open any supported dataset for streaming (see module docstring).

    `split`: one of SPLIT_CHOICES; `size`: images become size×size (at most MAX_SIZE);
    `resize`: one of RESIZE_MODES; `fmt`: one of FORMATS (None: detect); `limit`: at most
    this many images; `limit_per_class`: at most this many images of each class;
    `shuffle`: take the images in a random order fixed by `seed` (before the limits, so a
    limit takes a random sample rather than the first images in storage order);
    `skip_bad`: skip unreadable images (counted in `Dataset.skipped`) instead of raising;
    `max_pixels`: refuse (as unreadable) images declaring more pixels (None:
    DEFAULT_MAX_PIXELS, PIL's own bound); `image_column` / `label_column`: the column (Hugging
    Face datasets) or sidecar extension (WebDataset) holding the images / labels (None:
    detect). Warnings (a limit leaving classes empty, unsafe
    archive member names skipped) are in `Dataset.warnings`.
    """
    resize = check_choice("resize", resize, RESIZE_MODES)
    check_dataset_parameters(size=size, limit=limit, limit_per_class=limit_per_class, seed=seed,
                             max_pixels=max_pixels)
    split = check_choice("split", split, SPLIT_CHOICES)
    if fmt is not None:
        fmt = check_choice("fmt", fmt, FORMATS)
    paths = expand_sources(src)
    if len(paths) == 1:
        fmt = fmt or detect_format(paths[0])
    for q in paths:
        if not q.exists():
            raise DataError(f"{q}: no such file or directory")
    if len(paths) > 1:
        fmt = fmt or _detect_several(paths)
        if not READERS[fmt].several:
            raise ParameterError("fmt", fmt, f"reads one path, not {len(paths)}")
    reader = READERS[fmt]
    for param, value in (("image_column", image_column), ("label_column", label_column)):
        if value is not None and not reader.columns:
            raise ParameterError(param, value, f"only for datasets with columns ({', '.join(COLUMN_FORMATS)}), "
                                               f"not {fmt}")
    return reader(paths[0], split, size, resize, limit, skip_bad, limit_per_class=limit_per_class,
                  shuffle=shuffle, seed=int(seed), max_pixels=max_pixels, paths=paths,
                  image_column=image_column, label_column=label_column)


def _detect_several(paths: list[Path]) -> str:
    """The format of several paths read as one dataset: one reader must claim them all."""
    for name, reader in READERS.items():
        if reader.several and all(reader.claims(q, name) for q in paths):
            return name
    kinds = ", ".join(name for name, r in READERS.items() if r.several)
    raise UnknownFormatError(f"{paths[0]} and {len(paths) - 1} more: several paths must all be one kind of "
                             f"dataset file read as one ({kinds}); got a mix, or a kind read one at a time")
