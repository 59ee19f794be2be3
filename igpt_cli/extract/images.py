"""`igpt features`: images of any supported kind in, per-layer iGPT features out, in one stream.

`extract_image_features(src, model, layers, out, ...)` opens the dataset (`data.open_dataset`:
folders, archives, single files, lists, globs, Hugging Face datasets, WebDataset shards),
quantizes each batch with the model's own palette at the model's own resolution
(`model_image_settings`: ``preprocessor_config.json``, else ``config.json``; `size`,
`palette` and `resize` override; a palette other than the one the model names is refused,
as `igpt extract` refuses such tokens) and feeds the tokens through `StreamedTokens` to the
stage kernel (`igpt_cli.stage`) with the same file and batch pieces as `igpt extract`. Under
torchrun every rank reads the stream and computes only its shard's rows. No tokens file is
written unless `keep_tokens` names one (then it is the very file `igpt quantize` would write).

The features file is the one `igpt extract` writes, except that it records the dataset
(`source`, `split`, `size`, `resize`, `palette_sha256`, `selection`) where that records a
tokens file; an interrupted run resumes from its partial file: the dataset's order is
fixed, so the rows already done are read again and skipped, not recomputed.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np

from .. import formats, outputs
from ..choices import RESIZE_MODES, SITES
from ..data import DEFAULT_SIZE, images_per_batch, open_dataset
from ..distributed import DistContext
from ..errors import InputError, ParameterError, check_choice, check_positive
from ..layers import parse_layers
from ..model.runtime import dtype_name, model_image_settings
from ..palette import Palette
from ..progress import OnProgress, Reporter
from ..stage import run_stage
from .sources import PIXELS, PixelSource
from .stage import (ExtractResult, check_pool, extract_result, features_bytes, features_compute, features_file,
                    load_source, model_source, source_positions, store_dtype_for)

__all__ = ["extract_image_features", "model_image_settings", "StreamedTokens"]


class StreamedTokens:
    """A dataset's images as token rows, quantized as they stream by and read as consecutive
    slices `[i, j)` (the stage kernel asks for its rows as it would read a tokens dataset).

    A slice may start past the last one (resuming): the rows between are read and dropped.
    `columns(i, j)` are the labels and sources of the rows of the last slice. `keep`, an open
    tokens file, receives every row read (dropped ones too)."""

    def __init__(self, batches: Iterator, palette: Palette, keep: h5py.File | None = None):
        self._batches, self._palette, self._keep = batches, palette, keep
        self._pos = 0  # dataset row of the first buffered row
        self._tok, self._lab, self._src = [], [], []  # buffered blocks
        self._last: dict[str, np.ndarray] = {}
        self.read = 0  # rows read from the dataset so far

    def _buffered(self) -> int:
        return sum(len(t) for t in self._tok)

    def _next(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The next batch as (tokens [B, S*S], labels [B], sources [B]), also appended to `keep`."""
        batch = next(self._batches, None)
        if batch is None:
            return None
        imgs, labels, sources = batch
        tok = self._palette.quantize(imgs)  # [B, S, S, 3] -> [B, S*S]
        lab, src = np.asarray(labels, dtype=np.int64), np.asarray(sources, dtype=object)
        if self._keep is not None:
            formats.append_rows(self._keep, tokens=tok, labels=lab, sources=src)
        self.read += len(tok)
        return tok, lab, src

    def _read_to(self, j: int) -> None:
        while self._pos + self._buffered() < j:
            block = self._next()
            if block is None:
                return
            for buf, b in zip((self._tok, self._lab, self._src), block):
                buf.append(b)

    def __getitem__(self, sl: slice) -> np.ndarray:
        i, j = sl.start, sl.stop
        if i < self._pos:
            raise ValueError(f"rows {i}:{j} were already streamed past (at row {self._pos})")
        self._read_to(j)
        tok, lab, src = (np.concatenate(b) if b else np.empty(0) for b in (self._tok, self._lab, self._src))
        a, b = min(i - self._pos, len(tok)), min(j - self._pos, len(tok))
        self._last = {"labels": lab[a:b], "sources": src[a:b]}
        self._tok, self._lab, self._src = [tok[b:]], [lab[b:]], [src[b:]]
        self._pos += b
        return tok[a:b] if len(tok) else np.empty((0, 0), np.uint16)

    def columns(self, i: int, j: int) -> dict[str, np.ndarray]:
        return self._last

    def drain(self) -> None:
        """Read the rest of the dataset (into `keep`), buffering nothing."""
        while self._next() is not None:
            pass


def _input_files(src) -> dict[str, str]:
    """The files among a dataset argument (folders, globs and hub ids are not files an output could be)."""
    items = src if isinstance(src, (list, tuple)) else [src]
    return {f"src[{i}]" if len(items) > 1 else "src": str(s) for i, s in enumerate(items)
            if isinstance(s, (str, Path)) and Path(str(s)).is_file()}


def extract_image_features(
    src,
    model: str | Path,
    layers: str | int | Sequence[str | int] | None = None,
    out: str | Path = "features.h5",
    *,
    split: str = "all",
    size: int | None = None,
    palette=None,
    resize: str | None = None,
    fmt: str | None = None,
    limit: int | None = None,
    limit_per_class: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    skip_bad: bool = False,
    max_pixels: int | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    keep_tokens: str | Path | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    compile: bool = False,
    sos: bool = True,
    site: str = "ln",
    pool: str = "mean",
    store_dtype: str | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
    overwrite: bool = False,
    restart: bool = False,
    on_progress: OnProgress | None = None,
    dist: DistContext | None = None,
) -> ExtractResult:
    """Features of the images at `src` (anything `open_dataset` reads, with its selection
    parameters) under `model` (a directory, bundled name, hub id; or "pixels" with `size`)
    in the features file `out`; see the module docstring. `size`, `palette`, `resize`
    default to the model's (`model_image_settings`); `keep_tokens`: also write the tokens
    file. Raises InputError on bad input, before any work starts. Progress: "extract" events.
    `dist` (world_size > 1): every rank reads the stream and computes only its shard's rows;
    rank 0 merges them (and writes `keep_tokens`)."""
    t_start = time.perf_counter()
    out = Path(out)
    site = check_choice("site", site, SITES)
    pool = check_pool(pool, model)
    store_dtype = store_dtype_for(pool, store_dtype)
    if resize is not None:
        resize = check_choice("resize", resize, RESIZE_MODES)
    check_positive("batch_size", batch_size)
    outputs.check_output_path(out, overwrite)
    if keep_tokens is not None:
        keep_tokens = outputs.check_output_path(keep_tokens, overwrite)
    outputs.check_distinct({"out": out, "keep_tokens": keep_tokens}, _input_files(src))
    sharded = dist is not None and dist.active
    main = dist is None or dist.is_main

    # --- the model and its image settings ----------------------------------------
    if str(model) == PIXELS:
        m = None
        size, pal, resize = (DEFAULT_SIZE if size is None else size), Palette.load(palette), resize or "bilinear"
    else:
        source, m = model_source(model, layers, device=device, dtype=dtype, site=site, sos=sos, pool=pool,
                                 dist=dist, revision=revision, local_files_only=local_files_only,
                                 quiet=on_progress is None)
        m_size, m_pal = model_image_settings(m.dir)
        size, resize = (m_size if size is None else size), resize or "bilinear"
        pal = m_pal if palette is None else (palette if isinstance(palette, Palette) else Palette.load(palette))
        if size is None:
            raise ParameterError("size", None, f"{m.dir}: n_positions={m.cfg.n_positions} is not a square "
                                               "image; give the image side")
        if pal is None:
            raise ParameterError("palette", None, f"{m.dir} has no preprocessor_config.json with its "
                                                  f"{m.cfg.vocab_size - 1}-colour palette; give one")

    ds = open_dataset(src, split=split, size=size, resize=resize, fmt=fmt, limit=limit, skip_bad=skip_bad,
                      limit_per_class=limit_per_class, shuffle=shuffle, seed=seed, max_pixels=max_pixels,
                      image_column=image_column, label_column=label_column)
    n_total = ds.n
    if n_total is None:
        raise InputError(f"{src}: the number of images is not known up front; pass limit=N (an upper bound), "
                         "or quantize it first with igpt quantize and run igpt extract")
    if n_total == 0:
        raise InputError(f"{src}: no images")
    where = Path(str(src if not isinstance(src, (list, tuple)) else src[0]))

    if m is None:
        layers = parse_layers(layers, [0], where="the pixels baseline")
        source = PixelSource(pal.centers, size, size)
    else:
        m.check_tokens(size, size, pal.centers, where)
    positions = source_positions(source, m)
    if not sharded:  # under torchrun each part and the merge check their own
        outputs.check_free_space(out, features_bytes(n_total, source.dims if m is None else
                                                     {layer: m.cfg.n_embd for layer in source.layers}, store_dtype,
                                                     positions),
                                 partial=outputs.temp_path_for(out))
    auto_bs = load_source(source, m, store_dtype, compile=compile) if m is not None else 256
    bs = min(batch_size or auto_bs, n_total)
    # skip_bad is no part of the identity: a run without it stops at the first bad image, so its rows
    # are those a run with it computes, and the rerun its error suggests (skip_bad=True) resumes it
    selection = dict(fmt=ds.kind, limit=limit, limit_per_class=limit_per_class, shuffle=bool(shuffle), seed=seed,
                     max_pixels=max_pixels, image_column=image_column, label_column=label_column)
    srcs = [os.path.abspath(s) for s in src] if isinstance(src, (list, tuple)) else os.path.abspath(src)
    identity = dict(
        layers=source.layers, site=source.site, sos=source.sos, pool=source.pool,
        compute_dtype=dtype_name(source.dtype), device_type=source.device.type, model_sha256=source.sha256,
        model_config=source.config_json, source=json.dumps(srcs) if isinstance(srcs, list) else srcs,
        split=ds.split, size=size, resize=ds.resize, palette_sha256=pal.sha256, selection=json.dumps(selection),
    )
    attrs = dict(model=source.name, class_names=json.dumps(ds.class_names), height=size, width=size,
                 skip_bad=bool(skip_bad),
                 tokens_file=os.path.abspath(keep_tokens) if keep_tokens is not None else None)
    spec = features_file(source, n_total, store_dtype, identity, attrs, positions=positions)

    read_bs = images_per_batch(size, 256)
    with contextlib.ExitStack() as stack:
        keep = None
        if keep_tokens is not None and main:  # the tokens file quantize writes, with quantize's guarantees
            outputs.check_free_space(keep_tokens, n_total * (size * size * 2 + 8))
            tmp_tokens = stack.enter_context(outputs.atomic_output(keep_tokens))
            keep = stack.enter_context(outputs.hdf5_output(tmp_tokens, keep_tokens))
            formats.create_tokens_file(keep, height=size, width=size, palette=pal.centers,
                                       class_names=ds.class_names, split=ds.split, source=srcs if isinstance(
                                           srcs, str) else json.dumps(srcs), resize=ds.resize)
        batches = stack.enter_context(contextlib.closing(ds.batches(read_bs)))
        rows = StreamedTokens(batches, pal, keep)
        compute = features_compute(source, lambda i, j: rows[i:j], store_dtype, columns=lambda: rows.columns(0, 0))
        run = run_stage(out, spec, compute, batch_size=bs, batch_size_given=batch_size is not None,
                        reporter=Reporter(on_progress, "extract", n_total, "image"), overwrite=overwrite,
                        restart=restart, dist=dist,
                        settings=dict(keep_tokens=str(keep_tokens) if keep_tokens is not None else None))
        if keep is not None:
            rows.drain()
    return extract_result(out, source, run, store_dtype, time.perf_counter() - t_start)
