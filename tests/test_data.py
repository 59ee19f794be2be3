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

from helpers import FOLDER_CLASSES, encode_image, make_image_folder, random_image, read_tokens
from igpt_cli.choices import FORMATS
from igpt_cli.data import (READERS, BadImageError, DataError, EmptyDatasetError, SplitError, TruncatedArchiveError,
                           UnknownFormatError, decode_image, detect_format, open_dataset)
from igpt_cli.data import decode_pool, encoded
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
    # 4096 images: large enough for the process pool (encoded.POOL_MIN_IMAGES)
    n = encoded.POOL_MIN_IMAGES
    assert encoded.decode_workers(n) == decode_pool.pool_size() >= 2 and encoded.decode_workers(n - 1) == 0

    def read_all():
        batches = list(open_dataset(cifar_tar, split="test", limit=n).batches(500))
        return (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]),
                [s for b in batches for s in b[2]])

    pooled = read_all()
    monkeypatch.setattr(encoded, "decode_workers", lambda n_images: 0)
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
    assert lab.tolist() == [-1] * 4 and s.unlabelled == 4
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
                           ({"fmt": "bogus"}, "fmt='bogus': expected one of " + ", ".join(FORMATS))):
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


# ---------------------------------------------------------------------------
# hardening (issue 10): cut archives, unsafe member names, bad labels, bombs, selection
# ---------------------------------------------------------------------------

def _tar_of(folder: Path, out: Path) -> Path:
    with tarfile.open(out, "w") as tf:
        tf.add(folder, arcname=".")
    return out


def _cut(src: Path, out: Path, nbytes: int) -> Path:
    out.write_bytes(src.read_bytes()[:nbytes])
    return out


def test_truncated_tar_tgz_zip_are_refused_naming_the_member(tmp_path):
    src = make_image_folder(tmp_path / "ds", per_class=2)  # 12 images
    full = _tar_of(src, tmp_path / "full.tar")
    members = tarfile.open(full).getmembers()
    last = members[-1]
    data_end = last.offset_data + last.size
    # cut inside the last member's data: its header was read, so it is named
    with pytest.raises(TruncatedArchiveError, match=rf"t1\.tar: archive truncated at member {len(members)} "
                                                    rf"\({last.name}\)$"):
        open_dataset(_cut(full, tmp_path / "t1.tar", data_end - 10))
    # cut inside a header, and cut before the end-of-archive block (no member is incomplete)
    with pytest.raises(TruncatedArchiveError, match=rf"t2\.tar: archive truncated at member {len(members)}$"):
        open_dataset(_cut(full, tmp_path / "t2.tar", last.offset + 100))
    with pytest.raises(TruncatedArchiveError, match=rf"archive truncated at member {len(members) + 1}$"):
        open_dataset(_cut(full, tmp_path / "t3.tar", (data_end + 511) // 512 * 512))
    # cut within the end-of-archive block: every member is complete, the dataset is whole
    assert open_dataset(_cut(full, tmp_path / "t4.tar", (data_end + 511) // 512 * 512 + 100)).n == 12
    with pytest.raises(DataError, match=r"empty\.tar: empty file, not a tar archive"):
        open_dataset(_cut(full, tmp_path / "empty.tar", 0))
    # compressed: the same, through tarfile
    gz = tmp_path / "full.tar.gz"
    with tarfile.open(gz, "w:gz") as tf:
        tf.add(src, arcname=".")
    with pytest.raises(TruncatedArchiveError, match=r"t\.tar\.gz: archive truncated at member \d+"):
        open_dataset(_cut(gz, tmp_path / "t.tar.gz", gz.stat().st_size // 2))
    # zip: its directory is at the end; the local headers say where it breaks
    zp = tmp_path / "full.zip"
    with zipfile.ZipFile(zp, "w") as z:
        for p in sorted(src.rglob("*.png")):
            z.write(p, p.relative_to(src).as_posix())
    info = zipfile.ZipFile(zp).infolist()
    with pytest.raises(TruncatedArchiveError, match=rf"t\.zip: archive truncated at member 3 \({info[2].filename}\)$"):
        open_dataset(_cut(zp, tmp_path / "t.zip", info[2].header_offset + 60))
    with pytest.raises(TruncatedArchiveError, match=r"archive truncated at member 13: the central directory after "
                                                    r"member 12 is cut"):
        open_dataset(_cut(zp, tmp_path / "t2.zip", zp.stat().st_size - 30))
    # a member whose bytes are corrupt (CRC) is a bad image, named; skip_bad skips it
    raw = bytearray(zp.read_bytes())
    off = info[0].header_offset + 30 + len(info[0].filename) + 100
    raw[off:off + 8] = b"\0" * 8
    (tmp_path / "crc.zip").write_bytes(bytes(raw))
    with pytest.raises(BadImageError, match=rf"crc\.zip:{info[0].filename}: cannot read image \(.*CRC"):
        list(open_dataset(tmp_path / "crc.zip").batches())
    ds = open_dataset(tmp_path / "crc.zip", skip_bad=True)
    assert sum(len(b[0]) for b in ds.batches()) == 11 and ds.skipped == 1


def test_archive_members_outside_the_tree_are_skipped_with_a_warning(tmp_path):
    import io as _io

    png = encode_image(random_image(np.random.default_rng(0), 8, 8), "PNG")
    names = ["cat/a.png", "dog/b.png", "../x.png", "/abs/y.png", "cat/../../z.png"]
    with tarfile.open(tmp_path / "evil.tar", "w") as tf:
        for n in names:
            ti = tarfile.TarInfo(n)
            ti.size = len(png)
            tf.addfile(ti, _io.BytesIO(png))
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as z:
        for n in names[:4]:
            z.writestr(n, png)
    for arc, unsafe in (("evil.tar", 3), ("evil.zip", 2)):
        ds = open_dataset(tmp_path / arc)
        assert ds.class_names == ["cat", "dog"] and ds.n == 2, ds.class_names
        assert ds.warnings == [f"{tmp_path / arc}: skipped {unsafe} members whose names point outside the archive "
                               "(absolute or with '..'), e.g. '../x.png'"]
        assert [s for b in ds.batches() for s in b[2]] == [f"{arc}:cat/a.png", f"{arc}:dog/b.png"]


def test_labels_out_of_range_and_object_arrays_are_refused(tmp_path):
    x = np.zeros((4, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "neg.npz", x=x, y=np.array([0, 1, -5, 0]))
    with pytest.raises(DataError, match=r"neg\.npz\[y\]: label -5 at index 2 is not -1 \(unlabelled\) or a class index"):
        open_dataset(tmp_path / "neg.npz")
    np.savez(tmp_path / "high.npz", x=x, y=np.array([0, 1, 2, 3]), class_names=np.array(["a", "b", "c"]))
    with pytest.raises(DataError, match=r"high\.npz\[y\]: label 3 at index 3 .*0\.\.2 for 3 class names"):
        open_dataset(tmp_path / "high.npz")
    np.savez(tmp_path / "split.npz", x_train=x, y_train=np.array([0, 0, 1, 7]), x_test=x, y_test=np.zeros(4, int),
             class_names=np.array(["a", "b"]))
    with pytest.raises(DataError, match=r"split\.npz\[y_train\]: label 7 at index 3"):
        open_dataset(tmp_path / "split.npz")
    np.savez(tmp_path / "huge.npz", x=x, y=np.array([0, 1, 2, 10 ** 12]))  # no names: would be 10^12 classes
    with pytest.raises(DataError, match=r"huge\.npz\[y\]: label 1000000000000 .*without class names"):
        open_dataset(tmp_path / "huge.npz")
    np.savez(tmp_path / "ok.npz", x=x, y=np.array([0, -1, 2, 1]), class_names=np.array(["a", "b", "c"]))
    assert open_dataset(tmp_path / "ok.npz").class_names == ["a", "b", "c"]
    # CIFAR batches: a label beyond the class names
    src = fake_cifar(tmp_path / "c", archive=False)
    d = src / "cifar-10-batches-py"
    batch = pickle.loads((d / "test_batch").read_bytes(), encoding="bytes")
    batch[b"labels"][1] = 10
    (d / "test_batch").write_bytes(pickle.dumps(batch))
    with pytest.raises(DataError, match=r"test_batch: label 10 at index 1 is not a class index \(0\.\.9 for 10"):
        list(open_dataset(src, split="test").batches())
    # object arrays are pickles: never loaded
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"obj\.npy: not a readable npy file \(.*Python objects"):
        open_dataset(tmp_path / "obj.npy")
    np.savez(tmp_path / "obj.npz", x=x, y=np.array([0, 1, 0, 1]), class_names=np.array([{"a": 1}, 2], dtype=object))
    with pytest.raises(DataError, match=r"obj\.npz: not a readable npz file \(.*allow_pickle=False"):
        open_dataset(tmp_path / "obj.npz")


def test_images_over_max_pixels_are_refused_before_decoding(tmp_path, monkeypatch):
    from PIL import PngImagePlugin

    d = tmp_path / "ds" / "a"
    d.mkdir(parents=True)
    Image.new("L", (13000, 13000)).save(d / "bomb.png")  # ~160 KB on disk, 169 million pixels
    random_image(np.random.default_rng(0), 64, 96).save(d / "photo.jpg")
    assert (d / "bomb.png").stat().st_size < 600_000
    real_load = PngImagePlugin.PngImageFile.load

    def load(im):
        assert im.size != (13000, 13000), "the bomb was decoded"
        return real_load(im)

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", load)
    with pytest.raises(BadImageError, match=r"a/bomb\.png: cannot read image \(13000×13000 = 169,000,000 pixels, "
                                            r"over max_pixels=89478485: a possible decompression bomb; a larger "
                                            r"max_pixels=N reads it\); skip_bad=True skips such files$"):
        list(open_dataset(tmp_path / "ds").batches())
    ds = open_dataset(tmp_path / "ds", skip_bad=True)
    assert sum(len(b[0]) for b in ds.batches()) == 1 and ds.skipped == 1
    # the limit is a parameter, also on the fast JPEG path (64×96 = 6144 pixels)
    (d / "bomb.png").unlink()
    with pytest.raises(BadImageError, match=r"photo\.jpg: cannot read image \(96×64 = 6,144 pixels, over "
                                            r"max_pixels=6000"):
        list(open_dataset(tmp_path / "ds", max_pixels=6000).batches())
    with pytest.raises(ParameterError, match=r"^max_pixels=0: must be at least 1$"):
        open_dataset(tmp_path / "ds", max_pixels=0)
    with pytest.raises(ValueError, match=r"over max_pixels=6000"):
        decode_image((d / "photo.jpg").read_bytes(), 8, "bilinear", "photo.jpg", max_pixels=6000)


def test_unreadable_image_messages_name_the_file_not_python_internals(tmp_path):
    d = tmp_path / "ds" / "a"
    d.mkdir(parents=True)
    (d / "x.jpg").write_bytes(b"not an image at all")
    with pytest.raises(BadImageError) as e:
        list(open_dataset(tmp_path / "ds").batches())
    msg = str(e.value)
    assert msg.startswith(f"{d / 'x.jpg'}: cannot read image (") and "BytesIO" not in msg and "0x" not in msg, msg


def _labels(ds):
    return [int(v) for b in ds.batches(3) for v in b[1]]


def _sources(ds):
    return [s.split(":")[-1].removeprefix("./") for b in ds.batches(3) for s in b[2]]


def test_limit_per_class_shuffle_and_seed_select_from_every_class(tmp_path):
    src = make_image_folder(tmp_path / "ds", splits=("",), per_class=4)  # cat, dog, frog × 4, sorted
    ds = open_dataset(src, limit=4)
    assert _labels(ds) == [0, 0, 0, 0]
    assert ds.warnings == [f"{src}: limit=4 leaves 2 of 3 classes without images (dog, frog); pass shuffle=True or "
                           "limit_per_class=N for images of every class"]
    ds = open_dataset(src, limit_per_class=2)
    assert _labels(ds) == [0, 0, 1, 1, 2, 2] and ds.n == 6 and ds.warnings == []
    assert open_dataset(src, limit_per_class=3, limit=5).n == 5
    a, b, c = (_sources(open_dataset(src, shuffle=True, seed=s)) for s in (0, 0, 1))
    assert a == b and a != c and sorted(a) == sorted(_sources(open_dataset(src)))  # a seeded permutation
    picked = _sources(open_dataset(src, shuffle=True, seed=0, limit=6))
    assert picked == a[:6]
    per = _labels(open_dataset(src, shuffle=True, seed=3, limit_per_class=1))
    assert sorted(per) == [0, 1, 2]
    with pytest.raises(ParameterError, match=r"^limit_per_class=0: must be at least 1$"):
        open_dataset(src, limit_per_class=0)
    with pytest.raises(ParameterError, match=r"^seed=-1: must be an integer from 0 to 18446744073709551615 \(2\*\*64 - 1\)$"):
        open_dataset(src, seed=-1)
    # archives select the same images: a plain tar and a zip read in the shuffled order, a
    # compressed tar (read front to back) reads the same selection in archive order
    tar = _tar_of(src, tmp_path / "ds.tar")
    zp = tmp_path / "ds.zip"
    with zipfile.ZipFile(zp, "w") as z:
        for p in sorted(src.rglob("*.png")):
            z.write(p, p.relative_to(src).as_posix())
    with tarfile.open(tmp_path / "ds.tar.gz", "w:gz") as tf:
        tf.add(src, arcname=".")
    assert _sources(open_dataset(tar, shuffle=True, seed=0, limit=6)) == picked
    assert _sources(open_dataset(zp, shuffle=True, seed=0, limit=6)) == picked
    assert sorted(_sources(open_dataset(tmp_path / "ds.tar.gz", shuffle=True, seed=0, limit=6))) == sorted(picked)


def test_selection_in_arrays_and_cifar(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", x_train=x[:8], y_train=np.repeat([0, 1], 4), x_test=x[8:], y_test=[0, 1, 0, 1])
    ds = open_dataset(tmp_path / "a.npz", limit_per_class=1, size=8)
    imgs, labels, sources = next(ds.batches())
    assert labels.tolist() == [0, 1] and sources == ["a.npz[x_train][0]", "a.npz[x_train][4]"]
    np.testing.assert_array_equal(imgs, x[[0, 4]])
    ds = open_dataset(tmp_path / "a.npz", shuffle=True, seed=0, size=8)
    batches = list(ds.batches(5))  # batches mix the two parts, images match their sources
    srcs = [s for b in batches for s in b[2]]
    assert sorted(srcs) == sorted(_sources(open_dataset(tmp_path / "a.npz"))) and srcs != sorted(srcs)
    for imgs, _, sources in batches:
        for im, s in zip(imgs, sources):
            key, j = s.split("[")[1].rstrip("]"), int(s.split("[")[2].rstrip("]"))
            np.testing.assert_array_equal(im, x[j] if key == "x_train" else x[8 + j])
    assert open_dataset(tmp_path / "a.npz", limit=3).warnings[0].endswith(
        "limit=3 leaves 1 of 2 classes without images (1); pass shuffle=True or limit_per_class=N for images of "
        "every class")
    src = fake_cifar(tmp_path, per_batch=6)  # labels random in 0..9
    every = open_dataset(src, split="train")
    all_labels = np.concatenate([b[1] for b in every.batches()])
    ds = open_dataset(src, split="train", limit_per_class=1)
    got = _labels(ds)
    assert sorted(got) == sorted(set(all_labels.tolist())) and ds.n == len(got)
    sh = [list(b[2]) for b in open_dataset(src, split="train", shuffle=True, seed=4, limit=7).batches(3)]
    flat = [s for b in sh for s in b]
    assert len(flat) == 7 and len(set(flat)) == 7 and flat != sorted(flat)
    assert flat == [s for b in open_dataset(src, split="train", shuffle=True, seed=4, limit=7).batches(3) for s in b[2]]
