"""The paper's evaluations side by side, on one model and one pair of CIFAR-10 subsets.

With igpt's own commands only (so the table is what a user gets), on class-balanced subsets of
the shared CIFAR-10 (`../shared/data/cifar10-jpeg.tar`) at the model's resolution:

  1. `igpt quantize` train (--per-class images per class) and test (--test-per-class);
  2. `igpt extract --layer all` on both;
  3. `igpt probe`: the linear probe per layer (C chosen on a validation split);
  4. `igpt probe --layer A,B,C --concat`: one linear probe on the best three layers (by validation);
  5. `igpt probe --method knn`: DINO's weighted k-NN (k 20, T 0.07) per layer;
  6. `igpt probe --shots 10 --seeds 5`: 10-shot linear probes per layer, mean ± std over 5 draws;
  7. `igpt finetune` (the joint objective, --steps steps of --batch-size).

Prints a Markdown table (test accuracy with its 95 % interval, where each method has one) and
writes every report under --work.

    python bench/eval_protocols.py [--model igpt-cifar8] [--per-class 300] [--test-per-class 100]
                                   [--steps 150] [--batch-size 32] [--work /tmp/igpt-protocols]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar"


def igpt(*args, out_json: bool = True) -> dict | None:
    """Run `python -m igpt_cli ARGS` (this checkout); the JSON it prints, or None."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "igpt_cli", *map(str, args), "--quiet"], capture_output=True,
                       text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"igpt {' '.join(map(str, args))}: exit {r.returncode}\n{r.stderr}")
    print(f"  {time.perf_counter() - t:6.1f} s  igpt {' '.join(map(str, args))}", file=sys.stderr)
    return json.loads(r.stdout) if out_json and r.stdout.strip() else None


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def interval(row: dict) -> str:
    ci = row.get("test_acc_ci")
    return f"{pct(ci[0])}–{pct(ci[1])}" if ci else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="igpt-cifar8")
    ap.add_argument("--size", type=int, default=8, help="image side the model takes")
    ap.add_argument("--per-class", type=int, default=300)
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--work", type=Path, default=Path("/tmp/igpt-protocols"))
    a = ap.parse_args()
    w = a.work
    w.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for split, n in (("train", a.per_class), ("test", a.test_per_class)):
        igpt("quantize", CIFAR, "--split", split, "--size", a.size, "--palette", a.model, "--limit-per-class", n,
             "--shuffle", "--seed", "0", "-o", w / f"{split}.h5", "--overwrite")
        igpt("extract", w / f"{split}.h5", "-m", a.model, "--layer", "all", "-o", w / f"{split}-feats.h5",
             "--overwrite", out_json=False)
    feats = (w / "train-feats.h5", "--test", w / "test-feats.h5")
    linear = igpt("probe", *feats, "--json")
    best3 = sorted(sorted(linear["layers"], key=lambda r: -r["val_acc"])[:3], key=lambda r: r["layer"])
    spec = ",".join(str(r["layer"]) for r in best3)
    concat = igpt("probe", *feats, "--layer", spec, "--concat", "--json")
    knn = igpt("probe", *feats, "--method", "knn", "--json")
    shots = igpt("probe", *feats, "--shots", "10", "--seeds", "5", "--json")
    ft = igpt("finetune", w / "train.h5", "-m", a.model, "--test", w / "test.h5", "-o", w / "ft", "--restart",
              "--steps", a.steps, "--batch-size", a.batch_size, "--warmup", max(1, a.steps // 10), "--json")
    for name, rep in (("linear", linear), ("concat", concat), ("knn", knn), ("shots", shots), ("finetune", ft)):
        (w / f"{name}.json").write_text(json.dumps(rep, indent=2))

    def best(rep: dict) -> dict:   # the layer chosen on validation (what a user would report)
        return next(r for r in rep["layers"] if r["layer"] == rep["best_layer"])

    rows = []
    lb = best(linear)
    rows.append((f"linear probe, layer {lb['layer']} (best by validation)", pct(lb["test_acc"]), interval(lb)))
    top = max(linear["layers"], key=lambda r: r["test_acc"])
    rows.append((f"linear probe, layer {top['layer']} (best on test; optimistic)", pct(top["test_acc"]),
                 interval(top)))
    c = concat["layers"][0]
    rows.append((f"linear probe on layers {spec} concatenated", pct(c["test_acc"]), interval(c)))
    kb = best(knn)
    rows.append((f"weighted k-NN (k 20, T 0.07), layer {kb['layer']} (best by leave-one-out)", pct(kb["test_acc"]),
                 interval(kb)))
    fs = next(r for r in shots["layers"] if r["layer"] == lb["layer"])   # the linear probe's chosen layer
    f10 = fs["few_shot"][0]
    rows.append((f"10-shot linear, layer {fs['layer']}, mean ± std over 5 draws",
                 f"{pct(f10['test_acc_mean'])} ± {100 * f10['test_acc_std']:.1f}", ""))
    fl = ft["layers"][0]
    rows.append((f"fine-tuning, {a.steps} steps of {a.batch_size} (gen-weight 1)", pct(fl["test_acc"]), interval(fl)))
    n_train, n_test = lb["n_train"], lb.get("n_test")
    print(f"{a.model}, CIFAR-10 at {a.size}x{a.size}: {10 * a.per_class:,} train / {10 * a.test_per_class:,} test "
          f"images ({time.perf_counter() - t0:.0f} s in all; the linear probe fits {n_train} rows, tests {n_test})\n")
    print("| evaluation | test accuracy | 95 % interval |\n| --- | ---: | --- |")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    print("\nper layer (test accuracy): layer | linear | k-NN | 10-shot mean")
    for lr, kr, sr in zip(linear["layers"], knn["layers"], shots["layers"]):
        s = (sr.get("few_shot") or [{}])[0]
        print(f"  {lr['layer']:>2} | {pct(lr['test_acc'])} | {pct(kr['test_acc'])} | "
              f"{pct(s['test_acc_mean']) if 'test_acc_mean' in s else '—'}")


if __name__ == "__main__":
    main()
