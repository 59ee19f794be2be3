"""Benchmark `igpt train`: tokens/s and the share of this CPU's bf16 matmul peak (MFU), 1 process
vs 2 ranks under torchrun (gloo), on the shipped model's shape (8 blocks x 192, 6 heads, 8x8 images).

The peak is measured in the same run: the median time of 2048^3 bf16 matmuls (torch.mm under
the same thread count a configuration uses: 1 thread, 2 threads). Model FLOPs per token are
6 * N + 12 * L * T * C (the PaLM count: N = parameters inside matmuls, i.e. all but the token
and position embeddings; the second term the attention scores and values, forward and
backward, counted over the full T x T square). Training throughput is the median of
`tokens_per_s` over the logged windows of `OUT/metrics.jsonl` (the first window, warm-up,
is left out); the global batch and every other flag are the same in every configuration.
MFU = FLOPs/token x tokens/s / (peak of one thread x threads in use).

    PYTHONPATH=. .venv/bin/python bench/bench_train.py [--steps 60] [--batch-size 64] [--dtype bfloat16]
    # imagegpt-small's shape, one process on both threads:
    PYTHONPATH=. .venv/bin/python bench/bench_train.py --depth 24 --width 512 --heads 8 --side 32 \
        --batch-size 2 --steps 6 --log-every 1 --configs 1x2

Prints a table; run it on an idle machine (it says the load average it started under).
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

import h5py
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from igpt_cli import formats  # noqa: E402
from igpt_cli.model import IGPT, IGPTConfig  # noqa: E402


def matmul_peak(threads: int, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of n^3 matmuls in `dtype` on `threads` threads (median of `repeats`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t0)
        return 2 * n ** 3 / statistics.median(times)
    finally:
        torch.set_num_threads(before)


def flops_per_token(cfg: IGPTConfig) -> float:
    model = IGPT(cfg)
    n = sum(p.numel() for name, p in model.named_parameters() if not name.startswith(("wte", "wpe")))
    return 6 * n + 12 * cfg.n_layer * cfg.n_positions * cfg.n_embd


def make_tokens(path: Path, n: int, side: int) -> None:
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        formats.create_tokens_file(f, height=side, width=side, palette=rng.uniform(-1, 1, (512, 3)),
                                   class_names=["a"], split="train", source="random", resize="none")
        formats.append_rows(f, tokens=rng.integers(0, 512, (n, side * side)).astype(np.uint16),
                            labels=np.zeros(n, dtype=np.int64), sources=np.array([f"{i}" for i in range(n)], dtype=object))


def train(tokens: Path, out: Path, procs: int, threads: int, args) -> float:
    flags = ["train", str(tokens), "-o", str(out), "--depth", str(args.depth), "--width", str(args.width),
             "--heads", str(args.heads), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
             "--log-every", str(args.log_every), "--eval-every", str(10 * args.steps), "--checkpoint-every",
             str(10 * args.steps), "--dtype", args.dtype, "--quiet"]
    launcher = [sys.executable, "-m", "igpt_cli"] if procs == 1 else \
        [str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc-per-node={procs}", "-m",
         "igpt_cli"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    r = subprocess.run([*launcher, *flags], capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit(f"failed: {' '.join(launcher + flags)}\n{r.stderr[-3000:]}")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(rec["tokens_per_s"] for rec in lines[1:-1] or lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--width", type=int, default=192)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--side", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--configs", default="1x1,1x2,2x1", help="processes x threads, e.g. 1x2 (comma-separated)")
    args = ap.parse_args()
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if line.startswith("Model name")), "?")
    print(f"CPU: {cpu}; {os.cpu_count()} cores; load average at start {os.getloadavg()[0]:.2f}; torch {torch.__version__}")
    dt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    peak1 = matmul_peak(1, torch.bfloat16)
    peak2 = matmul_peak(2, torch.bfloat16)
    print(f"bf16 matmul peak (2048^3): {peak1 / 1e9:.1f} GFLOP/s on 1 thread, {peak2 / 1e9:.1f} on 2 threads"
          + (f"; {args.dtype} on 1 thread: {matmul_peak(1, dt) / 1e9:.1f}" if dt != torch.bfloat16 else ""))
    cfg = IGPTConfig(vocab_size=513, n_positions=args.side ** 2, n_embd=args.width, n_layer=args.depth,
                     n_head=args.heads)
    fpt = flops_per_token(cfg)
    print(f"model {args.depth}x{args.width} at {args.side}x{args.side}: {fpt / 1e6:.1f} MFLOP per token; "
          f"global batch {args.batch_size}, {args.steps} steps, {args.dtype} autocast")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "t.h5"
        make_tokens(tokens, max(4 * args.batch_size, 256), args.side)
        for procs, threads in configs:
            tps = train(tokens, Path(tmp) / f"run-{procs}x{threads}", procs, threads, args)
            peak = peak1 * procs * threads
            rows.append((f"{procs} process{'es' if procs > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}",
                         tps, fpt * tps / 1e9, 100 * fpt * tps / peak))
    print("\n| configuration | tokens/s | GFLOP/s | MFU (vs bf16 peak of the threads used) |")
    print("| --- | ---: | ---: | ---: |")
    for name, tps, gf, mfu in rows:
        print(f"| {name} | {tps:,.0f} | {gf:.1f} | {mfu:.1f} % |")
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
