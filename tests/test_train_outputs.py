"""The run directory under stress: two runs, a full disk, and what goes to stdout (issue 10, cases 1, 3, 8, 11)."""
import errno
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from igpt_cli.outputs import OutputError, lock_path_for, output_lock
from igpt_cli.train import STATE_FILE, TrainConfig, pretrain
from igpt_cli.train.state import METRICS_FILE, RUN_FILES, read_state

from helpers import ENV, ROOT, assert_clean_failure, make_tokens, run_igpt

PAL16 = np.random.default_rng(5).uniform(-1, 1, (16, 3)).astype(np.float32)
TINY = dict(n_layer=1, n_embd=16, n_head=2, batch_size=4, lr=1e-2, warmup_steps=2, eval_every=3, checkpoint_every=3)
TINY_FLAGS = ["--depth", "1", "--width", "16", "--heads", "2", "--batch-size", "4"]


@pytest.fixture
def tok(tmp_path):
    return make_tokens(tmp_path / "t.h5", 32, 4, palette=PAL16)


# --- two runs on one directory -------------------------------------------------------------------
def test_a_second_run_on_a_locked_directory_fails_at_once(tmp_path, tok):
    with output_lock(tmp_path / "m"):
        for resume in (False, True):
            with pytest.raises(OutputError, match="another igpt run is writing this output"):
                pretrain(tok, tmp_path / "m", TrainConfig(steps=2, **TINY), resume=resume)
    assert not (tmp_path / "m").exists()


def test_two_processes_never_interleave(tmp_path, tok):
    out = tmp_path / "m"
    args = ["train", tok, "-o", out, *TINY_FLAGS, "--steps", "1000000", "--checkpoint-every", "5", "--quiet"]
    first = subprocess.Popen([sys.executable, "-m", "igpt_cli", *map(str, args)], cwd=ROOT, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / STATE_FILE).exists() and first.poll() is None:
            time.sleep(0.05)
        assert (out / STATE_FILE).exists() and lock_path_for(out).exists(), "the first run did not start"
        for again in (args, ["train", tok, "-o", out, "--resume", "--quiet"]):
            r = run_igpt(*again)
            assert_clean_failure(r, "another igpt run is writing this output")
            assert f"pid {first.pid}" in r.stderr  # names the holder
        assert first.poll() is None  # the first run goes on undisturbed
    finally:
        first.send_signal(signal.SIGINT)  # Ctrl-C: it checkpoints and stops
        _, err = first.communicate(timeout=120)
    assert first.returncode == 130 and "Traceback" not in err, err
    assert not lock_path_for(out).exists()  # the holder removed its lock
    assert read_state(out / STATE_FILE).step > 0  # resumable
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


# --- a full disk ---------------------------------------------------------------------------------
def fill(d):
    """Fill the filesystem of directory d (a file `filler`)."""
    fd = os.open(d / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_disk_full_keeps_the_last_checkpoint_resumable_and_leaves_no_temp_files(tmp_path, tok, small_fs):
    cfg = TrainConfig(steps=9, **TINY)
    pretrain(tok, tmp_path / "ref", cfg, dtype="float32")
    out = small_fs / "m"

    def fill_before_step_6_checkpoint(ev):
        if ev.message and json.loads(ev.message)["step"] == 6:
            fill(small_fs)

    with pytest.raises(OutputError) as e:
        pretrain(tok, out, cfg, dtype="float32", on_progress=fill_before_step_6_checkpoint)
    # (the metrics line of step 6 still fit: an append inside the file's last page)
    assert str(e.value) == (f"{out / STATE_FILE}: no space left on device (writing the checkpoint of step 6; "
                            "resume continues from step 3)")
    assert sorted(os.listdir(out)) == sorted(RUN_FILES[:-2] + ("preprocessor_config.json", METRICS_FILE))
    assert read_state(out / STATE_FILE).step == 3
    (small_fs / "filler").unlink()
    pretrain(tok, out, resume=True)
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()


def test_disk_full_while_writing_the_model_files_names_them(tmp_path, tok, monkeypatch):
    import igpt_cli.train.objective as loop  # where a checkpoint's model files are written

    calls = []

    def full_disk(model, d):  # what safetensors raises on a full disk, after its temp file appeared
        calls.append(1)
        if len(calls) == 2:
            (d / ".model.safetensors.tmp").write_bytes(b"partial")
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
        return save_pretrained(model, d)

    save_pretrained = loop.save_pretrained
    monkeypatch.setattr(loop, "save_pretrained", full_disk)
    with pytest.raises(OutputError, match=r"m: no space left on device \(writing the model files of step 6; "
                                          r"resume continues from step 6\)"):
        pretrain(tok, tmp_path / "m", TrainConfig(steps=9, **TINY))
    assert not [n for n in os.listdir(tmp_path / "m") if n.endswith(".tmp")]
    assert read_state(tmp_path / "m" / STATE_FILE).step == 6


def test_cli_disk_full_is_one_line_and_leaves_nothing(tok, small_fs):
    out = small_fs / "m"  # a model whose first checkpoint (about 1.2 MB) cannot fit in 1 MiB
    r = run_igpt("train", tok, "-o", out, "--depth", "2", "--width", "64", "--heads", "2", "--steps", "2",
                 "--batch-size", "4", "--quiet")
    assert_clean_failure(r, "no space left on device")
    assert f"{out / STATE_FILE}: no space left on device (writing the checkpoint of step 2; nothing was saved yet)" \
        in r.stderr
    assert os.listdir(small_fs) == []  # no directory, no temp file, no lock file


# --- stdout is the result, stderr the progress ---------------------------------------------------
def test_stdout_is_exactly_one_json_document_and_log_lines_go_to_stderr(tmp_path, tok):
    r = run_igpt("train", tok, "-o", tmp_path / "m", *TINY_FLAGS, "--steps", "6", "--eval-every", "2",
                 env={"COLUMNS": "40"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1 and json.loads(r.stdout)["steps"] == 6  # `igpt train … 2>/dev/null | jq`
    records = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    assert [rec["step"] for rec in records] == [2, 4, 6]  # one line each, even 40 columns wide


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_log_lines_stay_whole_on_a_narrow_terminal(tmp_path, tok):
    """stderr a 40-column terminal (progress bar drawn): every JSON log line is still one line."""
    import fcntl
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 40, 0, 0))
    args = ["train", tok, "-o", tmp_path / "m", *TINY_FLAGS, "--steps", "6", "--eval-every", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "igpt_cli", *map(str, args)], cwd=ROOT,
                            env=dict(ENV, COLUMNS="40", TERM="xterm"), stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    chunks, deadline = [], time.time() + 120
    while time.time() < deadline:
        if not select.select([master], [], [], 1)[0]:
            if proc.poll() is not None:
                break
            continue
        try:
            b = os.read(master, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not b:
            break
        chunks.append(b)
    os.close(master)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert json.loads(stdout)["steps"] == 6
    text = ANSI.sub("", b"".join(chunks).decode(errors="replace"))
    pieces = [p.strip() for line in text.split("\n") for p in line.split("\r")]
    records = [json.loads(p) for p in pieces if p.startswith('{"step"')]
    assert [rec["step"] for rec in records] == [2, 4, 6], text
