"""The data people have: single files, @lists, globs, Hugging Face datasets (Arrow, Parquet),
WebDataset shards, all read as the same images/labels/class names as the image folder they
were made from; and OpenAI's pre-quantized .npy datasets copied into tokens files."""
from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

from helpers import FOLDER_CLASSES, assert_bad_input, invoke, make_image_folder, read_tokens
from igpt_cli.data import detect_format, open_dataset
from igpt_cli.data.sources import expand_braces
from igpt_cli.data.tokens import CIFAR10_CLASSES
from igpt_cli.errors import ParameterError

SIZE = 8


def read_all(src, **kw):
    """(images, labels, class names) of a dataset."""
    ds = open_dataset(src, size=SIZE, **kw)
    batches = list(ds.batches(3))
    return (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]), ds.class_names)


def assert_same(got, want):
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert got[2] == want[2]


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "ds", per_class=2)


def split_rows(folder, split):
    """(png bytes, label) of a split in the image folder's (sorted) order."""
    return [((folder / split / c / f"{i:04d}.png").read_bytes(), k)
            for k, c in enumerate(FOLDER_CLASSES) for i in range(2)]


def test_single_file_list_glob_and_several_paths(folder, tmp_path):
    want = read_all(folder, split="train")
    assert_same(read_all(str(folder / "train" / "*" / "*.png")), want)  # class folders label the files
    files = sorted((folder / "train").glob("*/*.png"))
    assert_same(read_all(files), want)
    (tmp_path / "list.txt").write_text("# my images\n" + "".join(f"ds/train/{f.parent.name}/{f.name}\n"
                                                                 for f in files))
    assert_same(read_all(f"@{tmp_path / 'list.txt'}"), want)
    one = read_all(files[0])  # a single file: unlabelled
    np.testing.assert_array_equal(one[0], want[0][:1])
    assert one[1].tolist() == [-1] and one[2] == []
    side_by_side = read_all(str(folder / "train" / FOLDER_CLASSES[0] / "*.png"))
    assert side_by_side[1].tolist() == [-1, -1]
    assert detect_format(files[0]) == "files"
    r = invoke("quantize", str(files[0]), str(files[-1]), "-o", tmp_path / "two.h5", "-q", "--size", SIZE)
    assert r.returncode == 0, r.stderr
    assert read_tokens(tmp_path / "two.h5")[1].tolist() == [0, 1]  # two class folders
    r = invoke("quantize", str(folder / "nothing*.png"), "-o", tmp_path / "x.h5")
    assert_bad_input(r, tmp_path / "x.h5", "matches no files")


def test_expand_braces():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
    assert expand_braces("x{}.tar") == ["x{}.tar"]


def hf_splits(folder):
    import datasets

    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(FOLDER_CLASSES))})
    return datasets.DatasetDict({
        s: datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b, _ in split_rows(folder, s)],
                                       "label": [k for _, k in split_rows(folder, s)]}, features=feats)
        for s in ("train", "test")})


def test_hugging_face_arrow_and_parquet_match_the_image_folder(folder, tmp_path):
    dd = hf_splits(folder)
    dd.save_to_disk(str(tmp_path / "dict"))
    dd["test"].save_to_disk(str(tmp_path / "one"))
    hub = tmp_path / "hub" / "plain_text"
    hub.mkdir(parents=True)
    for s in ("train", "test"):  # a hub snapshot: plain_text/{split}-00000-of-00001.parquet
        dd[s].to_parquet(str(hub / f"{s}-00000-of-00001.parquet"))
    for split in ("train", "test"):
        want = read_all(folder, split=split)
        for src in (tmp_path / "dict", tmp_path / "hub"):
            assert detect_format(src) == "hf"
            assert_same(read_all(src, split=split), want)
    assert_same(read_all(tmp_path / "one"), read_all(folder, split="test"))
    assert_same(read_all(hub / "test-00000-of-00001.parquet"), read_all(folder, split="test"))
    ds = open_dataset(tmp_path / "hub", size=SIZE)
    assert ds.kind == "parquet" and ds.splits == ["test", "train"] and ds.n == 4 * len(FOLDER_CLASSES)
    # the CLI writes the same tokens as the image folder's
    for name, src in (("folder", folder), ("arrow", tmp_path / "dict")):
        r = invoke("quantize", src, "--split", "train", "-o", tmp_path / f"{name}.h5", "-q", "--size", SIZE)
        assert r.returncode == 0, r.stderr
    a, b = read_tokens(tmp_path / "folder.h5"), read_tokens(tmp_path / "arrow.h5")
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[3]["class_names"] == b[3]["class_names"]
    assert b[2][0] == "train/data-00000-of-00001.arrow[0]"


def test_hugging_face_path_columns_and_overrides(folder, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [(f"../ds/test/{c}/{i:04d}.png", c) for c in FOLDER_CLASSES for i in range(2)]
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"file": [r[0] for r in rows], "kind": [r[1] for r in rows],
                             "label": list(range(len(rows)))}), tmp_path / "pq" / "test.parquet")
    src = tmp_path / "pq" / "test.parquet"
    with pytest.raises(Exception, match="cannot tell which column holds the images"):
        open_dataset(src)
    got = read_all(src, image_column="file", label_column="kind")  # string labels: sorted class names
    assert_same(got, read_all(folder, split="test"))
    with pytest.raises(ParameterError, match="label_column='nope': no such column"):
        open_dataset(src, image_column="file", label_column="nope")
    r = invoke("quantize", src, "--image-column", "file", "--label-column", "nope", "-o", tmp_path / "x.h5")
    assert_bad_input(r, tmp_path / "x.h5", "--label-column 'nope'", "no such column")
    with pytest.raises(ParameterError, match="image_column"):
        open_dataset(folder, image_column="image")


def write_shards(folder, root, *, sidecar="cls", compress=False, per_shard=5):
    """The train split as WebDataset shards root/shard-NN.tar (keys NNNN, images .png, labels in `sidecar`)."""
    import webdataset as wds

    root.mkdir()
    rows = split_rows(folder, "train")
    for n, start in enumerate(range(0, len(rows), per_shard)):
        name = root / f"shard-{n:02d}.tar{'.gz' if compress else ''}"
        with wds.TarWriter(str(name), compress=compress) as w:
            for j, (png, k) in enumerate(rows[start:start + per_shard]):
                label = {"cls": k} if sidecar == "cls" else {"json": {"label": FOLDER_CLASSES[k], "w": 32}}
                w.write({"__key__": f"{start + j:04d}", "png": png, **label})
    (root / "classes.txt").write_text("\n".join(FOLDER_CLASSES) + "\n")
    return root


def test_webdataset_shards_match_the_image_folder(folder, tmp_path):
    want = read_all(folder, split="train")
    plain = write_shards(folder, tmp_path / "wds")
    assert detect_format(plain / "shard-00.tar") == "webdataset" and detect_format(plain) == "webdataset"
    assert_same(read_all(str(plain / "shard-{00..01}.tar")), want)
    assert_same(read_all(str(plain / "shard-*.tar")), want)
    assert_same(read_all(plain), want)
    gz = write_shards(folder, tmp_path / "gz", sidecar="json", compress=True)  # names in .json, compressed
    assert_same(read_all(str(gz / "shard-{00..01}.tar.gz")), want)
    ds = open_dataset(str(plain / "shard-{00..01}.tar"), size=SIZE, limit_per_class=1)
    assert [b[1].tolist() for b in ds.batches()] == [list(range(len(FOLDER_CLASSES)))]
    # an image-folder tar is not taken for a shard
    with tarfile.open(tmp_path / "folder.tar", "w") as tf:
        tf.add(folder, arcname=".")
    assert detect_format(tmp_path / "folder.tar") == "imagefolder"
    with pytest.raises(Exception, match="no label 'fine'"):
        open_dataset(plain / "shard-00.tar", label_column="fine")


def write_openai(tmp_path, n=6, c=10, prefix="cifar10", part="tr"):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 512, (n, 1024)).astype(np.int64)
    y = rng.integers(0, c, n)
    np.save(tmp_path / f"{prefix}_{part}X.npy", x)
    np.save(tmp_path / f"{prefix}_{part}Y.npy", np.eye(c, dtype=np.float32)[y])
    return tmp_path / f"{prefix}_{part}X.npy", x, y


def test_pre_quantized_openai_npy_round_trips(tmp_path, official_palette_path):
    src, x, y = write_openai(tmp_path)
    r = invoke("quantize", src, "-o", tmp_path / "t.h5", "-q")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["format"] == "openai-tokens"
    tokens, labels, sources, attrs = read_tokens(tmp_path / "t.h5")
    np.testing.assert_array_equal(tokens, x)
    np.testing.assert_array_equal(labels, y)
    assert (attrs["height"], attrs["width"], attrs["split"]) == (32, 32, "train")
    assert json.loads(attrs["class_names"]) == list(CIFAR10_CLASSES) and sources[0] == "cifar10_trX.npy[0]"
    import h5py
    with h5py.File(tmp_path / "t.h5") as f:
        np.testing.assert_array_equal(f["palette"][:], np.load(official_palette_path))
    # imagenet-like names: indices as class names; vaX is the validation split
    src2, _, _ = write_openai(tmp_path, c=4, prefix="imagenet", part="va")
    ds = open_dataset(src2)
    assert ds.splits == ["validation"] and ds.class_names == ["0", "1", "2", "3"]
    img = next(iter(ds.batches()))[0]
    assert img.shape == (6, 32, 32, 3)


def test_pre_quantized_bad_input(tmp_path):
    src, x, y = write_openai(tmp_path)
    out = tmp_path / "t.h5"
    x[3, 7] = 512
    np.save(src, x)
    assert_bad_input(invoke("quantize", src, "-o", out), out, "row 3", "token 512")
    x[3, 7] = 0
    np.save(src, x)
    np.save(tmp_path / "cifar10_trY.npy", np.eye(10)[:5])
    assert_bad_input(invoke("quantize", src, "-o", out), out, "cifar10_trY.npy", "N = 6")
    onehot = np.eye(10)[y]
    onehot[2, 0] = onehot[2, 1] = 1
    np.save(tmp_path / "cifar10_trY.npy", onehot)
    assert_bad_input(invoke("quantize", src, "-o", out), out, "row 2 is not one-hot")
    np.save(tmp_path / "cifar10_trY.npy", np.eye(10)[y])
    assert_bad_input(invoke("quantize", src, "-o", out, "--size", "16"), out, "--size 16")


@pytest.mark.parametrize("command", ["quantize", "features"])
def test_an_arrow_file_cut_in_half_is_one_line_naming_it(folder, tmp_path, command):
    hf_splits(folder)["test"].save_to_disk(str(tmp_path / "one"))
    arrow = next((tmp_path / "one").glob("*.arrow"))
    data = arrow.read_bytes()
    arrow.write_bytes(data[: len(data) // 2])
    out = tmp_path / "o.h5"
    extra = ["--size", SIZE] if command == "quantize" else ["-m", "igpt-cifar8", "-l", "1"]
    r = invoke(command, tmp_path / "one", "-o", out, "-q", *extra)
    assert_bad_input(r, out, str(arrow))
    assert "truncated or corrupt arrow file" in r.stderr or "not a readable arrow file" in r.stderr
    assert not out.exists()


def test_webdataset_label_too_large_and_samples_without_labels(folder, tmp_path):
    import io

    png = next((folder / "train").glob("*/*.png")).read_bytes()

    def shard(path, samples):
        with tarfile.open(path, "w") as tf:
            for key, files in samples:
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        return path

    huge = shard(tmp_path / "huge.tar", [("a", {"png": png, "cls": b"99999999999999999999"}),
                                          ("b", {"png": png, "cls": b"0"})])
    for command in ("quantize", "features"):
        extra = ["--size", SIZE] if command == "quantize" else ["-m", "igpt-cifar8", "-l", "1"]
        r = invoke(command, huge, "-o", tmp_path / "o.h5", "-q", *extra)
        assert_bad_input(r, tmp_path / "o.h5", "label 99999999999999999999 is not -1 or a class index")
    missing = shard(tmp_path / "missing.tar", [("a", {"png": png, "cls": b"1"}), ("b", {"png": png}),
                                               ("c", {"png": png, "cls": b"0"})])
    ds = open_dataset(missing, size=SIZE)
    assert ds.warnings == [f"{missing}: 1 of 3 samples have no label (no .cls, .json or numeric .txt); "
                           "they get label -1 (unlabelled)"]
    r = invoke("quantize", missing, "-o", tmp_path / "m.h5", "--size", SIZE)
    assert r.returncode == 0 and "1 of 3 samples have no label" in r.stderr
    assert read_tokens(tmp_path / "m.h5")[1].tolist() == [1, -1, 0]
