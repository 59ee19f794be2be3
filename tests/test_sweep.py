"""`igpt sweep` (issue 15): each checkpoint's loss is `igpt score`'s, each accuracy `igpt probe`'s on its
features; an interrupted sweep resumes without recomputing finished checkpoints; bad input is one line."""
import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import igpt_cli
from igpt_cli.errors import InputError
from igpt_cli.extract import extract_features
from igpt_cli.generate import score_file
from igpt_cli.probe import probe_files
from igpt_cli.sweep import correlate, expand_checkpoints, run_sweep
from igpt_cli.train import TrainConfig, pretrain

from helpers import assert_clean_failure, invoke, make_tokens

TINY = TrainConfig(n_layer=2, n_embd=32, n_head=2, steps=6, batch_size=8, lr=1e-2, warmup_steps=1,
                   checkpoint_every=2, eval_every=2, save_every=2)
F32 = dict(dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """A 2 × 32 model trained 6 steps on 4×4 tokens of 16 colours (learnable), keeping steps 2, 4, 6."""
    d = tmp_path_factory.mktemp("series")
    train = make_tokens(d / "train.h5", 60, 4, seed=1, high=16)
    test = make_tokens(d / "test.h5", 30, 4, seed=2, high=16)
    pretrain(train, d / "run", TINY, dtype="float32", device="cpu")
    return d, train, test


def comparable(d: dict) -> dict:
    """A sweep's JSON without what differs between runs (timings, what was reused, where)."""
    d = json.loads(json.dumps(d))
    for k in ("seconds", "computed", "reused", "out", "files", "format", "format_version", "provenance"):
        d.pop(k, None)
    for c in d["checkpoints"]:
        c.pop("seconds"), c.pop("reused")
    return d


def test_each_loss_is_igpt_score_and_each_accuracy_igpt_probe_on_its_features(series, tmp_path):
    d, train, test = series
    res = igpt_cli.sweep([d / "run"], train, test, tmp_path / "sw", **F32)
    assert [(c.family, c.name, c.step) for c in res.checkpoints] == \
        [("run", f"step-00000{s}", s) for s in (2, 4, 6)]
    assert res.checkpoints[0].n_params == igpt_cli.load_pretrained(d / "run").num_params()
    for c in res.checkpoints:
        ck = d / "run" / c.name
        assert c.loss_nats == pytest.approx(score_file(test, ck, **F32).nats_per_token, rel=1e-6)
        assert c.loss_bits == pytest.approx(c.loss_nats / np.log(2))
        by_hand = tmp_path / "hand" / c.name
        by_hand.mkdir(parents=True)
        for split, tokens in (("train", train), ("test", test)):
            extract_features(tokens, ck, None, by_hand / f"{split}.h5", **F32)
        rep = probe_files(by_hand / "train.h5", by_hand / "test.h5")
        assert [(x.layer, x.val_acc, x.test_acc, x.c) for x in c.layers] == \
            [(x.layer, x.val_acc, x.test_acc, x.c) for x in rep.layers] and len(c.layers) == 3
        assert (c.best_layer, c.best_test_acc) == (rep.best_layer, next(
            x.test_acc for x in rep.layers if x.layer == rep.best_layer))
    losses = [c.loss_nats for c in res.checkpoints]
    assert losses[0] > losses[-1]  # it trained: the series means something
    (corr,) = res.correlations
    assert corr.family == "run" and corr.n == 3


def test_interrupted_sweep_resumes_without_recomputing_finished_checkpoints(series, tmp_path, monkeypatch):
    d, train, test = series
    ref = run_sweep([d / "run"], train, test, tmp_path / "ref", **F32)
    calls = {"probe": 0, "extract": 0}
    import igpt_cli.extract
    import igpt_cli.probe

    real_probe, real_extract = igpt_cli.probe.probe_files, igpt_cli.extract.extract_features

    def probe_then_stop(*a, **kw):
        calls["probe"] += 1
        if calls["probe"] == 2:
            raise KeyboardInterrupt  # in the 2nd checkpoint, after its features are complete
        return real_probe(*a, **kw)

    def counting_extract(*a, **kw):
        calls["extract"] += 1
        return real_extract(*a, **kw)

    monkeypatch.setattr(igpt_cli.probe, "probe_files", probe_then_stop)
    monkeypatch.setattr(igpt_cli.extract, "extract_features", counting_extract)
    with pytest.raises(KeyboardInterrupt):
        run_sweep([d / "run"], train, test, tmp_path / "sw", **F32)
    assert calls == {"probe": 2, "extract": 4}
    assert (tmp_path / "sw/run/step-000002/result.json").is_file()
    assert not (tmp_path / "sw/run/step-000004/result.json").exists() and not (tmp_path / "sw/sweep.json").exists()
    res = run_sweep([d / "run"], train, test, tmp_path / "sw", **F32)
    # the finished checkpoint is read back, the interrupted one keeps its features: only step 6 is extracted
    assert calls == {"probe": 2 + 2, "extract": 4 + 2}
    assert [c.reused for c in res.checkpoints] == [True, False, False] and (res.computed, res.reused) == (2, 1)
    assert comparable(res.to_dict()) == comparable(ref.to_dict())
    again = run_sweep([d / "run"], train, test, tmp_path / "sw", **F32)
    assert again.computed == 0 and calls["probe"] == 4
    saved = json.loads((tmp_path / "sw/sweep.json").read_text())
    assert saved["format"] == "igpt-sweep" and "device_name" in saved["provenance"]
    assert comparable(saved) == comparable(ref.to_dict())


def test_other_inputs_are_refused_and_restart_recomputes(series, tmp_path):
    d, train, test = series
    run_sweep([d / "run/step-000002"], train, test, tmp_path / "sw", **F32)
    with pytest.raises(InputError, match="train_sha256"):
        run_sweep([d / "run/step-000002"], test, test, tmp_path / "sw", **F32)
    res = run_sweep([d / "run/step-000002"], test, test, tmp_path / "sw", restart=True, **F32)
    assert res.computed == 1 and res.checkpoints[0].family == "run"


def test_checkpoint_arguments_globs_families_and_steps(series, tmp_path):
    d, _, _ = series
    run = d / "run"
    by_dir = expand_checkpoints([run])
    assert [(c.family, c.name, c.step) for c in by_dir] == [("run", f"step-00000{s}", s) for s in (2, 4, 6)]
    named = expand_checkpoints([f"tiny={run}/step-*", str(run / "step-000002")])  # a repeat is dropped
    assert [(c.family, c.step) for c in named] == [("tiny", 2), ("tiny", 4), ("tiny", 6)]
    assert expand_checkpoints([str(run / "step-000004"), str(run / "step-000002")])[0].step == 2  # sorted
    unfinished = tmp_path / "unfinished"  # the model of a run still training is not a point of its series
    (unfinished / "step-000002").mkdir(parents=True)
    (unfinished / "train_meta.json").write_text(json.dumps({"step": 3, "steps": 10}))
    (unfinished / "config.json").write_text("{}")
    assert [c.name for c in expand_checkpoints([unfinished])] == ["step-000002"]
    (unfinished / "train_meta.json").write_text(json.dumps({"step": 10, "steps": 10}))
    assert [(c.name, c.step) for c in expand_checkpoints([unfinished])] == [("step-000002", 2), ("step-000010", 10)]
    with pytest.raises(InputError, match="no checkpoint matches"):
        expand_checkpoints([str(run / "nothing-*")])
    (tmp_path / "other/step-000002").mkdir(parents=True)
    with pytest.raises(InputError, match="same family and name"):
        expand_checkpoints([f"x={run}/step-000002", f"x={tmp_path}/other/step-000002"])
    # the bundled model by name, as -m takes it everywhere (issue 22.8), next to a run's series
    from igpt_cli.bundled import BUNDLED

    (shipped,) = expand_checkpoints(["igpt-cifar8"])
    assert (Path(shipped.path), shipped.family, shipped.name) == (BUNDLED["igpt-cifar8"], "bundled", "igpt-cifar8")
    assert [c.family for c in expand_checkpoints(["igpt-cifar8", f"tiny={run}/step-000002"])] == ["bundled", "tiny"]


def test_correlations_are_scipys_and_undefined_below_three_points():
    from scipy import stats

    loss, acc = [3.0, 2.5, 2.2, 2.1], [0.2, 0.3, 0.33, 0.32]
    c = correlate("f", loss, acc)
    assert c.pearson_r == pytest.approx(stats.pearsonr(loss, acc).statistic)
    assert c.spearman_rho == pytest.approx(stats.spearmanr(loss, acc).statistic) and c.n == 4
    assert correlate("f", loss[:2], acc[:2]).pearson_r is None
    assert correlate("f", loss, [0.3] * 4).spearman_rho is None


def test_cli_table_json_csv_and_two_pngs(series, tmp_path):
    d, train, test = series
    out = tmp_path / "sw"
    r = invoke("sweep", f"a={d}/run/step-00000[24]", f"b={d}/run/step-000006", "--train", train, "--test", test,
               "-o", out, "--dtype", "float32", "--device", "cpu", "--layer", "1-2")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [c["family"] for c in doc["checkpoints"]] == ["a", "a", "b"] and doc["layers"] == [1, 2]
    assert [c["family"] for c in doc["correlations"]] == ["a", "b", "all"] and doc["correlations"][2]["n"] == 3
    assert "Pearson r" in r.stderr and "step-000004" in r.stderr
    with open(out / "sweep.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(x["family"], x["step"]) for x in rows] == [("a", "2"), ("a", "4"), ("b", "6")]
    assert float(rows[0]["test_acc_2"]) == pytest.approx(doc["checkpoints"][0]["layers"][1]["test_acc"], abs=1e-6)
    for png in ("sweep-accuracy-vs-loss.png", "sweep-layers.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, needle", [
    (["{d}/nowhere"], "nowhere"),
    (["{d}/run/step-9*"], "no checkpoint matches"),
    (["{d}/run", "--layer", "7"], "layer"),
    (["{d}/run", "--jobs", "0"], "--jobs"),
    (["{d}/run", "--score-on", "{d}/none.h5"], "none.h5"),
    (["{d}/run", "--method", "knn", "--k", "60"], "--k"),       # 60 training images: leave-one-out needs k <= 59
    (["{d}/run", "--method", "knn", "--knn-temperature", "0"], "--knn-temperature"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(series, tmp_path, args, needle):
    d, train, test = series
    out = tmp_path / "sw"
    r = invoke("sweep", *[a.format(d=d) for a in args], "--train", train, "--test", test, "-o", out)
    assert_clean_failure(r, needle, out=out)
    r = invoke("sweep", str(d / "run"), "--train", d / "missing.h5", "--test", test, "-o", out)
    assert_clean_failure(r, "missing.h5", out=out)


def test_knn_sweep_is_igpt_probe_knn_and_results_of_another_method_are_not_reused(series, tmp_path):
    d, train, test = series
    out = tmp_path / "sw"
    cks = [d / "run/step-000002", d / "run/step-000006"]
    lin = run_sweep(cks[:1], train, test, out, **F32)
    assert lin.probe == {"method": "linear"}
    # a result.json from before sweeps recorded their method was a linear probe's: still reused by one
    from igpt_cli.sweep.plan import result_digest

    doc_path = out / "run/step-000002/result.json"
    doc = json.loads(doc_path.read_text())
    assert doc["identity"]["method"] == "linear"
    del doc["identity"]["method"]
    doc["digest"] = result_digest(doc["identity"], doc["result"])
    doc_path.write_text(json.dumps(doc))
    assert run_sweep(cks[:1], train, test, out, **F32).computed == 0
    with pytest.raises(InputError, match=r"\(method, k, knn_vote, knn_temperature differ\)"):
        run_sweep(cks[:1], train, test, out, method="knn", k=5, **F32)   # a linear result is no k-NN result
    knn = ["--method", "knn", "--k", "5", "--knn-vote", "majority"]
    r = invoke("sweep", *cks, "--train", train, "--test", test, "-o", out, *knn, "--restart", "--dtype", "float32",
               "--device", "cpu")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["probe"] == {"method": "knn", "k": 5, "knn_vote": "majority", "knn_temperature": None}
    assert doc["computed"] == 2 and "k-NN (k=5, majority)" in r.stderr
    for c in doc["checkpoints"]:   # each checkpoint's accuracies are `igpt probe --method knn`'s on its features
        ckdir = out / "run" / c["name"]
        p = invoke("probe", ckdir / "train.h5", "--test", ckdir / "test.h5", *knn, "--json", "-q")
        ref = json.loads(p.stdout)
        assert ref["protocol"]["method"] == "knn" and len(c["layers"]) == 3
        assert [(x["layer"], x["val_acc"], x["test_acc"], x["c"]) for x in c["layers"]] == \
            [(x["layer"], x["val_acc"], x["test_acc"], None) for x in ref["layers"]]
        assert c["best_layer"] == ref["best_layer"]
    with open(out / "sweep.csv") as fh:
        assert {(x["method"], x["k"]) for x in csv.DictReader(fh)} == {("knn", "5")}
    assert json.loads((out / "sweep.json").read_text())["probe"]["method"] == "knn"
    with pytest.raises(InputError, match=r"\(method, k, knn_vote differ\)"):    # nor a k-NN result a linear one
        run_sweep(cks, train, test, out, **F32)
    with pytest.raises(InputError, match=r"\(k differ\)"):                   # nor one k another
        run_sweep(cks, train, test, out, method="knn", k=3, knn_vote="majority", **F32)
    assert run_sweep(cks, train, test, out, method="knn", k=5, knn_vote="majority", **F32).computed == 0


def test_results_are_typed_and_the_package_is_callable(series, tmp_path):
    d, train, test = series
    import igpt_cli.sweep as pkg  # importing the package does not hide `igpt_cli.sweep(...)`

    res = pkg([d / "run/step-000006"], train, test, tmp_path / "sw", **F32)
    c = res.checkpoints[0]
    assert replace(c, seconds=0).to_dict()["layers"][0].keys() == {"layer", "val_acc", "test_acc", "c"}
    assert Path(res.files["csv"]).is_file() and res.correlations[0].pearson_r is None  # one point


# ---------------------------------------------------------------------------
# issue 20 (smaller items) and issue 24.7: checks first, folders inside -o, edited results, the device
# ---------------------------------------------------------------------------

def _no_work(monkeypatch):
    import igpt_cli.extract
    import igpt_cli.generate

    monkeypatch.setattr(igpt_cli.generate, "score_file", lambda *a, **k: pytest.fail("computed before checking"))
    monkeypatch.setattr(igpt_cli.extract, "extract_features", lambda *a, **k: pytest.fail("computed before checking"))


def test_every_checkpoint_and_input_is_checked_before_anything_is_computed(series, tmp_path, monkeypatch):
    from helpers import hf_model

    d, train, test = series
    _no_work(monkeypatch)
    _, wide = hf_model(tmp_path, n_layer=2, n_embd=32, n_head=2)      # 8x8 positions, no LM head: the last one
    out = tmp_path / "sw"
    with pytest.raises(InputError, match="no LM head"):
        run_sweep([d / "run/step-000002", wide], train, test, out, **F32)
    unlabelled = make_tokens(tmp_path / "unl.h5", 12, 4, seed=3, high=16)
    import h5py

    with h5py.File(unlabelled, "r+") as f:
        f["labels"][0] = -1
    with pytest.raises(InputError, match="1 rows are unlabelled"):
        run_sweep([d / "run"], unlabelled, test, out, **F32)
    big = make_tokens(tmp_path / "big.h5", 12, 8, seed=3, high=16)   # 8x8 images for a 4x4 model
    with pytest.raises(InputError, match="images are 8x8"):
        run_sweep([d / "run"], train, test, out, score_on=big, **F32)
    assert not out.exists()


def test_a_family_cannot_leave_the_output_directory(series, tmp_path, monkeypatch):
    d, train, test = series
    _no_work(monkeypatch)
    (tmp_path / "out").mkdir()
    for fam in ("..", "."):
        r = invoke("sweep", f"{fam}={d}/run/step-000002", "--train", train, "--test", test, "-o", tmp_path / "out/sw")
        assert_clean_failure(r, f"family {fam!r} cannot name a folder")
    (tmp_path / "out/sw").mkdir()
    (tmp_path / "out/sw/run").symlink_to(tmp_path)                   # a planted link out of -o
    with pytest.raises(InputError, match="leaves the output directory"):
        run_sweep([d / "run/step-000002"], train, test, tmp_path / "out/sw", **F32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_output_that_is_an_input_is_refused(series, tmp_path, monkeypatch):
    d, train, test = series
    _no_work(monkeypatch)
    ckdir = tmp_path / "sw/run/step-000002"
    ckdir.mkdir(parents=True)
    mine = ckdir / "train.h5"                        # the user's tokens where the sweep writes features
    mine.write_bytes(train.read_bytes())
    r = invoke("sweep", str(d / "run/step-000002"), "--train", mine, "--test", test, "-o", tmp_path / "sw")
    assert_clean_failure(r, "would overwrite the input train")
    assert mine.read_bytes() == train.read_bytes()


def test_an_edited_result_is_recomputed_and_the_probe_gets_the_device(series, tmp_path, monkeypatch):
    d, train, test = series
    import igpt_cli.probe

    seen = []
    real = igpt_cli.probe.probe_files
    monkeypatch.setattr(igpt_cli.probe, "probe_files", lambda *a, **k: seen.append(k["device"]) or real(*a, **k))
    ref = run_sweep([d / "run/step-000004"], train, test, tmp_path / "sw", dtype="float32", device="auto")
    assert seen == ["cpu"]                           # "auto" resolved, and handed to the probe
    doc_path = tmp_path / "sw/run/step-000004/result.json"
    doc = json.loads(doc_path.read_text())
    assert doc["provenance"]["probe_device"] == "cpu"
    from igpt_cli.provenance import device_name

    assert doc["provenance"]["device_name"] == device_name("cpu")
    doc["result"]["best_test_acc"] = 0.99            # an edited result
    doc_path.write_text(json.dumps(doc))
    events = []
    res = run_sweep([d / "run/step-000004"], train, test, tmp_path / "sw", dtype="float32", device="auto",
                    on_progress=events.append)
    assert res.computed == 1 and res.checkpoints[0].best_test_acc == ref.checkpoints[0].best_test_acc
    assert any("edited or damaged" in (e.message or "") for e in events)
    assert run_sweep([d / "run/step-000004"], train, test, tmp_path / "sw", dtype="float32").computed == 0


def test_torchrun_equals_one_process(series, tmp_path):
    """3 checkpoints over 2 ranks (gloo on the CPU): the same sweep.json and sweep.csv as one process."""
    import subprocess
    import sys

    from helpers import ENV

    d, train, test = series
    torchrun = Path(sys.executable).with_name("torchrun")
    docs = {}
    for k, launcher in ((1, [sys.executable]), (2, [str(torchrun), "--standalone", "--nproc-per-node=2"])):
        out = tmp_path / f"k{k}"
        r = subprocess.run([*launcher, "-m", "igpt_cli", "sweep", str(d / "run"), "--train", str(train), "--test",
                            str(test), "-o", str(out), "--dtype", "float32", "--device", "cpu", "--layer", "1-2", "-q"],
                           capture_output=True, text=True, env=ENV, timeout=600)
        assert r.returncode == 0, r.stderr
        docs[k] = json.loads(r.stdout)             # rank 0 alone prints: stdout is one JSON document
        saved = json.loads((out / "sweep.json").read_text())
        assert saved["provenance"]["world_size"] == k
    assert comparable(docs[2]) == comparable(docs[1]) and docs[2]["computed"] == 3
    rows = {k: (tmp_path / f"k{k}/sweep.csv").read_text() for k in (1, 2)}
    assert rows[1] == rows[2].replace(str(tmp_path / "k2"), str(tmp_path / "k1"))
    for png in ("sweep-accuracy-vs-loss.png", "sweep-layers.png"):
        assert (tmp_path / "k2" / png).is_file()
