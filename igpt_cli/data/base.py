"""What every dataset reader shares: the `Dataset` base class, the error classes, and
the image conversion that makes any picture a uint8 RGB array of the requested size.

Conversion follows Hugging Face's ImageGPT processor: grayscale/palette images become
RGB, transparency is composited onto white, then a PIL bilinear resize to size×size
(no crop); ``resize="center-crop"`` first crops the central square.

Limits, checked before any work or any decoding:
- ``size`` is at most `MAX_SIZE` (1024): images are size×size, one token per pixel.
- An encoded image whose header declares more than ``max_pixels`` pixels (default
  `DEFAULT_MAX_PIXELS` = 89,478,485, PIL's own `Image.MAX_IMAGE_PIXELS`) is refused
  before it is decoded: a few hundred KB of PNG can declare 13000×13000 pixels and take
  gigabytes to decode (a decompression bomb). It is a bad image (skipped and counted
  with ``skip_bad``); raise ``max_pixels`` to read such images.

Selection (`Dataset._plan`): ``shuffle`` (a seeded permutation of the images),
``limit_per_class`` (at most N images of each label, in that order) and ``limit`` (at
most N images in all), in that order; a limit that leaves classes without any image is
reported in `Dataset.warnings`.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from ..errors import InputError
from ._jpeg import decode_plain_jpeg

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")

# (images uint8 [B, S, S, 3], labels int64 [B] (-1: unlabelled), sources: one name per image)
Batch = tuple[np.ndarray, np.ndarray, list[str]]

MAX_SIZE = 1024  # images are size×size: a million tokens per image is far beyond any iGPT
DEFAULT_SIZE = 32  # images become 32x32 unless told (the released models' resolution)
DECODED_BATCH_BYTES = 64 << 20  # decoded images held per batch at most (large sizes: fewer images per batch)


def images_per_batch(size: int, most: int) -> int:
    """How many size×size RGB images a batch holds: at most `most`, at most DECODED_BATCH_BYTES, at least 1."""
    return max(1, min(most, DECODED_BATCH_BYTES // (3 * size * size)))


DEFAULT_MAX_PIXELS = 89_478_485  # PIL's Image.MAX_IMAGE_PIXELS: larger images may be decompression bombs


class DataError(InputError):
    """Bad dataset input."""


class UnknownFormatError(DataError):
    pass


class SplitError(DataError):
    pass


class EmptyDatasetError(DataError):
    pass


class BadImageError(DataError):
    pass


class TruncatedArchiveError(DataError):
    """A tar or zip archive cut short (an interrupted download, `head -c`): never read as a
    smaller dataset. `index` counts members from 1; `member` is the name when known."""

    def __init__(self, path, index: int, member: str | None = None, detail: str = ""):
        self.path, self.index, self.member = path, index, member
        named = f" ({member})" if member else ""
        super().__init__(f"{path}: archive truncated at member {index}{named}{detail}")


class ImageTooLargeError(ValueError):
    """An image whose header declares more than `max_pixels` pixels (refused undecoded)."""


def is_image_name(name: str) -> bool:
    """A member or file name with an image extension (hidden files excluded)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTS and not os.path.basename(name).startswith(".")


def is_unsafe_name(name: str) -> bool:
    """An archive member name that points outside the archive's tree: absolute (``/x``,
    ``C:x``) or with a ``..`` component. Such names never become classes."""
    parts = re.split(r"[/\\]", name)
    return name.startswith(("/", "\\")) or ".." in parts or bool(re.match(r"^[A-Za-z]:", name))


# ---------------------------------------------------------------------------
# Image conversion (matches transformers' convert_to_rgb + PIL bilinear resize)
# ---------------------------------------------------------------------------

def pil_to_rgb(im: Image.Image) -> Image.Image:
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def fit_size(im: Image.Image, size: int, resize: str) -> Image.Image:
    if resize == "center-crop" and im.width != im.height:
        s = min(im.width, im.height)
        left, top = (im.width - s) // 2, (im.height - s) // 2
        im = im.crop((left, top, left + s, top + s))
    if im.size != (size, size):
        im = im.resize((size, size), resample=Image.BILINEAR)
    return im


_FORMAT_HINT = {".jpg": ("JPEG",), ".jpeg": ("JPEG",), ".png": ("PNG",)}


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageTooLargeError(f"{width}×{height} = {width * height:,} pixels, over max_pixels={max_pixels}"
                                 ": a possible decompression bomb; a larger max_pixels=N reads it")


@contextlib.contextmanager
def _pil_allows(max_pixels: int) -> Iterator[None]:
    """PIL refuses images over twice its MAX_IMAGE_PIXELS itself; let a raised `max_pixels` through."""
    old = Image.MAX_IMAGE_PIXELS
    if old is None or max_pixels <= 2 * old:
        yield
        return
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def decode_image(data: bytes, size: int, resize: str, name: str = "", max_pixels: int | None = None) -> np.ndarray:
    """Encoded image bytes -> uint8 RGB [size, size, 3] (HF ImageGPT conversion and resize).

    Images over `max_pixels` pixels (None: DEFAULT_MAX_PIXELS) are refused from their
    header, before decoding (`ImageTooLargeError`)."""
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    im = decode_plain_jpeg(data, limit)
    if im is not None:
        return np.asarray(fit_size(im, size, resize))
    hint = _FORMAT_HINT.get(os.path.splitext(name)[1].lower())
    with warnings.catch_warnings(), _pil_allows(limit):
        warnings.simplefilter("ignore")
        try:
            try:
                im = Image.open(io.BytesIO(data), formats=hint)  # the hint skips probing every plugin
            except Image.UnidentifiedImageError:
                if hint is None:
                    raise
                im = Image.open(io.BytesIO(data))  # misnamed file: let PIL probe
        except Image.UnidentifiedImageError:  # its message quotes a BytesIO object: say what it means
            raise ValueError("not a known image format, or corrupt") from None
        except Image.DecompressionBombError:
            raise ImageTooLargeError(f"more pixels than max_pixels={limit}: a possible decompression bomb; "
                                     "a larger max_pixels=N reads it") from None
        check_pixels(im.width, im.height, limit)  # from the header: nothing decoded yet
        im.load()
    return np.asarray(fit_size(pil_to_rgb(im), size, resize))


def array_to_rgb(a: np.ndarray) -> np.ndarray:
    """uint8 [N,H,W] / [N,H,W,1|3|4] -> uint8 [N,H,W,3] (alpha composited onto white)."""
    if a.ndim == 3:
        return np.repeat(a[..., None], 3, axis=-1)
    c = a.shape[-1]
    if c == 1:
        return np.repeat(a, 3, axis=-1)
    if c == 4:
        alpha = a[..., 3:4] / 255.0
        return np.round(alpha * a[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def resize_batch(imgs: np.ndarray, size: int, resize: str) -> np.ndarray:
    """uint8 [N, H, W, 3] -> uint8 [N, size, size, 3]."""
    if imgs.shape[1:3] == (size, size):
        return imgs
    return np.stack([np.asarray(fit_size(Image.fromarray(im), size, resize)) for im in imgs])


# ---------------------------------------------------------------------------
# Dataset base
# ---------------------------------------------------------------------------

class Dataset:
    """A streamed dataset. Subclasses read their format in `__init__` (setting `splits`,
    `class_names` and `n`, raising `DataError`s on bad input; calling `_plan` with the
    labels of the split when `selecting`) and yield batches from `_batches` in the planned
    order; `batches` applies `limit`, counting the images actually read (so ``skip_bad``
    still gives `limit` images when there are enough good ones).

    A reader class is registered under a format name in `igpt_cli.data.READERS`;
    `claims(path)` says whether auto-detection should pick it for `path`.
    """

    kind = "?"
    catch_all = False  # claims any directory or archive: detection prefers any other claimant
    columns = False  # takes image_column / label_column
    several = False  # reads several files as one dataset (`paths`)

    def __init__(self, path: Path, split: str, size: int, resize: str, limit: int | None, skip_bad: bool, *,
                 limit_per_class: int | None = None, shuffle: bool = False, seed: int = 0,
                 max_pixels: int | None = None, paths: list[Path] | None = None, image_column: str | None = None,
                 label_column: str | None = None):
        self.path = Path(path)
        self.paths = [Path(q) for q in paths] if paths else [self.path]  # several files read as one dataset
        self.image_column, self.label_column = image_column, label_column
        self.split = split
        self.size = size
        self.resize = resize
        self.limit = limit
        self.skip_bad = skip_bad
        self.limit_per_class = limit_per_class
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
        self.class_names: list[str] = []
        self.splits: list[str] = []
        self.skipped = 0
        self.n: int | None = None  # number of images to expect, when known
        self.warnings: list[str] = []  # things worth telling the user (a limit that empties classes, …)

    @classmethod
    def claims(cls, path: Path, fmt: str) -> bool:
        """Whether `path` (an existing file or directory) looks like format `fmt` of this reader."""
        return False

    @property
    def selecting(self) -> bool:
        """Whether a selection parameter (limit, limit_per_class, shuffle) is set: readers then
        gather the labels of the split up front and read in the order `_plan` returns."""
        return bool(self.shuffle or self.limit_per_class is not None or self.limit is not None)

    def _check_split(self) -> None:
        if self.split == "all":
            return
        if self.split not in self.splits:
            have = ", ".join(self.splits) if self.splits else "none: use split='all'"
            raise SplitError(f"{self.path}: no split {self.split!r} (available splits: {have})")

    def _plan(self, labels: np.ndarray) -> np.ndarray:
        """The images to read, as indices into the split's storage order, in reading order:
        a seeded shuffle (`shuffle`, `seed`), then at most `limit_per_class` of each label
        (unlabelled images, -1, form one group). `limit` is applied while reading; a warning
        is recorded when the first `limit` of the plan leave classes without images."""
        labels = np.asarray(labels, dtype=np.int64)
        order = (np.random.default_rng(self.seed).permutation(len(labels)) if self.shuffle
                 else np.arange(len(labels)))
        if self.limit_per_class is not None:
            order = order[_rank_within_groups(labels[order]) < self.limit_per_class]
        if self.limit is not None and len(order) > self.limit:
            present = np.unique(labels[order])
            empty = np.setdiff1d(present[present >= 0], labels[order[:self.limit]])
            if len(empty):
                names = [self.class_names[i] if 0 <= i < len(self.class_names) else str(i) for i in empty[:5]]
                more = ", …" if len(empty) > 5 else ""
                how = "" if self.shuffle else "shuffle=True or "
                self.warnings.append(
                    f"{self.path}: limit={self.limit} leaves {len(empty)} of {int((present >= 0).sum())} classes "
                    f"without images ({', '.join(names)}{more}); pass {how}limit_per_class=N for images of "
                    "every class")
        return order

    def batches(self, batch_size: int = 256) -> Iterator[Batch]:
        """Batches of at most `batch_size` images, `limit` images in all (None: every image)."""
        return self._limited(self._batches(batch_size))

    def images(self, batch_size: int = 256) -> Iterator[np.ndarray]:
        for imgs, _, _ in self.batches(batch_size):
            yield imgs

    def _batches(self, batch_size: int) -> Iterator[Batch]:
        raise NotImplementedError

    def _limited(self, it: Iterator[Batch]) -> Iterator[Batch]:
        left = self.limit
        for imgs, labels, sources in it:
            if left is not None:
                if left <= 0:
                    return
                if len(imgs) > left:
                    imgs, labels, sources = imgs[:left], labels[:left], sources[:left]
                left -= len(imgs)
            if len(imgs):
                yield imgs, labels, sources


def _rank_within_groups(keys: np.ndarray) -> np.ndarray:
    """For each element, how many earlier elements have the same key ([3, 5, 3, 3] -> [0, 0, 1, 2])."""
    idx = np.argsort(keys, kind="stable")
    sk = keys[idx]
    starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
    first = np.repeat(starts, np.diff(np.r_[starts, len(sk)]))
    rank = np.empty(len(keys), dtype=np.int64)
    rank[idx] = np.arange(len(keys)) - first
    return rank
