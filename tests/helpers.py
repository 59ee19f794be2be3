"""Helpers shared by the test modules (pytest puts tests/ on sys.path: `from helpers import …`)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import torch

from igpt_cli import formats

ROOT = Path(__file__).resolve().parents[1]
# a random 512-colour palette: tokens files of random content need no real images
PALETTE = np.random.default_rng(123).uniform(-1, 1, (512, 3)).astype(np.float32)
# environment for `python -m igpt_cli` subprocesses: this checkout, no launcher variables
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
for _k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_k, None)


def make_tokens(path: Path, n: int, side: int, *, palette=PALETTE, seed=0, high=None) -> Path:
    """A tokens file of n random side×side images, labels in 0..2 (classes a, b, c)."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        formats.create_tokens_file(f, height=side, width=side, palette=palette, class_names=["a", "b", "c"],
                                   split="train", source="random", resize="none")
        formats.append_rows(
            f,
            tokens=rng.integers(0, high or len(palette), (n, side * side)).astype(np.uint16),
            labels=rng.integers(0, 3, n),
            sources=np.array([f"img{i}.png" for i in range(n)], dtype=object),
        )
    return path


def hf_model(tmp: Path, n_layer=4, n_embd=128, n_head=4, n_positions=64, safe=True, seed=0):
    """A random transformers ImageGPTModel saved as a Hugging Face directory: (model, dir)."""
    from transformers import ImageGPTConfig, ImageGPTModel

    torch.manual_seed(seed)
    cfg = ImageGPTConfig(vocab_size=513, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head)
    m = ImageGPTModel(cfg).eval()
    with torch.no_grad():  # non-trivial layer-norm gains, so ln_1 vs ln_f mix-ups show
        for name, p in m.named_parameters():
            if "ln" in name:
                p.uniform_(0.5, 1.5)
    d = tmp / f"hf-{n_layer}x{n_embd}-{'st' if safe else 'bin'}"
    m.save_pretrained(d, safe_serialization=safe)
    if not safe and not (d / "pytorch_model.bin").exists():  # transformers 5 always writes safetensors
        from safetensors.torch import load_file

        torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
        (d / "model.safetensors").unlink()
    return m, d


def hf_reference(m, tokens: np.ndarray, site="ln", sos=True) -> dict[int, np.ndarray]:
    """The paper's features computed with transformers: mean over positions, per layer."""
    idx = torch.from_numpy(tokens.astype(np.int64))
    if sos:
        idx = torch.cat([torch.full_like(idx[:, :1], m.config.vocab_size - 1), idx[:, :-1]], dim=1)
    L = m.config.n_layer
    out = {}
    with torch.no_grad():
        hs = m(input_ids=idx, output_hidden_states=True).hidden_states
        for layer in range(L + 1):
            if site == "ln" and layer < L:
                out[layer] = m.h[layer].ln_1(hs[layer]).mean(1).numpy()
            else:  # resid, and layer L which HF already returns as ln_f(h_L)
                out[layer] = hs[layer].mean(1).numpy()
    return out


def read_feats(path: Path) -> dict[int, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {int(k): v[:] for k, v in f["features"].items()}


def run_igpt(*args, env=None, timeout=600, **kw) -> subprocess.CompletedProcess:
    """`python -m igpt_cli ARGS` in a real process (exit status, stdout and stderr as a user sees them)."""
    e = dict(ENV, **(env or {}))
    return subprocess.run([sys.executable, "-m", "igpt_cli", *map(str, args)], capture_output=True, text=True,
                          env=e, timeout=timeout, **kw)


def invoke(*args) -> SimpleNamespace:
    """Run the typer app in-process; re-raise unexpected exceptions; returncode/stdout/stderr."""
    from typer.testing import CliRunner

    from igpt_cli.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return SimpleNamespace(returncode=r.exit_code, exit_code=r.exit_code, stdout=r.stdout, stderr=r.stderr)


def error_lines(text: str) -> list[str]:
    return [line for line in text.strip().splitlines() if line.strip()]


def assert_clean_failure(r, needle: str = "", out: Path | None = None) -> None:
    """Exit 2, one line on stderr naming `needle`, nothing on stdout, no traceback, no output file."""
    code = getattr(r, "returncode", getattr(r, "exit_code", None))
    assert code == 2, (code, r.stderr, r.stdout)
    assert "Traceback" not in r.stderr and r.stdout == "", (r.stderr, r.stdout)
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "error" in lines[0], r.stderr
    assert needle.lower() in r.stderr.lower(), r.stderr
    if out is not None:
        assert not Path(out).exists()
