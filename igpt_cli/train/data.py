"""Training data: a tokens file loaded and checked, and the batches of each step.

`load_tokens` refuses, with one line naming the file, anything the training loop could
trip over later: a file without tokens, palette, height or width, tokens that are not
integers or do not have height × width columns, an empty file, and token values outside
the palette (scanned like `igpt extract` does).

The data order and the flip augmentation are pure functions of (seed, step): global batch
`step` holds the rows and flips it holds whatever the number of processes, and each rank
of a data-parallel run takes a fixed slice of it (`make_batch(..., part=)`). So a resumed
run sees exactly the batches an uninterrupted run would have seen, and 1 process and N
ranks (or K micro-batches) train on the same images.

Validation: `val_rows` picks a seeded, class-balanced subset of a validation file (a
class-sorted file's first rows would hold one or two classes only).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..formats import TOKENS_FORMAT, check_token_values, class_names, open_igpt
from .config import TrainConfig


@dataclass
class TokenData:
    tokens: np.ndarray  # integer [N, H*W], palette indices
    height: int
    width: int
    palette: np.ndarray
    class_names: list[str]
    path: str
    labels: np.ndarray | None = None  # integer [N] class indices, when the file has them


def _int_attr(f, name: str, path) -> int:
    v = f.attrs[name]
    try:
        value = int(np.asarray(v).item())
    except (TypeError, ValueError):
        raise InputError(f"{path}: attribute {name}={v!r} is not an integer") from None
    if value < 1:
        raise InputError(f"{path}: attribute {name}={value} must be at least 1")
    return value


def load_tokens(path: str | Path, limit: int | None = None) -> TokenData:
    """A tokens file's rows (the first `limit`), checked: InputError naming the file otherwise."""
    with open_igpt(path, TOKENS_FORMAT) as f:
        missing = [k for k in ("tokens", "palette") if k not in f] + \
            [a for a in ("height", "width") if a not in f.attrs]
        if missing:
            raise InputError(f"{path}: tokens file lacks {', '.join(missing)}")
        height, width = _int_attr(f, "height", path), _int_attr(f, "width", path)
        ds, pal = f["tokens"], f["palette"]
        if not hasattr(ds, "dtype") or ds.ndim != 2 or ds.shape[1] != height * width \
                or not np.issubdtype(ds.dtype, np.integer):
            raise InputError(f"{path}: tokens must be integers of shape [N, {height * width}] "
                             f"(height x width), not {getattr(ds, 'dtype', '?')} {getattr(ds, 'shape', '')}")
        if not hasattr(pal, "dtype") or pal.ndim != 2 or pal.shape[1] != 3 or not 1 <= pal.shape[0] <= 65535 \
                or not np.issubdtype(pal.dtype, np.number):
            raise InputError(f"{path}: palette must be 1 to 65535 RGB colours [K, 3], "
                             f"not {getattr(pal, 'dtype', '?')} {getattr(pal, 'shape', '')}")
        n = ds.shape[0] if limit is None else min(limit, ds.shape[0])
        if n == 0:
            raise InputError(f"{path}: tokens file has no rows")
        try:
            names = class_names(f)
        except InputError:
            raise
        except (ValueError, TypeError):
            raise InputError(f"{path}: class_names attribute is not a JSON list") from None
        try:
            tokens, palette = ds[:n], np.asarray(pal, dtype=np.float32)
            labels = f["labels"][:n] if "labels" in f and getattr(f["labels"], "shape", None) == (ds.shape[0],) \
                else None
        except OSError as e:  # a damaged file: h5py reads fail only when the bytes are reached
            raise InputError(f"{path}: cannot read the tokens ({e})") from None
    if not np.isfinite(palette).all():
        raise InputError(f"{path}: palette has values that are not finite numbers")
    check_token_values(tokens, len(palette), path)
    if labels is not None and not np.issubdtype(labels.dtype, np.integer):
        labels = None
    return TokenData(tokens, height, width, palette, names, str(path), labels)


def check_val(val: TokenData, data: TokenData) -> None:
    """A validation file must hold images of the training size, quantized to the same palette."""
    if (val.height, val.width) != (data.height, data.width):
        raise InputError(f"{val.path}: {val.height}x{val.width} tokens, training data is {data.height}x{data.width}")
    if val.palette.shape != data.palette.shape or not np.array_equal(val.palette, data.palette):
        raise InputError(f"{val.path}: quantized with another palette than the training data {data.path} "
                         f"({len(val.palette)} vs {len(data.palette)} colours)")


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The rows of `epoch` in their seeded order (computed once per epoch, not once per step)."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    perm.flags.writeable = False
    return perm


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> np.ndarray:
    """Rows of global batch `step`: epochs are seeded permutations, batches wrap across epochs."""
    start = step * batch_size
    rows = []
    while len(rows) < batch_size:
        epoch, offset = divmod(start + len(rows), n)
        rows.extend(epoch_order(seed, epoch, n)[offset:offset + batch_size - len(rows)])
    return np.asarray(rows)


def flip_mask(step: int, batch_size: int, seed: int) -> np.ndarray:
    """Which images of global batch `step` are mirrored (by position in the batch)."""
    return np.random.default_rng([seed, 1_000_003, step]).random(batch_size) < 0.5


def make_batch(data: TokenData, step: int, cfg: TrainConfig, part: tuple[int, int] | None = None) -> torch.Tensor:
    """Tokens [stop - start, H*W] of global batch `step`, images start..stop of it (`part`; all by
    default): the same images and flips whichever rank or micro-batch asks for them."""
    start, stop = part if part is not None else (0, cfg.batch_size)
    rows = batch_indices(step, len(data.tokens), cfg.batch_size, cfg.seed)[start:stop]
    x = data.tokens[rows].astype(np.int64)
    if cfg.flip:
        m = flip_mask(step, cfg.batch_size, cfg.seed)[start:stop]
        img = x.reshape(-1, data.height, data.width)
        img[m] = img[m, :, ::-1]
        x = img.reshape(len(x), -1)
    return torch.from_numpy(np.ascontiguousarray(x))


def batch_labels(data: TokenData, step: int, cfg: TrainConfig, part: tuple[int, int] | None = None) -> torch.Tensor:
    """Class labels [stop - start] of the images `make_batch` gives for the same arguments."""
    start, stop = part if part is not None else (0, cfg.batch_size)
    rows = batch_indices(step, len(data.tokens), cfg.batch_size, cfg.seed)[start:stop]
    return torch.from_numpy(np.asarray(data.labels)[rows].astype(np.int64))


def val_rows(val: TokenData, n: int, seed: int = 0) -> np.ndarray:
    """Sorted row indices of a seeded subset of `n` validation images (all when n >= the rows),
    class-balanced when the file has labels: classes take turns in a seeded order, so each
    class gives n / classes images while it has them and the others fill the rest."""
    total = len(val.tokens)
    if n >= total:
        return np.arange(total)
    order = np.random.default_rng([seed, 7_919]).permutation(total)
    if val.labels is not None:
        labels = np.asarray(val.labels)[order]
        turn = np.empty(total, dtype=np.int64)  # how many of its class come before each row
        for c in np.unique(labels):
            where = labels == c
            turn[where] = np.arange(where.sum())
        order = order[np.argsort(turn, kind="stable")]
    return np.sort(order[:n])
