"""`resume`: hostile, damaged or foreign states, other settings, other tokens (issue 10, cases 6 and 7)."""
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from igpt_cli.errors import InputError, ParameterError
from igpt_cli.train import STATE_FILE, TrainConfig, pretrain
from igpt_cli.train.state import read_state

from helpers import assert_clean_failure, make_tokens, run_igpt

PAL16 = np.random.default_rng(5).uniform(-1, 1, (16, 3)).astype(np.float32)
TINY = dict(n_layer=1, n_embd=16, n_head=2, batch_size=4, lr=1e-2, warmup_steps=2, eval_every=3, checkpoint_every=3)


@pytest.fixture
def tok(tmp_path):
    return make_tokens(tmp_path / "t.h5", 32, 4, palette=PAL16)


def interrupt_at(step):
    def on_progress(ev):  # Ctrl-C right after `step`'s log line
        if ev.message and json.loads(ev.message)["step"] == step:
            raise KeyboardInterrupt
    return on_progress


def cut_run(tok, out, steps=9, at=3, **kw):
    with pytest.raises(KeyboardInterrupt):
        pretrain(tok, out, TrainConfig(steps=steps, **TINY), dtype="float32", on_progress=interrupt_at(at), **kw)
    return out


def weights(out: Path) -> bytes:
    return (out / "model.safetensors").read_bytes()


# --- a state igpt cannot resume -------------------------------------------------------------------
class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_hostile_states_are_refused_without_running_anything(tmp_path, tok):
    marker = tmp_path / "pwned"
    for how in ("torch", "pickle"):
        out = tmp_path / how
        out.mkdir()
        if how == "torch":
            torch.save({"model": Evil(marker)}, out / STATE_FILE)
        else:
            (out / STATE_FILE).write_bytes(pickle.dumps(Evil(marker)))
        with pytest.raises(InputError) as e:
            pretrain(tok, out, resume=True)
        msg = str(e.value)
        assert msg.startswith(str(out / STATE_FILE)) and "nothing in it was run" in msg and "\n" not in msg
        assert "weights_only" not in msg  # no advice to load it unsafely
        r = run_igpt("train", tok, "-o", out, "--resume")
        assert_clean_failure(r, "refused")
    assert not marker.exists()


def _state(tmp_path, tok) -> dict:
    cut_run(tok, tmp_path / "good")
    return torch.load(tmp_path / "good" / STATE_FILE, weights_only=True)


def _bad_states(good: dict):
    yield "truncated", None, "unreadable"
    yield "a list", [1, 2], "holds a list, not a dict"
    yield "missing keys", {k: v for k, v in good.items() if k not in ("optimizer", "step")}, "missing optimizer, step"
    yield "wrong types", {**good, "step": "3", "history": 5}, "wrong type of step, history"
    yield "foreign format", {**good, "format": "something-else"}, "format 'something-else'"
    yield "newer version", {**good, "format_version": 99}, "newer than this igpt reads"
    cfg = json.loads(good["train_config"])
    yield "bad setting", {**good, "train_config": json.dumps({**cfg, "lr": float("nan")})}, "lr=nan"
    yield "unknown setting", {**good, "train_config": json.dumps({**cfg, "depth": 3})}, "unknown TrainConfig field"
    yield "not json", {**good, "model_config": "{oops"}, "bad settings"
    mc = json.loads(good["model_config"])
    yield "config mismatch", {**good, "model_config": json.dumps({**mc, "n_layer": 2})}, "does not match"
    yield "huge model", {**good, "model_config": json.dumps({**mc, "n_embd": 2**20, "n_head": 1}),
                         "train_config": json.dumps({**cfg, "n_embd": 2**20, "n_head": 1})}, "GiB"
    shrunk = {k: (v[:1] if k == "wte.weight" else v) for k, v in good["model"].items()}
    yield "wrong weights", {**good, "model": shrunk}, "do not fit the model"
    opt = {**good["optimizer"], "state": {k: {**s, "exp_avg": torch.zeros(3)}
                                          for k, s in good["optimizer"]["state"].items()}}
    yield "wrong optimizer", {**good, "optimizer": opt}, "optimizer state exp_avg does not fit"
    yield "bad dtype", {**good, "compute_dtype": "int8"}, "compute_dtype 'int8'"


def test_damaged_or_foreign_states_are_one_line_naming_the_file(tmp_path, tok):
    good = _state(tmp_path, tok)
    raw = (tmp_path / "good" / STATE_FILE).read_bytes()
    for i, (name, content, needle) in enumerate(_bad_states(good)):
        out = tmp_path / f"bad{i}"
        out.mkdir()
        if content is None:
            (out / STATE_FILE).write_bytes(raw[:len(raw) // 2])
        else:
            torch.save(content, out / STATE_FILE)
        with pytest.raises(InputError) as e:
            pretrain(tok, out, resume=True, dtype="float32")
        msg = str(e.value)
        assert msg.startswith(str(out / STATE_FILE)) and needle in msg and "\n" not in msg, (name, msg)
        assert sorted(os.listdir(out)) == [STATE_FILE], name  # nothing written next to it
    r = run_igpt("train", tok, "-o", tmp_path / "bad0", "--resume")
    assert_clean_failure(r, "unreadable")


def test_a_version_1_state_still_resumes_bit_for_bit(tmp_path, tok):
    pretrain(tok, tmp_path / "full", TrainConfig(steps=9, **TINY), dtype="float32")
    cut = cut_run(tok, tmp_path / "cut")
    state = torch.load(cut / STATE_FILE, weights_only=True)
    v1 = {k: state[k] for k in ("model", "model_config", "optimizer", "step", "train_config", "compute_dtype",
                                "history")}
    torch.save(v1, cut / STATE_FILE)
    assert read_state(cut / STATE_FILE).version == 1
    pretrain(tok, cut, resume=True)
    assert weights(cut) == weights(tmp_path / "full")
    assert read_state(cut / STATE_FILE).version == 2  # rewritten in the current format


def test_a_run_killed_while_writing_its_model_files_resumes_from_its_state(tmp_path, tok):
    pretrain(tok, tmp_path / "full", TrainConfig(steps=9, **TINY), dtype="float32")
    cut = cut_run(tok, tmp_path / "cut")
    for name in ("model.safetensors", "config.json", "train_meta.json"):  # the state is written first
        (cut / name).unlink()
    (cut / ".model.safetensors.tmp").write_bytes(b"half")
    pretrain(tok, cut, resume=True)
    assert weights(cut) == weights(tmp_path / "full")
    assert not (cut / ".model.safetensors.tmp").exists()


def test_training_into_the_current_directory(tmp_path, tok, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert pretrain(tok, ".", TrainConfig(steps=2, **TINY)).model_dir == "."
    assert (work / STATE_FILE).exists() and not (tmp_path / ".work.lock").exists()
    with pytest.raises(InputError, match="cannot train into the root directory"):
        pretrain(tok, "/", TrainConfig(steps=2, **TINY))


def test_output_path_that_is_a_file_or_a_model_is_refused(tmp_path, tok):
    cfg = TrainConfig(steps=1, **TINY)
    for resume in (False, True):
        with pytest.raises(InputError, match="exists and is not a directory"):
            pretrain(tok, tok, cfg, resume=resume)
    r = run_igpt("train", tok, "-o", tok, "--steps", "1")
    assert_clean_failure(r, "t.h5: exists and is not a directory")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(InputError, match=r"holds a model already \(config.json\)"):
        pretrain(tok, model, cfg)
    assert sorted(os.listdir(model)) == ["config.json"]


# --- other settings, other tokens ----------------------------------------------------------------
def test_resume_with_other_settings_names_each_and_changes_nothing(tmp_path, tok):
    cut = cut_run(tok, tmp_path / "cut")
    before = (cut / STATE_FILE).read_bytes()
    with pytest.raises(InputError) as e:
        pretrain(tok, cut, {"steps": 6, "lr": 0.5, "n_layer": 4, "batch_size": 4}, resume=True)
    msg = str(e.value)
    for needle in ("n_layer=4 (the run's: 1)", "lr=0.5 (the run's: 0.01)", "steps=6 (the run's: 9 steps"):
        assert needle in msg, msg
    assert "batch_size" not in msg  # the same value is no difference
    with pytest.raises(InputError, match=r"n_head=8 \(the run's: 2\)"):  # a TrainConfig: every field compared
        pretrain(tok, cut, TrainConfig(steps=9, **{**TINY, "n_head": 8}), resume=True)
    assert (cut / STATE_FILE).read_bytes() == before


def test_resume_with_the_same_settings_given_is_the_same_run(tmp_path, tok):
    pretrain(tok, tmp_path / "full", TrainConfig(steps=9, **TINY), dtype="float32")
    cut = cut_run(tok, tmp_path / "cut")
    r = pretrain(tok, cut, TrainConfig(steps=9, **TINY), resume=True)
    assert r.resumed_from == 3 and r.to_dict()["resumed_from"] == 3
    assert weights(cut) == weights(tmp_path / "full")


def test_a_larger_steps_extends_the_run_on_the_original_schedule(tmp_path, tok):
    cfg = TrainConfig(steps=6, **TINY)
    pretrain(tok, tmp_path / "six", cfg, dtype="float32")
    cut_run(tok, tmp_path / "ext", steps=6, at=3)
    r = pretrain(tok, tmp_path / "ext", {"steps": 12}, resume=True)
    assert r.steps == 12
    hist = json.loads((tmp_path / "ext" / "train_meta.json").read_text())["history"]
    six = json.loads((tmp_path / "six" / "train_meta.json").read_text())["history"]
    assert [h["step"] for h in hist] == [3, 6, 9, 12]
    assert hist[:2] == [{**h, "seconds": hist[i]["seconds"]} for i, h in enumerate(six)]  # same first 6 steps
    floor = cfg.lr * cfg.min_lr_ratio
    assert hist[2]["lr"] == pytest.approx(floor) and hist[3]["lr"] == pytest.approx(floor)
    with pytest.raises(InputError, match=r"steps=9 \(the run's: 12 steps"):
        pretrain(tok, tmp_path / "ext", {"steps": 9}, resume=True)


def test_resume_refuses_other_tokens_and_other_validation_files(tmp_path, tok):
    val = make_tokens(tmp_path / "v.h5", 8, 4, palette=PAL16, seed=1)
    cut = cut_run(tok, tmp_path / "cut", val_tokens=val)
    other = make_tokens(tmp_path / "t2.h5", 32, 4, palette=PAL16, seed=9)  # same shape and palette
    with pytest.raises(InputError, match=r"t2.h5: not the tokens file this run was trained on \(its SHA-256"):
        pretrain(other, cut, resume=True)
    other_val = make_tokens(tmp_path / "v2.h5", 8, 4, palette=PAL16, seed=2)
    with pytest.raises(ParameterError, match="val_tokens=.*v2.h5.*not the validation file"):
        pretrain(tok, cut, resume=True, val_tokens=other_val)
    r = pretrain(tok, cut, resume=True)  # no val_tokens: the run's own, found by its recorded path
    assert r.val_loss is not None
    plain = cut_run(tok, tmp_path / "plain")
    with pytest.raises(ParameterError, match="this run has no validation file"):
        pretrain(tok, plain, resume=True, val_tokens=val)


def test_cli_resume_with_other_flags_names_each_flag(tmp_path, tok):
    cut = cut_run(tok, tmp_path / "cut", steps=100)
    r = run_igpt("train", tok, "-o", cut, "--resume", "--steps", "50", "--lr", "0.5", "--depth", "4")
    assert_clean_failure(r, "--lr 0.5 (the run's: 0.01)")
    for needle in ("--depth 4 (the run's: 1)", "--steps 50 (the run's: 100 steps"):
        assert needle in r.stderr, r.stderr
    assert "--batch-size" not in r.stderr and "--width" not in r.stderr  # flags not given are not compared
    r = run_igpt("train", tok, "-o", cut, "--resume", "--steps", "120", "--batch-size", "4", "--quiet")
    assert r.returncode == 0, r.stderr  # a larger --steps (and the run's own values) extend the run
    assert json.loads(r.stdout)["steps"] == 120 and json.loads(r.stdout)["resumed_from"] == 3


def test_a_state_written_before_val_images_and_log_every_still_resumes(tmp_path, tok):
    pretrain(tok, tmp_path / "full", TrainConfig(steps=9, **TINY), dtype="float32")
    cut = cut_run(tok, tmp_path / "cut")
    state = torch.load(cut / STATE_FILE, weights_only=True)
    cfg = json.loads(state["train_config"])
    cfg["eval_rows"] = cfg.pop("val_images")  # the settings of igpt before this change
    del cfg["log_every"]
    for k in ("world_size", "init"):
        del state[k]
    torch.save({**state, "train_config": json.dumps(cfg)}, cut / STATE_FILE)
    assert read_state(cut / STATE_FILE).cfg.val_images == TINY.get("val_images", 2000)
    pretrain(tok, cut, resume=True)
    assert weights(cut) == weights(tmp_path / "full")


def test_rerunning_resumes_by_default_and_restart_starts_anew(tmp_path, tok):
    """igpt train follows every resumable command: rerun resumes, --restart discards (only a run's files)."""
    from helpers import invoke

    out = tmp_path / "runs" / "tiny"  # its parent does not exist yet: created
    args = ["train", tok, "-o", out, "--depth", "1", "--width", "16", "--heads", "2", "--batch-size", "4",
            "--checkpoint-every", "2", "--eval-every", "2", "--dtype", "float32", "-q"]
    r = invoke(*args, "--steps", "2")
    assert r.returncode == 0, r.stderr
    assert "resumed_from" not in json.loads(r.stdout)
    r = invoke(*args, "--steps", "4")  # the same command with more steps: continues
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["resumed_from"] == 2 and read_state(out / STATE_FILE).step == 4
    r = invoke(*args, "--steps", "2", "--restart")
    assert r.returncode == 0, r.stderr
    assert "resumed_from" not in json.loads(r.stdout) and read_state(out / STATE_FILE).step == 2
    assert_clean_failure(invoke(*args, "--steps", "2", "--restart", "--resume"), "contradict")
    (out / "notes.txt").write_text("mine")
    r = invoke(*args, "--steps", "2", "--restart")
    assert_clean_failure(r, "notes.txt")
    assert (out / "notes.txt").read_text() == "mine" and read_state(out / STATE_FILE).step == 2
