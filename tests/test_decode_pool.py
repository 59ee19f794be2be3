"""igpt_cli.data.decode_pool: the image-decoding processes — sized by the cores, started without
fork, and ended at once by an interrupt at any moment (no hang, no worker left behind)."""
from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import ENV
from igpt_cli.data import decode_pool, encoded, open_dataset


def test_pool_size_scales_with_the_cores_and_shares_them_among_local_ranks(monkeypatch):
    assert decode_pool.pool_size(2) == 2 and decode_pool.pool_size(16) == 15 and decode_pool.pool_size(64) == 32
    monkeypatch.setattr(decode_pool.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert decode_pool.available_cores() == 4 and decode_pool.pool_size() == 3


def test_workers_are_fresh_interpreters_not_forks_and_give_results_in_order():
    with decode_pool.DecodePool(3) as pool:
        pids = [p.pid for p in pool.procs]
        got = list(pool.map_ordered(pow, [(i, 2) for i in range(20)]))
        # a fresh interpreter (exec'd, not a fork of this process)
        for pid in pids:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert b"serve()" in f.read()
    assert got == [((i, 2), i * i) for i in range(20)]
    assert all(not _alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


class Interrupt(Exception):
    pass


def test_an_interrupt_at_any_moment_ends_the_iteration_and_the_workers(cifar_tar, monkeypatch):
    # every dataset gets the pool here; the consumer takes a little time per batch, as quantize does
    monkeypatch.setattr(encoded, "POOL_MIN_IMAGES", 1)
    pools = []

    class Spy(decode_pool.DecodePool):
        def __init__(self, workers):
            super().__init__(workers)
            pools.append(list(self.procs))

    monkeypatch.setattr(encoded, "DecodePool", Spy)

    def raise_interrupt(signum, frame):
        raise Interrupt()

    old = signal.signal(signal.SIGALRM, raise_interrupt)
    rng = random.Random(0)
    landed = 0
    try:
        for _ in range(10):
            pools.clear()
            fired = None
            try:
                signal.setitimer(signal.ITIMER_REAL, rng.uniform(0.05, 0.6))
                for _ in open_dataset(cifar_tar, split="test", limit=3000).batches(16):
                    time.sleep(0.005)  # 188 batches: at least 0.94 s, past the latest interrupt (0.6 s) on any machine
                signal.setitimer(signal.ITIMER_REAL, 0)
            except Interrupt:
                fired = True
                landed += 1
            signal.setitimer(signal.ITIMER_REAL, 0)
            assert fired, "the iteration ended before the interrupt: make the dataset larger"
            # every worker this run started has been killed and reaped
            assert all(p.returncode is not None for procs in pools for p in procs)
            assert not any(_alive(p.pid) for procs in pools for p in procs)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert landed == 10


@pytest.mark.parametrize("command", ["quantize", "features"])
def test_ctrl_c_during_decoding_exits_130_with_one_line_and_no_stray_files(cifar_tar, tmp_path, command):
    # 5000 images (500 per class): past encoded.POOL_MIN_IMAGES, so the decode pool runs
    rng = random.Random(1)
    extra = ["--size", "8"] if command == "quantize" else ["-m", "igpt-cifar8", "-l", "1"]
    for i in range(2):
        out = tmp_path / f"o{i}.h5"
        proc = subprocess.Popen([sys.executable, "-m", "igpt_cli", command, str(cifar_tar), "--split", "test",
                                 "--limit-per-class", "500", *extra, "-o", str(out)], env=ENV, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        tmp = tmp_path / f".o{i}.h5.tmp"
        deadline = time.monotonic() + 60
        while not tmp.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGINT)
        try:
            _, stderr = proc.communicate(timeout=20)  # a hang guard, not a speed measurement
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"{command} did not end after Ctrl-C")
        assert proc.returncode == 130, stderr
        (line,) = stderr.strip().splitlines()
        assert line.startswith("interrupted") and line.endswith(
            "rerun the same command to resume (finished work is kept)" if command == "features" else "nothing was written")
        kept = [f".o{i}.h5.tmp"] if command == "features" and (tmp_path / f".o{i}.h5.tmp").exists() else []
        assert sorted(p.name for p in tmp_path.iterdir()) == kept  # features keeps its resumable partial
        for p in kept:
            (tmp_path / p).unlink()


def test_a_worker_that_dies_is_one_error_not_a_hang():
    with decode_pool.DecodePool(2) as pool:
        pool.procs[1].kill()
        with pytest.raises(decode_pool.DataError, match="ended unexpectedly"):
            list(pool.map_ordered(np.add, [(i, 1) for i in range(6)]))
