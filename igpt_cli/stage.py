"""The one stage kernel: a resumable, shardable HDF5 output filled batch by batch.

Every heavy command that writes rows (`extract`, `features`, `score`, `sample`, `complete`)
hands `run_stage` two things: what its file holds (`StageFile`: the kind, the row count,
the identity a partial file must match to be resumed, other attrs, how to lay the file out
for rows [start, stop), which datasets the rows fill) and how to compute a batch
(`compute(i, j)` → the rows [i, j) of each of those datasets). The kernel does the rest,
once for all of them:

1. **Lock** the output (`outputs.output_lock`, for the whole run) and **re-check** it under
   the lock: a run that finished meanwhile is not replaced without `overwrite`.
2. **Reopen or create** the partial file `.<out>.tmp`: reopened when its kind and identity
   match (a stored batch size wins, so the batches keep their boundaries), else one
   InputError naming the setting that differs (`restart=True` discards it; a partial file
   with no row done holds nothing and is replaced without asking). A fresh one is laid out
   in full, written without HDF5's chunk cache and with its whole length reserved on disk
   (`outputs.check_free_space`, `outputs.reserve_space`), so a full file system is one line
   before any work, never a crash at close.
3. **The batch loop** on the single-process grid [0, B), [B, 2B), …: one background writer
   (`RowWriter`, a bounded queue) writes batch k while batch k + 1 is computed; after each
   batch the rows are flushed first and `attrs["n_done"]` second, so a killed run leaves a
   file that says how far it got. A `compute` that returns fewer rows than asked (a stream
   that ended) ends the file there.
4. **Shards** when `dist.world_size > 1` (torchrun, srun): rank r of K fills the part file
   `.<out>.part-<r>-of-<K>.tmp` with the whole batches `shard_rows(N, K, r, B)`, resumable
   on its own; ranks agree on the settings (rank 0's hash) and on one batch size; rank 0
   merges the parts by row index. Every batch holds the rows it holds in one process, so
   the file is the one-process file (only `world_size` differs).
5. **Atomic rename** onto the output when complete. Every file records `world_size`.

The module is long (about 520 lines) on purpose: these steps are one protocol — the same
lock, identity check and loop for one process and for every rank — best read in one place.
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from . import formats, outputs
from .distributed import DistContext
from .errors import InputError
from .progress import Reporter

COPY_ROWS = 8192  # rows per block when a merge copies rows …
COPY_BYTES = 64 << 20  # … or fewer, so that a block of wide rows (token maps) stays within this
RESUME_HINT = "; the partial file {path} is kept: free some space and run the same command again to resume"
PARTS_KEPT_HINT = "; the part files are kept: free some space and run the same command again"

Compute = Callable[[int, int], dict[str, np.ndarray]]  # rows [i, j) of each row dataset (fewer: input ended)


@dataclass
class StageFile:
    """What a stage's output holds: the stage's half of the contract with `run_stage`."""

    kind: str  # formats.FEATURES_FORMAT, TOKENS_FORMAT, SCORES_FORMAT
    n_total: int  # rows of the finished file (an upper bound for a stream: it may end earlier)
    identity: dict  # settings a partial file must match to be resumed (batch_size and n_total are added)
    attrs: dict  # further attrs of the file (names, paths); None values are not written
    layout: Callable[[h5py.File, int, int], None]  # lay out the datasets of rows [start, stop) at full size
    row_datasets: tuple[str, ...]  # the datasets `compute` fills (copied by row index at a merge)
    row_bytes: int  # bytes one row takes on disk (for the free-space checks)
    device: object = None  # the compute device (the process group's backend under torchrun)

    def nbytes(self, n: int) -> int:
        return int(n) * int(self.row_bytes) + (1 << 16)


@dataclass
class StageRun:
    """What `run_stage` did (summed over ranks for a sharded run)."""

    n: int  # rows in the finished file
    computed: int  # rows computed by this call
    resumed_from: int  # rows found done in partial files
    loop_seconds: float  # seconds in the batch loop (the slowest rank's)
    batch_size: int  # the batch size used (a partial file's, when resuming)
    world_size: int = 1
    rank: int = 0
    shard: tuple[int, int] | None = None  # this rank's rows [start, stop) (sharded runs)


# ---------------------------------------------------------------------------
# shards and part files
# ---------------------------------------------------------------------------
def shard_rows(n: int, world_size: int, rank: int, batch_size: int) -> tuple[int, int]:
    """Rows [start, stop) of rank `rank`: a contiguous run of whole batches of the grid [kB, (k+1)B).

    The ceil(n / B) batches are split as evenly as possible in rank order (ranks may get
    none when there are fewer batches than ranks: start == stop)."""
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


def merge_path(out: str | Path) -> Path:
    """Where a merged (or cut short) file is assembled before its rename onto `out`."""
    out = Path(out)
    return out.with_name(f".{out.name}.merge.tmp")


def copy_rows(ds) -> int:
    """Rows of dataset `ds` a merge copies at a time: COPY_ROWS, fewer for wide rows (COPY_BYTES)."""
    row = int(np.prod(ds.shape[1:], dtype=np.int64)) * max(1, ds.dtype.itemsize)
    return int(max(1, min(COPY_ROWS, COPY_BYTES // max(1, row))))


def _encode(v):
    """An attr value as stored: lists and dicts as JSON, text made storable (`formats.storable_text`)."""
    return formats.storable_text(json.dumps(v) if isinstance(v, (list, dict, tuple)) else v)


def file_identity(spec: StageFile, batch_size: int, start: int = 0, stop: int | None = None) -> dict:
    """What a partial file of rows [start, stop) must say to be resumed (a part file: its shard too)."""
    stop = spec.n_total if stop is None else stop
    ident = dict(spec.identity, batch_size=int(batch_size), n_total=int(stop - start))
    if (start, stop) != (0, spec.n_total):
        ident.update(shard_start=int(start), shard_stop=int(stop), rows_total=int(spec.n_total))
    return ident


# ---------------------------------------------------------------------------
# partial files
# ---------------------------------------------------------------------------
def close_quietly(f: h5py.File) -> None:
    """Close an HDF5 file after a failure (a second error from closing would hide the first)."""
    with contextlib.suppress(Exception):
        f.close()


def stored_batch_size(path: Path, kind: str) -> int | None:
    """The batch size a partial file of `kind` at `path` was started with (None: none usable)."""
    if not path.exists():
        return None
    try:
        with h5py.File(path, "r") as f:
            if formats.read_attrs(f).get("format") != kind or int(f.attrs.get("n_done", 0)) == 0:
                return None
            return int(f.attrs["batch_size"])
    except Exception:
        return None


def create_partial(path: Path, spec: StageFile, identity: dict, start: int, stop: int,
                   world_size: int) -> h5py.File:
    """A fresh partial file of rows [start, stop) at `path`: laid out in full, no chunk cache, its
    whole length reserved on disk; nothing is left behind if that fails."""
    path.unlink(missing_ok=True)
    try:
        f = h5py.File(path, "w", rdcc_nbytes=0)
    except OSError as e:
        if outputs.is_disk_full(e):
            raise outputs.disk_full(path) from None
        raise
    try:
        spec.layout(f, start, stop)
        f.attrs.update({k: _encode(v) for k, v in spec.attrs.items() if v is not None})
        f.attrs.update({k: _encode(v) for k, v in identity.items() if v is not None})
        f.attrs.update(n_done=0, complete=False, world_size=int(world_size))
        f.flush()
        outputs.reserve_space(path)
    except BaseException as e:
        close_quietly(f)
        path.unlink(missing_ok=True)
        if isinstance(e, Exception) and not isinstance(e, InputError) and outputs.is_disk_full(e):
            raise outputs.disk_full(path) from None
        raise
    return f


def open_partial(path: Path, kind: str, identity: dict) -> h5py.File | None:
    """The partial file at `path` reopened for resumption; None when there is nothing to resume.

    The one identity check: a file of `kind` whose attrs differ from `identity` is in the way
    (InputError naming the difference) unless no row of it is done (then it is replaced)."""
    if not path.exists():
        return None
    try:
        f = h5py.File(path, "r+", rdcc_nbytes=0)
    except OSError:
        return None  # killed before its first flush: nothing to keep
    try:
        attrs = formats.read_attrs(f)
        usable = attrs.get("format") == kind and "n_done" in attrs
        why = formats.identity_mismatch(attrs, identity) if usable else None
        done = int(attrs.get("n_done", 0)) if usable else 0
    except Exception:
        usable, why, done = False, None, 0
    if not usable or (why and done == 0):
        f.close()
        return None
    if why:
        f.close()
        raise InputError(f"{path}: a partial run with different settings is in the way: {why}. "
                         "Run the original command again to resume it, or pass restart=True to discard it")
    try:
        outputs.reserve_space(path, hint=RESUME_HINT.format(path=path))  # rows still to come cannot fail for space
        formats.upgrade_in_place(f, {k: _encode(v) for k, v in identity.items() if v is not None})
    except BaseException:
        close_quietly(f)
        raise
    return f


def _open_or_create(path: Path, spec: StageFile, identity: dict, start: int, stop: int,
                    world_size: int) -> tuple[h5py.File, int]:
    """(the open partial file of rows [start, stop), rows already done in it)."""
    outputs.check_free_space(path, spec.nbytes(stop - start), partial=path)
    f = open_partial(path, spec.kind, identity)
    if f is None:
        return create_partial(path, spec, identity, start, stop, world_size), 0
    return f, int(f.attrs["n_done"])


def _abandon(f: h5py.File, path: Path) -> None:
    """After a failure: close the partial file, and remove it when it holds no row."""
    try:
        empty = int(f.attrs.get("n_done", 0)) == 0
    except Exception:
        empty = False
    close_quietly(f)
    if empty:
        path.unlink(missing_ok=True)


POLL_S = 0.1  # how often the row writer re-checks its queue (see RowWriter._next)


class RowWriter:
    """The batch loop's one background writer: batches of rows are queued (at most `depth` waiting,
    so memory stays bounded) and written in order into the open file `f` by one thread while the
    main thread computes the next batch. Each batch: rows written and flushed first, then
    `attrs["n_done"]` and a second flush, so n_done never runs ahead of the rows. The first
    error of the thread is raised in the main thread by the next `put` or by `close`; batches
    after it are dropped. HDF5 calls of the two threads are serialised by h5py's own lock."""

    def __init__(self, f: h5py.File, offset: int, depth: int = 1):
        self.f, self.offset = f, offset
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name="igpt-row-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._next()) is not None:
            if self.error is not None:
                continue  # drain: the main thread stops at its next put
            i, k, cols = item
            try:
                a = i - self.offset
                for name, block in cols.items():
                    if self.f[name].dtype.kind == "O":  # text (sources): names that are not UTF-8 made storable
                        block = formats.storable_names(block)
                    self.f[name][a:a + k] = block
                self.f.flush()  # data first …
                self.f.attrs["n_done"] = a + k
                self.f.flush()  # … then the counter
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self.error = e

    def _next(self):
        """The next queued item. Polled, not one blocking wait: Ctrl-C or SIGTERM raised in the main
        thread inside `Queue.put` can leave its wake-up of this thread undone, and an unpolled wait
        would then sleep forever while `close` waits for it (seen: a SIGTERM'd extract hanging)."""
        while True:
            try:
                return self._queue.get(timeout=POLL_S)
            except queue.Empty:
                continue

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, i: int, k: int, cols: dict[str, np.ndarray]) -> None:
        """Queue rows [i, i + k) (waits while the queue is full); raises the writer's error, if any."""
        self._raise()
        self._queue.put((i, k, cols))

    def close(self, *, check: bool = True) -> None:
        """Wait until every queued batch is written; `check`: raise the writer's error, if any."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if check:
            self._raise()


def fill(f: h5py.File, compute: Compute, start: int, stop: int, batch_size: int, reporter: Reporter, *,
         offset: int = 0, units_per_row: int = 1, info: str = "") -> float:
    """Compute rows [start, stop) batch by batch into the open file `f` (row r at r - offset), then
    mark it complete. Each batch is written by the `RowWriter` while the next one is computed
    (rows flushed, then `n_done`); `reporter` advances as batches are computed. A batch shorter
    than asked (the input ended) is the last. On any failure the batches already computed are
    still written before the error goes up. Returns seconds."""
    t0 = time.perf_counter()
    try:
        writer = RowWriter(f, offset)
        try:
            for i in range(start, stop, batch_size):
                j = min(i + batch_size, stop)
                before = reporter.done
                cols = compute(i, j)
                k = len(next(iter(cols.values()))) if cols else 0
                writer.put(i, k, cols)
                reporter.advance(k * units_per_row - (reporter.done - before), info=info)
                if k < j - i:
                    break
        except BaseException:
            writer.close(check=False)  # what was computed is kept; the first error goes up
            raise
        writer.close()
        seconds = time.perf_counter() - t0
        f.attrs["complete"] = True
        f.flush()
    except Exception as e:
        if isinstance(e, InputError) or not outputs.is_disk_full(e):
            raise
        raise outputs.disk_full(f.filename, hint=RESUME_HINT.format(path=f.filename)) from None
    return seconds


def assemble(out: Path, spec: StageFile, identity: dict, parts: list[tuple[Path, int, int]], n: int,
             world_size: int, hint: str = "") -> None:
    """Write `out` from complete partial files: `parts` = (path, first row, rows) copied by row index
    into a fresh file of `n` rows (assembled under `merge_path(out)`, renamed when complete)."""
    tmp = merge_path(out)
    tmp.unlink(missing_ok=True)
    outputs.check_free_space(tmp, spec.nbytes(n), hint=hint)
    try:
        f = create_partial(tmp, spec, dict(identity, n_total=int(n)), 0, n, world_size)
        try:
            for path, a, k in parts:
                with h5py.File(path, "r") as p:
                    for name in spec.row_datasets:
                        src = p[name].asstr() if h5py.check_string_dtype(p[name].dtype) else p[name]
                        step = copy_rows(p[name])
                        for i in range(0, k, step):
                            b = min(i + step, k)
                            f[name][a + i:a + b] = src[i:b]
            f.attrs.update(n_done=n, complete=True)
        finally:
            f.close()
        os.replace(tmp, out)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, Exception) and not isinstance(e, InputError) and outputs.is_disk_full(e):
            raise outputs.disk_full(out, hint=hint) from None
        raise


# ---------------------------------------------------------------------------
# the kernel
# ---------------------------------------------------------------------------
def run_stage(out: str | Path, spec: StageFile, compute: Compute, *, batch_size: int, batch_size_given: bool,
              reporter: Reporter, units_per_row: int = 1, overwrite: bool = False, restart: bool = False,
              dist: DistContext | None = None, settings: dict | None = None) -> StageRun:
    """Fill (or resume) `out` with `compute`'s rows and rename it into place (see the module docstring).

    `batch_size` is this process's choice (a stored one wins; under torchrun the ranks agree
    on one); `settings`: further flags every rank must share (png, keep_tokens, …)."""
    out = Path(out)
    if dist is not None and dist.active:
        return _run_sharded(out, spec, compute, batch_size=batch_size, batch_size_given=batch_size_given,
                            reporter=reporter, units_per_row=units_per_row, overwrite=overwrite, restart=restart,
                            dist=dist, settings=settings or {})
    with outputs.output_lock(out):
        outputs.check_output_path(out, overwrite)  # again under the lock: a run that just finished
        tmp = outputs.temp_path_for(out)
        if restart:
            tmp.unlink(missing_ok=True)
        stored = stored_batch_size(tmp, spec.kind)
        bs = min(batch_size, max(1, spec.n_total))
        if stored is not None and stored != bs:  # resume on the partial file's batch boundaries
            if batch_size_given:
                reporter.log(f"resuming with the partial file's batch size {stored} (not {bs})")
            bs = stored
        identity = file_identity(spec, bs)
        f, resumed = _open_or_create(tmp, spec, identity, 0, spec.n_total, 1)
        if resumed:
            reporter.log(f"resuming {tmp} at row {resumed} of {spec.n_total}")
        try:
            reporter.start(total=spec.n_total * units_per_row, done=resumed * units_per_row)
            seconds = fill(f, compute, resumed, spec.n_total, bs, reporter, units_per_row=units_per_row)
            n = int(f.attrs["n_done"])
        except BaseException:
            _abandon(f, tmp)
            raise
        f.close()  # complete and closed before it takes the final name
        if n < spec.n_total:  # the input ended early: a file of the rows it had
            assemble(out, spec, identity, [(tmp, 0, n)], n, 1, hint=RESUME_HINT.format(path=tmp))
            tmp.unlink(missing_ok=True)
        else:
            os.replace(tmp, out)
    return StageRun(n=n, computed=n - resumed, resumed_from=resumed, loop_seconds=seconds, batch_size=bs)


def _agree_batch_size(ctx: DistContext, mine: Path, kind: str, candidate: int, n_total: int,
                      reporter: Reporter) -> int:
    """One batch size for all ranks: the parts' recorded one when resuming, else the smallest candidate."""
    everyone = ctx.gather((stored_batch_size(mine, kind), candidate))
    stored = [s for s, _ in everyone if s is not None]
    if stored:
        bs = Counter(stored).most_common(1)[0][0]
        if bs != candidate:
            reporter.log(f"resuming with the part files' batch size {bs} (not {candidate})")
        return bs
    return max(1, min(min(c for _, c in everyone), n_total))


def _run_sharded(out: Path, spec: StageFile, compute: Compute, *, batch_size: int, batch_size_given: bool,
                 reporter: Reporter, units_per_row: int, overwrite: bool, restart: bool, dist: DistContext,
                 settings: dict) -> StageRun:
    ctx = dist
    ctx.init(spec.device)
    ctx.agree(dict(spec.identity, **settings, kind=spec.kind, n_total=spec.n_total, out=os.path.abspath(out),
                   overwrite=bool(overwrite), restart=bool(restart),
                   batch_size=batch_size if batch_size_given else "auto"))
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
        if restart:
            mine.unlink(missing_ok=True)
        ctx.barrier()  # nobody reads stored batch sizes before every restart has removed its part
        bs = _agree_batch_size(ctx, mine, spec.kind, batch_size, spec.n_total, reporter)
        start, stop = shard_rows(spec.n_total, ctx.world_size, ctx.rank, bs)
        f, error, resumed = None, None, 0
        if stop > start:
            try:
                f, resumed = _open_or_create(mine, spec, file_identity(spec, bs, start, stop), start, stop,
                                             ctx.world_size)
                if resumed:
                    reporter.log(f"rank {ctx.rank}: resuming {mine} at row {start + resumed} "
                                 f"({resumed} of {stop - start} done)")
            except InputError as e:
                error = str(e)
        ctx.check(error)
        seconds, done = 0.0, 0
        if f is not None:
            try:
                reporter.start(total=(stop - start) * units_per_row, done=resumed * units_per_row)
                seconds = fill(f, compute, start + resumed, stop, bs, reporter, offset=start,
                               units_per_row=units_per_row, info=f"rank {ctx.rank} of {ctx.world_size}")
                done = int(f.attrs["n_done"])
            except BaseException:
                _abandon(f, mine)
                raise
            f.close()
        stats = ctx.gather((done - resumed, resumed, seconds))
        ctx.barrier()  # every part is complete and closed
        error, n = None, None
        if ctx.is_main:
            try:
                n = merge_parts(out, spec, bs, ctx.world_size, wait_s=ctx.part_wait_s, lock=False)
            except InputError as e:
                error = str(e)
        ctx.check(error)
        n = ctx.broadcast(n)
    return StageRun(n=int(n), computed=sum(c for c, _, _ in stats), resumed_from=sum(r for _, r, _ in stats),
                    loop_seconds=max(s for _, _, s in stats), batch_size=bs, world_size=ctx.world_size,
                    rank=ctx.rank, shard=(start, stop))


def merge_parts(out: str | Path, spec: StageFile, batch_size: int, world_size: int, *, wait_s: float = 0.0,
                lock: bool = True) -> int:
    """Check the part files of `out` (a `world_size` run) and copy them by row index into `out`.

    Raises InputError naming missing parts (waiting up to `wait_s` for them to appear, e.g.
    on NFS), a part that is incomplete or from other settings, and DiskFullError when the file
    system cannot hold the merged file (parts kept). `lock=False`: the caller holds the
    output lock. Removes the parts (stale ones of other world sizes too). Returns the rows merged."""
    out = Path(out)
    with outputs.output_lock(out) if lock else contextlib.nullcontext():
        shards = [(r, *shard_rows(spec.n_total, world_size, r, batch_size)) for r in range(world_size)]
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
        parts, ended = [], False
        for r, a, b in shards:
            p = paths[r]
            try:
                with h5py.File(p, "r") as f:
                    attrs = formats.read_attrs(f)
            except OSError:
                raise InputError(f"{p}: part file is not a readable HDF5 file") from None
            why = (formats.identity_mismatch(attrs, file_identity(spec, batch_size, a, b))
                   if attrs.get("format") == spec.kind else f"not an {spec.kind} file")
            if why:
                raise InputError(f"{p}: part file disagrees with this run: {why}")
            done = int(attrs.get("n_done", -1))
            if not attrs.get("complete", False) or not 0 <= done <= b - a or (ended and done):
                raise InputError(f"{p}: part file is incomplete ({done} of {b - a} rows done)")
            ended = ended or done < b - a  # the input ended in this part: later parts hold nothing
            parts.append((p, a, done))
        n = sum(k for _, _, k in parts)
        assemble(out, spec, file_identity(spec, batch_size), parts, n, world_size, hint=PARTS_KEPT_HINT)
    for p in all_part_paths(out):  # this run's parts, and stale ones of other world sizes
        p.unlink(missing_ok=True)
    return n
