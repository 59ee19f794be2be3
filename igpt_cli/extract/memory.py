"""Features in memory: arrays in, `{layer: array}` out, no files.

`features_from_tokens` runs the extract stage's computation on palette tokens: for the
same batch size, device and compute dtype the numbers are those `extract_features`
writes. `features_from_images` first does what `igpt quantize` does to an image array
(resize to the model's side, nearest palette colour), then the same.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..choices import POOLS, RESIZE_MODES, SITES
from ..errors import ParameterError, check_choice, check_positive
from ..layers import parse_layers
from ..model import IGPT, resolve_model_dir
from ..model.runtime import check_tokens_array, feature_batch_size, ready_model
from ..progress import OnProgress, Reporter
from ..model.pooling import TOKEN_MAPS
from .sources import ModelSource

Layers = str | int | Sequence[str | int] | None




def features_from_tokens(
    tokens: np.ndarray,
    model: IGPT | str | Path,
    layers: Layers = None,
    *,
    site: str = "ln",
    sos: bool = True,
    pool: str | None = "mean",
    batch_size: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    on_progress: OnProgress | None = None,
    compile: bool = False,
) -> dict[int, np.ndarray]:
    """iGPT features of palette-token images: `{layer: [N, n_embd] float32}`.

    `tokens`: [N, H*W] palette indices (uint16 or any integer type), as in a tokens
    file. `model`: an IGPT, or a model directory / hub name in the local cache.
    `pool`: "mean" (the paper's average over positions) or "max"; "none" (or None)
    returns the token maps `{layer: [N, T, n_embd]}` (float32) instead.
    For an IGPT, device and dtype "auto" use it where and as it is; other values move
    and cast it in place (`nn.Module.to`). Progress goes to `on_progress`
    (task "extract", unit "image"). `compile`: run the blocks through `torch.compile`
    (`IGPT.compile_blocks`: the first batch compiles, eager where compilation is unavailable).
    """
    site = check_choice("site", site, SITES)
    pool = None if pool is None else check_choice("pool", pool, POOLS)
    check_positive("batch_size", batch_size)
    net, dev, cdt = ready_model(model, device, dtype)
    cfg = net.config
    tokens = check_tokens_array(tokens, cfg)
    if compile:
        net.compile_blocks()
    layers = parse_layers(layers, range(cfg.n_layer + 1))
    pool = TOKEN_MAPS if pool is None else pool
    source = ModelSource(net, dev, cdt, layers, site, bool(sos) and net.config.autoregressive, pool=pool)
    n = len(tokens)
    row_shape = (cfg.n_embd,) if pool != TOKEN_MAPS else (cfg.n_positions, cfg.n_embd)
    row_bytes = len(layers) * int(np.prod(row_shape)) * 4
    bs = min(batch_size or feature_batch_size(cfg, dev, cdt, host_row_bytes=row_bytes), max(1, n))
    feats = {layer: np.empty((n, *row_shape), dtype=np.float32) for layer in layers}  # [N, D] or [N, T, D]
    reporter = Reporter(on_progress, "extract", n, "image")
    reporter.start()
    for i in range(0, n, bs):
        j = min(i + bs, n)
        batch = source(tokens[i:j])
        for layer in layers:
            feats[layer][i:j] = batch[layer]
        reporter.advance(j - i)
    return feats


def features_from_images(
    images: np.ndarray,
    model: IGPT | str | Path,
    layers: Layers = None,
    *,
    palette=None,
    resize: str = "bilinear",
    site: str = "ln",
    sos: bool = True,
    pool: str | None = "mean",
    batch_size: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    on_progress: OnProgress | None = None,
) -> dict[int, np.ndarray]:
    """iGPT features of uint8 images `[N, H, W, 3]` (also grey [N, H, W] or RGBA): `{layer: [N, n_embd]}`.

    The images are resized to the model's side (`resize`: "bilinear" or "center-crop")
    and quantized with `palette`: a `Palette`, anything `Palette.load` reads, or None
    (the model directory's own palette, or the official iGPT one for an IGPT instance).
    The rest is `features_from_tokens`.
    """
    from ..data.base import array_to_rgb, resize_batch
    from ..palette import Palette

    resize = check_choice("resize", resize, RESIZE_MODES)
    images = np.asarray(images)
    channels = images.shape[-1] if images.ndim == 4 else 1
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or channels not in (1, 3, 4):
        raise ParameterError("images", f"{images.dtype} {images.shape}", "expected uint8 RGB images [N, H, W, 3]")
    net, dev, cdt = ready_model(model, device, dtype)
    side = net.config.side
    if side is None:
        raise ParameterError("model", str(model), f"n_positions={net.config.n_positions} is not a square image")
    if not isinstance(palette, Palette):
        palette = Palette.load(palette if palette is not None or isinstance(model, IGPT) else resolve_model_dir(model))
    tokens = palette.quantize(resize_batch(array_to_rgb(images), side, resize))  # [N, side*side]
    return features_from_tokens(tokens, net, layers, site=site, sos=sos, pool=pool, batch_size=batch_size,
                                on_progress=on_progress)
