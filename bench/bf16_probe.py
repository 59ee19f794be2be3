"""bf16 vs float32 features: linear-probe accuracy delta on real quantized CIFAR-10 images.

Random iGPT (4 layers x 128 wide, 4 heads) on CIFAR-10 images box-downsampled to 16x16 and
quantized to the official 512-colour palette; features of every layer by `extract_features`
in float32 and in bfloat16; sklearn LogisticRegression per layer on train, accuracy on test.

    PYTHONPATH=. .venv/bin/python bench/bf16_probe.py [--train 1500 --test 500]
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import tempfile
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from igpt_cli import formats  # noqa: E402
from igpt_cli.extract import extract_features  # noqa: E402
from igpt_cli.model import IGPT, IGPTConfig, save_pretrained  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def load_split(tar: tarfile.TarFile, members, split: str, per_class: int, side: int, palette: np.ndarray):
    classes = sorted({m.name.split("/")[1] for m in members if m.name.startswith(split + "/") and m.isfile()})
    toks, labels = [], []
    for ci, c in enumerate(classes):
        ms = sorted((m for m in members if m.isfile() and m.name.startswith(f"{split}/{c}/")), key=lambda m: m.name)
        for m in ms[:per_class]:
            img = Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB").resize((side, side), Image.BOX)
            px = np.asarray(img, dtype=np.float32).reshape(-1, 3) / 127.5 - 1
            toks.append(((px[:, None, :] - palette[None]) ** 2).sum(-1).argmin(1).astype(np.uint16))
            labels.append(ci)
    return np.stack(toks), np.array(labels), classes


def main():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=1500)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--side", type=int, default=16)
    args = ap.parse_args()
    palette = np.load(SHARED / "kmeans_centers.npy").astype(np.float32)
    with tarfile.open(SHARED / "cifar10-jpeg.tar") as tar:
        members = tar.getmembers()
        tr = load_split(tar, members, "train", args.train // 10, args.side, palette)
        te = load_split(tar, members, "test", args.test // 10, args.side, palette)
    torch.manual_seed(0)
    cfg = IGPTConfig(n_positions=args.side ** 2, n_embd=128, n_layer=4, n_head=4)
    out = {}
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        save_pretrained(IGPT(cfg), td / "m")
        for name, (t, y, classes) in (("train", tr), ("test", te)):
            with h5py.File(td / f"{name}.h5", "w") as f:
                formats.create_tokens_file(f, height=args.side, width=args.side, palette=palette, class_names=classes,
                                           split=name, source="cifar10-jpeg.tar", resize="box")
                formats.append_rows(f, tokens=t, labels=y, sources=np.array([str(i) for i in range(len(y))], dtype=object))
        feats = {}
        for dt in ("float32", "bfloat16"):
            for name in ("train", "test"):
                extract_features(td / f"{name}.h5", td / "m", "all", td / f"{name}-{dt}.h5", dtype=dt)
                with h5py.File(td / f"{name}-{dt}.h5") as f:
                    feats[dt, name] = {int(k): v[:] for k, v in f["features"].items()}
        for layer in range(cfg.n_layer + 1):
            accs = {}
            for dt in ("float32", "bfloat16"):
                sc = StandardScaler().fit(feats[dt, "train"][layer])
                clf = LogisticRegression(max_iter=2000, C=1.0).fit(sc.transform(feats[dt, "train"][layer]), tr[1])
                accs[dt] = 100 * clf.score(sc.transform(feats[dt, "test"][layer]), te[1])
            out[layer] = dict(fp32=round(accs["float32"], 2), bf16=round(accs["bfloat16"], 2),
                              delta=round(accs["bfloat16"] - accs["float32"], 2))
            print(layer, out[layer], flush=True)
    worst = min(v["delta"] for v in out.values())
    print(json.dumps({"n_train": len(tr[1]), "n_test": len(te[1]), "side": args.side, "per_layer": out,
                      "worst_bf16_minus_fp32_points": worst}))


if __name__ == "__main__":
    main()
