"""Training you can watch: OUT/metrics.jsonl, OUT/loss.png, TensorBoard only when installed."""
import importlib.util
import json

import numpy as np
import pytest

from igpt_cli.cli.plots import write_loss_plot
from igpt_cli.train import TrainConfig, pretrain
from igpt_cli.train.watch import read_metrics

from helpers import make_tokens

PAL16 = np.random.default_rng(5).uniform(-1, 1, (16, 3)).astype(np.float32)
TINY = dict(n_layer=1, n_embd=16, n_head=2, batch_size=4, lr=1e-2, warmup_steps=2, eval_every=3, checkpoint_every=3,
            log_every=1)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def tok(tmp_path):
    return make_tokens(tmp_path / "t.h5", 32, 4, palette=PAL16)


def test_every_logged_step_is_one_line_and_the_plot_is_drawn(tmp_path, tok):
    val = make_tokens(tmp_path / "v.h5", 9, 4, palette=PAL16, seed=1)
    res = pretrain(tok, tmp_path / "m", TrainConfig(steps=7, **{**TINY, "log_every": 2}), val_tokens=val,
                   dtype="float32", draw_loss=write_loss_plot)
    recs = read_metrics(tmp_path / "m" / "metrics.jsonl")
    assert [r["step"] for r in recs] == [2, 3, 4, 6, 7]  # every 2 steps, every evaluation, the last step
    assert all(set(r) >= {"step", "loss", "lr", "tokens_per_s"} and r["tokens_per_s"] > 0 for r in recs)
    assert [r["step"] for r in recs if "val_loss" in r] == [3, 6, 7]
    meta = json.loads((tmp_path / "m" / "train_meta.json").read_text())
    assert [h["val_loss"] for h in meta["history"]] == pytest.approx([r["val_loss"] for r in recs if "val_loss" in r],
                                                                      abs=1e-5)
    assert res.val_loss == pytest.approx(recs[-1]["val_loss"], abs=1e-5)
    assert (tmp_path / "m" / "loss.png").read_bytes().startswith(PNG)
    # TensorBoard event files exactly when the package is there (the `tensorboard` extra)
    has_tb = importlib.util.find_spec("tensorboard") is not None
    assert (tmp_path / "m" / "tensorboard").is_dir() == has_tb


def test_a_resumed_run_drops_the_lines_past_its_checkpoint(tmp_path, tok):
    cfg = TrainConfig(steps=9, **TINY)
    pretrain(tok, tmp_path / "full", cfg, dtype="float32")

    def stop_at_3(ev):
        if ev.task == "train" and ev.done == 3 and not ev.started:
            raise KeyboardInterrupt

    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        pretrain(tok, cut, cfg, dtype="float32", on_progress=stop_at_3, draw_loss=write_loss_plot)
    # what a kill -9 after step 5 was logged leaves: lines past the checkpoint, the last one cut short
    with open(cut / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 4, "loss": 9.0, "lr": 0.01, "tokens_per_s": 1.0}\n{"step": 5, "lo')
    (cut / "loss.png").unlink()
    pretrain(tok, cut, resume=True, draw_loss=write_loss_plot)
    full, got = read_metrics(tmp_path / "full" / "metrics.jsonl"), read_metrics(cut / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 10))  # no step twice, none missing
    assert [r["loss"] for r in got] == [r["loss"] for r in full]  # the resumed lines are the run's own
    assert (cut / "metrics.jsonl").read_text().count("\n") == 9
    assert (cut / "loss.png").read_bytes().startswith(PNG)


def test_a_new_run_into_a_directory_left_by_a_run_that_saved_nothing_starts_a_new_log(tmp_path, tok):
    out = tmp_path / "m"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 7, "loss": 1.0}\n')
    pretrain(tok, out, TrainConfig(steps=2, **TINY), dtype="float32")
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_logs(tmp_path, tok):
    cfg = TrainConfig(steps=40, **{**TINY, "lr": 1e12, "warmup_steps": 0, "grad_clip": float("inf"),
                                   "checkpoint_every": 100})
    with pytest.raises(Exception, match="diverged"):
        pretrain(tok, tmp_path / "m", cfg, dtype="float32")
    assert not (tmp_path / "m").exists()


def test_the_library_draws_nothing_unless_given_a_drawer(tmp_path, tok):
    pretrain(tok, tmp_path / "m", TrainConfig(steps=3, **TINY), dtype="float32")
    assert (tmp_path / "m" / "metrics.jsonl").is_file() and not (tmp_path / "m" / "loss.png").exists()
