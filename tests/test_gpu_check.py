"""bench/gpu_check.py, the one-command GPU check: on a machine without CUDA it says so in one line and
exits 0; `--cpu-dry-run` runs its checks on the CPU at tiny shapes (a few cheap ones here)."""
from __future__ import annotations

import re
import subprocess
import sys

from helpers import ENV, ROOT

SCRIPT = ROOT / "bench" / "gpu_check.py"
NO_GPU = dict(ENV, CUDA_VISIBLE_DEVICES="")  # the same answer on a GPU machine: no device visible


def gpu_check(*args, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=NO_GPU,
                          timeout=timeout)


def test_without_a_gpu_it_says_so_in_one_line():
    r = gpu_check()
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1 and r.stdout.startswith("gpu_check: no GPU here (") and "--cpu-dry-run" in r.stdout
    bad = gpu_check("--cpu-dry-run", "--only", "env,warp-drive")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        bad.stderr.strip()] and "unknown check(s) warp-drive" in bad.stderr


def test_dry_run_prints_one_table_of_its_checks(tmp_path):
    r = gpu_check("--cpu-dry-run", "--only", "env,peak,probe,generate", "--json", tmp_path / "rows.json")
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert "CPU DRY RUN" in lines[0]
    assert lines[1] == "| check | result | measured | threshold |"
    rows = [[c.strip() for c in re.split(r"(?<!\\)\|", ln)[1:-1]] for ln in lines[3:]]
    assert all(len(row) == 4 and row[1] in ("pass", "info", "skip") for row in rows), lines
    names = [row[0] for row in rows]
    for want in ("versions", "bf16 matmul peak (this run)", "probe solver cpu vs CPU, tol 1e-06",
                 "TF32 state after the probe", "samples cpu: same seed twice", "total time"):
        assert want in names, names
    assert float(re.search(r"([\d.]+) TFLOP/s", rows[names.index("bf16 matmul peak (this run)")][2])[1]) > 0
    # the probe's file comparison needs the features check's files: skipped, saying why
    assert rows[names.index("probe --jobs 2 = --jobs 1, cuda = cpu")][1:3] == ["skip", "needs the features check's files"]
    import json

    assert [row["check"] for row in json.loads((tmp_path / "rows.json").read_text())] == names
