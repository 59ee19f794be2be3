"""Benchmark `igpt probe` on 1 process vs K ranks under torchrun (CPU, gloo): layers spread over ranks.

Synthetic features (Gaussian classes whose separability depends on the layer), the full C
search on every layer, the torch solver on the CPU. Each configuration runs the same
command `--repeats` times; the table gives the median wall time of the whole command
(process start, reading, fits, gathering, writing) and whether the saved probes are
bit-identical (their recorded digest) to a one-process run with as many threads per
process (torch's CPU reductions depend on the thread count, not on the world size).

    PYTHONPATH=. .venv/bin/python bench/bench_probe_distributed.py [--layers 9] [--dim 192] [--train 3000] \
        [--test 1000] [--procs 2] [--threads 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from igpt_cli import formats  # noqa: E402


def write_features(path: Path, n: int, layers: int, dim: int, k: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(123).standard_normal((k, dim))
    y = rng.integers(0, k, n)
    with h5py.File(path, "w") as f:
        g = f.create_group("features")
        for layer in range(layers):
            sep = 0.1 + 0.4 * np.sin(np.pi * (layer + 0.5) / layers)   # peaks in the middle
            g.create_dataset(str(layer), data=(sep * centers[y] + rng.standard_normal((n, dim))).astype(np.float32))
        f.create_dataset("labels", data=y.astype(np.int64))
        f.attrs.update(format=formats.FEATURES_FORMAT, format_version=formats.FEATURES_VERSION,
                       layers=json.dumps(list(range(layers))), site="ln", pool="mean", sos=True, model="synthetic",
                       model_sha256="ab" * 32, model_config="{}", class_names=json.dumps([str(i) for i in range(k)]),
                       n_total=n, n_done=n, complete=True)
    return path


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=9)
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads in all (split across ranks)")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torchrun = Path(sys.executable).with_name("torchrun")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train = write_features(tmp / "train.h5", a.train, a.layers, a.dim, a.classes, 0)
        test = write_features(tmp / "test.h5", a.test, a.layers, a.dim, a.classes, 1)
        rows, digests = [], {}
        per_rank = max(1, a.threads // a.procs)
        configs = [(1, a.threads)] + ([(1, per_rank)] if per_rank != a.threads else []) + [(a.procs, per_rank)]
        for procs, threads in configs:
            env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
            launcher = [sys.executable] if procs == 1 else [str(torchrun), "--standalone", f"--nproc-per-node={procs}"]
            times = []
            for i in range(a.repeats):
                out = tmp / f"p{procs}x{threads}-{i}.h5"
                t0 = time.perf_counter()
                r = subprocess.run([*launcher, "-m", "igpt_cli", "probe", str(train), "--test", str(test), "-q",
                                    "--device", "cpu", "--save-probes", str(out)], capture_output=True, text=True,
                                   env=env)
                times.append(time.perf_counter() - t0)
                if r.returncode != 0:
                    sys.exit(r.stderr)
                with h5py.File(out) as f:
                    digests.setdefault((procs, threads), set()).add(f.attrs["probes_sha256"])
            rows.append((procs, threads, statistics.median(times), times))
    print(f"igpt probe, {a.layers} layers x {a.dim} dims, {a.train} / {a.test} rows, {a.classes} classes; "
          f"CPU: {cpu_name()} ({os.cpu_count()} cores); median of {a.repeats}")
    print("| processes x threads | median wall s | runs (s) | speed-up | saved probes = 1 process, same threads |")
    print("| --- | ---: | --- | ---: | --- |")
    base = rows[0][2]
    for procs, threads, med, times in rows:
        same = digests[(procs, threads)] == digests[(1, threads)]
        print(f"| {procs} x {threads} | {med:.1f} | {', '.join(f'{t:.1f}' for t in times)} | {base / med:.2f}x | "
              f"{'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
