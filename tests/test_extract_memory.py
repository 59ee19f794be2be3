"""igpt_cli.extract.memory: features of token and image arrays, without files — the numbers
of the file stage (and of `igpt quantize` + `igpt extract` for images)."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from helpers import PALETTE, hf_model, make_tokens, read_feats
from igpt_cli.errors import InputError, ParameterError
from igpt_cli.extract import extract_features, features_from_images, features_from_tokens
from igpt_cli.model import load_pretrained


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A random transformers checkpoint (4 x 128, 8x8 images) and 12 token rows, as a file and an array."""
    tmp = tmp_path_factory.mktemp("memory")
    _, model_dir = hf_model(tmp)
    tokens = make_tokens(tmp / "tokens.h5", 12, 8)
    with h5py.File(tokens) as f:
        rows = f["tokens"][:]
    return dict(tmp=tmp, dir=model_dir, tokens=tokens, t=rows)


def test_features_from_tokens_equals_the_file_stage(env):
    out = env["tmp"] / "mem-ref.h5"
    extract_features(env["tokens"], env["dir"], ["0", "2-3"], out, dtype="float32", batch_size=5)
    on_disk = read_feats(out)
    events = []
    got = features_from_tokens(env["t"], env["dir"], ["0", "2-3"], dtype="float32", batch_size=5,
                               on_progress=events.append)
    assert sorted(got) == [0, 2, 3]
    for layer in got:
        assert got[layer].dtype == np.float32 and got[layer].shape == (12, 128)
        np.testing.assert_array_equal(got[layer], on_disk[layer])
    assert [e.done for e in events] == [0, 5, 10, 12] and {(e.task, e.total, e.unit) for e in events} == \
        {("extract", 12, "image")}
    # an IGPT instance, used where and as it is; token maps with pool=None
    model = load_pretrained(env["dir"])
    mem = features_from_tokens(env["t"].astype(np.int64), model, [2], batch_size=5)
    np.testing.assert_array_equal(mem[2], on_disk[2])
    maps = features_from_tokens(env["t"], model, [2], pool=None, batch_size=5)
    assert maps[2].shape == (12, 64, 128) and maps[2].dtype == np.float32
    np.testing.assert_allclose(maps[2].mean(1), on_disk[2], atol=1e-6, rtol=0)


def test_features_from_tokens_bad_input(env):
    model = load_pretrained(env["dir"])
    with pytest.raises(ParameterError, match=r"tokens=\(12, 63\): expected \[N, 64\]"):
        features_from_tokens(env["t"][:, :63], model)
    with pytest.raises(ParameterError, match=r"tokens=.*values must lie in 0..511"):
        features_from_tokens(np.full((2, 64), 512), model)
    with pytest.raises(ParameterError, match="tokens='float32'"):
        features_from_tokens(np.zeros((2, 64), np.float32), model)
    with pytest.raises(ParameterError, match="site='post'"):
        features_from_tokens(env["t"], model, site="post")
    with pytest.raises(InputError, match="out of range"):
        features_from_tokens(env["t"], model, "7")


def test_features_from_images_equals_quantize_then_extract(env, tmp_path):
    """Images in memory give the features `igpt quantize` + `igpt extract` give for the same images on disk."""
    from igpt_cli.quantize import quantize_dataset

    images = np.random.default_rng(7).integers(0, 256, (6, 16, 16, 3)).astype(np.uint8)  # resized to 8x8
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "palette.npy", PALETTE)
    quantize_dataset(tmp_path / "images.npy", tmp_path / "tokens.h5", size=8, palette=tmp_path / "palette.npy")
    extract_features(tmp_path / "tokens.h5", env["dir"], "1-2", tmp_path / "f.h5", dtype="float32", batch_size=4)
    on_disk = read_feats(tmp_path / "f.h5")
    got = features_from_images(images, env["dir"], "1-2", palette=tmp_path / "palette.npy", dtype="float32",
                               batch_size=4)
    assert sorted(got) == [1, 2]
    for layer in got:
        np.testing.assert_array_equal(got[layer], on_disk[layer])
    # a model directory's own palette (its preprocessor_config.json) is the default
    model_dir = tmp_path / "with-palette"
    model_dir.mkdir()
    for f in env["dir"].iterdir():
        (model_dir / f.name).write_bytes(f.read_bytes())
    (model_dir / "preprocessor_config.json").write_text(json.dumps({"clusters": PALETTE.tolist()}))
    again = features_from_images(images, model_dir, "1-2", dtype="float32", batch_size=4)
    np.testing.assert_array_equal(again[2], on_disk[2])
    with pytest.raises(ParameterError, match="images='float32 \\(6, 16, 16, 3\\)'"):
        features_from_images(images.astype(np.float32), model_dir)
    with pytest.raises(ParameterError, match="resize='nearest'"):
        features_from_images(images, model_dir, resize="nearest")


def test_bert_model_mask_is_drawn_from_the_host_tokens_with_unchanged_results():
    """A BERT model's features: the mask now comes from the host's token array (no copy back from the
    device), and is the one `forward_intermediates` draws from the tokens itself (results unchanged)."""
    import torch

    from igpt_cli import features_from_tokens
    from igpt_cli.model import IGPT, IGPTConfig
    from igpt_cli.model.igpt import bert_keep_mask

    torch.manual_seed(0)
    model = IGPT(IGPTConfig(n_positions=16, n_embd=32, n_layer=2, n_head=2, objective="bert")).eval()
    tokens = np.random.default_rng(3).integers(0, 512, (5, 16)).astype(np.uint16)
    got = features_from_tokens(tokens, model, [1, 2], batch_size=2)
    idx = torch.from_numpy(tokens.astype(np.int64))
    with torch.inference_mode():
        ref = model.forward_intermediates(idx, [1, 2])   # draws the mask from the (device) tokens
    for layer in (1, 2):
        np.testing.assert_array_equal(got[layer], ref[layer].numpy())
    assert torch.equal(bert_keep_mask(tokens), bert_keep_mask(idx))
