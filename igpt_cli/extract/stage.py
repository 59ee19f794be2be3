"""`igpt extract`: a tokens file in, per-layer iGPT features out.

`extract_features(tokens_path, model, layers, out, ...)` checks everything before any
work starts (tokens file, model directory, resolution, palette, token range, output
path), then fills a partial features file next to `out` with the shared row loop
(`rows.py`) and renames it into place when complete. Called again with the same
arguments after an interruption it resumes from that partial file (`restart=True`
discards it). Under torchrun every rank fills a part file of its shard and rank 0
merges them (`sharded.py`).

The same computation on arrays, without files, is in `memory.py`.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from .. import formats, outputs
from ..choices import POOLS, SITES, STORE_DTYPES
from ..errors import InputError, check_choice, check_positive
from ..layers import parse_layers
from ..model import IGPTConfig, find_weights, read_config, resolve_model_dir
from ..progress import OnProgress, Reporter
from ..results import Result
from ..runtime import resolve_device, resolve_dtype
from .rows import RowsRun, create_partial, fill_rows, labels_and_sources, open_partial, stored_batch_size
from .sharded import DistContext, run_shard
from .sources import (PIXELS, ModelSource, PixelSource, auto_batch_size, dtype_name, load_model,
                      sha256_file)


@dataclass
class ExtractResult(Result):
    """What `extract_features` did; `to_dict()` is the JSON `igpt extract` prints."""

    out: str
    model: str  # the model directory, or "pixels"
    layers: list[int]
    site: str  # "ln", "resid", or "pixels"
    sos: bool
    n: int  # rows in the features file
    computed: int  # rows computed by this call (all ranks)
    resumed_from: int  # rows found done in partial files
    device: str
    compute_dtype: str
    batch_size: int
    store_dtype: str
    images_per_s: float | None
    seconds: float
    world_size: int | None = None  # these three only for a sharded (torchrun) run
    rank: int | None = None
    shard: list[int] | None = None  # this rank's rows [start, stop)

    _omit_if_none = ("world_size", "rank", "shard")


# ---------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------
def _scan_tokens(tokens: h5py.Dataset, n: int, palette_size: int, path: Path) -> None:
    step = max(1, (1 << 24) // max(1, tokens.shape[1]))
    for i in range(0, n, step):
        block = tokens[i:min(i + step, n)]
        hi = int(block.max()) if block.size else 0
        if hi >= palette_size:
            row = i + int(np.argwhere(block >= palette_size)[0][0])
            raise InputError(f"{path}: token value {hi} at row {row} is not below the palette size {palette_size}")


def _check_model_fits(cfg: IGPTConfig, height: int, width: int, palette_size: int, tokens_path: Path) -> None:
    if height * width != cfg.n_positions:
        side = cfg.side
        want = f"{side}x{side} images" if side else f"{cfg.n_positions} positions"
        raise InputError(f"{tokens_path}: images are {height}x{width} ({height * width} positions) "
                         f"but the model wants {want} (n_positions={cfg.n_positions}); "
                         f"quantize at that resolution")
    if palette_size > cfg.vocab_size - 1:
        raise InputError(f"{tokens_path}: palette has {palette_size} colours but the model knows "
                         f"{cfg.vocab_size - 1} (vocab_size={cfg.vocab_size} incl. SOS)")


def _tokens_contents(tf: h5py.File, path: Path) -> tuple[h5py.Dataset, int, int, np.ndarray]:
    """tokens [N, H*W], height, width, palette [K, 3] of an open tokens file."""
    missing = [k for k in ("tokens", "palette") if k not in tf] + [a for a in ("height", "width") if a not in tf.attrs]
    if missing:
        raise InputError(f"{path}: tokens file lacks {', '.join(missing)}")
    return tf["tokens"], int(tf.attrs["height"]), int(tf.attrs["width"]), np.asarray(tf["palette"], dtype=np.float32)


# ---------------------------------------------------------------------------
# The file stage
# ---------------------------------------------------------------------------
def extract_features(
    tokens_path: str | Path,
    model: str | Path,
    layers: str | int | Sequence[str | int] | None = None,
    out: str | Path = "features.h5",
    *,
    batch_size: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    sos: bool = True,
    site: str = "ln",
    pool: str = "mean",
    limit: int | None = None,
    store_dtype: str = "float32",
    overwrite: bool = False,
    restart: bool = False,
    on_progress: OnProgress | None = None,
    dist: DistContext | None = None,
) -> ExtractResult:
    """Run the extract stage. Raises InputError on bad input, before any work starts.

    `model` is a Hugging Face ImageGPT directory (or a hub name in the local cache), or
    "pixels" for the raw-pixel baseline. `layers`: specs as in `igpt_cli.layers`
    (default all). Progress and resume notices go to `on_progress` (task "extract",
    unit "image"). `dist` (a DistContext with world_size > 1): extract this rank's
    shard into a part file, and on rank 0 merge the parts into `out`.
    """
    t_start = time.perf_counter()
    tokens_path, out = Path(tokens_path), Path(out)
    site = check_choice("site", site, SITES)
    pool = check_choice("pool", pool, POOLS)
    store_dtype = check_choice("store_dtype", store_dtype, STORE_DTYPES)
    check_positive("batch_size", batch_size)
    check_positive("limit", limit)
    outputs.check_output_path(out, overwrite)
    if out.resolve() == tokens_path.resolve():
        raise InputError(f"{out}: output would overwrite the tokens file")

    with formats.open_igpt(tokens_path, formats.TOKENS_FORMAT) as tf:
        tok, height, width, palette = _tokens_contents(tf, tokens_path)
        n_total = min(tok.shape[0], limit) if limit else tok.shape[0]
        if n_total == 0:
            raise InputError(f"{tokens_path}: the tokens file holds no images")

        # --- the feature source: every check before the weights load ---------------
        source: ModelSource | PixelSource
        if str(model) == PIXELS:
            layers = parse_layers(layers, [0], where="the pixels baseline")
            source, weights, model_name = PixelSource(palette, height, width), None, PIXELS
        else:
            model_dir = resolve_model_dir(model)
            dev = resolve_device(device)
            if dist is not None:
                dev = dist.device_for(dev)  # cuda -> cuda:LOCAL_RANK
            cdt = resolve_dtype(dtype, dev)
            weights, cfg = find_weights(model_dir), read_config(model_dir)
            layers = parse_layers(layers, range(cfg.n_layer + 1))
            _check_model_fits(cfg, height, width, len(palette), tokens_path)
            model_name = str(model_dir)
            source = ModelSource(None, dev, cdt, layers, site, bool(sos), model_name,  # type: ignore[arg-type]
                                 pool=pool)  # the model loads below, once everything is checked
        _scan_tokens(tok, n_total, len(palette), tokens_path)
        if weights is not None:
            source.model = load_model(model_dir, source.device, source.dtype)
            source.sha256 = sha256_file(weights)

        bs = batch_size or (auto_batch_size(source.model, source.device, source.dtype)
                            if isinstance(source, ModelSource) else 256)
        identity = dict(
            layers=layers, site=source.site, sos=source.sos, pool=source.pool,
            compute_dtype=dtype_name(source.dtype), store_dtype=store_dtype, device_type=source.device.type,
            batch_size=min(bs, n_total), model_sha256=source.sha256, model_config=source.config_json,
            tokens_sha256=sha256_file(tokens_path), n_total=n_total,
        )
        extra_attrs = dict(model=model_name, tokens_file=str(tokens_path),
                           class_names=json.dumps(formats.class_names(tf)), height=height, width=width)
        sharded = dist is not None and dist.active
        if sharded:
            run = run_shard(dist, source, tf, tok, tokens_path, out, identity, extra_attrs,
                            store_dtype=store_dtype, restart=restart, on_progress=on_progress)
        else:
            run = _run_one_process(source, tf, tok, tokens_path, out, identity, extra_attrs,
                                   store_dtype=store_dtype, restart=restart,
                                   batch_size_given=batch_size is not None, on_progress=on_progress)

    return ExtractResult(
        out=str(out), model=model_name, layers=layers, site=source.site, sos=source.sos, n=n_total,
        computed=run.computed, resumed_from=run.resumed_from, device=str(source.device),
        compute_dtype=dtype_name(source.dtype), batch_size=run.batch_size, store_dtype=store_dtype,
        images_per_s=round(run.computed / run.loop_seconds, 3) if run.loop_seconds > 0 and run.computed else None,
        seconds=round(time.perf_counter() - t_start, 3),
        world_size=dist.world_size if sharded else None, rank=dist.rank if sharded else None,
        shard=list(run.shard) if sharded else None,
    )


def _run_one_process(source, tf: h5py.File, tok: h5py.Dataset, tokens_path: Path, out: Path, identity: dict,
                     extra_attrs: dict, *, store_dtype: str, restart: bool, batch_size_given: bool,
                     on_progress: OnProgress | None) -> RowsRun:
    """Fill (or resume) the partial file `outputs.temp_path_for(out)`, then rename it onto `out`."""
    n_total, bs = int(identity["n_total"]), int(identity["batch_size"])
    reporter = Reporter(on_progress, "extract", n_total, "image")
    tmp = outputs.temp_path_for(out)
    if restart:
        tmp.unlink(missing_ok=True)
    stored = stored_batch_size(tmp)
    if stored is not None and stored != bs:
        # resume on the partial file's batch boundaries, so the result does not change
        if batch_size_given:
            reporter.log(f"resuming with the partial file's batch size {stored} (not {bs})")
        identity = dict(identity, batch_size=stored)
        bs = stored
    of = open_partial(tmp, lambda f: formats.features_mismatch(f, identity))
    resumed = 0
    if of is None:
        labels, sources = labels_and_sources(tf, n_total, tokens_path)
        of = create_partial(tmp, dims=source.dims, labels=labels, sources=sources, store_dtype=store_dtype,
                            attrs=dict(identity, **extra_attrs))
    else:
        resumed = int(of.attrs["n_done"])
        if resumed:
            reporter.log(f"resuming {tmp} at row {resumed} of {n_total}")
    with of:
        reporter.start(done=resumed)
        loop_seconds = fill_rows(source, tok, of, resumed, n_total, bs, reporter)
    os.replace(tmp, out)
    return RowsRun(computed=n_total - resumed, resumed_from=resumed, loop_seconds=loop_seconds, batch_size=bs)
