"""How close `features_from_tokens` runs to this machine's matmul peak (model FLOP utilisation).

In one run: the machine (`lscpu` model name, `uptime` load), the bf16 and fp32 matmul peaks
measured with 2048^3 products (median of several), then `igpt_cli.features_from_tokens` on the
imagegpt-small shape (24 layers x 512, 8 heads, 1,024 tokens, all 25 layers, random weights)
in bfloat16 and float32, eager and (`--compile`) through `torch.compile`, each the median of
`--reps` timed calls after one warm-up call (whose time, for the compiled path, is the
first-call cost), as images/s and % of the same dtype's peak and of the bf16 peak.
`--profile`: the top ops of one bf16 batch (`torch.profiler`).
FLOPs per image (forward): 2 * (non-embedding weights) * T + 4 * L * T^2 * C (nanoGPT's
convention: full, not causal-halved, attention).

`--code DIR` imports igpt_cli from another checkout (e.g. the main branch: "before").

    PYTHONPATH=. python bench/bench_features.py [--images 16] [--reps 3] [--compile] [--profile]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def machine() -> dict:
    name = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "?")
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {"cpu": name, "uptime": load}


def matmul_peak(torch, dtype, reps: int = 5) -> float:
    """Median GFLOP/s of 2048^3 products in `dtype`."""
    n = 2048
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def flops_per_image(cfg) -> float:
    T, C = cfg.n_positions, cfg.n_embd
    return cfg.n_layer * (2 * (4 * C * C + 2 * C * cfg.mlp_width) * T + 4 * T * T * C)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--compile", action="store_true", help="also time the torch.compile'd blocks")
    ap.add_argument("--profile", action="store_true", help="top ops of one bf16 batch of 4 images")
    ap.add_argument("--code", default=str(Path(__file__).resolve().parents[1]), help="checkout to import igpt_cli from")
    args = ap.parse_args()
    sys.path.insert(0, args.code)
    import numpy as np
    import torch

    from igpt_cli import features_from_tokens
    from igpt_cli.model import IGPT, IGPTConfig

    info = machine() | {"threads": torch.get_num_threads(), "torch": torch.__version__, "code": args.code}
    peaks = {"bfloat16": matmul_peak(torch, torch.bfloat16), "float32": matmul_peak(torch, torch.float32)}
    print(json.dumps(info | {"peak_gflops": {k: round(v) for k, v in peaks.items()}}), flush=True)
    torch.manual_seed(0)
    cfg = IGPTConfig(vocab_size=513, n_positions=1024, n_embd=512, n_layer=24, n_head=8)
    tokens = np.random.default_rng(0).integers(0, 512, (args.images, 1024)).astype(np.uint16)
    fl = flops_per_image(cfg) * args.images
    rows = []
    for dt in args.dtypes.split(","):
        for compiled in ([False, True] if args.compile else [False]):
            model = IGPT(cfg).to(getattr(torch, dt)).eval().requires_grad_(False)
            kw = dict(batch_size=args.images, pool="mean")
            if compiled:
                kw["compile"] = True
            t0 = time.perf_counter()
            features_from_tokens(tokens, model, "all", **kw)  # warm-up (and compilation)
            first = time.perf_counter() - t0
            times = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                features_from_tokens(tokens, model, "all", **kw)
                times.append(time.perf_counter() - t0)
            t = statistics.median(times)
            row = {"dtype": dt, "compiled": compiled, "images_per_s": round(args.images / t, 3),
                   "seconds": [round(x, 2) for x in times], "first_call_s": round(first, 1),
                   "gflops": round(fl / t / 1e9), "pct_own_peak": round(100 * fl / t / 1e9 / peaks[dt], 1),
                   "pct_bf16_peak": round(100 * fl / t / 1e9 / peaks["bfloat16"], 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        model = IGPT(cfg).to(torch.bfloat16).eval().requires_grad_(False)
        features_from_tokens(tokens[:4], model, "all", batch_size=4)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            features_from_tokens(tokens[:4], model, "all", batch_size=4)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    print(json.dumps({"machine": info, "peaks": peaks, "rows": rows}))


if __name__ == "__main__":
    main()
