"""A pool of image-decoding processes that any interrupt ends at once.

`DecodePool(workers)` starts `workers` fresh interpreters (`python -c
'…decode_pool import serve; serve()'`: never a fork, so it is safe after CUDA was initialised, and
needs no main guard in the caller's script). Each reads pickled jobs `(fn, args)` from its
stdin and writes the pickled result (or the exception) to its stdout, one job at a time.
`map_ordered(fn, jobs)` gives the results in order, with one job in flight per worker
(assigned round-robin, so no pipe can fill up both ways and deadlock).

Shutting down is killing: leaving `map_ordered` or the pool for any reason (the consumer
stopping, an error, Ctrl-C, SIGTERM) SIGKILLs and reaps the workers; there are no helper
threads or queues to drain, so an interrupt ends the run within a second. The workers run
in their own process group (a terminal's Ctrl-C reaches only the parent), ignore SIGINT,
write nothing to stderr, and end by themselves when the parent dies (their stdin closes).
"""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from collections import deque
from typing import Callable, Iterable, Iterator

from .base import DataError

MAX_WORKERS = 32  # more decoders than this only cost memory: the parent quantizes/writes one batch at a time


def available_cores() -> int:
    """CPU cores this process may run on, shared among the local ranks of a distributed launch."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not on Linux
        cores = os.cpu_count() or 1
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, cores // local)


def pool_size(cores: int | None = None) -> int:
    """Decoders for `cores` cores: one per core but the parent's (which quantizes and writes),
    at least 2 (decoding then overlaps the parent's work even on two cores), at most MAX_WORKERS."""
    cores = available_cores() if cores is None else cores
    return max(2, min(cores - 1, MAX_WORKERS))


class DecodePool:
    def __init__(self, workers: int):
        # the parent's import path, so the workers run this very igpt_cli
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p or os.getcwd() for p in sys.path))
        self.procs: list[subprocess.Popen] = []
        try:
            for _ in range(workers):
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-c", "from igpt_cli.data.decode_pool import serve; serve()"], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, process_group=0))
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "DecodePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Kill and reap every worker (idempotent; never blocks on a worker)."""
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.kill()
                except OSError:  # pragma: no cover - already gone
                    pass
        for p in self.procs:
            for f in (p.stdin, p.stdout):
                try:
                    f.close()
                except OSError:
                    pass
            p.wait()  # SIGKILLed: returns at once
        self.procs = []

    def _send(self, w: int, fn: Callable, args: tuple) -> None:
        p = self.procs[w]
        try:
            pickle.dump((fn, args), p.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            p.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._died(w) from None

    def _receive(self, w: int):
        p = self.procs[w]
        try:
            ok, value = pickle.load(p.stdout)
        except (EOFError, OSError, pickle.UnpicklingError):
            raise self._died(w) from None
        if not ok:
            raise value
        return value

    def _died(self, w: int) -> DataError:
        p = self.procs[w]
        try:
            code = p.wait(timeout=1)
        except subprocess.TimeoutExpired:
            code = None
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"
        return DataError(f"an image decoding process ended unexpectedly ({how}; out of memory?)")

    def map_ordered(self, fn: Callable, jobs: Iterable[tuple]) -> Iterator[tuple[tuple, object]]:
        """(args, fn(*args)) for each job, in order, computed by the workers."""
        pending: deque = deque()  # (worker, args), oldest first
        n = len(self.procs)
        k = 0
        for args in jobs:
            if len(pending) == n:  # every worker busy: the oldest job's worker is the next free one
                w, done = pending.popleft()
                yield done, self._receive(w)
            w = k % n
            self._send(w, fn, args)
            pending.append((w, args))
            k += 1
        while pending:
            w, done = pending.popleft()
            yield done, self._receive(w)


def serve() -> None:
    """A worker: jobs from stdin, results to stdout, until stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            fn, args = pickle.load(stdin)
        except EOFError:
            return
        try:
            result = (True, fn(*args))
        except Exception as e:  # noqa: BLE001 - travels back to the parent
            result = (False, e)
        try:
            pickle.dump(result, stdout, protocol=pickle.HIGHEST_PROTOCOL)
            stdout.flush()
        except (BrokenPipeError, OSError):
            return
