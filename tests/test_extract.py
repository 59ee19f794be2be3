"""igpt extract: fidelity against transformers, file format, resumption, bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from igpt_cli import formats
from igpt_cli.errors import InputError
from igpt_cli.extract import extract_features
from igpt_cli.layers import parse_layers
from igpt_cli.runtime import resolve_device, resolve_dtype
from igpt_cli.model import IGPT, IGPTConfig, save_pretrained

ROOT = Path(__file__).resolve().parents[1]
PALETTE = np.random.default_rng(123).uniform(-1, 1, (512, 3)).astype(np.float32)


def make_tokens(path: Path, n: int, side: int, *, palette=PALETTE, seed=0, high=None) -> Path:
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        formats.create_tokens_file(f, height=side, width=side, palette=palette, class_names=["a", "b", "c"],
                                   split="train", source="random", resize="none")
        formats.append_rows(
            f,
            tokens=rng.integers(0, high or len(palette), (n, side * side)).astype(np.uint16),
            labels=rng.integers(0, 3, n),
            sources=np.array([f"img{i}.png" for i in range(n)], dtype=object),
        )
    return path


def hf_model(tmp: Path, n_layer=4, n_embd=128, n_head=4, n_positions=64, safe=True, seed=0):
    from transformers import ImageGPTConfig, ImageGPTModel

    torch.manual_seed(seed)
    cfg = ImageGPTConfig(vocab_size=513, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head)
    m = ImageGPTModel(cfg).eval()
    with torch.no_grad():  # non-trivial layer-norm gains, so ln_1 vs ln_f mix-ups show
        for name, p in m.named_parameters():
            if "ln" in name:
                p.uniform_(0.5, 1.5)
    d = tmp / f"hf-{n_layer}x{n_embd}-{'st' if safe else 'bin'}"
    m.save_pretrained(d, safe_serialization=safe)
    if not safe and not (d / "pytorch_model.bin").exists():  # transformers 5 always writes safetensors
        from safetensors.torch import load_file

        torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
        (d / "model.safetensors").unlink()
    return m, d


def hf_reference(m, tokens: np.ndarray, site="ln", sos=True) -> dict[int, np.ndarray]:
    idx = torch.from_numpy(tokens.astype(np.int64))
    if sos:
        idx = torch.cat([torch.full_like(idx[:, :1], m.config.vocab_size - 1), idx[:, :-1]], dim=1)
    L = m.config.n_layer
    out = {}
    with torch.no_grad():
        hs = m(input_ids=idx, output_hidden_states=True).hidden_states
        for layer in range(L + 1):
            if site == "ln" and layer < L:
                out[layer] = m.h[layer].ln_1(hs[layer]).mean(1).numpy()
            else:  # resid, and layer L which HF already returns as ln_f(h_L)
                out[layer] = hs[layer].mean(1).numpy()
    return out


def read_feats(path: Path) -> dict[int, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {int(k): v[:] for k, v in f["features"].items()}


def run_cli(*args, env=None) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-m", "igpt_cli", "extract", *map(str, args)],
                          capture_output=True, text=True, env=e, timeout=600)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("small")
    m, d = hf_model(tmp)
    tokens = make_tokens(tmp / "tokens.h5", 12, 8)
    with h5py.File(tokens) as f:
        t = f["tokens"][:]
    return dict(tmp=tmp, hf=m, dir=d, tokens=tokens, t=t)


# ---------------------------------------------------------------------------
# layer specs, device, dtype
# ---------------------------------------------------------------------------
def test_parse_layers():
    assert parse_layers("12", range(24 + 1)) == [12]
    assert parse_layers(["12", "16"], range(24 + 1)) == [12, 16]
    assert parse_layers("8-10", range(24 + 1)) == [8, 9, 10]
    assert parse_layers("all", range(4 + 1)) == [0, 1, 2, 3, 4]
    assert parse_layers(None, range(2 + 1)) == [0, 1, 2]
    assert parse_layers(["-1"], range(24 + 1)) == [24]
    assert parse_layers("-3--1", range(24 + 1)) == [22, 23, 24]
    assert parse_layers("1,3, 2", range(4 + 1)) == [1, 2, 3]
    assert parse_layers([0, 0, 4], range(4 + 1)) == [0, 4]
    for bad in ("25", "-26", "x", "5-3", "1-"):
        with pytest.raises(InputError):
            parse_layers(bad, range(24 + 1))
    with pytest.raises(InputError, match="0..24"):
        parse_layers("30", range(24 + 1))


def test_device_and_dtype():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(InputError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            resolve_device("cuda")
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) in (torch.float32, torch.bfloat16)
    with pytest.raises(InputError):
        resolve_dtype("int8", torch.device("cpu"))


# ---------------------------------------------------------------------------
# fidelity against transformers
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("site", ["ln", "resid"])
def test_fidelity_safetensors(small, site):
    out = small["tmp"] / f"f-{site}.h5"
    s = extract_features(small["tokens"], small["dir"], "all", out, dtype="float32", site=site,
                         batch_size=5, progress=False)
    assert s["layers"] == [0, 1, 2, 3, 4] and s["n"] == 12
    ref = hf_reference(small["hf"], small["t"], site=site)
    got = read_feats(out)
    for layer in range(5):
        assert got[layer].dtype == np.float32 and got[layer].shape == (12, 128)
        np.testing.assert_allclose(got[layer], ref[layer], atol=1e-4, rtol=0, err_msg=f"layer {layer}")
    # ln and resid really differ (the ln site is not the residual stream)
    if site == "ln":
        assert np.abs(got[1] - hf_reference(small["hf"], small["t"], site="resid")[1]).max() > 1e-2


def test_fidelity_bin_checkpoint_and_no_sos(tmp_path, small):
    m, d = hf_model(tmp_path, n_layer=2, n_embd=64, n_head=2, safe=False, seed=1)
    assert (d / "pytorch_model.bin").exists() and not (d / "model.safetensors").exists()
    out = tmp_path / "f.h5"
    extract_features(small["tokens"], d, "all", out, dtype="float32", sos=False, progress=False)
    ref = hf_reference(m, small["t"], sos=False)
    got = read_feats(out)
    for layer in range(3):
        np.testing.assert_allclose(got[layer], ref[layer], atol=1e-4, rtol=0)
    with h5py.File(out) as f:
        assert bool(f.attrs["sos"]) is False


@pytest.mark.parametrize("side,n_images,seed", [(8, 3, 5), (32, 2, 6)], ids=["8x8", "32x32-full"])
def test_fidelity_small_shape(tmp_path, side, n_images, seed):
    """The imagegpt-small shape (24 x 512, 8 heads), on a short 8x8 sequence and on the
    released models' full 1024 positions (32x32 images)."""
    m, d = hf_model(tmp_path, n_layer=24, n_embd=512, n_head=8, n_positions=side * side)
    tokens = make_tokens(tmp_path / "t.h5", n_images, side, seed=seed)
    out = tmp_path / "f.h5"
    extract_features(tokens, d, "all", out, dtype="float32", progress=False)
    with h5py.File(tokens) as f:
        ref = hf_reference(m, f["tokens"][:])
    got = read_feats(out)
    assert sorted(got) == list(range(25))
    for layer in range(25):
        np.testing.assert_allclose(got[layer], ref[layer], atol=1e-4, rtol=0, err_msg=f"layer {layer}")


def test_bfloat16_close_to_float32(small):
    a, b = small["tmp"] / "bf16.h5", small["tmp"] / "fp32.h5"
    s = extract_features(small["tokens"], small["dir"], "all", a, dtype="bfloat16", progress=False)
    assert s["compute_dtype"] == "bfloat16"
    extract_features(small["tokens"], small["dir"], "all", b, dtype="float32", progress=False)
    fa, fb = read_feats(a), read_feats(b)
    for layer in fa:
        assert fa[layer].dtype == np.float32  # pooled features stay float32
        cos = (fa[layer] * fb[layer]).sum(1) / np.linalg.norm(fa[layer], axis=1) / np.linalg.norm(fb[layer], axis=1)
        assert cos.min() > 0.99, layer


def test_early_exit_runs_only_needed_blocks(small, monkeypatch):
    from igpt_cli import extract as ex

    calls = []
    real = ex.load_model

    def counting(*a, **k):
        model = real(*a, **k)
        for i, blk in enumerate(model.h):
            blk.register_forward_hook(lambda mod, inp, out, i=i: calls.append(i))
        return model

    monkeypatch.setattr(ex, "load_model", counting)
    extract_features(small["tokens"], small["dir"], "1", small["tmp"] / "early.h5", batch_size=12, progress=False)
    assert calls == [0]  # layer 1 = ln_1 of block 1 applied to h_1: only block 0 runs
    got = read_feats(small["tmp"] / "early.h5")
    assert list(got) == [1]


# ---------------------------------------------------------------------------
# the features file
# ---------------------------------------------------------------------------
def test_features_file_schema(small):
    out = small["tmp"] / "schema.h5"
    s = extract_features(small["tokens"], small["dir"], ["-1", "0-1"], out, store_dtype="float16",
                         limit=7, batch_size=3, progress=False)
    assert s["n"] == 7 and s["layers"] == [0, 1, 4]
    assert not formats.temp_path_for(out).exists()
    f = formats.open_igpt(out, formats.FEATURES_FORMAT)
    with f:
        a = formats.read_attrs(f)
        assert formats.feature_layers(f) == [0, 1, 4]
        assert f["features/4"].dtype == np.float16 and f["features/4"].shape == (7, 128)
        assert f["features/4"].chunks[1] == 128
        with h5py.File(small["tokens"]) as t:
            assert (f["labels"][:] == t["labels"][:7]).all()
            assert list(f["sources"].asstr()[:]) == list(t["sources"].asstr()[:7])
    assert a["format"] == "igpt-features" and a["format_version"] == 1
    assert json.loads(a["layers"]) == [0, 1, 4] and a["site"] == "ln" and a["sos"] is True
    assert a["compute_dtype"] in ("float32", "bfloat16") and a["store_dtype"] == "float16"
    assert json.loads(a["model_config"])["n_layer"] == 4
    assert len(a["model_sha256"]) == 64 and len(a["tokens_sha256"]) == 64
    assert a["tokens_file"] == str(small["tokens"]) and a["model"] == str(small["dir"])
    assert a["n_total"] == 7 and a["n_done"] == 7 and a["complete"] is True
    assert json.loads(a["class_names"]) == ["a", "b", "c"]


def test_pixels_baseline(small):
    out = small["tmp"] / "pix.h5"
    s = extract_features(small["tokens"], "pixels", None, out, progress=False)
    assert s["layers"] == [0]
    with h5py.File(out) as f:
        x = f["features/0"][:]
        assert f.attrs["model"] == "pixels" and json.loads(f.attrs["layers"]) == [0]
    assert x.shape == (12, 8 * 8 * 3)
    np.testing.assert_array_equal(x, PALETTE[small["t"]].reshape(12, -1))
    with pytest.raises(InputError):
        extract_features(small["tokens"], "pixels", "3", small["tmp"] / "pix2.h5", progress=False)


def test_batch_boundaries_do_not_matter_in_float32(small):
    a, b = small["tmp"] / "b1.h5", small["tmp"] / "b12.h5"
    extract_features(small["tokens"], small["dir"], "all", a, dtype="float32", batch_size=1, progress=False)
    extract_features(small["tokens"], small["dir"], "all", b, dtype="float32", batch_size=12, progress=False)
    fa, fb = read_feats(a), read_feats(b)
    for layer in fa:
        np.testing.assert_allclose(fa[layer], fb[layer], atol=1e-5)


# ---------------------------------------------------------------------------
# resumption
# ---------------------------------------------------------------------------
def test_resume_after_interrupt_in_process(small, monkeypatch):
    from igpt_cli import extract as ex

    ref = small["tmp"] / "ref.h5"
    extract_features(small["tokens"], small["dir"], "all", ref, batch_size=5, progress=False)
    out = small["tmp"] / "resumed.h5"
    real = ex.ModelSource.__call__
    seen = []

    def dying(self, tokens):
        seen.append(len(tokens))
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real(self, tokens)

    monkeypatch.setattr(ex.ModelSource, "__call__", dying)
    with pytest.raises(KeyboardInterrupt):
        extract_features(small["tokens"], small["dir"], "all", out, batch_size=5, progress=False)
    monkeypatch.setattr(ex.ModelSource, "__call__", real)
    tmp = formats.temp_path_for(out)
    assert not out.exists() and tmp.exists()
    with h5py.File(tmp) as f:
        assert f.attrs["n_done"] == 5 and not f.attrs["complete"]

    # different settings refuse, and say which
    with pytest.raises(InputError, match="layers differs"):
        extract_features(small["tokens"], small["dir"], "1", out, batch_size=5, progress=False)
    with pytest.raises(InputError, match="tokens_sha256 differs"):
        other = make_tokens(small["tmp"] / "other.h5", 12, 8, seed=9)
        extract_features(other, small["dir"], "all", out, batch_size=5, progress=False)
    # a different batch size adopts the partial file's boundaries
    s = extract_features(small["tokens"], small["dir"], "all", out, batch_size=4, progress=False)
    assert s["resumed_from"] == 5 and s["computed"] == 7 and s["batch_size"] == 5
    assert not tmp.exists()
    fa, fb = read_feats(ref), read_feats(out)
    for layer in fa:
        np.testing.assert_array_equal(fa[layer], fb[layer])


def test_restart_discards_partial(small):
    out = small["tmp"] / "restart.h5"
    tmp = formats.temp_path_for(out)
    tmp.write_bytes(b"garbage, e.g. killed before the first flush")
    s = extract_features(small["tokens"], small["dir"], "2", out, progress=False)  # unreadable: starts over
    assert s["resumed_from"] == 0 and out.exists()


def test_kill_9_resume_identical(tmp_path):
    """Kill a real `igpt extract` with SIGKILL mid-run, twice; the resumed file equals an uninterrupted one."""
    torch.manual_seed(0)
    save_pretrained(IGPT(IGPTConfig(n_positions=16, n_embd=32, n_layer=2, n_head=2)), tmp_path / "m")
    tokens = make_tokens(tmp_path / "t.h5", 3000, 4, seed=3)
    args = [tokens, "--model", tmp_path / "m", "-l", "all", "--batch-size", "2", "--dtype", "float32", "--quiet"]
    out = tmp_path / "f.h5"
    tmp = formats.temp_path_for(out)
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    kills = 0
    for target in (200, 700):
        p = subprocess.Popen([sys.executable, "-m", "igpt_cli", "extract", *map(str, args), "-o", str(out)],
                             env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 300
        while p.poll() is None and time.time() < deadline:
            try:
                with h5py.File(tmp, "r", locking=False) as f:
                    n = int(f.attrs.get("n_done", 0))
            except Exception:
                n = 0
            if n >= target:
                p.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.01)
        p.wait()
    assert kills == 2, "the run finished before it could be killed: make it longer"
    assert not out.exists() and tmp.exists()
    r = run_cli(*args, "-o", out, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["resumed_from"] >= 700 and summary["n"] == 3000
    assert out.exists() and not tmp.exists()

    ref = tmp_path / "ref.h5"
    r = run_cli(*args, "-o", ref, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    fa, fb = read_feats(ref), read_feats(out)
    for layer in fa:
        np.testing.assert_array_equal(fa[layer], fb[layer])
    with h5py.File(ref) as a, h5py.File(out) as b:
        assert (a["labels"][:] == b["labels"][:]).all()
        assert dict(formats.read_attrs(a)) == dict(formats.read_attrs(b))


# ---------------------------------------------------------------------------
# bad input: one line, exit 2, no traceback, nothing left behind
# ---------------------------------------------------------------------------
def run_inprocess(*args):
    from typer.testing import CliRunner

    from igpt_cli.cli import app

    r = CliRunner().invoke(app, ["extract", *map(str, args)])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    from types import SimpleNamespace

    return SimpleNamespace(returncode=r.exit_code, stderr=r.stderr, stdout=r.stdout)  # click >= 8.2: stderr apart


def assert_clean_failure(r: subprocess.CompletedProcess, out: Path, needle: str):
    assert r.returncode == 2, (r.returncode, r.stderr, r.stdout)
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "error" in lines[0], r.stderr
    assert needle.lower() in " ".join(r.stderr.split()).lower(), r.stderr
    assert not out.exists() and not formats.temp_path_for(out).exists()


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
        model, needle = t / "nope", "model directory not found"
    elif case == "no-weights":
        model, needle = t / "nodir", "no weights"
    elif case == "shape":
        model, needle = t / "shape", "config.json implies"
    elif case == "wrong-kind":
        tok, needle = t / "feats.h5", "not an igpt-tokens file"
    elif case == "not-hdf5":
        tok, needle = t / "m" / "config.json", "not an HDF5 file"
    elif case == "token-range":
        tok, needle = t / "big.h5", "not below the palette size 16"
    elif case == "resolution":
        tok, needle = t / "t8.h5", "model wants 4x4 images"
    elif case == "layer":
        extra, needle = ["-l", "3"], "out of range, the model has layers 0..2"
    elif case == "device":
        if torch.cuda.is_available():
            extra, needle = ["--device", "quantum"], "unknown device"
        else:
            extra, needle = ["--device", "cuda"], "no CUDA GPU"
    elif case == "dtype":
        extra, needle = ["--dtype", "int4"], "unknown dtype"
    r = run_inprocess(tok, "--model", model, "-o", out, "--quiet", *extra)
    assert_clean_failure(r, out, needle)


def test_bad_input_real_process(bad_inputs):
    out = bad_inputs / "out-real.h5"
    r = run_cli(bad_inputs / "t8.h5", "--model", bad_inputs / "m", "-o", out)
    assert_clean_failure(r, out, "model wants 4x4 images")


def test_existing_output_needs_overwrite(small):
    out = small["tmp"] / "exists.h5"
    out.write_bytes(b"x")
    with pytest.raises(InputError, match="--overwrite"):
        extract_features(small["tokens"], small["dir"], "1", out, progress=False)
    extract_features(small["tokens"], small["dir"], "1", out, progress=False, overwrite=True)
    assert formats.open_igpt(out, formats.FEATURES_FORMAT)


def test_hub_name_resolves_from_local_cache(tmp_path, monkeypatch, small):
    from igpt_cli.extract import resolve_model_dir

    snap = tmp_path / "hub" / "models--openai--imagegpt-small" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model_dir("openai/imagegpt-small") == snap
    assert resolve_model_dir(small["dir"]) == small["dir"]
    assert resolve_model_dir("openai/imagegpt-large") == Path("openai/imagegpt-large")  # not cached: as given
