"""What every dataset reader shares: the `Dataset` base class, the error classes, and
the image conversion that makes any picture a uint8 RGB array of the requested size.

Conversion follows Hugging Face's ImageGPT processor: grayscale/palette images become
RGB, transparency is composited onto white, then a PIL bilinear resize to size×size
(no crop); ``resize="center-crop"`` first crops the central square.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from ..errors import InputError
from ._jpeg import decode_plain_jpeg

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")

# (images uint8 [B, S, S, 3], labels int64 [B] (-1: unlabeled), sources: one name per image)
Batch = tuple[np.ndarray, np.ndarray, list[str]]


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


def is_image_name(name: str) -> bool:
    """A member or file name with an image extension (hidden files excluded)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTS and not os.path.basename(name).startswith(".")


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


def decode_image(data: bytes, size: int, resize: str, name: str = "") -> np.ndarray:
    """Encoded image bytes -> uint8 RGB [size, size, 3] (HF ImageGPT conversion and resize)."""
    im = decode_plain_jpeg(data)
    if im is not None:
        return np.asarray(fit_size(im, size, resize))
    hint = _FORMAT_HINT.get(os.path.splitext(name)[1].lower())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            im = Image.open(io.BytesIO(data), formats=hint)  # the hint skips probing every plugin
        except Image.UnidentifiedImageError:
            if hint is None:
                raise
            im = Image.open(io.BytesIO(data))  # misnamed file: let PIL probe
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
    `class_names` and `n`, raising `DataError`s on bad input) and yield unlimited batches
    from `_batches`; `batches` applies `limit`.

    A reader class is registered under a format name in `igpt_cli.data.READERS`;
    `claims(path)` says whether auto-detection should pick it for `path`.
    """

    kind = "?"
    catch_all = False  # claims any directory or archive: detection prefers any other claimant

    def __init__(self, path: Path, split: str, size: int, resize: str, limit: int | None, skip_bad: bool):
        self.path = Path(path)
        self.split = split
        self.size = size
        self.resize = resize
        self.limit = limit
        self.skip_bad = skip_bad
        self.class_names: list[str] = []
        self.splits: list[str] = []
        self.skipped = 0
        self.n: int | None = None  # number of images to expect, when known

    @classmethod
    def claims(cls, path: Path, fmt: str) -> bool:
        """Whether `path` (an existing file or directory) looks like format `fmt` of this reader."""
        return False

    def _check_split(self) -> None:
        if self.split == "all":
            return
        if self.split not in self.splits:
            have = ", ".join(self.splits) if self.splits else "none: use split='all'"
            raise SplitError(f"{self.path}: no split {self.split!r} (available splits: {have})")

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
