"""igpt_cli.generate file stages and the `igpt sample|complete|score` commands: files, provenance,
resuming, figures, bad input."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from helpers import ENV, assert_clean_failure, hf_causal_model, hf_model, hold_output_lock, make_tokens
from igpt_cli import formats, outputs
from igpt_cli.demo import DEMO_DATA, SHIPPED_MODEL
from igpt_cli.generate import complete_file, complete_images, sample_file, sample_images, score_file, score_images

# the commands, whether or not app.py registers them yet
BOOT = ("import sys; from igpt_cli.cli import app; from igpt_cli.cli.generation import register; "
        "register(app); sys.argv[0] = 'igpt'; app(prog_name='igpt')")


def igpt(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BOOT, *map(str, args)], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def invoke(*args):
    from helpers import invoke as _invoke
    from igpt_cli.cli import app
    from igpt_cli.cli.generation import register

    register(app)
    return _invoke(*args)


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    _, d = hf_causal_model(tmp, n_layer=2, n_embd=32, n_head=2, n_positions=16)
    return dict(dir=d, tokens=make_tokens(tmp / "t.h5", 5, 4), tmp=tmp)


@pytest.fixture(scope="module")
def demo_tokens(tmp_path_factory):
    """12 real test images at 8x8, quantized with the shipped model's palette (4 classes)."""
    from igpt_cli.quantize import quantize_dataset

    path = tmp_path_factory.mktemp("demo") / "test.h5"
    quantize_dataset(DEMO_DATA, path, split="test", size=8, palette=SHIPPED_MODEL, limit=400)
    with h5py.File(path, "r+") as f:  # keep 3 images of each of the first 4 classes
        lab = f["labels"][:]
        pick = np.sort(np.concatenate([np.flatnonzero(lab == c)[:3] for c in range(4)]))
        rows = {k: f[k][:][pick] for k in ("tokens", "labels", "sources")}
    sub = path.with_name("test12.h5")
    with h5py.File(path, "r") as src, h5py.File(sub, "w") as f:
        formats.create_tokens_file(f, height=8, width=8, palette=src["palette"][:],
                                   class_names=formats.class_names(src), split="test", source="demo", resize="bilinear")
        formats.append_rows(f, **rows)
    return sub


def read(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][:] for k in f}, formats.read_attrs(f)


# ---------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------
def test_sample_file_is_a_tokens_file_with_provenance(causal, tmp_path):
    out, png = tmp_path / "s.h5", tmp_path / "s.png"
    r = sample_file(causal["dir"], 5, out, png=png, temperature=0.8, top_k=50, top_p=0.9, seed=4, batch_size=2,
                    command="igpt sample …")
    d, attrs = read(out)
    assert d["tokens"].shape == (5, 16) and d["tokens"].dtype == np.uint16
    np.testing.assert_array_equal(d["labels"], -1)
    np.testing.assert_array_equal(d["palette"], np.load(formats.Path(__file__).parents[1] / "igpt_cli" / "assets" /
                                                        "palette_igpt512.npy"))  # no preprocessor: the official one
    assert attrs["format"] == "igpt-tokens" and (attrs["height"], attrs["width"]) == (4, 4)
    assert attrs["seed"] == 4 and attrs["temperature"] == 0.8 and attrs["top_k"] == 50 and attrs["top_p"] == 0.9
    assert attrs["model"] == str(causal["dir"]) and len(attrs["model_sha256"]) == 64
    assert attrs["command"] == "igpt sample …" and attrs["complete"]
    # the same rows as the in-memory function with the same seed
    mem = sample_images(causal["dir"], 5, temperature=0.8, top_k=50, top_p=0.9, seed=4, batch_size=2)
    np.testing.assert_array_equal(d["tokens"], mem)
    from PIL import Image

    assert Image.open(png).size == ((3 * 6 + 2) * 16, (2 * 6 + 2) * 16)  # 3 x 2 grid, 2-px gaps, scale 16
    elt = 2 if r.compute_dtype == "bfloat16" and not r.device.startswith("cpu") else 4  # a CPU caches in float32
    assert r.n == 5 and r.computed == 5 and r.batch_size == 2
    assert r.kv_cache_bytes == 2 * 2 * 2 * 16 * 32 * elt  # keys and values, 2 layers, 2 rows, 16 positions
    assert r.tokens_per_s > 0 and not outputs.temp_path_for(out).exists()


def test_interrupted_sample_resumes_to_the_uninterrupted_result(causal, tmp_path):
    out = tmp_path / "s.h5"
    full = sample_file(causal["dir"], 7, tmp_path / "full.h5", seed=9, batch_size=3)

    def stop_in_second_batch(ev):
        if ev.done > 3 * 16 + 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sample_file(causal["dir"], 7, out, seed=9, batch_size=3, on_progress=stop_in_second_batch)
    tmp = outputs.temp_path_for(out)
    assert not out.exists() and tmp.exists()
    with h5py.File(tmp, "r") as f:
        assert f.attrs["n_done"] == 3 and not f.attrs["complete"]
    with pytest.raises(Exception, match="seed differs"):  # other settings: the partial file is named
        sample_file(causal["dir"], 7, out, seed=10, batch_size=3)
    r = sample_file(causal["dir"], 7, out, seed=9)  # batch size from the partial file
    assert (r.resumed_from, r.computed, r.batch_size) == (3, 4, 3)
    np.testing.assert_array_equal(read(out)[0]["tokens"], read(tmp_path / "full.h5")[0]["tokens"])
    assert full.resumed_from == 0
    r = sample_file(causal["dir"], 7, out, seed=10, overwrite=True, restart=True)
    assert r.resumed_from == 0


def test_killed_sample_command_resumes(tmp_path):
    """`kill -9` in the middle of `igpt sample`, then the same command: the uninterrupted result."""
    args = ["sample", SHIPPED_MODEL, "-n", "24", "-b", "2", "--seed", "3", "-q", "--dtype", "float32"]
    out = tmp_path / "s.h5"
    tmp = outputs.temp_path_for(out)
    p = subprocess.Popen([sys.executable, "-c", BOOT, *map(str, args), "-o", str(out)], env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None:
            try:
                with h5py.File(tmp, "r", locking=False) as f:
                    if int(f.attrs.get("n_done", 0)) >= 4:
                        break
            except (OSError, KeyError):
                pass
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait()
    if out.exists():
        pytest.fail("the run finished before it could be killed; make it longer")
    r = igpt(*args, "-o", out)
    assert r.returncode == 0, r.stderr
    assert 4 <= json.loads(r.stdout)["resumed_from"] < 24
    ref = sample_images(SHIPPED_MODEL, 24, seed=3, batch_size=2, dtype="float32")  # = an uninterrupted run
    np.testing.assert_array_equal(read(out)[0]["tokens"], ref)


# ---------------------------------------------------------------------------
# complete
# ---------------------------------------------------------------------------
def test_complete_file_rows_labels_and_figure(demo_tokens, tmp_path):
    out, png = tmp_path / "c.h5", tmp_path / "c.png"
    r = complete_file(demo_tokens, SHIPPED_MODEL, out, keep_rows=3, n=2, png=png, png_images=5, seed=1,
                      batch_size=5, dtype="float32")
    d, attrs = read(out)
    src, _ = read(demo_tokens)
    assert d["tokens"].shape == (24, 64)
    np.testing.assert_array_equal(d["source_index"], np.repeat(np.arange(12), 2))
    np.testing.assert_array_equal(d["sample_index"], np.tile([0, 1], 12))
    np.testing.assert_array_equal(d["labels"], np.repeat(src["labels"], 2))
    assert [s.decode() for s in d["sources"]] == [s.decode() for s in np.repeat(src["sources"], 2)]
    np.testing.assert_array_equal(d["tokens"][:, :24], np.repeat(src["tokens"][:, :24], 2, axis=0))  # 3 rows kept
    np.testing.assert_array_equal(d["palette"], src["palette"])
    assert attrs["keep_rows"] == 3 and attrs["samples_per_image"] == 2 and attrs["tokens_file"] == str(demo_tokens)
    assert json.loads(attrs["class_names"]) == formats.class_names(h5py.File(demo_tokens, "r"))
    mem = complete_images(src["tokens"], SHIPPED_MODEL, keep_rows=3, n=2, seed=1, batch_size=5, dtype="float32")
    np.testing.assert_array_equal(d["tokens"], mem.reshape(24, 64))
    assert (r.n, r.n_images, r.samples_per_image, r.keep_rows, r.computed) == (24, 12, 2, 3, 24)
    # the figure: 5 rows of (kept | 2 completions | original), 8x8 images scaled by 8
    from PIL import Image

    assert Image.open(png).size == ((4 * 10 + 2) * 8, (5 * 10 + 2) * 8)
    # the output is a tokens file the other stages read
    from igpt_cli.extract import extract_features
    from igpt_cli.fileinfo import show_tokens

    ex = extract_features(out, SHIPPED_MODEL, [4], tmp_path / "f.h5")
    assert ex.n == 24
    show_tokens(out, tmp_path / "show.png")


def test_the_shipped_model_completes_better_than_chance(demo_tokens):
    """Completions of real images are likelier under the model than uniform noise would be, and greedy
    completions likelier still: the generation path and the model agree."""
    src = read(demo_tokens)[0]["tokens"]
    greedy = complete_images(src, SHIPPED_MODEL, n=1, temperature=0, dtype="float32")[:, 0]
    sampled = complete_images(src, SHIPPED_MODEL, n=1, seed=0, dtype="float32")[:, 0]
    noise = src.copy()
    noise[:, 32:] = np.random.default_rng(0).integers(0, 512, (12, 32))
    s = {k: score_images(v, SHIPPED_MODEL, dtype="float32").mean() for k, v in
         dict(greedy=greedy, sampled=sampled, noise=noise, real=src).items()}
    assert s["greedy"] < s["sampled"] < s["noise"] and s["real"] < s["noise"], s


# ---------------------------------------------------------------------------
# score
# ---------------------------------------------------------------------------
def test_score_file_and_summary(demo_tokens, tmp_path):
    out = tmp_path / "scores.h5"
    r = score_file(demo_tokens, SHIPPED_MODEL, out, batch_size=5, dtype="float32")
    d, attrs = read(out)
    src, _ = read(demo_tokens)
    mem = score_images(src["tokens"], SHIPPED_MODEL, dtype="float32")
    np.testing.assert_allclose(d["nats_per_token"], mem, rtol=0, atol=1e-6)
    np.testing.assert_allclose(d["bits_per_token"], mem / math.log(2), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(d["labels"], src["labels"])
    assert attrs["format"] == "igpt-scores" and attrs["model_sha256"] and attrs["complete"]
    assert r.nats_per_token == pytest.approx(mem.mean()) and r.bits_per_token == pytest.approx(mem.mean() / math.log(2))
    assert r.nats_per_token_se == pytest.approx(mem.std(ddof=1) / math.sqrt(12))
    names = formats.class_names(h5py.File(demo_tokens, "r"))
    assert list(r.per_class) == names[:4]
    for c, name in enumerate(names[:4]):
        assert r.per_class[name]["n"] == 3
        assert r.per_class[name]["nats_per_token"] == pytest.approx(mem[src["labels"] == c].mean())
    with formats.open_igpt(out) as f:  # an igpt file the readers accept
        assert f.attrs["n_total"] == 12
    # without an output: the same numbers in memory only
    r2 = score_file(demo_tokens, SHIPPED_MODEL, dtype="float32")
    assert r2.out is None and r2.nats_per_token == pytest.approx(r.nats_per_token, abs=1e-9)


def test_interrupted_score_resumes(demo_tokens, tmp_path):
    out = tmp_path / "scores.h5"

    def stop(ev):  # at the end of the second batch: its rows are flushed and counted, the third never starts
        if ev.done >= 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        score_file(demo_tokens, SHIPPED_MODEL, out, batch_size=4, dtype="float32", on_progress=stop)
    r = score_file(demo_tokens, SHIPPED_MODEL, out, dtype="float32")
    assert r.resumed_from == 8 and r.computed == 4
    ref = score_file(demo_tokens, SHIPPED_MODEL, tmp_path / "ref.h5", batch_size=4, dtype="float32")
    np.testing.assert_array_equal(read(out)[0]["nats_per_token"], read(tmp_path / "ref.h5")[0]["nats_per_token"])
    assert r.nats_per_token == ref.nats_per_token


# ---------------------------------------------------------------------------
# the commands
# ---------------------------------------------------------------------------
def test_commands_print_json_and_write_files(demo_tokens, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pytest", "sample"])  # in-process: the command line recorded is this one
    r = invoke("complete", demo_tokens, "-m", SHIPPED_MODEL, "--keep-fraction", "0.5", "-n", "2", "-o",
               tmp_path / "c.h5", "--png", tmp_path / "c.png", "-q", "--limit", "4")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["n"] == 8 and d["keep_rows"] == 4 and (tmp_path / "c.png").is_file()
    r = invoke("score", tmp_path / "c.h5", "-m", SHIPPED_MODEL, "--json", "-o", tmp_path / "s.h5")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["n"] == 8 and d["bits_per_token"] > 0 and "nats/token" in r.stderr  # table on stderr
    r = invoke("score", demo_tokens, "-m", SHIPPED_MODEL, "--limit", "3")
    assert r.returncode == 0 and r.stdout == "" and "bits/token" in r.stderr  # no --json: table only
    r = invoke("sample", SHIPPED_MODEL, "-n", "2", "-o", tmp_path / "s2.h5", "-t", "0", "-q")
    assert r.returncode == 0 and json.loads(r.stdout)["temperature"] == 0.0
    with h5py.File(tmp_path / "s2.h5", "r") as f:
        assert f.attrs["command"].startswith("igpt ")


@pytest.mark.parametrize("case", ["size", "palette-too-big", "other-palette", "keep-rows", "keep-rows-negative",
                                  "n0", "temperature", "top-p0", "top-p-big", "top-k0", "no-head", "both-keeps"])
def test_bad_input_is_one_line_exit_2_and_no_output(case, demo_tokens, causal, tmp_path):
    out = tmp_path / "o.h5"
    m = str(SHIPPED_MODEL)
    if case == "palette-too-big":
        make_tokens(tmp_path / "big.h5", 2, 4, palette=np.zeros((600, 3), np.float32))
    args, needle = {
        "size": (["complete", causal["tokens"], "-m", m], "images are 4x4"),
        "palette-too-big": (["score", tmp_path / "big.h5", "-m", causal["dir"]], "palette has 600 colours"),
        "other-palette": (["score", make_tokens(tmp_path / "p.h5", 2, 8), "-m", m], "quantize with --palette"),
        "keep-rows": (["complete", demo_tokens, "-m", m, "--keep-rows", "9"], "--keep-rows 9: must lie in 0..8"),
        "keep-rows-negative": (["complete", demo_tokens, "-m", m, "--keep-rows", "-1"], "--keep-rows -1"),
        "n0": (["complete", demo_tokens, "-m", m, "-n", "0"], "--n 0: must be at least 1"),
        "temperature": (["sample", m, "-n", "2", "--temperature", "-0.5"], "--temperature -0.5"),
        "top-p0": (["sample", m, "-n", "2", "--top-p", "0"], "--top-p 0.0: must lie in (0, 1]"),
        "top-p-big": (["complete", demo_tokens, "-m", m, "--top-p", "1.2"], "--top-p 1.2"),
        "top-k0": (["sample", m, "-n", "2", "--top-k", "0"], "--top-k 0"),
        "no-head": (["sample", hf_model(tmp_path, n_layer=1, n_embd=32, n_head=2)[1], "-n", "1"],
                    "no LM head"),
        "both-keeps": (["complete", demo_tokens, "-m", m, "--keep-rows", "2", "--keep-fraction", "0.5"],
                       "not both"),
    }[case]
    args = args + ["-o", out] if args[0] != "score" else args + ["-o", out]
    r = invoke(*args)
    assert_clean_failure(r, needle, out=out)
    assert not outputs.temp_path_for(out).exists()


def test_a_locked_output_is_refused(causal, tmp_path):
    out = tmp_path / "s.h5"
    holder = hold_output_lock(out)
    try:
        r = invoke("sample", causal["dir"], "-n", "1", "-o", out, "-q")
        assert_clean_failure(r, "another igpt run is writing this output", out=out)
    finally:
        holder.stdin.close()
        holder.wait()


def test_demo_completion_figure_has_one_row_per_class(demo_tokens, tmp_path):
    from PIL import Image

    from igpt_cli.demo import _completions

    png = _completions(demo_tokens, SHIPPED_MODEL, tmp_path / "completions.png")
    assert Image.open(png).size == ((5 * 10 + 2) * 8, (4 * 10 + 2) * 8)  # 4 classes x (kept, 3 completions, original)


# ---------------------------------------------------------------------------
# the kernel's guarantees, held by the generate stages too
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["sample", "score"])
def test_an_output_finished_meanwhile_is_not_replaced(command, demo_tokens, causal, tmp_path, monkeypatch):
    """Another run finishes `out` after this one's first check (while it loads the model): the re-check
    under the lock refuses, and the finished file stays."""
    import igpt_cli.generate.stage as stage

    out = tmp_path / "o.h5"
    real = stage.open_model

    def other_run_finishes(*a, **kw):
        out.write_bytes(b"the other run's finished output")
        return real(*a, **kw)

    monkeypatch.setattr(stage, "open_model", other_run_finishes)
    with pytest.raises(outputs.OutputError, match="output file exists"):
        if command == "sample":
            sample_file(causal["dir"], 3, out, batch_size=2)
        else:
            score_file(demo_tokens, SHIPPED_MODEL, out, batch_size=4, dtype="float32")
    assert out.read_bytes() == b"the other run's finished output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.h5"]


def test_a_planted_lock_symlink_is_refused_and_its_target_untouched(causal, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "o.h5"
    outputs.lock_path_for(out).symlink_to(victim)
    r = invoke("sample", causal["dir"], "-n", "1", "-o", out, "-q")
    assert_clean_failure(r, "is a symbolic link", out=out)
    assert victim.read_text() == "precious\n" and not outputs.temp_path_for(out).exists()


@pytest.mark.parametrize("command", ["sample", "complete", "score"])
def test_disk_full_is_one_line_and_leaves_nothing(command, demo_tokens, tmp_path):
    """On a 128 KiB file system: refused up front in one line, exit 2 — no crash at close, no .tmp, no .lock."""
    from helpers import run_igpt, small_tmpfs

    m = str(SHIPPED_MODEL)
    with small_tmpfs(tmp_path / "mnt", "128k") as mnt:
        out = mnt / "o.h5"
        args = {"sample": ["sample", m, "-n", "2000"], "complete": ["complete", demo_tokens, "-m", m, "-n", "200"],
                "score": ["score", make_tokens(tmp_path / "t.h5", 3000, 8, palette=_shipped_palette())], }[command]
        if command == "score":
            args += ["-m", m]
        r = run_igpt(*args, "-b", "2", "--dtype", "float32", "-q", "-o", out)
        assert_clean_failure(r, "no space left on device", out=out)
        assert "needed" in r.stderr and list(mnt.iterdir()) == []


def _shipped_palette():
    from igpt_cli.palette import Palette

    return Palette.load(SHIPPED_MODEL).centers
