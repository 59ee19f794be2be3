"""igpt_cli.stage, the one stage kernel: shards, part files, merge, the re-check under the lock, and
every heavy command (extract, features, score, sample, complete) under torchrun equal to one process,
resume after a killed rank, bad input."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from helpers import (ENV, attrs_without_provenance, hf_causal_model, hold_output_lock, invoke, make_image_folder,
                     make_tokens, rows_done)
from helpers import rank_pid
from igpt_cli import formats, outputs
from igpt_cli.errors import InputError
from igpt_cli.model import IGPT, IGPTConfig, save_pretrained
from igpt_cli.progress import Reporter
from igpt_cli.stage import (StageFile, all_part_paths, create_partial, file_identity, merge_parts, part_path,
                            run_stage, shard_rows)

TORCHRUN = Path(sys.executable).with_name("torchrun")


def extract_cmd(tokens, model, out, *extra, batch=7):
    return ["-m", "igpt_cli", "extract", str(tokens), "--model", str(model), "-l", "all", "--batch-size",
            str(batch), "--dtype", "float32", "--quiet", "-o", str(out), *map(str, extra)]


def single(tokens, model, out, *extra, batch=7):
    r = subprocess.run([sys.executable, *extract_cmd(tokens, model, out, *extra, batch=batch)],
                       capture_output=True, text=True, env=ENV, timeout=900)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def torchrun_args(k, *extra_launcher):
    return [str(TORCHRUN), "--standalone", f"--nproc-per-node={k}", *extra_launcher]


def torchrun(k, tokens, model, out, *extra, batch=7, launcher=()):
    return subprocess.run([*torchrun_args(k, *launcher), *extract_cmd(tokens, model, out, *extra, batch=batch)],
                          capture_output=True, text=True, env=ENV, timeout=900)


def assert_same_file(a: Path, b: Path):
    """Features byte for byte, labels, sources and every attr but provenance (creation time, command)."""
    with h5py.File(a) as fa, h5py.File(b) as fb:
        assert sorted(fa["features"]) == sorted(fb["features"])
        for k in fa["features"]:
            x, y = fa["features"][k], fb["features"][k]
            assert x.dtype == y.dtype and x.shape == y.shape and x.chunks == y.chunks
            assert x[:].tobytes() == y[:].tobytes(), f"layer {k} differs"
        assert fa["labels"][:].tobytes() == fb["labels"][:].tobytes()
        assert list(fa["sources"].asstr()[:]) == list(fb["sources"].asstr()[:])
        assert attrs_without_provenance(fa) == attrs_without_provenance(fb)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    save_pretrained(IGPT(IGPTConfig(n_positions=16, n_embd=32, n_layer=2, n_head=2)), tmp / "m")
    tokens = make_tokens(tmp / "t.h5", 250, 4, seed=3)
    ref = tmp / "ref.h5"
    single(tokens, tmp / "m", ref)
    return dict(tmp=tmp, model=tmp / "m", tokens=tokens, ref=ref)


# ---------------------------------------------------------------------------
# sharding
# ---------------------------------------------------------------------------
def test_shard_rows_cover_every_row_once_on_the_batch_grid():
    for n in [0, 1, 2, 5, 7, 8, 63, 64, 65, 250, 1000, 1001]:
        for k in range(1, 9):
            for b in [1, 2, 3, 7, 8, 64, 300]:
                shards = [shard_rows(n, k, r, b) for r in range(k)]
                pos = 0
                for a, z in shards:  # contiguous, in rank order: no gaps, no duplicates
                    assert a == pos and z >= a
                    assert a % b == 0 or a == n  # starts on the single-process batch grid
                    pos = z
                assert pos == n
                sizes = [-(-(z - a) // b) for a, z in shards]  # batches per rank
                assert max(sizes) - min(sizes) <= 1, (n, k, b, shards)
    assert shard_rows(250, 3, 0, 7) == (0, 84) and shard_rows(250, 3, 2, 7) == (168, 250)
    with pytest.raises(ValueError):
        shard_rows(10, 2, 2, 1)


# ---------------------------------------------------------------------------
# the kernel in one process, and merge from constructed part files
# ---------------------------------------------------------------------------
IDENT = dict(model_sha256="a" * 64, seed=3)


def spec_of(n: int = 23, streamed: bool = False) -> StageFile:
    """A small stage file: rows of `x` [n, 5] float32 and `labels` (streamed: computed too)."""
    def layout(f, start, stop):
        f.create_dataset("x", shape=(stop - start, 5), dtype="float32")
        f.create_dataset("labels", data=np.full(stop - start, -1, np.int64))
        f.attrs.update(format=formats.SCORES_FORMAT, format_version=1)

    return StageFile(formats.SCORES_FORMAT, n, IDENT, dict(note="made by a test"), layout,
                     ("x", "labels") if streamed else ("x",), row_bytes=28)


def make_parts(out: Path, k: int, data: np.ndarray, *, bs=4, skip=(), bad=None, incomplete=None):
    spec = spec_of(len(data))
    for r in range(k):
        a, b = shard_rows(len(data), k, r, bs)
        if r in skip or b == a:
            continue
        ident = file_identity(spec, bs, a, b)
        if r == bad:
            ident["model_sha256"] = "c" * 64
        f = create_partial(part_path(out, r, k), spec, ident, a, b, k)
        f["x"][:] = data[a:b]
        done = b - a if r != incomplete else (b - a) // 2
        f.attrs.update(n_done=done, complete=r != incomplete)
        f.close()
    return spec


@pytest.fixture
def data():
    return np.random.default_rng(0).standard_normal((23, 5)).astype(np.float32)


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_merge_by_row_index(tmp_path, data, k):
    out = tmp_path / "f.h5"
    spec = make_parts(out, k, data)
    (tmp_path / ".f.h5.part-00000-of-00009.tmp").write_bytes(b"stale part of another world size")
    assert merge_parts(out, spec, 4, k) == 23
    assert not all_part_paths(out) and not outputs.temp_path_for(out).exists()
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["x"][:], data)
        a = formats.read_attrs(f)
        assert a["n_done"] == a["n_total"] == 23 and a["complete"] is True and "shard_start" not in a
        assert a["world_size"] == k and a["note"] == "made by a test" and a["batch_size"] == 4


def test_merge_names_missing_parts(tmp_path, data):
    out = tmp_path / "f.h5"
    spec = make_parts(out, 3, data, skip=(1, 2))
    with pytest.raises(InputError, match="2 of 3 part file") as e:
        merge_parts(out, spec, 4, 3)
    msg = str(e.value)
    assert str(part_path(out, 1, 3)) in msg and str(part_path(out, 2, 3)) in msg
    assert str(part_path(out, 0, 3)) not in msg and "shared by all nodes" in msg
    assert not out.exists() and part_path(out, 0, 3).exists()  # nothing merged, nothing removed


def test_merge_refuses_disagreeing_and_incomplete_parts(tmp_path, data):
    out = tmp_path / "f.h5"
    spec = make_parts(out, 3, data, bad=2)
    with pytest.raises(InputError, match="model_sha256 differs") as e:
        merge_parts(out, spec, 4, 3)
    assert str(part_path(out, 2, 3)) in str(e.value) and not out.exists()
    make_parts(out, 3, data, incomplete=1)
    with pytest.raises(InputError, match="incomplete") as e:
        merge_parts(out, spec, 4, 3)
    assert str(part_path(out, 1, 3)) in str(e.value) and not out.exists()


def test_merge_takes_the_output_lock(tmp_path, data):
    out = tmp_path / "f.h5"
    spec = make_parts(out, 2, data)
    holder = hold_output_lock(out)
    try:
        with pytest.raises(outputs.OutputError, match=f"pid {holder.pid} "):
            merge_parts(out, spec, 4, 2)
    finally:
        holder.stdin.close()
        holder.wait(30)
    assert not out.exists() and all_part_paths(out)  # nothing merged, nothing removed


def rows_of(data, *, stop_at=None, calls=None):
    """A `compute` over `data` (a stream that ends at `stop_at`), recording the batches it was asked for."""
    def compute(i, j):
        if calls is not None:
            calls.append((i, j))
        j = min(j, stop_at) if stop_at is not None else j
        return {"x": data[i:j], "labels": np.arange(i, j)} if j > i else {}
    return compute


def test_run_stage_resumes_on_the_stored_batch_grid(tmp_path, data):
    out, spec = tmp_path / "f.h5", spec_of(23, streamed=True)

    def dying(i, j):
        if i >= 8:
            raise KeyboardInterrupt
        return rows_of(data)(i, j)

    with pytest.raises(KeyboardInterrupt):
        run_stage(out, spec, dying, batch_size=4, batch_size_given=True, reporter=Reporter(None, "t"))
    assert rows_done(outputs.temp_path_for(out)) == 8 and not out.exists()
    calls = []
    run = run_stage(out, spec, rows_of(data, calls=calls), batch_size=5, batch_size_given=True,
                    reporter=Reporter(None, "t"))
    assert (run.n, run.computed, run.resumed_from, run.batch_size) == (23, 15, 8, 4)
    assert calls == [(8, 12), (12, 16), (16, 20), (20, 23)]  # the partial file's batch boundaries
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["x"][:], data)
        assert f["labels"][:].tolist() == list(range(23)) and f.attrs["world_size"] == 1
    assert not outputs.temp_path_for(out).exists() and not outputs.lock_path_for(out).exists()


def test_run_stage_ends_the_file_where_the_input_ends(tmp_path, data):
    out = tmp_path / "f.h5"
    run = run_stage(out, spec_of(23, streamed=True), rows_of(data, stop_at=10), batch_size=4, batch_size_given=True,
                    reporter=Reporter(None, "t"))
    assert run.n == 10
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["x"][:], data[:10])
        assert f.attrs["n_total"] == f.attrs["n_done"] == 10 and f.attrs["complete"]
    assert not list(tmp_path.glob(".*"))  # no partial, merge or lock file left


def test_run_stage_rechecks_the_output_under_the_lock(tmp_path, data):
    """A run that finished after this one's first check is never replaced without overwrite."""
    out = tmp_path / "f.h5"
    out.write_bytes(b"the finished output of another run")
    with pytest.raises(outputs.OutputError, match="output file exists"):
        run_stage(out, spec_of(), rows_of(data), batch_size=4, batch_size_given=False, reporter=Reporter(None, "t"))
    assert out.read_bytes() == b"the finished output of another run"
    assert not outputs.temp_path_for(out).exists()


def test_a_failure_before_any_row_leaves_no_partial(tmp_path):
    out = tmp_path / "f.h5"

    def broken(i, j):
        raise InputError("the input is bad at row 0")

    with pytest.raises(InputError, match="bad at row 0"):
        run_stage(out, spec_of(), broken, batch_size=4, batch_size_given=False, reporter=Reporter(None, "t"))
    assert not list(tmp_path.iterdir())


def test_a_writer_error_surfaces_in_the_main_thread_and_earlier_rows_stay_resumable(tmp_path, data):
    """The background writer fails on batch 3 (rows the file cannot take): the run stops with that error,
    batches 1-2 are flushed with n_done = 8, and the same run resumes from there."""
    out = tmp_path / "f.h5"
    calls = []

    def bad_third(i, j):
        calls.append((i, j))
        cols = rows_of(data)(i, j)
        if i == 8:
            cols["x"] = np.zeros((j - i, 7), np.float32)  # not the file's row shape: the writer's h5py write fails
        return cols

    with pytest.raises(TypeError):
        run_stage(out, spec_of(23, streamed=True), bad_third, batch_size=4, batch_size_given=True,
                  reporter=Reporter(None, "t"))
    assert calls[:3] == [(0, 4), (4, 8), (8, 12)]
    tmp = outputs.temp_path_for(out)
    assert rows_done(tmp) == 8 and not out.exists() and not outputs.lock_path_for(out).exists()
    run = run_stage(out, spec_of(23, streamed=True), rows_of(data), batch_size=4, batch_size_given=True,
                    reporter=Reporter(None, "t"))
    assert (run.n, run.resumed_from) == (23, 8)
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["x"][:], data)


def test_rows_computed_before_an_interrupt_are_written(tmp_path, data):
    """An interrupt during batch 4's compute: the three batches computed before it reach the file."""
    out = tmp_path / "f.h5"

    def dying(i, j):
        if i >= 12:
            raise KeyboardInterrupt
        return rows_of(data)(i, j)

    with pytest.raises(KeyboardInterrupt):
        run_stage(out, spec_of(23, streamed=True), dying, batch_size=4, batch_size_given=True,
                  reporter=Reporter(None, "t"))
    with h5py.File(outputs.temp_path_for(out)) as f:
        assert f.attrs["n_done"] == 12
        np.testing.assert_array_equal(f["x"][:12], data[:12])


def test_a_merge_copies_wide_rows_in_bounded_blocks(tmp_path, monkeypatch):
    from igpt_cli import stage

    wide = h5py.File(tmp_path / "w.h5", "w").create_dataset("m", shape=(3, 64, 1024), dtype="float16")
    assert stage.copy_rows(wide) == stage.COPY_BYTES // (64 * 1024 * 2)
    monkeypatch.setattr(stage, "COPY_BYTES", 1)
    assert stage.copy_rows(wide) == 1
    wide.file.close()


# ---------------------------------------------------------------------------
# torchrun end to end (gloo on the CPU)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 3])
def test_torchrun_equals_single_process(setup, k):
    out = setup["tmp"] / f"d{k}.h5"
    r = torchrun(k, setup["tokens"], setup["model"], out)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    assert len(lines) == 1, r.stdout  # rank 0 alone prints the summary
    s = json.loads(lines[0])
    assert s["world_size"] == k and s["n"] == 250 and s["computed"] == 250 and s["batch_size"] == 7
    assert not all_part_paths(out) and not outputs.temp_path_for(out).exists()
    assert_same_file(setup["ref"], out)


def test_torchrun_token_maps_equal_single_process(setup):
    """--pool none under 2 ranks, 23 rows (odd) in batches of 7: the part files hold token maps too."""
    tokens = make_tokens(setup["tmp"] / "t23.h5", 23, 4, seed=11)
    ref, out = setup["tmp"] / "maps-ref.h5", setup["tmp"] / "maps-2.h5"
    single(tokens, setup["model"], ref, "--pool", "none")
    r = torchrun(2, tokens, setup["model"], out, "--pool", "none")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not all_part_paths(out)
    assert_same_file(ref, out)
    with h5py.File(out) as f:
        assert f["features/2"].shape == (23, 16, 32) and f["features/2"].dtype == np.float16
        assert f.attrs["pool"] == "none" and f.attrs["world_size"] == 2


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    """A tiny causal model (4x4 images, no palette of its own: the 512-colour default), 23 token rows,
    and a folder of 15 images: odd row counts, shared by no world size."""
    tmp = tmp_path_factory.mktemp("gen")
    _, model = hf_causal_model(tmp, n_layer=2, n_embd=32, n_head=2, n_positions=16)
    tokens = make_tokens(tmp / "t.h5", 23, 4, seed=5)
    folder = make_image_folder(tmp / "imgs", splits=("train",), per_class=5)
    return dict(tmp=tmp, model=model, tokens=tokens, folder=folder)


RUN = ("--device", "cpu", "--dtype", "float32", "-q")
COMMANDS = {  # command -> its arguments (before -o)
    "features": lambda g: ["features", g["folder"], "-m", g["model"], "-l", "1", "-l", "2", "-b", "4"],
    "score": lambda g: ["score", g["tokens"], "-m", g["model"], "-b", "5"],
    "sample": lambda g: ["sample", g["model"], "-n", "11", "-b", "3", "--seed", "7"],
    "complete": lambda g: ["complete", g["tokens"], "-m", g["model"], "-n", "2", "--limit", "7", "--keep-rows", "1",
                           "-b", "4", "--seed", "2"],
}


def datasets(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return sorted(names)


def assert_same_datasets(a: Path, b: Path, world_size: int):
    """Every dataset equal (features, tokens, scores, labels, sources), every attr but provenance, and
    `world_size` recorded in each."""
    with h5py.File(a) as fa, h5py.File(b) as fb:
        names = [datasets(f) for f in (fa, fb)]
        assert names[0] and names[0] == names[1]
        for name in names[0]:
            x, y = fa[name], fb[name]
            if h5py.check_string_dtype(x.dtype):
                assert list(x.asstr()[:]) == list(y.asstr()[:]), name
            else:
                assert x.dtype == y.dtype and x[:].tobytes() == y[:].tobytes(), name
        assert attrs_without_provenance(fa) == attrs_without_provenance(fb)
        assert fa.attrs["world_size"] == 1 and fb.attrs["world_size"] == world_size


@pytest.mark.parametrize("command,k", [("features", 2), ("score", 2), ("sample", 2), ("sample", 3), ("complete", 2)])
def test_every_heavy_command_under_torchrun_writes_the_one_process_file(gen, command, k):
    args = [*map(str, COMMANDS[command](gen)), *RUN]
    ref, out = gen["tmp"] / f"{command}-ref.h5", gen["tmp"] / f"{command}-{k}.h5"
    if not ref.exists():
        r = subprocess.run([sys.executable, "-m", "igpt_cli", *args, "-o", str(ref)], capture_output=True, text=True,
                           env=ENV, timeout=600)
        assert r.returncode == 0, r.stderr
    r = subprocess.run([*torchrun_args(k), "-m", "igpt_cli", *args, "-o", str(out), *(["--json"] if command == "score"
                                                                                     else [])],
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len([l for l in r.stdout.splitlines() if l.startswith("{")]) == 1, r.stdout  # rank 0 alone prints
    assert not all_part_paths(out) and not list(gen["tmp"].glob(f".{out.name}*"))  # no part, temp or lock file
    assert_same_datasets(ref, out, k)


def test_ranks_with_other_flags_stop_every_rank_in_one_line(gen):
    """Rank 1 runs with another seed: one line naming the difference, every rank exits 2, nothing written."""
    out = gen["tmp"] / "disagree.h5"
    script = (f"exec {sys.executable} -m igpt_cli sample {gen['model']} -n 5 -b 2 --seed $RANK "
              f"--device cpu --dtype float32 -q -o {out}")
    r = subprocess.run([*torchrun_args(2), "--no-python", "bash", "-c", script], capture_output=True, text=True,
                       env=ENV, timeout=600)
    errs = error_messages(r.stderr)
    assert r.returncode != 0 and len(errs) == 1, r.stderr[-3000:]
    assert "rank 1 of 2 runs with other settings than rank 0" in errs[0] and "seed" in errs[0]
    assert re.search(r"exitcode\s*:\s*2", r.stderr), r.stderr[-3000:]
    assert not out.exists() and not all_part_paths(out)


def _kill_rank_midway(cmd: list[str], part: Path, rank: int, at_rows: int) -> subprocess.Popen:
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while p.poll() is None and time.time() < deadline:
        if rows_done(part) >= at_rows:
            pid = rank_pid(p.pid, rank)
            if pid:
                os.kill(pid, signal.SIGKILL)
                return p
        time.sleep(0.02)
    p.kill()
    pytest.fail("the run finished before a rank could be killed: make it longer")


@pytest.fixture(scope="module")
def long_run(setup):
    tmp = setup["tmp"]
    tokens = make_tokens(tmp / "long.h5", 2400, 4, seed=4)
    ref = tmp / "long-ref.h5"
    single(tokens, setup["model"], ref, batch=2)
    return dict(tokens=tokens, ref=ref)


def test_killed_rank_restarted_by_torchrun(setup, long_run):
    """SIGKILL rank 1 mid-shard; torchrun --max-restarts=1 restarts the group and every rank resumes its part."""
    out = setup["tmp"] / "killed.h5"
    part = part_path(out, 1, 2)
    cmd = [*torchrun_args(2, "--max-restarts=1"), *extract_cmd(long_run["tokens"], setup["model"], out, batch=2)]
    p = _kill_rank_midway(cmd, part, 1, 150)
    stdout, stderr = p.communicate(timeout=900)
    assert p.returncode == 0, stderr[-3000:]
    s = json.loads([l for l in stdout.splitlines() if l.startswith("{")][-1])
    assert s["resumed_from"] >= 150 and s["computed"] == 2400 - s["resumed_from"]
    assert not all_part_paths(out)
    assert_same_file(long_run["ref"], out)


def test_killed_rank_rerun_same_command(setup, long_run):
    """Without --max-restarts torchrun gives up; running the same command again resumes both parts."""
    out = setup["tmp"] / "rerun.h5"
    cmd = [*torchrun_args(2), *extract_cmd(long_run["tokens"], setup["model"], out, batch=2)]
    p = _kill_rank_midway(cmd, part_path(out, 0, 2), 0, 200)
    p.communicate(timeout=900)
    assert p.returncode != 0 and not out.exists()
    assert rows_done(part_path(out, 0, 2)) >= 200
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads([l for l in r.stdout.splitlines() if l.startswith("{")][-1])["resumed_from"] >= 200
    assert_same_file(long_run["ref"], out)


# ---------------------------------------------------------------------------
# bad input: one line, exit 2
# ---------------------------------------------------------------------------
def error_messages(text: str) -> list[str]:
    """The `error:` lines among torchrun's own output."""
    return [l for l in text.splitlines() if l.startswith("error:")]


def test_part_from_other_settings_is_refused(setup):
    """A stale part of rank 1 from other layers: rank 1 names it in one line, every rank exits 2."""
    out = setup["tmp"] / "stale.h5"
    a, b = shard_rows(250, 2, 1, 7)
    # the part file a killed `--layer 1` run would leave behind
    with h5py.File(setup["ref"]) as f, h5py.File(part_path(out, 1, 2), "w") as p:
        attrs = dict(formats.read_attrs(f), shard_start=a, shard_stop=b, rows_total=250, rank=1, world_size=2)
        for k in ("format", "format_version", "igpt_version", "n_total", "n_done", "complete"):
            attrs.pop(k)
        attrs["layers"] = [1]
        formats.create_features_file(p, dims={1: 32}, labels=f["labels"][a:b], sources=f["sources"].asstr()[a:b],
                                     store_dtype="float32", attrs=attrs)
        p.attrs["n_done"] = 7  # it got somewhere (a part with no row done holds nothing and is replaced)
    r = torchrun(2, setup["tokens"], setup["model"], out)  # all layers now
    errs = error_messages(r.stderr)
    assert r.returncode != 0 and len(errs) == 1, r.stderr[-3000:]
    assert str(part_path(out, 1, 2)) in " ".join(r.stderr.split()) and "layers differs" in errs[0]
    assert re.search(r"exitcode\s*:\s*2", r.stderr), r.stderr[-3000:]
    assert not out.exists()


@pytest.mark.parametrize("locked", ["part", "out"])
def test_locked_part_or_output_stops_every_rank_at_once(setup, locked):
    """Another job holds rank 1's part file (or a one-process run holds the output): the failing rank
    names the holder in one line, every rank exits 2, no part is touched, nothing is merged."""
    out = setup["tmp"] / f"locked-{locked}.h5"
    holder = hold_output_lock(part_path(out, 1, 2) if locked == "part" else out)
    try:
        r = torchrun(2, setup["tokens"], setup["model"], out)
    finally:
        holder.stdin.close()
        holder.wait(30)
    errs = error_messages(r.stderr)
    assert r.returncode != 0 and len(errs) == 1, r.stderr[-3000:]
    assert "another igpt run is writing this output" in errs[0] and f"pid {holder.pid} " in errs[0]
    assert re.search(r"exitcode\s*:\s*2", r.stderr), r.stderr[-3000:]
    assert not out.exists() and not all_part_paths(out) and not outputs.temp_path_for(out).exists()


def test_rendezvous_failure_is_one_line(setup):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = setup["tmp"] / "rdzv.h5"
    env = dict(ENV, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               IGPT_DIST_TIMEOUT="3")
    r = subprocess.run([sys.executable, *extract_cmd(setup["tokens"], setup["model"], out)], capture_output=True,
                       text=True, env=env, timeout=600)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "rendezvous" in lines[0] and f"127.0.0.1:{port}" in lines[0]
    assert not out.exists() and not all_part_paths(out)


def test_world_size_without_master_is_one_line(setup, monkeypatch):
    for k in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    out = setup["tmp"] / "nomaster.h5"
    r = invoke("extract", setup["tokens"], "--model", setup["model"], "-b", "7", "-q", "-o", out)
    assert r.exit_code == 2, (r.stdout, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "MASTER_ADDR" in lines[0] and "torchrun" in lines[0]
    assert not out.exists()


def test_the_row_writer_survives_a_lost_wake_up(tmp_path):
    # A Ctrl-C or SIGTERM raised in the main thread inside Queue.put can leave the writer thread's
    # wake-up undone (a SIGTERM'd extract hung in close() about once in 30 runs): the writer must
    # still find the queued batch, write it and let close() return.
    import threading

    from igpt_cli.stage import RowWriter

    with h5py.File(tmp_path / "o.h5", "w") as f:
        f.create_dataset("x", shape=(4,), dtype="f4")
        f.attrs["n_done"] = 0
        writer = RowWriter(f, 0)
        time.sleep(0.05)  # the writer is waiting for its first batch
        with writer._queue.mutex:   # a batch queued without its notify (the interrupted put)
            writer._queue.queue.append((0, 2, {"x": np.ones(2, dtype="f4")}))
            writer._queue.unfinished_tasks += 1
        closing = threading.Thread(target=writer.close, daemon=True)
        closing.start()
        closing.join(10)
        assert not closing.is_alive(), "close() hung: the writer never saw the queued batch"
        assert f.attrs["n_done"] == 2 and list(f["x"][:2]) == [1.0, 1.0]
