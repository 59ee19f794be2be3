"""igpt_cli.quantize (the stage): tokens files, typed results and progress, Hugging Face
processor parity on real CIFAR-10, palette fitting, and `igpt quantize` / `igpt palette fit`
with their bad inputs (one line on stderr, exit 2, no traceback, no output file)."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from threadpoolctl import threadpool_limits

from helpers import FOLDER_CLASSES, assert_bad_input, invoke, make_image_folder, read_tokens, run_igpt
from igpt_cli.data import decode_image, open_dataset
from igpt_cli.errors import InputError, ParameterError
from igpt_cli.palette import Palette
from igpt_cli.progress import ProgressEvent
from igpt_cli.quantize import fit_palette_file, quantize_dataset


@pytest.fixture
def ds(tmp_path):
    return make_image_folder(tmp_path / "ds")


# ---------------------------------------------------------------------------
# the library stage
# ---------------------------------------------------------------------------

def test_image_folder_dir_splits_and_tokens_file(tmp_path):
    src = make_image_folder(tmp_path / "ds")
    out = tmp_path / "train.h5"
    s = quantize_dataset(src, out, split="train")
    assert s.n == 6 and s.classes == 3 and s.skipped == 0
    tok, lab, srcs, attrs = read_tokens(out)
    assert tok.dtype == np.uint16 and tok.shape == (6, 1024)
    assert lab.tolist() == [0, 0, 1, 1, 2, 2]
    assert srcs[0] == "train/cat/0000.png"
    assert attrs["format"] == "igpt-tokens" and attrs["format_version"] == 1
    assert (attrs["height"], attrs["width"]) == (32, 32)
    assert json.loads(attrs["class_names"]) == FOLDER_CLASSES
    assert attrs["split"] == "train" and attrs["resize"] == "bilinear" and "igpt_version" in attrs
    with h5py.File(out) as f:
        assert f["palette"].dtype == np.float32 and f["palette"].shape == (512, 3)
        assert f["tokens"].chunks[1] == 1024
    # tokens are the palette quantization of the decoded image
    im = np.asarray(Image.open(src / "train/cat/0000.png").convert("RGB"))
    np.testing.assert_array_equal(tok[0], Palette.default().quantize(im[None])[0])
    assert not list(tmp_path.glob(".*.tmp"))
    assert quantize_dataset(src, tmp_path / "all.h5").n == 12


def test_result_dict_and_progress_events(tmp_path, ds):
    events: list[ProgressEvent] = []
    r = quantize_dataset(ds, tmp_path / "o.h5", split="test", limit=5, batch_size=2, on_progress=events.append)
    d = r.to_dict()
    assert list(d) == ["path", "n", "height", "width", "classes", "seconds", "skipped", "unlabelled", "format",
                       "split"]
    assert {k: v for k, v in d.items() if k != "seconds"} == {
        "path": str(tmp_path / "o.h5"), "n": 5, "height": 32, "width": 32, "classes": 3, "skipped": 0,
        "unlabelled": 0, "format": "imagefolder", "split": "test"}
    assert isinstance(d["seconds"], float) and json.loads(r.to_json()) == d
    assert {(e.task, e.total, e.unit) for e in events} == {("quantize", 5, "image")}
    assert [e.done for e in events] == [0, 2, 4, 5]  # start, then one event per batch


def check_hf_parity(cifar_tar, official_palette_path, stride: int, expect: int):
    """>= 99.99 % token agreement with transformers' ImageGPTImageProcessorPil on real
    CIFAR-10 test images (every `stride`-th: all classes), every disagreement a genuine tie."""
    from transformers.models.imagegpt.image_processing_pil_imagegpt import ImageGPTImageProcessorPil

    ds = open_dataset(cifar_tar, split="test")
    members = [(n, b) for i, (n, b, _) in enumerate(ds._members()) if i % stride == 0]
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


def test_selection_warnings_in_result_and_progress_and_size_cap(tmp_path, ds):
    events: list[ProgressEvent] = []
    r = quantize_dataset(ds, tmp_path / "o.h5", split="train", limit=2, on_progress=events.append)
    want = (f"{ds}: limit=2 leaves 2 of 3 classes without images (dog, frog); pass shuffle=True or "
            "limit_per_class=N for images of every class")
    assert r.warnings == [want] and r.to_dict()["warnings"] == [want]
    assert [e.message for e in events if e.message] == [f"warning: {want}"]
    assert read_tokens(tmp_path / "o.h5")[1].tolist() == [0, 0]
    r = quantize_dataset(ds, tmp_path / "p.h5", split="train", limit_per_class=1, shuffle=True, seed=5)
    assert "warnings" not in r.to_dict() and sorted(read_tokens(tmp_path / "p.h5")[1].tolist()) == [0, 1, 2]
    f = fit_palette_file(ds, tmp_path / "pal.npy", k=4, sample_pixels=500, limit=1)
    assert f.to_dict()["warnings"][0].endswith("limit=1 leaves 2 of 3 classes without images (dog, frog); pass "
                                               "shuffle=True or limit_per_class=N for images of every class")
    # images are size×size: a size beyond MAX_SIZE is refused before anything is read
    for bad in (1025, 100_000):
        with pytest.raises(ParameterError, match=rf"^size={bad}: must be at most 1024"):
            quantize_dataset(ds, tmp_path / "s.h5", size=bad)
        with pytest.raises(ParameterError, match=rf"^size={bad}: must be at most 1024"):
            fit_palette_file(ds, tmp_path / "s.npy", size=bad)
    assert_bad_input(invoke("quantize", ds, "-o", tmp_path / "s.h5", "--size", 100000), tmp_path / "s.h5",
                     "--size 100000: must be at most 1024")
    # 0 is a size, not "the default": refused, nothing written
    with pytest.raises(ParameterError, match=r"^size=0: must be at least 1"):
        quantize_dataset(ds, tmp_path / "z.h5", size=0)
    assert_bad_input(invoke("quantize", ds, "-o", tmp_path / "z.h5", "--size", 0), tmp_path / "z.h5",
                     "--size 0: must be at least 1")


def test_fit_palette_file_result_and_bad_parameters(tmp_path, ds):
    events: list[ProgressEvent] = []
    r = fit_palette_file(ds, tmp_path / "p.npy", k=8, sample_pixels=3000, split="train", on_progress=events.append)
    d = r.to_dict()
    assert list(d) == ["path", "k", "pixels", "seconds", "skipped"]
    assert (d["path"], d["k"], d["pixels"], d["skipped"]) == (str(tmp_path / "p.npy"), 8, 3000, 0)
    assert np.load(tmp_path / "p.npy").shape == (8, 3)
    assert events[0].done == 0 and events[-1].done == 6 and {e.task for e in events} == {"palette"}
    for kwargs, needle in (({"k": 0}, "k=0: must be between 1 and 65535"),
                           ({"k": 70000}, "k=70000: must be between 1 and 65535"),
                           ({"sample_pixels": 0}, "sample_pixels=0: must be at least 1")):
        with pytest.raises(ParameterError) as e:
            fit_palette_file(ds, tmp_path / "q.npy", **kwargs)
        assert str(e.value) == needle
    assert not (tmp_path / "q.npy").exists()


# ---------------------------------------------------------------------------
# CLI: quantize, palette fit
# ---------------------------------------------------------------------------

def test_cli_quantize(tmp_path, ds):
    out = tmp_path / "t.h5"
    r = invoke("quantize", ds, "-o", out, "--split", "train", "--quiet")
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout.strip())
    assert {"path", "n", "height", "width", "classes", "seconds", "skipped"} <= summary.keys()
    assert summary["n"] == 6


def test_cli_palette_fit(tmp_path):
    src = make_image_folder(tmp_path / "ds", per_class=1)
    r = invoke("palette", "fit", src, "-o", tmp_path / "p.npy", "-k", 8, "--sample-pixels", 3000)
    assert r.exit_code == 0, r.stderr
    p = np.load(tmp_path / "p.npy")
    assert p.shape == (8, 3) and p.dtype == np.float32 and p.min() >= -1 and p.max() <= 1
    r = invoke("quantize", src, "-o", tmp_path / "t.h5", "--palette", tmp_path / "p.npy", "-q")
    assert r.exit_code == 0, r.stderr
    tok, _, _, _ = read_tokens(tmp_path / "t.h5")
    assert tok.max() < 8


# ---------------------------------------------------------------------------
# bad input: one line on stderr, exit 2, no traceback, no output file
# ---------------------------------------------------------------------------

def test_bad_missing_path(tmp_path):
    out = tmp_path / "o.h5"
    assert_bad_input(invoke("quantize", tmp_path / "nope", "-o", out), out, "nope", "no such file")


def test_bad_unknown_format(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    out = tmp_path / "o.h5"
    assert_bad_input(invoke("quantize", tmp_path / "x.txt", "-o", out), out, "x.txt", "unknown input format")
    assert_bad_input(invoke("quantize", tmp_path / "x.txt", "-o", out, "--format", "bogus"), out, "bogus")


def test_bad_corrupt_image_in_folder_and_archive(tmp_path, ds):
    (ds / "train" / "dog" / "0001.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "o.h5"
    assert_bad_input(invoke("quantize", ds, "-o", out), out, "train/dog/0001.png", "cannot read image")
    with tarfile.open(tmp_path / "ds.tar", "w") as tf:
        tf.add(ds, arcname=".")
    assert_bad_input(invoke("quantize", tmp_path / "ds.tar", "-o", out), out, "ds.tar:", "dog/0001.png")
    r = invoke("quantize", ds, "-o", out, "--skip-bad", "-q")
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["skipped"] == 1 and s["n"] == 11


def test_bad_empty_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "o.h5"
    assert_bad_input(invoke("quantize", tmp_path / "empty", "-o", out), out, "empty", "no images")
    np.save(tmp_path / "e.npy", np.zeros((0, 32, 32, 3), np.uint8))
    assert_bad_input(invoke("quantize", tmp_path / "e.npy", "-o", out), out, "e.npy", "no images")


def test_bad_all_images_unreadable_with_skip_bad(tmp_path):
    d = tmp_path / "ds" / "a"
    d.mkdir(parents=True)
    (d / "x.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "o.h5"
    assert_bad_input(invoke("quantize", tmp_path / "ds", "-o", out, "--skip-bad"), out, "no images", "1 unreadable")


def test_bad_split(tmp_path, ds):
    out = tmp_path / "o.h5"
    assert_bad_input(invoke("quantize", ds, "-o", out, "--split", "val"), out, "ds", "no split 'val'", "test, train")
    # a split name that is no split at all: the library names the parameter (the CLI's parser rejects it first)
    with pytest.raises(InputError, match=r"^split='banana': expected one of train, test"):
        quantize_dataset(ds, out, split="banana")
    assert not out.exists()


def test_bad_palette(tmp_path, ds):
    out = tmp_path / "o.h5"
    np.save(tmp_path / "p.npy", np.zeros((512, 4), np.float32))
    assert_bad_input(invoke("quantize", ds, "-o", out, "--palette", tmp_path / "p.npy"), out, "p.npy", "shape")
    np.save(tmp_path / "p.npy", np.full((512, 3), 200.0, np.float32))
    assert_bad_input(invoke("quantize", ds, "-o", out, "--palette", tmp_path / "p.npy"), out, "p.npy", "[-1, 1]")


def test_missing_output_dir_is_created_but_not_in_a_readonly_one(tmp_path, ds, monkeypatch):
    out = tmp_path / "missing" / "o.h5"
    r = invoke("quantize", ds, "-o", out, "-q")
    assert r.exit_code == 0 and out.is_file(), r.stderr
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: simulate a read-only directory
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m, **k: False if Path(p) == ro else real(p, m, **k))
    out = ro / "o.h5"
    assert_bad_input(invoke("quantize", ds, "-o", out), out, "not writable")
    out = ro / "new" / "o.h5"
    assert_bad_input(invoke("quantize", ds, "-o", out), out, "cannot be created")
    assert not (ro / "new").exists()


def test_bad_existing_output_needs_overwrite(tmp_path, ds):
    out = tmp_path / "o.h5"
    out.write_bytes(b"precious")
    r = invoke("quantize", ds, "-o", out)
    assert r.exit_code == 2 and "--overwrite" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert out.read_bytes() == b"precious"
    r = invoke("quantize", ds, "-o", out, "--overwrite", "-q")
    assert r.exit_code == 0 and json.loads(r.stdout)["n"] == 12


def test_bad_input_real_process(tmp_path):
    """The installed entry point behaves the same: one line, exit 2, no traceback."""
    out = tmp_path / "o.h5"
    p = run_igpt("quantize", tmp_path / "nope.tar", "-o", out)
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "nope.tar" in p.stderr and "Traceback" not in p.stderr
    assert not out.exists()


def test_error_after_the_progress_bar_started_is_exactly_one_line(tmp_path, ds):
    """No stray blank line (a bar drawn off a terminal) before the error, and the bad file is
    named without Python internals (`<_io.BytesIO object at 0x…>`)."""
    (ds / "train" / "dog" / "0001.png").write_bytes(b"not an image")
    out = tmp_path / "o.h5"
    r = run_igpt("quantize", ds, "-o", out)  # not --quiet: the progress bar runs
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == (f"error: {ds / 'train/dog/0001.png'}: cannot read image (not a known image format, or "
                        "corrupt); --skip-bad skips such files\n"), r.stderr
    assert sorted(os.listdir(tmp_path)) == ["ds"]


# --- an output that is one of the inputs (however it is spelled) is refused before any work --------
@pytest.mark.parametrize("spelling", ["same", "dot-slash", "symlink", "hardlink"])
@pytest.mark.parametrize("command", ["quantize", "palette"])
def test_output_that_is_an_input_is_refused(tmp_path, monkeypatch, command, spelling):
    monkeypatch.chdir(tmp_path)
    folder = make_image_folder(tmp_path / "ds", per_class=1)
    src = Path("one.png")
    src.write_bytes(next((folder / "train").glob("*/*.png")).read_bytes())
    before = src.read_bytes()
    out = {"same": "one.png", "dot-slash": "./one.png", "symlink": "link.png", "hardlink": "hard.png"}[spelling]
    if spelling == "symlink":
        os.symlink("one.png", "link.png")
    elif spelling == "hardlink":
        os.link("one.png", "hard.png")
    args = ["quantize", src, "--size", "8"] if command == "quantize" else ["palette", "fit", src, "-k", "2"]
    r = invoke(*args, "-o", out, "--overwrite", "-q")
    assert_bad_input(r, Path("nothing"), "would overwrite the input src")
    assert src.read_bytes() == before


def test_quantize_refuses_an_output_that_replaces_an_image_it_reads_or_its_list_or_palette(tmp_path):
    folder = make_image_folder(tmp_path / "ds", per_class=1)
    image = next((folder / "train").glob("*/*.png"))
    before = image.read_bytes()
    r = invoke("quantize", folder, "--size", "8", "-o", image, "--overwrite", "-q")
    assert_bad_input(r, Path("nothing"), "inside the input directory")
    assert image.read_bytes() == before
    listing = tmp_path / "list.txt"
    listing.write_text(f"{image}\n")
    r = invoke("quantize", f"@{listing}", "--size", "8", "-o", listing, "--overwrite", "-q")
    assert_bad_input(r, Path("nothing"), f"input @{listing}")
    np.save(tmp_path / "pal.npy", Palette.default().centers)
    r = invoke("quantize", image, "--size", "8", "--palette", tmp_path / "pal.npy", "-o", tmp_path / "pal.npy",
               "--overwrite", "-q")
    assert_bad_input(r, Path("nothing"), "input palette")
    # a tokens file beside the images, rewritten by a rerun, is not one of them
    for _ in range(2):
        assert invoke("quantize", folder, "--size", "8", "-o", folder / "t.h5", "--overwrite", "-q").returncode == 0
