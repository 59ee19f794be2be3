"""`igpt extract`: a tokens file in, per-layer iGPT features out.

`extract_features(tokens_path, model, layers, out, ...)` checks everything before any
work starts (tokens file, model directory, resolution, palette, token range, output
path), then fills a partial features file next to `out` with the shared row loop
(`rows.py`) and renames it into place when complete. Called again with the same
arguments after an interruption it resumes from that partial file (`restart=True`
discards it). The output is locked for the whole run (`outputs.output_lock`: a second
run on the same output fails at once, naming the first), and the file system must have
room for the whole file before it starts. Under torchrun every rank fills a part file
of its shard and rank 0 merges them (`sharded.py`).

The same computation on arrays, without files, is in `memory.py`.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import h5py
import numpy as np

from .. import formats, outputs
from ..choices import POOLS, SITES, STORE_DTYPES
from ..errors import InputError, check_choice, check_positive
from ..layers import parse_layers
from ..model import find_weights, read_config, resolve_model_dir
from ..progress import OnProgress, Reporter
from ..results import Result
from ..runtime import resolve_device, resolve_dtype
from .rows import (RowsRun, close_quietly, create_partial, features_bytes, fill_rows, labels_and_sources, open_partial,
                   shrink_partial, stored_batch_size)
from ..distributed import DistContext
from .sharded import run_shard
from .sources import (PIXELS, ModelSource, PixelSource, auto_batch_size, check_model_fits, dtype_name,
                      load_model)


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
    images_per_s: float | None  # rows computed / row-loop seconds; pixels: / the whole stage's seconds
    seconds: float
    world_size: int | None = None  # these three only for a sharded (torchrun) run
    rank: int | None = None
    shard: list[int] | None = None  # this rank's rows [start, stop)

    _omit_if_none = ("world_size", "rank", "shard")


# ---------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------
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
    revision: str | None = None,
    compile: bool = False,
) -> ExtractResult:
    """Run the extract stage. Raises InputError on bad input, before any work starts.

    `model` is anything `model.resolve_model_dir` takes (a Hugging Face ImageGPT directory,
    a bundled name, an OpenAI TensorFlow checkpoint prefix, a hub id at `revision`), or
    "pixels" for the raw-pixel baseline. `layers`: specs as in `igpt_cli.layers`
    (default all). Progress and resume notices go to `on_progress` (task "extract",
    unit "image"). `dist` (a DistContext with world_size > 1): extract this rank's
    shard into a part file, and on rank 0 merge the parts into `out`. `compile`: run the
    model's blocks through `torch.compile` (`IGPT.compile_blocks`; eager where unavailable).
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
    if str(model) != PIXELS:  # a name (bundled, hub id at `revision`, TF prefix) becomes its directory, once
        model = resolve_model_dir(model, revision=revision, quiet=on_progress is None)
    sharded = dist is not None and dist.active
    # one process: the output is locked for the whole run, resume and rename included (under
    # torchrun every rank locks its part file and rank 0 the output, in `run_shard`)
    with contextlib.nullcontext() if sharded else outputs.output_lock(out):
        if not sharded:
            outputs.check_output_path(out, overwrite)  # again under the lock: a run that just finished
        with formats.open_igpt(tokens_path, formats.TOKENS_FORMAT) as tf:
            source, run, n = _extract_open(tf, tokens_path, model, layers, out, batch_size=batch_size,
                                           device=device, dtype=dtype, sos=sos, site=site, pool=pool, limit=limit,
                                           store_dtype=store_dtype, overwrite=overwrite, restart=restart,
                                           on_progress=on_progress, dist=dist if sharded else None,
                                           compile=compile)
    seconds = time.perf_counter() - t_start
    # images_per_s: the model's rate in the row loop; for the pixel baseline, whose loop is a
    # table lookup, the rate of the whole stage (reading, hashing, writing), which is what it costs
    rate_s = seconds if isinstance(source, PixelSource) else run.loop_seconds
    return ExtractResult(
        out=str(out), model=source.name, layers=source.layers, site=source.site, sos=source.sos, n=n,
        computed=run.computed, resumed_from=run.resumed_from, device=str(source.device),
        compute_dtype=dtype_name(source.dtype), batch_size=run.batch_size, store_dtype=store_dtype,
        images_per_s=round(run.computed / rate_s, 3) if rate_s > 0 and run.computed else None,
        seconds=round(seconds, 3),
        world_size=dist.world_size if sharded else None, rank=dist.rank if sharded else None,
        shard=list(run.shard) if sharded else None,
    )


def _extract_open(tf: h5py.File, tokens_path: Path, model, layers, out: Path, *, batch_size, device, dtype, sos,
                  site, pool, limit, store_dtype, overwrite, restart, on_progress, dist, compile=False):
    """`extract_features` on the open tokens file `tf`: checks, the source, then the run.

    Returns (the feature source, the RowsRun, rows in the features file)."""
    tok, height, width, palette = formats.tokens_layout(tf, tokens_path)
    names = formats.class_names(tf, tokens_path)
    n_total = min(tok.shape[0], limit) if limit else tok.shape[0]
    if n_total == 0:
        raise InputError(f"{tokens_path}: the tokens file holds no images")

    # --- the feature source: every check before the weights load ---------------
    source: ModelSource | PixelSource
    if str(model) == PIXELS:
        layers = parse_layers(layers, [0], where="the pixels baseline")
        source, weights = PixelSource(palette, height, width), None
        dims = source.dims
    else:
        model_dir = resolve_model_dir(model)
        dev = resolve_device(device)
        if dist is not None:
            dev = dist.device_for(dev)  # cuda -> cuda:LOCAL_RANK
        cdt = resolve_dtype(dtype, dev)
        weights, cfg = find_weights(model_dir), read_config(model_dir)
        layers = parse_layers(layers, range(cfg.n_layer + 1))
        check_model_fits(cfg, height, width, len(palette), tokens_path)
        source = ModelSource(None, dev, cdt, layers, site, bool(sos) and cfg.autoregressive, str(model_dir),  # type: ignore[arg-type]
                             pool=pool)  # the model loads below, once everything is checked
        dims = {layer: cfg.n_embd for layer in layers}
    if dist is None:  # a sharded run checks each part's space and the merge's on its own
        outputs.check_free_space(out, features_bytes(n_total, dims, store_dtype), partial=outputs.temp_path_for(out))
    formats.check_token_values(tok, len(palette), tokens_path, n_total)
    if weights is not None:
        source.model = load_model(model_dir, source.device, source.dtype)
        if compile:
            source.model.compile_blocks()
        source.sha256 = formats.sha256_file(weights)

    bs = batch_size or (auto_batch_size(source.model, source.device, source.dtype)
                        if isinstance(source, ModelSource) else 256)
    identity = dict(
        layers=layers, site=source.site, sos=source.sos, pool=source.pool,
        compute_dtype=dtype_name(source.dtype), store_dtype=store_dtype, device_type=source.device.type,
        batch_size=min(bs, n_total), model_sha256=source.sha256, model_config=source.config_json,
        tokens_sha256=formats.sha256_file(tokens_path), n_total=n_total,
    )
    extra_attrs = dict(model=source.name, tokens_file=str(tokens_path), class_names=json.dumps(names),
                       height=height, width=width)
    if dist is not None:
        run = run_shard(dist, source, tf, tok, tokens_path, out, identity, extra_attrs,
                        store_dtype=store_dtype, restart=restart, overwrite=overwrite, on_progress=on_progress)
    else:
        run = _run_one_process(source, tf, tok, tokens_path, out, identity, extra_attrs,
                               store_dtype=store_dtype, restart=restart,
                               batch_size_given=batch_size is not None, on_progress=on_progress)
    return source, run, n_total


def _run_one_process(source, tf: h5py.File, tok: h5py.Dataset, tokens_path: Path, out: Path, identity: dict,
                     extra_attrs: dict, *, store_dtype: str, restart: bool, batch_size_given: bool,
                     on_progress: OnProgress | None) -> RowsRun:
    """`run_rows` over the rows of an open tokens file."""
    return run_rows(source, tok, out, identity, extra_attrs,
                    labels_sources=lambda: labels_and_sources(tf, int(identity["n_total"]), tokens_path),
                    store_dtype=store_dtype, restart=restart, batch_size_given=batch_size_given,
                    on_progress=on_progress)


def run_rows(source, rows, out: Path, identity: dict, extra_attrs: dict, *,
             labels_sources: Callable[[], tuple[np.ndarray, np.ndarray]],
             columns: Callable[[int, int], dict[str, np.ndarray]] | None = None, store_dtype: str, restart: bool,
             batch_size_given: bool, on_progress: OnProgress | None) -> RowsRun:
    """Fill (or resume) the partial file `outputs.temp_path_for(out)` with the features of the
    token rows `rows` (see `rows.fill_rows`), then rename it onto `out`.

    `labels_sources()` gives the labels and sources a fresh file starts with (`columns`
    fills them as rows stream by when they are not known up front); a stream that ends
    before `n_total` rows leaves a file of the rows it had. The caller holds the output
    lock of `out`."""
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
        labels, sources = labels_sources()
        of = create_partial(tmp, dims=source.dims, labels=labels, sources=sources, store_dtype=store_dtype,
                            attrs=dict(identity, **extra_attrs), device=str(source.device))
    else:
        resumed = int(of.attrs["n_done"])
        if resumed:
            reporter.log(f"resuming {tmp} at row {resumed} of {n_total}")
    try:
        reporter.start(done=resumed)
        loop_seconds = fill_rows(source, rows, of, resumed, n_total, bs, reporter, columns=columns)
        n = int(of.attrs["n_done"])
        if n < n_total:
            of = shrink_partial(of, tmp, n)
    except BaseException:
        close_quietly(of)
        raise
    of.close()  # complete and closed before it takes the final name
    os.replace(tmp, out)
    return RowsRun(computed=n - resumed, resumed_from=resumed, loop_seconds=loop_seconds, batch_size=bs, n=n)
