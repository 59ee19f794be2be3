"""`igpt extract`: tokens file in, per-layer averaged iGPT features out.

Library entry point: `extract_features(tokens_path, model, layers, out, ...)`.
The row loop is `extract_rows(source, tokens, out_file, start, stop, ...)`, which
fills rows [start, stop) of an open features file batch by batch; `extract_features`
adds validation, resumption and the atomic rename around it.

Resumption: the partial file lives at `formats.temp_path_for(out)`. After each batch
the rows are flushed first and `n_done` second, so `n_done` never runs ahead of the
data. Batch boundaries are multiples of the batch size recorded in the file, so a
resumed run computes exactly the batches an uninterrupted run would, and the
finished file is the same.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import h5py
import numpy as np
import torch

from . import formats
from .errors import InputError
from .model import IGPT, SITES, find_weights, load_pretrained, read_config, sos_shift
from .layers import parse_layers
from .runtime import resolve_device, resolve_dtype

STORE_DTYPES = ("float32", "float16")
PIXELS = "pixels"


# ---------------------------------------------------------------------------
# Layer specs (shared with `igpt probe`)
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# Device, dtype, batch size
# ---------------------------------------------------------------------------
def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def auto_batch_size(model: IGPT, device: torch.device, dtype: torch.dtype, max_depth: int) -> int:
    """A batch that keeps the matmuls large and the activations well inside memory."""
    cfg = model.config
    T, C = cfg.n_positions, cfg.n_embd
    elt = torch.finfo(dtype).bits // 8
    # live activations of one block for one image: residual, ln, qkv, attention out,
    # MLP hidden (+ activation), float32 layer-norm copies, plus the attention scores
    # of a non-fused SDPA path as a safety margin.
    per_image = T * (C * (2 + 3 + 1 + 2 * (cfg.mlp_width // C) + 2) * elt + C * 8) + cfg.n_head * T * T * 4
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = 0.5 * free
        return int(max(1, min(256, budget // per_image)))
    if device.type == "cpu":
        # CPU throughput saturates once a batch holds a few thousand tokens; more only costs memory.
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # pragma: no cover
            avail = 4 << 30
        by_mem = int(max(1, 0.25 * avail // per_image))
        by_tokens = max(1, 8192 // T)
        return int(max(1, min(by_mem, by_tokens, 64)))
    return 8


# ---------------------------------------------------------------------------
# Feature sources: an iGPT checkpoint, or raw palette pixels
# ---------------------------------------------------------------------------
def sha256_file(path: str | Path, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ModelSource:
    """Features from an iGPT model: `{layer: [B, n_embd] float32}` for a token batch."""

    model: IGPT
    device: torch.device
    dtype: torch.dtype
    layers: list[int]
    site: str = "ln"
    sos: bool = True
    name: str = ""
    sha256: str = ""

    @property
    def dims(self) -> dict[int, int]:
        return {layer: self.model.config.n_embd for layer in self.layers}

    @property
    def config_json(self) -> str:
        return json.dumps(self.model.config.to_hf_dict(), sort_keys=True)

    def __call__(self, tokens: np.ndarray) -> dict[int, np.ndarray]:
        idx = torch.from_numpy(tokens.astype(np.int64, copy=False)).to(self.device, non_blocking=True)
        if self.sos:
            idx = sos_shift(idx, self.model.config.sos_token)
        with torch.inference_mode():
            feats = self.model.forward_intermediates(idx, self.layers, site=self.site)
        return {k: v.float().cpu().numpy() for k, v in feats.items()}


@dataclass
class PixelSource:
    """The raw-pixel baseline: palette RGB in [-1, 1], flattened H*W*3, as layer 0."""

    palette: np.ndarray
    height: int
    width: int
    layers: list[int] = field(default_factory=lambda: [0])
    name: str = PIXELS
    sha256: str = ""
    site: str = "pixels"
    sos: bool = False
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")

    @property
    def dims(self) -> dict[int, int]:
        return {0: self.height * self.width * 3}

    @property
    def config_json(self) -> str:
        return json.dumps({"kind": PIXELS, "height": self.height, "width": self.width,
                           "palette_size": int(len(self.palette))}, sort_keys=True)

    def __call__(self, tokens: np.ndarray) -> dict[int, np.ndarray]:
        return {0: self.palette[tokens.astype(np.int64)].reshape(len(tokens), -1)}


def resolve_model_dir(model: str | Path) -> Path:
    """A directory as given, or a Hugging Face hub name (`openai/imagegpt-small`) found in the local HF cache."""
    p = Path(model)
    if p.is_dir() or "/" not in str(model) or str(model).startswith((".", "/", "~")):
        return p
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    snaps = sorted((hub / f"models--{str(model).replace('/', '--')}" / "snapshots").glob("*/config.json"),
                   key=lambda c: c.stat().st_mtime)
    return snaps[-1].parent if snaps else p


def load_model(model_dir: str | Path, device: torch.device, dtype: torch.dtype) -> IGPT:
    """Load a checkpoint directory onto `device` with weights cast to `dtype` (no autocast)."""
    model = load_pretrained(model_dir)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


# ---------------------------------------------------------------------------
# The row loop
# ---------------------------------------------------------------------------
def _rate_progress(total: int, done: int, enabled: bool, description: str):
    """A rich progress bar on stderr (images/s, ETA), or a no-op."""
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task):  # noqa: D401
            speed = task.finished_speed or task.speed
            return Text(f"{speed:.1f} img/s" if speed else "– img/s")

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                        console=Console(stderr=True), transient=False)
    progress.start()
    progress.add_task(description, total=total, completed=done)
    return progress


def extract_rows(
    source: Callable[[np.ndarray], dict[int, np.ndarray]],
    tokens: h5py.Dataset,
    out: h5py.File,
    start: int,
    stop: int,
    batch_size: int,
    *,
    out_offset: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """Fill features rows [start, stop) of the open file `out` from tokens rows [start, stop).

    Tokens row r lands in features row r - out_offset (a part file of a sharded run
    sets out_offset = its first row). Batches start at `start` and step by
    `batch_size`; after each batch the rows are flushed, then `attrs["n_done"]`
    (rows of `out` done, counted from its row 0) is updated and flushed.
    Returns the number of rows written.
    """
    dsets = {int(k): v for k, v in out["features"].items()}
    for i in range(start, stop, batch_size):
        j = min(i + batch_size, stop)
        feats = source(tokens[i:j])
        for layer, ds in dsets.items():
            ds[i - out_offset:j - out_offset] = feats[layer].astype(ds.dtype, copy=False)
        out.flush()  # data first …
        out.attrs["n_done"] = j - out_offset
        out.flush()  # … then the counter: n_done never runs ahead of the rows
        if on_batch:
            on_batch(j - i)
    return stop - start


# ---------------------------------------------------------------------------
# Validation and the whole stage
# ---------------------------------------------------------------------------
def _scan_tokens(tokens: h5py.Dataset, n: int, palette_size: int, path: Path) -> None:
    step = max(1, (1 << 24) // max(1, tokens.shape[1]))
    for i in range(0, n, step):
        block = tokens[i:min(i + step, n)]
        hi = int(block.max()) if block.size else 0
        if hi >= palette_size:
            row = i + int(np.argwhere(block >= palette_size)[0][0])
            raise InputError(f"{path}: token value {hi} at row {row} is not below the palette size {palette_size}")


def _stored_batch_size(tmp: Path) -> int | None:
    if not tmp.exists():
        return None
    try:
        with h5py.File(tmp, "r") as f:
            return int(f.attrs["batch_size"])
    except Exception:
        return None


def labels_and_sources(tf: h5py.File, n: int, tokens_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The first n labels and sources of a tokens file (-1 / "name[i]" where it has none)."""
    labels = np.asarray(tf["labels"][:n]) if "labels" in tf else np.full(n, -1)
    sources = (np.asarray(tf["sources"].asstr()[:n], dtype=object) if "sources" in tf
               else np.array([f"{tokens_path.name}[{i}]" for i in range(n)], dtype=object))
    return labels, sources


def create_partial(path: Path, **create_kw) -> h5py.File:
    """Start a fresh partial features file at `path`; nothing is left behind if that fails."""
    path.unlink(missing_ok=True)
    of = h5py.File(path, "w")
    try:
        formats.create_features_file(of, **create_kw)
        of.flush()
    except BaseException:
        of.close()
        path.unlink(missing_ok=True)
        raise
    return of


def _open_partial(tmp: Path, expected: dict) -> h5py.File | None:
    """Reopen a partial file for resumption; None if there is nothing usable to resume."""
    if not tmp.exists():
        return None
    try:
        f = h5py.File(tmp, "r+")
    except OSError:
        return None  # killed before its first flush: nothing to keep
    try:
        attrs = formats.read_attrs(f)
        if attrs.get("format") != formats.FEATURES_FORMAT or "n_done" not in attrs or "features" not in f:
            f.close()
            return None
        why = formats.features_mismatch(f, expected)
    except Exception:
        f.close()
        return None
    if why:
        f.close()
        raise InputError(f"{tmp}: a partial run with different settings is in the way: {why}. "
                         "Run the original command again to resume it, or pass --restart to discard it")
    return f


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
    limit: int | None = None,
    store_dtype: str = "float32",
    progress: bool = True,
    overwrite: bool = False,
    restart: bool = False,
    log: Callable[[str], None] | None = None,
    dist=None,
) -> dict:
    """Run the extract stage; returns a summary dict. Raises InputError on bad input.

    `model` is a Hugging Face ImageGPT directory or "pixels". Interrupted runs
    resume from their partial file (`formats.temp_path_for(out)`) when called again
    with the same arguments; `restart=True` discards such a file.
    `dist` (a `distributed.DistContext` with world_size > 1): extract this rank's shard
    into a part file, and on rank 0 merge the parts into `out` (see distributed.py).
    """
    t_start = time.perf_counter()
    tokens_path, out = Path(tokens_path), Path(out)
    if site not in SITES:
        raise InputError(f"--site {site}: expected one of {', '.join(SITES)}")
    if store_dtype not in STORE_DTYPES:
        raise InputError(f"--store-dtype {store_dtype}: expected one of {', '.join(STORE_DTYPES)}")
    if batch_size is not None and batch_size < 1:
        raise InputError(f"--batch-size {batch_size}: must be at least 1")
    if limit is not None and limit < 1:
        raise InputError(f"--limit {limit}: must be at least 1")
    formats.check_output_path(out, overwrite)
    if out.resolve() == tokens_path.resolve():
        raise InputError(f"{out}: output would overwrite the tokens file")

    tf = formats.open_igpt(tokens_path, formats.TOKENS_FORMAT)
    try:
        missing = [k for k in ("tokens", "palette") if k not in tf] + [a for a in ("height", "width") if a not in tf.attrs]
        if missing:
            raise InputError(f"{tokens_path}: tokens file lacks {', '.join(missing)}")
        tok = tf["tokens"]
        height, width = int(tf.attrs["height"]), int(tf.attrs["width"])
        palette = np.asarray(tf["palette"], dtype=np.float32)
        n_rows = tok.shape[0]
        n_total = min(n_rows, limit) if limit else n_rows
        if n_total == 0:
            raise InputError(f"{tokens_path}: the tokens file holds no images")

        # --- the feature source -------------------------------------------------
        if str(model) == PIXELS:
            lay = parse_layers(layers, [0], where="the pixels baseline")
            dev, cdt = torch.device("cpu"), torch.float32
            source: ModelSource | PixelSource = PixelSource(palette, height, width)
            site_attr, sos_attr = "pixels", False
        else:
            model = resolve_model_dir(model)
            dev = resolve_device(device)
            if dist is not None:
                dev = dist.device_for(dev)  # cuda -> cuda:LOCAL_RANK
            cdt = resolve_dtype(dtype, dev)
            weights = find_weights(model)
            cfg = read_config(model)
            lay = parse_layers(layers, range(cfg.n_layer + 1))
            if height * width != cfg.n_positions:
                side = cfg.side
                want = f"{side}x{side} images" if side else f"{cfg.n_positions} positions"
                raise InputError(f"{tokens_path}: images are {height}x{width} ({height * width} positions) "
                                 f"but the model wants {want} (n_positions={cfg.n_positions}); "
                                 f"quantize at that resolution")
            if len(palette) > cfg.vocab_size - 1:
                raise InputError(f"{tokens_path}: palette has {len(palette)} colours but the model knows "
                                 f"{cfg.vocab_size - 1} (vocab_size={cfg.vocab_size} incl. SOS)")
            source = ModelSource(None, dev, cdt, lay, site, sos, str(model), "")  # model loaded below
            site_attr, sos_attr = site, bool(sos)
        _scan_tokens(tok, n_total, len(palette), tokens_path)

        if str(model) != PIXELS:
            source.model = load_model(model, dev, cdt)
            source.sha256 = sha256_file(weights)
        bs = batch_size or (auto_batch_size(source.model, dev, cdt, max(lay))
                            if isinstance(source, ModelSource) else 256)
        bs = min(bs, n_total)
        identity = dict(
            layers=lay, site=site_attr, sos=sos_attr, compute_dtype=dtype_name(cdt),
            store_dtype=store_dtype, device_type=dev.type, batch_size=bs,
            model_sha256=source.sha256, model_config=source.config_json,
            tokens_sha256=sha256_file(tokens_path), n_total=n_total,
        )
        if dist is not None and dist.active:
            from .distributed import run_shard

            return run_shard(dist, source, tf, tok, tokens_path, out, identity,
                             dict(model=str(model), tokens_file=str(tokens_path),
                                  class_names=json.dumps(formats.class_names(tf)), height=height, width=width),
                             store_dtype=store_dtype, restart=restart, progress=progress, log=log, t_start=t_start)

        tmp = formats.temp_path_for(out)
        if restart:
            tmp.unlink(missing_ok=True)
        stored = _stored_batch_size(tmp)
        if stored is not None and stored != bs:
            # resume on the partial file's batch boundaries, so the result does not change
            if log and batch_size is not None:
                log(f"resuming with the partial file's batch size {stored} (not {bs})")
            identity["batch_size"] = bs = stored
        of = _open_partial(tmp, identity)

        resumed_from = 0
        if of is None:
            labels, sources = labels_and_sources(tf, n_total, tokens_path)
            of = create_partial(tmp, dims=source.dims, labels=labels, sources=sources, store_dtype=store_dtype,
                                attrs=dict(identity, model=str(model), tokens_file=str(tokens_path),
                                           class_names=json.dumps(formats.class_names(tf)),
                                           height=height, width=width))
        else:
            resumed_from = int(of.attrs["n_done"])
            if log and resumed_from:
                log(f"resuming {tmp} at row {resumed_from} of {n_total}")

        # --- the loop -------------------------------------------------------------
        try:
            start = int(of.attrs["n_done"])
            bar = _rate_progress(n_total, start, progress, "extract")
            step = (lambda k: bar.advance(bar.task_ids[0], k)) if bar else None
            t_loop = time.perf_counter()
            try:
                extract_rows(source, tok, of, start, n_total, bs, on_batch=step)
            finally:
                if bar:
                    bar.stop()
            loop_s = time.perf_counter() - t_loop
            of.attrs["complete"] = True
            of.flush()
        finally:
            of.close()
        os.replace(tmp, out)
    finally:
        tf.close()

    computed = n_total - resumed_from
    return dict(
        out=str(out), model=str(model), layers=lay, site=site_attr, sos=sos_attr, n=n_total,
        computed=computed, resumed_from=resumed_from, device=str(dev), compute_dtype=dtype_name(cdt),
        batch_size=bs, store_dtype=store_dtype,
        images_per_s=round(computed / loop_s, 3) if loop_s > 0 and computed else None,
        seconds=round(time.perf_counter() - t_start, 3),
    )
