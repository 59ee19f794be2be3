"""`save_every` / `save_at`: the model of those steps kept as OUT/step-NNNNNN (a series for `igpt sweep`)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from igpt_cli.model import load_pretrained
from igpt_cli.train import TrainConfig, pretrain
import igpt_cli.train.loop as loop

from helpers import assert_clean_failure, invoke, make_tokens

TINY = dict(n_layer=2, n_embd=32, n_head=2, batch_size=8, lr=1e-2, warmup_steps=1, eval_every=2, checkpoint_every=3)


@pytest.fixture
def tok(tmp_path):
    return make_tokens(tmp_path / "t.h5", 48, 4, high=16)


def tensors(d):
    return load_file(d / "model.safetensors")


def same_weights(a, b) -> bool:
    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def stop_after(step):
    def on_progress(ev):
        if ev.task == "train" and ev.done == step and not ev.started:
            raise KeyboardInterrupt
    return on_progress


def test_kept_models_are_the_runs_model_at_that_step_and_load_in_transformers(tmp_path, tok):
    from transformers import ImageGPTForCausalImageModeling

    out = tmp_path / "run"
    res = pretrain(tok, out, TrainConfig(steps=6, save_every=4, save_at=(1, 2), **TINY), dtype="float32")
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000001", "step-000002", "step-000004"]
    assert res.kept == [str(out / p) for p in ("step-000001", "step-000002", "step-000004")]
    assert not list(out.glob(".step-*"))
    # the model of step 2 of the same run: a copy stopped (Ctrl-C saves) right after step 2
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        pretrain(tok, cut, TrainConfig(steps=6, **TINY), dtype="float32", on_progress=stop_after(2))
    assert json.loads((cut / "train_meta.json").read_text())["step"] == 2
    assert same_weights(out / "step-000002", cut)
    assert not same_weights(out / "step-000004", cut)
    meta = json.loads((out / "step-000004" / "train_meta.json").read_text())
    assert meta["step"] == 4 and [h["step"] for h in meta["history"]] == [2, 4]
    idx = torch.randint(0, 16, (3, 16))
    ours = load_pretrained(out / "step-000004").eval()
    hf = ImageGPTForCausalImageModeling.from_pretrained(out / "step-000004").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(input_ids=idx).logits, rtol=1e-4, atol=1e-4)


def test_resume_keeps_the_series_and_extends_it(tmp_path, tok):
    ref = tmp_path / "ref"
    pretrain(tok, ref, TrainConfig(steps=8, save_at=(2, 5, 8), **TINY), dtype="float32")
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        pretrain(tok, cut, TrainConfig(steps=8, save_at=(2, 5), **TINY), dtype="float32", on_progress=stop_after(3))
    assert [p.name for p in cut.glob("step-*")] == ["step-000002"]
    before = (cut / "step-000002" / "model.safetensors").stat().st_mtime_ns
    pretrain(tok, cut, {"save_at": (2, 5, 8)}, resume=True)  # a resumed run may keep more
    assert sorted(p.name for p in cut.glob("step-*")) == ["step-000002", "step-000005", "step-000008"]
    assert (cut / "step-000002" / "model.safetensors").stat().st_mtime_ns == before  # kept, not rewritten
    for name in ("step-000002", "step-000005", "step-000008"):
        assert same_weights(ref / name, cut / name), name


def test_a_run_killed_while_keeping_a_model_keeps_it_on_resume(tmp_path, tok, monkeypatch):
    out = tmp_path / "run"
    real = loop.keep_model

    def killed_at_3(final, model, data, step, history, *objective):
        if step == 3:
            raise SystemExit(137)  # a hard stop in the middle of keeping: no Ctrl-C save
        return real(final, model, data, step, history, *objective)

    monkeypatch.setattr(loop, "keep_model", killed_at_3)
    with pytest.raises(SystemExit):
        pretrain(tok, out, TrainConfig(steps=4, save_at=(3,), **dict(TINY, checkpoint_every=1)), dtype="float32")
    assert json.loads((out / "train_meta.json").read_text())["step"] == 2  # the state is not past the kept step
    monkeypatch.setattr(loop, "keep_model", real)
    pretrain(tok, out, None, resume=True)
    ref = tmp_path / "ref"
    pretrain(tok, ref, TrainConfig(steps=4, save_at=(3,), **dict(TINY, checkpoint_every=1)), dtype="float32")
    assert same_weights(ref / "step-000003", out / "step-000003")


@pytest.mark.parametrize("flags, needle", [
    (["--save-at", "0"], "--save-at"),
    (["--save-at", "50,x"], "--save-at"),
    (["--save-at", "5,5"], "--save-at"),
    (["--save-every", "0"], "--save-every"),
])
def test_bad_keeping_values_are_one_line(tmp_path, tok, flags, needle):
    out = tmp_path / "m"
    r = invoke("train", tok, "-o", out, "--steps", "2", "--depth", "1", "--width", "16", "--heads", "2", *flags)
    assert_clean_failure(r, needle, out=out)
