"""igpt_cli.fileinfo: `file_info` / `igpt info` on every igpt file kind, and igpt_cli.show:
`show_tokens` / `igpt show` (the grid picture of decoded tokens: first rows, a seeded sample,
labelled rows per class; the images a features file came from)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from helpers import assert_bad_input, invoke, make_image_folder, make_tokens, read_tokens, run_igpt
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


def test_file_info_of_a_features_file_counts_unlabelled_and_nests_groups(tmp_path):
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as f:
        formats.create_features_file(f, dims={0: 8, 3: 8}, labels=np.array([0, 1, 1, -1, 7]),
                                     sources=np.array([f"s{i}" for i in range(5)], dtype=object),
                                     store_dtype="float16",
                                     attrs={"class_names": ["a", "b"], "layers": [0, 3], "model": "m"})
        f.attrs.update(n_done=5, complete=True)   # as a finished stage leaves it
    d = file_info(path).to_dict()
    assert d["kind"] == "igpt-features" and d["format_version"] == formats.FEATURES_VERSION and d["n"] == 5
    assert "progress" not in d
    assert d["datasets"]["features/3"] == {"shape": [5, 8], "dtype": "float16"}
    assert d["class_counts"] == {"a": 1, "b": 2, "(unlabelled)": 2}  # -1 and the out-of-range 7
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
                           "width": 3 * 34 + 2, "height": 2 * 34 + 2, "scale": 1, "indices": [[0, 1, 2], [3, 4]],
                           "label_width": 0, "warnings": []}
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


# --- igpt show: which rows, labels, scale -------------------------------------------------------
def tile_at(img: np.ndarray, res: dict, r: int, c: int, h: int = 8, w: int = 8) -> np.ndarray:
    """The tile at grid (row r, column c) of a `show` picture, sampled back to h x w pixels."""
    s, x0 = res["scale"], res["label_width"]
    y, x = (2 + r * (h + 2)) * s, x0 + (2 + c * (w + 2)) * s
    return img[y:y + h * s:s, x:x + w * s:s]


def assert_tiles_are_rows(picture: Path, res: dict, tokens: np.ndarray, palette: np.ndarray, h=8, w=8) -> None:
    """Every tile of a `show` picture is its row of `tokens` decoded through `palette`."""
    img = np.asarray(Image.open(picture).convert("RGB"))
    want = Palette(palette).decode(tokens, h, w)
    for r, row in enumerate(res["indices"]):
        for c, i in enumerate(row):
            np.testing.assert_array_equal(tile_at(img, res, r, c, h, w), want[i])


@pytest.fixture
def labelled_tokens(tmp_path):
    """30 random 8x8 images, classes a, b, c, with rows 0 and 7 unlabelled (-1)."""
    path = make_tokens(tmp_path / "t.h5", 30, 8)
    with h5py.File(path, "r+") as f:
        f["labels"][[0, 7]] = -1
    return path


def test_show_shuffle_is_a_seeded_sample(tmp_path, labelled_tokens):
    tok, _, _, attrs = read_tokens(labelled_tokens)
    with h5py.File(labelled_tokens) as f:
        palette = f["palette"][:]
    a = show_tokens(labelled_tokens, tmp_path / "a.png", n=9, shuffle=True, seed=1).to_dict()
    b = show_tokens(labelled_tokens, tmp_path / "b.png", n=9, shuffle=True, seed=1).to_dict()
    c = show_tokens(labelled_tokens, tmp_path / "c.png", n=9, shuffle=True, seed=2).to_dict()
    first = show_tokens(labelled_tokens, tmp_path / "f.png", n=9).to_dict()
    flat = sum(a["indices"], [])
    assert a["indices"] == b["indices"] and (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert len(set(flat)) == 9 and all(0 <= i < 30 for i in flat)
    assert flat != sum(c["indices"], []) and first["indices"] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert flat != list(range(9))
    assert_tiles_are_rows(tmp_path / "a.png", a, tok, palette)
    r = invoke("show", labelled_tokens, "-o", tmp_path / "cli.png", "--n", 9, "--shuffle", "--seed", 1)
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["indices"] == a["indices"]


def test_show_per_class_rows_are_labelled(tmp_path, labelled_tokens):
    tok, labels, _, _ = read_tokens(labelled_tokens)
    with h5py.File(labelled_tokens) as f:
        palette = f["palette"][:]
    out = tmp_path / "pc.png"
    res = show_tokens(labelled_tokens, out, per_class=4).to_dict()
    assert res["row_labels"] == ["a", "b", "c", "unlabelled"] and res["rows"] == 4 and res["cols"] == 4
    for name, row in zip(res["row_labels"], res["indices"]):  # the first rows of each class, in file order
        want = np.flatnonzero(labels == -1 if name == "unlabelled" else labels == "abc".index(name))
        assert row == want[:4].tolist()
    assert res["scale"] == 8 and res["label_width"] > 0
    img = Image.open(out)
    assert img.size == (res["label_width"] + (4 * 10 + 2) * 8, (4 * 10 + 2) * 8)
    assert_tiles_are_rows(out, res, tok, palette)
    strip = np.asarray(img.convert("L"))[:, :res["label_width"]]
    for r in range(4):  # each row's label is drawn beside it, in dark ink on white
        band = strip[(2 + r * 10) * 8:(2 + r * 10 + 8) * 8]
        assert band.min() < 100 and np.median(band) == 255
    shuffled = show_tokens(labelled_tokens, tmp_path / "s.png", per_class=2, shuffle=True, seed=3).to_dict()
    for name, row in zip(shuffled["row_labels"], shuffled["indices"]):
        assert len(row) == 2 and all(labels[i] == (-1 if name == "unlabelled" else "abc".index(name)) for i in row)
    r = invoke("show", labelled_tokens, "-o", tmp_path / "cli.png", "--per-class", 4)
    assert r.exit_code == 0 and json.loads(r.stdout)["indices"] == res["indices"]


def test_show_per_class_without_class_names_uses_label_ids(tmp_path):
    path = make_tokens(tmp_path / "t.h5", 12, 4)
    with h5py.File(path, "r+") as f:
        f.attrs["class_names"] = "[]"
    res = show_tokens(path, tmp_path / "g.png", per_class=2)
    assert res.row_labels == ["0", "1", "2"] and res.scale == 16  # 4x4 images: 64 px tiles


def test_show_auto_scale(tmp_path, tokens_file):
    small = make_tokens(tmp_path / "s.h5", 400, 8)
    assert show_tokens(tokens_file, tmp_path / "a.png", n=4).scale == 2        # 32x32 -> 64 px
    assert show_tokens(small, tmp_path / "b.png", n=4).scale == 8              # 8x8 -> 64 px
    assert show_tokens(small, tmp_path / "c.png", n=4, scale=3).scale == 3     # given: kept
    wide = show_tokens(small, tmp_path / "d.png", n=400, cols=400)             # 4002 px wide at 1x
    assert wide.scale == 4 and wide.width == 4002 * 4                         # 8 would pass MAX_SIDE
    with pytest.raises(ParameterError, match="^scale=8: the grid would be 32016x96 pixels"):
        show_tokens(small, tmp_path / "e.png", n=400, cols=400, scale=8)


# --- igpt show on a features file: the images it came from ---------------------------------------
@pytest.fixture
def extracted(tmp_path, labelled_tokens):
    """A pixels-baseline features file of `labelled_tokens`, made with a relative tokens path."""
    from igpt_cli.extract import extract_features

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        extract_features("t.h5", "pixels", out="feats.h5")
    finally:
        os.chdir(cwd)
    return tmp_path / "feats.h5"


def test_show_features_file_shows_its_tokens_file(tmp_path, extracted, labelled_tokens, monkeypatch):
    with h5py.File(extracted) as f:
        assert f.attrs["tokens_file"] == "t.h5"
    monkeypatch.chdir(tmp_path / "..")        # the recorded path is relative: found beside the features file
    res = show_tokens(extracted, tmp_path / "f.png", per_class=3)
    ref = show_tokens(labelled_tokens, tmp_path / "t.png", per_class=3)
    assert res.images_from == str(tmp_path / "t.h5") and res.warnings == []
    assert res.indices == ref.indices and np.array_equal(np.asarray(Image.open(tmp_path / "f.png")),
                                                         np.asarray(Image.open(tmp_path / "t.png")))
    with h5py.File(labelled_tokens, "r+") as f:  # the tokens file changes after extraction: a warning
        f["tokens"][0, 0] = (f["tokens"][0, 0] + 1) % 512
    r = invoke("show", extracted, "-o", tmp_path / "g.png", "--n", 4)
    assert r.exit_code == 0 and (tmp_path / "g.png").is_file()
    assert "warning:" in r.stderr and "sha256 differs" in r.stderr and "t.h5" in r.stderr
    assert json.loads(r.stdout)["warnings"][0].startswith(str(tmp_path / "t.h5"))
    labelled_tokens.unlink()
    out = tmp_path / "h.png"
    assert_bad_input(invoke("show", extracted, "-o", out), out, "its tokens file t.h5 is not found",
                     str(tmp_path.parent / "t.h5"), str(tmp_path / "t.h5"))


def test_show_features_file_made_from_images(tmp_path):
    from igpt_cli.extract.images import extract_image_features

    folder = make_image_folder(tmp_path / "ds")
    kept = tmp_path / "kept.h5"
    extract_image_features(folder, "pixels", out=tmp_path / "f.h5", size=8, split="train", keep_tokens=kept)
    ref = show_tokens(kept, tmp_path / "kept.png", per_class=2).to_dict()
    via_kept = show_tokens(tmp_path / "f.h5", tmp_path / "a.png", per_class=2).to_dict()
    assert via_kept["images_from"] == str(kept)
    kept.unlink()                               # no tokens file: the dataset is read again
    res = show_tokens(tmp_path / "f.h5", tmp_path / "b.png", per_class=2).to_dict()
    assert res["images_from"] == str(folder) and res["warnings"] == []
    assert res["row_labels"] == ["cat", "dog", "frog"] and res["indices"] == ref["indices"]
    for name in ("a.png", "b.png"):
        assert np.array_equal(np.asarray(Image.open(tmp_path / name)), np.asarray(Image.open(tmp_path / "kept.png")))
    (folder / "train" / "cat" / "0000.png").unlink()     # the dataset changed: says so, still draws
    assert any("now gives 5 images" in w for w in show_tokens(tmp_path / "f.h5", tmp_path / "c.png", n=2).warnings)
    import shutil

    shutil.rmtree(folder)
    out = tmp_path / "d.png"
    assert_bad_input(invoke("show", tmp_path / "f.h5", "-o", out), out, "came from the images at", str(folder))


# --- igpt info on probes, predictions and scores files -------------------------------------------
def test_info_on_probes_and_predictions(tmp_path):
    from test_probe_runner import make_data, write_features

    from igpt_cli.probe import predict_file, probe_files

    tr = write_features(tmp_path / "train.h5", *make_data(90, d=6, seed=0))
    te = write_features(tmp_path / "test.h5", *make_data(30, d=6, seed=1))
    rep = probe_files(tr, te, device="cpu", solver="torch", save_probes=tmp_path / "probes.h5")
    d = json.loads(invoke("info", tmp_path / "probes.h5", "--json").stdout)
    assert d["kind"] == "igpt-probes" and d["classes"] == rep.class_names and "created_utc" in d["attrs"]
    s = d["summary"]
    assert [r["layer"] for r in s["layers"]] == [r.layer for r in rep.layers] == [0, 1, 2]
    for row, lr in zip(s["layers"], rep.layers):
        assert (row["c"], row["val_acc"], row["test_acc"]) == (lr.c, lr.val_acc, lr.test_acc)
        assert row["dims"] == 6 and row["classes"] == 3
    assert s["best_layer"] == rep.best_layer
    assert s["features"] == {"model": "imagegpt-test", "model_sha256": "ab" * 32, "site": "resid", "pool": "mean",
                             "sos": True, "train": str(tr)}
    text = run_igpt("info", tmp_path / "probes.h5").stdout  # a fresh process: the probes format is known
    assert "igpt-probes" in text and "best_layer: " in text and "test_acc" in text and "created_utc:" in text

    p = predict_file(te, tmp_path / "probes.h5", 1, tmp_path / "pred.h5")
    d = json.loads(invoke("info", tmp_path / "pred.h5", "--json").stdout)
    with h5py.File(tmp_path / "pred.h5") as f:
        pred = f["pred"][:]
    s = d["summary"]
    assert d["kind"] == "igpt-predictions" and d["n"] == 30 and s["n"] == 30 and s["layer"] == 1
    assert s["predicted_counts"] == {rep.class_names[k]: int((pred == k).sum()) for k in range(3) if (pred == k).any()}
    assert s["accuracy"] == p.accuracy and s["n_known"] == s["n_labelled"] == 30
    assert "predicted_counts: " in invoke("info", tmp_path / "pred.h5").stdout


def test_info_on_a_scores_file(tmp_path):
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        formats.create_scores_file(f, labels=np.array([0, 1, 1]), sources=np.array(["a", "b", "c"], dtype=object))
        f["bits_per_token"][:2] = [3.0, 4.0]
    d = file_info(path).to_dict()
    assert d["kind"] == "igpt-scores" and d["summary"] == {"n_scored": 2, "mean_bits_per_token": 3.5}


def test_show_refuses_to_draw_over_its_input_or_the_tokens_behind_features(tmp_path, tokens_file):
    import os

    from helpers import assert_clean_failure, invoke

    before = tokens_file.read_bytes()
    os.symlink(tokens_file, tmp_path / "alias.png")
    r = invoke("show", tokens_file, "-o", tmp_path / "alias.png", "--overwrite")
    assert_clean_failure(r, "would overwrite the input path")
    feats = tmp_path / "f.h5"
    assert invoke("extract", tokens_file, "-m", "pixels", "-o", feats, "-q").returncode == 0
    os.link(tokens_file, tmp_path / "hard.png")
    r = invoke("show", feats, "-o", tmp_path / "hard.png", "--overwrite")
    assert_clean_failure(r, "would overwrite the input origin")
    assert tokens_file.read_bytes() == before


# --- igpt info on the files that are not igpt HDF5 files, and on partial files -------------------
def test_info_on_a_palette_and_a_model(tmp_path):
    from igpt_cli.model import BUNDLED

    pal = tmp_path / "pal.npy"
    centers = np.random.default_rng(0).uniform(-1, 1, (16, 3)).astype(np.float32)
    np.save(pal, centers)
    d = file_info(pal).to_dict()
    assert d["kind"] == "palette" and d["summary"]["colours"] == 16
    assert d["summary"]["min"] == round(float(centers.min()), 4) and d["summary"]["max"] == round(float(centers.max()), 4)
    r = invoke("info", pal)
    assert r.exit_code == 0 and r.stdout.splitlines()[0] == f"{pal}: palette" and "colours: 16" in r.stdout
    np.save(pal, np.zeros((4, 2), np.float32))  # not [K, 3]: refused as --palette refuses it
    r = invoke("info", pal)
    assert r.exit_code == 2 and str(pal) in r.stderr and "Traceback" not in r.stderr
    cfg = json.loads((BUNDLED["igpt-cifar8"] / "config.json").read_text())
    for spec in ("igpt-cifar8", BUNDLED["igpt-cifar8"]):
        d = json.loads(invoke("info", spec, "--json").stdout)
        assert d["kind"] == "model" and d["summary"]["source"] == "bundled"
        assert (d["summary"]["layers"], d["summary"]["width"]) == (cfg["n_layer"], cfg["n_embd"])
        assert d["summary"]["palette_file"] is True
    assert invoke("info", "igpt-cifar8").stdout.startswith("igpt-cifar8: model\n")
    r = invoke("info", tmp_path)  # a directory that is no model
    assert r.exit_code == 2 and "not a model directory" in r.stderr


def test_info_on_a_train_state_never_runs_its_code(tmp_path):
    import torch

    from igpt_cli.train import STATE_FILE, TrainConfig, pretrain

    tok = make_tokens(tmp_path / "t.h5", 16, 4, palette=np.random.default_rng(5).uniform(-1, 1, (16, 3)))
    out = tmp_path / "run"
    pretrain(tok, out, TrainConfig(steps=3, n_layer=1, n_embd=16, n_head=2, batch_size=4, warmup_steps=1,
                                   eval_every=3, checkpoint_every=3), dtype="float32")
    raw = torch.load(out / STATE_FILE, weights_only=True)
    d = json.loads(invoke("info", out / STATE_FILE, "--json").stdout)
    assert d["kind"] == "igpt-train-state" and d["format_version"] == raw["format_version"]
    assert d["summary"]["step"] == raw["step"] == 3
    assert d["summary"]["model"]["layers"] == 1 and d["summary"]["model"]["width"] == 16
    assert d["summary"]["records"] == len(json.loads(raw["history"])) > 0
    r = invoke("info", out / STATE_FILE)
    assert r.exit_code == 0 and r.stdout.startswith(f"{out / STATE_FILE}: igpt-train-state") and "step: 3" in r.stdout
    assert json.loads(invoke("info", out, "--json").stdout)["summary"]["layers"] == 1  # the run is a model

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    r = invoke("info", tmp_path / "evil.pt")
    assert r.exit_code == 2 and "evil.pt" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "pwned").exists()


def test_info_on_a_sweep_result(tmp_path):
    from igpt_cli.sweep.stage import FORMAT, FORMAT_VERSION

    rows = [{"family": "f", "name": f"s{i}", "step": 100 * i, "loss_bits": 5.0 - i, "best_layer": i,
             "best_test_acc": 0.3 + 0.1 * i, "layers": []} for i in range(3)]
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "out": str(tmp_path), "train": "tr.h5",
           "test": "te.h5", "checkpoints": rows, "correlations": [{"family": "f", "pearson": -1.0}]}
    (tmp_path / "sweep.json").write_text(json.dumps(doc))
    d = json.loads(invoke("info", tmp_path / "sweep.json", "--json").stdout)
    assert d["kind"] == FORMAT and [r["name"] for r in d["summary"]["checkpoints"]] == ["s0", "s1", "s2"]
    assert d["summary"]["checkpoints"][2]["best_test_acc"] == rows[2]["best_test_acc"]
    assert d["summary"]["correlations"] == doc["correlations"] and d["attrs"]["train"] == "tr.h5"
    r = invoke("info", tmp_path / "sweep.json")
    assert r.exit_code == 0 and "checkpoints:" in r.stdout and "s2" in r.stdout
    assert json.loads(invoke("info", tmp_path, "--json").stdout) == dict(d, path=str(tmp_path / "sweep.json"))
    (tmp_path / "other.json").write_text('{"a": 1}')
    r = invoke("info", tmp_path / "other.json")
    assert r.exit_code == 2 and "not an igpt sweep result" in r.stderr


def test_info_on_a_partial_file_says_rows_done_of_total(tmp_path):
    from igpt_cli.extract import extract_features
    from igpt_cli.model import IGPT, IGPTConfig, save_pretrained

    import torch

    torch.manual_seed(0)
    save_pretrained(IGPT(IGPTConfig(n_positions=16, n_embd=32, n_layer=2, n_head=2)), tmp_path / "m")
    tok = make_tokens(tmp_path / "t.h5", 37, 4)
    batches = []

    def stop_after_two_batches(ev):
        if ev.done:
            batches.append(ev.done)
        if len(batches) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_features(tok, tmp_path / "m", "all", tmp_path / "f.h5", batch_size=5, dtype="float32",
                         on_progress=stop_after_two_batches)
    partial = tmp_path / ".f.h5.tmp"
    with h5py.File(partial, "r") as f:
        done, total = int(f.attrs["n_done"]), int(f.attrs["n_total"])
    assert 0 < done < total == 37
    d = file_info(partial).to_dict()
    assert d["progress"] == {"n_done": done, "n_total": 37} and d["n"] == done
    assert sum(d["class_counts"].values()) == done   # the rows done, not the preallocated ones
    first = invoke("info", partial).stdout.splitlines()[0]
    assert f"partial: {done} of 37 rows done" in first and "37 rows" not in first.replace("of 37 rows", "")
    part = tmp_path / ".f.h5.part-00001-of-00002.tmp"   # a rank's part file: rows [20, 37) of 37
    part.write_bytes(partial.read_bytes())
    with h5py.File(part, "r+") as f:
        f.attrs.update(n_total=17, shard_start=20, shard_stop=37, rows_total=37)
    first = invoke("info", part).stdout.splitlines()[0]
    assert f"partial: {done} of 17 rows done (part file: rows 20..37 of 37)" in first
