"""Acceptance check: the torch solver chooses the same C and gets the same test accuracy per layer
as today's (scipy) solver on the shipped model's CIFAR-10 features (and scikit-learn's own on one layer).

    python bench/check_probe_cifar10.py [--work /tmp/probe-check] [--device cpu]

Quantizes CIFAR-10 at 8x8 from ../shared/data/cifar10-jpeg.tar, extracts every layer with
igpt_cli/assets/igpt-cifar8, probes with --solver scipy, torch and sklearn, prints a per-layer
comparison and exits 1 if chosen C or test accuracy differ.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar"  # ../shared/data beside the checkout


def igpt(*args):
    print("+ igpt", *args, flush=True)
    return subprocess.run([sys.executable, "-m", "igpt_cli", *map(str, args)], check=True, capture_output=True,
                          text=True).stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/probe-check"))
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        if not (w / f"{split}.h5").exists():
            igpt("quantize", TAR, "--split", split, "--size", "8", "-o", w / f"{split}.h5")
        if not (w / f"{split}-feats.h5").exists():
            igpt("extract", w / f"{split}.h5", "-m", ROOT / "igpt_cli/assets/igpt-cifar8", "-o", w / f"{split}-feats.h5")
    reps = {}
    for solver in ("scipy", "torch"):
        reps[solver] = json.loads(igpt("probe", w / "train-feats.h5", "--test", w / "test-feats.h5", "--solver", solver,
                                       "--device", args.device, "--json", "-q"))
        print(f"{solver}: {reps[solver]['seconds']:.1f} s", flush=True)
    bad = 0
    for a, b in zip(reps["scipy"]["layers"], reps["torch"]["layers"]):
        same = a["c"] == b["c"] and a["test_acc"] == b["test_acc"]
        bad += not same
        print(f"layer {a['layer']:2d}: scipy C={a['c']:.3g} test {a['test_acc']:.4f} | torch C={b['c']:.3g} "
              f"test {b['test_acc']:.4f} {'ok' if same else 'DIFFERENT'}")
    best = reps["scipy"]["best_layer"]
    sk = json.loads(igpt("probe", w / "train-feats.h5", "--test", w / "test-feats.h5", "--solver", "sklearn",
                         "-l", best, "--json", "-q"))["layers"][0]
    print(f"sklearn on best layer {best}: C={sk['c']:.3g} test {sk['test_acc']:.4f}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
