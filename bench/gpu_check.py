"""One command that runs every GPU path of igpt and prints one table (issues 19 and 24).

    python bench/gpu_check.py [--data CIFAR10_TAR_OR_DIR] [--budget 480] [--only a,b] [--json OUT]
    python bench/gpu_check.py --cpu-dry-run [--only a,b]   # the same checks on the CPU, tiny shapes
    make gpu-check

On one CUDA device, in under 8 minutes (`--budget`, seconds: checks that would start later are
reported as skipped), it checks, each as rows of one table (check, pass/fail/skip/info, measured
value, threshold):

- env: card, compute capability, torch/CUDA/cuDNN/NCCL versions, bf16 with and without
  emulation, igpt's automatic dtype, the precision API; `peak`: the card's bf16 matmul peak,
  measured in this run (the denominator of every MFU below).
- features: `igpt features` on >= 4,096 CIFAR-10 images (real JPEGs, end to end).
- hf-parity: `extract` in bfloat16 and float32 vs transformers' ImageGPT in float32.
- numerics: CPU fp32 vs CUDA fp32 vs CUDA bf16 features and scores on the shipped model, and
  (issue 24 item 9) bf16 weights vs autocast with a float32 residual stream: features and
  linear-probe accuracy of each; cached vs full logits; flash attention in bf16.
- probe: the torch probe solver on CUDA vs CPU at tol 1e-4 and 1e-6, `--jobs 2` = `--jobs 1`,
  the same C and accuracy on both devices, the TF32 state after.
- generate: score and greedy samples CUDA vs CPU, the same seed twice.
- repro: the reproducibility promises (README "Reproducibility"), each measured with and without
  IGPT_DETERMINISTIC=1: samples at batch 8 vs 64, a float32 training run resumed vs uninterrupted.
- syncs: `torch.cuda.set_sync_debug_mode("warn")` over one extract batch, one sampling run and
  one probe fit: where the host waits for the GPU.
- train: 30 bf16 and 50 fp16 steps (finite, falling loss, tokens/s, MFU); `--grad-accum 2` =
  the full batch; 2-rank `train` on one GPU.
- torchrun: `extract` with 1 rank (bytes = one process), 2 ranks on one GPU, and `--device
  cuda:0` with 2 ranks (refused in one line).
- large: a random iGPT-L-shaped model (48 x 1536, T = 1024, bf16): automatic batch sizes, one
  extraction batch, prefill + 32 decode steps, peak memory.
- pytest-gpu: the tests marked `gpu`.

Everything goes through the command line and the public Python API (`extract_features`,
`features_from_tokens`, `score_images`, `sample_images`, `complete_file`, `probe_layer`,
`probe_files`, `LinearProbe`, `pretrain`, `IGPT`), so the check survives changes inside. A flag
that does not exist yet is reported as "skip (flag missing)". On a machine without CUDA it says so
in one line and exits 0; `--cpu-dry-run` runs the same code on the CPU at tiny shapes, with the
CPU standing in for the GPU (its comparisons are then CPU vs CPU: it tests the script, not a GPU).
Exit status: 1 if any check failed, else 0. Long by nature: one file so that it can be copied
to a GPU machine and run as is (about 1,100 lines).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SHIPPED = "igpt-cifar8"


# ---------------------------------------------------------------------------
# rows, checks, context
# ---------------------------------------------------------------------------
@dataclass
class Row:
    check: str
    status: str  # pass | fail | skip | info
    value: str = ""
    threshold: str = ""


class Skip(Exception):
    """This check cannot run here; the message says why."""


CHECKS: list[tuple[str, Callable]] = []


def check(name: str):
    def register(fn):
        CHECKS.append((name, fn))
        return fn
    return register


@dataclass
class Sizes:
    """Shapes of a GPU run, or of a CPU dry run (tiny)."""
    train_per_class: int
    test_per_class: int
    peak_n: int
    parity_model: tuple  # (layers, width, heads, side) of the random transformers model
    parity_rows: int
    probe_layers: int  # layers probed per variant (the last ones)
    gen_rows: int
    train_model: tuple  # (depth, width, heads, batch)
    resume_steps: int
    torchrun_rows: int
    large_model: tuple  # (layers, width, heads, side)
    large_rows: int


GPU_SIZES = Sizes(train_per_class=410, test_per_class=100, peak_n=8192, parity_model=(24, 512, 8, 32), parity_rows=64,
                  probe_layers=3, gen_rows=64, train_model=(8, 512, 8, 128), resume_steps=20, torchrun_rows=1000,
                  large_model=(48, 1536, 16, 32), large_rows=520)
DRY_SIZES = Sizes(train_per_class=4, test_per_class=3, peak_n=256, parity_model=(2, 32, 2, 4), parity_rows=6,
                  probe_layers=2, gen_rows=8, train_model=(2, 32, 2, 8), resume_steps=6, torchrun_rows=30,
                  large_model=(2, 32, 2, 4), large_rows=5)


@dataclass
class Ctx:
    dry: bool
    dev: str  # "cuda" or (dry run) "cpu"
    tmp: Path
    data: Path | None
    sizes: Sizes
    deadline: float
    peak_flops: float | None = None
    art: dict = field(default_factory=dict)  # artifacts shared between checks

    @property
    def cuda(self) -> bool:
        return self.dev == "cuda"

    def env(self, **extra) -> dict:
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        if self.dry:
            env["OMP_NUM_THREADS"] = "1"
        return env

    def run(self, args: list, *, torchrun: int = 0, env: dict | None = None, timeout: float = 300):
        """`igpt ARGS` (or under torchrun with k ranks) in a real process."""
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}"] \
            if torchrun else [sys.executable]
        cmd = [*launcher, "-m", "igpt_cli", *map(str, args)]
        return subprocess.run(cmd, capture_output=True, text=True, env=self.env(**(env or {})),
                              timeout=max(10, min(timeout, self.deadline - time.time() + 60)))


def last_json(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError("no JSON on stdout")
    return json.loads(lines[-1])


def error_lines(stderr: str) -> list[str]:
    """Distinct lines that say `error`, without torchrun's own report of failed workers."""
    keep = []
    for ln in stderr.splitlines():
        if "rror" in ln and not re.search(r"torch\.distributed|elastic|ChildFailedError|Traceback|^\s*File ", ln) \
                and ln.strip() not in keep:
            keep.append(ln.strip())
    return keep


def failure(r: subprocess.CompletedProcess) -> str:
    """What a failed command said: its last error line, else the end of its stderr."""
    return (error_lines(r.stderr) or [r.stderr.strip()[-150:] or f"exit status {r.returncode}"])[-1][:160]


def one_line(e: BaseException) -> str:
    msg = " ".join(f"{type(e).__name__}: {e}".split())
    return msg if len(msg) <= 160 else msg[:157] + "…"


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def max_rel(feats: dict, ref: dict) -> tuple[float, int]:
    worst = max(ref, key=lambda k: rel(feats[k], ref[k]))
    return rel(feats[worst], ref[worst]), worst


def verdict(ok: bool) -> str:
    return "pass" if ok else "fail"


def sync(ctx: Ctx) -> None:
    if ctx.cuda:
        torch.cuda.synchronize()


# --- FLOPs (the usual 2 per multiply-add; causal attention counts its lower half) -------------------
def forward_flops(layers: int, width: int, T: int, *, head: bool = False, vocab: int = 512) -> float:
    per_layer = 24 * width * width * T + 2 * T * T * width
    return layers * per_layer + (2 * T * width * vocab if head else 0)


def mfu(ctx: Ctx, flops_per_s: float) -> str:
    if not ctx.peak_flops:
        return ""
    return f", MFU {100 * flops_per_s / ctx.peak_flops:.1f}%"


# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------
def find_data(given: str | None) -> Path | None:
    """The CIFAR-10 JPEG tar: --data (a tar or a directory holding it), $IGPT_SHARED/data, ../shared/data."""
    roots = [Path(given)] if given else []
    if os.environ.get("IGPT_SHARED"):
        roots.append(Path(os.environ["IGPT_SHARED"]) / "data")
    roots += [ROOT.parent / "shared" / "data", ROOT / "shared" / "data"]
    for r in roots:
        p = r if r.suffix == ".tar" else r / "cifar10-jpeg.tar"
        if p.is_file():
            return p
    return None


def token_file(path: Path, n: int, side: int, *, seed: int = 0, colours: int = 512, palette=None) -> Path:
    """A tokens file of n random side x side images (labels 0..9); `colours` < 512 gives a learnable one."""
    import h5py

    from igpt_cli import formats

    rng = np.random.default_rng(seed)
    pal = palette if palette is not None else rng.uniform(-1, 1, (512, 3)).astype(np.float32)
    with h5py.File(path, "w") as f:
        formats.create_tokens_file(f, height=side, width=side, palette=pal, class_names=[str(i) for i in range(10)],
                                   split="train", source="random", resize="none")
        formats.append_rows(f, tokens=rng.integers(0, colours, (n, side * side)).astype(np.uint16),
                            labels=rng.integers(0, 10, n), sources=np.array([f"{i}" for i in range(n)], dtype=object))
    return path


def read_tokens(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import h5py

    with h5py.File(path, "r") as f:
        return f["tokens"][:], f["labels"][:]


def read_features(path: Path) -> dict[int, np.ndarray]:
    import h5py

    with h5py.File(path, "r") as f:
        return {int(k): v[:] for k, v in f["features"].items()}


def shipped_dir() -> Path:
    from igpt_cli import resolve_model_dir

    return Path(resolve_model_dir(SHIPPED))


def model_tokens(ctx: Ctx, split: str = "test") -> tuple[Path, bool]:
    """Tokens for the shipped model (8 x 8): real CIFAR-10 ones from the features check, else random."""
    key = f"{split}_tokens"
    if key in ctx.art:
        return ctx.art[key], True
    path = ctx.tmp / f"random-{split}.h5"
    if not path.exists():
        from igpt_cli import Palette

        pal = np.asarray(Palette.load(shipped_dir()).centers, dtype=np.float32)  # the model's own colours
        token_file(path, 10 * (ctx.sizes.train_per_class if split == "train" else ctx.sizes.test_per_class), 8,
                   seed=1 if split == "train" else 2, colours=32, palette=pal)
    return path, False


# ---------------------------------------------------------------------------
# environment and peak
# ---------------------------------------------------------------------------
def precision_state() -> str:
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        return f"fp32_precision={matmul.fp32_precision}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return f"allow_tf32={matmul.allow_tf32}"


@check("env")
def check_env(ctx: Ctx) -> list[Row]:
    from igpt_cli.runtime import resolve_device, resolve_dtype

    nccl = "-"
    if ctx.cuda:
        with contextlib.suppress(Exception):
            v = torch.cuda.nccl.version()
            nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    versions = (f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
                f"NCCL {nccl}, driver {driver_version()}, Python {platform.python_version()}")
    rows = [Row("versions", "info", versions)]
    if not ctx.cuda:
        rows.append(Row("card", "info", f"CPU dry run: {cpu_name()}, {os.cpu_count()} cores"))
        return rows
    p = torch.cuda.get_device_properties(0)
    rows.append(Row("card", "info", f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                                    f"{p.multi_processor_count} SMs, {torch.cuda.device_count()} visible"))
    native, emulated = torch.cuda.is_bf16_supported(including_emulation=False), torch.cuda.is_bf16_supported()
    auto = resolve_dtype("auto", resolve_device("cuda"))
    rows.append(Row("bf16 native / with emulation", "info", f"{native} / {emulated}"))
    rows.append(Row("igpt auto dtype on this card", verdict(auto == (torch.bfloat16 if p.major >= 8 else torch.float32)),
                    str(auto).removeprefix("torch."), "bfloat16 iff sm >= 80"))
    new_api = hasattr(torch.backends.cuda.matmul, "fp32_precision")
    rows.append(Row("precision API", "info", f"{'fp32_precision (new)' if new_api else 'allow_tf32 (legacy)'}: "
                                             f"{precision_state()}"))
    return rows


def driver_version() -> str:
    with contextlib.suppress(Exception):
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=20)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip().splitlines()[0]
    return "-"


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                return ln.split(":", 1)[1].strip()
    return platform.processor() or "CPU"


@check("peak")
def check_peak(ctx: Ctx) -> list[Row]:
    n = ctx.sizes.peak_n
    a = torch.randn(n, n, device=ctx.dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=ctx.dev, dtype=torch.bfloat16)
    reps = 10 if ctx.cuda else 2
    for _ in range(3):
        a @ b
    sync(ctx)
    rates = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(ctx)
        rates.append(2 * n ** 3 * reps / (time.perf_counter() - t0))
    ctx.peak_flops = float(np.median(rates))
    return [Row("bf16 matmul peak (this run)", "info", f"{ctx.peak_flops / 1e12:.1f} TFLOP/s ({n}^3, median of 5)")]


# ---------------------------------------------------------------------------
# real images end to end
# ---------------------------------------------------------------------------
@check("features")
def check_features(ctx: Ctx) -> list[Row]:
    if ctx.data is None:
        raise Skip("no CIFAR-10 tar (pass --data)")
    rows = []
    for split, per_class in (("train", ctx.sizes.train_per_class), ("test", ctx.sizes.test_per_class)):
        tok, feats = ctx.tmp / f"{split}-tokens.h5", ctx.tmp / f"{split}-feats.h5"
        t0 = time.perf_counter()
        r = ctx.run(["features", ctx.data, "--model", SHIPPED, "--split", split, "--limit-per-class", per_class,
                     "--shuffle", "--seed", 0, "--keep-tokens", tok, "-o", feats, "-l", "all", "--device", ctx.dev,
                     "--quiet", "--overwrite"], timeout=240)
        wall = time.perf_counter() - t0
        if r.returncode:
            rows.append(Row(f"igpt features ({split})", "fail", failure(r)))
            continue
        res = last_json(r.stdout)
        n = int(res.get("n", 0))
        ctx.art[f"{split}_tokens"], ctx.art[f"{split}_feats"] = tok, feats
        if split == "train":
            loop = res.get("images_per_s")
            rate = f"{n / wall:,.0f} images/s end to end (process start, JPEG decode, quantize, extract)"
            if loop:
                rate += f"; extract loop {loop:,.0f} images/s{mfu(ctx, loop * forward_flops(8, 192, 64))}"
            need = 4096 if not ctx.dry else 10 * per_class
            rows.append(Row("igpt features on CIFAR-10 JPEGs", verdict(n >= need),
                            f"{n:,} images, {res.get('compute_dtype', '?')}: {rate}", f">= {need:,} images"))
    return rows


# ---------------------------------------------------------------------------
# numerics
# ---------------------------------------------------------------------------
def hf_features(model_dir: Path, tokens: np.ndarray, dev: str) -> dict[int, np.ndarray]:
    """The paper's features with transformers in float32: mean over positions of ln_1(h_l), ln_f(h_L)."""
    from transformers import ImageGPTModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    m = ImageGPTModel.from_pretrained(model_dir).float().to(dev).eval()
    L, sos = m.config.n_layer, m.config.vocab_size - 1
    out: dict[int, list] = {k: [] for k in range(L + 1)}
    with torch.no_grad():
        for i in range(0, len(tokens), 16):
            idx = torch.from_numpy(tokens[i:i + 16].astype(np.int64)).to(dev)
            idx = torch.cat([torch.full_like(idx[:, :1], sos), idx[:, :-1]], dim=1)
            hs = m(input_ids=idx, output_hidden_states=True).hidden_states
            for k in range(L + 1):
                h = m.h[k].ln_1(hs[k]) if k < L else hs[k]
                out[k].append(h.mean(1).float().cpu().numpy())
    del m
    return {k: np.concatenate(v) for k, v in out.items()}


def parity_tokens(ctx: Ctx, side: int) -> tuple[Path, str]:
    """side x side tokens for the random model: CIFAR-10 test images quantized with `igpt quantize`
    (neighbouring tokens alike, so that features averaged over positions keep a signal), else
    random tokens."""
    path = ctx.tmp / f"parity-{side}.h5"
    if ctx.data is not None:
        r = ctx.run(["quantize", ctx.data, "--split", "test", "--size", side, "--limit",
                     ctx.sizes.parity_rows, "--shuffle", "-o", path, "--quiet", "--overwrite"], timeout=120)
        if r.returncode == 0:
            return path, "CIFAR-10 tokens"
    return token_file(path, ctx.sizes.parity_rows, side, seed=3), "random tokens"


@check("hf-parity")
def check_hf_parity(ctx: Ctx) -> list[Row]:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise Skip("transformers is not installed (pip install 'igpt-cli[test]')") from None
    from transformers import ImageGPTConfig, ImageGPTModel

    from igpt_cli import extract_features

    L, C, H, side = ctx.sizes.parity_model
    torch.manual_seed(0)
    rand_dir = ctx.tmp / f"hf-{L}x{C}"
    ImageGPTModel(ImageGPTConfig(vocab_size=513, n_positions=side * side, n_embd=C, n_layer=L, n_head=H)) \
        .save_pretrained(rand_dir)
    rand_tok, kind = parity_tokens(ctx, side)
    ship_tok, real = model_tokens(ctx)
    rows = []
    for name, model, tok, shape in ((f"shipped 8x192 ({'CIFAR-10' if real else 'random'} tokens)", shipped_dir(),
                                     ship_tok, (8, 192, 64)),
                                    (f"random {L}x{C}, T={side * side} ({kind})", rand_dir, rand_tok,
                                     (L, C, side * side))):
        tokens = read_tokens(tok)[0][:256]
        ref = hf_features(model, tokens, ctx.dev)
        for dtype, tol in (("float32", 1e-4), ("bfloat16", 1e-2)):
            out = ctx.tmp / f"parity-{dtype}-{shape[0]}.h5"
            res = extract_features(tok, model, "all", out, device=ctx.dev, dtype=dtype, limit=len(tokens),
                                   overwrite=True)
            err, layer = max_rel(read_features(out), ref)
            speed = ""
            if dtype == "bfloat16" and res.images_per_s:
                speed = (f"; {res.images_per_s:,.0f} images/s at batch {res.batch_size}"
                         f"{mfu(ctx, res.images_per_s * forward_flops(*shape))}")
            rows.append(Row(f"extract {dtype} vs transformers fp32: {name}", verdict(err <= tol),
                            f"max rel {err:.1e} (layer {layer}){speed}", f"<= {tol:g}"))
    return rows


def probe_accuracy(ctx: Ctx, feats_tr: dict, y_tr, feats_te: dict, y_te, layers: list[int]) -> dict[int, float]:
    from igpt_cli import LinearProbe, probe_layer

    return {k: probe_layer(feats_tr[k], y_tr, feats_te[k], y_te, estimator=LinearProbe(device=ctx.dev)).test_acc
            for k in layers}


@check("numerics")
def check_numerics(ctx: Ctx) -> list[Row]:
    """CPU fp32 vs CUDA fp32 vs CUDA bf16 (igpt's default), and item 9: bf16 weights vs autocast."""
    from igpt_cli import features_from_tokens, load_pretrained, score_images

    tr_path, real = model_tokens(ctx, "train")
    te_path, _ = model_tokens(ctx, "test")
    (Xtr, ytr), (Xte, yte) = read_tokens(tr_path), read_tokens(te_path)
    both = np.concatenate([Xtr, Xte])
    d = shipped_dir()

    def feats(**kw):
        f = features_from_tokens(both, kw.pop("model", d), "all", **kw)
        return {k: v[:len(Xtr)] for k, v in f.items()}, {k: v[len(Xtr):] for k, v in f.items()}

    variants = {"CPU fp32": feats(device="cpu", dtype="float32"), f"{ctx.dev} fp32": feats(device=ctx.dev, dtype="float32"),
                f"{ctx.dev} bf16 (igpt's dtype=bfloat16)": feats(device=ctx.dev, dtype="bfloat16")}
    bf16_weights = load_pretrained(d).to(ctx.dev, torch.bfloat16)
    variants["bf16 weights, bf16 residual"] = feats(model=bf16_weights, device=ctx.dev, dtype="bfloat16")
    del bf16_weights
    fp32_weights = load_pretrained(d).to(ctx.dev)
    with torch.autocast(ctx.dev, dtype=torch.bfloat16):
        variants["autocast bf16, fp32 residual"] = feats(model=fp32_weights, device=ctx.dev, dtype="float32")
    ctx.art["variants"], ctx.art["labels"] = variants, (ytr, yte)

    ref_tr, ref_te = variants["CPU fp32"]
    n_layers = len(ref_tr)
    layers = list(range(n_layers - ctx.sizes.probe_layers, n_layers))
    acc = {name: probe_accuracy(ctx, tr, ytr, te, yte, layers) if real else None for name, (tr, te) in variants.items()}
    rows = []
    half_ci = 100 * 1.96 * math.sqrt(0.25 / max(len(yte), 1))
    for name, (tr, te) in variants.items():
        if name == "CPU fp32":
            continue
        err, layer = max_rel({**{k: np.concatenate([tr[k], te[k]]) for k in tr}},
                             {k: np.concatenate([ref_tr[k], ref_te[k]]) for k in ref_tr})
        tol = 1e-4 if "fp32" in name and "autocast" not in name else 1e-2
        value = f"max rel {err:.1e} (layer {layer})"
        status = verdict(err <= tol)
        if acc[name] is not None:
            deltas = {k: 100 * (acc[name][k] - acc["CPU fp32"][k]) for k in layers}
            value += "; probe acc " + ", ".join(f"L{k} {100 * acc[name][k]:.1f} ({deltas[k]:+.1f})" for k in layers)
            status = verdict(err <= tol and max(map(abs, deltas.values())) <= 1.0)
        rows.append(Row(f"features {name} vs CPU fp32", status, value,
                        f"rel <= {tol:g}" + ("; |Δacc| <= 1 pt" if acc[name] is not None else "")))
    if acc["CPU fp32"] is not None:
        rows.append(Row("probe accuracy, CPU fp32 (reference)", "info",
                        ", ".join(f"L{k} {100 * acc['CPU fp32'][k]:.1f}" for k in layers)
                        + f" ({len(yte):,} test images: 95% CI ±{half_ci:.1f} pt)"))
    else:
        rows.append(Row("probe accuracy per dtype", "skip", "random tokens: no CIFAR-10 tar (pass --data)"))

    # scores: the generative loss per image
    ref = score_images(Xte, d, device="cpu", dtype="float32")
    for dt, tol in (("float32", 1e-4), ("bfloat16", 1e-2)):
        got = score_images(Xte, d, device=ctx.dev, dtype=dt)
        err = float(np.max(np.abs(got - ref) / np.abs(ref)))
        rows.append(Row(f"score {ctx.dev} {dt} vs CPU fp32 (per image)", verdict(err <= tol), f"max rel {err:.1e}",
                        f"<= {tol:g}"))
    rows += cached_logits_rows(ctx, fp32_weights, Xte[:8])
    return rows


def cached_logits_rows(ctx: Ctx, model, tokens: np.ndarray) -> list[Row]:
    """Logits of cached decoding (prompt, then one token at a time) vs one full forward; flash attention."""
    from igpt_cli.model import KVCache

    rows = []
    idx = torch.from_numpy(tokens.astype(np.int64)).to(ctx.dev)
    idx = torch.cat([torch.full_like(idx[:, :1], model.config.vocab_size - 1), idx[:, :-1]], 1)
    T, k = idx.shape[1], idx.shape[1] // 2
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        m = model.to(dtype)
        with torch.no_grad():
            full = m(idx).float()
            cache = KVCache(m.config, len(idx), device=ctx.dev, dtype=dtype)
            parts = [m(idx[:, :k], cache=cache).float()]
            parts += [m(idx[:, t:t + 1], cache=cache).float() for t in range(k, T)]
        err = float((torch.cat(parts, 1) - full).abs().max() / full.abs().max())
        rows.append(Row(f"cached vs full logits, {str(dtype)[6:]}", verdict(err <= tol),
                        f"max |Δ| / max |logit| {err:.1e}", f"<= {tol:g}"))
    m = model.to(torch.bfloat16)
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            flash = m(idx).float()
        with torch.no_grad():
            default = m(idx).float()
        err = float((flash - default).abs().max() / default.abs().max())
        rows.append(Row("flash attention in bf16", verdict(err <= 5e-2), f"runs; vs default backend {err:.1e}", "runs"))
    except Exception as e:  # noqa: BLE001 - reported as the row
        rows.append(Row("flash attention in bf16", "fail", one_line(e), "runs"))
    model.float()
    return rows


# ---------------------------------------------------------------------------
# probe
# ---------------------------------------------------------------------------
def probe_data(ctx: Ctx):
    """Standardised features of one layer (CPU fp32 of the shipped model) and labels; random classes without data."""
    if "variants" in ctx.art and "train_tokens" in ctx.art:
        tr, te = ctx.art["variants"]["CPU fp32"]
        k = max(tr)
        ytr, yte = ctx.art["labels"]
        Xtr, Xte = tr[k], te[k]
    else:
        rng = np.random.default_rng(0)
        n, D = (4096, 192) if ctx.cuda else (400, 16)
        means = rng.normal(0, 0.4, (10, D))
        ytr, yte = rng.integers(0, 10, n), rng.integers(0, 10, n // 4)
        Xtr, Xte = means[ytr] + rng.normal(size=(n, D)), means[yte] + rng.normal(size=(n // 4, D))
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-6
    return ((Xtr - mu) / sd).astype(np.float32), ytr, ((Xte - mu) / sd).astype(np.float32), yte


@check("probe")
def check_probe(ctx: Ctx) -> list[Row]:
    from igpt_cli import LinearProbe, probe_files

    Xtr, ytr, Xte, yte = probe_data(ctx)
    rows = []
    before = precision_state() if ctx.cuda else "-"
    for tol, coef_tol in ((1e-4, 1e-2), (1e-6, 1e-3)):
        fits = {}
        for dev in ("cpu", ctx.dev):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fits[dev] = (LinearProbe(C=1.0, tol=tol, max_iter=2000, device=dev).fit(Xtr, ytr), caught)
        (cpu, _), (gpu, caught) = fits["cpu"], fits[ctx.dev]
        err = rel(gpu.coef_, cpu.coef_)
        acc_c, acc_g = float((cpu.predict(Xte) == yte).mean()), float((gpu.predict(Xte) == yte).mean())
        ok = err <= coef_tol and gpu.converged_ and cpu.converged_ and abs(acc_c - acc_g) <= 1 / len(yte) + 1e-12
        notes = f"; {len(caught)} warnings: {one_line(Warning(caught[0].message))}" if caught else ""
        rows.append(Row(f"probe solver {ctx.dev} vs CPU, tol {tol:g}", verdict(ok),
                        f"coef rel {err:.1e}, acc {100 * acc_g:.2f} vs {100 * acc_c:.2f}, converged "
                        f"{gpu.converged_}/{cpu.converged_}{notes}", f"coef rel <= {coef_tol:g}, acc ±1 image"))
    after = precision_state() if ctx.cuda else "-"
    rows.append(Row("TF32 state after the probe", verdict(before == after), f"{before} -> {after}", "unchanged"))
    if ctx.cuda and hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        # issue 24 item 2: a process that used the new precision API must still be able to probe
        # (in a child: that API, once used, changes what this process may do)
        code = ("import numpy as np, torch; torch.backends.cuda.matmul.fp32_precision = 'ieee'; "
                "from igpt_cli import LinearProbe; r = np.random.default_rng(0); "
                "LinearProbe(device='cuda').fit(r.normal(size=(256, 8)).astype('float32'), r.integers(0, 3, 256))")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ctx.env(), timeout=120)
        last = (r.stderr.strip().splitlines() or [""])[-1]
        rows.append(Row("probe after fp32_precision was set", verdict(r.returncode == 0),
                        "runs" if r.returncode == 0 else last[:160], "no error"))
    if "train_feats" not in ctx.art:
        rows.append(Row("probe --jobs 2 = --jobs 1, cuda = cpu", "skip", "needs the features check's files"))
        return rows
    tr, te = ctx.art["train_feats"], ctx.art["test_feats"]
    n_layers = len(read_features(te))
    layers = [str(k) for k in range(n_layers - ctx.sizes.probe_layers, n_layers)]
    reports = {(dev, jobs): probe_files(tr, te, layers, device=dev, jobs=jobs)
               for dev, jobs in ((ctx.dev, 1), (ctx.dev, 2), ("cpu", 1))}

    def key(rep):
        return [(r.layer, r.c, round(r.test_acc, 6)) for r in rep.layers]

    g1, g2, c1 = key(reports[(ctx.dev, 1)]), key(reports[(ctx.dev, 2)]), key(reports[("cpu", 1)])
    rows.append(Row(f"probe_files {ctx.dev}: jobs 2 = jobs 1", verdict(g1 == g2),
                    "; ".join(f"L{a} C={c:g} {100 * t:.2f}" for a, c, t in g2), "same C and accuracy"))
    same_c = [a[1] == b[1] for a, b in zip(g1, c1)]
    d_acc = max(abs(a[2] - b[2]) for a, b in zip(g1, c1))
    rows.append(Row(f"probe_files {ctx.dev} vs cpu", verdict(all(same_c) and d_acc <= 2 / 1000),
                    f"same C in {sum(same_c)}/{len(same_c)} layers, max |Δacc| {100 * d_acc:.2f} pt",
                    "same C, |Δacc| <= 0.2 pt"))
    return rows


# ---------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------
@check("generate")
def check_generate(ctx: Ctx) -> list[Row]:
    from igpt_cli import sample_images

    d, n = shipped_dir(), ctx.sizes.gen_rows
    greedy = {dev: sample_images(d, n, temperature=0, device=dev, dtype="float32") for dev in ("cpu", ctx.dev)}
    same_rows = float((greedy["cpu"] == greedy[ctx.dev]).all(1).mean())
    t0 = time.perf_counter()
    a = sample_images(d, n, seed=0, device=ctx.dev, dtype="bfloat16" if ctx.cuda else "float32")
    sync(ctx)
    dt = time.perf_counter() - t0
    b = sample_images(d, n, seed=0, device=ctx.dev, dtype="bfloat16" if ctx.cuda else "float32")
    return [Row(f"greedy samples {ctx.dev} fp32 vs CPU fp32", verdict(same_rows >= 0.75),
                f"{100 * same_rows:.0f}% of {n} rows identical", ">= 75% (near-ties may flip a token)"),
            Row(f"samples {ctx.dev}: same seed twice", verdict(np.array_equal(a, b)),
                f"{'identical' if np.array_equal(a, b) else 'differ'}; {a.size / dt:,.0f} tokens/s at batch {n}",
                "identical")]


# ---------------------------------------------------------------------------
# reproducibility promises (a child process per setting of IGPT_DETERMINISTIC)
# ---------------------------------------------------------------------------
def child_repro(dev: str, tokens: Path, tmp: Path, steps: int, rows_n: int) -> dict:
    """Samples at batch 8 vs 64 and a float32 run resumed halfway vs uninterrupted, in this process."""
    from safetensors.torch import load_file

    from igpt_cli import TrainConfig, pretrain, sample_images

    out = {}
    n = max(rows_n, 16)
    a = sample_images(SHIPPED, n, seed=0, batch_size=8, device=dev, dtype="float32")
    b = sample_images(SHIPPED, n, seed=0, batch_size=n, device=dev, dtype="float32")
    out["sample_batch_rows_identical"], out["rows"] = float((a == b).all(1).mean()), n
    cfg = dict(n_layer=2, n_embd=64, n_head=4, steps=steps, batch_size=16, lr=3e-3, warmup_steps=2,
               checkpoint_every=steps // 2, eval_every=steps // 2, seed=0)

    def stop_halfway(ev):
        if ev.done >= steps // 2 and ev.total:
            raise KeyboardInterrupt

    pretrain(tokens, tmp / "whole", TrainConfig(**cfg), device=dev, dtype="float32")
    with contextlib.suppress(KeyboardInterrupt):
        pretrain(tokens, tmp / "cut", TrainConfig(**cfg), device=dev, dtype="float32", on_progress=stop_halfway)
    pretrain(tokens, tmp / "cut", device=dev, dtype="float32", resume=True)
    w, c = load_file(tmp / "whole" / "model.safetensors"), load_file(tmp / "cut" / "model.safetensors")
    out["resume_bit_identical"] = all(torch.equal(w[k], c[k]) for k in w)
    out["resume_max_rel"] = weights_rel(w, c)
    out["deterministic_algorithms"] = torch.are_deterministic_algorithms_enabled()
    return out


@check("repro")
def check_repro(ctx: Ctx) -> list[Row]:
    tokens, _ = model_tokens(ctx, "train")
    rows = []
    for det in ("0", "1"):
        tmp = ctx.tmp / f"repro-{det}"
        tmp.mkdir(exist_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child-repro", str(tokens), "--device", ctx.dev,
               "--tmp", str(tmp), "--steps", str(ctx.sizes.resume_steps), "--rows", str(ctx.sizes.gen_rows)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=ctx.env(IGPT_DETERMINISTIC=det), timeout=300)
        label = "IGPT_DETERMINISTIC=1" if det == "1" else "default"
        if r.returncode:
            rows.append(Row(f"reproducibility ({label})", "fail", failure(r)))
            continue
        res = last_json(r.stdout)
        frac = res["sample_batch_rows_identical"]
        # the promise: CPU bit for bit; CUDA the same bits for the same batch, rows at other batch sizes
        # may differ where cuBLAS's shape-dependent rounding flips a sampled token (README: Reproducibility)
        rows.append(Row(f"samples batch 8 vs {res['rows']}, fp32 ({label})", verdict(frac == 1.0) if not ctx.cuda else "info",
                        f"{100 * frac:.0f}% of rows identical", "CPU: all; CUDA: measured"))
        exact = res["resume_bit_identical"]
        want_exact = not ctx.cuda or det == "1"
        rows.append(Row(f"train resume = uninterrupted, fp32 ({label})",
                        verdict(exact if want_exact else res["resume_max_rel"] <= 1e-4),
                        f"{'bit-identical' if exact else 'differs'}; weights rel {res['resume_max_rel']:.1e}",
                        "bit-identical" if want_exact else "weights rel <= 1e-4"))
    return rows


# ---------------------------------------------------------------------------
# where the host waits
# ---------------------------------------------------------------------------
@check("syncs")
def check_syncs(ctx: Ctx) -> list[Row]:
    """Where the host waits for the GPU, by file:line, per unit of work (on the CPU: the workloads
    run, nothing is measured)."""
    from igpt_cli import LinearProbe, features_from_tokens, load_pretrained, sample_images

    tokens = read_tokens(model_tokens(ctx)[0])[0][:64]
    model = load_pretrained(shipped_dir()).to(ctx.dev, torch.bfloat16 if ctx.cuda else torch.float32).eval()
    T = model.config.n_positions
    Xtr, ytr, _, _ = probe_data(ctx)
    features_from_tokens(tokens, model, "all", batch_size=64)  # warm-up: kernels chosen, memory allocated

    def extract_batch():
        features_from_tokens(tokens, model, "all", batch_size=64)
        return 1, "batch"

    def sampling():
        sample_images(model, 8, batch_size=8)
        return T, "decode step"

    def probe_fit():
        return int(LinearProbe(C=1.0, device=ctx.dev).fit(Xtr, ytr).n_iter_[0]), "pass over the rows"

    work = {f"one extract batch ({len(tokens)} images, all layers)": extract_batch,
            f"sampling 8 rows x {T} tokens": sampling, "one probe fit (C=1)": probe_fit}
    rows = []
    for name, fn in work.items():
        sync(ctx)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if ctx.cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                units, unit = fn()
            finally:
                if ctx.cuda:
                    torch.cuda.set_sync_debug_mode(0)
        if not ctx.cuda:
            rows.append(Row(f"syncs: {name}", "skip", "ran; sync debug mode needs CUDA"))
            continue
        sites: dict[str, int] = {}
        for w in caught:
            if "synchroniz" in str(w.message):
                where = f"{Path(w.filename).name}:{w.lineno}"
                sites[where] = sites.get(where, 0) + 1
        n = sum(sites.values())
        top = ", ".join(f"{k} x{v}" for k, v in sorted(sites.items(), key=lambda kv: -kv[1])[:6])
        rows.append(Row(f"syncs: {name}", "info", f"{n} ({n / max(units, 1):.1f} per {unit}) at {len(sites)} sites: "
                                                  f"{top or '-'}"))
    return rows


# ---------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------
def train_help(ctx: Ctx) -> str:
    if "train_help" not in ctx.art:
        ctx.art["train_help"] = ctx.run(["train", "--help"], env={"COLUMNS": "250"}).stdout
    return ctx.art["train_help"]


def losses_of(out: Path) -> list[float]:
    """Per-step losses: metrics.jsonl where the trainer writes one, else the history's smoothed loss."""
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
        return [float(r["loss"]) for r in rows if "loss" in r]
    meta = json.loads((out / "train_meta.json").read_text())
    return [float(r["train_loss"]) for r in meta["history"]]


def train_tokens(ctx: Ctx) -> tuple[Path, int]:
    path, _ = model_tokens(ctx, "train")
    return path, 64


@check("train")
def check_train(ctx: Ctx) -> list[Row]:
    tokens, T = train_tokens(ctx)
    depth, width, heads, batch = ctx.sizes.train_model
    rows = []
    for dtype, steps in (("bfloat16", 30), ("float16", 50)):
        if ctx.dry:
            steps //= 5
        out = ctx.tmp / f"train-{dtype}"
        shutil.rmtree(out, ignore_errors=True)
        log_every = ["--log-every", 1] if "--log-every" in train_help(ctx) else []  # metrics.jsonl, every step
        r = ctx.run(["train", tokens, "-o", out, "--depth", depth, "--width", width, "--heads", heads,
                     "--steps", steps, "--batch-size", batch, "--lr", "1e-3", "--warmup", 3, "--eval-every", 1,
                     *log_every, "--checkpoint-every", 10_000, "--dtype", dtype, "--device", ctx.dev, "--quiet"],
                    timeout=300)
        name = f"train {steps} steps {dtype}"
        if r.returncode == 2 and dtype == "float16" and len(error_lines(r.stderr)) == 1:
            rows.append(Row(name, "pass", f"refused in one line: {error_lines(r.stderr)[0][:120]}",
                            "finite, falling loss or a clean refusal"))
            continue
        if r.returncode:
            rows.append(Row(name, "fail", failure(r)))
            continue
        res, losses = last_json(r.stdout), losses_of(out)
        ok = all(map(math.isfinite, losses)) and losses[-1] < losses[0]
        rate = steps * batch * T / max(res["seconds"], 1e-9)
        flops = 3 * forward_flops(depth, width, T, head=True)
        rows.append(Row(name, verdict(ok), f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; {rate:,.0f} tokens/s"
                                           f"{mfu(ctx, rate / T * flops)}", "finite, falls"))
    if "--grad-accum" not in train_help(ctx):
        rows.append(Row("train --grad-accum 2 = full batch", "skip", "flag missing"))
        return rows
    outs = {}
    for accum in (1, 2):
        out = ctx.tmp / f"accum-{accum}"
        shutil.rmtree(out, ignore_errors=True)
        r = ctx.run(["train", tokens, "-o", out, "--depth", 2, "--width", 64, "--heads", 4, "--steps", 5,
                     "--batch-size", 16, "--grad-accum", accum, "--dtype", "float32", "--device", ctx.dev,
                     "--checkpoint-every", 5, "--quiet"], timeout=200)
        if r.returncode:
            rows.append(Row("train --grad-accum 2 = full batch", "fail", failure(r)))
            return rows
        outs[accum] = out
    err = weights_rel(outs[1], outs[2])
    rows.append(Row("train --grad-accum 2 = full batch (fp32)", verdict(err <= 1e-4), f"weights rel {err:.1e}",
                    "weights rel <= 1e-4"))
    return rows


def weights_rel(a: Path | dict, b: Path | dict) -> float:
    """Largest per-tensor ||a - b|| / ||a|| between two models' weights (directories or state dicts).
    Without the key bias (the first third of c_attn's middle third): softmax cancels it, its true
    gradient is exactly 0, and Adam turns the rounding noise of that 0 into steps of ~lr."""
    from safetensors.torch import load_file

    wa = load_file(a / "model.safetensors") if isinstance(a, Path) else a
    wb = load_file(b / "model.safetensors") if isinstance(b, Path) else b
    worst = 0.0
    for k in wa:
        x, y = wa[k].double(), wb[k].double()
        if k.endswith("attn.c_attn.bias"):
            c = x.numel() // 3
            x, y = torch.cat([x[:c], x[2 * c:]]), torch.cat([y[:c], y[2 * c:]])
        worst = max(worst, float((x - y).norm() / x.norm().clamp_min(1e-30)))
    return worst


# ---------------------------------------------------------------------------
# more than one process
# ---------------------------------------------------------------------------
@check("torchrun")
def check_torchrun(ctx: Ctx) -> list[Row]:
    tokens, _ = model_tokens(ctx, "train")
    common = ["extract", tokens, "--model", SHIPPED, "-l", "all", "--batch-size", 64 if ctx.cuda else 8,
              "--dtype", "float32", "--limit", ctx.sizes.torchrun_rows, "--quiet"]
    ref = ctx.tmp / "tr-1proc.h5"
    r = ctx.run([*common, "--device", ctx.dev, "-o", ref, "--overwrite"])
    if r.returncode:
        return [Row("extract, one process", "fail", failure(r))]
    rows = []
    for k in (1, 2):
        out = ctx.tmp / f"tr-{k}ranks.h5"
        r = ctx.run([*common, "--device", ctx.dev, "-o", out, "--overwrite"], torchrun=k)
        name = f"torchrun extract, {k} rank{'s' if k > 1 else ''}" + (" on one GPU" if ctx.cuda and k > 1 else "")
        if r.returncode:
            rows.append(Row(name, "fail", failure(r), "= one process"))
            continue
        a, b = read_features(ref), read_features(out)
        same = sorted(a) == sorted(b) and all(a[i].tobytes() == b[i].tobytes() for i in a)
        rows.append(Row(name, verdict(same), "features byte-identical" if same else
                        f"differ: max rel {max_rel(b, a)[0]:.1e}", "bytes = one process"))
    if not ctx.cuda:
        rows.append(Row("torchrun --device cuda:0, 2 ranks", "skip", "needs CUDA"))
    else:
        r = ctx.run([*common, "--device", "cuda:0", "-o", ctx.tmp / "tr-cuda0.h5", "--overwrite"], torchrun=2)
        lines = [ln for ln in error_lines(r.stderr) if "names one GPU" in ln]
        ok = r.returncode != 0 and bool(lines) and not (ctx.tmp / "tr-cuda0.h5").exists()
        rows.append(Row("torchrun --device cuda:0, 2 ranks", verdict(ok),
                        (lines[0][:150] if lines else f"exit {r.returncode}"), "refused in one line, nothing written"))
    rows += torchrun_train_rows(ctx)
    return rows


def torchrun_train_rows(ctx: Ctx) -> list[Row]:
    name = "torchrun train, 2 ranks" + (" on one GPU" if ctx.cuda else "") + " = one process (fp32)"
    if "--grad-accum" not in train_help(ctx):
        return [Row(name, "skip", "train is not data-parallel here yet (no --grad-accum flag)")]
    tokens, _ = model_tokens(ctx, "train")
    outs = {}
    for k in (0, 2):
        out = ctx.tmp / f"ddp-{k}"
        shutil.rmtree(out, ignore_errors=True)
        r = ctx.run(["train", tokens, "-o", out, "--depth", 2, "--width", 64, "--heads", 4, "--steps", 6,
                     "--batch-size", 16, "--dtype", "float32", "--device", ctx.dev, "--checkpoint-every", 6, "--quiet"],
                    torchrun=k, timeout=300)
        if r.returncode:
            return [Row(name, "fail", failure(r), "weights rel <= 1e-4")]
        outs[k] = out
    err = weights_rel(outs[0], outs[2])
    return [Row(name, verdict(err <= 1e-4), f"weights rel {err:.1e}", "weights rel <= 1e-4")]


# ---------------------------------------------------------------------------
# an iGPT-L-shaped model
# ---------------------------------------------------------------------------
@check("large")
def check_large(ctx: Ctx) -> list[Row]:
    from igpt_cli import IGPT, IGPTConfig, complete_file, extract_features, save_pretrained

    L, C, H, side = ctx.sizes.large_model
    T = side * side
    d = ctx.tmp / "large"
    torch.manual_seed(0)
    with torch.device(ctx.dev):
        model = IGPT(IGPTConfig(n_positions=T, n_embd=C, n_layer=L, n_head=H))
    save_pretrained(model, d, dtype=torch.bfloat16)
    del model
    n = ctx.sizes.large_rows
    tok = token_file(ctx.tmp / "large-tokens.h5", n, side, seed=4)
    rows = []
    total = torch.cuda.get_device_properties(0).total_memory if ctx.cuda else 0

    free_before = [0]

    def reset() -> None:
        if ctx.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            free_before[0] = torch.cuda.mem_get_info()[0]

    def memory() -> str:
        if not ctx.cuda:
            return ""
        return (f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB "
                f"({free_before[0] / 2**30:.0f} free before, {total / 2**30:.0f} in all)")

    def fits() -> bool:
        return not ctx.cuda or torch.cuda.max_memory_allocated() <= 0.9 * total

    reset()
    try:
        res = extract_features(tok, d, str(L), ctx.tmp / "large-feats.h5", device=ctx.dev, dtype="bfloat16",
                               overwrite=True)
        rate = res.images_per_s or 0
        rows.append(Row(f"{L}x{C} T={T} bf16: extract", verdict(fits()),
                        f"auto batch {res.batch_size}{' (= rows)' if res.batch_size == n else ''}, {rate:,.1f} images/s"
                        f"{mfu(ctx, rate * forward_flops(L, C, T))}{memory()}", "runs, peak <= 90% of memory"))
    except Exception as e:  # noqa: BLE001 - an out-of-memory is this check's finding
        rows.append(Row(f"{L}x{C} T={T} bf16: extract", "fail", one_line(e)))
    reset()
    try:
        res = complete_file(tok, d, ctx.tmp / "large-complete.h5", keep_rows=side - 1, n=1, limit=n, seed=0,
                            device=ctx.dev, dtype="bfloat16", overwrite=True)
        rows.append(Row(f"{L}x{C} T={T} bf16: prefill {T - side} + {side} decode steps", verdict(fits()),
                        f"auto batch {res.batch_size}, KV cache {res.kv_cache_bytes / 2**30:.1f} GiB, "
                        f"{(res.tokens_per_s or 0):,.0f} generated tokens/s{memory()}", "runs, peak <= 90% of memory"))
    except Exception as e:  # noqa: BLE001
        rows.append(Row(f"{L}x{C} T={T} bf16: prefill + decode", "fail", one_line(e)))
    shutil.rmtree(d, ignore_errors=True)
    return rows


# ---------------------------------------------------------------------------
# the gpu-marked tests
# ---------------------------------------------------------------------------
@check("pytest-gpu")
def check_pytest(ctx: Ctx) -> list[Row]:
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(ROOT / "tests")],
                       capture_output=True, text=True, env=ctx.env(), cwd=ROOT, timeout=300)
    summary = (r.stdout.strip().splitlines() or ["no output"])[-1].strip("= ")
    passed = int((re.search(r"(\d+) passed", summary) or [0, 0])[1])
    skipped = int((re.search(r"(\d+) skipped", summary) or [0, 0])[1])
    if not ctx.cuda:
        return [Row("pytest -m gpu", "skip", f"{summary} (no CUDA: skipped tests are not coverage)")]
    return [Row("pytest -m gpu", verdict(r.returncode == 0 and passed > 0 and skipped == 0), summary,
                "all pass, none skipped")]


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------
def table(rows: list[Row]) -> str:
    head = ["check", "result", "measured", "threshold"]
    lines = ["| " + " | ".join(head) + " |", "| --- | --- | --- | --- |"]
    for r in rows:
        lines.append("| " + " | ".join(s.replace("|", "\\|") for s in (r.check, r.status, r.value, r.threshold)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-dry-run", action="store_true", help="run the checks on the CPU at tiny shapes")
    ap.add_argument("--data", help="CIFAR-10 JPEG tar, or the directory holding cifar10-jpeg.tar")
    ap.add_argument("--only", help=f"comma-separated checks: {','.join(n for n, _ in CHECKS)}")
    ap.add_argument("--budget", type=float, default=480, help="seconds; checks that would start later are skipped")
    ap.add_argument("--json", help="also write the rows as JSON here")
    ap.add_argument("--child-repro", help=argparse.SUPPRESS)
    ap.add_argument("--device", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_repro:
        print(json.dumps(child_repro(args.device, Path(args.child_repro), Path(args.tmp), args.steps, args.rows)))
        return 0

    if not torch.cuda.is_available() and not args.cpu_dry_run:
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        print(f"gpu_check: no GPU here ({why}; torch {torch.__version__}): nothing to check "
              f"(--cpu-dry-run tests the script on the CPU)")
        return 0
    names = [n for n, _ in CHECKS]
    only = [s.strip() for s in args.only.split(",")] if args.only else names
    unknown = [s for s in only if s not in names]
    if unknown:
        print(f"gpu_check: unknown check(s) {', '.join(unknown)} (choose from {', '.join(names)})", file=sys.stderr)
        return 2
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="igpt-gpu-check-") as tmp:
        ctx = Ctx(dry=args.cpu_dry_run, dev="cpu" if args.cpu_dry_run else "cuda", tmp=Path(tmp),
                  data=find_data(args.data), sizes=DRY_SIZES if args.cpu_dry_run else GPU_SIZES,
                  deadline=t_start + args.budget)
        rows: list[Row] = []
        for name, fn in CHECKS:
            if name not in only:
                continue
            if time.time() > ctx.deadline:
                rows.append(Row(name, "skip", f"out of time (--budget {args.budget:g} s)"))
                continue
            t0 = time.time()
            try:
                got = fn(ctx)
            except Skip as e:
                got = [Row(name, "skip", str(e))]
            except Exception as e:  # noqa: BLE001 - a crashing check is a failed row, the others still run
                where = traceback.extract_tb(e.__traceback__)[-1]
                got = [Row(name, "fail", f"{one_line(e)} ({Path(where.filename).name}:{where.lineno})")]
            rows += got
            print(f"gpu_check: {name} done in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        rows.append(Row("total time", verdict(time.time() - t_start <= args.budget + 60) if not ctx.dry else "info",
                        f"{time.time() - t_start:.0f} s", f"<= {args.budget:g} s"))
    mode = "CPU DRY RUN (the CPU stands in for the GPU: this tests the script, not a GPU)" if ctx.dry else "GPU"
    print(f"igpt GPU check, {mode}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"data: {ctx.data or 'none (random tokens)'}")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=1) + "\n")
    return 1 if any(r.status == "fail" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
