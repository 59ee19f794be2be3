"""Writing outputs safely: checks before work starts, an exclusive lock, temp-then-rename.

The rules every stage follows (as git's lock files and rsync's temp files do):
- `check_output_path` runs before any work: the directory exists (a missing one is created,
  as `mkdir -p` would) and is writable, the
  path is not a directory, an existing file is replaced only with `overwrite=True`.
- `output_lock(path)` holds an exclusive `fcntl.flock` on `.<name>.lock` next to the
  output for the whole run (never opened through a symlink, and only a regular file: a
  planted link cannot make igpt write elsewhere), so two runs writing the same output
  cannot interleave: the second one fails at once, naming the holder (pid, host, start
  time, command). The lock
  dies with its process (kill -9 included), so a stale lock file never blocks a rerun;
  the holder removes the lock file when it is done.
- `atomic_output(path)` writes under `.<name>.tmp` and renames onto the path only on
  success (deleting the temp file on any failure); together with the lock, nothing
  incomplete ever appears at the final path.
- Disk space: `check_free_space` refuses a write up front when the file system cannot
  hold it, `reserve_space` allocates a preallocated file's whole length (so writes inside
  it cannot fail for space later), and `is_disk_full` recognises ENOSPC however it
  surfaces (OSError, or h5py's RuntimeError text); `DiskFullError` is the one-line error.
- Readers: `writer_of(path)` names the process writing a file, so a reader can refuse a
  file that another igpt run is still producing.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Iterator

from .errors import InputError


class OutputError(InputError):
    """An output path that cannot be written (missing directory, a directory, exists, locked)."""


class DiskFullError(OutputError):
    """The file system of an output has no room for it (ENOSPC), said in one line."""


LOCK_RETRY_S = 0.25  # a held lock is re-tried this long: a reader's momentary probe (`writer_of`) is no conflict
_held: set[str] = set()  # lock files this process holds (a reader here never refuses its own output)


def temp_path_for(final: str | Path) -> Path:
    final = Path(final)
    return final.with_name(f".{final.name}.tmp")


def lock_path_for(final: str | Path) -> Path:
    final = Path(final)
    return final.with_name(f".{final.name}.lock")


def check_output_path(path: str | Path, overwrite: bool, *, directory: bool = False) -> Path:
    """Validate an output path before any work starts (clear errors, nothing written).

    `directory=True`: the output is a directory (a model), which may exist.
    """
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        make_output_directory(p, parent)
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{p}: output directory {parent} is not writable")
    if directory:
        if p.exists() and not p.is_dir():
            raise OutputError(f"{p}: exists and is not a directory")
        return p
    if p.is_dir():
        raise OutputError(f"{p}: is a directory, not a file name")
    if p.exists() and not overwrite:
        raise OutputError(f"{p}: output file exists (pass overwrite=True to replace it)")
    return p


def make_output_directory(path: Path, parent: Path) -> None:
    """Create the missing directory `parent` of the output `path` (as `mkdir -p`, so `-o runs/big` works
    in a fresh folder); a path under a file, or under a directory this user cannot write, stays a
    one-line error and nothing is created."""
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise OutputError(f"{path}: output directory {parent} cannot be created ({existing} is not a directory)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: output directory {parent} does not exist and cannot be created "
                          f"({existing} is not writable)")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{path}: cannot create output directory {parent} ({e.strerror or e})") from None


def _same_file(a: Path, b: Path) -> bool:
    """`a` and `b` name one file: the same real path (symlinks, `./x` vs `x`), or one inode (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_distinct(outputs: dict[str, str | Path | None], inputs: dict[str, str | Path | None] | None = None) -> None:
    """Refuse (OutputError) any output that is one of the inputs, or another output, before any work.

    `outputs` and `inputs` map parameter names to paths (None: not given). Compared by real path
    and by inode, so a symlink, `./a` vs `a` or a hard link to an input is caught, whether or not
    the output may be overwritten. The one place every command checks this."""
    outs = [(k, Path(v)) for k, v in outputs.items() if v is not None]
    ins = [(k, Path(v)) for k, v in (inputs or {}).items() if v is not None]
    for i, (name, path) in enumerate(outs):
        for in_name, in_path in ins:
            if _same_file(path, in_path):
                raise OutputError(f"{path}: {name} would overwrite the input {in_name} ({in_path}); "
                                  "write it to another file")
        for other, other_path in outs[:i]:
            if _same_file(path, other_path):
                raise OutputError(f"{path}: {name} and {other} name the same file; give them different names")


def _holder(lock: Path) -> str:
    try:
        d = json.loads(lock.read_text() or "{}")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d["started"]))
        return f"pid {d['pid']} on {d['host']}, started {when}: {d['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _flock_nb(fd: int, how: int, retry_s: float) -> bool:
    """flock(fd, how | LOCK_NB), re-tried for `retry_s` seconds; False if still held by another."""
    deadline = time.monotonic() + retry_s
    while True:
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)


def _open_lock_file(final: str | Path, lock: Path) -> int:
    """Open (creating) the lock file `lock` of `final`: never through a symlink (O_NOFOLLOW), and only
    a regular file (a FIFO, device or directory planted there is refused, untouched)."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full(final) from None
        if e.errno == errno.ELOOP or os.path.islink(lock):
            raise OutputError(f"{final}: the lock file {lock} is a symbolic link; igpt never writes through "
                              "one: remove it and run again") from None
        raise OutputError(f"{final}: cannot create the lock file {lock} ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputError(f"{final}: the lock file {lock} is not a regular file; remove it and run again")
    return fd


@contextlib.contextmanager
def output_lock(final: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on the output `final` for the duration of the block.

    Raises OutputError at once (after LOCK_RETRY_S) if another process holds it, naming
    the holder. Safe against the unlink race: after locking, the lock file must still be
    the one at the path (else retry with the new one).
    """
    lock = lock_path_for(final)
    while True:
        fd = _open_lock_file(final, lock)
        if not _flock_nb(fd, fcntl.LOCK_EX, LOCK_RETRY_S):
            os.close(fd)
            raise OutputError(f"{final}: another igpt run is writing this output ({_holder(lock)}); "
                              "wait for it to finish, or stop it") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed it between our open and flock: take the new one
    key = str(lock.resolve())
    _held.add(key)
    try:
        info = dict(pid=os.getpid(), host=socket.gethostname(), started=time.time(),
                    command=" ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv)))
        with contextlib.suppress(OSError):  # a full disk: the lock holds, only the holder's name is lost
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        yield lock
    finally:
        _held.discard(key)
        with contextlib.suppress(OSError):
            os.unlink(lock)  # still holding it: a waiter that opened it re-checks the inode
        os.close(fd)


def writer_of(path: str | Path) -> str | None:
    """Who holds the output lock of `path` (another igpt run writing it), or None.

    A momentary shared lock on the lock file, never created here; a writer starting at
    that instant re-tries (LOCK_RETRY_S), so the probe never makes it fail.
    """
    lock = lock_path_for(path)
    try:
        if str(lock.resolve()) in _held:
            return None
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None  # no lock file (or a planted symlink): nobody writes it
    try:
        if _flock_nb(fd, fcntl.LOCK_SH, 0.0):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        return _holder(lock)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# Disk space
# ---------------------------------------------------------------------------
def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _directory(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def free_bytes(path: str | Path) -> int:
    """Bytes an unprivileged writer may still use on the file system of `path`'s directory."""
    st = os.statvfs(_directory(Path(path)))
    return int(st.f_bavail * st.f_frsize)


def allocated_bytes(path: str | Path) -> int:
    """Bytes the file at `path` already occupies on disk (0 if there is none)."""
    try:
        return int(os.stat(path).st_blocks * 512)
    except OSError:
        return 0


def is_disk_full(e: BaseException) -> bool:
    """Whether an exception means ENOSPC (an OSError, or h5py's RuntimeError quoting `errno = 28`)."""
    if getattr(e, "errno", None) == errno.ENOSPC:
        return True
    text = str(e)
    return f"errno = {errno.ENOSPC}," in text or os.strerror(errno.ENOSPC) in text


def disk_full(path: str | Path, need: int | None = None, hint: str = "") -> DiskFullError:
    """The one-line error for a full file system under `path` (`need`: bytes it wanted)."""
    path = Path(path)
    try:
        free = _fmt_bytes(free_bytes(path))
    except OSError:
        free = "?"
    want = f"{_fmt_bytes(need)} needed, " if need is not None else ""
    return DiskFullError(f"no space left on device ({path}: {want}{free} free in {_directory(path)}){hint}")


def check_free_space(path: str | Path, nbytes: int, *, partial: str | Path | None = None, hint: str = "") -> None:
    """Refuse up front (DiskFullError) when `path`'s file system cannot hold `nbytes` more bytes,
    counting what the partial file `partial` (resumed into) already occupies."""
    need = int(nbytes) - (allocated_bytes(partial) if partial is not None else 0)
    try:
        free = free_bytes(path)
    except OSError:
        return  # cannot tell: the write itself reports ENOSPC
    if need > free:
        raise disk_full(path, need, hint)


def reserve_space(path: str | Path, hint: str = "") -> None:
    """Allocate the whole length of the (preallocated, sparse) file at `path` on disk, so that
    writes inside it cannot fail for space later. File systems that cannot (no fallocate)
    are left as they are: their writes report ENOSPC when it happens."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:  # pragma: no cover - not on Linux
        return
    fd = os.open(path, os.O_WRONLY)
    try:
        size = os.fstat(fd).st_size
        if size:
            fallocate(fd, 0, size)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full(path, size - allocated_bytes(path), hint) from None
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(final: str | Path, *, lock: bool = True) -> Iterator[Path]:
    """Yield a temp path; rename it onto `final` on success, delete it on any failure.

    With `lock` (the default) the output is locked for the whole block (`output_lock`).
    A full file system while writing becomes a `DiskFullError` (the temp file removed).
    """
    final = Path(final)
    tmp = temp_path_for(final)
    with output_lock(final) if lock else contextlib.nullcontext():
        tmp.unlink(missing_ok=True)
        try:
            yield tmp
            os.replace(tmp, final)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if not isinstance(e, InputError) and isinstance(e, Exception) and is_disk_full(e):
                raise disk_full(final) from None
            raise


# ---------------------------------------------------------------------------
# HDF5 outputs written whole (quantize, saved probes, predictions)
# ---------------------------------------------------------------------------
def _close_discarding(f) -> None:
    """Close an HDF5 file whose contents are being thrown away, without writing to it again.

    HDF5 flushes its caches on close; after a write failed for lack of space that flush
    fails again, and writing on after failed writes can crash HDF5 (a segfault). So the
    file's descriptor is first pointed at an anonymous in-memory file (or /dev/null):
    the flush lands there and the file on disk is left as it is, for its caller to delete.
    """
    try:
        fd = f.id.get_vfd_handle()
        sink = os.memfd_create("igpt-discard") if hasattr(os, "memfd_create") else os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(sink, fd)
        finally:
            os.close(sink)
    except (OSError, RuntimeError, ValueError):
        pass  # not a plain file descriptor: close as it is
    with contextlib.suppress(Exception):
        f.close()


@contextlib.contextmanager
def hdf5_output(tmp: str | Path, out: str | Path) -> Iterator:
    """A new HDF5 file at `tmp` (the temp file of `out`); on any failure it is closed without
    another write (`_close_discarding`), and a full disk is said as one DiskFullError
    naming `out`. The body should `flush()` after each block of rows, so that a full disk
    shows at the first write that does not fit."""
    import h5py

    try:
        f = h5py.File(tmp, "w")
    except OSError as e:
        if is_disk_full(e):
            raise disk_full(out) from None
        raise
    try:
        yield f
        f.flush()
        f.close()
    except BaseException as e:
        _close_discarding(f)
        if isinstance(e, Exception) and is_disk_full(e):
            raise disk_full(out) from None
        raise
