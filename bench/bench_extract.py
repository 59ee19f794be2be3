"""Benchmark `igpt extract` against what a user would otherwise write with transformers.

In one run on one machine, on the imagegpt-small shape (24 layers x 512 wide, 8 heads,
1024 positions) with random weights and the same random images:

* ours:   `igpt_cli.extract.extract_features` (the library function behind `igpt extract`),
          all 25 layers, --dtype auto (bf16 where the hardware runs it fast) and float32,
          and --layer 12 (early exit);
* theirs: `transformers.ImageGPTModel.from_pretrained(dir)` in float32 with
          `output_hidden_states=True`, features = mean over positions of each hidden state.

Prints images/s of each, the ratios, and model FLOP utilisation against the measured
bf16 and fp32 matmul peaks of this machine (best of a few GEMM shapes).
FLOPs per image (forward): 2 * (non-embedding weights) * T + 4 * L * T^2 * C
(nanoGPT's convention: full, not causal-halved, attention).

    PYTHONPATH=. .venv/bin/python bench/bench_extract.py [--images 8] [--batch-size 8]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from igpt_cli import formats  # noqa: E402
from igpt_cli.extract import extract_features  # noqa: E402
from igpt_cli.runtime import resolve_dtype  # noqa: E402
from igpt_cli.model import IGPT, IGPTConfig, save_pretrained  # noqa: E402


def matmul_peak(dtype: torch.dtype, seconds: float = 1.5) -> float:
    """Best GFLOP/s over GEMM shapes like the model's (tokens x 512 x 2048, …)."""
    best = 0.0
    for m, k, n in ((8192, 512, 2048), (8192, 2048, 512), (4096, 1024, 1024), (2048, 2048, 2048)):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        for _ in range(2):
            a @ b
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 4:
            a @ b
            reps += 1
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9)
    return best


def flops_per_image(cfg: IGPTConfig, depth: int) -> float:
    T, C = cfg.n_positions, cfg.n_embd
    per_layer_weights = 4 * C * C + 2 * C * cfg.mlp_width
    return depth * (2 * per_layer_weights * T + 4 * T * T * C)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--skip-fp32", action="store_true", help="skip our float32 run")
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = IGPTConfig(vocab_size=513, n_positions=1024, n_embd=512, n_layer=24, n_head=8)
    n = args.images
    print(f"machine: {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"auto dtype {resolve_dtype('auto', torch.device('cpu'))}", flush=True)
    peak_bf16, peak_fp32 = matmul_peak(torch.bfloat16), matmul_peak(torch.float32)
    print(f"measured matmul peak: bf16 {peak_bf16:.0f} GFLOP/s, fp32 {peak_fp32:.0f} GFLOP/s", flush=True)

    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        save_pretrained(IGPT(cfg), td / "model")
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, 512, (n, 1024)).astype(np.uint16)
        with h5py.File(td / "tokens.h5", "w") as f:
            formats.create_tokens_file(f, height=32, width=32, palette=np.zeros((512, 3), np.float32),
                                       class_names=[], split="bench", source="random", resize="none")
            formats.append_rows(f, tokens=tokens, labels=np.full(n, -1),
                                sources=np.array([str(i) for i in range(n)], dtype=object))

        def ours(layers, dtype, tag):
            # warm-up (oneDNN kernel selection) on one image, then the timed run
            extract_features(td / "tokens.h5", td / "model", layers, td / f"w-{tag}.h5", dtype=dtype,
                             limit=1, overwrite=True)
            s = extract_features(td / "tokens.h5", td / "model", layers, td / f"{tag}.h5", dtype=dtype,
                                 batch_size=args.batch_size, overwrite=True)
            return s.to_dict()

        results = {}
        s = ours("all", "auto", "all")
        results["ours_all"] = s
        print(f"ours  all 25 layers, {s['compute_dtype']}, batch {s['batch_size']}: "
              f"{s['images_per_s']:.3f} img/s", flush=True)
        s12 = ours("12", "auto", "l12")
        results["ours_l12"] = s12
        print(f"ours  --layer 12,    {s12['compute_dtype']}, batch {s12['batch_size']}: "
              f"{s12['images_per_s']:.3f} img/s", flush=True)
        if not args.skip_fp32:
            s32 = ours("all", "float32", "fp32")
            results["ours_fp32"] = s32
            print(f"ours  all 25 layers, float32, batch {s32['batch_size']}: {s32['images_per_s']:.3f} img/s",
                  flush=True)

        # --- transformers, float32, the obvious code --------------------------------
        from transformers import ImageGPTModel

        hf = ImageGPTModel.from_pretrained(td / "model").eval()
        idx = torch.from_numpy(tokens.astype(np.int64))
        idx = torch.cat([torch.full_like(idx[:, :1], 512), idx[:, :-1]], dim=1)
        hb = args.batch_size or 8
        with torch.no_grad():
            hf(input_ids=idx[:1], output_hidden_states=True)  # warm-up
            t0 = time.perf_counter()
            feats = []
            for i in range(0, n, hb):
                hs = hf(input_ids=idx[i:i + hb], output_hidden_states=True).hidden_states
                feats.append(torch.stack([h.mean(1) for h in hs], 1))
            hf_s = time.perf_counter() - t0
        hf_ips = n / hf_s
        print(f"transformers ImageGPTModel float32 (attn={hf.config._attn_implementation}), batch {hb}: "
              f"{hf_ips:.3f} img/s", flush=True)

        # sanity: ours (auto dtype) agrees with transformers' resid features at layer 12
        with h5py.File(td / "all.h5") as f:
            ours_l24 = f["features/24"][:]
        hf_l24 = torch.cat(feats)[:, 24].numpy()
        cos = float(np.mean((ours_l24 * hf_l24).sum(1) / np.linalg.norm(ours_l24, axis=1)
                            / np.linalg.norm(hf_l24, axis=1)))

    ips = results["ours_all"]["images_per_s"]
    fl_all, fl_12 = flops_per_image(cfg, 24), flops_per_image(cfg, 12)
    peak = peak_bf16 if results["ours_all"]["compute_dtype"] == "bfloat16" else peak_fp32
    summary = {
        "images": n,
        "ours_all_img_s": ips,
        "ours_layer12_img_s": results["ours_l12"]["images_per_s"],
        "ours_fp32_all_img_s": results.get("ours_fp32", {}).get("images_per_s"),
        "transformers_fp32_img_s": round(hf_ips, 3),
        "speedup_vs_transformers": round(ips / hf_ips, 2),
        "early_exit_speedup_layer12": round(results["ours_l12"]["images_per_s"] / ips, 2),
        "gflop_per_image_all": round(fl_all / 1e9, 1),
        "peak_bf16_gflops": round(peak_bf16, 1),
        "peak_fp32_gflops": round(peak_fp32, 1),
        "ours_achieved_gflops": round(ips * fl_all / 1e9, 1),
        "ours_mfu_vs_own_dtype_peak": round(ips * fl_all / 1e9 / peak, 3),
        "ours_mfu_vs_bf16_peak": round(ips * fl_all / 1e9 / peak_bf16, 3),
        "ours_fp32_mfu_vs_fp32_peak": (round(results["ours_fp32"]["images_per_s"] * fl_all / 1e9 / peak_fp32, 3)
                                       if "ours_fp32" in results else None),
        "transformers_mfu_vs_fp32_peak": round(hf_ips * fl_all / 1e9 / peak_fp32, 3),
        "ours_layer12_mfu": round(results["ours_l12"]["images_per_s"] * fl_12 / 1e9 / peak, 3),
        "last_layer_cosine_ours_vs_transformers": round(cos, 5),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
