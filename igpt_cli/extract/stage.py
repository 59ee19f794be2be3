"""`igpt extract`: a tokens file in, per-layer iGPT features out.

`extract_features(tokens_path, model, layers, out, ...)` checks everything before any
work starts (tokens file, model directory, resolution, palette, token range, output
path), then hands the stage kernel (`igpt_cli.stage.run_stage`) what a features file
holds (`features_file`) and how a batch of it is computed (`features_compute`); the kernel
locks, resumes, shards under torchrun, and renames. Called again with the same arguments
after an interruption it resumes from the partial file (`restart=True` discards it).
`igpt features` (`images.py`) uses the same two pieces on a stream of images.

The same computation on arrays, without files, is in `memory.py`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import h5py
import numpy as np
import torch

from .. import formats, outputs
from ..choices import POOLS, SITES, STORE_DTYPES
from ..distributed import DistContext
from ..errors import InputError, ParameterError, check_choice, check_positive
from ..formats import features_bytes
from ..layers import parse_layers
from ..model.runtime import dtype_name, feature_batch_size, open_model
from ..progress import OnProgress, Reporter
from ..results import Result
from ..stage import StageFile, StageRun, run_stage
from .sources import PIXELS, ModelSource, PixelSource


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
# What a features file holds, and how a batch of it is computed
# ---------------------------------------------------------------------------
def store_dtype_for(pool: str, store_dtype: str | None) -> str:
    """The dtype features are stored in: as given, else float16 for token maps (pool "none": T times
    the bytes of a pooled file) and float32 for pooled vectors."""
    if store_dtype is None:
        return "float16" if pool == formats.TOKEN_MAPS_POOL else "float32"
    return check_choice("store_dtype", store_dtype, STORE_DTYPES)


def check_pool(pool: str, model) -> str:
    """The checked pool; the raw-pixel baseline has none (its features are the whole image)."""
    pool = check_choice("pool", pool, POOLS)
    if str(model) == PIXELS and pool != "mean":
        raise ParameterError("pool", pool, "the pixels baseline is the whole image: it has no positions to pool")
    return pool


def features_file(source, n_total: int, store_dtype: str, identity: dict, attrs: dict, *,
                  labels: np.ndarray | None = None, sources: np.ndarray | None = None,
                  positions: int | None = None) -> StageFile:
    """The `StageFile` of a features file of `source`'s layers (`positions`: token maps [N, T, D]).
    `labels`/`sources` known up front (a tokens file) are laid out with the file; None: the rows
    bring them (a stream)."""
    dims = source.dims
    streamed = labels is None

    def layout(f: h5py.File, start: int, stop: int) -> None:
        n = stop - start
        lab = np.full(n, -1) if streamed else labels[start:stop]
        src = np.full(n, "", dtype=object) if streamed else sources[start:stop]
        formats.create_features_file(f, dims=dims, labels=lab, sources=src, store_dtype=store_dtype, attrs={},
                                     device=str(source.device), positions=positions)

    rows = tuple(f"features/{layer}" for layer in sorted(dims)) + (("labels", "sources") if streamed else ())
    return StageFile(formats.FEATURES_FORMAT, n_total, dict(identity, store_dtype=store_dtype), attrs, layout, rows,
                     row_bytes=features_bytes(1, dims, store_dtype, positions) - (1 << 16), device=source.device)


def features_compute(source, read: Callable[[int, int], np.ndarray], store_dtype: str,
                     columns: Callable[[], dict[str, np.ndarray]] | None = None):
    """`compute(i, j)` for the stage kernel: the features of token rows `read(i, j)` (fewer rows: the
    input ended), plus the `columns()` a stream brings with them (labels, sources)."""
    dtype = np.dtype(store_dtype)

    def compute(i: int, j: int) -> dict[str, np.ndarray]:
        rows = read(i, j)
        if not len(rows):
            return {}
        feats = source(rows)
        out = {f"features/{layer}": v.astype(dtype, copy=False) for layer, v in feats.items()}
        out.update(columns() if columns is not None else {})
        return out

    return compute


def extract_result(out: Path, source, run: StageRun, store_dtype: str, seconds: float) -> "ExtractResult":
    """The summary of a features stage (`extract`, `features`)."""
    # images_per_s: the model's rate in the row loop; for the pixel baseline, whose loop is a
    # table lookup, the rate of the whole stage (reading, hashing, writing), which is what it costs
    rate_s = seconds if isinstance(source, PixelSource) else run.loop_seconds
    sharded = run.world_size > 1
    return ExtractResult(
        out=str(out), model=source.name, layers=source.layers, site=source.site, sos=source.sos, n=run.n,
        computed=run.computed, resumed_from=run.resumed_from, device=str(source.device),
        compute_dtype=dtype_name(source.dtype), batch_size=run.batch_size, store_dtype=store_dtype,
        images_per_s=round(run.computed / rate_s, 3) if rate_s > 0 and run.computed else None,
        seconds=round(seconds, 3), world_size=run.world_size if sharded else None,
        rank=run.rank if sharded else None, shard=list(run.shard) if sharded and run.shard else None)


def model_source(model, layers, *, device, dtype, site, sos, pool, dist, revision=None, local_files_only=False,
                 quiet=True):
    """(the checked, not yet loaded ModelSource, its OpenedModel) of a checkpoint for features."""
    m = open_model(model, device=device, dtype=dtype, revision=revision, local_files_only=local_files_only,
                   quiet=quiet, dist=dist)
    layers = parse_layers(layers, range(m.cfg.n_layer + 1))
    sos = bool(sos) and m.cfg.autoregressive  # a BERT model reads its tokens unshifted
    source = ModelSource(None, m.device, m.dtype, layers, site, sos, str(m.dir), pool=pool)  # type: ignore[arg-type]
    return source, m


def source_positions(source, m) -> int | None:
    """Positions per row of `source`'s features: the model's for token maps, None for vectors."""
    return m.cfg.n_positions if m is not None and source.pool == formats.TOKEN_MAPS_POOL else None


def load_source(source, m, store_dtype: str, *, compile: bool = False) -> int:
    """Load the model of a ModelSource (after every check passed) to give host arrays of
    `store_dtype`; returns its automatic batch size. `compile`: its blocks through `torch.compile`
    (`IGPT.compile_blocks`; eager where unavailable)."""
    source.model = m.load()
    if compile:
        source.model.compile_blocks()
    source.sha256 = m.sha256
    source.out_dtype = getattr(torch, store_dtype)
    row = sum(source.dims.values()) * (source_positions(source, m) or 1) * np.dtype(store_dtype).itemsize
    return feature_batch_size(m.cfg, m.device, m.dtype, host_row_bytes=row)


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
    store_dtype: str | None = None,
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
    (default all). `pool`: "mean" (the paper's), "max", or "none" (token maps [N, T, D] per
    layer); `store_dtype` None: float16 for token maps, else float32. A file that would not
    fit the disk is refused before any work. Progress and resume notices go to `on_progress` (task "extract",
    unit "image"). `dist` (a DistContext with world_size > 1): extract this rank's
    shard into a part file, and on rank 0 merge the parts into `out` (`igpt_cli.stage`). `compile`: run
    the model's blocks through `torch.compile` (`IGPT.compile_blocks`; eager where unavailable).
    """
    t_start = time.perf_counter()
    tokens_path, out = Path(tokens_path), Path(out)
    site = check_choice("site", site, SITES)
    pool = check_pool(pool, model)
    store_dtype = store_dtype_for(pool, store_dtype)
    check_positive("batch_size", batch_size)
    check_positive("limit", limit)
    outputs.check_output_path(out, overwrite)
    outputs.check_distinct({"out": out}, {"tokens_path": tokens_path})
    with formats.open_igpt(tokens_path, formats.TOKENS_FORMAT) as tf:
        tok, height, width, palette = formats.tokens_layout(tf, tokens_path)
        names = formats.class_names(tf, tokens_path)
        n_total = min(tok.shape[0], limit) if limit else tok.shape[0]
        if n_total == 0:
            raise InputError(f"{tokens_path}: the tokens file holds no images")

        # --- the feature source: every check before the weights load ---------------
        source: ModelSource | PixelSource
        if str(model) == PIXELS:
            layers = parse_layers(layers, [0], where="the pixels baseline")
            source, m = PixelSource(palette, height, width), None
        else:
            source, m = model_source(model, layers, device=device, dtype=dtype, site=site, sos=sos, pool=pool,
                                     dist=dist, revision=revision, quiet=on_progress is None)
            m.check_tokens(height, width, palette, tokens_path)
        dims = source.dims if m is None else {layer: m.cfg.n_embd for layer in source.layers}
        positions = source_positions(source, m)
        if dist is None or not dist.active:  # under torchrun each part and the merge check their own
            outputs.check_free_space(out, features_bytes(n_total, dims, store_dtype, positions),
                                     partial=outputs.temp_path_for(out))
        formats.check_token_values(tok, len(palette), tokens_path, n_total)
        auto_bs = load_source(source, m, store_dtype, compile=compile) if m is not None else 256
        bs = min(batch_size or auto_bs, n_total)
        identity = dict(
            layers=source.layers, site=source.site, sos=source.sos, pool=source.pool,
            compute_dtype=dtype_name(source.dtype), device_type=source.device.type,
            model_sha256=source.sha256, model_config=source.config_json,
            tokens_sha256=formats.sha256_file(tokens_path),
        )
        attrs = dict(model=source.name, tokens_file=str(tokens_path), class_names=json.dumps(names),
                     height=height, width=width)
        labels, sources = formats.labels_and_sources(tf, n_total, tokens_path)
        spec = features_file(source, n_total, store_dtype, identity, attrs, labels=labels, sources=sources,
                             positions=positions)
        compute = features_compute(source, lambda i, j: formats.read_dataset(tok, slice(i, j), tokens_path),
                                   store_dtype)
        run = run_stage(out, spec, compute, batch_size=bs, batch_size_given=batch_size is not None,
                        reporter=Reporter(on_progress, "extract", n_total, "image"), overwrite=overwrite,
                        restart=restart, dist=dist)
    return extract_result(out, source, run, store_dtype, time.perf_counter() - t_start)
