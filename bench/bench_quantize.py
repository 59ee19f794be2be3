"""Benchmark `igpt quantize` against the transformers ImageGPT processor.

    .venv/bin/python bench/bench_quantize.py [--tar ../shared/data/cifar10-jpeg.tar] [--hf-n 2000]

1. `igpt quantize` on all 60,000 CIFAR-10 JPEGs straight from the tar (decoding,
   quantizing and writing the HDF5 file included), in a subprocess so its peak RSS is its own.
2. `igpt quantize --split train` (50,000 images) in another subprocess: peak RSS.
3. The first `--hf-n` of the same images (same tar members, decoded with PIL) through
   `ImageGPTImageProcessorPil(clusters=<official palette>, size=32x32)`; images/s, and the
   token agreement with igpt on those images.
Prints images/s of each and the ratio. Run on an otherwise idle machine for stable numbers.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar"


def run_quantize(tar: Path, out: Path, split: str) -> tuple[dict, float, float]:
    """Run the CLI in a fresh process; return (summary, wall seconds, peak RSS MiB)."""
    code = ("import resource, sys; from igpt_cli.cli import app\n"
            "try:\n    app(prog_name='igpt')\nexcept SystemExit as e:\n    rc = e.code\n"
            "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
            "sys.exit(rc)\n")
    cmd = [sys.executable, "-c", code, "quantize", str(tar), "--split", split, "-o", str(out), "--quiet"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"quantize failed ({p.returncode}): {p.stderr}")
    rss_kib = int(next(line.split()[1] for line in p.stderr.splitlines() if line.startswith("MAXRSS")))
    return json.loads(p.stdout.strip().splitlines()[-1]), wall, rss_kib / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tar", type=Path, default=DEFAULT_TAR)
    ap.add_argument("--hf-n", type=int, default=2000)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import h5py
    from PIL import Image
    from transformers.models.imagegpt.image_processing_pil_imagegpt import ImageGPTImageProcessorPil

    from igpt_cli.palette import Palette

    print(f"cpus available: {len(os.sched_getaffinity(0))}, load average: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        out_all = Path(tmp) / "all.h5"
        s_all, wall_all, rss_all = run_quantize(args.tar, out_all, "all")
        ips = s_all["n"] / s_all["seconds"]
        print(f"igpt quantize (all):   {s_all['n']} images in {s_all['seconds']:.2f} s "
              f"(process wall {wall_all:.2f} s incl. start-up) = {ips:,.0f} images/s, peak RSS {rss_all:.0f} MiB")
        s_tr, wall_tr, rss_tr = run_quantize(args.tar, Path(tmp) / "train.h5", "train")
        print(f"igpt quantize (train): {s_tr['n']} images in {s_tr['seconds']:.2f} s, peak RSS {rss_tr:.0f} MiB")

        # The same images through transformers: the first hf-n rows of the igpt file.
        with h5py.File(out_all, "r") as f:
            ours = f["tokens"][:args.hf_n].astype(np.int64)
            members = [s.decode().split(":", 1)[1] for s in f["sources"][:args.hf_n]]
        with tarfile.open(args.tar) as tf:
            want = set(members)
            blobs = {}
            for m in tf:
                if m.name in want:
                    blobs[m.name] = tf.extractfile(m).read()
                    if len(blobs) == len(want):
                        break
        data = [blobs[m] for m in members]
        proc = ImageGPTImageProcessorPil(clusters=Palette.default().centers, size={"height": 32, "width": 32})
        t0 = time.perf_counter()
        hf = []
        for i in range(0, len(data), 100):
            imgs = [Image.open(io.BytesIO(b)) for b in data[i:i + 100]]
            hf.append(np.stack(proc(imgs)["input_ids"]))
        hf_s = time.perf_counter() - t0
        hf = np.concatenate(hf)
        hf_ips = len(data) / hf_s
        agree = float((hf == ours).mean())
        print(f"transformers ImageGPTImageProcessorPil: {len(data)} images in {hf_s:.2f} s = {hf_ips:,.0f} images/s")
        print(f"token agreement on those images: {agree:.6%}")
        print(f"speed-up: {ips / hf_ips:.1f}x  (target >= 50x);  60k in {s_all['seconds']:.1f} s (target < 30 s);  "
              f"train peak RSS {rss_tr:.0f} MiB (target < 1024 MiB)")


if __name__ == "__main__":
    main()
