"""igpt_cli.extract.stage, the file stage: features against transformers, the features file,
resumption, progress events, bad input."""
from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from helpers import (ENV, PALETTE, assert_clean_failure, attrs_without_provenance, error_lines, hf_model, hf_reference, hold_output_lock, invoke,
                     make_tokens, read_feats, rows_done, run_igpt, small_tmpfs)
from igpt_cli import formats, outputs
from igpt_cli.errors import InputError, ParameterError
from igpt_cli.extract import ExtractResult, ModelSource, extract_features, features_from_tokens
from igpt_cli.model import IGPT, IGPTConfig, save_pretrained

SUMMARY_KEYS = ["out", "model", "layers", "site", "sos", "n", "computed", "resumed_from", "device", "compute_dtype",
                "batch_size", "store_dtype", "images_per_s", "seconds"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("small")
    m, d = hf_model(tmp)
    tokens = make_tokens(tmp / "tokens.h5", 12, 8)
    with h5py.File(tokens) as f:
        t = f["tokens"][:]
    return dict(tmp=tmp, hf=m, dir=d, tokens=tokens, t=t)


class Events(list):
    """An on_progress callback that keeps every event."""

    def __call__(self, event):
        self.append(event)

    @property
    def messages(self) -> list[str]:
        return [e.message for e in self if e.message]


# ---------------------------------------------------------------------------
# the features against transformers
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("site,sos", [("ln", True), ("resid", True), ("ln", False)])
def test_file_stage_matches_transformers(small, site, sos):
    out = small["tmp"] / f"f-{site}-{sos}.h5"
    s = extract_features(small["tokens"], small["dir"], "all", out, dtype="float32", site=site, sos=sos,
                         batch_size=5)
    assert s.layers == [0, 1, 2, 3, 4] and s.n == 12
    ref = hf_reference(small["hf"], small["t"], site=site, sos=sos)
    got = read_feats(out)
    for layer in range(5):
        assert got[layer].dtype == np.float32 and got[layer].shape == (12, 128)
        np.testing.assert_allclose(got[layer], ref[layer], atol=1e-4, rtol=0, err_msg=f"layer {layer}")
    with h5py.File(out) as f:
        assert bool(f.attrs["sos"]) is sos and f.attrs["site"] == site


def test_bfloat16_compute_is_recorded(small):
    a, b = small["tmp"] / "bf16.h5", small["tmp"] / "fp32.h5"
    s = extract_features(small["tokens"], small["dir"], "all", a, dtype="bfloat16")
    assert s.compute_dtype == "bfloat16"
    extract_features(small["tokens"], small["dir"], "all", b, dtype="float32")
    fa, fb = read_feats(a), read_feats(b)
    with h5py.File(a) as f:
        assert f.attrs["compute_dtype"] == "bfloat16"
    for layer in fa:
        assert fa[layer].dtype == np.float32  # pooled features stay float32
        assert not np.array_equal(fa[layer][:, :8], fb[layer][:, :8])  # really computed in bfloat16
        cos = (fa[layer] * fb[layer]).sum(1) / np.linalg.norm(fa[layer], axis=1) / np.linalg.norm(fb[layer], axis=1)
        assert cos.min() > 0.99, layer


# ---------------------------------------------------------------------------
# the features file
# ---------------------------------------------------------------------------
def test_features_file_schema(small):
    out = small["tmp"] / "schema.h5"
    s = extract_features(small["tokens"], small["dir"], ["-1", "0-1"], out, store_dtype="float16",
                         limit=7, batch_size=3)
    assert s.n == 7 and s.layers == [0, 1, 4]
    assert not outputs.temp_path_for(out).exists()
    f = formats.open_igpt(out, formats.FEATURES_FORMAT)
    with f:
        a = formats.read_attrs(f)
        assert formats.feature_layers(f) == [0, 1, 4]
        assert f["features/4"].dtype == np.float16 and f["features/4"].shape == (7, 128)
        assert f["features/4"].chunks[1] == 128
        assert "pool" in f.attrs  # written, not implied
        with h5py.File(small["tokens"]) as t:
            assert (f["labels"][:] == t["labels"][:7]).all()
            assert list(f["sources"].asstr()[:]) == list(t["sources"].asstr()[:7])
    assert a["format"] == "igpt-features" and a["format_version"] == 2
    assert json.loads(a["layers"]) == [0, 1, 4] and a["site"] == "ln" and a["sos"] is True and a["pool"] == "mean"
    assert a["compute_dtype"] in ("float32", "bfloat16") and a["store_dtype"] == "float16"
    assert json.loads(a["model_config"])["n_layer"] == 4
    assert len(a["model_sha256"]) == 64 and len(a["tokens_sha256"]) == 64
    assert a["tokens_file"] == str(small["tokens"]) and a["model"] == str(small["dir"])
    assert a["n_total"] == 7 and a["n_done"] == 7 and a["complete"] is True
    assert json.loads(a["class_names"]) == ["a", "b", "c"]


def test_result_is_todays_summary(small):
    out = small["tmp"] / "summary.h5"
    s = extract_features(small["tokens"], small["dir"], "1", out, dtype="float32", batch_size=4)
    assert isinstance(s, ExtractResult)
    d = s.to_dict()
    assert list(d) == SUMMARY_KEYS  # a one-process run has no world_size, rank, shard
    assert d["out"] == str(out) and d["model"] == str(small["dir"]) and d["layers"] == [1]
    assert (d["site"], d["sos"], d["n"], d["computed"], d["resumed_from"]) == ("ln", True, 12, 12, 0)
    assert (d["device"], d["compute_dtype"], d["batch_size"], d["store_dtype"]) == ("cpu", "float32", 4, "float32")
    assert d["images_per_s"] > 0 and d["seconds"] > 0
    assert json.loads(s.to_json()) == d
    sharded = ExtractResult(**dict(d, world_size=2, rank=0, shard=[0, 8])).to_dict()
    assert list(sharded) == SUMMARY_KEYS + ["world_size", "rank", "shard"]


def test_pixels_baseline(small):
    out = small["tmp"] / "pix.h5"
    s = extract_features(small["tokens"], "pixels", None, out)
    assert s.layers == [0] and s.site == "pixels" and s.model == "pixels"
    with h5py.File(out) as f:
        x = f["features/0"][:]
        assert f.attrs["model"] == "pixels" and json.loads(f.attrs["layers"]) == [0]
        assert f.attrs["pool"] == "flatten"  # the whole image, not an average
    assert x.shape == (12, 8 * 8 * 3)
    np.testing.assert_array_equal(x, PALETTE[small["t"]].reshape(12, -1))
    # the rate of the whole stage, not of its (table-lookup) loop: never above rows / stage seconds
    assert s.images_per_s is not None and s.images_per_s <= s.n / (s.seconds - 0.0005)  # seconds: rounded
    with pytest.raises(InputError):
        extract_features(small["tokens"], "pixels", "3", small["tmp"] / "pix2.h5")


def test_batch_boundaries_do_not_matter_in_float32(small):
    a, b = small["tmp"] / "b1.h5", small["tmp"] / "b12.h5"
    extract_features(small["tokens"], small["dir"], "all", a, dtype="float32", batch_size=1)
    extract_features(small["tokens"], small["dir"], "all", b, dtype="float32", batch_size=12)
    fa, fb = read_feats(a), read_feats(b)
    for layer in fa:
        np.testing.assert_allclose(fa[layer], fb[layer], atol=1e-5)


# ---------------------------------------------------------------------------
# resumption
# ---------------------------------------------------------------------------
def interrupt_at_second_batch(monkeypatch, *args, **kw):
    """Run extract_features and raise KeyboardInterrupt in its second batch (a kill between flushes)."""
    real = ModelSource.__call__
    seen = []

    def dying(self, tokens):
        seen.append(len(tokens))
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real(self, tokens)

    monkeypatch.setattr(ModelSource, "__call__", dying)
    with pytest.raises(KeyboardInterrupt):
        extract_features(*args, **kw)
    monkeypatch.setattr(ModelSource, "__call__", real)


def test_resume_after_interrupt_in_process(small, monkeypatch):
    ref = small["tmp"] / "ref.h5"
    extract_features(small["tokens"], small["dir"], "all", ref, batch_size=5)
    out = small["tmp"] / "resumed.h5"
    interrupt_at_second_batch(monkeypatch, small["tokens"], small["dir"], "all", out, batch_size=5)
    tmp = outputs.temp_path_for(out)
    assert not out.exists() and tmp.exists()
    with h5py.File(tmp) as f:
        assert f.attrs["n_done"] == 5 and not f.attrs["complete"]

    # different settings refuse, and say which
    with pytest.raises(InputError, match="layers differs") as e:
        extract_features(small["tokens"], small["dir"], "1", out, batch_size=5)
    assert "restart=True" in str(e.value) and "--restart" not in str(e.value)
    r = invoke("extract", small["tokens"], "--model", small["dir"], "-l", "1", "-b", "5", "-o", out, "-q")
    assert r.returncode == 2 and "layers differs" in r.stderr and "pass --restart to discard it" in r.stderr
    with pytest.raises(InputError, match="tokens_sha256 differs"):
        other = make_tokens(small["tmp"] / "other.h5", 12, 8, seed=9)
        extract_features(other, small["dir"], "all", out, batch_size=5)
    # a different batch size adopts the partial file's boundaries; the notices are log events
    events = Events()
    s = extract_features(small["tokens"], small["dir"], "all", out, batch_size=4, on_progress=events)
    assert s.resumed_from == 5 and s.computed == 7 and s.batch_size == 5
    assert events.messages == ["resuming with the partial file's batch size 5 (not 4)",
                               f"resuming {tmp} at row 5 of 12"]
    assert [e.done for e in events if not e.message] == [5, 10, 12]
    assert not tmp.exists()
    fa, fb = read_feats(ref), read_feats(out)
    for layer in fa:
        np.testing.assert_array_equal(fa[layer], fb[layer])


def test_resume_version_1_partial_file(small, monkeypatch):
    """A partial file an older igpt left (format_version 1, no pool attr) resumes as pool="mean"."""
    ref = small["tmp"] / "ref-v1.h5"
    extract_features(small["tokens"], small["dir"], "all", ref, batch_size=5)
    out = small["tmp"] / "resumed-v1.h5"
    interrupt_at_second_batch(monkeypatch, small["tokens"], small["dir"], "all", out, batch_size=5)
    with h5py.File(outputs.temp_path_for(out), "r+") as f:
        del f.attrs["pool"]
        f.attrs["format_version"] = 1
    s = extract_features(small["tokens"], small["dir"], "all", out, batch_size=5)
    assert s.resumed_from == 5
    with h5py.File(ref) as a, h5py.File(out) as b:
        assert attrs_without_provenance(a) == attrs_without_provenance(b)  # upgraded: version 2, pool written
        assert b.attrs["pool"] == "mean" and b.attrs["format_version"] == 2
    fa, fb = read_feats(ref), read_feats(out)
    for layer in fa:
        np.testing.assert_array_equal(fa[layer], fb[layer])


def test_restart_discards_partial(small):
    out = small["tmp"] / "restart.h5"
    tmp = outputs.temp_path_for(out)
    tmp.write_bytes(b"garbage, e.g. killed before the first flush")
    s = extract_features(small["tokens"], small["dir"], "2", out)  # unreadable: starts over
    assert s.resumed_from == 0 and out.exists()
    # a partial file of other settings is in the way until restart=True
    with h5py.File(out) as f, h5py.File(tmp, "w") as p:
        for k, v in f.attrs.items():
            p.attrs[k] = v
        p.create_group("features")
        p.attrs.update(n_done=3, complete=False, layers="[0]")
    with pytest.raises(InputError, match="layers differs"):
        extract_features(small["tokens"], small["dir"], "2", out, overwrite=True)
    s = extract_features(small["tokens"], small["dir"], "2", out, overwrite=True, restart=True)
    assert s.resumed_from == 0 and s.computed == 12 and not tmp.exists()
    # a partial file of other settings with no row done holds nothing: replaced without restart
    with h5py.File(out) as f, h5py.File(tmp, "w") as p:
        for k, v in f.attrs.items():
            p.attrs[k] = v
        p.create_group("features")
        p.attrs.update(n_done=0, complete=False, layers="[0]")
    s = extract_features(small["tokens"], small["dir"], "2", out, overwrite=True)
    assert s.resumed_from == 0 and s.computed == 12 and not tmp.exists()


def test_kill_9_resume_identical(tmp_path):
    """Kill a real `igpt extract` with SIGKILL mid-run, twice; the resumed file equals an uninterrupted one."""
    torch.manual_seed(0)
    save_pretrained(IGPT(IGPTConfig(n_positions=16, n_embd=32, n_layer=2, n_head=2)), tmp_path / "m")
    tokens = make_tokens(tmp_path / "t.h5", 3000, 4, seed=3)
    args = ["extract", tokens, "--model", tmp_path / "m", "-l", "all", "--batch-size", "2", "--dtype", "float32",
            "--quiet"]
    out = tmp_path / "f.h5"
    tmp = outputs.temp_path_for(out)
    kills = 0
    for target in (200, 700):
        p = subprocess.Popen([sys.executable, "-m", "igpt_cli", *map(str, args), "-o", str(out)],
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 300
        while p.poll() is None and time.time() < deadline:
            if rows_done(tmp) >= target:
                p.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.01)
        p.wait()
    assert kills == 2, "the run finished before it could be killed: make it longer"
    assert not out.exists() and tmp.exists()
    r = run_igpt(*args, "-o", out)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["resumed_from"] >= 700 and summary["n"] == 3000
    assert out.exists() and not tmp.exists()

    ref = tmp_path / "ref.h5"
    r = run_igpt(*args, "-o", ref)
    assert r.returncode == 0, r.stderr
    fa, fb = read_feats(ref), read_feats(out)
    for layer in fa:
        np.testing.assert_array_equal(fa[layer], fb[layer])
    with h5py.File(ref) as a, h5py.File(out) as b:
        assert (a["labels"][:] == b["labels"][:]).all()
        assert attrs_without_provenance(a) == attrs_without_provenance(b)


# ---------------------------------------------------------------------------
# bad input: one line, exit 2, no traceback, nothing left behind
# ---------------------------------------------------------------------------
def test_a_planted_lock_symlink_is_refused_and_its_target_untouched(small, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "f.h5"
    outputs.lock_path_for(out).symlink_to(victim)
    r = invoke("extract", small["tokens"], "--model", small["dir"], "-l", "1", "-o", out, "-q")
    assert r.returncode == 2 and "is a symbolic link" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert victim.read_text() == "precious\n" and not out.exists() and not outputs.temp_path_for(out).exists()


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    save_pretrained(IGPT(IGPTConfig(n_positions=16, n_embd=32, n_layer=2, n_head=2)), tmp / "m")
    make_tokens(tmp / "t4.h5", 3, 4)
    make_tokens(tmp / "t8.h5", 3, 8)
    # tokens with values beyond a 16-colour palette
    make_tokens(tmp / "big.h5", 3, 4, palette=PALETTE[:16], high=40)
    (tmp / "nodir").mkdir()
    (tmp / "nodir" / "config.json").write_text((tmp / "m" / "config.json").read_text())
    (tmp / "shape").mkdir()
    cfg = json.loads((tmp / "m" / "config.json").read_text())
    (tmp / "shape" / "config.json").write_text(json.dumps(dict(cfg, n_embd=64)))
    (tmp / "shape" / "model.safetensors").write_bytes((tmp / "m" / "model.safetensors").read_bytes())
    with h5py.File(tmp / "feats.h5", "w") as f:
        f.attrs["format"] = "igpt-features"
    return tmp


@pytest.mark.parametrize("case", ["missing-dir", "no-weights", "shape", "wrong-kind", "not-hdf5",
                                  "token-range", "resolution", "layer", "device", "dtype"])
def test_bad_input(bad_inputs, case):
    t = bad_inputs
    out = t / f"out-{case}.h5"
    tok, model, extra, needle = t / "t4.h5", t / "m", [], ""
    if case == "missing-dir":
        model, needle = t / "nope", "nope: model not found"
    elif case == "no-weights":
        model, needle = t / "nodir", "no weights"
    elif case == "shape":
        model, needle = t / "shape", "config.json implies"
    elif case == "wrong-kind":
        tok, needle = t / "feats.h5", "not an igpt-tokens file"
    elif case == "not-hdf5":
        tok, needle = t / "m" / "config.json", "not an HDF5 file"
    elif case == "token-range":
        tok, needle = t / "big.h5", "is not in 0..15 (the palette has 16 colours)"
    elif case == "resolution":
        tok, needle = t / "t8.h5", "model wants 4x4 images"
    elif case == "layer":
        extra, needle = ["-l", "3"], "out of range, the model has layers 0..2"
    elif case == "device":
        if torch.cuda.is_available():
            extra, needle = ["--device", "quantum"], "unknown device"
        else:
            extra, needle = ["--device", "cuda"], "no CUDA GPU"
    elif case == "dtype":  # rejected by the argument parser (an Enum option)
        extra, needle = ["--dtype", "int4"], "int4"
    r = invoke("extract", tok, "--model", model, "-o", out, "--quiet", *extra)
    assert_clean_failure(r, needle, out)
    assert not outputs.temp_path_for(out).exists()


def test_bad_input_real_process(bad_inputs):
    out = bad_inputs / "out-real.h5"
    r = run_igpt("extract", bad_inputs / "t8.h5", "--model", bad_inputs / "m", "-o", out)
    assert_clean_failure(r, "model wants 4x4 images", out)
    assert not outputs.temp_path_for(out).exists()


@pytest.mark.parametrize("kw,message", [
    (dict(dtype="int4"), "dtype='int4': unknown dtype"),
    (dict(site="post"), "site='post': expected one of ln, resid"),
    (dict(pool="sum"), "pool='sum': expected one of mean, max, none"),
    (dict(store_dtype="int8"), "store_dtype='int8': expected one of float32, float16"),
    (dict(batch_size=0), "batch_size=0: must be at least 1"),
    (dict(limit=0), "limit=0: must be at least 1"),
])
def test_library_errors_name_parameters(bad_inputs, kw, message):
    out = bad_inputs / "out-param.h5"
    with pytest.raises(ParameterError) as e:
        extract_features(bad_inputs / "t4.h5", bad_inputs / "m", None, out, **kw)
    assert str(e.value).startswith(message) and "--" not in str(e.value)
    assert not out.exists() and not outputs.temp_path_for(out).exists()


def test_existing_output_needs_overwrite(small):
    out = small["tmp"] / "exists.h5"
    out.write_bytes(b"x")
    with pytest.raises(InputError, match="overwrite=True"):
        extract_features(small["tokens"], small["dir"], "1", out)
    r = invoke("extract", small["tokens"], "--model", small["dir"], "-l", "1", "-o", out, "-q")
    assert r.returncode == 2 and "--overwrite" in r.stderr and out.read_bytes() == b"x"
    extract_features(small["tokens"], small["dir"], "1", out, overwrite=True)
    assert formats.open_igpt(out, formats.FEATURES_FORMAT)


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_that_is_a_directory_is_refused_before_work(small, overwrite, monkeypatch):
    out = small["tmp"] / f"dir-{overwrite}.h5"
    out.mkdir()
    monkeypatch.setattr(ModelSource, "__call__", lambda *a: pytest.fail("computed features"))
    r = invoke("extract", small["tokens"], "--model", small["dir"], "-o", out, "-q",
               *(["--overwrite"] if overwrite else []))
    assert_clean_failure(r, "is a directory")
    assert out.is_dir() and not any(out.iterdir()) and not outputs.temp_path_for(out).exists()


@pytest.mark.parametrize("case", ["class-names", "class-names-type", "tokens-1d", "tokens-float", "no-height",
                                  "bad-height", "truncated"])
def test_damaged_tokens_files_are_one_line(bad_inputs, case):
    t = bad_inputs
    tok, out = t / f"damaged-{case}.h5", t / f"out-{case}.h5"
    make_tokens(tok, 3, 4)
    needle = {"class-names": "attr class_names is not valid JSON",
              "class-names-type": "attr class_names must be a JSON list of strings",
              "tokens-1d": "tokens must be a 2-D integer array", "tokens-float": "tokens must be a 2-D integer array",
              "no-height": "tokens file lacks height", "bad-height": "attr height",
              "truncated": "truncated HDF5 file"}[case]
    with h5py.File(tok, "r+") as f:
        if case == "class-names":
            f.attrs["class_names"] = "[cat, dog"
        elif case == "class-names-type":
            f.attrs["class_names"] = json.dumps([1, 2])
        elif case in ("tokens-1d", "tokens-float"):
            data = f["tokens"][:]
            del f["tokens"]
            f["tokens"] = data.reshape(-1) if case == "tokens-1d" else data.astype(np.float32)
        elif case == "no-height":
            del f.attrs["height"]
        elif case == "bad-height":
            f.attrs["height"] = "four"
    if case == "truncated":
        tok.write_bytes(tok.read_bytes()[:3000])
    r = invoke("extract", tok, "--model", t / "m", "-o", out, "-q")
    assert_clean_failure(r, needle, out)
    assert str(tok) in r.stderr and not outputs.temp_path_for(out).exists()


def test_bad_config_json_is_one_line_naming_the_key(bad_inputs):
    t = bad_inputs
    d = t / "badcfg"
    d.mkdir()
    (d / "model.safetensors").write_bytes((t / "m" / "model.safetensors").read_bytes())
    cfg = json.loads((t / "m" / "config.json").read_text())
    for change, needle in (({"n_head": 5}, "n_head=5: must divide n_embd=32"),
                           ({"n_embd": 65536}, "n_embd=65536: must be between 1 and 16384"),
                           ({"n_layer": -2}, "n_layer=-2: must be between 1 and 1024"),
                           ({"n_positions": "16"}, "n_positions='16': must be an integer")):
        (d / "config.json").write_text(json.dumps(dict(cfg, **change)))
        out = t / "out-cfg.h5"
        assert_clean_failure(invoke("extract", t / "t4.h5", "--model", d, "-o", out, "-q"), needle, out)
        assert "config.json" in error_lines(invoke("extract", t / "t4.h5", "--model", d, "-o", out, "-q").stderr)[0]


# ---------------------------------------------------------------------------
# one output, two runs: the lock
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """A 2 x 32 model over 6000 4x4 images in batches of 2 (2.3 MB of features): seconds long, so it can
    be caught running."""
    tmp = tmp_path_factory.mktemp("long")
    torch.manual_seed(0)
    save_pretrained(IGPT(IGPTConfig(n_positions=16, n_embd=32, n_layer=2, n_head=2)), tmp / "m")
    tokens = make_tokens(tmp / "t.h5", 6000, 4, seed=3)
    args = ["extract", tokens, "--model", tmp / "m", "-l", "all", "--batch-size", "2", "--dtype", "float32",
            "--quiet"]
    ref = tmp / "ref.h5"
    r = run_igpt(*args, "-o", ref)
    assert r.returncode == 0, r.stderr
    return dict(tmp=tmp, args=args, ref=ref)


def _start(args, out: Path, *, prefix=()) -> subprocess.Popen:
    cmd = [sys.executable, *prefix] if prefix else [sys.executable, "-m", "igpt_cli"]
    return subprocess.Popen([*cmd, *map(str, args), "-o", str(out)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_rows(p: subprocess.Popen, tmp: Path, rows: int) -> None:
    deadline = time.time() + 120
    while rows_done(tmp) < rows:
        assert p.poll() is None, p.communicate()
        assert time.time() < deadline
        time.sleep(0.01)


def _assert_same_file(a: Path, b: Path) -> None:
    fa, fb = read_feats(a), read_feats(b)
    assert fa.keys() == fb.keys()
    for layer in fa:
        np.testing.assert_array_equal(fa[layer], fb[layer])
    with h5py.File(a) as x, h5py.File(b) as y:
        assert attrs_without_provenance(x) == attrs_without_provenance(y)


def test_second_run_on_the_same_output_fails_at_once(long_run):
    out = long_run["tmp"] / "same.h5"
    tmp = outputs.temp_path_for(out)
    first = _start(long_run["args"], out)
    _wait_rows(first, tmp, 20)
    t0 = time.time()
    second = invoke(*long_run["args"], "-o", out)  # in this process: no interpreter start while the first runs on
    assert time.time() - t0 < 60
    assert_clean_failure(second, "another igpt run is writing this output")
    assert f"pid {first.pid} " in second.stderr
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr  # its partial file was left alone
    assert json.loads(stdout)["computed"] == 6000
    assert not tmp.exists() and not outputs.lock_path_for(out).exists()
    _assert_same_file(long_run["ref"], out)


def test_tokens_file_being_written_is_refused(long_run, tmp_path):
    tokens = make_tokens(tmp_path / "being-written.h5", 3, 4)
    holder = hold_output_lock(tokens)  # as a running `igpt quantize … -o being-written.h5 --overwrite` holds it
    try:
        out = tmp_path / "f.h5"
        r = invoke("extract", tokens, "--model", long_run["tmp"] / "m", "-o", out, "-q")
        assert_clean_failure(r, "another igpt run is writing this file", out)
        assert f"pid {holder.pid}" in r.stderr
    finally:
        holder.stdin.close()
        holder.wait(30)
    assert invoke("extract", tokens, "--model", long_run["tmp"] / "m", "-o", tmp_path / "f.h5", "-q").returncode == 0


# ---------------------------------------------------------------------------
# disk full (a real tmpfs)
# ---------------------------------------------------------------------------
def _fill(directory: Path) -> Path:
    """Fill the file system of `directory` to the last byte; returns the filler file."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as fh:
        for block in (1 << 16, 1 << 12, 1 << 9, 1):
            try:
                while True:
                    fh.write(b"\0" * block)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    return filler


def test_disk_full_is_refused_up_front(long_run, tmp_path):
    """6000 rows x 3 layers x 32 floats = 2.3 MB do not fit a 1 MiB file system: one line before any work."""
    with small_tmpfs(tmp_path / "mnt", "1m") as mnt:
        out = mnt / "f.h5"
        r = run_igpt(*long_run["args"], "-o", out)
        assert_clean_failure(r, "no space left on device", out)
        assert "needed" in r.stderr and not outputs.temp_path_for(out).exists()
        assert not outputs.lock_path_for(out).exists()


# a run on a file system without fallocate (space cannot be reserved): ENOSPC strikes mid-run
NO_FALLOCATE = ("-c", "import os, runpy; del os.posix_fallocate; runpy.run_module('igpt_cli', run_name='__main__')")


def test_disk_full_mid_run_keeps_a_resumable_partial(long_run, tmp_path):
    with small_tmpfs(tmp_path / "mnt", "3m") as mnt:
        out = mnt / "f.h5"
        tmp = outputs.temp_path_for(out)
        p = _start(long_run["args"], out, prefix=NO_FALLOCATE)
        _wait_rows(p, tmp, 100)
        filler = _fill(mnt)
        stdout, stderr = p.communicate(timeout=300)
        r = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
        assert_clean_failure(r, "no space left on device", out)
        assert "is kept" in stderr and tmp.exists()
        done = rows_done(tmp)
        assert 100 <= done < 6000
        # still full: refused again, the partial file untouched
        r = run_igpt(*long_run["args"], "-o", out)
        assert_clean_failure(r, "no space left on device", out)
        assert rows_done(tmp) == done
        # space freed (here: the file system grown): the same command resumes
        filler.unlink()
        subprocess.run(["mount", "-o", "remount,size=6m", str(mnt)], check=True)
        r = run_igpt(*long_run["args"], "-o", out)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["resumed_from"] == done
        _assert_same_file(long_run["ref"], out)


def test_space_reserved_up_front_survives_a_disk_filled_during_the_run(long_run, tmp_path):
    with small_tmpfs(tmp_path / "mnt", "3m") as mnt:
        out = mnt / "f.h5"
        p = _start(long_run["args"], out)
        _wait_rows(p, outputs.temp_path_for(out), 100)
        _fill(mnt)
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr
        _assert_same_file(long_run["ref"], out)


# ---------------------------------------------------------------------------
# poolings on disk: mean, max, none (token maps)
# ---------------------------------------------------------------------------
def hf_token_maps(m, tokens: np.ndarray, site="ln") -> dict[int, np.ndarray]:
    """transformers' ImageGPTModel hidden states as numpy token maps [N, T, D] per layer (SOS-shifted input):
    ln_1(h_l) for site ln below the last layer, h_l for resid, and HF's last entry ln_f(h_L)."""
    idx = torch.from_numpy(tokens.astype(np.int64))
    idx = torch.cat([torch.full_like(idx[:, :1], m.config.vocab_size - 1), idx[:, :-1]], dim=1)
    L = m.config.n_layer
    with torch.no_grad():
        hs = m(input_ids=idx, output_hidden_states=True).hidden_states
        return {layer: (m.h[layer].ln_1(hs[layer]) if site == "ln" and layer < L else hs[layer]).numpy()
                for layer in range(L + 1)}


NUMPY_POOLS = {"mean": lambda x: x.mean(axis=1), "max": lambda x: x.max(axis=1)}


@pytest.mark.parametrize("pool,site", [("mean", "ln"), ("max", "ln"), ("max", "resid")])
def test_pools_match_transformers_pooled_with_numpy(small, pool, site):
    out = small["tmp"] / f"pool-{pool}-{site}.h5"
    s = extract_features(small["tokens"], small["dir"], "all", out, dtype="float32", site=site, pool=pool,
                         batch_size=5)
    assert s.store_dtype == "float32"
    maps = hf_token_maps(small["hf"], small["t"], site=site)
    got = read_feats(out)
    mem = features_from_tokens(small["t"], small["dir"], "all", site=site, pool=pool, dtype="float32", batch_size=7)
    for layer in range(5):
        ref = NUMPY_POOLS[pool](maps[layer])
        assert got[layer].shape == (12, 128)
        np.testing.assert_allclose(got[layer], ref, atol=1e-4, rtol=0, err_msg=f"layer {layer}")
        np.testing.assert_allclose(mem[layer], ref, atol=1e-4, rtol=0, err_msg=f"layer {layer}")
    with h5py.File(out) as f:
        assert f.attrs["pool"] == pool


def test_token_maps_are_the_hidden_states(small):
    out = small["tmp"] / "maps.h5"
    s = extract_features(small["tokens"], small["dir"], "0,2,4", out, dtype="float32", pool="none", batch_size=5)
    assert s.store_dtype == "float16"  # the default for token maps
    maps = hf_token_maps(small["hf"], small["t"])
    with h5py.File(out) as f:
        for layer in (0, 2, 4):
            ds = f["features"][str(layer)]
            assert ds.dtype == np.float16 and ds.shape == (12, 64, 128) and ds.chunks == (1, 64, 128)
            # float16 rounding (one unit in the last place, 2^-10 relative) of the float32 states, nothing else
            np.testing.assert_allclose(ds[:].astype(np.float32), maps[layer], rtol=2 ** -10, atol=1e-4)
        assert f.attrs["pool"] == "none" and f.attrs["store_dtype"] == "float16"
    X, y = formats.load_features(out, 2)
    assert X.dtype == np.float32 and X.shape == (12, 64, 128) and y.shape == (12,)
    mem = features_from_tokens(small["t"], small["dir"], [2], pool="none", dtype="float32")
    np.testing.assert_allclose(mem[2], maps[2], atol=1e-4, rtol=0)
    # stored as float32 when asked: the hidden states to float32 precision
    out32 = small["tmp"] / "maps32.h5"
    extract_features(small["tokens"], small["dir"], "4", out32, dtype="float32", pool="none", store_dtype="float32")
    np.testing.assert_allclose(read_feats(out32)[4], maps[4], atol=1e-4, rtol=0)


def test_a_probe_refuses_token_maps_in_one_line_and_info_describes_them(small):
    out = small["tmp"] / "maps-cli.h5"
    r = invoke("extract", small["tokens"], "--model", small["dir"], "-l", "1", "--pool", "none", "-o", out, "-q")
    assert r.returncode == 0, r.stderr
    r = invoke("probe", out, "-l", "1", "-q")
    assert_clean_failure(r, "token maps")
    assert "--pool mean" in r.stderr
    with h5py.File(out) as f, pytest.raises(formats.FormatError, match="pool them yourself"):
        formats.check_complete_features(f, out)
    r = invoke("info", out, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)["summary"]
    assert summary["pool"] == "none" and summary["token_maps"] is True and summary["per_image"] == {"1": "64x128"}
    assert summary["feature_bytes"] == 12 * 64 * 128 * 2


def test_bad_pools_are_one_line(small):
    out = small["tmp"] / "badpool.h5"
    assert_clean_failure(invoke("extract", small["tokens"], "--model", "pixels", "--pool", "none", "-o", out, "-q"),
                         "--pool", out)
    assert_clean_failure(invoke("extract", small["tokens"], "--model", small["dir"], "--pool", "sum", "-o", out, "-q"),
                         "sum", out)
    with pytest.raises(ParameterError, match="pool='max'"):
        extract_features(small["tokens"], "pixels", None, out, pool="max")


def test_token_maps_that_do_not_fit_the_disk_are_refused_before_any_work(small, tmp_path):
    """12 images x 5 layers x 64 x 128 float16 = 960 KiB of token maps do not fit 512 KiB; pooled (30 KiB) do."""
    with small_tmpfs(tmp_path / "mnt", "512k") as mnt:
        out = mnt / "maps.h5"
        r = run_igpt("extract", small["tokens"], "--model", small["dir"], "-l", "all", "--pool", "none",
                     "-o", out, "-q")
        assert_clean_failure(r, "no space left on device", out)
        assert "needed" in r.stderr and not outputs.temp_path_for(out).exists()
        assert not list(mnt.iterdir())
        r = run_igpt("extract", small["tokens"], "--model", small["dir"], "-l", "all", "-o", out, "-q")
        assert r.returncode == 0, r.stderr


def test_the_one_host_copy_gives_every_layer_as_it_is():
    """The packed path (one flat block for all layers, as on a GPU) unpacks to each layer, cast."""
    from igpt_cli.extract.sources import to_host

    g = torch.Generator().manual_seed(0)
    feats = {4: torch.randn(3, 5, 7, generator=g), 1: torch.randn(3, 5, 7, generator=g).bfloat16(),
             2: torch.randn(3, 7, generator=g)}
    for dtype in (torch.float32, torch.float16):
        packed, plain = to_host(feats, dtype, pack=True), to_host(feats, dtype, pack=False)
        assert list(packed) == [1, 2, 4]
        for layer, v in feats.items():
            want = v.to(dtype).numpy()
            assert packed[layer].shape == want.shape and packed[layer].dtype == want.dtype
            np.testing.assert_array_equal(packed[layer], want)
            np.testing.assert_array_equal(plain[layer], want)
