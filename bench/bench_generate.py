"""Benchmark generation: the KV-cached decoder against transformers' `generate` and the no-cache loop.

In one run on one machine, on the imagegpt-small shape (24 layers x 512 wide, 8 heads,
1024 positions) with random weights, at batch 1 and 16:

* ours:      `igpt_cli.generate.Decoder` (preallocated KV cache), bfloat16 where the
             hardware runs it fast (`--dtype auto`), and float32;
* theirs:    `transformers.ImageGPTForCausalImageModeling` in float32 (its default) with its
             own KV cache (`DynamicCache`, grown by concatenation): `generate()` for the
             first tokens of an image, and the same forward + cache calls `generate` makes
             for the later positions;
* no cache:  the original OpenAI sampler's loop, a full forward over the whole prefix for
             every token (our model, same dtype as "ours").

A decode step costs more the further into the image it is (attention reads the cache of
all earlier positions), so whole-image times are extrapolated, and labelled so, from
`--steps` timed steps at the centres of four quarters of the image (the midpoint rule),
with the cache filled with random keys and values. tokens/s over a whole image =
B * 1024 / that time. `generate()` itself is also timed end to end over the first
`--first` tokens of an image, against our `Decoder` over the same tokens.
Utilisation: decode FLOPs (2 x weights + attention over the cache, per token) per second
against the measured bf16 matmul peak of this machine.

    PYTHONPATH=. .venv/bin/python bench/bench_generate.py [--steps 4] [--first 32] [--batches 1,16]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_extract import matmul_peak  # noqa: E402
from igpt_cli.generate import Decoder, Sampling  # noqa: E402
from igpt_cli.generate.decode import cpu_threads_for  # noqa: E402
from igpt_cli.generate.sampling import pick_tokens  # noqa: E402
from igpt_cli.model import IGPT, IGPTConfig, save_pretrained  # noqa: E402
from igpt_cli.model.igpt import KVCache  # noqa: E402
from igpt_cli.runtime import resolve_dtype  # noqa: E402


def window_positions(T: int) -> list[int]:
    return [T // 8 + i * T // 4 for i in range(4)]  # centres of the four quarters


def flops_per_token(cfg: IGPTConfig, pos: int) -> float:
    C = cfg.n_embd
    weights = cfg.n_layer * (4 * C * C + 2 * C * cfg.mlp_width) + C * (cfg.vocab_size - 1)
    return 2 * weights + cfg.n_layer * 4 * pos * C


def ours_step_time(model: IGPT, B: int, pos: int, steps: int) -> float:
    """Seconds per decode step at position `pos` (cache holding `pos` random positions)."""
    cfg = model.config
    dt = next(model.parameters()).dtype
    cache = KVCache(cfg, B, dtype=dt)
    cache.k.normal_(), cache.v.normal_()
    s = Sampling(1.0)
    tok = torch.zeros(B, 1, dtype=torch.long)
    u = torch.rand(B, dtype=torch.float64)
    with torch.inference_mode(), cpu_threads_for(cfg, B, torch.device("cpu"), dt):
        cache.pos = pos
        model(tok, cache, last_only=True)  # warm-up
        cache.pos = pos
        t0 = time.perf_counter()
        for _ in range(steps):
            tok = pick_tokens(model(tok, cache, last_only=True), s, u)[:, None]
        return (time.perf_counter() - t0) / steps


def hf_step_time(hf, B: int, pos: int, steps: int) -> float:
    """The same for transformers: its forward with a DynamicCache of `pos` random positions."""
    from transformers import DynamicCache

    cfg = hf.config
    H, D = cfg.n_head, cfg.n_embd // cfg.n_head

    def filled():
        c = DynamicCache()
        for layer in range(cfg.n_layer):
            c.update(torch.randn(B, H, pos, D), torch.randn(B, H, pos, D), layer)
        return c

    tok = torch.zeros(B, 1, dtype=torch.long)
    with torch.inference_mode():
        hf(input_ids=tok, past_key_values=filled(), use_cache=True)  # warm-up
        cache = filled()
        t0 = time.perf_counter()
        for _ in range(steps):
            out = hf(input_ids=tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
        return (time.perf_counter() - t0) / steps


def nocache_step_time(model: IGPT, B: int, pos: int) -> float:
    """One token of the no-cache loop at position `pos`: a full forward over pos + 1 tokens."""
    idx = torch.randint(0, 512, (B, pos + 1))
    with torch.inference_mode():
        t0 = time.perf_counter()
        pick_tokens(model(idx)[:, -1], Sampling(1.0), torch.rand(B, dtype=torch.float64))
        return time.perf_counter() - t0


def first_tokens(model: IGPT, hf, B: int, n: int) -> tuple[float, float]:
    """tokens/s of our Decoder and of transformers' generate() over the first n tokens of an image."""
    short = IGPT(IGPTConfig(**{**model.config.__dict__, "n_positions": n})).eval().requires_grad_(False)
    short.to(next(model.parameters()).dtype)
    dec = Decoder(short, Sampling(1.0), 0)
    dec.rows(np.zeros((B, n - 2), np.uint16), np.arange(B))  # warm-up
    t0 = time.perf_counter()
    dec.rows(np.zeros((B, 0), np.uint16), np.arange(B))
    ours = B * n / (time.perf_counter() - t0)
    sos = torch.full((B, 1), 512)
    with torch.inference_mode():
        hf.generate(input_ids=sos, do_sample=False, max_new_tokens=2, pad_token_id=0)
        t0 = time.perf_counter()
        hf.generate(input_ids=sos, do_sample=False, max_new_tokens=n, pad_token_id=0)
        theirs = B * n / (time.perf_counter() - t0)
    return ours, theirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="timed decode steps per window")
    ap.add_argument("--first", type=int, default=32, help="tokens timed end to end with generate()")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--n-positions", type=int, default=1024)
    a = ap.parse_args()
    from transformers import ImageGPTForCausalImageModeling

    torch.manual_seed(0)
    cfg = IGPTConfig(n_positions=a.n_positions)
    fp32 = IGPT(cfg).eval().requires_grad_(False)
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(fp32, d)
        hf = ImageGPTForCausalImageModeling.from_pretrained(d, dtype=torch.float32).eval()
    auto = resolve_dtype("auto", torch.device("cpu"))   # bf16 where the CPU has it: timed next to float32
    fast = IGPT(cfg).eval().requires_grad_(False)
    fast.load_state_dict(fp32.state_dict())
    fast.to(auto)
    T, pos = cfg.n_positions, window_positions(cfg.n_positions)
    peak = {"bfloat16": matmul_peak(torch.bfloat16), "float32": matmul_peak(torch.float32)}
    rows = []
    for B in map(int, a.batches.split(",")):
        per = {}
        for name, fn in (("ours " + str(auto).removeprefix("torch."), lambda p: ours_step_time(fast, B, p, a.steps)),
                         ("ours float32", lambda p: ours_step_time(fp32, B, p, a.steps)),
                         ("transformers float32", lambda p: hf_step_time(hf, B, p, a.steps)),
                         ("no cache " + str(auto).removeprefix("torch."), lambda p: nocache_step_time(fast, B, p))):
            steps = [fn(p) for p in pos]
            image_s = T / 4 * sum(steps)  # midpoint rule over the four quarters
            flops = sum(flops_per_token(cfg, p) for p in pos) / 4 * B
            per[name] = dict(image_s=image_s, tokens_per_s=B * T / image_s,
                             util_bf16=flops / (image_s / T) / (peak["bfloat16"] * 1e9))
            print(f"B={B} {name}: whole image {image_s:.1f} s (extrapolated), {B * T / image_s:.1f} tokens/s",
                  file=sys.stderr, flush=True)
        o, t = first_tokens(fast, hf, B, a.first)
        rows.append(dict(batch=B, systems=per, first_tokens=dict(n=a.first, ours_tokens_per_s=o,
                                                                   generate_tokens_per_s=t)))
        print(f"B={B} first {a.first} tokens end to end: ours {o:.1f} tokens/s, transformers generate() "
              f"{t:.1f} tokens/s", file=sys.stderr, flush=True)
    kv = {B: KVCache.bytes_for(cfg, B, auto) for B in map(int, a.batches.split(","))}
    print(json.dumps(dict(peak_gflops=peak, kv_cache_bytes=kv, results=rows), indent=1))
    print("\n| batch | run | whole image (s, extrapolated) | tokens/s | vs transformers | vs no cache | "
          "% of bf16 peak |\n| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        s = r["systems"]
        hf_s, nc = s["transformers float32"]["image_s"], s[next(k for k in s if k.startswith("no cache"))]["image_s"]
        for name, v in s.items():
            print(f"| {r['batch']} | {name} | {v['image_s']:.1f} | {v['tokens_per_s']:.1f} | "
                  f"{hf_s / v['image_s']:.2f}× | {nc / v['image_s']:.1f}× | {100 * v['util_bf16']:.0f} % |")


if __name__ == "__main__":
    main()
