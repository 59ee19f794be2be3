"""igpt_cli.extract.sharded: extract under torchrun — sharding, part files, merge, resume after a killed
rank, bad input."""
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

from helpers import ENV, attrs_without_provenance, hold_output_lock, invoke, make_tokens, rows_done
from igpt_cli import formats, outputs
from igpt_cli.errors import InputError
from igpt_cli.distributed import DistContext
from igpt_cli.extract.sharded import all_part_paths, merge_parts, part_path, shard_rows
from igpt_cli.model import IGPT, IGPTConfig, save_pretrained

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


def test_context_from_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    c = DistContext.from_env()
    assert (c.rank, c.world_size, c.active, c.is_main) == (0, 1, False, True)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    c = DistContext.from_env()
    assert (c.rank, c.world_size, c.local_rank, c.active, c.is_main) == (3, 4, 1, True, False)
    assert c.device_for(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(InputError, match="RANK=4"):
        DistContext.from_env()


# ---------------------------------------------------------------------------
# merge: constructed part files
# ---------------------------------------------------------------------------
IDENT = dict(layers=[0, 2], site="ln", sos=True, pool="mean", compute_dtype="float32", store_dtype="float32",
             device_type="cpu", batch_size=4, model_sha256="a" * 64, model_config="{}", tokens_sha256="b" * 64, n_total=23)
EXTRA = dict(model="m", tokens_file="t.h5", class_names='["a"]', height=2, width=2)


def make_parts(out: Path, k: int, data: dict[int, np.ndarray], labels, sources, *, ident=IDENT, skip=(),
               bad=None, incomplete=None):
    n, bs = ident["n_total"], ident["batch_size"]
    for r in range(k):
        a, b = shard_rows(n, k, r, bs)
        if r in skip or b == a:
            continue
        attrs = dict(ident, **EXTRA, shard_start=a, shard_stop=b, rows_total=n, rank=r, world_size=k)
        if r == bad:
            attrs["model_sha256"] = "c" * 64
        with h5py.File(part_path(out, r, k), "w") as f:
            formats.create_features_file(f, dims={l: d.shape[1] for l, d in data.items()}, labels=labels[a:b],
                                         sources=sources[a:b], store_dtype="float32", attrs=attrs)
            for l, d in data.items():
                f["features"][str(l)][:] = d[a:b]
            done = b - a if r != incomplete else (b - a) // 2
            f.attrs.update(n_done=done, complete=r != incomplete)


@pytest.fixture
def parts_data():
    rng = np.random.default_rng(0)
    data = {0: rng.standard_normal((23, 5)).astype(np.float32), 2: rng.standard_normal((23, 5)).astype(np.float32)}
    labels = rng.integers(0, 3, 23)
    sources = np.array([f"s{i}" for i in range(23)], dtype=object)
    return data, labels, sources


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_merge_by_row_index(tmp_path, parts_data, k):
    data, labels, sources = parts_data
    out = tmp_path / "f.h5"
    make_parts(out, k, data, labels, sources)
    (tmp_path / ".f.h5.part-00000-of-00009.tmp").write_bytes(b"stale part of another world size")
    merged = merge_parts(out, IDENT, dict(IDENT, **EXTRA), labels, sources, {0: 5, 2: 5}, "float32", k)
    assert len(merged) == min(k, 6)  # 23 rows in batches of 4: 6 batches, so at most 6 non-empty shards
    assert not all_part_paths(out) and not outputs.temp_path_for(out).exists()
    with h5py.File(out) as f:
        for l, d in data.items():
            np.testing.assert_array_equal(f["features"][str(l)][:], d)
        assert (f["labels"][:] == labels).all()
        a = formats.read_attrs(f)
        assert a["n_done"] == a["n_total"] == 23 and a["complete"] is True and "shard_start" not in a


def test_merge_names_missing_parts(tmp_path, parts_data):
    data, labels, sources = parts_data
    out = tmp_path / "f.h5"
    make_parts(out, 3, data, labels, sources, skip=(1, 2))
    with pytest.raises(InputError, match="2 of 3 part file") as e:
        merge_parts(out, IDENT, dict(IDENT, **EXTRA), labels, sources, {0: 5, 2: 5}, "float32", 3)
    msg = str(e.value)
    assert str(part_path(out, 1, 3)) in msg and str(part_path(out, 2, 3)) in msg
    assert str(part_path(out, 0, 3)) not in msg and "shared by all nodes" in msg
    assert not out.exists() and part_path(out, 0, 3).exists()  # nothing merged, nothing removed


def test_merge_refuses_disagreeing_and_incomplete_parts(tmp_path, parts_data):
    data, labels, sources = parts_data
    out = tmp_path / "f.h5"
    make_parts(out, 3, data, labels, sources, bad=2)
    with pytest.raises(InputError, match="model_sha256 differs") as e:
        merge_parts(out, IDENT, dict(IDENT, **EXTRA), labels, sources, {0: 5, 2: 5}, "float32", 3)
    assert str(part_path(out, 2, 3)) in str(e.value) and not out.exists()
    make_parts(out, 3, data, labels, sources, incomplete=1)
    with pytest.raises(InputError, match="incomplete") as e:
        merge_parts(out, IDENT, dict(IDENT, **EXTRA), labels, sources, {0: 5, 2: 5}, "float32", 3)
    assert str(part_path(out, 1, 3)) in str(e.value) and not out.exists()


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


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _worker(launcher_pid: int, rank: int) -> int | None:
    for p in _descendants(launcher_pid):
        try:
            env = Path(f"/proc/{p}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"igpt_cli" in cmd:
            return p
    return None


def _kill_rank_midway(cmd: list[str], part: Path, rank: int, at_rows: int) -> subprocess.Popen:
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while p.poll() is None and time.time() < deadline:
        if rows_done(part) >= at_rows:
            pid = _worker(p.pid, rank)
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


def test_merge_takes_the_output_lock(tmp_path, parts_data):
    data, labels, sources = parts_data
    out = tmp_path / "f.h5"
    make_parts(out, 2, data, labels, sources)
    holder = hold_output_lock(out)
    try:
        with pytest.raises(outputs.OutputError, match=f"pid {holder.pid} "):
            merge_parts(out, IDENT, dict(IDENT, **EXTRA), labels, sources, {0: 5, 2: 5}, "float32", 2)
    finally:
        holder.stdin.close()
        holder.wait(30)
    assert not out.exists() and all_part_paths(out)  # nothing merged, nothing removed


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
