"""PNG figures of generated images: a grid of samples, and the completion figure.

The completion figure is the one of the iGPT blog post: one row per image with the
kept top rows (the rest grey), the completions, and the original. Tokens are decoded
through the palette of their file; the PNG is written atomically under the output lock.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..outputs import atomic_output
from ..palette import Palette

GAP = 2  # white pixels between images
GREY = 128  # the part of a kept image that the model has to fill in


def default_scale(height: int, width: int) -> int:
    """Nearest-neighbour upscaling so that an image is about 64 pixels wide."""
    return max(1, 64 // max(height, width))


def grid(rows: list[list[np.ndarray]], *, scale: int = 1, gap: int = GAP) -> np.ndarray:
    """Images (uint8 [H, W, 3], all the same size) laid out row by row: uint8 [H', W', 3]."""
    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + gap) + gap, cols * (w + gap) + gap, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            y, x = gap + r * (h + gap), gap + c * (w + gap)
            out[y:y + h, x:x + w] = im
    if scale > 1:
        out = out.repeat(scale, axis=0).repeat(scale, axis=1)
    return out


def sample_grid(tokens: np.ndarray, palette: Palette, height: int, width: int) -> np.ndarray:
    """Up to 64 token rows [N, H*W] as an about square grid."""
    imgs = palette.decode(tokens[:64], height, width)
    cols = math.ceil(math.sqrt(len(imgs)))
    rows = [list(imgs[i:i + cols]) for i in range(0, len(imgs), cols)]
    return grid(rows, scale=default_scale(height, width))


def completion_grid(originals: np.ndarray, completions: np.ndarray, keep_tokens: int, palette: Palette,
                    height: int, width: int) -> np.ndarray:
    """One row per image: kept part (rest grey) | completions | original.

    originals [N, H*W], completions [N, n, H*W] (same images, same order)."""
    orig = palette.decode(originals, height, width)  # [N, H, W, 3]
    kept = orig.copy()
    kept.reshape(len(orig), height * width, 3)[:, keep_tokens:] = GREY
    rows = []
    for i in range(len(orig)):
        done = palette.decode(completions[i], height, width)  # [n, H, W, 3]
        rows.append([kept[i], *done, orig[i]])
    return grid(rows, scale=default_scale(height, width))


def write_png(pixels: np.ndarray, path: str | Path) -> Path:
    from PIL import Image

    with atomic_output(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")
    return Path(path)


def write_completion_figure(tokens: np.ndarray, labels: np.ndarray, model, png: str | Path, *, palette: Palette,
                            height: int, width: int, n: int = 3, keep_fraction: float = 0.5, seed: int = 0,
                            max_images: int = 10) -> Path:
    """The completion figure of one image per class (the first of each, up to `max_images`)
    completed `n` times by `model` from the top `keep_fraction` of its rows."""
    from .decode import complete_images, keep_tokens_for

    _, keep = keep_tokens_for(height, width, None, keep_fraction)
    _, first = np.unique(np.asarray(labels), return_index=True)  # the first image of every class
    pick = np.sort(first)[:max_images]
    comps = complete_images(tokens[pick], model, keep_fraction=keep_fraction, n=n, width=width, seed=seed)
    return write_png(completion_grid(tokens[pick], comps, keep, palette, height, width), png)
