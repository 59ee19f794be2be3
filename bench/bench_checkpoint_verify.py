"""What verifying a cached TensorFlow checkpoint costs on every use, next to an extraction.

`--model PREFIX` (an OpenAI checkpoint) checks, each time, the CRC32C of every tensor the model is
made of (memory-mapped shards, `tf_checkpoint.masked_crc32c`) and the SHA-256 of the cached
`model.safetensors` (`formats.sha256_file`), so both scale with the model's size. This measures
both on a synthetic file of `--mb` MB (default 500; iGPT-S is ~300 MB of model tensors, iGPT-L
~5.4 GB), twice (the second read comes from the page cache, as it does when a model is used
often), and one forward pass of iGPT-S's shape (24 x 512, 1024 positions, float32) per image on
this machine's CPU, the unit of an extraction. Prints medians.

    PYTHONPATH=. .venv/bin/python bench/bench_checkpoint_verify.py [--mb 500] [--images 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from igpt_cli.formats import sha256_file
from igpt_cli.model import IGPT, IGPTConfig
from igpt_cli.model.tf_checkpoint import masked_crc32c


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=500)
    ap.add_argument("--images", type=int, default=2)
    a = ap.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if line.startswith("Model name")), "?")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "shard"
        with open(path, "wb") as f:
            for _ in range(a.mb):
                f.write(os.urandom(1 << 20))
        crc = timed(lambda: masked_crc32c(np.memmap(path, dtype=np.uint8, mode="r")), 3)
        sha = timed(lambda: sha256_file(path), 3)
    cfg = IGPTConfig(vocab_size=513, n_positions=1024, n_embd=512, n_layer=24, n_head=8)
    model = IGPT(cfg).eval()
    idx = torch.randint(0, 512, (1, 1024))
    with torch.inference_mode():
        model.forward_intermediates(idx, [12])  # warm-up
        fwd = timed(lambda: model.forward_intermediates(idx, list(range(cfg.n_layer + 1))), a.images)
    mb = a.mb
    print(f"machine: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    print(f"CRC32C of {mb} MB (memory-mapped): median {statistics.median(crc):.2f} s "
          f"({mb / statistics.median(crc):.0f} MB/s); runs {', '.join(f'{t:.2f}' for t in crc)}")
    print(f"SHA-256 of {mb} MB:                median {statistics.median(sha):.2f} s "
          f"({mb / statistics.median(sha):.0f} MB/s); runs {', '.join(f'{t:.2f}' for t in sha)}")
    per_image = statistics.median(fwd)
    both = statistics.median(crc) + statistics.median(sha)
    print(f"iGPT-S-shaped forward, 1 image of 32x32, float32: median {per_image:.2f} s")
    print(f"verification of {mb} MB costs as much as extracting {both / per_image:.2f} images")


if __name__ == "__main__":
    main()
