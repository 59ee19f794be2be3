"""Writing outputs safely: checks before work starts, an exclusive lock, temp-then-rename.

The rules every stage follows (as git's lock files and rsync's temp files do):
- `check_output_path` runs before any work: the directory exists and is writable, the
  path is not a directory, an existing file is replaced only with `overwrite=True`.
- `output_lock(path)` holds an exclusive `fcntl.flock` on `.<name>.lock` next to the
  output for the whole run, so two runs writing the same output cannot interleave: the
  second one fails at once, naming the holder (pid, host, start time, command). The lock
  dies with its process (kill -9 included), so a stale lock file never blocks a rerun;
  the holder removes the lock file when it is done.
- `atomic_output(path)` writes under `.<name>.tmp` and renames onto the path only on
  success (deleting the temp file on any failure); together with the lock, nothing
  incomplete ever appears at the final path.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from .errors import InputError


class OutputError(InputError):
    """An output path that cannot be written (missing directory, a directory, exists, locked)."""


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
        raise OutputError(f"{p}: output directory {parent} does not exist")
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


def _holder(lock: Path) -> str:
    try:
        d = json.loads(lock.read_text() or "{}")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d["started"]))
        return f"pid {d['pid']} on {d['host']}, started {when}: {d['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def output_lock(final: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on the output `final` for the duration of the block.

    Raises OutputError at once if another process holds it. Safe against the unlink race:
    after locking, the lock file must still be the one at the path (else retry).
    """
    lock = lock_path_for(final)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
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
    try:
        info = dict(pid=os.getpid(), host=socket.gethostname(), started=time.time(),
                    command=" ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv)))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield lock
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)  # still holding it: a waiter that opened it re-checks the inode
        os.close(fd)


@contextlib.contextmanager
def atomic_output(final: str | Path, *, lock: bool = True) -> Iterator[Path]:
    """Yield a temp path; rename it onto `final` on success, delete it on any failure.

    With `lock` (the default) the output is locked for the whole block (`output_lock`).
    """
    final = Path(final)
    tmp = temp_path_for(final)
    with output_lock(final) if lock else contextlib.nullcontext():
        tmp.unlink(missing_ok=True)
        try:
            yield tmp
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
