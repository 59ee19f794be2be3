"""Fault injection: every command against a folder of bad inputs and faults.

    python bench/fault_injection.py [--keep DIR] [--only SUBSTRING] [--markdown]

Builds small good inputs from the shipped demo data and model, then a set of broken
ones (missing, truncated, hostile, absurd, locked, disk full, killed), runs the `igpt`
command on each in a fresh output folder, and prints one table row per case: the exit
status (and whether it is the expected one), whether stderr is exactly one line, whether
a traceback appeared, and the files left in the output folder that should not be there
(temp files, lock files, partial outputs; a resumable partial file of a killed extract is
expected and not counted), whether an input changed (every file under the inputs folder is
compared before and after each case: size, mtime, inode), and what a case checks besides
(`verify`: a victim file behind a planted lock symlink untouched, the finished output of a
first run not replaced by a second, features equal to the reference, …). A case that fails
any of these is a FAULT. The end is a table of command × cause (ok / FAULT, `--markdown`
prints it for the README), a check that all of `igpt --help`'s commands have cases, and the
number of faults; the promise is zero.

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
CACHE_ROOT = Path(tempfile.mkdtemp(prefix="igpt-faults-cache-"))  # conversion and hub caches of this run
ENV.update(IGPT_CACHE=str(CACHE_ROOT / "igpt"), HF_HUB_CACHE=str(CACHE_ROOT / "hub"), HF_HUB_OFFLINE="1")
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
    verify: Callable | None = None      # verify(out_dir, result) -> None, or what is wrong (a FAULT)
    env: dict | None = None             # extra environment variables
    mount_size: str = "600k"
    result: dict = field(default_factory=dict)

    @property
    def command(self) -> str:
        return self.name.split(":", 1)[0]

    @property
    def cause(self) -> str:
        return self.name.split(":", 1)[1].strip() if ":" in self.name else ""


def igpt(args, timeout=600, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "igpt_cli", *map(str, args)], capture_output=True, text=True,
                          env=dict(ENV, **(env or {})), timeout=timeout, errors="backslashreplace", **kw)


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
    ok(["quantize", DEMO_TAR, "--split", "train", "--size", "8", "--palette", MODEL, "--limit-per-class", "30",
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
    build_round3_inputs(d, p, ok)
    return p


FIXTURES = ROOT / "tests" / "fixtures" / "tf" / "ar"


def build_round3_inputs(d: Path, p: dict, ok: Callable) -> None:
    """The inputs of round 3's causes: probes (good and malformed), NaN features, copies of a TF
    checkpoint (good, damaged), a hostile Hugging Face cache, odd WebDataset shards, odd names."""
    # features for predict / probe, and probes
    p["tokens_test"] = d / "tokens-test.h5"
    ok(["quantize", DEMO_TAR, "--split", "test", "--size", "8", "--palette", MODEL, "--limit-per-class", "10",
        "-o", p["tokens_test"], "-q"])
    p["feats_test"] = d / "feats-test.h5"
    ok(["extract", p["tokens_test"], "--model", "pixels", "-o", p["feats_test"], "-q"])
    p["probes"] = d / "probes.h5"
    ok(["probe", p["feats"], "--test", p["feats_test"], "--save-probes", p["probes"], "-q"])

    def probes_variant(name, edit):
        q = d / name
        shutil.copy(p["probes"], q)
        with h5py.File(q, "r+") as f:
            edit(f)
        return q

    def first(f):
        return f["probes"][next(iter(f["probes"]))]

    def narrow_coef(f):
        g = first(f)
        coef = g["coef"][()]
        del g["coef"]
        g["coef"] = coef[:, :-3]

    def zero_scale(f):
        g = first(f)
        g["scale"][...] = 0

    def nan_coef(f):
        g = first(f)
        c = g["coef"][()]
        c[0, 0] = np.nan
        g["coef"][...] = c

    p["probes_narrow"] = probes_variant("probes-narrow.h5", narrow_coef)
    p["probes_zero_scale"] = probes_variant("probes-zero-scale.h5", zero_scale)
    p["probes_bad_names"] = probes_variant("probes-bad-names.h5", lambda f: f.attrs.__setitem__("class_names", "{x"))
    p["probes_empty"] = probes_variant("probes-empty.h5", lambda f: f.__delitem__("probes"))
    p["probes_nan"] = probes_variant("probes-nan.h5", nan_coef)
    p["feats_nan"] = d / "feats-nan.h5"
    shutil.copy(p["feats_test"], p["feats_nan"])
    with h5py.File(p["feats_nan"], "r+") as f:
        ds = f["features"][next(iter(f["features"]))]
        row = ds[0]
        row[0] = np.nan
        ds[0] = row

    # OpenAI TF checkpoints: a good copy (fills the cache), and damaged copies with the same index
    def tf_copy(name, damage=None):
        q = d / name
        q.mkdir()
        for f in FIXTURES.glob("model.ckpt-7.*"):
            shutil.copy(f, q / f.name)
        prefix = q / "model.ckpt-7"
        if damage == "flip":
            from igpt_cli.model.tf_checkpoint import TFCheckpoint

            e = TFCheckpoint(prefix).entries["model/h1/mlp/c_fc/w"]
            shard = Path(f"{prefix}.data-{e.shard_id:05d}-of-00002")
            data = bytearray(shard.read_bytes())
            data[e.offset + e.size // 2] ^= 0x55
            shard.write_bytes(bytes(data))
        elif damage in ("delete", "none"):
            for i in ([1] if damage == "delete" else [0, 1]):
                Path(f"{prefix}.data-0000{i}-of-00002").unlink()
        return prefix

    p["tf_good"] = tf_copy("tf-good")
    p["tf_flip"] = tf_copy("tf-flipped", "flip")
    p["tf_delete"] = tf_copy("tf-deleted-shard", "delete")
    p["tf_none"] = tf_copy("tf-no-shards", "none")
    p["tokens_tf"] = d / "tokens-4x4.h5"
    ok(["quantize", DEMO_TAR, "--split", "test", "--size", "4", "--limit", "12", "-o", p["tokens_tf"], "-q"])
    p["feats_tf_ref"] = d / "feats-tf-ref.h5"
    ok(["extract", p["tokens_tf"], "-m", p["tf_good"], "-l", "1", "--dtype", "float32", "--device", "cpu",
        "-o", p["feats_tf_ref"], "-q"])  # fills the conversion cache (IGPT_CACHE) with the good checkpoint

    # a Hugging Face cache whose one snapshot has a config.json that is a symlink to /dev/zero
    hub = CACHE_ROOT / "hub" / "models--org--evil"
    snap = hub / "snapshots" / ("e" * 40)
    snap.mkdir(parents=True)
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("e" * 40)
    shutil.copy(MODEL / "model.safetensors", snap / "model.safetensors")
    (snap / "config.json").symlink_to("/dev/zero")

    # Hugging Face caches of their own (igpt models reads one each): a good snapshot whose refs/main is a
    # FIFO a co-user planted (would block a reader forever), or a sparse file of a terabyte (read whole: OOM)
    for kind in ("fifo", "huge"):
        repo = CACHE_ROOT / f"hub-{kind}" / "models--org--planted"
        (repo / "snapshots" / ("c" * 40)).mkdir(parents=True)
        (repo / "refs").mkdir()
        for f in ("config.json", "model.safetensors", "preprocessor_config.json"):
            shutil.copy(MODEL / f, repo / "snapshots" / ("c" * 40) / f)
        if kind == "fifo":
            os.mkfifo(repo / "refs" / "main")
        else:
            with open(repo / "refs" / "main", "wb") as fh:
                fh.truncate(1 << 40)
        p[f"hub_{kind}"] = CACHE_ROOT / f"hub-{kind}"

    # WebDataset shards: a label beyond any integer type, and a sample without a label
    png = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(png, format="PNG")

    def shard(name, samples):
        q = d / name
        with tarfile.open(q, "w") as tf:
            for key, files in samples:
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        return q

    p["wds_huge_cls"] = shard("wds-huge-cls.tar", [("a", {"png": png.getvalue(), "cls": b"99999999999999999999"}),
                                                   ("b", {"png": png.getvalue(), "cls": b"0"})])
    p["wds_no_cls"] = shard("wds-no-cls.tar", [("a", {"png": png.getvalue(), "cls": b"1"}),
                                               ("b", {"png": png.getvalue()}), ("c", {"png": png.getvalue(), "cls": b"0"})])
    # an image named with bytes that are not UTF-8
    odd = d / "folder-odd-name" / "train" / "cat"
    odd.mkdir(parents=True)
    Image.fromarray(np.full((8, 8, 3), 30, np.uint8)).save(odd / b"a\xff.png".decode("utf-8", "surrogateescape"),
                                                           format="PNG")
    Image.fromarray(np.full((8, 8, 3), 60, np.uint8)).save(odd / "b.png")
    p["folder_odd"] = d / "folder-odd-name"
    # an Arrow (IPC stream) file cut in half
    import pyarrow as pa

    rows = [{"bytes": png.getvalue(), "path": f"{i}.png"} for i in range(64)]
    table = pa.table({"image": rows, "label": list(range(2)) * 32})
    full = d / "full.arrow"
    with pa.OSFile(str(full), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        for i in range(0, 64, 8):
            w.write_table(table.slice(i, 8))
    data = full.read_bytes()
    p["arrow_cut"] = d / "cut.arrow"
    p["arrow_cut"].write_bytes(data[: len(data) // 2])
    # a features file made from images with one bad image (for the --skip-bad rerun)
    p["pal_random"] = d / "pal-random.npy"
    np.save(p["pal_random"], np.random.default_rng(5).uniform(-1, 1, (512, 3)).astype(np.float32))
    p["tokens_otherpal"] = d / "tokens-other-palette.h5"
    ok(["quantize", DEMO_TAR, "--split", "test", "--size", "8", "--palette", p["pal_random"], "--limit", "10",
        "-o", p["tokens_otherpal"], "-q"])
    p["model_copy"] = d / "model-copy"
    shutil.copytree(MODEL, p["model_copy"])
    p["sweep_ck"] = d / "sweep-ck" / "step-000002"
    shutil.copytree(MODEL, p["sweep_ck"])
    # finetune: tokens without labels (sampled from the model: its size and palette), a BERT checkpoint
    p["tokens_unlabelled"] = d / "tokens-unlabelled.h5"
    ok(["sample", MODEL, "-n", "8", "--seed", "1", "-o", p["tokens_unlabelled"], "-q"])
    bert = d / "tf-bert"
    bert.mkdir()
    for f in (FIXTURES.parent / "bert").glob("model.ckpt-7.*"):
        shutil.copy(f, bert / f.name)
    p["tf_bert"] = bert / "model.ckpt-7"


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


def run_with_sigint(args, out: Path, wait_for: str, delay: float) -> Result:
    """Ctrl-C (SIGINT, as a terminal sends it) `delay` s after `wait_for` appears; a run still alive
    10 s later is a hang (killed, reported as exit status -9)."""
    proc = subprocess.Popen([sys.executable, "-m", "igpt_cli", *map(str, args)], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob(wait_for)) and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(delay)
    if proc.poll() is not None:   # the run was faster than the case: say so (the case did not test Ctrl-C)
        stdout, stderr = proc.communicate()
        return Result(proc.returncode, stdout, stderr + f"\nfinished before the Ctrl-C ({delay:.2f} s after "
                      f"{wait_for} appeared): shorten the case's delay for this machine")
    proc.send_signal(signal.SIGINT)
    try:
        stdout, stderr = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        return Result(-9, stdout, stderr + "\nhung after Ctrl-C: killed")
    return Result(proc.returncode, stdout, stderr)


def run_second_after_tmp(first_args, out: Path, tmp_name: str):
    """Start `first_args`; once its temp file appears, run the case's own args on the same output."""
    def runner(case, out_dir):
        first = subprocess.Popen([sys.executable, "-m", "igpt_cli", *[str(a).replace("{out}", str(out_dir))
                                                                       for a in first_args]],
                                 env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while time.time() < deadline and not (out_dir / tmp_name).exists() and first.poll() is None:
            time.sleep(0.02)
        time.sleep(0.5)
        second = igpt(case.args)
        first.wait(timeout=600)
        return Result(second.returncode, second.stdout, second.stderr)
    return runner


def run_closed_stdout(case, out: Path) -> Result:
    """`igpt … | head` whose reader is gone before the first write: stdout is a pipe nobody reads."""
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([sys.executable, "-m", "igpt_cli", *case.args], stdout=w, stderr=subprocess.PIPE,
                           text=True, env=ENV, timeout=600, errors="backslashreplace")
    finally:
        os.close(w)
    return Result(p.returncode, "", p.stderr)


def rows_of(path: Path, dataset: str) -> int | None:
    try:
        with h5py.File(path, "r") as f:
            return len(f[dataset])
    except (OSError, KeyError):
        return None


USER_FILES = ("report.json", "metrics.jsonl", "loss.png", "notes.txt")


def user_files(name: str) -> Callable:
    """Setup: an existing output directory `name` holding the user's files named as a run's outputs."""
    def setup(out: Path) -> None:
        (out / name).mkdir()
        for f in USER_FILES:
            (out / name / f).write_text("precious")
    return setup


def user_files_untouched(name: str) -> Callable:
    def verify(out: Path, result) -> str | None:
        d = out / name
        changed = [f for f in USER_FILES if not (d / f).is_file() or (d / f).read_text() != "precious"]
        added = sorted(set(os.listdir(d)) - set(USER_FILES))
        return f"the user's files changed: {changed}, added: {added}" if changed or added else None
    return verify


def victim_untouched(out: Path, result) -> str | None:
    text = (out / "victim.txt").read_text() if (out / "victim.txt").exists() else None
    return None if text == "precious" else f"the file behind the planted lock symlink now holds {text!r}"


def plant_lock(name: str) -> Callable:
    def setup(out: Path) -> None:
        (out / "victim.txt").write_text("precious")
        (out / f".{name}.lock").symlink_to("victim.txt")
    return setup


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
        Case("quantize: output dir under a file", ["quantize", p["folder"], "-o", f"{O}/f.txt/sub/o.h5"],
             setup=exists("f.txt"), allowed=("f.txt",)),  # a missing directory is created; under a file it cannot be
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
        Case("train: -o holds the user's metrics.jsonl, loss.png", ["train", p["tokens"], "-o", f"{O}/m", "--steps",
             "1", "--depth", "1", "--width", "16", "--heads", "1", "--batch-size", "4"], allowed=("m",),
             setup=user_files("m"), verify=user_files_untouched("m")),
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
        # demo
        Case("demo: --out is a file", ["demo", "--out", f"{O}/d", "-q"], setup=exists("d"), allowed=("d",)),
        Case("demo: --out holds other files", ["demo", "--out", f"{O}/d", "-q"], allowed=("d",),
             setup=lambda out: ((out / "d").mkdir(), (out / "d" / "notes.txt").write_text("mine"))),
        Case("demo: model missing", ["demo", "--out", f"{O}/d", "--model", p["txt"].with_name("no-such-model"), "-q"]),
        # the command line itself
        Case("cli: no such command", ["bogus"]),
        Case("cli: unknown option", ["quantize", p["folder"], "-o", f"{O}/o.h5", "--no-such-flag"]),
    ]
    return c + round3_cases(p) + finetune_cases(p)


def round3_cases(p: dict[str, Path]) -> list[Case]:
    """Hardening round 3's causes, on every command that can have them."""
    O = "{out}"
    M = MODEL
    link_to = lambda name, target: (lambda out: (out / name).symlink_to(target))  # noqa: E731
    S = "99999999999999999999999"  # a seed beyond 2**64 - 1
    odd = "o" + b"\xff".decode("utf-8", "surrogateescape") + ".h5"  # an output name that is not UTF-8

    def same_features(out: Path, result) -> str | None:
        with h5py.File(out / "f.h5", "r") as a, h5py.File(p["feats_tf_ref"], "r") as b:
            if not np.array_equal(a["features/1"][()], b["features/1"][()]):
                return "features differ from the good checkpoint's"
        return None

    def first_run_kept(name: str, dataset: str, want: int):
        def verify(out: Path, result) -> str | None:
            got = rows_of(out / name, dataset)
            return None if got == want else f"{name} holds {got} rows, not the first run's {want}"
        return verify

    def nothing_outside(out: Path, result) -> str | None:
        extra = sorted(f.name for f in out.iterdir() if f.name != "sw")
        return f"wrote outside -o: {extra}" if extra else None

    def warned(needle):
        return lambda out, result: None if needle in result.stderr else f"no warning naming {needle!r}"

    def names_file(path):
        return lambda out, result: None if str(path) in result.stderr else f"the message does not name {path}"

    def edited_result_not_reused(out: Path, result) -> str | None:
        doc = json.loads(result.stdout) if result.stdout.strip().startswith("{") else {}
        text = json.dumps(doc)
        return "the edited result.json was reused as is" if "12345.5" in text else None

    def edit_result(out: Path) -> None:
        r = igpt(["sweep", p["sweep_ck"], "--train", p["tokens"], "--test", p["tokens_test"], "-l", "1",
                  "-o", out / "sw", "-q", "--device", "cpu"])
        assert r.returncode == 0, r.stderr
        for res in (out / "sw").rglob("result.json"):
            doc = json.loads(res.read_text())
            key = next(k for k, v in doc["result"].items() if isinstance(v, float))
            doc["result"][key] = 12345.5
            res.write_text(json.dumps(doc))

    def bad_image_then(out: Path) -> None:
        r = igpt(["features", p["folder_corrupt"], "-m", M, "-l", "1", "-o", out / "f.h5", "-q"])
        assert r.returncode == 2, r.stderr

    def corrupt_cache(out: Path) -> None:
        for w in (CACHE_ROOT / "igpt" / "converted").glob("*/model.safetensors"):
            data = bytearray(w.read_bytes())
            data[len(data) - 40] ^= 0x55
            w.write_bytes(bytes(data))

    sigint = [Case(f"quantize: Ctrl-C mid-run ({k + 1})", ["quantize", BIG_DATA, "--split", "test", "--size", "8",
                                                           "-o", f"{O}/o.h5"], expect=130,
                   run=lambda case, out, delay=0.05 + 0.1 * k: run_with_sigint(case.args, out, ".o.h5.tmp", delay))
              for k in range(6)]
    c = sigint + [
        # 1. an output that is one of the inputs (symlinks, ./a, hard links), --overwrite or not
        Case("quantize: output is the input (symlink)", ["quantize", p["tar_traversal"], "--size", "8", "-o",
             f"{O}/o.tar", "--overwrite"], allowed=("o.tar",), setup=link_to("o.tar", p["tar_traversal"])),
        Case("palette fit: output is the input", ["palette", "fit", p["npz_neg_label"], "-k", "2", "-o",
             f"{O}/n.npz", "--overwrite"], allowed=("n.npz",), setup=link_to("n.npz", p["npz_neg_label"])),
        Case("extract: output is the input (symlink)", ["extract", p["tokens"], "-m", "pixels", "-o", f"{O}/t.h5",
             "--overwrite"], allowed=("t.h5",), setup=link_to("t.h5", p["tokens"])),
        Case("features: --keep-tokens is the output", ["features", p["folder"], "-m", M, "-l", "1", "-o", f"{O}/f.h5",
             "--keep-tokens", f"{O}/./f.h5"]),
        Case("probe: --save-probes is the train features", ["probe", p["feats"], "--save-probes", f"{O}/p.h5",
             "--overwrite", "-q"], allowed=("p.h5",), setup=link_to("p.h5", p["feats"])),
        Case("probe: --csv is the test features", ["probe", p["feats"], "--test", p["feats_test"], "--csv",
             f"{O}/c.csv", "--overwrite", "-q"], allowed=("c.csv",), setup=link_to("c.csv", p["feats_test"])),
        Case("probe: --plot is the train features", ["probe", p["feats"], "--plot", f"{O}/c.png", "--overwrite", "-q"],
             allowed=("c.png",), setup=link_to("c.png", p["feats"])),
        Case("predict: -o is the features", ["predict", p["feats_test"], "--probes", p["probes"], "-o", f"{O}/o.h5",
             "--overwrite"], allowed=("o.h5",), setup=link_to("o.h5", p["feats_test"])),
        Case("predict: -o is the probes", ["predict", p["feats_test"], "--probes", p["probes"], "-o", f"{O}/o.h5",
             "--overwrite"], allowed=("o.h5",), setup=link_to("o.h5", p["probes"])),
        Case("sample: --png is the output", ["sample", M, "-n", "2", "-o", f"{O}/s.h5", "--png", f"{O}/./s.h5"]),
        Case("complete: output is the input (symlink)", ["complete", p["tokens"], "-m", M, "--limit", "2", "-o",
             f"{O}/t.h5", "--overwrite"], allowed=("t.h5",), setup=link_to("t.h5", p["tokens"])),
        Case("complete: --png is the input", ["complete", p["tokens"], "-m", M, "--limit", "2", "-o", f"{O}/c.h5",
             "--png", f"{O}/t.png", "--overwrite"], allowed=("t.png",), setup=link_to("t.png", p["tokens"])),
        Case("score: output is the input (symlink)", ["score", p["tokens"], "-m", M, "-o", f"{O}/t.h5", "--overwrite"],
             allowed=("t.h5",), setup=link_to("t.h5", p["tokens"])),
        Case("show: output is the input (symlink)", ["show", p["tokens"], "-o", f"{O}/t.png", "--overwrite"],
             allowed=("t.png",), setup=link_to("t.png", p["tokens"])),
        Case("show: output is the tokens behind the features", ["show", p["feats"], "-o", f"{O}/t.png", "--overwrite"],
             allowed=("t.png",), setup=link_to("t.png", p["tokens"])),
        Case("convert: output is the checkpoint's index", ["convert", p["tf_good"], "-o", f"{O}/out"],
             allowed=("out",), setup=link_to("out", f"{p['tf_good']}.index")),
        Case("demo: --plot is the model's config", ["demo", "--out", f"{O}/d", "--model", p["model_copy"], "--plot",
             p["model_copy"] / "config.json", "--overwrite", "-q"], allowed=("d",)),
        Case("train: output is the tokens file", ["train", p["tokens"], "-o", f"{O}/t.h5", "--steps", "1"],
             allowed=("t.h5",), setup=link_to("t.h5", p["tokens"])),
        Case("sweep: output is the train tokens", ["sweep", M, "--train", p["tokens"], "--test", p["tokens_test"],
             "-o", f"{O}/t.h5"], allowed=("t.h5",), setup=link_to("t.h5", p["tokens"])),
        # 2. a second run on a finished or running output, without --overwrite
        Case("score: second run while the first writes", ["score", p["tokens_test"], "-m", M, "-b", "1", "-o", f"{O}/o.h5",
             "-q"], allowed=("o.h5",),
             run=run_second_after_tmp(["score", p["tokens_big"], "-m", M, "-b", "1", "-o", f"{O}/o.h5", "-q"],
                                      Path(), ".o.h5.tmp"),
             verify=first_run_kept("o.h5", "nats_per_token", rows_of(p["tokens_big"], "tokens"))),
        Case("sample: second run while the first writes", ["sample", M, "-n", "2", "-b", "1", "-o", f"{O}/o.h5", "-q"],
             allowed=("o.h5",),
             run=run_second_after_tmp(["sample", M, "-n", "24", "-b", "2", "-o", f"{O}/o.h5", "-q"], Path(),
                                      ".o.h5.tmp"),
             verify=first_run_kept("o.h5", "tokens", 24)),
        Case("complete: second run while the first writes", ["complete", p["tokens"], "-m", M, "--limit", "2", "-b",
             "1", "-o", f"{O}/o.h5", "-q"], allowed=("o.h5",),
             run=run_second_after_tmp(["complete", p["tokens"], "-m", M, "--limit", "24", "-b", "2", "-o",
                                       f"{O}/o.h5", "-q"], Path(), ".o.h5.tmp"),
             verify=first_run_kept("o.h5", "tokens", 24)),
        Case("features: second run while the first writes", ["features", p["folder"], "-m", M, "-l", "1", "-o",
             f"{O}/o.h5", "-q"], allowed=("o.h5",),
             run=run_second_after_tmp(["features", DEMO_TAR, "--split", "test", "-m", M, "-b", "1", "-l", "1",
                                       "-o", f"{O}/o.h5", "-q"], Path(), ".o.h5.tmp"),
             verify=first_run_kept("o.h5", "labels", 1000)),
        # 3. a lock file planted as a symlink to someone's file
        *[Case(f"{cmd}: lock file is a symlink", [*args, "-o", f"{O}/o.h5"], allowed=("victim.txt", ".o.h5.lock"),
               setup=plant_lock("o.h5"), verify=victim_untouched)
          for cmd, args in (("quantize", ["quantize", p["folder"], "--size", "8"]),
                            ("extract", ["extract", p["tokens"], "-m", "pixels"]),
                            ("features", ["features", p["folder"], "-m", M, "-l", "1"]),
                            ("score", ["score", p["tokens"], "-m", M]),
                            ("sample", ["sample", M, "-n", "2"]),
                            ("complete", ["complete", p["tokens"], "-m", M, "--limit", "2"]),
                            ("predict", ["predict", p["feats_test"], "--probes", p["probes"]]),
                            ("palette fit", ["palette", "fit", p["folder"], "-k", "2"]))],
        Case("show: lock file is a symlink", ["show", p["tokens"], "-o", f"{O}/o.png"],
             allowed=("victim.txt", ".o.png.lock"), setup=plant_lock("o.png"), verify=victim_untouched),
        Case("probe: lock file is a symlink", ["probe", p["feats"], "--save-probes", f"{O}/o.h5", "-q"],
             allowed=("victim.txt", ".o.h5.lock"), setup=plant_lock("o.h5"), verify=victim_untouched),
        # 4. the converted-model cache and damaged OpenAI checkpoints
        *[Case(f"{cmd}: cached TF checkpoint, {what}", [*args, "-o", f"{O}/o.h5"])
          for what, prefix in (("copy with flipped bytes", p["tf_flip"]), ("copy without a shard", p["tf_delete"]),
                               ("copy without data shards", p["tf_none"]))
          for cmd, args in (("extract", ["extract", p["tokens_tf"], "-m", prefix]),
                            ("score", ["score", p["tokens_tf"], "-m", prefix]),
                            ("complete", ["complete", p["tokens_tf"], "-m", prefix, "--limit", "1"]))],
        Case("sample: cached TF checkpoint, copy with flipped bytes", ["sample", p["tf_flip"], "-n", "1", "-o",
             f"{O}/o.h5"]),
        Case("convert: checkpoint with flipped bytes", ["convert", p["tf_flip"], "-o", f"{O}/out"]),
        Case("extract: cached model.safetensors with flipped bytes (rebuilt)", ["extract", p["tokens_tf"], "-m",
             p["tf_good"], "-l", "1", "--dtype", "float32", "--device", "cpu", "-o", f"{O}/f.h5", "-q"], expect=0,
             allowed=("f.h5",), setup=corrupt_cache, verify=same_features),
        # 5. a full disk
        *[Case(f"{cmd}: disk full", [*args], needs_mount=True, mount_size=size)
          for cmd, args, size in (
              ("sample", ["sample", M, "-n", "2000", "-o", f"{O}/o.h5"], "128k"),
              ("complete", ["complete", p["tokens_big"], "-m", M, "-n", "4", "-o", f"{O}/o.h5"], "128k"),
              ("score", ["score", p["tokens_big"], "-m", M, "-o", f"{O}/o.h5"], "32k"),
              ("features", ["features", DEMO_TAR, "-m", M, "-o", f"{O}/o.h5"], "128k"),
              ("probe", ["probe", p["feats_model"], "--save-probes", f"{O}/p.h5", "-q"], "8k"),
              ("predict", ["predict", p["feats"], "--probes", p["probes"], "-o", f"{O}/o.h5"], "8k"),
              ("show", ["show", p["tokens_big"], "-o", f"{O}/o.png", "--n", "1000"], "32k"),
              ("convert", ["convert", p["tf_good"], "-o", f"{O}/out"], "32k"))],
        # 6. malformed probes, NaN features
        Case("predict: coef narrower than mean/scale", ["predict", p["feats_test"], "--probes", p["probes_narrow"], "--json"]),
        Case("predict: scale of zeros", ["predict", p["feats_test"], "--probes", p["probes_zero_scale"], "--json"]),
        Case("predict: class_names not JSON", ["predict", p["feats_test"], "--probes", p["probes_bad_names"], "--json"]),
        Case("predict: no probes group", ["predict", p["feats_test"], "--probes", p["probes_empty"], "--json"]),
        Case("predict: NaN in coef", ["predict", p["feats_test"], "--probes", p["probes_nan"], "--json"]),
        Case("predict: NaN in features", ["predict", p["feats_nan"], "--probes", p["probes"], "--json"]),
        Case("probe: NaN in features", ["probe", p["feats_nan"], "-q"]),
        # 7. odd values and names
        Case("quantize: WebDataset .cls 99999999999999999999", ["quantize", p["wds_huge_cls"], "--size", "8", "-o",
             f"{O}/o.h5"]),
        Case("features: WebDataset .cls 99999999999999999999", ["features", p["wds_huge_cls"], "-m", M, "-l", "1",
             "-o", f"{O}/o.h5"]),
        Case("quantize: image named with non-UTF-8 bytes", ["quantize", p["folder_odd"], "--size", "8", "-o",
             f"{O}/o.h5"], expect=0, allowed=("o.h5",)),
        Case("features: image named with non-UTF-8 bytes", ["features", p["folder_odd"], "-m", M, "-l", "1", "-o",
             f"{O}/o.h5", "-q"], expect=0, allowed=("o.h5",)),
        *[Case(f"{cmd}: output named with non-UTF-8 bytes", [*args, "-o", f"{O}/{odd}"], expect=0,
               allowed=(odd,))
          for cmd, args in (("quantize", ["quantize", p["folder"], "--size", "8", "-q"]),
                            ("extract", ["extract", p["tokens"], "-m", "pixels", "-q"]),
                            ("score", ["score", p["tokens_test"], "-m", M, "-q"]),
                            ("sample", ["sample", M, "-n", "1", "-q"]),
                            ("predict", ["predict", p["feats_test"], "--probes", p["probes"]]))],
        *[Case(f"{cmd}: --seed {S}", [*args, "--seed", S])
          for cmd, args in (("quantize", ["quantize", p["folder"], "--size", "8", "-o", f"{O}/o.h5"]),
                            ("features", ["features", p["folder"], "-m", M, "-o", f"{O}/o.h5"]),
                            ("palette fit", ["palette", "fit", p["folder"], "-k", "2", "-o", f"{O}/p.npy"]),
                            ("show", ["show", p["tokens"], "-o", f"{O}/o.png", "--shuffle"]),
                            ("sample", ["sample", M, "-n", "2", "-o", f"{O}/o.h5"]),
                            ("complete", ["complete", p["tokens"], "-m", M, "--limit", "2", "-o", f"{O}/o.h5"]),
                            ("probe", ["probe", p["feats"]]),
                            ("train", ["train", p["tokens"], "-o", f"{O}/m", "--steps", "1"]),
                            ("sweep", ["sweep", M, "--train", p["tokens"], "--test", p["tokens_test"], "-o",
                                       f"{O}/sw"]))],
        # 9. configs that never end
        Case("models: cached config.json is a symlink to /dev/zero", ["models"], expect=0,
             verify=lambda out, r: "listed" if "org/evil" in r.stdout + r.stderr else None),
        *[Case(f"models: a planted refs/main that is {what} (skipped, warned)", ["models", "--json"], expect=0,
               env={"HF_HUB_CACHE": str(p[f"hub_{kind}"])},
               verify=lambda out, r: None if "refs/main" in r.stderr and "skipped" in r.stderr
               and '"org/planted"' in r.stdout else "no warning naming refs/main, or the snapshot not listed")
          for kind, what in (("fifo", "a FIFO"), ("huge", "a 1 TiB sparse file"))],
        Case("extract: model config.json is a symlink to /dev/zero", ["extract", p["tokens"], "-m", f"{O}/m", "-o",
             f"{O}/o.h5"], allowed=("m",),
             setup=lambda out: (shutil.copytree(M, out / "m"), (out / "m" / "config.json").unlink(),
                                (out / "m" / "config.json").symlink_to("/dev/zero"))),
        Case("score: preprocessor_config.json is a FIFO (never read)", ["score", p["tokens"], "-m", f"{O}/m", "-o",
             f"{O}/o.h5", "-q"], expect=0, allowed=("m", "o.h5"), setup=lambda out: (shutil.copytree(M, out / "m"),
                                                (out / "m" / "preprocessor_config.json").unlink(),
                                                os.mkfifo(out / "m" / "preprocessor_config.json"))),
        # smaller
        *[Case(f"{cmd}: stdout closed (| head)", args, expect=141, run=run_closed_stdout, allowed=allowed)
          for cmd, args, allowed in (("extract", ["extract", p["tokens"], "-m", "pixels", "-o", f"{O}/f.h5", "-q"],
                                      ("f.h5",)),
                                     ("info", ["info", p["tokens"], "--json"], ()),
                                     ("models", ["models", "--json"], ()),
                                     ("probe", ["probe", p["feats"], "--json", "-q"], ()),
                                     ("score", ["score", p["tokens_test"], "-m", M, "--json", "-q"], ()),
                                     ("predict", ["predict", p["feats_test"], "--probes", p["probes"], "--json"], ()))],
        Case("quantize: WebDataset sample without .cls (warned)", ["quantize", p["wds_no_cls"], "--size", "8", "-o",
             f"{O}/o.h5"], expect=0, allowed=("o.h5",), verify=warned("have no label")),
        Case("quantize: Arrow file cut in half", ["quantize", p["arrow_cut"], "--size", "8", "-o", f"{O}/o.h5"],
             verify=names_file(p["arrow_cut"])),
        Case("features: Arrow file cut in half", ["features", p["arrow_cut"], "-m", M, "-l", "1", "-o", f"{O}/o.h5"],
             verify=names_file(p["arrow_cut"])),
        Case("features: --skip-bad rerun after a bad image", ["features", p["folder_corrupt"], "-m", M, "-l", "1",
             "--skip-bad", "-o", f"{O}/f.h5", "-q"], expect=0, allowed=("f.h5",), setup=bad_image_then),
        Case("extract: tokens of another palette", ["extract", p["tokens_otherpal"], "-m", M, "-o", f"{O}/f.h5"]),
        Case("sweep: a missing checkpoint after a good one", ["sweep", M, p["txt"].with_name("no-such-model"),
             "--train", p["tokens"], "--test", p["tokens_test"], "-o", f"{O}/sw"]),
        Case("sweep: family named ..", ["sweep", f"..={M}", "--train", p["tokens"], "--test", p["tokens_test"], "-l",
             "1", "-o", f"{O}/sw", "-q"], allowed=("sw",), verify=nothing_outside),
        Case("sweep: edited result.json", ["sweep", p["sweep_ck"], "--train", p["tokens"], "--test", p["tokens_test"],
             "-l", "1", "-o", f"{O}/sw", "-q", "--device", "cpu"], expect=0, allowed=("sw",), setup=edit_result,
             verify=edited_result_not_reused),
    ]
    return c


def finetune_cases(p: dict[str, Path]) -> list[Case]:
    """`igpt finetune` (the trainer's loop with a classifier head) against the trainer's causes:
    bad inputs, outputs that are inputs, a planted lock, resume with other flags, a full disk,
    a kill and its resume. Tiny runs: the shipped model, a batch of 4, a few steps."""
    O = "{out}"
    M = MODEL
    link_to = lambda name, target: (lambda out: (out / name).symlink_to(target))  # noqa: E731
    exists = lambda name: (lambda out: (out / name).write_text("precious"))  # noqa: E731
    odd = "ft" + b"\xff".decode("utf-8", "surrogateescape")  # an output directory named with bytes that are not UTF-8
    tiny = ["--batch-size", "4", "--warmup", "0", "--device", "cpu", "-q"]

    def ft(*extra, out="ft", train=p["tokens"], test=p["tokens_test"], model=M):
        return ["finetune", train, "-m", model, "--test", test, "-o", f"{O}/{out}", *tiny, *extra]

    def finished_run(*extra):
        """Setup: a finished two-step run in OUT/ft, its files' (size, mtime) remembered for `run_unchanged`."""
        def setup(out: Path) -> None:
            r = igpt([str(a).replace(O, str(out)) for a in ft("--steps", "2", *extra)])
            assert r.returncode == 0, r.stderr
            seen[out] = snapshot(out / "ft")
        return setup

    seen: dict[Path, dict] = {}

    def says(needle):
        return lambda out, result: None if needle in result.stderr else f"the message does not say {needle!r}"

    def run_unchanged(out: Path, result) -> str | None:
        changed = sorted(os.path.relpath(k, out) for k, v in snapshot(out / "ft").items() if seen[out].get(k) != v)
        return f"the saved run changed: {changed}" if changed else None

    def finished(steps: int):
        def verify(out: Path, result) -> str | None:
            ft_dir = out / "ft"
            if not (ft_dir / "report.json").is_file():
                return "no report.json"
            meta = json.loads((ft_dir / "train_meta.json").read_text())
            if meta.get("step") != steps:
                return f"train_meta.json says step {meta.get('step')}, not {steps}"
            left = sorted(f.name for f in ft_dir.iterdir() if f.name.endswith((".tmp", ".lock")))
            return f"temp files left in the run: {left}" if left else None
        return verify

    def state_kept_and_said(out: Path, result) -> str | None:
        if not (out / "ft" / "train_state.pt").is_file():
            return "no train_state.pt kept after SIGTERM"
        return None if "resume" in result.stderr else "the message does not say how to resume"

    def kill_then_resume(sig: int, steps: int):
        """Start the run, send `sig` once its first checkpoint is saved, then rerun the same command,
        which resumes (the case's result: the resumed run's)."""
        def runner(case, out: Path) -> Result:
            first = subprocess.Popen([sys.executable, "-m", "igpt_cli", *case.args], env=ENV, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            deadline = time.time() + 300
            while time.time() < deadline and not (out / "ft" / "train_state.pt").exists() and first.poll() is None:
                time.sleep(0.02)
            if first.poll() is None:
                first.send_signal(sig)
            first.communicate(timeout=120)
            if first.returncode == 0 or (out / "ft" / "report.json").exists():
                return Result(None, "", f"the kill did not land mid-run (exit {first.returncode})")
            return Result(*(lambda r: (r.returncode, r.stdout, r.stderr))(igpt(list(case.args))))
        return runner

    return [
        Case("finetune: no --steps", ["finetune", p["tokens"], "-m", M, "--test", p["tokens_test"], "-o", f"{O}/ft"]),
        Case("finetune: tokens missing", ft("--steps", "1", train=p["txt"].with_name("nope.h5"))),
        Case("finetune: unlabelled tokens", ft("--steps", "1", train=p["tokens_unlabelled"]), verify=says("no labels")),
        Case("finetune: unlabelled --test", ft("--steps", "1", test=p["tokens_unlabelled"]), verify=says("no labels")),
        Case("finetune: --test of another resolution", ft("--steps", "1", test=p["tokens4"])),
        Case("finetune: tokens of another palette", ft("--steps", "1", train=p["tokens_otherpal"],
                                                       test=p["tokens_otherpal"])),
        Case("finetune: BERT model", ft("--steps", "1", train=p["tokens_tf"], test=p["tokens_tf"], model=p["tf_bert"])),
        Case("finetune: nonexistent model", ft("--steps", "1", model=p["txt"].with_name("no-such-model"))),
        Case("finetune: hub id not in the cache (offline)", ft("--steps", "1", model="org/no-such-model")),
        Case("finetune: hostile pickle weights", ft("--steps", "1", model=p["model_evil"])),
        Case("finetune: truncated safetensors", ft("--steps", "1", model=p["model_trunc"])),
        *[Case(f"finetune: --gen-weight {w}", ft("--steps", "1", "--gen-weight", w)) for w in ("-1", "nan", "inf")],
        Case("finetune: lr nan", ft("--steps", "1", "--lr", "nan")),
        Case("finetune: -o is the tokens file (symlink)", ft("--steps", "1", out="t.h5"), allowed=("t.h5",),
             setup=link_to("t.h5", p["tokens"])),
        Case("finetune: -o is the --test file (./)", ["finetune", p["tokens"], "-m", M, "--test", p["tokens_test"],
             "-o", p["tokens_test"].parent / "." / p["tokens_test"].name, *tiny, "--steps", "1"]),
        Case("finetune: -o is the model directory", ["finetune", p["tokens"], "-m", p["model_copy"], "--test",
             p["tokens_test"], "-o", p["model_copy"], *tiny, "--steps", "1"]),
        Case("finetune: -o is the model directory (symlink)", ft("--steps", "1", model=p["model_copy"]),
             allowed=("ft",), setup=link_to("ft", p["model_copy"])),
        Case("finetune: -o is a file", ft("--steps", "1"), allowed=("ft",), setup=exists("ft")),
        Case("finetune: -o holds the user's report.json, metrics.jsonl", ft("--steps", "1"), allowed=("ft",),
             setup=user_files("ft"), verify=user_files_untouched("ft")),
        Case("finetune: lock file is a symlink", ft("--steps", "1"), allowed=("victim.txt", ".ft.lock"),
             setup=plant_lock("ft"), verify=victim_untouched),
        Case("finetune: rerun of a finished run (resumes: nothing to do, nothing rewritten)", ft("--steps", "2"),
             expect=0, allowed=("ft",), setup=finished_run(), verify=run_unchanged),
        *[Case(f"finetune: resume with other flags ({' '.join(flags)})", ft("--resume", *flags), allowed=("ft",),
               setup=finished_run(), verify=run_unchanged)
          for flags in (["--lr", "0.5"], ["--gen-weight", "0"], ["--batch-size", "8"], ["--no-flip"], ["--seed", "3"])],
        Case("finetune: resume with other tokens", ft("--resume", train=p["tokens_test"]), allowed=("ft",),
             setup=finished_run(), verify=run_unchanged),
        Case("finetune: resume with another model", ft("--resume", model=p["model_copy"]), allowed=("ft",),
             setup=finished_run(), verify=run_unchanged),
        Case("finetune: resume without a run", ft("--resume")),
        Case("finetune: disk full", ft("--steps", "3", "--checkpoint-every", "1"), needs_mount=True, allowed=("ft",)),
        Case("finetune: SIGTERM mid-run (state kept)", ft("--steps", "400", "--checkpoint-every", "2"), expect=143,
             allowed=("ft",), verify=state_kept_and_said,
             run=lambda case, out: run_with_sigterm(case.args, out, "ft/train_state.pt", 0.5)),
        Case("finetune: kill -9 mid-run, then the same command", ft("--steps", "30", "--checkpoint-every", "5"), expect=0,
             allowed=("ft",), run=kill_then_resume(signal.SIGKILL, 30), verify=finished(30)),
        Case("finetune: SIGTERM mid-run, then the same command", ft("--steps", "30", "--checkpoint-every", "5"), expect=0,
             allowed=("ft",), run=kill_then_resume(signal.SIGTERM, 30), verify=finished(30)),
        Case("finetune: output named with non-UTF-8 bytes", ft("--steps", "1", out=odd), expect=0, allowed=(odd,)),
        # igpt predict -m: a fine-tuned directory (the finished run above) applied to tokens
        Case("predict -m: a model that is not fine-tuned", ["predict", p["tokens"], "-m", M]),
        Case("predict: both --probes and -m", ["predict", p["tokens"], "--probes", p["probes"], "-m", M]),
        Case("predict: neither --probes nor -m", ["predict", p["tokens"]]),
        Case("predict -m: a features file as the input", ["predict", p["feats"], "-m", f"{O}/ft"], allowed=("ft",),
             setup=finished_run(), verify=run_unchanged),
        Case("predict -m: tokens of another size", ["predict", p["tokens4"], "-m", f"{O}/ft"], allowed=("ft",),
             setup=finished_run(), verify=run_unchanged),
        Case("predict -m: -o is the tokens (symlink)", ["predict", p["tokens"], "-m", f"{O}/ft", "-o", f"{O}/o.h5",
             "--overwrite"], allowed=("ft", "o.h5"),
             setup=lambda out: (finished_run()(out), link_to("o.h5", p["tokens"])(out)), verify=run_unchanged),
        Case("predict -m: the fine-tuned run, to a file", ["predict", p["tokens"], "-m", f"{O}/ft", "-o",
             f"{O}/o.h5", "-q"], expect=0, allowed=("ft", "o.h5"), setup=finished_run(), verify=run_unchanged),
    ]


def snapshot(d: Path) -> dict[str, tuple]:
    """(size, mtime, inode) of every file under `d` (symlinks as links): what a case must not change."""
    out = {}
    for root, dirs, files in os.walk(d):
        for name in files + [x for x in dirs if os.path.islink(os.path.join(root, x))]:
            st = os.lstat(os.path.join(root, name))
            out[os.path.join(root, name)] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def run_case(case: Case, work: Path, inputs_dir: Path) -> None:
    out = work / case.name.replace(" ", "_").replace(":", "").replace("/", "_").replace(",", "")
    out.mkdir(parents=True)
    mounted = False
    if case.needs_mount:
        mounted = mount_tmpfs(out, case.mount_size)
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
        inputs_before = snapshot(inputs_dir)
        r = case.run(case, out) if case.run else igpt(args, env=case.env)
        inputs_after = snapshot(inputs_dir)
        changed = sorted(os.path.relpath(k, inputs_dir) for k in set(inputs_before) | set(inputs_after)
                         if inputs_before.get(k) != inputs_after.get(k))
        problem = case.verify(out, r) if case.verify else None
        left = sorted(f.name for f in out.iterdir() if f.name != "ballast")
        stray = [f for f in left if f not in case.allowed and f not in before]
        stray += [f for f in left if f.startswith(".") and f not in case.allowed]
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        case.result = dict(code=r.returncode, ok_code=r.returncode == case.expect,
                           one_line=(not any(line.startswith("error") for line in lines) if r.returncode == 141 else
                                     (len(lines) == 1) if r.returncode != 0 else True),
                           traceback="Traceback" in r.stderr, stray=sorted(set(stray)),
                           line=lines[0][:110] if lines else "", changed=changed, problem=problem)
    finally:
        if mounted:
            umount(out)


def all_commands() -> list[str]:
    """The commands `igpt --help` lists (a group such as `palette` by its name)."""
    from igpt_cli.cli.app import app

    return [c.name or c.callback.__name__ for c in app.registered_commands] + [g.name for g in app.registered_groups]


def is_fault(r: dict) -> bool:
    return not (r["ok_code"] and r["one_line"] and not r["traceback"] and not r["stray"] and not r["changed"]
                and not r["problem"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="keep inputs and outputs in this directory")
    ap.add_argument("--only", help="run the cases whose name contains this (several: separated by |)")
    ap.add_argument("--markdown", action="store_true", help="also print the summary as a Markdown table")
    args = ap.parse_args()
    base = args.keep or Path(tempfile.mkdtemp(prefix="igpt-faults-"))
    t0 = time.time()
    inputs = build_inputs(base / "inputs")
    all_cases = [c for c in cases(inputs) if not args.only or any(o in c.name for o in args.only.split("|"))]
    for c in all_cases:
        try:
            run_case(c, base / "work", base / "inputs")
        except Exception as e:  # noqa: BLE001 - a broken case is reported, the others still run
            c.result = dict(code=None, ok_code=False, one_line=False, traceback=False, stray=[], changed=[],
                            problem=f"the case itself failed: {type(e).__name__}: {e}"[:300], line="")
        r = c.result
        if "skipped" in r:
            print(f"{c.name:60s} skipped: {r['skipped']}", flush=True)
            continue
        flag = "  <-- FAULT" if is_fault(r) else ""
        extra = "".join(f"  {k}: {v}" for k, v in (("inputs changed", ",".join(r["changed"])),
                                                    ("check", r["problem"])) if v)
        print(f"{c.name:60s} exit {str(r['code']):>3} (want {c.expect:>3})  one line: {'yes' if r['one_line'] else 'NO '}  "
              f"traceback: {'YES' if r['traceback'] else 'no '}  stray: {','.join(r['stray']) or '-'}{extra}{flag}\n"
              f"{'':62s}{r['line']}", flush=True)
    done = [c for c in all_cases if "skipped" not in c.result]
    bad_code = sum(not c.result["ok_code"] for c in done)
    tracebacks = sum(c.result["traceback"] for c in done)
    multi = sum(not c.result["one_line"] for c in done)
    stray = sum(bool(c.result["stray"]) for c in done)
    changed = sum(bool(c.result["changed"]) for c in done)
    failed_checks = sum(bool(c.result["problem"]) for c in done)
    faults = [c for c in done if is_fault(c.result)]
    pwned = inputs["pwned"].exists()

    # command x cause: one row per command, its causes ok or FAULT
    commands = all_commands()
    by_command: dict[str, list[Case]] = {}
    for c in all_cases:
        by_command.setdefault(c.command.split()[0], []).append(c)
    print(f"\n{'command':12s} {'cases':>5s} {'faults':>6s}  causes that fault")
    rows = []
    for cmd in commands + sorted(set(by_command) - set(commands)):
        cs = by_command.get(cmd, [])
        bad = [c for c in cs if c in faults]
        skipped = sum("skipped" in c.result for c in cs)
        rows.append((cmd, len(cs), len(bad), skipped, "; ".join(c.cause for c in bad)))
        print(f"{cmd:12s} {len(cs):5d} {len(bad):6d}  {'; '.join(c.cause for c in bad) or '-'}"
              f"{f' ({skipped} skipped)' if skipped else ''}")
    missing = [cmd for cmd in commands if not by_command.get(cmd)]
    print(f"\n{len(all_cases)} cases ({len(all_cases) - len(done)} skipped) over {len(commands) - len(missing)} of "
          f"{len(commands)} commands{' (no cases: ' + ', '.join(missing) + ')' if missing else ''} in "
          f"{time.time() - t0:.0f} s: {bad_code} unexpected exit statuses, {tracebacks} tracebacks, {multi} multi-line "
          f"errors, {stray} with stray files, {changed} changed an input, {failed_checks} failed their own check; "
          f"hostile pickles ran code: {'YES' if pwned else 'no'}")
    print(f"faults: {len(faults) + bool(pwned)}")
    if args.markdown:
        print("\n| command | cases | faults | causes that fault |\n| --- | ---: | ---: | --- |")
        for cmd, n, nbad, skipped, causes in rows:
            note = f" ({skipped} skipped: no tmpfs)" if skipped else ""
            print(f"| `{cmd}` | {n}{note} | {nbad} | {causes or '–'} |")
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(CACHE_ROOT, ignore_errors=True)
    return 0 if not (faults or pwned or missing) else 1


if __name__ == "__main__":
    sys.exit(main())
