"""Fault injection: every command against a folder of bad inputs and faults.

    python bench/fault_injection.py [--keep DIR] [--only SUBSTRING]

Builds small good inputs from the shipped demo data and model, then a set of broken
ones (missing, truncated, hostile, absurd, locked, disk full, killed), runs the `igpt`
command on each in a fresh output folder, and prints one table row per case: the exit
status (and whether it is the expected one), whether stderr is exactly one line, whether
a traceback appeared, and the files left in the output folder that should not be there
(temp files, lock files, partial outputs; a resumable partial file of a killed extract is
expected and not counted). The summary line counts cases, unexpected exit statuses,
tracebacks, multi-line errors and stray files; the promise is zero of each.

Disk-full cases need root (a small tmpfs is mounted); elsewhere they are reported as
skipped.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "igpt_cli" / "assets"
DEMO_TAR = ASSETS / "demo-cifar10.tar"
MODEL = ASSETS / "igpt-cifar8"
# a dataset large enough that a signal lands mid-run (the shared CIFAR-10 copy; the demo subset elsewhere)
BIG_DATA = next((p for p in (ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar",) if p.is_file()), DEMO_TAR)
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", COLUMNS="200")
for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(k, None)


@dataclass
class Case:
    name: str
    args: list                          # igpt arguments; "{out}" becomes the case's output folder
    expect: int = 2                     # expected exit status
    allowed: tuple = ()                 # file names the case may leave in its output folder
    setup: Callable | None = None       # setup(out_dir) -> None (e.g. create an existing output)
    run: Callable | None = None         # custom runner(case, out_dir) -> CompletedProcess-like
    needs_mount: bool = False
    result: dict = field(default_factory=dict)


def igpt(args, timeout=600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "igpt_cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout, **kw)


def mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True)


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def build_inputs(d: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    p: dict[str, Path] = {}

    def ok(args):
        r = igpt(args)
        assert r.returncode == 0, (args, r.stderr)

    # good inputs
    p["tokens"] = d / "tokens.h5"
    ok(["quantize", DEMO_TAR, "--split", "train", "--size", "8", "--palette", MODEL, "--limit", "300",
        "-o", p["tokens"], "-q"])
    p["tokens_big"] = d / "tokens-big.h5"
    ok(["quantize", DEMO_TAR, "--split", "all", "--size", "8", "--palette", MODEL, "-o", p["tokens_big"], "-q"])
    p["tokens4"] = d / "tokens4.h5"
    ok(["quantize", DEMO_TAR, "--split", "test", "--size", "4", "--limit", "50", "-o", p["tokens4"], "-q"])
    p["feats"] = d / "feats.h5"
    ok(["extract", p["tokens"], "--model", "pixels", "-o", p["feats"], "-q"])
    p["feats_model"] = d / "feats-model.h5"
    ok(["extract", p["tokens"], "--model", MODEL, "--layer", "1", "-o", p["feats_model"], "-q"])

    # image folders
    folder = d / "folder"
    for cls in ("cat", "dog"):
        (folder / "train" / cls).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            Image.fromarray(np.full((12, 12, 3), 40 * i, np.uint8)).save(folder / "train" / cls / f"{i}.png")
    p["folder"] = folder
    bad = d / "folder-corrupt"
    shutil.copytree(folder, bad)
    (bad / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    p["folder_corrupt"] = bad
    (d / "empty").mkdir(exist_ok=True)
    p["empty"] = d / "empty"
    p["txt"] = d / "notes.txt"
    p["txt"].write_text("hello")

    # archives: truncated tar / zip / tar.gz
    data = DEMO_TAR.read_bytes()
    p["tar_cut"] = d / "cut.tar"
    p["tar_cut"].write_bytes(data[: len(data) // 2 + 100])
    p["zip_cut"] = d / "cut.zip"
    with zipfile.ZipFile(d / "full.zip", "w") as z:
        with tarfile.open(DEMO_TAR) as tf:
            for i, m in enumerate(tf):
                if m.isfile() and i < 400:
                    z.writestr(m.name, tf.extractfile(m).read())
    zdata = (d / "full.zip").read_bytes()
    p["zip_cut"].write_bytes(zdata[: len(zdata) // 2])
    p["tgz_cut"] = d / "cut.tar.gz"
    compressed = gzip.compress(data)
    p["tgz_cut"].write_bytes(compressed[: len(compressed) // 2])
    p["tar_traversal"] = d / "traversal.tar"
    with tarfile.open(p["tar_traversal"], "w") as tf:
        for name in ("train/cat/0.png", "train/dog/0.png", "../evil/x.png", "/abs/y.png"):
            buf = io.BytesIO()
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="PNG")
            info = tarfile.TarInfo(name)
            info.size = len(buf.getvalue())
            tf.addfile(info, io.BytesIO(buf.getvalue()))

    # arrays
    p["npz_neg_label"] = d / "neg.npz"
    np.savez(p["npz_neg_label"], x=np.zeros((4, 8, 8, 3), np.uint8), y=np.array([0, 1, -5, 1]))
    p["npz_label_range"] = d / "range.npz"
    np.savez(p["npz_label_range"], x=np.zeros((4, 8, 8, 3), np.uint8), y=np.array([0, 1, 7, 1]),
             class_names=np.array(["a", "b"]))
    p["npy_object"] = d / "object.npy"
    np.save(p["npy_object"], np.array([{"a": 1}], dtype=object), allow_pickle=True)

    # hostile CIFAR pickle (would create a file if it ran)
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {d / 'PWNED'}",))

    cif = d / "cifar-evil"
    cif.mkdir(exist_ok=True)
    (cif / "batches.meta").write_bytes(pickle.dumps(Evil()))
    (cif / "data_batch_1").write_bytes(pickle.dumps(Evil()))
    p["cifar_evil"] = cif

    # decompression bomb: a small PNG of 13000 x 13000 pixels
    bomb = d / "bomb" / "train" / "cat"
    bomb.mkdir(parents=True, exist_ok=True)
    Image.new("L", (13000, 13000)).save(bomb / "bomb.png", optimize=True)
    p["bomb"] = d / "bomb"

    # palettes
    p["pal_shape"] = d / "pal-shape.npy"
    np.save(p["pal_shape"], np.zeros((4, 2), np.float32))
    p["pal_range"] = d / "pal-range.npy"
    np.save(p["pal_range"], np.full((4, 3), 5.0, np.float32))

    # HDF5 oddities
    p["not_h5"] = d / "not.h5"
    p["not_h5"].write_bytes(b"this is not HDF5")
    p["fake_format"] = d / "fake.h5"
    with h5py.File(p["fake_format"], "w") as f:
        f.attrs["format"] = "igpt-tokens"
        f.attrs["format_version"] = 1
        f.create_dataset("x", data=np.zeros(3))
    p["bad_class_names"] = d / "bad-names.h5"
    shutil.copy(p["tokens"], p["bad_class_names"])
    with h5py.File(p["bad_class_names"], "r+") as f:
        f.attrs["class_names"] = "{not json"
    p["no_palette"] = d / "no-palette.h5"
    shutil.copy(p["tokens"], p["no_palette"])
    with h5py.File(p["no_palette"], "r+") as f:
        del f["palette"]
    p["feats_incomplete"] = d / "feats-incomplete.h5"
    shutil.copy(p["feats"], p["feats_incomplete"])
    with h5py.File(p["feats_incomplete"], "r+") as f:
        f.attrs["complete"] = False
    p["feats_one_class"] = d / "feats-one-class.h5"
    shutil.copy(p["feats"], p["feats_one_class"])
    with h5py.File(p["feats_one_class"], "r+") as f:
        f["labels"][:] = 0
    p["tokens_high"] = d / "tokens-high.h5"
    shutil.copy(p["tokens"], p["tokens_high"])
    with h5py.File(p["tokens_high"], "r+") as f:
        t = f["tokens"][:]
        t[0, 0] = 600
        f["tokens"][:] = t

    # models
    def model_variant(name, edit=None, weights=None):
        m = d / name
        shutil.copytree(MODEL, m)
        if edit:
            cfg = json.loads((m / "config.json").read_text())
            cfg.update(edit)
            (m / "config.json").write_text(json.dumps(cfg))
        if weights is not None:
            (m / "model.safetensors").unlink()
            (m / weights[0]).write_bytes(weights[1])
        return m

    p["model_heads"] = model_variant("model-heads", {"n_head": 5})
    p["model_huge"] = model_variant("model-huge", {"n_embd": 65536})
    p["model_trunc"] = model_variant("model-trunc", weights=("model.safetensors",
                                                            (MODEL / "model.safetensors").read_bytes()[:1000]))
    p["model_evil"] = model_variant("model-evil", weights=("pytorch_model.bin", pickle.dumps(Evil())))
    p["model_noconfig"] = model_variant("model-noconfig")
    (p["model_noconfig"] / "config.json").unlink()
    p["pwned"] = d / "PWNED"
    return p


# ---------------------------------------------------------------------------------------------
# special runners
# ---------------------------------------------------------------------------------------------
class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_with_sigterm(args, out: Path, wait_for: str, after_s: float = 0.0) -> Result:
    proc = subprocess.Popen([sys.executable, "-m", "igpt_cli", *map(str, args)], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob(wait_for)) and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(after_s)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    return Result(proc.returncode, stdout, stderr)


def run_concurrent(args, out: Path) -> Result:
    """Start one run, wait for its lock, start a second on the same output: the second is the case."""
    first = subprocess.Popen([sys.executable, "-m", "igpt_cli", *map(str, args)], env=ENV, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob(".*.lock")) and first.poll() is None:
        time.sleep(0.05)
    second = igpt(args)
    first.wait(timeout=600)  # let the first one finish: its output is expected
    return Result(second.returncode, second.stdout, second.stderr)


def fill_disk(out: Path) -> None:
    """Leave almost no room on the case's tmpfs."""
    with open(out / "ballast", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    (out / "ballast").unlink()
    big = out / "ballast"
    with open(big, "wb") as f:
        try:
            f.write(b"\0" * (os.statvfs(out).f_bavail * os.statvfs(out).f_frsize - 64 * 1024))
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------------------------
def cases(p: dict[str, Path]) -> list[Case]:
    O = "{out}"
    exists = lambda name: (lambda out: (out / name).write_text("precious"))  # noqa: E731
    subdir = lambda name: (lambda out: (out / name).mkdir())  # noqa: E731
    c = [
        # quantize
        Case("quantize: missing input", ["quantize", p["txt"].with_name("nope"), "-o", f"{O}/o.h5"]),
        Case("quantize: unknown format", ["quantize", p["txt"], "-o", f"{O}/o.h5"]),
        Case("quantize: corrupt image", ["quantize", p["folder_corrupt"], "-o", f"{O}/o.h5"]),
        Case("quantize: corrupt image, --skip-bad", ["quantize", p["folder_corrupt"], "--skip-bad", "-o", f"{O}/o.h5"],
             expect=0, allowed=("o.h5",)),
        Case("quantize: empty folder", ["quantize", p["empty"], "-o", f"{O}/o.h5"]),
        Case("quantize: bad split choice", ["quantize", p["folder"], "--split", "banana", "-o", f"{O}/o.h5"]),
        Case("quantize: split not present", ["quantize", p["folder"], "--split", "val", "-o", f"{O}/o.h5"]),
        Case("quantize: palette of wrong shape", ["quantize", p["folder"], "--palette", p["pal_shape"], "-o", f"{O}/o.h5"]),
        Case("quantize: palette out of range", ["quantize", p["folder"], "--palette", p["pal_range"], "-o", f"{O}/o.h5"]),
        Case("quantize: output dir missing", ["quantize", p["folder"], "-o", f"{O}/no/such/dir/o.h5"]),
        Case("quantize: output is a directory", ["quantize", p["folder"], "-o", f"{O}/d.h5", "--overwrite"],
             setup=subdir("d.h5"), allowed=("d.h5",)),
        Case("quantize: output exists", ["quantize", p["folder"], "-o", f"{O}/o.h5"], setup=exists("o.h5"),
             allowed=("o.h5",)),
        Case("quantize: truncated tar", ["quantize", p["tar_cut"], "--size", "8", "-o", f"{O}/o.h5"]),
        Case("quantize: truncated zip", ["quantize", p["zip_cut"], "--size", "8", "-o", f"{O}/o.h5"]),
        Case("quantize: truncated tar.gz", ["quantize", p["tgz_cut"], "--size", "8", "-o", f"{O}/o.h5"]),
        Case("quantize: size 0", ["quantize", p["folder"], "--size", "0", "-o", f"{O}/o.h5"]),
        Case("quantize: size 100000", ["quantize", p["folder"], "--size", "100000", "-o", f"{O}/o.h5"]),
        Case("quantize: limit 0", ["quantize", p["folder"], "--limit", "0", "-o", f"{O}/o.h5"]),
        Case("quantize: npz label -5", ["quantize", p["npz_neg_label"], "-o", f"{O}/o.h5"]),
        Case("quantize: npz label beyond class names", ["quantize", p["npz_label_range"], "-o", f"{O}/o.h5"]),
        Case("quantize: npy object array (pickle)", ["quantize", p["npy_object"], "-o", f"{O}/o.h5"]),
        Case("quantize: hostile CIFAR pickle", ["quantize", p["cifar_evil"], "-o", f"{O}/o.h5"]),
        Case("quantize: decompression bomb", ["quantize", p["bomb"], "-o", f"{O}/o.h5"]),
        Case("quantize: tar member ../ and /abs (skipped, warned)", ["quantize", p["tar_traversal"], "--size", "8",
             "-o", f"{O}/o.h5"], expect=0, allowed=("o.h5",)),
        Case("quantize: SIGTERM mid-run", ["quantize", BIG_DATA, "--size", "32", "-o", f"{O}/o.h5"], expect=143,
             run=lambda case, out: run_with_sigterm(case.args, out, ".o.h5.tmp", 0.3)),
        Case("quantize: disk full", ["quantize", DEMO_TAR, "--size", "32", "-o", f"{O}/o.h5"], needs_mount=True),
        Case("quantize: bad --format choice", ["quantize", p["folder"], "--format", "bogus", "-o", f"{O}/o.h5"]),
        # palette fit
        Case("palette fit: k 0", ["palette", "fit", p["folder"], "-k", "0", "-o", f"{O}/p.npy"]),
        Case("palette fit: missing input", ["palette", "fit", p["txt"].with_name("nope"), "-o", f"{O}/p.npy"]),
        # extract
        Case("extract: tokens missing", ["extract", p["txt"].with_name("nope.h5"), "-m", MODEL, "-o", f"{O}/f.h5"]),
        Case("extract: not HDF5", ["extract", p["not_h5"], "-m", MODEL, "-o", f"{O}/f.h5"]),
        Case("extract: features file as tokens", ["extract", p["feats"], "-m", MODEL, "-o", f"{O}/f.h5"]),
        Case("extract: fake igpt file", ["extract", p["fake_format"], "-m", MODEL, "-o", f"{O}/f.h5"]),
        Case("extract: malformed class_names", ["extract", p["bad_class_names"], "-m", MODEL, "-o", f"{O}/f.h5"]),
        Case("extract: model dir missing", ["extract", p["tokens"], "-m", p["txt"].with_name("nomodel"), "-o", f"{O}/f.h5"]),
        Case("extract: model without config", ["extract", p["tokens"], "-m", p["model_noconfig"], "-o", f"{O}/f.h5"]),
        Case("extract: config n_head 5", ["extract", p["tokens"], "-m", p["model_heads"], "-o", f"{O}/f.h5"]),
        Case("extract: config n_embd 65536", ["extract", p["tokens"], "-m", p["model_huge"], "-o", f"{O}/f.h5"]),
        Case("extract: truncated safetensors", ["extract", p["tokens"], "-m", p["model_trunc"], "-o", f"{O}/f.h5"]),
        Case("extract: hostile pickle weights", ["extract", p["tokens"], "-m", p["model_evil"], "-o", f"{O}/f.h5"]),
        Case("extract: image size mismatch", ["extract", p["tokens4"], "-m", MODEL, "-o", f"{O}/f.h5"]),
        Case("extract: tokens beyond palette", ["extract", p["tokens_high"], "-m", MODEL, "-o", f"{O}/f.h5"]),
        Case("extract: layer 99", ["extract", p["tokens"], "-m", MODEL, "-l", "99", "-o", f"{O}/f.h5"]),
        Case("extract: bad --dtype choice", ["extract", p["tokens"], "-m", MODEL, "--dtype", "float99", "-o", f"{O}/f.h5"]),
        Case("extract: batch size 0", ["extract", p["tokens"], "-m", MODEL, "-b", "0", "-o", f"{O}/f.h5"]),
        Case("extract: unknown device", ["extract", p["tokens"], "-m", MODEL, "--device", "quantum", "-o", f"{O}/f.h5"]),
        Case("extract: output is a directory", ["extract", p["tokens"], "-m", MODEL, "-o", f"{O}/d.h5", "--overwrite"],
             setup=subdir("d.h5"), allowed=("d.h5",)),
        Case("extract: output exists", ["extract", p["tokens"], "-m", MODEL, "-o", f"{O}/f.h5"], setup=exists("f.h5"),
             allowed=("f.h5",)),
        Case("extract: two runs, same output", ["extract", p["tokens_big"], "-m", MODEL, "-b", "1", "--dtype",
             "float32", "-o", f"{O}/f.h5", "-q"], allowed=("f.h5",),
             run=lambda case, out: run_concurrent(case.args, out)),
        Case("extract: SIGTERM mid-run (partial kept)", ["extract", p["tokens_big"], "-m", MODEL, "-b", "1",
             "-o", f"{O}/f.h5"], expect=143, allowed=(".f.h5.tmp",),
             run=lambda case, out: run_with_sigterm(case.args, out, ".f.h5.tmp", 1.0)),
        Case("extract: disk full (partial kept)", ["extract", p["tokens_big"], "-m", MODEL, "-o", f"{O}/f.h5"],
             needs_mount=True, allowed=(".f.h5.tmp",)),
        # probe
        Case("probe: not a features file", ["probe", p["tokens"]]),
        Case("probe: not HDF5", ["probe", p["not_h5"]]),
        Case("probe: incomplete features", ["probe", p["feats_incomplete"]]),
        Case("probe: single class", ["probe", p["feats_one_class"]]),
        Case("probe: mismatched test file", ["probe", p["feats"], "--test", p["feats_model"]]),
        Case("probe: layer 7", ["probe", p["feats"], "-l", "7"]),
        Case("probe: test fraction 2", ["probe", p["feats"], "--test-fraction", "2"]),
        Case("probe: jobs 0", ["probe", p["feats"], "--jobs", "0"]),
        Case("probe: plot with unknown extension", ["probe", p["feats"], "--plot", f"{O}/p.xyz"]),
        Case("probe: plot is a directory", ["probe", p["feats"], "--plot", f"{O}/p.png", "--overwrite"],
             setup=subdir("p.png"), allowed=("p.png",)),
        Case("probe: csv exists", ["probe", p["feats"], "--csv", f"{O}/p.csv"], setup=exists("p.csv"),
             allowed=("p.csv",)),
        # train
        Case("train: no --steps", ["train", p["tokens"], "-o", f"{O}/m"]),
        Case("train: tokens missing", ["train", p["txt"].with_name("nope.h5"), "-o", f"{O}/m", "--steps", "2"]),
        Case("train: width 65536", ["train", p["tokens"], "-o", f"{O}/m", "--steps", "2", "--width", "65536"]),
        Case("train: lr nan", ["train", p["tokens"], "-o", f"{O}/m", "--steps", "2", "--lr", "nan"]),
        Case("train: heads do not divide width", ["train", p["tokens"], "-o", f"{O}/m", "--steps", "2", "--width",
             "30", "--heads", "4"]),
        Case("train: tokens beyond palette", ["train", p["tokens_high"], "-o", f"{O}/m", "--steps", "2"]),
        Case("train: output is a file", ["train", p["tokens"], "-o", f"{O}/m", "--steps", "2"], setup=exists("m"),
             allowed=("m",)),
        Case("train: resume without state", ["train", p["tokens"], "-o", f"{O}/m", "--resume"]),
        Case("train: resume hostile state", ["train", p["tokens"], "-o", f"{O}/m", "--resume"], allowed=("m",),
             setup=lambda out: ((out / "m").mkdir(), (out / "m" / "train_state.pt").write_bytes(pickle.dumps(
                 type("E", (), {"__reduce__": lambda s: (os.system, (f"touch {p['pwned']}",))})())))),
        Case("train: resume truncated state", ["train", p["tokens"], "-o", f"{O}/m", "--resume"], allowed=("m",),
             setup=lambda out: ((out / "m").mkdir(), (out / "m" / "train_state.pt").write_bytes(b"PK\x03\x04trunc"))),
        Case("train: disk full", ["train", p["tokens"], "-o", f"{O}/m", "--steps", "4", "--depth", "2", "--width",
             "64", "--heads", "2", "--checkpoint-every", "1"], needs_mount=True, allowed=("m",)),
        # sample / complete / score
        Case("sample: n 0", ["sample", MODEL, "-n", "0", "-o", f"{O}/s.h5"]),
        Case("sample: negative temperature", ["sample", MODEL, "-n", "2", "-t", "-1", "-o", f"{O}/s.h5"]),
        Case("sample: top-p 1.5", ["sample", MODEL, "-n", "2", "--top-p", "1.5", "-o", f"{O}/s.h5"]),
        Case("sample: output exists", ["sample", MODEL, "-n", "2", "-o", f"{O}/s.h5"], setup=exists("s.h5"),
             allowed=("s.h5",)),
        Case("sample: SIGTERM mid-run (partial kept)", ["sample", MODEL, "-n", "4000", "-b", "8", "-o", f"{O}/s.h5"],
             expect=143, allowed=(".s.h5.tmp",), run=lambda case, out: run_with_sigterm(case.args, out, ".s.h5.tmp", 1.0)),
        Case("complete: keep rows 99", ["complete", p["tokens"], "-m", MODEL, "--keep-rows", "99", "-o", f"{O}/c.h5"]),
        Case("complete: image size mismatch", ["complete", p["tokens4"], "-m", MODEL, "-o", f"{O}/c.h5"]),
        Case("score: tokens beyond palette", ["score", p["tokens_high"], "-m", MODEL, "-o", f"{O}/sc.h5"]),
        Case("score: hostile pickle weights", ["score", p["tokens"], "-m", p["model_evil"], "-o", f"{O}/sc.h5"]),
        # info / show
        Case("info: missing", ["info", p["txt"].with_name("nope.h5")]),
        Case("info: not HDF5", ["info", p["not_h5"]]),
        Case("info: fake igpt file (summarised as it is)", ["info", p["fake_format"]], expect=0),
        Case("info: malformed class_names", ["info", p["bad_class_names"]]),
        Case("show: no palette", ["show", p["no_palette"], "-o", f"{O}/g.png"]),
        Case("show: fake igpt file", ["show", p["fake_format"], "-o", f"{O}/g.png"]),
        Case("show: scale 100000", ["show", p["tokens"], "-o", f"{O}/g.png", "--scale", "100000"]),
        Case("show: n 0", ["show", p["tokens"], "-o", f"{O}/g.png", "--n", "0"]),
        Case("show: unknown extension", ["show", p["tokens"], "-o", f"{O}/g.xyz"]),
        Case("show: jpg written as JPEG", ["show", p["tokens"], "-o", f"{O}/g.jpg"], expect=0, allowed=("g.jpg",)),
        Case("show: output is a directory", ["show", p["tokens"], "-o", f"{O}/g.png", "--overwrite"],
             setup=subdir("g.png"), allowed=("g.png",)),
        # the command line itself
        Case("cli: no such command", ["bogus"]),
        Case("cli: unknown option", ["quantize", p["folder"], "-o", f"{O}/o.h5", "--no-such-flag"]),
    ]
    return c


def run_case(case: Case, work: Path) -> None:
    out = work / case.name.replace(" ", "_").replace(":", "").replace("/", "_").replace(",", "")
    out.mkdir(parents=True)
    mounted = False
    if case.needs_mount:
        mounted = mount_tmpfs(out, "600k")
        if not mounted:
            case.result = dict(skipped="cannot mount a tmpfs (needs root)")
            return
        fill_disk(out)
    try:
        if case.setup:
            case.setup(out)
        before = {f.name for f in out.iterdir()} - {"ballast"}
        args = [str(a).replace("{out}", str(out)) for a in case.args]
        case.args = args
        r = case.run(case, out) if case.run else igpt(args)
        left = sorted(f.name for f in out.iterdir() if f.name != "ballast")
        stray = [f for f in left if f not in case.allowed and f not in before]
        stray += [f for f in left if f.startswith(".") and f not in case.allowed]
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        case.result = dict(code=r.returncode, ok_code=r.returncode == case.expect,
                           one_line=(len(lines) == 1) if r.returncode not in (0,) else True,
                           traceback="Traceback" in r.stderr, stray=sorted(set(stray)),
                           line=lines[0][:110] if lines else "")
    finally:
        if mounted:
            umount(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="keep inputs and outputs in this directory")
    ap.add_argument("--only", help="run the cases whose name contains this")
    args = ap.parse_args()
    base = args.keep or Path(tempfile.mkdtemp(prefix="igpt-faults-"))
    t0 = time.time()
    inputs = build_inputs(base / "inputs")
    all_cases = [c for c in cases(inputs) if not args.only or args.only in c.name]
    for c in all_cases:
        run_case(c, base / "work")
        r = c.result
        if "skipped" in r:
            print(f"{c.name:55s} skipped: {r['skipped']}", flush=True)
            continue
        flag = "" if r["ok_code"] and r["one_line"] and not r["traceback"] and not r["stray"] else "  <-- FAULT"
        print(f"{c.name:55s} exit {r['code']:>3} (want {c.expect:>3})  one line: {'yes' if r['one_line'] else 'NO '}  "
              f"traceback: {'YES' if r['traceback'] else 'no '}  stray: {','.join(r['stray']) or '-'}{flag}\n"
              f"{'':57s}{r['line']}", flush=True)
    done = [c for c in all_cases if "skipped" not in c.result]
    bad_code = sum(not c.result["ok_code"] for c in done)
    tracebacks = sum(c.result["traceback"] for c in done)
    multi = sum(not c.result["one_line"] for c in done)
    stray = sum(bool(c.result["stray"]) for c in done)
    pwned = inputs["pwned"].exists()
    print(f"\n{len(all_cases)} cases ({len(all_cases) - len(done)} skipped) in {time.time() - t0:.0f} s: "
          f"{bad_code} unexpected exit statuses, {tracebacks} tracebacks, {multi} multi-line errors, "
          f"{stray} with stray files; hostile pickles ran code: {'YES' if pwned else 'no'}")
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return 0 if not (bad_code or tracebacks or multi or stray or pwned) else 1


if __name__ == "__main__":
    sys.exit(main())
