"""`igpt extract` on many processes: torchrun / Slurm sharding, part files, merge.

Launch the ordinary command under `torchrun` (or any launcher that sets `RANK`,
`WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`); nothing else changes:

    torchrun --nproc-per-node=4 -m igpt_cli extract TOKENS.h5 --model DIR -o FEATS.h5

How it works:
- Sharding is by whole batches of the single-process batch grid [0, B), [B, 2B), …:
  rank r of K takes the contiguous run of batches `shard_rows(N, K, r, B)`. Every batch
  therefore holds exactly the rows it holds in a one-process run, so with the same
  batch size (agreed by all ranks, recorded in the file) the features are the same
  bytes as a one-process run on the same hardware kind and thread count.
- Each rank writes its rows into its own part file next to the output,
  `.<out>.part-<rank>-of-<K>.tmp` (5 digits each), a features file of the shard's rows
  with the same identity attrs plus `shard_start`, `shard_stop`, `rows_total`. It is
  filled and resumed by the same code as the one-process partial file (`rows.py`).
- When every rank is done (a gloo barrier), rank 0 checks that every part is there,
  complete and from the same run, copies them by row index into the output through the
  same temp-then-rename path as a one-process run (same attrs), and removes the parts.
- Locks: every rank holds the output lock of its own part file, and rank 0 that of the
  output, for the whole run (`outputs.output_lock`), so two jobs (or a job and a
  one-process run) on the same output never share parts: the second fails at once.
- Ranks use `cuda:LOCAL_RANK` when CUDA is used (NCCL process group), else the CPU
  (gloo). Control messages always go through a gloo group with a long timeout, so a
  rank that finishes early can wait for slower ones.

This module is long (about 420 lines) because the process context, the shard grid, the
part files, their merge and one rank's run are one protocol, best read in one place.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from .. import formats, outputs
from ..distributed import DistContext, PeerError  # noqa: F401 - re-exported
from ..errors import InputError
from ..progress import OnProgress, Reporter
from .rows import (RowsRun, close_quietly, create_partial, features_bytes, fill_rows, labels_and_sources,
                   open_partial, stored_batch_size)

COPY_ROWS = 8192  # rows per block when merging parts


# ---------------------------------------------------------------------------
# Shards and part files
# ---------------------------------------------------------------------------
def shard_rows(n: int, world_size: int, rank: int, batch_size: int) -> tuple[int, int]:
    """Rows [start, stop) of rank `rank`: a contiguous run of whole batches of the grid [kB, (k+1)B).

    The ceil(n / B) batches are split as evenly as possible in rank order (ranks may get
    none when there are fewer batches than ranks: start == stop).
    """
    if n < 0 or world_size < 1 or not 0 <= rank < world_size or batch_size < 1:
        raise ValueError(f"shard_rows({n}, {world_size}, {rank}, {batch_size})")
    nb = -(-n // batch_size)
    b0, b1 = rank * nb // world_size, (rank + 1) * nb // world_size
    return min(b0 * batch_size, n), min(b1 * batch_size, n)


def part_path(out: str | Path, rank: int, world_size: int) -> Path:
    out = Path(out)
    return out.with_name(f".{out.name}.part-{rank:05d}-of-{world_size:05d}.tmp")


def all_part_paths(out: str | Path) -> list[Path]:
    """Part files of any world size lying next to `out` (stale ones included)."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    return sorted(parent.glob(f".{out.name}.part-*-of-*.tmp"))


def part_identity(identity: dict, start: int, stop: int) -> dict:
    """What a part file's attrs must say: the run's identity with the shard's row count."""
    return dict(identity, n_total=stop - start)


def part_mismatch(f: h5py.File, identity: dict, start: int, stop: int) -> str | None:
    why = formats.features_mismatch(f, part_identity(identity, start, stop))
    if why:
        return why
    have = formats.read_attrs(f)
    want = dict(shard_start=start, shard_stop=stop, rows_total=identity["n_total"])
    for k, v in want.items():
        if have.get(k) != v:
            return f"{k} differs (part file: {have.get(k)}, this run: {v})"
    return None


def merge_parts(out: str | Path, identity: dict, file_attrs: dict, labels: np.ndarray, sources: np.ndarray,
                dims: dict[int, int], store_dtype: str, world_size: int, *, wait_s: float = 0.0,
                remove_parts: bool = True, lock: bool = True) -> list[Path]:
    """Check the K part files of `out` and copy them by row index into `out` (atomic rename).

    Raises InputError naming missing parts (waiting up to `wait_s` for them to appear,
    e.g. on NFS) or a part that is incomplete or from different settings, and
    DiskFullError when the file system cannot hold the merged file (parts kept).
    `lock=False`: the caller already holds the output lock of `out`.
    Returns the part files that were merged.
    """
    out = Path(out)
    with outputs.output_lock(out) if lock else contextlib.nullcontext():
        return _merge_parts(out, identity, file_attrs, labels, sources, dims, store_dtype, world_size, wait_s,
                            remove_parts)


def _merge_parts(out: Path, identity: dict, file_attrs: dict, labels: np.ndarray, sources: np.ndarray,
                 dims: dict[int, int], store_dtype: str, world_size: int, wait_s: float,
                 remove_parts: bool) -> list[Path]:
    n = int(identity["n_total"])
    bs = int(identity["batch_size"])
    shards = [(r, *shard_rows(n, world_size, r, bs)) for r in range(world_size)]
    shards = [(r, a, b) for r, a, b in shards if b > a]
    paths = {r: part_path(out, r, world_size) for r, _, _ in shards}
    deadline = time.monotonic() + wait_s
    while True:
        missing = [p for p in paths.values() if not p.exists()]
        if not missing or time.monotonic() >= deadline:
            break
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    if missing:
        raise InputError(f"{len(missing)} of {len(paths)} part file(s) missing at merge time: "
                         f"{', '.join(str(p) for p in missing)} — is the output directory "
                         f"{out.parent.resolve()} shared by all nodes?")
    parts: dict[int, h5py.File] = {}
    try:
        for r, a, b in shards:
            p = paths[r]
            try:
                f = h5py.File(p, "r")
            except OSError:
                raise InputError(f"{p}: part file is not a readable HDF5 file") from None
            parts[r] = f
            why = part_mismatch(f, identity, a, b)
            if why:
                raise InputError(f"{p}: part file disagrees with this run: {why}")
            done = int(f.attrs.get("n_done", -1))
            if done != b - a or not bool(f.attrs.get("complete", False)):
                raise InputError(f"{p}: part file is incomplete ({done} of {b - a} rows done)")
        tmp = outputs.temp_path_for(out)
        tmp.unlink(missing_ok=True)
        outputs.check_free_space(out, features_bytes(n, dims, store_dtype),
                                 hint="; the part files are kept: free some space and run the same command again")
        try:
            with h5py.File(tmp, "w") as of:
                formats.create_features_file(of, dims=dims, labels=labels, sources=sources,
                                             store_dtype=store_dtype, attrs=file_attrs)
                for r, a, b in shards:
                    src = parts[r]["features"]
                    for layer, ds in of["features"].items():
                        for i in range(a, b, COPY_ROWS):
                            j = min(i + COPY_ROWS, b)
                            ds[i:j] = src[layer][i - a:j - a]
                of.attrs["n_done"] = n
                of.attrs["complete"] = True
            os.replace(tmp, out)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, Exception) and not isinstance(e, InputError) and outputs.is_disk_full(e):
                raise outputs.disk_full(out, hint="; the part files are kept: free some space and run the same "
                                                  "command again") from None
            raise
    finally:
        for f in parts.values():
            f.close()
    merged = list(paths.values())
    if remove_parts:
        for p in all_part_paths(out):  # this run's parts, and stale ones of other world sizes
            p.unlink(missing_ok=True)
    return merged


# ---------------------------------------------------------------------------
# One rank's share of `extract_features`
# ---------------------------------------------------------------------------
def agree_batch_size(ctx: DistContext, out: Path, candidate: int, n_total: int, reporter: Reporter) -> int:
    """One batch size for all ranks: the parts' recorded one when resuming, else the smallest candidate."""
    mine = stored_batch_size(part_path(out, ctx.rank, ctx.world_size))
    everyone = ctx.gather((mine, candidate))
    stored = [s for s, _ in everyone if s is not None]
    if stored:
        bs = Counter(stored).most_common(1)[0][0]
        if bs != candidate:
            reporter.log(f"resuming with the part files' batch size {bs} (not {candidate})")
        return bs
    return min(min(c for _, c in everyone), n_total)


def run_shard(ctx: DistContext, source, tf: h5py.File, tok: h5py.Dataset, tokens_path: Path, out: Path,
              identity: dict, extra_attrs: dict, *, store_dtype: str, restart: bool, overwrite: bool = False,
              on_progress: OnProgress | None = None) -> RowsRun:
    """Extract this rank's shard into its part file; rank 0 then merges all parts into `out`.

    Every rank holds its part file's lock, rank 0 also the output's, until the merge is
    done. Every rank reports its own shard's progress to `on_progress` (the CLI passes
    None on ranks other than 0). Returns the run summed over ranks, with this rank's shard.
    """
    ctx.init(source.device)
    mine = part_path(out, ctx.rank, ctx.world_size)
    with contextlib.ExitStack() as locks:
        error = None
        try:
            locks.enter_context(outputs.output_lock(mine))
            if ctx.is_main:
                locks.enter_context(outputs.output_lock(out))
                outputs.check_output_path(out, overwrite)  # again under the lock: a run that just finished
        except InputError as e:
            error = str(e)
        ctx.check(error)  # any rank's lock is taken: every rank stops before touching a part
        return _run_locked_shard(ctx, source, tf, tok, tokens_path, out, identity, extra_attrs,
                                 store_dtype=store_dtype, restart=restart, on_progress=on_progress)


def _run_locked_shard(ctx: DistContext, source, tf: h5py.File, tok: h5py.Dataset, tokens_path: Path, out: Path,
                      identity: dict, extra_attrs: dict, *, store_dtype: str, restart: bool,
                      on_progress: OnProgress | None) -> RowsRun:
    n_total = int(identity["n_total"])
    reporter = Reporter(on_progress, "extract", unit="image")
    mine = part_path(out, ctx.rank, ctx.world_size)
    if restart:
        mine.unlink(missing_ok=True)
    ctx.barrier()  # nobody reads stored batch sizes before every restart has removed its part
    bs = agree_batch_size(ctx, out, int(identity["batch_size"]), n_total, reporter)
    identity = dict(identity, batch_size=bs)
    start, stop = shard_rows(n_total, ctx.world_size, ctx.rank, bs)
    labels, sources = labels_and_sources(tf, n_total, tokens_path)
    file_attrs = dict(identity, **extra_attrs)

    of, error, resumed = None, None, 0
    if stop > start:
        try:
            outputs.check_free_space(mine, features_bytes(stop - start, source.dims, store_dtype), partial=mine)
            of = open_partial(mine, lambda f: part_mismatch(f, identity, start, stop))
            if of is None:
                of = create_partial(mine, dims=source.dims, labels=labels[start:stop], sources=sources[start:stop],
                                    store_dtype=store_dtype, device=str(source.device),
                                    attrs=dict(file_attrs, shard_start=start, shard_stop=stop, rows_total=n_total,
                                               rank=ctx.rank, world_size=ctx.world_size))
            else:
                resumed = int(of.attrs["n_done"])
                if resumed:
                    reporter.log(f"rank {ctx.rank}: resuming {mine} at row {start + resumed} "
                                 f"({resumed} of {stop - start} done)")
        except InputError as e:
            error = str(e)
    ctx.check(error)

    loop_s = 0.0
    if of is not None:
        try:
            info = f"rank {ctx.rank} of {ctx.world_size}"
            reporter.start(total=stop - start, done=resumed)
            loop_s = fill_rows(source, tok, of, start + resumed, stop, bs, reporter, out_offset=start, info=info)
        except BaseException:
            close_quietly(of)
            raise
        of.close()
    stats = ctx.gather(((stop - start) - resumed, resumed, loop_s))
    ctx.barrier()  # every part is complete and closed

    error = None
    if ctx.is_main:
        try:
            merge_parts(out, identity, file_attrs, labels, sources, source.dims, store_dtype, ctx.world_size,
                        wait_s=ctx.part_wait_s, lock=False)  # run_shard holds the output lock
        except InputError as e:
            error = str(e)
    ctx.check(error)
    return RowsRun(computed=sum(c for c, _, _ in stats), resumed_from=sum(r for _, r, _ in stats),
                   loop_seconds=max(s for _, _, s in stats), batch_size=bs, shard=(start, stop))
