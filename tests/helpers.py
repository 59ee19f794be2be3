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

from igpt_cli import formats, outputs

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


def overlapping_classes(n: int, d: int = 20, k: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n rows of k overlapping Gaussian classes in d dims (not linearly separable): (X float32 [n, d], y [n])."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(7).standard_normal((k, d)) * 0.35
    y = rng.integers(0, k, n)
    return (centers[y] + rng.standard_normal((n, d))).astype(np.float32), y


# --- image datasets and tokens files (quantize, data, fileinfo tests) ---------------------------

FOLDER_CLASSES = ["cat", "dog", "frog"]  # the classes of make_image_folder


def random_image(rng, h=32, w=32, mode="RGB"):
    """A PIL image of random pixels: RGB, L (grayscale), RGBA (random alpha) or P (16-colour palette)."""
    from PIL import Image

    im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode == "L":
        return im.convert("L")
    if mode == "RGBA":
        im = im.convert("RGBA")
        im.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
        return im
    if mode == "P":
        return im.convert("P", palette=Image.ADAPTIVE, colors=16)
    return im


def encode_image(im, fmt: str) -> bytes:
    """A PIL image encoded as `fmt` ("PNG", "JPEG", …)."""
    import io

    b = io.BytesIO()
    im.save(b, format=fmt)
    return b.getvalue()


def make_image_folder(root: Path, splits=("train", "test"), per_class=2, seed=0) -> Path:
    """root/<split>/<class>/NNNN.png of random 32×32 images (split "": root/<class>/…), FOLDER_CLASSES."""
    rng = np.random.default_rng(seed)
    for s in splits:
        for c in FOLDER_CLASSES:
            d = root / s / c if s else root / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                (d / f"{i:04d}.png").write_bytes(encode_image(random_image(rng), "PNG"))
    return root


def read_tokens(path: Path) -> tuple[np.ndarray, np.ndarray, list[str], dict]:
    """A tokens file's (tokens, labels, sources, attrs)."""
    with h5py.File(path, "r") as f:
        return f["tokens"][:], f["labels"][:], [s.decode() for s in f["sources"][:]], dict(f.attrs)


def assert_bad_input(r, out: Path, *needles: str) -> None:
    """`assert_clean_failure`, its one line naming every needle (case as given), and neither
    `out` nor its temporary file left behind."""
    assert_clean_failure(r, out=out)
    line = error_lines(r.stderr)[0]
    for needle in needles:
        assert needle in line, (needle, line)
    assert not outputs.temp_path_for(out).exists()


def small_tmpfs(path: Path, size: str = "1m"):
    """Context manager: a tmpfs of `size` mounted at `path` (disk-full tests); skips the test, saying why,
    only when mounting is impossible; always unmounts. `mount -o remount,size=…` enlarges it."""
    import contextlib

    import pytest

    @contextlib.contextmanager
    def mounted():
        path.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs for a disk-full test: {(r.stderr or r.stdout).strip()}")
        try:
            yield path
        finally:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)

    return mounted()


def hold_output_lock(path: Path) -> subprocess.Popen:
    """Another process holding `outputs.output_lock(path)` (as a running igpt writing `path` does) until
    its stdin is closed or it is killed; returns once the lock is held."""
    code = ("import sys; from igpt_cli.outputs import output_lock\n"
            "with output_lock(sys.argv[1]):\n    print('locked', flush=True); sys.stdin.read()")
    p = subprocess.Popen([sys.executable, "-c", code, str(path)], env=ENV, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def hf_causal_model(tmp: Path, n_layer=2, n_embd=64, n_head=4, n_positions=64, seed=0, vocab_size=513):
    """A random transformers ImageGPTForCausalImageModeling (LM head included) saved as a directory:
    (model, dir); non-trivial layer-norm gains, like `hf_model`."""
    from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

    torch.manual_seed(seed)
    cfg = ImageGPTConfig(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                         n_head=n_head)
    m = ImageGPTForCausalImageModeling(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "ln" in name:
                p.uniform_(0.5, 1.5)
    d = tmp / f"hf-causal-{n_layer}x{n_embd}-{seed}"
    m.save_pretrained(d)
    return m, d


def rows_done(path: Path) -> int:
    """`n_done` of a features/partial file another process is writing (0 while it cannot be read)."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            return int(f.attrs.get("n_done", 0))
    except Exception:
        return 0


def attrs_without_provenance(f: h5py.File) -> dict:
    """A file's attrs (`formats.read_attrs`) less its provenance (creation time and command line
    differ between two runs that write the same data)."""
    from igpt_cli.provenance import PROVENANCE_KEYS

    return {k: v for k, v in formats.read_attrs(f).items() if k not in PROVENANCE_KEYS}


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The igpt worker process of `rank` under a torchrun launcher (None: not started yet)."""
    for p in descendants(launcher_pid):
        try:
            env = Path(f"/proc/{p}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"igpt_cli" in cmd:
            return p
    return None
