"""igpt quantize / palette / info / show (issue #2)."""
from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from threadpoolctl import threadpool_limits
from typer.testing import CliRunner

from igpt_cli.cli import app
from igpt_cli.data import decode_image, open_dataset
from igpt_cli.errors import InputError
from igpt_cli.palette import DEFAULT_PALETTE, Palette, PaletteError
from igpt_cli.quantize import quantize_dataset

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
CLASSES = ["cat", "dog", "frog"]


# ---------------------------------------------------------------------------
# helpers: tiny synthetic datasets
# ---------------------------------------------------------------------------

def rand_img(rng, h=32, w=32, mode="RGB") -> Image.Image:
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(a)
    if mode == "L":
        return im.convert("L")
    if mode == "RGBA":
        im = im.convert("RGBA")
        im.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
        return im
    if mode == "P":
        return im.convert("P", palette=Image.ADAPTIVE, colors=16)
    return im


def encode(im: Image.Image, fmt: str) -> bytes:
    b = io.BytesIO()
    im.save(b, format=fmt)
    return b.getvalue()


def make_folder(root: Path, splits=("train", "test"), per_class=2, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for s in splits:
        for c in CLASSES:
            d = root / s / c if s else root / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                (d / f"{i:04d}.png").write_bytes(encode(rand_img(rng), "PNG"))
    return root


def fake_cifar(tmp: Path, variant="cifar10", per_batch=4, archive=True) -> Path:
    rng = np.random.default_rng(1)
    if variant == "cifar10":
        top, files = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        meta_name, meta = "batches.meta", {b"label_names": [b"airplane", b"automobile"] + [b"c%d" % i for i in range(8)]}
        lab_key = b"labels"
    else:
        top, files = "cifar-100-python", ["train", "test"]
        meta_name, meta = "meta", {b"fine_label_names": [b"f%d" % i for i in range(100)],
                                   b"coarse_label_names": [b"k%d" % i for i in range(20)]}
        lab_key = b"fine_labels"
    d = tmp / "cifar_src" / top
    d.mkdir(parents=True)
    (d / meta_name).write_bytes(pickle.dumps(meta))
    for f in files:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 lab_key: [int(x) for x in rng.integers(0, 10, per_batch)],
                 b"filenames": [b"img%d.png" % i for i in range(per_batch)], b"batch_label": f.encode()}
        (d / f).write_bytes(pickle.dumps(batch))
    if not archive:
        return d.parent
    out = tmp / ("cifar-10-python.tar.gz" if variant == "cifar10" else "cifar-100-python.tar.gz")
    with tarfile.open(out, "w:gz") as tf:
        tf.add(d, arcname=top)
    return out


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def tokens_of(path) -> tuple[np.ndarray, np.ndarray, list[str], dict]:
    with h5py.File(path, "r") as f:
        return (f["tokens"][:], f["labels"][:], [s.decode() for s in f["sources"][:]], dict(f.attrs))


# ---------------------------------------------------------------------------
# palette and the quantization rule
# ---------------------------------------------------------------------------

def test_default_palette_is_the_official_one(official_palette_path):
    a = np.load(DEFAULT_PALETTE)
    assert a.dtype == np.float32 and a.shape == (512, 3)
    np.testing.assert_array_equal(a, np.load(official_palette_path))


def test_nearest_is_exact_and_lut_agrees():
    pal = Palette.default()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6000, 3), dtype=np.uint8)
    x = rgb.astype(np.float64) / 127.5 - 1
    d = ((x[:, None, :] - pal.centers.astype(np.float64)[None]) ** 2).sum(-1)
    brute = d.argmin(1)
    np.testing.assert_array_equal(pal.nearest(rgb), brute)
    imgs = rgb.reshape(6, 20, 50, 3)
    t1 = pal.quantize(imgs)  # fills the table
    t2 = pal.quantize(imgs)  # reads it
    assert t1.dtype == np.uint16 and t1.shape == (6, 1000)
    np.testing.assert_array_equal(t1, t2)
    np.testing.assert_array_equal(t1.reshape(-1), brute)


def test_small_palette_ties_go_to_lowest_index():
    # two identical centres: a full argmin picks the first
    pal = Palette(np.array([[0.5, 0.5, 0.5], [-1, -1, -1], [0.5, 0.5, 0.5]], dtype=np.float32))
    t = pal.quantize(np.full((1, 2, 2, 3), 200, np.uint8))
    assert set(t.ravel().tolist()) == {0}


def test_decode_roundtrip():
    pal = Palette.default()
    centres_rgb = np.clip(np.rint((pal.centers.astype(np.float64) + 1) * 127.5), 0, 255).astype(np.uint8)
    toks = np.arange(512, dtype=np.uint16).reshape(2, 256)
    imgs = pal.decode(toks, 16, 16)
    assert imgs.shape == (2, 16, 16, 3) and imgs.dtype == np.uint8
    np.testing.assert_array_equal(imgs.reshape(-1, 3), centres_rgb)


def test_palette_sources(tmp_path, official_palette_path):
    c = np.load(official_palette_path)
    cfg = tmp_path / "model" / "preprocessor_config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({"clusters": c.tolist(), "do_color_quantize": True}))
    for spec in (official_palette_path, cfg, cfg.parent):
        np.testing.assert_allclose(Palette.load(spec).centers, c, atol=1e-7)
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((10, 4), np.float32))
    with pytest.raises(PaletteError, match="shape"):
        Palette.load(bad)
    np.save(bad, np.full((10, 3), 3.0, np.float32))
    with pytest.raises(PaletteError, match=r"\[-1, 1\]"):
        Palette.load(bad)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(PaletteError, match="clusters"):
        Palette.load(tmp_path / "x.json")


def check_hf_parity(cifar_tar, official_palette_path, stride: int, expect: int):
    """>= 99.99 % token agreement with transformers' ImageGPTImageProcessorPil on real
    CIFAR-10 test images (every `stride`-th: all classes), every disagreement a genuine tie."""
    from transformers.models.imagegpt.image_processing_pil_imagegpt import ImageGPTImageProcessorPil

    ds = open_dataset(cifar_tar, split="test")
    members = [(n, b) for i, (n, b) in enumerate(ds._members()) if i % stride == 0]
    assert len(members) == expect
    ours_px = np.stack([decode_image(b, 32, "bilinear", n) for n, b in members])
    pal = Palette.load(official_palette_path)
    ours = pal.quantize(ours_px).astype(np.int64)

    # HF decodes the same JPEG bytes with plain PIL (independent of our fast decode path)
    clusters = np.load(official_palette_path)
    proc = ImageGPTImageProcessorPil(clusters=clusters, size={"height": 32, "width": 32})
    with threadpool_limits(1):  # multi-threaded BLAS crawls on a shared, busy machine
        hf = np.concatenate([np.stack(proc([Image.open(io.BytesIO(b)) for _, b in members[i:i + 500]])["input_ids"])
                             for i in range(0, len(members), 500)]).astype(np.int64)
    plain = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for _, b in members])
    np.testing.assert_array_equal(ours_px, plain)  # our decode == PIL's

    agree = (ours == hf).mean()
    assert agree >= 0.9999, agree
    dis = ours != hf
    x = ours_px.reshape(len(ours_px), -1, 3)[dis].astype(np.float64) / 127.5 - 1
    c = clusters.astype(np.float64)
    d_ours = ((x - c[ours[dis]]) ** 2).sum(1)
    d_hf = ((x - c[hf[dis]]) ** 2).sum(1)
    assert np.all(d_ours <= d_hf)  # ours is the true nearest
    # HF works in float32 (x rounded to float32, |x|^2 - 2x.c + |c|^2): a tie within that rounding
    tol = 16 * np.finfo(np.float32).eps * ((x ** 2).sum(1) + (c[hf[dis]] ** 2).sum(1) + 1)
    assert np.all(d_hf - d_ours <= tol), (d_hf - d_ours).max()


def test_hf_parity_on_5000_real_cifar_images(cifar_tar, official_palette_path):
    # every other image of the CIFAR-10 test split, all classes (~30 s: the HF processor is the slow part)
    check_hf_parity(cifar_tar, official_palette_path, stride=2, expect=5000)


# ---------------------------------------------------------------------------
# input formats
# ---------------------------------------------------------------------------

def test_image_folder_dir_splits_and_tokens_file(tmp_path):
    src = make_folder(tmp_path / "ds")
    out = tmp_path / "train.h5"
    s = quantize_dataset(src, out, split="train")
    assert s["n"] == 6 and s["classes"] == 3 and s["skipped"] == 0
    tok, lab, srcs, attrs = tokens_of(out)
    assert tok.dtype == np.uint16 and tok.shape == (6, 1024)
    assert lab.tolist() == [0, 0, 1, 1, 2, 2]
    assert srcs[0] == "train/cat/0000.png"
    assert attrs["format"] == "igpt-tokens" and attrs["format_version"] == 1
    assert (attrs["height"], attrs["width"]) == (32, 32)
    assert json.loads(attrs["class_names"]) == CLASSES
    assert attrs["split"] == "train" and attrs["resize"] == "bilinear" and "igpt_version" in attrs
    with h5py.File(out) as f:
        assert f["palette"].dtype == np.float32 and f["palette"].shape == (512, 3)
        assert f["tokens"].chunks[1] == 1024
    # tokens are the palette quantization of the decoded image
    im = np.asarray(Image.open(src / "train/cat/0000.png").convert("RGB"))
    np.testing.assert_array_equal(tok[0], Palette.default().quantize(im[None])[0])
    assert not list(tmp_path.glob(".*.tmp"))
    assert quantize_dataset(src, tmp_path / "all.h5")["n"] == 12


def test_image_folder_archives_tar_zip(tmp_path):
    src = make_folder(tmp_path / "ds")
    ref, _, _, _ = (None, None, None, None)
    quantize_dataset(src, tmp_path / "dir.h5", split="test")
    ref = tokens_of(tmp_path / "dir.h5")
    with tarfile.open(tmp_path / "ds.tar", "w") as tf:
        tf.add(src, arcname="mydata")  # a wrapper folder is stripped
    with tarfile.open(tmp_path / "ds.tar.gz", "w:gz") as tf:
        tf.add(src, arcname=".")
    with zipfile.ZipFile(tmp_path / "ds.zip", "w") as z:
        for p in sorted(src.rglob("*.png")):
            z.write(p, p.relative_to(src).as_posix())
    for arc in ("ds.tar", "ds.tar.gz", "ds.zip"):
        s = quantize_dataset(tmp_path / arc, tmp_path / f"{arc}.h5", split="test")
        tok, lab, srcs, attrs = tokens_of(tmp_path / f"{arc}.h5")
        order = np.argsort(srcs)  # tar archives are read in archive order
        np.testing.assert_array_equal(tok[order], ref[0])
        np.testing.assert_array_equal(lab[order], ref[1])
        assert s["n"] == 6 and all(x.startswith(f"{arc}:") for x in srcs), srcs
        assert json.loads(attrs["class_names"]) == CLASSES


def test_class_folder_without_splits(tmp_path):
    src = make_folder(tmp_path / "ds", splits=("",))
    s = quantize_dataset(src, tmp_path / "o.h5")
    assert s["n"] == 6 and s["classes"] == 3
    with pytest.raises(InputError, match="no split 'train'"):
        quantize_dataset(src, tmp_path / "o2.h5", split="train")


def test_image_modes_and_sizes(tmp_path):
    rng = np.random.default_rng(3)
    d = tmp_path / "ds" / "a"
    d.mkdir(parents=True)
    rgba = rand_img(rng, 40, 24, "RGBA")
    imgs = {"g.png": rand_img(rng, 32, 32, "L"), "p.gif": rand_img(rng, 32, 32, "P"), "a.png": rgba,
            "big.jpg": rand_img(rng, 64, 96), "t.bmp": rand_img(rng, 20, 20)}
    for name, im in imgs.items():
        im.save(d / name)
    s = quantize_dataset(tmp_path / "ds", tmp_path / "o.h5", size=16)
    assert s["n"] == 5
    tok, lab, srcs, attrs = tokens_of(tmp_path / "o.h5")
    assert tok.shape == (5, 256) and attrs["height"] == 16
    # RGBA is composited onto white, then bilinear-resized without crop (as HF does)
    bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    want = np.asarray(Image.alpha_composite(bg, rgba).convert("RGB").resize((16, 16), Image.BILINEAR))
    np.testing.assert_array_equal(tok[srcs.index("a/a.png")], Palette.default().quantize(want[None])[0])
    # center-crop crops the central square first
    big = Image.open(d / "big.jpg").convert("RGB")
    want = np.asarray(big.crop((16, 0, 80, 64)).resize((16, 16), Image.BILINEAR))
    got = decode_image((d / "big.jpg").read_bytes(), 16, "center-crop", "big.jpg")
    np.testing.assert_array_equal(got, want)
    quantize_dataset(tmp_path / "ds", tmp_path / "c.h5", size=16, resize="center-crop")
    assert tokens_of(tmp_path / "c.h5")[3]["resize"] == "center-crop"


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
@pytest.mark.parametrize("archive", [True, False])
def test_cifar_python(tmp_path, variant, archive):
    src = fake_cifar(tmp_path, variant, per_batch=4, archive=archive)
    s = quantize_dataset(src, tmp_path / "tr.h5", split="train")
    n_train = 20 if variant == "cifar10" else 4
    assert s["n"] == n_train and s["format"] == "cifar"
    tok, lab, srcs, attrs = tokens_of(tmp_path / "tr.h5")
    names = json.loads(attrs["class_names"])
    assert len(names) == (10 if variant == "cifar10" else 100)
    # rows are the CHW pickled images, quantized
    top = "cifar-10-batches-py" if variant == "cifar10" else "cifar-100-python"
    first = "data_batch_1" if variant == "cifar10" else "train"
    d = pickle.loads((tmp_path / "cifar_src" / top / first).read_bytes(), encoding="bytes")
    img0 = d[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_array_equal(tok[0], Palette.default().quantize(img0[None])[0])
    key = b"labels" if variant == "cifar10" else b"fine_labels"
    assert lab[:4].tolist() == d[key]
    assert srcs[0].endswith(f"{first}[0]")
    assert quantize_dataset(src, tmp_path / "te.h5", split="test")["n"] == 4
    assert quantize_dataset(src, tmp_path / "all.h5", limit=7)["n"] == 7


def test_npz_and_npy(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", x=x, y=np.array([0, 1, 2, 1, 0]))
    s = quantize_dataset(tmp_path / "a.npz", tmp_path / "a.h5")
    tok, lab, srcs, attrs = tokens_of(tmp_path / "a.h5")
    assert s["n"] == 5 and lab.tolist() == [0, 1, 2, 1, 0] and srcs[1] == "a.npz[x][1]"
    np.testing.assert_array_equal(tok, Palette.default().quantize(x))
    np.savez(tmp_path / "b.npz", x_train=x[:3], y_train=np.arange(3), x_test=x[3:], y_test=np.arange(2))
    assert quantize_dataset(tmp_path / "b.npz", tmp_path / "b.h5", split="test")["n"] == 2
    assert quantize_dataset(tmp_path / "b.npz", tmp_path / "b2.h5", split="all")["n"] == 5
    gray = rng.integers(0, 256, (4, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "g.npy", gray)
    s = quantize_dataset(tmp_path / "g.npy", tmp_path / "g.h5", size=8)
    tok, lab, _, attrs = tokens_of(tmp_path / "g.h5")
    assert lab.tolist() == [-1] * 4 and s["unlabeled"] == 4
    np.testing.assert_array_equal(tok, Palette.default().quantize(np.repeat(gray[..., None], 3, -1)))
    # --format overrides detection
    os.rename(tmp_path / "a.npz", tmp_path / "a.bin")
    assert quantize_dataset(tmp_path / "a.bin", tmp_path / "c.h5", fmt="npz")["n"] == 5


# ---------------------------------------------------------------------------
# CLI: quantize, info, show, palette fit
# ---------------------------------------------------------------------------

def test_cli_quantize_info_show(tmp_path):
    src = make_folder(tmp_path / "ds")
    out = tmp_path / "t.h5"
    r = cli("quantize", src, "-o", out, "--split", "train", "--quiet")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip())
    assert {"path", "n", "height", "width", "classes", "seconds", "skipped"} <= summary.keys()
    assert summary["n"] == 6
    r = cli("info", out)
    assert r.exit_code == 0 and "igpt-tokens" in r.stdout and "cat 2" in r.stdout
    r = cli("info", out, "--json")
    info = json.loads(r.stdout)
    assert info["kind"] == "igpt-tokens" and info["n"] == 6 and info["class_counts"]["dog"] == 2
    assert info["datasets"]["tokens"]["shape"] == [6, 1024]
    r = cli("show", out, "-o", tmp_path / "g.png", "--n", 4)
    assert r.exit_code == 0, r.output
    g = Image.open(tmp_path / "g.png")
    assert g.size == ((2 * 34 + 2) * 2, (2 * 34 + 2) * 2)
    # the decoded first image sits at the top-left
    tok, _, _, _ = tokens_of(out)
    first = Palette.default().decode(tok[:1])[0]
    np.testing.assert_array_equal(np.asarray(g)[4:68:2, 4:68:2], first)


def test_cli_palette_fit(tmp_path):
    src = make_folder(tmp_path / "ds", per_class=1)
    r = cli("palette", "fit", src, "-o", tmp_path / "p.npy", "-k", 8, "--sample-pixels", 3000)
    assert r.exit_code == 0, r.output
    p = np.load(tmp_path / "p.npy")
    assert p.shape == (8, 3) and p.dtype == np.float32 and p.min() >= -1 and p.max() <= 1
    r = cli("quantize", src, "-o", tmp_path / "t.h5", "--palette", tmp_path / "p.npy", "-q")
    assert r.exit_code == 0, r.output
    tok, _, _, _ = tokens_of(tmp_path / "t.h5")
    assert tok.max() < 8


# ---------------------------------------------------------------------------
# bad input: one line on stderr, exit 2, no traceback, no output file
# ---------------------------------------------------------------------------

def assert_bad(r, out: Path, *needles: str):
    assert r.exit_code == 2, (r.exit_code, r.output)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp")) if out.parent.exists() else True


@pytest.fixture
def ds(tmp_path):
    return make_folder(tmp_path / "ds")


def test_bad_missing_path(tmp_path):
    out = tmp_path / "o.h5"
    assert_bad(cli("quantize", tmp_path / "nope", "-o", out), out, "nope", "no such file")


def test_bad_unknown_format(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    out = tmp_path / "o.h5"
    assert_bad(cli("quantize", tmp_path / "x.txt", "-o", out), out, "x.txt", "unknown input format")
    assert_bad(cli("quantize", tmp_path / "x.txt", "-o", out, "--format", "bogus"), out, "bogus")


def test_bad_corrupt_image_in_folder_and_archive(tmp_path, ds):
    (ds / "train" / "dog" / "0001.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "o.h5"
    assert_bad(cli("quantize", ds, "-o", out), out, "train/dog/0001.png", "cannot read image")
    with tarfile.open(tmp_path / "ds.tar", "w") as tf:
        tf.add(ds, arcname=".")
    assert_bad(cli("quantize", tmp_path / "ds.tar", "-o", out), out, "ds.tar:", "dog/0001.png")
    r = cli("quantize", ds, "-o", out, "--skip-bad", "-q")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["skipped"] == 1 and s["n"] == 11


def test_bad_empty_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "o.h5"
    assert_bad(cli("quantize", tmp_path / "empty", "-o", out), out, "empty", "no images")
    np.save(tmp_path / "e.npy", np.zeros((0, 32, 32, 3), np.uint8))
    assert_bad(cli("quantize", tmp_path / "e.npy", "-o", out), out, "e.npy", "no images")


def test_bad_all_images_unreadable_with_skip_bad(tmp_path):
    d = tmp_path / "ds" / "a"
    d.mkdir(parents=True)
    (d / "x.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "o.h5"
    assert_bad(cli("quantize", tmp_path / "ds", "-o", out, "--skip-bad"), out, "no images", "1 unreadable")


def test_bad_split(tmp_path, ds):
    out = tmp_path / "o.h5"
    assert_bad(cli("quantize", ds, "-o", out, "--split", "val"), out, "ds", "no split 'val'", "test, train")
    assert_bad(cli("quantize", ds, "-o", out, "--split", "banana"), out, "unknown split")


def test_bad_palette(tmp_path, ds):
    out = tmp_path / "o.h5"
    np.save(tmp_path / "p.npy", np.zeros((512, 4), np.float32))
    assert_bad(cli("quantize", ds, "-o", out, "--palette", tmp_path / "p.npy"), out, "p.npy", "shape")
    np.save(tmp_path / "p.npy", np.full((512, 3), 200.0, np.float32))
    assert_bad(cli("quantize", ds, "-o", out, "--palette", tmp_path / "p.npy"), out, "p.npy", "[-1, 1]")


def test_bad_output_dir_missing_or_readonly(tmp_path, ds, monkeypatch):
    out = tmp_path / "missing" / "o.h5"
    assert_bad(cli("quantize", ds, "-o", out), out, "does not exist")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: simulate a read-only directory
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m, **k: False if Path(p) == ro else real(p, m, **k))
    out = ro / "o.h5"
    assert_bad(cli("quantize", ds, "-o", out), out, "not writable")


def test_bad_existing_output_needs_overwrite(tmp_path, ds):
    out = tmp_path / "o.h5"
    out.write_bytes(b"precious")
    r = cli("quantize", ds, "-o", out)
    assert r.exit_code == 2 and "--overwrite" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert out.read_bytes() == b"precious"
    r = cli("quantize", ds, "-o", out, "--overwrite", "-q")
    assert r.exit_code == 0 and json.loads(r.stdout)["n"] == 12


def test_bad_info_and_show_inputs(tmp_path):
    (tmp_path / "x.h5").write_bytes(b"nope")
    r = cli("info", tmp_path / "x.h5")
    assert r.exit_code == 2 and "not an HDF5 file" in r.stderr and "Traceback" not in r.output
    out = tmp_path / "g.png"
    assert_bad(cli("show", tmp_path / "x.h5", "-o", out), out, "x.h5")


def test_bad_input_real_process(tmp_path):
    """The installed entry point behaves the same: one line, exit 2, no traceback."""
    out = tmp_path / "o.h5"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "igpt_cli", "quantize", str(tmp_path / "nope.tar"), "-o", str(out)],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "nope.tar" in p.stderr and "Traceback" not in p.stderr
    assert not out.exists()


def test_cifar_pickle_cannot_execute_code(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    names = {b"label_names": [b"a", b"b"]}
    (d / "batches.meta").write_bytes(pickle.dumps(names))
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (d / f).write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(InputError, match="refusing to load"):
        quantize_dataset(d, tmp_path / "o.h5", split="test")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "o.h5").exists()


def test_shipped_lookup_table_is_the_exact_nearest_centre_of_every_colour():
    from igpt_cli.palette import SHIPPED_LUT, _shipped_lut

    pal = Palette.default()
    shipped = _shipped_lut(pal.sha256)
    assert shipped is not None and SHIPPED_LUT.stat().st_size < 2 << 20
    np.testing.assert_array_equal(shipped, pal.full_lookup_table())  # recomputed from the centres, all 2^24
    # a palette from elsewhere (here: the same centres perturbed) does not use it
    other = Palette(pal.centers * np.float32(0.999))
    assert _shipped_lut(other.sha256) is None
