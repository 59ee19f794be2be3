"""`igpt features`: images straight to features, bit for bit what `quantize` + `extract` give with
the model's own settings; resumable; `--keep-tokens` writes the very tokens file quantize would."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from helpers import FOLDER_CLASSES, assert_clean_failure, invoke, make_image_folder, read_feats

from igpt_cli import extract_features, extract_image_features, formats, quantize_dataset
from igpt_cli.model import BUNDLED

MODEL = "igpt-cifar8"  # the shipped model: 8x8 images, its own 512-colour palette
RUN = dict(batch_size=4, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An image folder of 3 classes x 5 random 32x32 PNGs (train split only)."""
    return make_image_folder(tmp_path_factory.mktemp("imgs"), splits=("train",), per_class=5)


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory):
    """quantize (with the model's size and palette) + extract: the features to match."""
    tmp = tmp_path_factory.mktemp("ref")
    quantize_dataset(folder, tmp / "tok.h5", split="train", size=8, palette=BUNDLED[MODEL])
    extract_features(tmp / "tok.h5", MODEL, "1,3", tmp / "feats.h5", **RUN)
    return tmp / "tok.h5", tmp / "feats.h5"


def labels_sources(path):
    with h5py.File(path, "r") as f:
        return f["labels"][:].tolist(), list(f["sources"].asstr()[:])


def test_features_equal_quantize_then_extract(folder, reference, tmp_path):
    tok, ref = reference
    out = tmp_path / "f.h5"
    r = extract_image_features(folder, MODEL, "1,3", out, split="train", keep_tokens=tmp_path / "k.h5", **RUN)
    assert (r.n, r.computed, r.layers) == (15, 15, [1, 3])
    got, want = read_feats(out), read_feats(ref)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    assert labels_sources(out) == labels_sources(ref)
    with h5py.File(tmp_path / "k.h5") as k, h5py.File(tok) as q:  # --keep-tokens: quantize's file
        assert np.array_equal(k["tokens"][:], q["tokens"][:]) and np.array_equal(k["labels"][:], q["labels"][:])
        assert np.array_equal(k["palette"][:], q["palette"][:])
    with formats.open_igpt(out, formats.FEATURES_FORMAT) as f:
        a = formats.read_attrs(f)
    assert a["source"] == str(folder) and a["split"] == "train" and a["size"] == 8 and a["resize"] == "bilinear"
    assert a["palette_sha256"] and "tokens_sha256" not in a and json.loads(a["class_names"]) == FOLDER_CLASSES


def test_interrupted_features_resume_to_the_same_file(folder, reference, tmp_path):
    out = tmp_path / "f.h5"
    seen = []

    def stop_after_two_batches(ev):
        seen.append(ev.done)
        if ev.done >= 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_image_features(folder, MODEL, "1,3", out, split="train", on_progress=stop_after_two_batches, **RUN)
    assert not out.exists()
    r = extract_image_features(folder, MODEL, "1,3", out, split="train", **RUN)
    assert r.resumed_from == 8 and r.computed == 7
    got, want = read_feats(out), read_feats(reference[1])
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert labels_sources(out) == labels_sources(reference[1])


def test_partial_with_other_settings_is_in_the_way(folder, tmp_path):
    out = tmp_path / "f.h5"

    def stop(ev):
        if ev.done >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_image_features(folder, MODEL, "1", out, on_progress=stop, **RUN)
    with pytest.raises(Exception, match="different settings.*split"):
        extract_image_features(folder, MODEL, "1", out, split="train", **RUN)


def test_cli_features_and_bad_input(folder, reference, tmp_path):
    out = tmp_path / "f.h5"
    r = invoke("features", folder, "-m", MODEL, "-l", "1", "-l", "3", "--split", "train", "-b", "4",
               "--device", "cpu", "--dtype", "float32", "-o", out, "-q")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n"] == 15
    got, want = read_feats(out), read_feats(reference[1])
    assert all(np.array_equal(got[k], want[k]) for k in want)
    bad = tmp_path / "bad.h5"
    assert_clean_failure(invoke("features", folder, "-m", MODEL, "--size", "16", "-o", bad, "-q"),
                         "the model wants 8x8", out=bad)
    assert_clean_failure(invoke("features", tmp_path / "nope", "-m", MODEL, "-o", bad, "-q"), "nope", out=bad)
    assert_clean_failure(invoke("features", folder, "-m", MODEL, "--size", "0", "-o", bad, "-q"),
                         "--size 0: must be at least 1", out=bad)  # 0 is a size, not "the model's"


def test_a_bad_image_leaves_nothing_in_the_way_of_the_rerun_its_error_suggests(tmp_path):
    """The run stops at the bad image with one line and no 0-row partial file; the suggested rerun
    (--skip-bad) then works without --restart."""
    folder = make_image_folder(tmp_path / "imgs", splits=("train",), per_class=3)
    (folder / "train" / FOLDER_CLASSES[1] / "0001.png").write_bytes(b"not a png")
    out = tmp_path / "f.h5"
    args = ("features", folder, "-m", MODEL, "-l", "1", "-b", "4", "--device", "cpu", "--dtype", "float32", "-q")
    r = invoke(*args, "-o", out)
    assert_clean_failure(r, "--skip-bad", out=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]  # no partial, no lock
    r = invoke(*args, "--skip-bad", "-o", out)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n"] == 8
    with h5py.File(out) as f:
        assert f.attrs["skip_bad"] and len(f["labels"]) == 8


@pytest.mark.parametrize("pool", ["max", "none"])
def test_features_pools_equal_extract_pools(folder, reference, tmp_path, pool):
    """`igpt features --pool max|none` writes what `igpt extract --pool max|none` writes from the same tokens."""
    tok, _ = reference
    want, got = tmp_path / "want.h5", tmp_path / "got.h5"
    extract_features(tok, MODEL, "2", want, pool=pool, **RUN)
    r = invoke("features", folder, "-m", MODEL, "-l", "2", "--split", "train", "--pool", pool, "--batch-size", "4",
               "--device", "cpu", "--dtype", "float32", "-o", got, "-q")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["store_dtype"] == ("float16" if pool == "none" else "float32")
    a, b = read_feats(got), read_feats(want)
    assert a[2].shape == ((15, 64, 192) if pool == "none" else (15, 192))
    np.testing.assert_array_equal(a[2], b[2])
    with h5py.File(got) as f:
        assert f.attrs["pool"] == pool
