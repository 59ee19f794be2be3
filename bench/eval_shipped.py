"""Acceptance numbers for a pretrained iGPT (the shipped one by default) on CIFAR-10.

Runs the project's own quantize → extract → probe on the shared CIFAR-10
(`../shared/data/cifar10-jpeg.tar`, 50k train / 10k test) at the model's
resolution, for three feature sets, and prints one JSON summary:
  - the pretrained model, every layer;
  - the same architecture with random weights, every layer;
  - the raw-pixel baseline (palette-decoded pixels).

    python bench/eval_shipped.py [--model DIR] [--work DIR] [--limit-train N] [--plot PNG]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from igpt_cli.demo import SHIPPED_MODEL  # noqa: E402
from igpt_cli.extract import extract_features  # noqa: E402
from igpt_cli.model import IGPT, load_pretrained, read_config, save_pretrained  # noqa: E402
from igpt_cli.cli.plots import write_probe_plot  # noqa: E402
from igpt_cli.probe import probe_files  # noqa: E402
from igpt_cli.quantize import quantize_dataset  # noqa: E402

CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar"


def curve(report: dict) -> list[dict]:
    return [{"layer": r["layer"], "val_acc": round(r["val_acc"], 4), "test_acc": round(r["test_acc"], 4),
             "c": r["c"]} for r in report["layers"]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=SHIPPED_MODEL)
    ap.add_argument("--work", type=Path, default=Path("/tmp/igpt-eval"))
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    cfg = read_config(args.model)
    side = cfg.side
    t0 = time.perf_counter()
    tokens = {}
    for split in ("train", "test"):
        tokens[split] = args.work / f"cifar{side}-{split}.h5"
        if not tokens[split].exists():
            quantize_dataset(CIFAR, tokens[split], split=split, size=side, palette=args.model,
                             limit=args.limit_train if split == "train" else None)
    random_dir = args.work / "random-init"
    import torch

    torch.manual_seed(args.seed)
    save_pretrained(IGPT(cfg), random_dir)
    (random_dir / "preprocessor_config.json").write_text((args.model / "preprocessor_config.json").read_text())
    assert load_pretrained(random_dir).config == cfg
    out = {"model": str(args.model), "resolution": f"{side}x{side}", "n_layer": cfg.n_layer, "n_embd": cfg.n_embd}
    for name, source, layers in (("pretrained", args.model, "all"), ("random", random_dir, "all"),
                                 ("pixels", "pixels", None)):
        feats = {}
        for split in ("train", "test"):
            feats[split] = args.work / f"{name}-{split}.h5"
            extract_features(tokens[split], source, layers, feats[split], overwrite=True)
        t = time.perf_counter()
        rep = probe_files(feats["train"], feats["test"], seed=args.seed).to_dict()
        best = max(rep["layers"], key=lambda r: r["val_acc"])
        out[name] = {"best_layer": best["layer"], "best_test_acc": round(best["test_acc"], 4),
                     "probe_seconds": round(time.perf_counter() - t, 1), "curve": curve(rep),
                     "n_train": best["n_train"], "n_test": best["n_test"]}
        if name == "pretrained" and args.plot:
            write_probe_plot(rep, args.plot)
        print(json.dumps({name: out[name]}), file=sys.stderr, flush=True)
    out["gain_over_pixels_points"] = round(100 * (out["pretrained"]["best_test_acc"] - out["pixels"]["best_test_acc"]), 2)
    out["gain_over_random_points"] = round(100 * (out["pretrained"]["best_test_acc"] - out["random"]["best_test_acc"]), 2)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
