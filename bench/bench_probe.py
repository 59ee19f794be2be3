"""Benchmark `igpt probe`: 25 layers of 512-d features for CIFAR-10-sized data.

Stand-in features (the real ones come from `igpt extract`): real CIFAR-10 pixels (the
shared JPEG tar, cached in /tmp) through a fixed random projection to 512 dims, then per
layer a different random rotation, nonlinearity and amount of noise (least in the
middle, so the depth curve peaks there). Times the probe only (C search + refit), not
the data generation, and compares the test accuracy with a plain scikit-learn
`LogisticRegression(C=chosen C)` fit for a few layers.

    python bench/bench_probe.py                     # 25 layers, 50k train / 10k test
    python bench/bench_probe.py --layers 3 --parity 1
    python bench/bench_probe.py --files train-feats.h5 test-feats.h5   # real features
    python bench/bench_probe.py --layers 6 --n-train 10000 --together   # all layers at once vs one at a time

`--together`: the same layers probed one at a time (`probe_layer`) and all at once
(`probe_layers`: every layer's C values in one batched optimisation), wall and CPU time of
each (medians of `--reps`), and whether both chose the same C with the same accuracies.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from igpt_cli.probe import probe_files, probe_layer, standardize  # noqa: E402


def stand_in_layer(base_tr, base_te, layer: int, n_layers: int):
    rng = np.random.default_rng(1000 + layer)
    d = base_tr.shape[1]
    Q = np.linalg.qr(rng.standard_normal((d, d)))[0].astype(np.float32)
    depth = abs(layer - n_layers // 2) / max(1, n_layers // 2)
    noise = 0.3 + 1.5 * depth
    act = [np.tanh, lambda z: np.maximum(z, 0), lambda z: z * (1 / (1 + np.exp(-z)))][layer % 3]
    out = []
    for b in (base_tr, base_te):
        z = act(b @ Q)
        z = z + noise * rng.standard_normal(z.shape).astype(np.float32)
        out.append(z.astype(np.float32))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=25)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--n-train", type=int, default=50000)
    ap.add_argument("--parity", type=int, default=2, help="layers to compare with plain scikit-learn")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", type=int, nargs="*", help="probe only these layers (of --layers)")
    ap.add_argument("--together", action="store_true", help="all layers at once vs one layer at a time")
    ap.add_argument("--reps", type=int, default=1, help="repetitions of each --together timing (median)")
    ap.add_argument("--files", nargs=2, metavar=("TRAIN", "TEST"), help="probe real features files instead")
    args = ap.parse_args()

    if args.files:
        t0 = time.perf_counter()
        def show(event):
            if (r := event.result) is not None:
                print(f"layer {r.layer}: test {r.test_acc:.4f} C={r.c:.3g} {r.seconds:.1f} s", flush=True)

        rep = probe_files(args.files[0], args.files[1], seed=args.seed, on_progress=show)
        wall = time.perf_counter() - t0
        print(f"wall {wall:.1f} s for {len(rep.layers)} layers = {wall / len(rep.layers):.1f} s/layer")
        return

    from cifar_pixels import load_cifar_pixels

    t = time.perf_counter()
    xtr, ytr, xte, yte, _ = load_cifar_pixels()
    keep = np.sort(np.random.default_rng(0).permutation(len(ytr))[: args.n_train])  # the tar is sorted by class
    xtr, ytr = xtr[keep], ytr[keep]
    rng = np.random.default_rng(0)
    P = (rng.standard_normal((32 * 32 * 3, args.dim)) / np.sqrt(32 * 32 * 3)).astype(np.float32)
    flat = lambda x: x.reshape(len(x), -1).astype(np.float32) / 127.5 - 1
    base_tr = np.concatenate([flat(xtr[i:i + 5000]) @ P for i in range(0, len(xtr), 5000)])
    base_te = flat(xte) @ P
    print(f"data: {len(ytr)} train / {len(yte)} test, {args.layers} layers x {args.dim} dims "
          f"(prepared in {time.perf_counter() - t:.0f} s)", flush=True)

    if args.together:
        compare_together(args, base_tr, ytr, base_te, yte)
        return

    probe_s = cpu_s = 0.0
    results = []
    deltas = []
    todo = args.only if args.only else list(range(args.layers))
    for i, l in enumerate(todo):
        Xtr, Xte = stand_in_layer(base_tr, base_te, l, args.layers)
        cpu0 = time.process_time()
        r = probe_layer(Xtr, ytr, Xte, yte, args.seed, layer=l)
        cpu = time.process_time() - cpu0
        probe_s += r.seconds
        cpu_s += cpu
        results.append(r)
        msg = (f"layer {l:2d}: val {r.val_acc:.4f} C={r.c:.3g} test {r.test_acc:.4f} "
               f"{r.seconds:.1f} s wall, {cpu:.1f} s CPU ({r.evals} passes over the data, final fit {r.n_iter})")
        if i < args.parity:
            from sklearn.linear_model import LogisticRegression

            A, B = standardize(Xtr, Xte)
            t = time.perf_counter()
            from threadpoolctl import threadpool_limits

            with threadpool_limits(limits=1):  # same single BLAS thread as the probe
                ref = LogisticRegression(C=r.c, max_iter=1000).fit(A, ytr)
            ref_acc = ref.score(B, yte)
            deltas.append(100 * (r.test_acc - ref_acc))
            msg += f" | plain sklearn at C: {ref_acc:.4f} ({time.perf_counter() - t:.1f} s), delta {deltas[-1]:+.2f} pt"
        print(msg, flush=True)
        del Xtr, Xte
    best = max(results, key=lambda r: r.val_acc)
    print(f"probe wall time {probe_s:.1f} s for {len(todo)} layers = {probe_s / len(todo):.1f} s/layer "
          f"(projected for 25 layers: {25 * probe_s / len(todo) / 60:.1f} min; CPU {cpu_s / len(todo):.1f} s/layer, "
          f"load average now {os.getloadavg()[0]:.1f}); "
          f"best layer {best.layer} test {best.test_acc:.4f}")
    if deltas:
        print(f"accuracy delta vs plain scikit-learn at the chosen C: max |delta| = {max(map(abs, deltas)):.2f} points")


def compare_together(args, base_tr, ytr, base_te, yte) -> None:
    import statistics

    from igpt_cli.probe import probe_layers

    feats = {l: stand_in_layer(base_tr, base_te, l, args.layers) for l in range(args.layers)}
    tr, te = {l: a for l, (a, _) in feats.items()}, {l: b for l, (_, b) in feats.items()}
    timings = {"one at a time": [], "all at once": []}
    for _ in range(args.reps):
        for name in timings:
            w0, c0 = time.perf_counter(), time.process_time()
            if name == "one at a time":
                res = [probe_layer(tr[l], ytr, te[l], yte, args.seed, layer=l) for l in tr]
            else:
                res = probe_layers(tr, ytr, te, yte, args.seed)
            timings[name].append((time.perf_counter() - w0, time.process_time() - c0, res))
    for name, runs in timings.items():
        print(f"{name}: wall {statistics.median(r[0] for r in runs):.1f} s, "
              f"CPU {statistics.median(r[1] for r in runs):.1f} s "
              f"(runs: {', '.join(f'{r[0]:.1f}' for r in runs)} s wall)")
    a, b = timings["one at a time"][0][2], timings["all at once"][0][2]
    same = all((x.c, x.val_acc, x.test_acc) == (y.c, y.val_acc, y.test_acc) for x, y in zip(a, b))
    print(f"same chosen C and accuracies in every layer: {same}; chosen C {[x.c for x in b]}; "
          f"test acc {[round(x.test_acc, 4) for x in b]}; load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
