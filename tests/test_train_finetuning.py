"""`igpt finetune` / `train.finetune`: the paper's fine-tuning (a linear head on the mean-pooled final
layer, classification + gen_weight × next-token loss) run by the trainer's loop; its directory is a
transformers `ImageGPTForImageClassification`; resume, 2 ranks, bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from igpt_cli import formats
from igpt_cli.model import IGPT, IGPTConfig, save_pretrained, sos_shift
from igpt_cli.model.classifier import load_classifier
from igpt_cli.train.finetuning import FinetuneObjective, finetune, predict_finetuned
from igpt_cli.train.loop import write_preprocessor_config
from igpt_cli.train.watch import read_metrics

from helpers import ENV, assert_clean_failure, invoke

TORCHRUN = Path(sys.executable).with_name("torchrun")
PAL16 = np.random.default_rng(5).uniform(-1, 1, (16, 3)).astype(np.float32)
SIDE = 4
SETTINGS = dict(batch_size=8, lr=1e-2, warmup_steps=2, eval_every=3, checkpoint_every=3, log_every=1)
FLAGS = ["--batch-size", "8", "--lr", "1e-2", "--warmup", "2", "--eval-every", "3", "--checkpoint-every", "3",
         "--log-every", "1", "--dtype", "float32", "--quiet"]


def class_tokens(path: Path, n: int, *, seed=0, side=SIDE, palette=PAL16, labels=True, names=("a", "b", "c")):
    """n images whose colours depend on their class (class c draws from colours 5c..5c+5): learnable."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    tokens = (5 * y[:, None] + rng.integers(0, 6, (n, side * side))).clip(0, len(palette) - 1)
    with h5py.File(path, "w") as f:
        formats.create_tokens_file(f, height=side, width=side, palette=palette, class_names=list(names),
                                   split="train", source="random", resize="none")
        formats.append_rows(f, tokens=tokens.astype(np.uint16), labels=y,
                            sources=np.array([f"img{i}.png" for i in range(n)], dtype=object))
        if not labels:
            del f["labels"]
    return path


def base_model(path: Path, objective="autoregressive", side=SIDE) -> Path:
    torch.manual_seed(0)
    m = IGPT(IGPTConfig(vocab_size=17, n_positions=side * side, n_embd=32, n_layer=2, n_head=4, objective=objective))
    save_pretrained(m, path)
    write_preprocessor_config(path, PAL16, side, side)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("ft")
    return dict(dir=d, train=class_tokens(d / "train.h5", 37), test=class_tokens(d / "test.h5", 15, seed=1),
                model=base_model(d / "base"))


@pytest.fixture(scope="module")
def run(data):
    """12 steps of the joint objective (gen_weight 1), through the command line."""
    out = data["dir"] / "ft"
    r = invoke("finetune", data["train"], "-m", data["model"], "--test", data["test"], "-o", out, *FLAGS,
               "--steps", 12)
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout)


def test_loss_falls_and_the_report_has_the_probe_schema(run):
    out, report = run
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert {"loss", "cls_loss", "gen_loss", "train_acc"} <= set(metrics[0])
    first, last = np.mean([m["cls_loss"] for m in metrics[:3]]), np.mean([m["cls_loss"] for m in metrics[-3:]])
    assert last < first - 0.2, (first, last)
    for m in metrics:  # the logged loss is the joint objective
        assert m["loss"] == pytest.approx(m["cls_loss"] + m["gen_loss"], abs=1e-5)
    assert json.loads((out / "report.json").read_text()) == report
    assert report["method"] == "finetune" and report["pool"] == "mean" and report["best_layer"] == 2
    (layer,) = report["layers"]
    assert layer["layer"] == 2 and layer["n_train"] == 37 and layer["n_test"] == 15
    lo, hi = layer["test_acc_ci"]
    assert lo <= layer["test_acc"] <= hi and layer["ci_method"] == "wilson"
    assert sum(map(sum, layer["confusion"])) == 15
    assert (out / "loss.png").stat().st_size > 0


def test_the_directory_loads_in_transformers_with_equal_logits(run, data):
    from transformers import ImageGPTForImageClassification

    out, report = run
    hf = ImageGPTForImageClassification.from_pretrained(out).eval()
    assert hf.config.id2label == {0: "a", 1: "b", 2: "c"} and hf.config.label2id == {"a": 0, "b": 1, "c": 2}
    assert hf.score.bias is None
    ours, names = load_classifier(out)
    assert names == ["a", "b", "c"]
    with h5py.File(data["test"]) as f:
        tokens, labels = f["tokens"][:].astype(np.int64), f["labels"][:]
    x = sos_shift(torch.from_numpy(tokens), ours.config.sos_token)
    with torch.no_grad():
        theirs = hf(input_ids=x).logits
        mine, _ = ours(x, generative=False)
    assert float((theirs - mine).abs().max()) < 1e-4
    pred = predict_finetuned(data["test"], out, device="cpu")
    assert pred.predictions == theirs.argmax(-1).tolist()
    assert np.allclose(pred.probabilities, torch.softmax(theirs, -1).numpy(), atol=1e-5)
    assert report["layers"][0]["test_acc"] == pytest.approx(float(np.mean(np.array(pred.predictions) == labels)))
    images = np.stack([(np.clip(PAL16[t].reshape(SIDE, SIDE, 3), -1, 1) + 1) * 127.5 for t in tokens]).round()
    assert predict_finetuned(images.astype(np.uint8), out, device="cpu").predictions == pred.predictions


def test_the_generative_term_is_igpts_score(data):
    from igpt_cli.generate.decode import score_images

    from igpt_cli.model import load_pretrained
    from igpt_cli.model.classifier import IGPTClassifier

    obj = FinetuneObjective(0.7, data["test"], data["model"], data["train"])
    torch.manual_seed(0)
    model = IGPTClassifier(load_pretrained(data["model"]).config, 3)
    model.transformer.load_state_dict(load_pretrained(data["model"]).state_dict())
    with h5py.File(data["train"]) as f:
        x, y = torch.from_numpy(f["tokens"][:8].astype(np.int64)), torch.from_numpy(f["labels"][:8].astype(np.int64))
    with torch.no_grad():
        loss, (cls, gen, acc) = obj.loss(model, (x, y), model.config.sos_token)
    assert float(gen) == pytest.approx(float(np.mean(score_images(x.numpy(), model.transformer, device="cpu",
                                                                  dtype="float32"))), abs=1e-5)
    assert float(loss) == pytest.approx(float(cls) + 0.7 * float(gen), abs=1e-5)


def test_gen_weight_zero_trains_another_model_with_the_next_token_head_frozen(run, data):
    out = data["dir"] / "cls-only"
    finetune(data["train"], data["model"], data["test"], out, dict(SETTINGS, steps=12), gen_weight=0,
             dtype="float32", device="cpu")
    joint, alone = load_file(run[0] / "model.safetensors"), load_file(out / "model.safetensors")
    assert joint.keys() == alone.keys() and "score.weight" in alone and "lm_head.weight" not in alone
    assert float((joint["score.weight"] - alone["score.weight"]).abs().max()) > 1e-3
    metrics = read_metrics(out / "metrics.jsonl")
    assert "gen_loss" not in metrics[0] and all(m["loss"] == pytest.approx(m["cls_loss"], abs=1e-6) for m in metrics)
    state = torch.load(out / "train_state.pt", weights_only=True)
    base = load_file(data["model"] / "model.safetensors")["lm_head.weight"]
    assert torch.equal(state["model"]["transformer.lm_head.weight"], base)  # frozen


def test_resume_equals_an_uninterrupted_run(run, data):
    out = data["dir"] / "cut"

    def stop_at_6(ev):
        if ev.message and json.loads(ev.message)["step"] == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(data["train"], data["model"], data["test"], out, dict(SETTINGS, steps=12), dtype="float32",
                 device="cpu", on_progress=stop_at_6)
    assert not (out / "report.json").exists()
    report = finetune(data["train"], data["model"], data["test"], out, None, resume=True, device="cpu")
    assert (out / "model.safetensors").read_bytes() == (run[0] / "model.safetensors").read_bytes()
    assert report.layers[0]["test_acc"] == run[1]["layers"][0]["test_acc"]
    # rerunning the command resumes by default (as train does): another objective is refused ...
    r = invoke("finetune", data["train"], "-m", data["model"], "--test", data["test"], "-o", out,
               "--gen-weight", "0", "--quiet")
    assert_clean_failure(r, "other objective settings")
    assert (out / "model.safetensors").read_bytes() == (run[0] / "model.safetensors").read_bytes()
    # ... and --restart discards the saved run and starts anew with the new flags
    r = invoke("finetune", data["train"], "-m", data["model"], "--test", data["test"], "-o", out, "--restart",
               "--gen-weight", "0", "--steps", "2", *FLAGS, "--quiet")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["training"]["steps"] == 2


def test_rerunning_a_finished_run_rewrites_nothing(run, data):
    # the same command again resumes a run that has nothing left to do: same report, no file touched
    out, report = run
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    r = invoke("finetune", data["train"], "-m", data["model"], "--test", data["test"], "-o", out, *FLAGS,
               "--steps", 12)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == report
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()} == before


def test_two_ranks_train_the_model_one_process_trains(run, data):
    out = data["dir"] / "two"
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node=2", "-m", "igpt_cli", "finetune", str(data["train"]),
           "-m", str(data["model"]), "--test", str(data["test"]), "-o", str(out), *FLAGS, "--steps", "12"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    assert report["layers"][0]["test_acc"] == run[1]["layers"][0]["test_acc"]
    assert report["training"]["world_size"] == 2
    for a, b in zip(read_metrics(run[0] / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4) and a["train_acc"] == b["train_acc"]
    one, two = load_file(run[0] / "model.safetensors"), load_file(out / "model.safetensors")
    for k in ("score.weight", "transformer.h.1.mlp.c_fc.weight", "transformer.wte.weight"):
        assert float((one[k] - two[k]).norm() / one[k].norm()) < 1e-4, k


def test_bad_input_is_one_line_and_writes_nothing(data, tmp_path):
    d = data["dir"]
    other_side = class_tokens(tmp_path / "8x8.h5", 9, side=8)
    other_palette = class_tokens(tmp_path / "pal.h5", 9, palette=PAL16[::-1].copy())
    out_of_range = class_tokens(tmp_path / "range.h5", 9)
    with h5py.File(out_of_range, "a") as f:
        f["labels"][0] = 7
    all_unlabelled = class_tokens(tmp_path / "minus1.h5", 9)  # -1: no label (sampled images, WebDataset without .cls)
    one_unlabelled = class_tokens(tmp_path / "one-minus1.h5", 9)
    with h5py.File(all_unlabelled, "a") as f, h5py.File(one_unlabelled, "a") as g:
        f["labels"][:] = -1
        g["labels"][3] = -1
    cases = [
        ((class_tokens(tmp_path / "nolab.h5", 9, labels=False), data["model"], data["test"]), "has no labels"),
        ((all_unlabelled, data["model"], data["test"]), "has no labels"),
        ((data["train"], data["model"], all_unlabelled), "has no labels"),
        ((one_unlabelled, data["model"], data["test"]), "1 of 9 images have no label (-1)"),
        ((data["train"], base_model(tmp_path / "bert", objective="bert"), data["test"]), "BERT-objective"),
        ((data["train"], data["model"], other_side), "8x8 tokens"),
        ((data["train"], data["model"], other_palette), "another palette"),
        ((data["train"], data["model"], out_of_range), "label 7 is out of range"),
        ((other_side, data["model"], other_side), "quantize at its size"),
        ((data["train"], data["model"], class_tokens(tmp_path / "names.h5", 9, names=("x", "y", "z"))),
         "are not the training file's"),
    ]
    for (train, model, test), said in cases:
        out = tmp_path / "out"
        r = invoke("finetune", train, "-m", model, "--test", test, "-o", out, "--steps", 2, "--quiet")
        assert_clean_failure(r, said)
        assert not out.exists(), said
    r = invoke("finetune", data["train"], "-m", data["model"], "--test", data["test"], "-o", tmp_path / "o",
               "--steps", 2, "--gen-weight", "-1", "--quiet")
    assert r.returncode == 2 and not (tmp_path / "o").exists()


def test_an_interrupt_says_how_to_resume(data, tmp_path, monkeypatch):
    # the checkpoint an interrupted fine-tuning run saved is resumed by rerunning the command (as
    # train's): the one line must say so, never "nothing was written"
    import igpt_cli.train.finetuning as finetuning

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetuning, "finetune", interrupted)
    r = invoke("finetune", data["train"], "-m", data["model"], "--test", data["test"], "-o", tmp_path / "o",
               "--steps", 2, "--quiet")
    assert r.returncode == 130 and "rerun" in r.stderr and "resume" in r.stderr
    assert "nothing was written" not in r.stderr


@pytest.mark.parametrize("command,name", [("train", "metrics.jsonl"), ("train", "loss.png"),
                                          ("finetune", "report.json"), ("finetune", "metrics.jsonl")])
def test_a_new_run_never_replaces_a_users_file_in_its_directory(data, tmp_path, command, name):
    # -o an existing directory of the user's: a file there named as one a run writes (its logs, the
    # fine-tuning report) is refused, not replaced; the directory is left as it was (the log of a
    # run that saved nothing is started anew: test_train_watch)
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_text("precious")
    (out / "notes.txt").write_text("mine")
    if command == "train":
        r = invoke("train", data["train"], "-o", out, "--steps", 1, "--depth", 1, "--width", 8, "--heads", 1,
                   "--batch-size", 4, "--quiet")
    else:
        r = invoke("finetune", data["train"], "-m", data["model"], "--test", data["test"], "-o", out, "--steps", 1,
                   "--batch-size", 4, "--quiet")
    assert_clean_failure(r, f"holds {name}")
    assert sorted(os.listdir(out)) == sorted([name, "notes.txt"]) and (out / name).read_text() == "precious"
