"""Benchmark the probe's solvers: torch (every C at once) vs scipy (today's) vs scikit-learn.

CIFAR-10-sized synthetic but learnable features (class means + noise, a different
separability per layer), the full C search of `probe_layer` per layer. Prints seconds per
solver, ratios, passes over the data, chosen C / test accuracy agreement, and the
machine's float32 / bfloat16 matmul peak measured in the same run.

    python bench/bench_probe_solvers.py                          # 25 layers x 512, 50k/10k, 10 classes
    python bench/bench_probe_solvers.py --layers 5               # reduced (indicative on a busy machine)
    python bench/bench_probe_solvers.py --device cuda            # torch solver on a GPU
    python bench/bench_probe_solvers.py --imagenet --iters 3     # 1.28M x 1536, 1000 classes, passes/s + projection
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from igpt_cli.probe import COARSE_GRID, LinearProbe, probe_layer  # noqa: E402
from igpt_cli.probe.torch_solver import device_eig, fit_many  # noqa: E402


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Measured TFLOP/s of an n x n matmul."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12


def layer_data(layer: int, n_layers: int, n: int, d: int, k: int, rng_seed: int = 0):
    """Class means + noise; separability peaks in the middle layer (test accuracy about 30 % at the
    ends to 80 % in the middle, like iGPT features on CIFAR-10, so the chosen C is not at the grid's edge)."""
    rng = np.random.default_rng(rng_seed + layer)
    means = np.random.default_rng(99).standard_normal((k, d)).astype(np.float32)
    sep = 0.05 + 0.07 * (1 - abs(layer - n_layers // 2) / max(1, n_layers // 2))
    y = rng.integers(0, k, n)
    X = sep * means[y] + rng.standard_normal((n, d), dtype=np.float32)
    return X.astype(np.float32), y


def cifar(args, dev):
    print(f"device {dev}; fp32 matmul {matmul_peak(dev, torch.float32):.2f} TFLOP/s, "
          f"bf16 {matmul_peak(dev, torch.bfloat16):.2f} TFLOP/s", flush=True)
    total = {"torch": 0.0, "scipy": 0.0}
    agree = 0
    for l in range(args.layers):
        Xtr, ytr = layer_data(l, args.layers, args.n_train, args.dim, 10)
        Xte, yte = layer_data(l, args.layers, args.n_test, args.dim, 10, rng_seed=1000)
        rs = {}
        for solver in ("torch", "scipy") if args.compare else ("torch",):
            t = time.perf_counter()
            rs[solver] = probe_layer(Xtr, ytr, Xte, yte, estimator=LinearProbe(solver=solver, device=str(dev)))
            total[solver] += time.perf_counter() - t
        a = rs["torch"]
        b = rs.get("scipy", a)
        agree += a.c == b.c
        print(f"layer {l}: torch C={a.c:.3g} test {a.test_acc:.4f} passes {a.n_passes} | scipy C={b.c:.3g} "
              f"test {b.test_acc:.4f} passes {b.n_passes}", flush=True)
    print(f"ALL {args.layers} layers: torch {total['torch']:.1f} s, scipy {total['scipy']:.1f} s "
          f"(ratio {total['scipy'] / max(total['torch'], 1e-9):.2f}x), same C on {agree}/{args.layers}")
    if args.sklearn_layer:
        Xtr, ytr = layer_data(args.layers // 2, args.layers, args.n_train, args.dim, 10)
        Xte, yte = layer_data(args.layers // 2, args.layers, args.n_test, args.dim, 10, rng_seed=1000)
        t = time.perf_counter()
        s = probe_layer(Xtr, ytr, Xte, yte, estimator=LinearProbe(solver="sklearn"))
        ts = time.perf_counter() - t
        t = time.perf_counter()
        a = probe_layer(Xtr, ytr, Xte, yte, estimator=LinearProbe(solver="torch", device=str(dev)))
        tt = time.perf_counter() - t
        print(f"one layer, same grid: sklearn {ts:.1f} s (C={s.c:.3g}, test {s.test_acc:.4f}) vs torch {tt:.1f} s "
              f"(C={a.c:.3g}, test {a.test_acc:.4f}): {ts / tt:.1f}x")


class SyntheticRows:
    """ImageNet-shaped rows generated on the fly, chunk by chunk (never stored): class means + noise."""

    def __init__(self, n, d, k, chunk=16384):
        self.n, self.d, self.k, self.chunk = n, d, k, chunk
        self.means = torch.randn(k, d, generator=torch.Generator().manual_seed(0)) * 0.3
        self.y = np.random.default_rng(0).integers(0, k, n)

    def chunks(self, device, n_outputs=1):
        g = torch.Generator(device=device).manual_seed(1)
        means = self.means.to(device)
        y = torch.as_tensor(self.y, device=device)
        for a in range(0, self.n, self.chunk):
            yc = y[a:a + self.chunk]
            yield means[yc] + torch.randn(len(yc), self.d, device=device, generator=g)


def imagenet(args, dev):
    rows = SyntheticRows(args.n_train, 1536, 1000)
    n_c = len(COARSE_GRID)
    t = time.perf_counter()
    eig = device_eig(rows, dev)
    print(f"gram pass + eigh (on the device) {time.perf_counter() - t:.1f} s", flush=True)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = fit_many(rows, rows.y, 1000, COARSE_GRID, tol=1e-4, max_iter=args.iters, eig=eig, device=dev)
    dt = time.perf_counter() - t
    passes = max(o[2] for o in out)
    per_pass = dt / passes
    est_passes = args.projected_passes
    print(f"{passes} passes ({n_c} C at once) in {dt:.1f} s: {1 / per_pass:.3f} passes/s; "
          f"projected full search (~{est_passes} passes incl. refine + refit) {est_passes * per_pass / 60:.1f} min")
    if dev.type == "cuda":
        print(f"GPU memory peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=25)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--n-test", type=int, default=10000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-compare", dest="compare", action="store_false", help="torch solver only")
    ap.add_argument("--sklearn-layer", action="store_true", help="also scikit-learn vs torch on one layer")
    ap.add_argument("--imagenet", action="store_true")
    ap.add_argument("--iters", type=int, default=3, help="--imagenet: L-BFGS iterations to time")
    ap.add_argument("--projected-passes", type=int, default=150)
    args = ap.parse_args()
    dev = torch.device(args.device)
    if args.imagenet:
        args.n_train = args.n_train or 1_281_167
        imagenet(args, dev)
    else:
        args.n_train = args.n_train or 50000
        cifar(args, dev)


if __name__ == "__main__":
    main()
