"""A decode step against the memory bandwidth measured in the same run.

A cached decode step (one token per row) must read every weight once and the keys and
values of all earlier positions once; at small batches nothing else matters, so its floor
is (weight bytes + cache bytes read) / memory bandwidth. This script measures, in one run:
the machine (`lscpu` model name, `uptime`), the bandwidth of a large `copy_` (bytes read +
written per second, median of several), then the decode step of `igpt_cli`'s model
(imagegpt-small shape: 24 x 512, 8 heads, 1,024 positions, random weights; the step the
`Decoder` runs: model forward with the KV cache, LM head on the last position, then
`pick_tokens` with top-k 50 / top-p 0.9 sampling) at batch 1 and 16 and at three positions
(cache filled with random keys and values; the Decoder's own cache, so its dtype), median of
`--steps` steps, as bytes moved per second and % of the measured bandwidth. On a shared
machine run it with OMP_NUM_THREADS=1: a busy machine makes every multi-threaded step wait
for its slowest thread. `--static`: the fixed-shape (CUDA-graph-ready) cache.
`--profile`: the top ops of a batch-1 step. `--code DIR` imports igpt_cli from another
checkout (e.g. the main branch: "before").

    PYTHONPATH=. python bench/bench_decode.py [--batches 1,16] [--dtypes bfloat16,float32] [--steps 9]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_features import machine  # noqa: E402


def copy_bandwidth(torch, mib: int = 512, reps: int = 7) -> float:
    """Bytes/s of `dst.copy_(src)` over `mib` MiB (read + write), median of `reps`."""
    src = torch.randn(mib << 18)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--positions", default="256,512,768")
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--static", action="store_true", help="the static (fixed-shape) KV cache")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--code", default=str(Path(__file__).resolve().parents[1]), help="checkout to import igpt_cli from")
    args = ap.parse_args()
    sys.path.insert(0, args.code)
    import torch

    from igpt_cli.generate.decode import Decoder, cpu_threads_for
    from igpt_cli.generate.sampling import Sampling, pick_tokens
    from igpt_cli.model import IGPT, IGPTConfig

    bw = copy_bandwidth(torch)
    info = machine() | {"threads": torch.get_num_threads(), "torch": torch.__version__, "code": args.code,
                        "copy_bandwidth_gb_s": round(bw / 1e9, 2)}
    print(json.dumps(info), flush=True)
    torch.manual_seed(0)
    cfg = IGPTConfig(vocab_size=513, n_positions=1024, n_embd=512, n_layer=24, n_head=8)
    sampling = Sampling(1.0, 50, 0.9)
    rows = []
    for dt_name in args.dtypes.split(","):
        dt = getattr(torch, dt_name)
        model = IGPT(cfg).to(dt).eval().requires_grad_(False)
        elt = torch.finfo(dt).bits // 8
        weight_bytes = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("wte", "wpe"))) * elt
        for B in (int(b) for b in args.batches.split(",")):
            dec = Decoder(model, sampling)  # the cache the Decoder itself uses (its dtype: `cache_dtype_for`)
            if args.static:
                dec.static_cache = True
            cache = dec.cache_for(B)
            cache.k.normal_()
            cache.v.normal_()
            tok = torch.randint(0, 512, (B, 1))
            u = torch.rand(B, dtype=torch.float64)
            for pos in (int(p) for p in args.positions.split(",")):
                times = []
                with torch.inference_mode(), cpu_threads_for(cfg, B, torch.device("cpu"), dt):
                    for s in range(args.steps + 1):
                        cache.pos = pos
                        if args.static:
                            cache.position.fill_(pos)
                        t0 = time.perf_counter()
                        logits = model(tok, cache, last_only=True)
                        tok = pick_tokens(logits, sampling, u)[:, None]
                        if s:  # the first is a warm-up
                            times.append(time.perf_counter() - t0)
                t = statistics.median(times)
                read_len = cfg.n_positions if args.static else pos + 1
                kv_bytes = 2 * cfg.n_layer * B * read_len * cfg.n_embd * cache.k.element_size()
                moved = weight_bytes + kv_bytes
                row = {"dtype": dt_name, "cache_dtype": str(cache.k.dtype).removeprefix("torch."), "batch": B,
                       "position": pos, "static": args.static,
                       "step_ms": round(1e3 * t, 2), "tokens_per_s": round(B / t, 1),
                       "mbytes_per_step": round(moved / 1e6, 1), "gb_s": round(moved / t / 1e9, 2),
                       "pct_bandwidth": round(100 * moved / t / bw, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        model = IGPT(cfg).to(torch.bfloat16).eval().requires_grad_(False)
        cache = Decoder(model, sampling).cache_for(1)
        tok = torch.randint(0, 512, (1, 1))
        with torch.inference_mode(), cpu_threads_for(cfg, 1, torch.device("cpu"), torch.bfloat16):
            cache.pos = 512
            model(tok, cache, last_only=True)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    cache.pos = 512
                    pick_tokens(model(tok, cache, last_only=True), sampling, torch.rand(1, dtype=torch.float64))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
    print(json.dumps({"machine": info, "rows": rows}))


if __name__ == "__main__":
    main()
