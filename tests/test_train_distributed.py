"""`igpt train` data-parallel under torchrun (gloo on the CPU): 1 process and 2 ranks train the same
model, a killed rank's run resumes, ranks must agree on their flags, the global batch must split."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import rank_pid
from igpt_cli.cli.plots import write_loss_plot
from igpt_cli.model import load_pretrained
from igpt_cli.train import TrainConfig, pretrain
from igpt_cli.train.watch import read_metrics

from helpers import ENV, assert_clean_failure, invoke, make_tokens

TORCHRUN = Path(sys.executable).with_name("torchrun")
PAL16 = np.random.default_rng(5).uniform(-1, 1, (16, 3)).astype(np.float32)
ARCH = dict(n_layer=2, n_embd=32, n_head=4)
# the same run as flags and as a TrainConfig: 37 training images (odd), 11 validation images
SETTINGS = dict(ARCH, batch_size=8, lr=1e-2, warmup_steps=2, checkpoint_every=2, eval_every=3, log_every=1)
FLAGS = ["--depth", "2", "--width", "32", "--heads", "4", "--batch-size", "8", "--lr", "1e-2", "--warmup", "2",
         "--checkpoint-every", "2", "--eval-every", "3", "--log-every", "1", "--dtype", "float32", "--quiet"]
STEPS = 12


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    tokens = make_tokens(d / "t.h5", 37, 4, palette=PAL16)
    val = make_tokens(d / "v.h5", 11, 4, palette=PAL16, seed=1)
    ref = d / "one"
    r = invoke("train", tokens, "--val", val, "-o", ref, *FLAGS, "--steps", STEPS)
    assert r.returncode == 0, r.stderr
    return dict(dir=d, tokens=tokens, val=val, ref=ref)


def torchrun(k: int, *args, **kw) -> subprocess.Popen | subprocess.CompletedProcess:
    cmd = [str(TORCHRUN), "--standalone", f"--nproc-per-node={k}", "-m", "igpt_cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600, **kw)


def assert_same_run(a: Path, b: Path, tol: float = 1e-4) -> None:
    """Per-step losses and validation losses within `tol`, final weights within `tol` relative."""
    ma, mb = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    for ra, rb in zip(ma, mb):
        assert abs(ra["loss"] - rb["loss"]) < tol, (ra, rb)
        assert ("val_loss" in ra) == ("val_loss" in rb)
        assert abs(ra.get("val_loss", 0) - rb.get("val_loss", 0)) < tol, (ra, rb)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        x, y = wa[k], wb[k]
        if k.endswith("attn.c_attn.bias"):
            # The key bias adds q·b_k to every score of a query: softmax cancels it, its true gradient
            # is exactly 0, and Adam turns the rounding noise of that 0 into steps (~1e-5 here).
            # It changes no output (the logits are compared below); the query and value biases count.
            c = x.numel() // 3
            x, y = torch.cat([x[:c], x[2 * c:]]), torch.cat([y[:c], y[2 * c:]])
        assert float((x - y).norm() / x.norm()) < tol, k
    idx = torch.from_numpy(np.random.default_rng(0).integers(0, 16, (5, 16)))
    with torch.no_grad():
        la, lb = load_pretrained(a)(idx), load_pretrained(b)(idx)
    assert float((la - lb).abs().max()) < tol
    assert (b / "loss.png").stat().st_size > 0


def test_two_ranks_train_the_model_one_process_trains(data):
    out = data["dir"] / "two"
    r = torchrun(2, "train", data["tokens"], "--val", data["val"], "-o", out, *FLAGS, "--steps", STEPS)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)  # one JSON document: rank 0's
    assert result["world_size"] == 2 and result["steps"] == STEPS
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == list(range(1, STEPS + 1))
    # the weights moved: a comparison of two untrained models would prove nothing
    w0 = load_file(data["ref"] / "model.safetensors")["transformer.h.0.mlp.c_fc.weight"]
    assert float(w0.std()) != pytest.approx(0.02, abs=1e-3)
    assert_same_run(data["ref"], out)
    assert json.loads((out / "train_meta.json").read_text())["world_size"] == 2


def test_grad_accum_takes_the_full_batch_step(data):
    out = data["dir"] / "accum"
    res = pretrain(data["tokens"], out, TrainConfig(steps=STEPS, **SETTINGS), val_tokens=data["val"],
                   dtype="float32", grad_accum=2, draw_loss=write_loss_plot)
    assert res.steps == STEPS
    assert_same_run(data["ref"], out)


def test_a_run_stopped_on_one_process_resumes_on_two_ranks(data):
    out = data["dir"] / "one-then-two"

    def stop_at_4(ev):
        if ev.task == "train" and ev.done == 4 and not ev.started:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(data["tokens"], out, TrainConfig(steps=STEPS, **SETTINGS), val_tokens=data["val"],
                 dtype="float32", on_progress=stop_at_4)
    r = torchrun(2, "train", data["tokens"], "-o", out, "--resume", "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["resumed_from"] == 4
    assert_same_run(data["ref"], out)  # no step twice in metrics.jsonl, the same weights


def test_a_two_rank_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_run(data):
    steps, flags = 80, [*FLAGS, "--checkpoint-every", "5", "--log-every", "5", "--eval-every", "40"]
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node=2", "-m", "igpt_cli", "train", str(data["tokens"]),
           "--steps", str(steps), *flags, "-o"]
    ref, out = data["dir"] / "long-ref", data["dir"] / "long-cut"
    r = subprocess.run([*cmd, str(ref)], capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    launcher = subprocess.Popen([*cmd, str(out)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, killed = time.time() + 300, False
    while launcher.poll() is None and time.time() < deadline:
        if (out / "train_meta.json").exists():  # rank 0 wrote a checkpoint: kill -9 rank 1
            pid = rank_pid(launcher.pid, 1)
            if pid:
                os.kill(pid, signal.SIGKILL)
                killed = True
                break
        time.sleep(0.01)
    launcher.communicate(timeout=300)
    assert killed and launcher.returncode != 0, "the run finished before a rank could be killed"
    done = json.loads((out / "train_meta.json").read_text())["step"]
    assert 0 < done < steps
    r = subprocess.run([*cmd, str(out), "--resume"], capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["resumed_from"] == done
    assert_same_run(ref, out)
    # the same ranks sum in the same order: on the CPU the resumed run is the uninterrupted one, bit for bit
    assert (ref / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ranks_started_with_other_flags_stop_with_one_line(data):
    out = data["dir"] / "mixed"
    env = dict(ENV, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), IGPT_DIST_TIMEOUT="60")
    procs = [subprocess.Popen([sys.executable, "-m", "igpt_cli", "train", str(data["tokens"]), "-o", str(out),
                               *FLAGS, "--steps", "4", "--lr", lr], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r, lr in ((0, "1e-2"), (1, "5e-3"))]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [2, 2]
    lines = [line for _, err in outs for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert "rank 1 of 2 runs with other training flags than rank 0" in lines[0] and "lr" in lines[0]
    assert not out.exists() and all(o == "" for o, _ in outs)


def test_a_batch_that_does_not_split_is_one_line_before_the_rendezvous(data, monkeypatch):
    out = data["dir"] / "nosplit"
    cases = [(0, ["--batch-size", "7"], "--batch-size 7: must be a multiple of the world size 2"),
             (0, ["--grad-accum", "3"], "--grad-accum 3: must divide the 4 images of each of 2 ranks into equal "
                                        "micro-batches"),
             (1, ["--grad-accum", "3"], "")]  # every rank fails alike, without waiting; only rank 0 speaks
    for rank, extra, needle in cases:
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", str(rank))
        r = invoke("train", data["tokens"], "-o", out, *FLAGS, "--steps", "2", *extra)
        if needle:
            assert_clean_failure(r, needle, out=out)
        else:
            assert r.returncode == 2 and r.stderr == "" and r.stdout == ""
    for k in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(k)
    r = invoke("train", data["tokens"], "-o", out, *FLAGS, "--steps", "2", "--grad-accum", "3")
    assert_clean_failure(r, "--grad-accum 3: must divide the batch of 8 images into equal micro-batches", out=out)
