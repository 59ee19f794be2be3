"""Extraction throughput of the shipped model on real tokens: images/s, median of `--repeats` runs.

Measures `extract_features` (the library function behind `igpt extract`) end to end on a
tokens file — model forward, the host copy of every tapped layer, the HDF5 writes — for
all layers of the shipped `igpt-cifar8` (64 tokens, 8 layers x 192), with the automatic
batch size unless `--batch-size` is given. Prints the CPU model (`lscpu`), the load
average before and after (the machine may be shared), each run's images/s and the median.

    igpt quantize /work/shared/data/cifar10-jpeg.tar --split test --size 8 --limit 2000 -o cifar8.h5
    PYTHONPATH=. python bench/bench_extract_overlap.py cifar8.h5 [--pool mean] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from igpt_cli.extract import extract_features  # noqa: E402


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                "unknown")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tokens")
    ap.add_argument("--model", default="igpt-cifar8")
    ap.add_argument("--pool", default="mean")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    kw = {} if args.pool == "mean" else {"pool": args.pool}
    rates, seconds, bs = [], [], None
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            out = Path(tmp) / f"f{r}.h5"
            t0 = time.perf_counter()
            res = extract_features(args.tokens, args.model, None, out, batch_size=args.batch_size,
                                   device=args.device, **kw)
            seconds.append(time.perf_counter() - t0)
            rates.append(res.n / seconds[-1])
            bs = res.batch_size
            out.unlink()
    print(json.dumps({"cpu": cpu_name(), "torch_threads": __import__("torch").get_num_threads(),
                      "loadavg_before": load0, "loadavg_after": os.getloadavg(), "model": args.model,
                      "pool": args.pool, "batch_size": bs, "images_per_s": [round(x, 1) for x in rates],
                      "median_images_per_s": round(statistics.median(rates), 1),
                      "median_seconds": round(statistics.median(seconds), 3)}, indent=1))


if __name__ == "__main__":
    main()
