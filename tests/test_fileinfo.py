"""igpt_cli.fileinfo: `file_info` / `igpt info` on tokens and features files, and
`show_tokens` / `igpt show` (the PNG grid of decoded tokens)."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from PIL import Image

from helpers import assert_bad_input, invoke, make_image_folder, make_tokens, read_tokens
from igpt_cli import formats
from igpt_cli.errors import ParameterError
from igpt_cli.fileinfo import file_info, show_tokens
from igpt_cli.palette import Palette
from igpt_cli.quantize import quantize_dataset


@pytest.fixture
def tokens_file(tmp_path):
    """6 images of make_image_folder's train split (2 per class), quantized with the official palette."""
    out = tmp_path / "t.h5"
    quantize_dataset(make_image_folder(tmp_path / "ds"), out, split="train")
    return out


def test_file_info_of_a_tokens_file(tokens_file):
    info = file_info(tokens_file)
    d = info.to_dict()
    assert list(d) == ["path", "kind", "format_version", "datasets", "n", "class_counts", "classes", "attrs"]
    assert d["path"] == str(tokens_file) and d["kind"] == "igpt-tokens" and d["format_version"] == 1
    assert d["datasets"]["tokens"] == {"shape": [6, 1024], "dtype": "uint16"}
    assert d["datasets"]["palette"] == {"shape": [512, 3], "dtype": "float32"}
    assert d["n"] == 6 and d["class_counts"] == {"cat": 2, "dog": 2, "frog": 2}
    assert d["classes"] == ["cat", "dog", "frog"]
    assert d["attrs"]["class_names"] == ["cat", "dog", "frog"]  # JSON attrs decoded
    assert d["attrs"]["split"] == "train" and "format" not in d["attrs"]


def test_file_info_of_a_features_file_counts_unlabeled_and_nests_groups(tmp_path):
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as f:
        formats.create_features_file(f, dims={0: 8, 3: 8}, labels=np.array([0, 1, 1, -1, 7]),
                                     sources=np.array([f"s{i}" for i in range(5)], dtype=object),
                                     store_dtype="float16",
                                     attrs={"class_names": ["a", "b"], "layers": [0, 3], "model": "m"})
    d = file_info(path).to_dict()
    assert d["kind"] == "igpt-features" and d["format_version"] == formats.FEATURES_VERSION and d["n"] == 5
    assert d["datasets"]["features/3"] == {"shape": [5, 8], "dtype": "float16"}
    assert d["class_counts"] == {"a": 1, "b": 2, "(unlabeled)": 2}  # -1 and the out-of-range 7
    assert d["attrs"]["layers"] == [0, 3] and d["attrs"]["model"] == "m"
    with h5py.File(path, "a") as f:  # an older features file: version 1, no pool attr
        f.attrs["format_version"] = 1
        f.attrs.pop("pool", None)
    old = file_info(path).to_dict()
    assert old["format_version"] == 1 and old["class_counts"] == d["class_counts"]
    assert old["datasets"] == d["datasets"] and old["attrs"]["layers"] == [0, 3]


def test_file_info_leaves_out_class_counts_without_labels(tmp_path):
    path = make_tokens(tmp_path / "t.h5", 3, 4)
    with h5py.File(path, "a") as f:
        del f["labels"]
    d = file_info(path).to_dict()
    assert d["n"] is None and "class_counts" not in d
    assert list(d) == ["path", "kind", "format_version", "datasets", "n", "classes", "attrs"]


def test_show_tokens_grid(tmp_path, tokens_file):
    r = show_tokens(tokens_file, tmp_path / "g.png", n=5, cols=3, scale=1)
    assert r.to_dict() == {"path": str(tmp_path / "g.png"), "n": 5, "rows": 2, "cols": 3,
                           "width": 3 * 34 + 2, "height": 2 * 34 + 2}
    g = np.asarray(Image.open(tmp_path / "g.png"))
    tok, _, _, _ = read_tokens(tokens_file)
    imgs = Palette.default().decode(tok[:5])
    for i, im in enumerate(imgs):  # cell (row, col) starts at 2 + 34 * (row, col): 2-pixel gaps
        r, c = divmod(i, 3)
        np.testing.assert_array_equal(g[2 + 34 * r:34 + 34 * r, 2 + 34 * c:34 + 34 * c], im)
    assert (g[36:, 70:] == 255).all()  # the sixth cell is empty
    for kwargs, needle in (({"n": 0}, "n=0: must be at least 1"), ({"scale": 0}, "scale=0: must be at least 1")):
        with pytest.raises(ParameterError) as e:
            show_tokens(tokens_file, tmp_path / "h.png", **kwargs)
        assert str(e.value) == needle
    assert not (tmp_path / "h.png").exists()


def test_cli_info_show(tmp_path, tokens_file):
    out = tokens_file
    r = invoke("info", out)
    assert r.exit_code == 0 and "igpt-tokens" in r.stdout and "cat 2" in r.stdout
    r = invoke("info", out, "--json")
    info = json.loads(r.stdout)
    assert info == file_info(out).to_dict()
    assert info["kind"] == "igpt-tokens" and info["n"] == 6 and info["class_counts"]["dog"] == 2
    assert info["datasets"]["tokens"]["shape"] == [6, 1024]
    r = invoke("show", out, "-o", tmp_path / "g.png", "--n", 4)
    assert r.exit_code == 0, r.stderr
    g = Image.open(tmp_path / "g.png")
    assert g.size == ((2 * 34 + 2) * 2, (2 * 34 + 2) * 2)
    # the decoded first image sits at the top-left
    tok, _, _, _ = read_tokens(out)
    first = Palette.default().decode(tok[:1])[0]
    np.testing.assert_array_equal(np.asarray(g)[4:68:2, 4:68:2], first)


def test_bad_info_and_show_inputs(tmp_path):
    (tmp_path / "x.h5").write_bytes(b"nope")
    r = invoke("info", tmp_path / "x.h5")
    assert r.exit_code == 2 and "not an HDF5 file" in r.stderr and "Traceback" not in r.stderr + r.stdout
    out = tmp_path / "g.png"
    assert_bad_input(invoke("show", tmp_path / "x.h5", "-o", out), out, "x.h5")


@pytest.mark.parametrize("ext,magic", [(".jpg", b"\xff\xd8\xff"), (".jpeg", b"\xff\xd8\xff"), (".webp", b"RIFF"),
                                       (".bmp", b"BM"), (".gif", b"GIF8"), (".PNG", b"\x89PNG")])
def test_show_writes_the_format_the_extension_names(tmp_path, ext, magic):
    tokens = make_tokens(tmp_path / "t.h5", 4, 8)
    out = tmp_path / f"g{ext}"
    r = invoke("show", tokens, "-o", out, "--n", 4)
    assert r.exit_code == 0, r.stderr
    assert out.read_bytes().startswith(magic)
    assert Image.open(out).size == (json.loads(r.stdout)["width"], json.loads(r.stdout)["height"])


@pytest.mark.parametrize("name", ["g.xyz", "g.pdf", "grid"])
def test_show_refuses_unknown_extensions_before_work(tmp_path, name):
    tokens = make_tokens(tmp_path / "t.h5", 4, 8)
    out = tmp_path / name
    assert_bad_input(invoke("show", tokens, "-o", out), out, "unknown image extension", ".png")


def test_show_caps_the_image_size(tmp_path):
    tokens = make_tokens(tmp_path / "t.h5", 4, 8)
    out = tmp_path / "g.png"
    assert_bad_input(invoke("show", tokens, "-o", out, "--scale", 100000), out, "--scale 100000",
                     "the grid would be 2200000x2200000 pixels")
    with pytest.raises(ParameterError, match="^cols=100000: the grid would be"):
        show_tokens(tokens, out, cols=100000)
    assert show_tokens(tokens, out, scale=400).width == 22 * 400  # 8800 px a side: allowed
    assert not (tmp_path / ".g.png.tmp").exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_show_refuses_a_directory_output(tmp_path, overwrite):
    tokens = make_tokens(tmp_path / "t.h5", 4, 8)
    (tmp_path / "d.png").mkdir()
    r = invoke("show", tokens, "-o", tmp_path / "d.png", *(["--overwrite"] if overwrite else []))
    assert r.exit_code == 2 and "is a directory" in r.stderr and "Traceback" not in r.stderr
    assert not any((tmp_path / "d.png").iterdir())


@pytest.mark.parametrize("case,needle", [("no-palette", "tokens file lacks palette"),
                                         ("no-height", "tokens file lacks height"),
                                         ("fake-format", "tokens file lacks tokens, palette, height, width"),
                                         ("float-tokens", "tokens must be a 2-D integer array"),
                                         ("palette-shape", "palette must be a float array [K, 3]"),
                                         ("token-range", "out of range for a 512-colour palette")])
def test_show_on_damaged_tokens_files(tmp_path, case, needle):
    path = tmp_path / "t.h5"
    if case == "fake-format":  # not written by igpt: only the attr
        with h5py.File(path, "w") as f:
            f.attrs.update(format="igpt-tokens", format_version=1)
    else:
        make_tokens(path, 4, 8)
        with h5py.File(path, "r+") as f:
            if case == "no-palette":
                del f["palette"]
            elif case == "no-height":
                del f.attrs["height"]
            elif case == "float-tokens":
                t = f["tokens"][:]
                del f["tokens"]
                f["tokens"] = t.astype(np.float64)
            elif case == "palette-shape":
                del f["palette"]
                f["palette"] = np.zeros((512, 4), np.float32)
            elif case == "token-range":
                f["tokens"][0, 0] = 600
    out = tmp_path / "g.png"
    assert_bad_input(invoke("show", path, "-o", out), out, str(path), needle)


def test_info_on_malformed_and_foreign_files(tmp_path):
    path = make_tokens(tmp_path / "t.h5", 3, 4)
    with h5py.File(path, "r+") as f:
        f.attrs["class_names"] = "[a, b"
    r = invoke("info", path)
    assert r.exit_code == 2 and "attr class_names is not valid JSON" in r.stderr and "Traceback" not in r.stderr
    with h5py.File(path, "r+") as f:
        f.attrs["class_names"] = json.dumps({"a": 1})
    assert "must be a JSON list" in invoke("info", path).stderr
    fake = tmp_path / "fake.h5"  # a foreign file with a fake format attr and odd contents
    with h5py.File(fake, "w") as f:
        f.attrs.update(format="igpt-tokens", format_version=1)
        f["labels"] = np.zeros((2, 2))
        f["a/b/c"] = np.arange(3)
    d = json.loads(invoke("info", fake, "--json").stdout)
    assert d["n"] is None and d["classes"] == [] and d["datasets"]["a/b/c"] == {"shape": [3], "dtype": "int64"}
    with h5py.File(fake, "w") as f:
        f.attrs["format"] = np.array([1, 2])
    r = invoke("info", fake)
    assert r.exit_code == 2 and "not an igpt-tokens or igpt-features file" in r.stderr
    with h5py.File(fake, "w") as f:
        f.attrs.update(format="igpt-tokens", format_version="one")
    assert "attr format_version 'one' is not an integer" in invoke("info", fake).stderr
    assert "is a directory" in invoke("info", tmp_path).stderr
