"""Load the shared CIFAR-10 JPEG tar as uint8 pixel arrays, cached in /tmp (.npz)."""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CIFAR_TAR = Path(os.environ.get("IGPT_SHARED", ROOT.parent / "shared")) / "data" / "cifar10-jpeg.tar"
CACHE = Path(os.environ.get("IGPT_CIFAR_CACHE", "/tmp/igpt-cifar10-pixels.npz"))
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def load_cifar_pixels(tar_path: Path = CIFAR_TAR, cache: Path = CACHE):
    """Returns (x_train uint8 [50000,32,32,3], y_train, x_test, y_test, class_names)."""
    if cache.is_file():
        z = np.load(cache)
        return z["x_train"], z["y_train"], z["x_test"], z["y_test"], CLASSES
    from PIL import Image

    data = {"train": ([], []), "test": ([], [])}
    with tarfile.open(tar_path) as tar:
        for m in tar:
            if not m.isfile() or not m.name.endswith(".jpg"):
                continue
            split, cls, _ = m.name.split("/")[-3:]
            img = Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")
            data[split][0].append(np.asarray(img, dtype=np.uint8))
            data[split][1].append(CLASSES.index(cls))
    out = {}
    for split, (xs, ys) in data.items():
        out[f"x_{split}"] = np.stack(xs)
        out[f"y_{split}"] = np.asarray(ys, dtype=np.int64)
    tmp = cache.with_name(cache.name + ".tmp.npz")
    np.savez(tmp, **out)
    os.replace(tmp, cache)
    return out["x_train"], out["y_train"], out["x_test"], out["y_test"], CLASSES


if __name__ == "__main__":
    xtr, ytr, xte, yte, _ = load_cifar_pixels()
    print(xtr.shape, ytr.shape, xte.shape, yte.shape, np.bincount(ytr), np.bincount(yte))
