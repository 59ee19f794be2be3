"""The pipeline from Python: quantize -> extract -> probe, then features as numpy arrays.

    python examples/python_api.py [DATA] [MODEL] [OUT]

Defaults: the CIFAR-10 subset and the small iGPT that ship with igpt, ./python-api-out.
"""
import sys
from pathlib import Path

import numpy as np

import igpt_cli as igpt
from igpt_cli.demo import DEMO_DATA, SHIPPED_MODEL

data = sys.argv[1] if len(sys.argv) > 1 else DEMO_DATA
model = sys.argv[2] if len(sys.argv) > 2 else SHIPPED_MODEL
out = Path(sys.argv[3] if len(sys.argv) > 3 else "python-api-out")
out.mkdir(exist_ok=True)

# files in, files out (every stage returns a typed result; .to_dict() is the JSON the CLI prints)
for split in ("train", "test"):
    igpt.quantize_dataset(data, out / f"{split}.h5", split=split, size=8, palette=model, overwrite=True)
    igpt.extract_features(out / f"{split}.h5", model, "all", out / f"{split}-feats.h5", overwrite=True)
report = igpt.probe_files(out / "train-feats.h5", out / "test-feats.h5")
print(f"best layer {report.best_layer}:",
      {r.layer: round(r.test_acc, 3) for r in report.layers})

# features as numpy, and a scikit-learn style probe on them
X, y = igpt.load_features(out / "train-feats.h5", layer=report.best_layer)
Xt, yt = igpt.load_features(out / "test-feats.h5", layer=report.best_layer)
mu, sd = X.mean(0), X.std(0) + 1e-6
best = next(r for r in report.layers if r.layer == report.best_layer)
clf = igpt.LinearProbe(C=best.c).fit((X - mu) / sd, y)
print("LinearProbe test accuracy:", round(clf.score((Xt - mu) / sd, yt), 3))

# in memory, no files: images (uint8 N x H x W x 3) -> features per layer
images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
feats = igpt.features_from_images(images, model, layers=[0, 4])
print({layer: f.shape for layer, f in feats.items()})
