"""igpt_cli.outputs: output checks, the exclusive output lock, temp-then-rename, disk space."""
from __future__ import annotations

import errno
import fcntl
import os
import signal

import pytest

from helpers import hold_output_lock, small_tmpfs
from igpt_cli import outputs
from igpt_cli.outputs import (DiskFullError, OutputError, atomic_output, check_free_space, check_output_path,
                              is_disk_full, lock_path_for, output_lock, reserve_space, writer_of)


# ---------------------------------------------------------------------------
# check_output_path
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_directory_is_never_an_output_file(tmp_path, overwrite):
    (tmp_path / "d.h5").mkdir()
    with pytest.raises(OutputError, match="is a directory"):
        check_output_path(tmp_path / "d.h5", overwrite)
    assert (tmp_path / "d.h5").is_dir()


def test_existing_file_needs_overwrite_and_a_missing_directory_is_created(tmp_path):
    (tmp_path / "f.h5").write_bytes(b"x")
    with pytest.raises(OutputError, match="overwrite=True"):
        check_output_path(tmp_path / "f.h5", False)
    assert check_output_path(tmp_path / "f.h5", True) == tmp_path / "f.h5"
    assert check_output_path(tmp_path / "nope" / "f.h5", True).parent.is_dir()  # as mkdir -p


# ---------------------------------------------------------------------------
# output_lock
# ---------------------------------------------------------------------------
def test_held_lock_names_the_holder_and_is_removed_after(tmp_path):
    out = tmp_path / "f.h5"
    holder = hold_output_lock(out)
    try:
        with pytest.raises(OutputError, match=f"another igpt run is writing this output \\(pid {holder.pid} on "):
            with output_lock(out):
                pass
        assert writer_of(out) is not None and f"pid {holder.pid}" in writer_of(out)
    finally:
        holder.stdin.close()
        assert holder.wait(30) == 0
    assert not lock_path_for(out).exists()  # the holder removed its lock file
    assert writer_of(out) is None
    with output_lock(out) as lock:  # free again
        assert lock.exists() and writer_of(out) is None  # our own lock: no writer for a reader here
    assert not lock.exists()


def test_kill_9_holder_does_not_block_the_next_run(tmp_path):
    out = tmp_path / "f.h5"
    holder = hold_output_lock(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait(30)
    assert lock_path_for(out).exists()  # stale file left by the killed holder …
    assert writer_of(out) is None
    with output_lock(out):  # … but the lock died with it
        pass
    assert not lock_path_for(out).exists()


def test_lock_file_unlinked_between_open_and_flock_is_retried(tmp_path, monkeypatch):
    """The unlink race: a holder finishing (unlink, release) after we opened its lock file but
    before our flock: we must not lock the orphaned inode, but the new file at the path."""
    out = tmp_path / "f.h5"
    real_flock, calls = fcntl.flock, []

    def racing_flock(fd, op):
        calls.append(fd)
        if len(calls) == 1:
            os.unlink(lock_path_for(out))  # the previous holder is done: its file goes away
        return real_flock(fd, op)

    monkeypatch.setattr(outputs.fcntl, "flock", racing_flock)
    with output_lock(out) as lock:
        assert len(calls) == 2  # re-opened and locked the new file
        assert os.stat(lock).st_ino == os.fstat(calls[1]).st_ino
    assert not lock.exists()


def test_probe_released_within_the_retry_window_is_no_conflict(tmp_path, monkeypatch):
    out = tmp_path / "f.h5"
    lock_path_for(out).write_text("")
    fd = os.open(lock_path_for(out), os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    real_sleep, released = outputs.time.sleep, []

    def sleep_then_release(s):  # the reader lets go while the writer re-tries
        if not released:
            os.close(fd)
            released.append(True)
        real_sleep(s)

    monkeypatch.setattr(outputs.time, "sleep", sleep_then_release)
    with output_lock(out):
        assert released
    assert not lock_path_for(out).exists()


# ---------------------------------------------------------------------------
# atomic_output
# ---------------------------------------------------------------------------
def test_atomic_output_renames_only_on_success(tmp_path):
    out = tmp_path / "f.txt"
    with pytest.raises(RuntimeError):
        with atomic_output(out) as tmp:
            tmp.write_text("half")
            assert lock_path_for(out).exists()
            raise RuntimeError("crash")
    assert not out.exists() and not outputs.temp_path_for(out).exists() and not lock_path_for(out).exists()
    with atomic_output(out) as tmp:
        tmp.write_text("whole")
    assert out.read_text() == "whole" and not lock_path_for(out).exists()


@pytest.mark.parametrize("planted", ["symlink", "dangling-symlink", "fifo", "directory"])
def test_a_lock_path_that_is_not_a_regular_file_is_refused_untouched(tmp_path, planted):
    """A co-user's link at `.o.h5.lock` never makes igpt write (or truncate) the file it points to."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    lock = lock_path_for(tmp_path / "o.h5")
    if planted == "symlink":
        lock.symlink_to(victim)
    elif planted == "dangling-symlink":
        lock.symlink_to(tmp_path / "would-be-created")
    elif planted == "fifo":
        os.mkfifo(lock)
    else:
        lock.mkdir()
    why = "symbolic link" if "symlink" in planted else ("not a regular file" if planted == "fifo" else "lock file")
    with pytest.raises(OutputError, match=why) as e:
        with output_lock(tmp_path / "o.h5"):
            pass
    assert str(lock) in str(e.value) and "\n" not in str(e.value)
    assert victim.read_text() == "precious" and not (tmp_path / "would-be-created").exists()
    assert os.path.lexists(lock)  # what was planted is left for its owner to see
    assert writer_of(tmp_path / "o.h5") is None  # a reader does not follow it either


# ---------------------------------------------------------------------------
# disk space (a real 1 MiB tmpfs)
# ---------------------------------------------------------------------------
def test_is_disk_full_reads_oserror_and_h5py_messages():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(RuntimeError("Unable to synchronously flush file (file write failed: ..., errno = 28, "
                                     "error message = 'No space left on device', ...)"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(RuntimeError("errno = 280, something else"))


def test_disk_full_on_a_small_tmpfs(tmp_path):
    with small_tmpfs(tmp_path / "mnt", "1m") as mnt:
        out = mnt / "big.bin"
        with pytest.raises(DiskFullError, match=r"^no space left on device \(.*big.bin: 2.0 MiB needed, "):
            check_free_space(out, 2 << 20)
        check_free_space(out, 100_000)
        # a sparse file reserved on disk: refused when it does not fit, and the refusal frees what it took
        with open(out, "wb") as fh:
            fh.truncate(3 << 20)
        with pytest.raises(DiskFullError, match="no space left on device"):
            reserve_space(out)
        out.unlink()
        with open(out, "wb") as fh:
            fh.truncate(300_000)
        reserve_space(out)
        assert os.stat(out).st_blocks * 512 >= 300_000
        check_free_space(out, 300_000, partial=out)  # a partial file's own blocks count as had
        out.unlink()
        # atomic_output: a write that fills the disk is one DiskFullError, and the temp file goes
        final = mnt / "x.bin"
        with pytest.raises(DiskFullError, match=r"no space left on device \(.*x.bin"):
            with atomic_output(final) as tmp:
                with open(tmp, "wb") as fh:
                    fh.write(b"\0" * (2 << 20))
                    fh.flush()
        assert not final.exists() and not outputs.temp_path_for(final).exists()
        assert not lock_path_for(final).exists()


def test_check_distinct_catches_an_input_by_any_name(tmp_path, monkeypatch):
    (tmp_path / "a.h5").write_text("x")
    (tmp_path / "l.h5").symlink_to(tmp_path / "a.h5")
    os.link(tmp_path / "a.h5", tmp_path / "h.h5")
    monkeypatch.chdir(tmp_path)
    for name in ("a.h5", "./a.h5", "l.h5", "h.h5", str(tmp_path / "a.h5")):
        with pytest.raises(outputs.OutputError, match="would overwrite the input features"):
            outputs.check_distinct({"out": name}, {"features": "a.h5"})
    with pytest.raises(outputs.OutputError, match="name the same file"):
        outputs.check_distinct({"out": "b.h5", "csv": "./b.h5"}, {"features": "a.h5"})
    outputs.check_distinct({"out": "b.h5", "csv": "c.csv", "plot": None}, {"features": "a.h5", "test": None})
