"""`igpt predict -m FINETUNED`: a fine-tuned model applied to tokens and to images (equal to the library's
`predict_finetuned`), the predictions file it shares with `--probes`, its bad input; and the result-row
schema every evaluation's report shares (probe, k-NN, few-shot, fine-tuning)."""
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from igpt_cli.model import IGPTConfig
from igpt_cli.model.classifier import IGPTClassifier, save_classifier
from igpt_cli.probe import RESULT_KEYS, probe_files
from igpt_cli.train.finetuning import finetune, predict_finetuned
from igpt_cli.train.loop import write_preprocessor_config

from helpers import assert_bad_input, assert_clean_failure, invoke
from test_probe_runner import make_data, write_features
from test_train_finetuning import PAL16, SETTINGS, SIDE, base_model, class_tokens

PREDICTION_DATASETS = {"pred", "pred_name", "probabilities", "classes", "labels", "sources"}


@pytest.fixture(scope="module")
def ft(tmp_path_factory):
    """A fine-tuned directory: 3 steps of the joint objective on 37 tiny labelled images (4x4, 16 colours)."""
    d = tmp_path_factory.mktemp("predict")
    train, test = class_tokens(d / "train.h5", 37), class_tokens(d / "test.h5", 15, seed=1)
    report = finetune(train, base_model(d / "base"), test, d / "ft", dict(SETTINGS, steps=3), device="cpu",
                      dtype="float32")
    return dict(dir=d, model=d / "ft", test=test, report=report)


def images_of(tokens: np.ndarray) -> np.ndarray:
    """uint8 RGB images whose pixels are the tokens' palette colours (quantizing them gives the tokens back)."""
    return np.stack([((np.clip(PAL16[t].reshape(SIDE, SIDE, 3), -1, 1) + 1) * 127.5).round()
                     for t in tokens]).astype(np.uint8)


def test_predict_model_on_tokens_equals_the_library_and_writes_the_probes_predictions_file(ft, tmp_path):
    lib = predict_finetuned(ft["test"], ft["model"], device="cpu")
    r = invoke("predict", ft["test"], "-m", ft["model"], "--json", "-q", "-b", "4", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    rows = d["predictions"]
    assert [x["class"] for x in rows] == lib.predictions and [x["name"] for x in rows] == lib.labels
    assert np.allclose([x["probabilities"] for x in rows], lib.probabilities, atol=1e-6)
    with h5py.File(ft["test"]) as f:
        labels, sources = f["labels"][:], f["sources"].asstr()[:]
    assert [x["label"] for x in rows] == labels.tolist() and [x["source"] for x in rows] == list(sources)
    acc = float(np.mean(np.array(lib.predictions) == labels))
    assert d["method"] == "finetune" and d["probes"] is None and d["n_known"] == 15
    assert d["accuracy"] == pytest.approx(acc) == pytest.approx(ft["report"].layers[0]["test_acc"])
    lo, hi = d["accuracy_interval"]
    assert lo <= acc <= hi

    out = tmp_path / "pred.h5"
    r = invoke("predict", ft["test"], "-m", ft["model"], "-o", out, "-q")
    assert r.returncode == 0 and r.stdout == "", r.stderr
    with h5py.File(out) as f:
        assert set(f) == PREDICTION_DATASETS and f.attrs["format"] == "igpt-predictions"
        assert f.attrs["method"] == "finetune" and f.attrs["model"] == str(ft["model"])
        assert f["pred"][:].tolist() == lib.predictions and list(f["sources"].asstr()[:]) == list(sources)
        assert json.loads(f.attrs["class_names"]) == lib.class_names == ["a", "b", "c"]
    r = invoke("predict", ft["test"], "-m", ft["model"], "-o", out, "-q")
    assert_clean_failure(r, "--overwrite")


def test_predict_model_on_an_image_folder(ft, tmp_path):
    """A class folder per class (and one of a class the model never saw): quantized at the model's size with
    its palette as `igpt quantize` reads them; the same classes as the library on the images themselves."""
    with h5py.File(ft["test"]) as f:
        tokens, labels = f["tokens"][:].astype(np.int64), f["labels"][:]
    images = images_of(tokens)
    root = tmp_path / "photos"
    for i, (im, y) in enumerate(zip(images, labels)):
        (root / "abc"[y]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(root / "abc"[y] / f"img{i:02d}.png")
    (root / "zebra").mkdir()
    Image.fromarray(images[0]).save(root / "zebra" / "img00.png")
    lib = predict_finetuned(images, ft["model"], device="cpu")
    r = invoke("predict", root, "-m", ft["model"], "--json", "-q", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    got = {x["source"]: x for x in d["predictions"]}
    for i, y in enumerate(labels):
        row = got[f"{'abc'[y]}/img{i:02d}.png"]
        assert row["class"] == lib.predictions[i] and row["label"] == y
        assert np.allclose(row["probabilities"], lib.probabilities[i], atol=1e-6)
    assert d["n"] == 16 and d["n_known"] == 15 and d["n_unseen"] == 1 and d["unseen_classes"] == ["zebra"]
    assert d["accuracy"] == pytest.approx(float(np.mean(np.array(lib.predictions) == labels)))
    one = invoke("predict", root / "a" / "img04.png", "-m", ft["model"], "--json", "-q")
    (row,) = json.loads(one.stdout)["predictions"]
    assert row["class"] == lib.predictions[4] and row["label"] == -1 and json.loads(one.stdout)["accuracy"] is None


def test_predict_refuses_bad_input_in_one_line(ft, tmp_path):
    out = tmp_path / "p.h5"
    for args, needle in ((["--probes", tmp_path / "x.h5", "-m", ft["model"]], "exactly one"), ([], "exactly one"),
                         (["-m", "igpt-cifar8"], "not a fine-tuned model"),
                         (["-m", ft["model"], "--layer", "1"], "--layer applies to --probes")):
        assert_bad_input(invoke("predict", ft["test"], *args, "-o", out), out, needle)
    other = class_tokens(tmp_path / "other.h5", 4, palette=PAL16[::-1].copy())
    assert_bad_input(invoke("predict", other, "-m", ft["model"], "-o", out), out, "another palette")
    big = class_tokens(tmp_path / "big.h5", 4, side=8)
    assert_bad_input(invoke("predict", big, "-m", ft["model"], "-o", out), out, "16 tokens per image")
    feats = write_features(tmp_path / "feats.h5", *make_data(6))
    assert_bad_input(invoke("predict", feats, "-m", ft["model"], "-o", out), out, "features file")
    torch.manual_seed(0)
    cfg = IGPTConfig(vocab_size=17, n_positions=SIDE * SIDE, n_embd=32, n_layer=1, n_head=4, objective="bert")
    save_classifier(IGPTClassifier(cfg, 3), tmp_path / "bert", ["a", "b", "c"])
    write_preprocessor_config(tmp_path / "bert", PAL16, SIDE, SIDE)
    assert_bad_input(invoke("predict", ft["test"], "-m", tmp_path / "bert", "-o", out), out, "BERT")
    r = invoke("predict", ft["test"], "-m", ft["model"], "-o", ft["test"], "--overwrite")
    assert_clean_failure(r, "would overwrite the input")
    assert h5py.is_hdf5(ft["test"])


def _check_row(row: dict, method: str) -> None:
    assert set(RESULT_KEYS) <= set(row), set(RESULT_KEYS) - set(row)
    assert row["method"] == method
    assert isinstance(row["layers"], list) and row["layers"] and all(type(l) is int for l in row["layers"])
    assert isinstance(row["pool"], str)
    assert (row["C"] is None) == (method != "linear") and (row["C"] is None or isinstance(row["C"], float))
    assert (row["k"] is None) == (method != "knn") and (row["k"] is None or type(row["k"]) is int)
    for key in ("n_train", "n_val", "n_test"):
        assert type(row[key]) is int and row[key] >= 0, key
    assert isinstance(row["accuracy"], float)
    lo, hi = row["accuracy_interval"]
    assert isinstance(lo, float) and isinstance(hi, float) and 0 <= lo <= row["accuracy"] <= hi <= 1


def test_probe_knn_fewshot_and_finetune_rows_share_one_schema(ft, tmp_path):
    train = write_features(tmp_path / "tr.h5", *make_data(60, layers=(0, 1)))
    test = write_features(tmp_path / "te.h5", *make_data(30, layers=(0, 1), seed=1))
    linear = probe_files(train, test, "1", shots=[2], seeds=2).to_dict()
    assert linear["method"] == "linear"
    (row,) = linear["layers"]
    _check_row(row, "linear")
    assert row["accuracy"] == row["test_acc"] and row["C"] == row["c"] and row["layers"] == [1]
    assert row["accuracy_interval"] == row["test_acc_ci"] and (row["n_train"], row["n_test"]) == (60, 30)
    (few,) = row["few_shot"]
    _check_row(few, "fewshot")
    assert few["n_train"] == 6 and few["accuracy"] == few["test_acc_mean"]
    concat = probe_files(train, test, "0,1", concat=True).to_dict()["layers"][0]
    _check_row(concat, "linear")
    assert concat["layers"] == [0, 1]
    knn = probe_files(train, test, method="knn", k=3).to_dict()
    for row in knn["layers"]:
        _check_row(row, "knn")
    (row,) = ft["report"].to_dict()["layers"]
    _check_row(row, "finetune")
    assert row["layers"] == [2] and row["n_train"] == 37 and row["n_test"] == 15 and row["pool"] == "mean"
    assert json.loads(Path(ft["model"] / "report.json").read_text())["layers"][0]["accuracy"] == row["accuracy"]
