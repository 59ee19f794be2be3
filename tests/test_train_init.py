"""`igpt train --init MODEL`: continue pretraining a model igpt can open (issue 19)."""
import json

import numpy as np
import pytest

from igpt_cli.errors import ParameterError
from igpt_cli.model import IGPT, IGPTConfig, read_config, save_pretrained
from igpt_cli.model.resolve import BUNDLED
from igpt_cli.train import TrainConfig, pretrain
from igpt_cli.train.watch import read_metrics

from helpers import assert_clean_failure, invoke, make_tokens

SHIPPED = BUNDLED["igpt-cifar8"]


@pytest.fixture(scope="module")
def cifar8(tmp_path_factory):
    """17 real CIFAR-10 images (the shipped demo subset) at 8x8 in the shipped model's palette."""
    d = tmp_path_factory.mktemp("init")
    tok = d / "t.h5"
    r = invoke("quantize", SHIPPED.parent / "demo-cifar10.tar", "--size", "8", "--palette", SHIPPED,
                 "--limit", "17", "-o", tok, "--quiet")
    assert r.returncode == 0, r.stderr
    return tok


def test_init_starts_at_the_shipped_models_loss(tmp_path, cifar8):
    score = invoke("score", cifar8, "-m", "igpt-cifar8", "--dtype", "float32", "--quiet", "--json")
    assert score.returncode == 0, score.stderr
    nats = json.loads(score.stdout)["nats_per_token"]
    out = tmp_path / "cont"
    # one step on a batch of all 17 images, unflipped: its loss is the model's loss on exactly those rows
    r = invoke("train", cifar8, "--init", "igpt-cifar8", "-o", out, "--steps", "2", "--batch-size", "17",
                 "--no-flip", "--log-every", "1", "--lr", "1e-4", "--warmup", "0", "--dtype", "float32", "--quiet")
    assert r.returncode == 0, r.stderr
    first = read_metrics(out / "metrics.jsonl")[0]
    assert first["step"] == 1 and first["loss"] == pytest.approx(nats, abs=1e-5)
    assert nats < np.log(512) - 2  # a trained model's loss, not a fresh model's ln 512
    assert json.loads(r.stdout)["init"] == "igpt-cifar8"
    assert read_config(out) == read_config(SHIPPED)  # the architecture came from the model
    assert json.loads((out / "train_meta.json").read_text())["init"] == "igpt-cifar8"


def test_conflicting_architecture_flags_are_refused(tmp_path, cifar8):
    r = invoke("train", cifar8, "--init", "igpt-cifar8", "-o", tmp_path / "m", "--steps", "1", "--depth", "4")
    assert_clean_failure(r, "--depth 4: conflicts with the model igpt-cifar8 (--depth 8)", out=tmp_path / "m")
    # the model's own values are no conflict
    res = pretrain(cifar8, tmp_path / "same", {"steps": 1, "batch_size": 4, "n_layer": 8, "n_embd": 192},
                   init="igpt-cifar8", dtype="float32")
    assert res.n_params == IGPT(read_config(SHIPPED)).num_params()


def test_bert_models_other_palettes_and_sizes_are_refused(tmp_path, cifar8):
    bert = tmp_path / "bert"
    save_pretrained(IGPT(IGPTConfig(vocab_size=513, n_positions=64, n_embd=16, n_layer=1, n_head=2,
                                    objective="bert")), bert)
    r = invoke("train", cifar8, "--init", bert, "-o", tmp_path / "m", "--steps", "1")
    assert_clean_failure(r, "is a BERT-objective model", out=tmp_path / "m")
    pal16 = np.random.default_rng(5).uniform(-1, 1, (16, 3)).astype(np.float32)
    other = make_tokens(tmp_path / "p.h5", 8, 8, palette=pal16)
    r = invoke("train", other, "--init", "igpt-cifar8", "-o", tmp_path / "m", "--steps", "1")
    assert_clean_failure(r, "is not the model's (512 colours of igpt-cifar8); quantize with --palette",
                         out=tmp_path / "m")
    palette = np.asarray(json.loads((SHIPPED / "preprocessor_config.json").read_text())["clusters"], np.float32)
    small = make_tokens(tmp_path / "s.h5", 8, 4, palette=palette)
    r = invoke("train", small, "--init", "igpt-cifar8", "-o", tmp_path / "m", "--steps", "1")
    assert_clean_failure(r, "images are 4x4 but the model igpt-cifar8 takes 8x8 images", out=tmp_path / "m")


def test_a_resumed_run_keeps_its_own_start(tmp_path, cifar8):
    out = tmp_path / "m"
    pretrain(cifar8, out, {"steps": 1, "batch_size": 4}, init="igpt-cifar8", dtype="float32")
    with pytest.raises(ParameterError, match="n_embd=256: conflicts"):  # a TrainConfig gives every field
        pretrain(cifar8, tmp_path / "m2", TrainConfig(steps=1), init="igpt-cifar8")
    r = invoke("train", cifar8, "-o", out, "--resume", "--init", str(SHIPPED), "--steps", "2")
    assert_clean_failure(r, "--init")
    assert "this run started from igpt-cifar8" in r.stderr
    r = invoke("train", cifar8, "-o", out, "--resume", "--init", "igpt-cifar8", "--steps", "2", "--quiet")
    assert r.returncode == 0, r.stderr


def test_training_into_the_model_it_starts_from_is_refused(tmp_path, cifar8):
    model = tmp_path / "model"
    save_pretrained(IGPT(read_config(SHIPPED)), model)
    r = invoke("train", cifar8, "--init", model, "-o", model, "--steps", "1")
    assert_clean_failure(r, "would overwrite the input init")
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]
