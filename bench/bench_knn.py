"""Benchmark the k-NN evaluation (`igpt probe --method knn`): in memory vs the training rows streamed
from the features file (`--max-memory`), and the exact float64 similarities against a plain float32
matmul (the earlier implementation's, kept here as the reference for speed only).

Synthetic unit-variance features in an HDF5 features file; each configuration times `knn_scores`
(the test rows against every training row, k = 20, DINO's weighted vote) `--repeats` times and
prints the median, and whether the scores are identical to the in-memory run.

    PYTHONPATH=. .venv/bin/python bench/bench_knn.py [--train 20000] [--test 2000] [--dim 512] \
        [--max-memory 64M] [--device cpu] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def float32_scores(Xtr, ytr, Xte, k: int, T: float, device: str, chunk: int) -> np.ndarray:
    """The float32 path (torch.topk, no tie rule): the speed reference."""
    import torch

    classes, y = np.unique(ytr, return_inverse=True)
    dev = torch.device(device)
    tr = torch.nn.functional.normalize(torch.as_tensor(Xtr, device=dev), dim=1)
    labels = torch.as_tensor(y, device=dev)
    out = []
    for s in range(0, len(Xte), chunk):
        q = torch.nn.functional.normalize(torch.as_tensor(Xte[s:s + chunk], device=dev), dim=1)
        v, i = (q @ tr.T).topk(k, dim=1)
        sc = torch.zeros(len(q), len(classes), device=dev).scatter_add_(1, labels[i], torch.exp(v / T))
        out.append(sc.cpu().numpy())
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=20000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--max-memory", default="64M")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    import h5py

    from igpt_cli import formats
    from igpt_cli.probe.knn import CHUNK_ELEMENTS, KNN_K, KNN_TEMPERATURE, knn_scores, plan_knn_memory
    from igpt_cli.probe.stream import H5Rows, parse_bytes

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((a.classes, a.dim)).astype(np.float32)
    ytr, yte = rng.integers(0, a.classes, a.train), rng.integers(0, a.classes, a.test)
    Xtr = (0.3 * centers[ytr] + rng.standard_normal((a.train, a.dim))).astype(np.float32)
    Xte = (0.3 * centers[yte] + rng.standard_normal((a.test, a.dim))).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.h5"
        with h5py.File(path, "w") as f:
            f.attrs.update(format=formats.FEATURES_FORMAT, format_version=formats.FEATURES_VERSION)
            f.create_group("features").create_dataset("0", data=Xtr)
        cap = parse_bytes(a.max_memory)
        plan = plan_knn_memory(cap, a.train, a.test, a.dim, KNN_K, 0)
        kw = dict(k=KNN_K, vote="weighted", temperature=KNN_TEMPERATURE, device=a.device)

        def timed(fn):
            times, out = [], None
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                out = fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times), out

        chunk = max(1, CHUNK_ELEMENTS // a.train)
        t32, _ = timed(lambda: float32_scores(Xtr, ytr, Xte, KNN_K, KNN_TEMPERATURE, a.device, chunk))
        tmem, ref = timed(lambda: knn_scores(Xtr, ytr, Xte, **kw)[1])
        if plan is None or plan.train_rows is None:
            print(f"--max-memory {a.max_memory}: the layer fits, nothing streams; lower it")
            tstr, same = float("nan"), None
        else:
            src = H5Rows(path, 0, plan.train_rows)
            tstr, got = timed(lambda: knn_scores(src, ytr, Xte, chunk_rows=plan.query_rows, **kw)[1])
            same = bool(np.array_equal(got, ref))
    print(f"k-NN, {a.train} train x {a.test} test x {a.dim} dims, k={KNN_K}, {a.device}, median of {a.repeats}")
    print(f"  float32 matmul + topk (reference)     {t32:8.3f} s")
    print(f"  exact float64, in memory              {tmem:8.3f} s")
    if plan is not None and plan.train_rows is not None:
        print(f"  exact float64, streamed ({plan.train_rows} train rows/block, {plan.query_rows} test rows/chunk, "
              f"--max-memory {a.max_memory})  {tstr:8.3f} s  identical scores: {same}")


if __name__ == "__main__":
    main()
