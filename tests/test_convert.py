"""igpt_cli.model.convert and `igpt convert`: OpenAI's TensorFlow checkpoints against TensorFlow itself.

tests/fixtures/tf/{ar,bert}/ hold tiny iGPTs (2 layers, d=16, 2 heads, 4x4 images) that real
TensorFlow built with the original graph's names and maths and saved in two shards, and
`forward.npz`, TensorFlow's forward on fixed tokens (tools/make_tf_fixtures.py)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from helpers import assert_clean_failure, invoke, make_tokens, read_feats, read_tokens
from igpt_cli.model import load_pretrained, resolve_model_dir, sos_shift
from igpt_cli.model.convert import convert_checkpoint, converted_model_dir
from igpt_cli.palette import DEFAULT_PALETTE

FIXTURES = Path(__file__).parent / "fixtures" / "tf"
PREFIX = {name: FIXTURES / name / "model.ckpt-7" for name in ("ar", "bert")}
TOL = 1e-4


def copy_checkpoint(tmp: Path, name: str = "ar") -> Path:
    src = PREFIX[name]
    for p in src.parent.glob(f"{src.name}.*"):
        shutil.copy(p, tmp / p.name)
    return tmp / src.name


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("converted")
    return {name: Path(convert_checkpoint(PREFIX[name], tmp / name).out) for name in PREFIX}


def tf_forward(name: str) -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / name / "forward.npz"))


def our_inputs(model, ref) -> tuple[torch.Tensor, torch.Tensor | None]:
    """TensorFlow's input as our model takes it: SOS-shifted (autoregressive) or with its keep mask (BERT)."""
    idx = torch.from_numpy(ref["tokens"].astype(np.int64))
    if model.config.autoregressive:
        return sos_shift(idx, model.config.sos_token), None
    return idx, torch.from_numpy(ref["keep"] > 0.5)


@pytest.mark.parametrize("name", ["ar", "bert"])
def test_converted_model_reproduces_tensorflow(converted, name):
    model = load_pretrained(converted[name])
    ref = tf_forward(name)
    assert model.config.objective == ("autoregressive" if name == "ar" else "bert")
    assert (model.config.n_layer, model.config.n_embd, model.config.n_head, model.config.n_positions) == (2, 16, 2, 16)
    idx, keep = our_inputs(model, ref)
    mask = {} if keep is None else {"bert_mask": keep}
    with torch.inference_mode():
        logits = model(idx, keep=keep).numpy()
        resid = model.forward_intermediates(idx, [0, 1, 2], site="resid", pool=None, **mask)
        ln = model.forward_intermediates(idx, [0, 1, 2], site="ln", pool=None, **mask)
    np.testing.assert_allclose(logits, ref["logits"], atol=TOL, rtol=0)
    for layer in range(3):  # block inputs, then ln_f(h_L)
        np.testing.assert_allclose(resid[layer].numpy(), ref[f"hidden_{layer}"], atol=TOL, rtol=0)
    for layer in range(2):  # the paper's features: ln_1 of each block
        np.testing.assert_allclose(ln[layer].numpy(), ref[f"ln1_{layer}"], atol=TOL, rtol=0)
    np.testing.assert_allclose(ln[2].numpy(), ref["hidden_2"], atol=TOL, rtol=0)


def test_autoregressive_directory_loads_in_transformers(converted):
    from transformers import ImageGPTForCausalImageModeling

    m = ImageGPTForCausalImageModeling.from_pretrained(converted["ar"]).eval()
    ref = tf_forward("ar")
    idx = sos_shift(torch.from_numpy(ref["tokens"].astype(np.int64)), 512)
    with torch.inference_mode():
        out = m(idx, output_hidden_states=True)
    for layer, h in enumerate(out.hidden_states):
        np.testing.assert_allclose(h.numpy(), ref[f"hidden_{layer}"], atol=TOL, rtol=0)
    np.testing.assert_allclose(out.logits[..., :512].numpy(), ref["logits"], atol=TOL, rtol=0)


def test_bert_directory_is_marked_for_igpt_not_transformers(converted):
    cfg = json.loads((converted["bert"] / "config.json").read_text())
    assert cfg["igpt_objective"] == "bert" and cfg["model_type"] != "imagegpt"
    assert "igpt_objective" not in json.loads((converted["ar"] / "config.json").read_text())
    from transformers import AutoConfig

    with pytest.raises(ValueError):
        AutoConfig.from_pretrained(converted["bert"])


def test_cli_convert_writes_a_usable_directory(tmp_path):
    clusters = tmp_path / "kmeans_centers.npy"
    np.save(clusters, np.load(DEFAULT_PALETTE)[::-1].copy())
    r = invoke("convert", PREFIX["ar"], "-o", tmp_path / "m", "--clusters", clusters, "-q")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["objective"] == "autoregressive" and d["shards"] == 2 and d["clusters"] == str(clusters)
    assert d["n_params"] == load_pretrained(tmp_path / "m").num_params()  # every weight, zero biases too
    pre = json.loads((tmp_path / "m" / "preprocessor_config.json").read_text())
    np.testing.assert_allclose(pre["clusters"], np.load(clusters), atol=1e-7)
    assert pre["size"] == {"height": 4, "width": 4}
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors",
                                                                    "preprocessor_config.json"]


def test_clusters_found_beside_the_checkpoint_else_the_official_palette(tmp_path):
    (tmp_path / "models" / "s").mkdir(parents=True)
    prefix = copy_checkpoint(tmp_path / "models" / "s")
    r = convert_checkpoint(prefix, tmp_path / "official")
    assert r.clusters.startswith("official palette")
    np.save(tmp_path / "kmeans_centers.npy", np.load(DEFAULT_PALETTE))  # download.py puts it in download_dir
    r = convert_checkpoint(prefix, tmp_path / "found")
    assert r.clusters == str((tmp_path / "kmeans_centers.npy").resolve())


@pytest.mark.parametrize("case, needle", [
    ("no-index", "no model.ckpt-7.index"),
    ("missing-shard", "data-00001-of-00002: missing data shard"),
    ("wrong-count", "found shards of 3 instead"),
    ("corrupted", "checksum mismatch"),
    ("not-igpt", "no model/wte"),
    ("clusters", "has 16 colours"),
])
def test_bad_input_is_one_line_and_nothing_written(tmp_path, case, needle):
    if case == "not-igpt":
        prefix = FIXTURES / "not-igpt" / "model.ckpt-1"
    else:
        prefix = copy_checkpoint(tmp_path)
    extra = []
    if case == "no-index":
        Path(f"{prefix}.index").unlink()
    elif case == "missing-shard":
        Path(f"{prefix}.data-00001-of-00002").unlink()
    elif case == "wrong-count":
        for i in range(2):
            Path(f"{prefix}.data-0000{i}-of-00002").rename(f"{prefix}.data-0000{i}-of-00003")
    elif case == "corrupted":
        shard = Path(f"{prefix}.data-00001-of-00002")
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x55
        shard.write_bytes(bytes(data))
    elif case == "clusters":
        np.save(tmp_path / "c.npy", np.zeros((16, 3), np.float32))
        extra = ["--clusters", tmp_path / "c.npy"]
    out = tmp_path / "out"
    r = invoke("convert", prefix, "-o", out, *extra)
    assert_clean_failure(r, needle, out=out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary directory left


def test_model_prefix_is_converted_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IGPT_CACHE", str(tmp_path / "cache"))
    prefix = copy_checkpoint(tmp_path)
    d = resolve_model_dir(str(prefix))
    assert d.parent == tmp_path / "cache" / "converted" and (d / "model.safetensors").is_file()
    mtime = (d / "model.safetensors").stat().st_mtime_ns
    assert converted_model_dir(prefix) == d and (d / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in d.parent.iterdir()] == [d.name]  # no staging directory left


def test_extract_and_score_accept_a_checkpoint_prefix(tmp_path, monkeypatch):
    monkeypatch.setenv("IGPT_CACHE", str(tmp_path / "cache"))
    tokens = make_tokens(tmp_path / "t.h5", 5, 4, palette=np.load(DEFAULT_PALETTE))
    r = invoke("extract", tokens, "-m", PREFIX["ar"], "-o", tmp_path / "f.h5", "-l", "0-2", "-q",
               "--device", "cpu", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    feats = read_feats(tmp_path / "f.h5")
    model = load_pretrained(converted_model_dir(PREFIX["ar"]))
    idx = sos_shift(torch.from_numpy(read_tokens(tokens)[0].astype(np.int64)), 512)
    with torch.inference_mode():
        want = model.forward_intermediates(idx, [0, 1, 2])
    for layer in range(3):
        np.testing.assert_allclose(feats[layer], want[layer].numpy(), atol=1e-5)
    r = invoke("score", tokens, "-m", PREFIX["ar"], "--json", "-q", "--device", "cpu")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("command", ["sample", "complete", "score"])
def test_bert_model_refused_for_left_to_right_use(tmp_path, monkeypatch, command):
    monkeypatch.setenv("IGPT_CACHE", str(tmp_path / "cache"))
    tokens = make_tokens(tmp_path / "t.h5", 2, 4, palette=np.load(DEFAULT_PALETTE))
    out = tmp_path / "o.h5"
    args = {"sample": ["sample", PREFIX["bert"], "-n", "1", "-o", out],
            "complete": ["complete", tokens, "-m", PREFIX["bert"], "-o", out],
            "score": ["score", tokens, "-m", PREFIX["bert"], "-o", out]}[command]
    r = invoke(*args)
    assert_clean_failure(r, "not autoregressive", out=out)


def test_extract_from_a_bert_prefix_uses_the_unshifted_tokens_and_the_papers_mask(tmp_path, monkeypatch):
    from igpt_cli.model.igpt import bert_keep_mask

    monkeypatch.setenv("IGPT_CACHE", str(tmp_path / "cache"))
    tokens = make_tokens(tmp_path / "t.h5", 6, 4, palette=np.load(DEFAULT_PALETTE))
    r = invoke("extract", tokens, "-m", PREFIX["bert"], "-o", tmp_path / "f.h5", "-l", "1", "-q",
               "--device", "cpu", "--dtype", "float32", "--batch-size", "4")
    assert r.returncode == 0, r.stderr
    model = load_pretrained(converted_model_dir(PREFIX["bert"]))
    idx = torch.from_numpy(read_tokens(tokens)[0].astype(np.int64))
    with torch.inference_mode():
        want = model.forward_intermediates(idx, [1], bert_mask=bert_keep_mask(idx))[1]
    np.testing.assert_allclose(read_feats(tmp_path / "f.h5")[1], want.numpy(), atol=1e-5)
    with h5py.File(tmp_path / "f.h5") as f:
        assert not f.attrs["sos"]  # the file says what the model read: its tokens, unshifted


def test_library_refuses_a_bert_model_instance_for_generation():
    from igpt_cli.generate.decode import sample_images, score_images
    from igpt_cli.model import CheckpointError, IGPT, IGPTConfig

    bert = IGPT(IGPTConfig(n_positions=16, n_embd=16, n_layer=1, n_head=2, objective="bert"))
    with pytest.raises(CheckpointError, match="not autoregressive"):
        score_images(np.zeros((1, 16), np.uint16), bert)
    with pytest.raises(CheckpointError, match="not autoregressive"):
        sample_images(bert, 1)


# --- the conversion cache is verified on every use (issue: a corrupted copy of a cached checkpoint) ----
def _flip_inside_tensor(prefix: Path, name: str) -> None:
    from igpt_cli.model.tf_checkpoint import TFCheckpoint

    e = TFCheckpoint(prefix).entries[name]
    shard = Path(f"{prefix}.data-{e.shard_id:05d}-of-00002")
    data = bytearray(shard.read_bytes())
    data[e.offset + e.size // 2] ^= 0x55
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, needle", [
    ("flipped", "checksum mismatch"),
    ("deleted-shard", "missing data shard"),
    ("no-shards", "missing data shard"),
])
@pytest.mark.parametrize("command", ["extract", "score"])
def test_a_damaged_copy_of_a_cached_checkpoint_is_refused(tmp_path, monkeypatch, damage, needle, command):
    monkeypatch.setenv("IGPT_CACHE", str(tmp_path / "cache"))
    converted_model_dir(PREFIX["ar"])  # the good checkpoint fills the cache
    (tmp_path / "copy").mkdir()
    prefix = copy_checkpoint(tmp_path / "copy")  # same .index, same clusters: the same cache key
    if damage == "flipped":
        _flip_inside_tensor(prefix, "model/h1/mlp/c_fc/w")
    else:
        for i in ([1] if damage == "deleted-shard" else [0, 1]):
            Path(f"{prefix}.data-0000{i}-of-00002").unlink()
    tokens = make_tokens(tmp_path / "t.h5", 3, 4, palette=np.load(DEFAULT_PALETTE))
    out = tmp_path / "o.h5"
    r = invoke(command, tokens, "-m", prefix, "-o", out, "-q", "--device", "cpu")
    assert_clean_failure(r, needle, out=out)


def test_a_corrupted_cache_entry_is_rebuilt_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("IGPT_CACHE", str(tmp_path / "cache"))
    d = converted_model_dir(PREFIX["ar"])
    want = load_pretrained(d).state_dict()
    weights = d / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) - 40] ^= 0x55  # inside the last tensor's values: still a valid safetensors file
    weights.write_bytes(bytes(data))
    assert any(not torch.equal(v, load_pretrained(d).state_dict()[k]) for k, v in want.items())
    events = []
    assert converted_model_dir(PREFIX["ar"], on_progress=events.append) == d
    assert any("not used" in (ev.message or "") for ev in events)
    got = load_pretrained(d).state_dict()
    assert all(torch.equal(v, got[k]) for k, v in want.items())
    # an edited record (another source) is no more trusted than edited weights
    record = json.loads((d / "igpt_cache.json").read_text())
    record["source"]["shards"] = {}
    (d / "igpt_cache.json").write_text(json.dumps(record))
    mtime = weights.stat().st_mtime_ns
    converted_model_dir(PREFIX["ar"])
    assert weights.stat().st_mtime_ns != mtime and json.loads((d / "igpt_cache.json").read_text())["source"]["shards"]
    assert sorted(p.name for p in d.parent.iterdir()) == [d.name]  # nothing staged or set aside is left


def test_convert_refuses_an_output_that_is_one_of_the_checkpoints_files(tmp_path):
    import os

    prefix = copy_checkpoint(tmp_path)
    os.symlink(f"{prefix}.index", tmp_path / "out")
    before = Path(f"{prefix}.index").read_bytes()
    r = invoke("convert", prefix, "-o", tmp_path / "out")
    assert_clean_failure(r)
    assert Path(f"{prefix}.index").read_bytes() == before
