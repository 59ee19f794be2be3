"""igpt_cli.quantize under faults (issue 10): a full disk (a real 1 MiB tmpfs), SIGTERM and
Ctrl-C while the decode pool runs, and a cut archive — each one line on stderr, exit 2
(143/130 for signals), no traceback, and no output, temp or lock file left behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import ENV, error_lines, run_igpt
from igpt_cli.outputs import DiskFullError
from igpt_cli.quantize import fit_palette_file, quantize_dataset


def _images(tmp_path: Path, n: int = 800) -> Path:
    """n random 32×32 images: 1.6 MB of tokens at size 32, more than the tiny file system holds."""
    path = tmp_path / "images.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
    return path


def _assert_one_line(r, code: int, *needles: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr and r.stdout == "", r.stderr[-3000:]
    lines = error_lines(r.stderr)
    assert len(lines) == 1, r.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, small_fs):
    src = _images(tmp_path)
    out = small_fs / "o.h5"
    # the rows cannot fit: refused up front, before anything is written
    r = run_igpt("quantize", src, "-o", out, timeout=120)
    _assert_one_line(r, 2, "error: no space left on device", str(out), "needed", "free in")
    assert os.listdir(small_fs) == []
    # skip_bad: the size is not known up front, so the first write that does not fit says so
    # (this used to segfault, exit 139, leaving .o.h5.tmp behind)
    r = run_igpt("quantize", src, "-o", out, "--skip-bad", timeout=120)
    _assert_one_line(r, 2, "error: no space left on device", str(out))
    assert os.listdir(small_fs) == []
    with pytest.raises(DiskFullError, match="no space left on device"):
        quantize_dataset(src, out, skip_bad=True)
    assert os.listdir(small_fs) == []
    # a palette on a file system with no room left at all
    filler = small_fs / "filler"
    with open(filler, "wb") as fh, pytest.raises(OSError):
        while True:
            fh.write(b"\0" * 65536)
            fh.flush()
    with pytest.raises(DiskFullError, match="no space left on device"):
        fit_palette_file(src, small_fs / "p.npy", k=4, sample_pixels=1000, limit=10)
    assert sorted(os.listdir(small_fs)) == ["filler"]


def _start_quantize(cifar_tar: Path, cwd: Path) -> subprocess.Popen:
    """`igpt quantize` of all 60,000 real CIFAR-10 JPEGs (so the decode pool runs), in its own
    process group, once its temp file exists."""
    p = subprocess.Popen([sys.executable, "-m", "igpt_cli", "quantize", str(cifar_tar), "--size", "8", "-o", "out.h5"],
                         cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    deadline = time.monotonic() + 120
    while not (cwd / ".out.h5.tmp").exists():
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "no temp file after 120 s"
        time.sleep(0.02)
    time.sleep(0.3)  # the pool is decoding now
    return p


def _finish(p: subprocess.Popen) -> tuple[int, str]:
    """Exit status and stderr; the whole process group (decode workers too) must be gone soon after."""
    try:
        _, err = p.communicate(timeout=60)
        deadline = time.monotonic() + 10
        while True:
            try:
                os.killpg(p.pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, "a decode worker outlived the run"
            time.sleep(0.05)
        return p.returncode, err
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_signals_during_quantize_leave_nothing_and_no_traceback(tmp_path, cifar_tar, how):
    p = _start_quantize(cifar_tar, tmp_path)
    if how == "sigterm":
        p.send_signal(signal.SIGTERM)  # the main process only, as `kill PID` does
    else:
        os.killpg(p.pid, signal.SIGINT)  # the whole foreground group, as Ctrl-C in a terminal does
    code, err = _finish(p)
    assert code == (143 if how == "sigterm" else 130), (code, err[-3000:])
    assert "Traceback" not in err and "ForkPoolWorker" not in err, err[-3000:]
    assert sorted(os.listdir(tmp_path)) == [], os.listdir(tmp_path)


def test_truncated_real_archive_is_refused_before_any_output(tmp_path, cifar_tar):
    cut = tmp_path / "t.tar"
    with open(cifar_tar, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(50_000_000))  # quietly read as 32,405 of 60,000 images before
    r = run_igpt("quantize", cut, "--size", 8, "-o", tmp_path / "o.h5", timeout=120)
    _assert_one_line(r, 2, f"error: {cut}: archive truncated at member 32414")
    assert sorted(os.listdir(tmp_path)) == ["t.tar"]
