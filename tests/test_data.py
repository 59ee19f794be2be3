"""igpt_cli.data: the dataset readers (image folders as directory/tar/zip, CIFAR python,
npz/npy), image conversion, format detection and the readers' bad-input errors."""
from __future__ import annotations

import json
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import FOLDER_CLASSES, make_image_folder, random_image, read_tokens
from igpt_cli.choices import FORMATS
from igpt_cli.data import (READERS, BadImageError, EmptyDatasetError, SplitError, UnknownFormatError, decode_image,
                           detect_format, open_dataset)
from igpt_cli.data import imagefolder
from igpt_cli.errors import InputError, ParameterError
from igpt_cli.palette import Palette
from igpt_cli.quantize import quantize_dataset


def fake_cifar(tmp: Path, variant="cifar10", per_batch=4, archive=True) -> Path:
    """A CIFAR-10/100 python dataset of random images: the .tar.gz, or the folder holding the extracted one."""
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


# ---------------------------------------------------------------------------
# image folders
# ---------------------------------------------------------------------------

def test_image_folder_archives_tar_zip(tmp_path):
    src = make_image_folder(tmp_path / "ds")
    quantize_dataset(src, tmp_path / "dir.h5", split="test")
    ref = read_tokens(tmp_path / "dir.h5")
    with tarfile.open(tmp_path / "ds.tar", "w") as tf:
        tf.add(src, arcname="mydata")  # a wrapper folder is stripped
    with tarfile.open(tmp_path / "ds.tar.gz", "w:gz") as tf:
        tf.add(src, arcname=".")
    with zipfile.ZipFile(tmp_path / "ds.zip", "w") as z:
        for p in sorted(src.rglob("*.png")):
            z.write(p, p.relative_to(src).as_posix())
    for arc in ("ds.tar", "ds.tar.gz", "ds.zip"):
        s = quantize_dataset(tmp_path / arc, tmp_path / f"{arc}.h5", split="test")
        tok, lab, srcs, attrs = read_tokens(tmp_path / f"{arc}.h5")
        order = np.argsort(srcs)  # tar archives are read in archive order
        np.testing.assert_array_equal(tok[order], ref[0])
        np.testing.assert_array_equal(lab[order], ref[1])
        assert s.n == 6 and all(x.startswith(f"{arc}:") for x in srcs), srcs
        assert json.loads(attrs["class_names"]) == FOLDER_CLASSES


def test_class_folder_without_splits(tmp_path):
    src = make_image_folder(tmp_path / "ds", splits=("",))
    s = quantize_dataset(src, tmp_path / "o.h5")
    assert s.n == 6 and s.classes == 3
    with pytest.raises(InputError, match="no split 'train'"):
        quantize_dataset(src, tmp_path / "o2.h5", split="train")
    with pytest.raises(SplitError, match=r"available splits: none: use split='all'"):
        open_dataset(src, split="train")


def test_image_modes_and_sizes(tmp_path):
    rng = np.random.default_rng(3)
    d = tmp_path / "ds" / "a"
    d.mkdir(parents=True)
    rgba = random_image(rng, 40, 24, "RGBA")
    imgs = {"g.png": random_image(rng, 32, 32, "L"), "p.gif": random_image(rng, 32, 32, "P"), "a.png": rgba,
            "big.jpg": random_image(rng, 64, 96), "t.bmp": random_image(rng, 20, 20)}
    for name, im in imgs.items():
        im.save(d / name)
    s = quantize_dataset(tmp_path / "ds", tmp_path / "o.h5", size=16)
    assert s.n == 5
    tok, lab, srcs, attrs = read_tokens(tmp_path / "o.h5")
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
    assert read_tokens(tmp_path / "c.h5")[3]["resize"] == "center-crop"


def test_decode_pool_gives_the_same_batches_as_decoding_in_process(cifar_tar, monkeypatch):
    # 4096 images: large enough for the process pool (imagefolder.POOL_MIN_IMAGES)
    n = imagefolder.POOL_MIN_IMAGES
    assert imagefolder.decode_workers(n) == min(2, os.cpu_count() or 1) and imagefolder.decode_workers(n - 1) == 0

    def read_all():
        batches = list(open_dataset(cifar_tar, split="test", limit=n).batches(500))
        return (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]),
                [s for b in batches for s in b[2]])

    pooled = read_all()
    monkeypatch.setattr(imagefolder, "decode_workers", lambda n_images: 0)
    in_process = read_all()
    assert len(pooled[0]) == n and pooled[2] == in_process[2]
    np.testing.assert_array_equal(pooled[0], in_process[0])
    np.testing.assert_array_equal(pooled[1], in_process[1])


# ---------------------------------------------------------------------------
# CIFAR python and NumPy arrays
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
@pytest.mark.parametrize("archive", [True, False])
def test_cifar_python(tmp_path, variant, archive):
    src = fake_cifar(tmp_path, variant, per_batch=4, archive=archive)
    s = quantize_dataset(src, tmp_path / "tr.h5", split="train")
    n_train = 20 if variant == "cifar10" else 4
    assert s.n == n_train and s.format == "cifar"
    tok, lab, srcs, attrs = read_tokens(tmp_path / "tr.h5")
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
    assert quantize_dataset(src, tmp_path / "te.h5", split="test").n == 4
    assert quantize_dataset(src, tmp_path / "all.h5", limit=7).n == 7


def test_cifar_pickle_cannot_execute_code(tmp_path):
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


def test_npz_and_npy(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", x=x, y=np.array([0, 1, 2, 1, 0]))
    s = quantize_dataset(tmp_path / "a.npz", tmp_path / "a.h5")
    tok, lab, srcs, attrs = read_tokens(tmp_path / "a.h5")
    assert s.n == 5 and lab.tolist() == [0, 1, 2, 1, 0] and srcs[1] == "a.npz[x][1]"
    np.testing.assert_array_equal(tok, Palette.default().quantize(x))
    np.savez(tmp_path / "b.npz", x_train=x[:3], y_train=np.arange(3), x_test=x[3:], y_test=np.arange(2))
    assert quantize_dataset(tmp_path / "b.npz", tmp_path / "b.h5", split="test").n == 2
    assert quantize_dataset(tmp_path / "b.npz", tmp_path / "b2.h5", split="all").n == 5
    gray = rng.integers(0, 256, (4, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "g.npy", gray)
    s = quantize_dataset(tmp_path / "g.npy", tmp_path / "g.h5", size=8)
    tok, lab, _, attrs = read_tokens(tmp_path / "g.h5")
    assert lab.tolist() == [-1] * 4 and s.unlabeled == 4
    np.testing.assert_array_equal(tok, Palette.default().quantize(np.repeat(gray[..., None], 3, -1)))
    # fmt overrides detection
    os.rename(tmp_path / "a.npz", tmp_path / "a.bin")
    assert quantize_dataset(tmp_path / "a.bin", tmp_path / "c.h5", fmt="npz").n == 5


def test_array_channel_first_alpha_and_bad_arrays(tmp_path):
    rng = np.random.default_rng(6)
    rgba = rng.integers(0, 256, (3, 4, 8, 8), dtype=np.uint8)  # N×C×H×W, C=4
    np.save(tmp_path / "a.npy", rgba)
    ds = open_dataset(tmp_path / "a.npy", size=8)
    assert ds.kind == "npy" and ds.class_names == []
    imgs, labels, sources = next(ds.batches())
    hwc = rgba.transpose(0, 2, 3, 1)
    alpha = hwc[..., 3:] / 255.0
    np.testing.assert_array_equal(imgs, np.round(alpha * hwc[..., :3] + (1 - alpha) * 255).astype(np.uint8))
    assert labels.tolist() == [-1] * 3 and sources == ["a.npy[0]", "a.npy[1]", "a.npy[2]"]
    np.save(tmp_path / "f.npy", rgba.astype(np.float32))
    with pytest.raises(InputError, match=r"f\.npy: images must be uint8, got float32"):
        open_dataset(tmp_path / "f.npy")
    np.savez(tmp_path / "m.npz", x=rgba, y=np.arange(2))
    with pytest.raises(InputError, match=r"m\.npz\[x\]: 3 images but 2 labels"):
        open_dataset(tmp_path / "m.npz")
    np.savez(tmp_path / "u.npz", p=rgba, q=rgba)
    with pytest.raises(UnknownFormatError, match="cannot tell which array holds the images"):
        open_dataset(tmp_path / "u.npz")


# ---------------------------------------------------------------------------
# format detection and the readers' errors
# ---------------------------------------------------------------------------

def test_every_format_has_a_reader_and_detection_picks_the_specific_one(tmp_path):
    assert tuple(READERS) == FORMATS
    folder = make_image_folder(tmp_path / "ds", per_class=1)
    with tarfile.open(tmp_path / "ds.tar", "w") as tf:
        tf.add(folder, arcname=".")
    np.save(tmp_path / "x.npy", np.zeros((1, 4, 4, 3), np.uint8))
    np.savez(tmp_path / "x.npz", x=np.zeros((1, 4, 4, 3), np.uint8))
    cifar = fake_cifar(tmp_path, per_batch=1)
    extracted = fake_cifar(tmp_path / "c2", per_batch=1, archive=False)
    plain_name = tmp_path / "renamed.tar"
    os.rename(cifar, plain_name)  # not named like CIFAR: detected by its members
    for path, fmt in ((folder, "imagefolder"), (tmp_path / "ds.tar", "imagefolder"), (tmp_path / "x.npy", "npy"),
                      (tmp_path / "x.npz", "npz"), (plain_name, "cifar"), (extracted, "cifar"),
                      (extracted / "cifar-10-batches-py", "cifar")):
        assert detect_format(path) == fmt, path
    ds = open_dataset(extracted, split="test")  # the folder holding the extracted archive
    assert ds.path.name == "cifar-10-batches-py" and sum(len(b[0]) for b in ds.batches()) == 1


def test_bad_parameters_name_the_parameter(tmp_path):
    src = make_image_folder(tmp_path / "ds", per_class=1)
    for kwargs, needle in (({"split": "banana"}, "split='banana': expected one of train, test, val, valid, "
                                                  "validation, all"),
                           ({"resize": "nearest"}, "resize='nearest': expected one of bilinear, center-crop"),
                           ({"size": 0}, "size=0: must be at least 1"),
                           ({"limit": 0}, "limit=0: must be at least 1"),
                           ({"fmt": "bogus"}, "fmt='bogus': expected one of imagefolder, cifar, npz, npy")):
        with pytest.raises(ParameterError) as e:
            open_dataset(src, **kwargs)
        assert str(e.value) == needle and e.value.param == next(iter(kwargs))


def test_reader_bad_inputs_name_the_path(tmp_path):
    with pytest.raises(InputError, match=r"nope: no such file or directory"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(UnknownFormatError, match=r"x\.txt: unknown input format .*fmt=<one of imagefolder"):
        open_dataset(tmp_path / "x.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptyDatasetError, match="empty: no images found"):
        open_dataset(tmp_path / "empty")
    (tmp_path / "bad.tar").write_bytes(b"x" * 1024)
    with pytest.raises(InputError, match=r"bad\.tar: corrupt tar header at byte 0"):
        open_dataset(tmp_path / "bad.tar")
    src = make_image_folder(tmp_path / "ds", per_class=1)
    (src / "train" / "dog" / "0000.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(BadImageError, match=r"train/dog/0000\.png: cannot read image \(.*\); "
                                            r"skip_bad=True skips such files"):
        list(open_dataset(src).batches())
    ds = open_dataset(src, skip_bad=True)
    assert sum(len(b[0]) for b in ds.batches()) == 5 and ds.skipped == 1
    with pytest.raises(SplitError, match=r"ds: no split 'val' \(available splits: test, train\)"):
        open_dataset(src, split="val")
