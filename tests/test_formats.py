"""igpt_cli.formats: per-kind format versions, version-1 features files, load_features."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from helpers import make_tokens
from igpt_cli import formats
from igpt_cli.errors import InputError, ParameterError


def write_features(path, n=6, layers=(0, 3), *, version=formats.FEATURES_VERSION, pool="mean", site="ln",
                   complete=True, seed=0):
    """A features file as `igpt extract` lays it out (version 1: no `pool` attr)."""
    rng = np.random.default_rng(seed)
    data = {layer: rng.standard_normal((n, 4)).astype(np.float32) for layer in layers}
    labels = rng.integers(0, 3, n)
    attrs = dict(layers=list(layers), site=site, sos=True, compute_dtype="float32", store_dtype="float32",
                 device_type="cpu", batch_size=2, model_sha256="a" * 64, model_config="{}",
                 tokens_sha256="b" * 64, model="m", tokens_file="t.h5", class_names='["a", "b", "c"]',
                 height=2, width=2)
    if pool is not None:
        attrs["pool"] = pool
    with h5py.File(path, "w") as f:
        formats.create_features_file(f, dims={layer: 4 for layer in layers}, labels=labels,
                                     sources=np.array([f"s{i}" for i in range(n)], dtype=object),
                                     store_dtype="float32", attrs=attrs)
        for layer, x in data.items():
            f["features"][str(layer)][:] = x
        f.attrs.update(n_done=n if complete else n // 2, complete=complete, format_version=version)
        if pool is None:
            assert "pool" not in f.attrs
    return path, data, labels


def test_features_files_are_version_2_and_tokens_files_version_1(tmp_path):
    path, _, _ = write_features(tmp_path / "f.h5")
    with formats.open_igpt(path, formats.FEATURES_FORMAT) as f:
        a = formats.read_attrs(f)
    assert formats.FEATURES_VERSION == 2 and a["format_version"] == 2 and a["pool"] == "mean"
    tok = make_tokens(tmp_path / "t.h5", 2, 4)
    with formats.open_igpt(tok, formats.TOKENS_FORMAT) as f:
        assert formats.read_attrs(f)["format_version"] == formats.TOKENS_VERSION == 1
        assert "pool" not in formats.read_attrs(f)


def test_newer_versions_are_refused_per_kind(tmp_path):
    path, _, _ = write_features(tmp_path / "f.h5", version=3)
    with pytest.raises(InputError, match=r"format_version 3 is newer than this igpt reads \(2\)"):
        formats.open_igpt(path)
    tok = make_tokens(tmp_path / "t.h5", 2, 4)
    with h5py.File(tok, "r+") as f:
        f.attrs["format_version"] = 2
    with pytest.raises(InputError, match=r"format_version 2 is newer than this igpt reads \(1\)"):
        formats.open_igpt(tok)


def test_version_1_features_file_opens_and_loads(tmp_path):
    path, data, labels = write_features(tmp_path / "v1.h5", version=1, pool=None)
    with formats.open_igpt(path, formats.FEATURES_FORMAT) as f:
        a = formats.read_attrs(f)
        assert a["format_version"] == 1 and a["pool"] == "mean"  # implied: v1 features were averages
        assert formats.identity_mismatch(a, dict(pool="mean", layers=[0, 3])) is None
        assert "pool differs" in formats.identity_mismatch(a, dict(pool="max", layers=[0, 3]))
    X, y = formats.load_features(path, 3)
    np.testing.assert_array_equal(X, data[3])
    assert X.dtype == np.float32 and y.dtype == np.int64 and (y == labels).all()
    pix, _, _ = write_features(tmp_path / "v1-pixels.h5", layers=(0,), version=1, pool=None, site="pixels")
    with formats.open_igpt(pix) as f:
        assert formats.read_attrs(f)["pool"] == "flatten"  # the pixel baseline is flattened, not averaged


def test_load_features(tmp_path):
    path, data, labels = write_features(tmp_path / "f.h5", layers=(0, 1, 4))
    for layer in (0, 1, 4):
        X, y = formats.load_features(path, layer)
        assert X.shape == (6, 4) and X.dtype == np.float32
        np.testing.assert_array_equal(X, data[layer])
        np.testing.assert_array_equal(y, labels)
    with pytest.raises(ParameterError, match=r"layer=2: not in .*f\.h5, which holds layers 0, 1, 4"):
        formats.load_features(path, 2)
    half, _, _ = write_features(tmp_path / "half.h5", complete=False)
    with pytest.raises(InputError, match=r"half\.h5: incomplete features file \(3/6 rows\)"):
        formats.load_features(half, 0)
    tok = make_tokens(tmp_path / "t.h5", 2, 4)
    with pytest.raises(InputError, match="not an igpt-features file"):
        formats.load_features(tok, 0)
    with pytest.raises(InputError, match="no such file"):
        formats.load_features(tmp_path / "missing.h5", 0)


def test_load_features_reads_float16_as_float32(tmp_path):
    n = 5
    with h5py.File(tmp_path / "f16.h5", "w") as f:
        formats.create_features_file(f, dims={2: 3}, labels=np.arange(n), sources=np.array(["s"] * n, dtype=object),
                                     store_dtype="float16", attrs=dict(layers=[2], site="ln", pool="mean"))
        f["features/2"][:] = np.full((n, 3), 0.5, dtype=np.float16)
        f.attrs.update(n_done=n, complete=True)
    X, y = formats.load_features(tmp_path / "f16.h5", 2)
    assert X.dtype == np.float32 and (X == 0.5).all() and list(y) == list(range(n))
    with h5py.File(tmp_path / "f16.h5", "r") as f:
        assert json.loads(formats.read_attrs(f)["layers"]) == [2]


def test_json_attrs_and_layer_names_are_checked(tmp_path):
    path, _, _ = write_features(tmp_path / "f.h5")
    with h5py.File(path, "r+") as f:
        assert formats.json_attr(f, "layers", path, kind=list) == [0, 3]
        assert formats.json_attr(f, "missing", path, default=7) == 7
        assert formats.class_names(f, path) == ["a", "b", "c"]
        for value, needle in (("[0, 3", "attr layers is not valid JSON"), ('{"a": 1}', "attr layers must be a "
                                                                                      "JSON list, not dict")):
            f.attrs["layers"] = value
            with pytest.raises(formats.FormatError, match=needle) as e:
                formats.json_attr(f, "layers", path, kind=list)
            assert str(e.value).startswith(str(path))
        f.attrs["class_names"] = json.dumps(["a", 2])
        with pytest.raises(formats.FormatError, match="class_names must be a JSON list of strings"):
            formats.class_names(f, path)
        f["features/abc"] = np.zeros((6, 4), np.float32)
        with pytest.raises(formats.FormatError, match="features/abc is not a layer number"):
            formats.feature_layers(f)


def test_open_igpt_names_what_is_wrong(tmp_path):
    from helpers import hold_output_lock

    tok = make_tokens(tmp_path / "t.h5", 3, 4)
    with pytest.raises(formats.FormatError, match="is a directory"):
        formats.open_igpt(tmp_path)
    cut = tmp_path / "cut.h5"
    cut.write_bytes(tok.read_bytes()[:2000])
    with pytest.raises(formats.FormatError, match=r"cut.h5: truncated HDF5 file \(.*truncated"):
        formats.open_igpt(cut)
    holder = hold_output_lock(tok)
    try:
        with pytest.raises(formats.FormatError, match=f"another igpt run is writing this file \\(pid {holder.pid} "):
            formats.open_igpt(tok)
    finally:
        holder.stdin.close()
        holder.wait(30)
    with formats.open_igpt(tok) as f:
        t, h, w, pal = formats.tokens_layout(f, tok)
        assert (t.shape, h, w, pal.shape) == ((3, 16), 4, 4, (512, 3))
    with h5py.File(tok, "r+") as f:
        f.attrs["width"] = 5
    with formats.open_igpt(tok) as f, pytest.raises(formats.FormatError, match="height x width is 4x5 = 20"):
        formats.tokens_layout(f, tok)


def test_complete_features_need_matching_rows(tmp_path):
    path, data, _ = write_features(tmp_path / "f.h5")
    with h5py.File(path, "r+") as f:
        del f["features/3"]
        f["features/3"] = data[3][:5]
    with pytest.raises(formats.FormatError, match="features/3 has 5 rows but labels has 6"):
        formats.load_features(path, 0)


# --- names that are not UTF-8 (file system bytes, command lines) --------------------------------
def test_storable_text_writes_undecodable_bytes_as_escapes():
    name = b"cat\xff.png".decode("utf-8", "surrogateescape")  # as os.listdir gives it
    assert formats.storable_text(name) == "cat\\xff.png"
    assert formats.storable_text("chat·é.png") == "chat·é.png" and formats.storable_text(3) == 3
    assert formats.storable_text("\ud800") == "\\ud800"  # a surrogate no byte stands for
    arr = formats.storable_names(["a", name])
    assert arr.tolist() == ["a", "cat\\xff.png"]


def test_non_utf8_image_names_and_output_names_are_stored_not_a_crash(tmp_path):
    import subprocess
    import sys

    from PIL import Image

    from helpers import ENV, read_tokens

    d = tmp_path / "imgs" / "train" / "cat"
    d.mkdir(parents=True)
    odd = b"a\xff.png".decode("utf-8", "surrogateescape")
    Image.new("RGB", (8, 8), (10, 20, 30)).save(d / odd, format="PNG")
    Image.new("RGB", (8, 8), (200, 20, 30)).save(d / "b.png")
    out = tmp_path / b"t\xff.h5".decode("utf-8", "surrogateescape")

    def igpt(*args):
        return subprocess.run([sys.executable, "-m", "igpt_cli", *map(str, args)], capture_output=True, env=ENV)

    r = igpt("quantize", tmp_path / "imgs", "--size", "8", "-o", out, "-q")
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr
    assert read_tokens(out)[2] == ["train/cat/a\\xff.png", "train/cat/b.png"]
    feats = tmp_path / b"f\xfe.h5".decode("utf-8", "surrogateescape")
    r = igpt("extract", out, "-m", "igpt-cifar8", "-l", "1", "-o", feats, "-q")
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr
    with h5py.File(feats, "r") as f:
        assert f.attrs["tokens_file"].endswith("t\\xff.h5") and f["sources"].asstr()[0] == "train/cat/a\\xff.png"
    r = igpt("info", feats)
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr
    direct = tmp_path / "direct.h5"  # images straight to features: the same names
    r = igpt("features", tmp_path / "imgs", "-m", "igpt-cifar8", "-l", "1", "-o", direct, "-q")
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr
    with h5py.File(direct, "r") as f:
        assert f["sources"].asstr()[:].tolist() == ["train/cat/a\\xff.png", "train/cat/b.png"]
