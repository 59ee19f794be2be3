"""igpt_cli.model: fidelity against transformers, the feature API, and checkpoint weight names."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import hf_model, hf_reference
from igpt_cli.errors import ParameterError
from igpt_cli.model import (IGPT, IGPTConfig, POOLS, SITES, config_to_hf, load_pretrained, pool_tokens,
                            save_pretrained, sos_shift)
from igpt_cli.model.checkpoint import BLOCK_WEIGHTS, weight_map


def ours(model: IGPT, tokens: np.ndarray, layers, site="ln", sos=True, pool="mean") -> dict[int, np.ndarray]:
    """Our features for token rows, the way the extract stage computes them."""
    idx = torch.from_numpy(tokens.astype(np.int64))
    if sos:
        idx = sos_shift(idx, model.config.sos_token)
    with torch.inference_mode():
        return {k: v.float().numpy() for k, v in model.forward_intermediates(idx, layers, site, pool).items()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("small")
    m, d = hf_model(tmp)
    rng = np.random.default_rng(0)
    return dict(tmp=tmp, hf=m, dir=d, t=rng.integers(0, 512, (12, 64)).astype(np.uint16))


# ---------------------------------------------------------------------------
# fidelity against transformers
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("site", ["ln", "resid"])
def test_fidelity_safetensors(small, site):
    got = ours(load_pretrained(small["dir"]), small["t"], range(5), site=site)
    ref = hf_reference(small["hf"], small["t"], site=site)
    assert sorted(got) == [0, 1, 2, 3, 4]
    for layer in range(5):
        assert got[layer].dtype == np.float32 and got[layer].shape == (12, 128)
        np.testing.assert_allclose(got[layer], ref[layer], atol=1e-4, rtol=0, err_msg=f"layer {layer}")
    # ln and resid really differ (the ln site is not the residual stream)
    if site == "ln":
        assert np.abs(got[1] - hf_reference(small["hf"], small["t"], site="resid")[1]).max() > 1e-2


def test_fidelity_bin_checkpoint_and_no_sos(tmp_path, small):
    m, d = hf_model(tmp_path, n_layer=2, n_embd=64, n_head=2, safe=False, seed=1)
    assert (d / "pytorch_model.bin").exists() and not (d / "model.safetensors").exists()
    got = ours(load_pretrained(d), small["t"], range(3), sos=False)
    ref = hf_reference(m, small["t"], sos=False)
    for layer in range(3):
        np.testing.assert_allclose(got[layer], ref[layer], atol=1e-4, rtol=0)


@pytest.mark.parametrize("side,n_images,seed", [(8, 3, 5), (32, 2, 6)], ids=["8x8", "32x32-full"])
def test_fidelity_small_shape(tmp_path, side, n_images, seed):
    """The imagegpt-small shape (24 x 512, 8 heads), on a short 8x8 sequence and on the
    released models' full 1024 positions (32x32 images)."""
    m, d = hf_model(tmp_path, n_layer=24, n_embd=512, n_head=8, n_positions=side * side)
    t = np.random.default_rng(seed).integers(0, 512, (n_images, side * side)).astype(np.uint16)
    got = ours(load_pretrained(d), t, range(25))
    ref = hf_reference(m, t)
    assert sorted(got) == list(range(25))
    for layer in range(25):
        np.testing.assert_allclose(got[layer], ref[layer], atol=1e-4, rtol=0, err_msg=f"layer {layer}")


def test_bfloat16_close_to_float32(small):
    fp32 = load_pretrained(small["dir"])
    bf16 = load_pretrained(small["dir"]).to(torch.bfloat16)
    fa, fb = ours(bf16, small["t"], range(5)), ours(fp32, small["t"], range(5))
    idx = sos_shift(torch.from_numpy(small["t"].astype(np.int64)), bf16.config.sos_token)
    with torch.inference_mode():
        pooled = bf16.forward_intermediates(idx, [2])
    assert pooled[2].dtype == torch.float32  # pooled features stay float32
    for layer in fa:
        cos = (fa[layer] * fb[layer]).sum(1) / np.linalg.norm(fa[layer], axis=1) / np.linalg.norm(fb[layer], axis=1)
        assert cos.min() > 0.99, layer


# ---------------------------------------------------------------------------
# the feature API
# ---------------------------------------------------------------------------
def test_early_exit_runs_only_needed_blocks(small):
    model = load_pretrained(small["dir"])
    calls, ln_1_calls = [], []
    for i, blk in enumerate(model.h):
        blk.register_forward_hook(lambda mod, inp, out, i=i: calls.append(i))
        blk.ln_1.register_forward_hook(lambda mod, inp, out, i=i: ln_1_calls.append(i))
    got = ours(model, small["t"], [1])
    assert calls == [0]  # layer 1 = ln_1 of block 1 applied to h_1: only block 0 runs
    assert list(got) == [1]
    calls.clear(), ln_1_calls.clear()
    ours(model, small["t"], [0, 1])
    assert calls == [0] and ln_1_calls == [0, 1]  # block 0 reuses the tapped ln_1(h_0): one ln_1 per block


@pytest.mark.parametrize("site", SITES)
def test_token_maps_average_to_the_pooled_features(small, site):
    model = load_pretrained(small["dir"])
    maps = ours(model, small["t"], [0, 2, 4], site=site, pool=None)
    pooled = ours(model, small["t"], [0, 2, 4], site=site)
    for layer in (0, 2, 4):
        assert maps[layer].shape == (12, 64, 128)
        np.testing.assert_array_equal(pool_tokens(torch.from_numpy(maps[layer])).numpy(), pooled[layer])
        np.testing.assert_allclose(maps[layer].mean(1), pooled[layer], atol=1e-6, rtol=0)
    assert set(POOLS) == {"mean", "max", "none"}
    x = torch.randn(3, 5, 7, dtype=torch.bfloat16)
    assert pool_tokens(x, "mean").dtype == torch.float32 and pool_tokens(x).shape == (3, 7)
    assert pool_tokens(x, "max").dtype == torch.float32
    np.testing.assert_array_equal(pool_tokens(x, "max").numpy(), x.float().numpy().max(axis=1))
    assert pool_tokens(x, "none") is x


def test_feature_api_errors_name_parameters(small):
    model = load_pretrained(small["dir"])
    idx = torch.zeros(1, 64, dtype=torch.long)
    with pytest.raises(ParameterError, match="site='post'"):
        model.forward_intermediates(idx, [1], site="post")
    with pytest.raises(ParameterError, match="pool='sum'"):
        model.forward_intermediates(idx, [1], pool="sum")
    with pytest.raises(ParameterError, match=r"layers=\[5\]: must lie in 0..4"):
        model.forward_intermediates(idx, [5])


# ---------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------
def test_weight_map_covers_every_transformers_weight():
    from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling, ImageGPTModel

    n_layer = 3
    cfg = ImageGPTConfig(vocab_size=513, n_positions=16, n_embd=32, n_layer=n_layer, n_head=2)
    names = weight_map(n_layer)
    hf = ImageGPTForCausalImageModeling(cfg).state_dict()
    ref = IGPT(IGPTConfig(n_positions=16, n_embd=32, n_layer=n_layer, n_head=2)).state_dict()
    assert set(names) == set(ref)  # every weight of ours, once
    assert {h for h, _ in names.values()} == set(hf)  # every weight of theirs, once
    headless = set(ImageGPTModel(cfg).state_dict())
    assert {h.removeprefix("transformer.") for h, _ in names.values() if h != "lm_head.weight"} == headless
    for name, (h, transposed) in names.items():  # the transposed ones are exactly the Conv1D weights
        want = tuple(ref[name].shape[::-1]) if transposed else tuple(ref[name].shape)
        assert tuple(hf[h].shape) == want, name
        assert transposed == (name.endswith(".weight") and (".attn.c_" in name or ".mlp.c_" in name)), name
    assert sum(BLOCK_WEIGHTS.values()) == 4


def test_saved_checkpoint_loads_in_transformers_and_back(tmp_path):
    from transformers import ImageGPTForCausalImageModeling

    torch.manual_seed(0)
    model = IGPT(IGPTConfig(n_positions=16, n_embd=32, n_layer=2, n_head=2)).eval()
    save_pretrained(model, tmp_path / "m")
    hf = ImageGPTForCausalImageModeling.from_pretrained(tmp_path / "m").eval()
    idx = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        ref = hf(input_ids=idx).logits[..., :512]
        np.testing.assert_allclose(model(idx).numpy(), ref.numpy(), atol=1e-5, rtol=0)
    back = load_pretrained(tmp_path / "m")
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


# ---------------------------------------------------------------------------
# the KV cache (generation)
# ---------------------------------------------------------------------------
def _incremental_logits(model: IGPT, idx: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Logits of `idx` fed through one KVCache in chunks of the given sizes (the rest one token at a time)."""
    from igpt_cli.model.igpt import KVCache

    cache = KVCache(model.config, idx.shape[0])
    out, pos = [], 0
    sizes = list(chunks) + [1] * (idx.shape[1] - sum(chunks))
    with torch.inference_mode():
        for k in sizes:
            out.append(model(idx[:, pos:pos + k], cache))
            pos += k
    assert cache.pos == idx.shape[1]
    return torch.cat(out, 1)


@pytest.mark.parametrize("chunks", [[1], [7, 5], [64]], ids=["token-by-token", "chunked-prefill", "one-chunk"])
def test_cached_logits_equal_full_forward_and_transformers(tmp_path, chunks):
    from helpers import hf_causal_model

    hf, d = hf_causal_model(tmp_path, n_layer=3, n_embd=64, n_head=4, n_positions=64)
    model = load_pretrained(d)
    idx = sos_shift(torch.randint(0, 512, (3, 64), generator=torch.Generator().manual_seed(1)), 512)
    with torch.inference_mode():
        full = model(idx)
        ref = hf(input_ids=idx).logits
    cached = _incremental_logits(model, idx, chunks)
    assert cached.shape == full.shape == ref.shape == (3, 64, 512)
    np.testing.assert_allclose(cached.numpy(), full.numpy(), atol=1e-4, rtol=0)  # every position
    np.testing.assert_allclose(cached.numpy(), ref.numpy(), atol=1e-4, rtol=0)
    with torch.inference_mode():  # last_only: the last position's logits, [B, V]
        from igpt_cli.model.igpt import KVCache

        last = model(idx[:, :10], KVCache(model.config, 3), last_only=True)
    np.testing.assert_allclose(last.numpy(), full[:, 9].numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("chunks", [[1], [7, 5]], ids=["token-by-token", "chunked-prefill"])
def test_static_cache_has_fixed_shapes_and_the_same_logits(tmp_path, chunks):
    """A static cache (attention over all positions, masked: what a CUDA graph needs) gives the
    sliced cache's logits, transformers' too, and every step reads and writes the same buffers."""
    from helpers import hf_causal_model

    from igpt_cli.model.igpt import KVCache

    hf, d = hf_causal_model(tmp_path, n_layer=3, n_embd=64, n_head=4, n_positions=64)
    model = load_pretrained(d)
    idx = sos_shift(torch.randint(0, 512, (3, 64), generator=torch.Generator().manual_seed(2)), 512)
    with torch.inference_mode():
        ref = hf(input_ids=idx).logits
    cache = KVCache(model.config, 3, static=True)
    ptrs = cache.k.data_ptr(), cache.v.data_ptr()
    shapes, out, pos = set(), [], 0
    with torch.inference_mode():
        for k in list(chunks) + [1] * (64 - sum(chunks)):
            out.append(model(idx[:, pos:pos + k], cache))
            pos += k
            shapes.add(tuple(cache.k.shape))
    assert cache.pos == int(cache.position) == 64 and shapes == {(3, 3, 4, 64, 16)}
    assert (cache.k.data_ptr(), cache.v.data_ptr()) == ptrs
    np.testing.assert_allclose(torch.cat(out, 1).numpy(), ref.numpy(), atol=1e-4, rtol=0)
    cache.reset()
    assert cache.pos == int(cache.position) == 0


def test_cache_is_preallocated_and_refuses_overflow():
    from igpt_cli.model.igpt import KVCache

    cfg = IGPTConfig(n_positions=16, n_embd=32, n_layer=2, n_head=4)
    model = IGPT(cfg).eval()
    cache = KVCache(cfg, 2, dtype=torch.bfloat16)
    assert cache.k.shape == (2, 2, 4, 16, 8) and cache.nbytes == KVCache.bytes_for(cfg, 2, torch.bfloat16) == \
        2 * 2 * 2 * 16 * 32 * 2
    k_ptr = cache.k.data_ptr()
    with torch.inference_mode():
        model.to(torch.bfloat16)(torch.zeros(2, 10, dtype=torch.long), cache)
        assert cache.pos == 10 and cache.k.data_ptr() == k_ptr  # written in place, never reallocated
        with pytest.raises(ParameterError, match="overflow the cache"):
            model(torch.zeros(2, 7, dtype=torch.long), cache)
        with pytest.raises(ParameterError, match="batch does not match"):
            model(torch.zeros(3, 1, dtype=torch.long), cache)
    with pytest.raises(ParameterError, match="max_len=17"):
        KVCache(cfg, 1, max_len=17)


# ---------------------------------------------------------------------------
# config.json checks (checkpoint.py)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("change,message", [
    ({"n_head": 5, "n_embd": 64}, "n_head=5: must divide n_embd=64"),
    ({"n_embd": 65536}, "n_embd=65536: must be between 1 and 16384"),
    ({"n_layer": -1}, "n_layer=-1: must be between 1 and 1024"),
    ({"n_layer": 0}, "n_layer=0: must be between 1 and 1024"),
    ({"vocab_size": 10 ** 12}, "vocab_size=1000000000000: must be between 2 and 65537"),
    ({"n_positions": "1024"}, "n_positions='1024': must be an integer"),
    ({"n_embd": 512.0}, "n_embd=512.0: must be an integer"),
    ({"n_head": True}, "n_head=True: must be an integer"),
    ({"n_inner": -4}, "n_inner=-4: must be between 1 and 65536"),
    ({"layer_norm_epsilon": "tiny"}, "layer_norm_epsilon='tiny': must be a number between 0 and 1"),
    ({"activation_function": "gelu"}, "activation_function='gelu': not iGPT's quick_gelu"),
])
def test_bad_config_values_name_config_json_and_the_key(tmp_path, change, message):
    import json

    from igpt_cli.model import CheckpointError, config_from_hf, read_config

    good = config_to_hf(IGPTConfig(n_positions=16, n_embd=32, n_layer=2, n_head=2))
    with pytest.raises(CheckpointError) as e:
        config_from_hf(dict(good, **change))
    assert str(e.value) == message
    (tmp_path / "config.json").write_text(json.dumps(dict(good, **change)))
    with pytest.raises(CheckpointError) as e:
        read_config(tmp_path)
    assert str(e.value) == f"{tmp_path / 'config.json'}: {message}"


def test_config_not_an_object_or_not_json(tmp_path):
    from igpt_cli.model import CheckpointError, read_config

    for text, needle in (("[1, 2]", "expected a JSON object, not list"), ("{n_embd: 3", "model config is not valid JSON"),
                         (b"\xff\xfe", "model config is not UTF-8")):
        p = tmp_path / "config.json"
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(CheckpointError, match=needle):
            read_config(tmp_path)


def test_huge_config_with_small_weights_is_refused_without_allocating(tmp_path):
    """config.json says 8192 wide, the weights are 32 wide: refused by shape, the model never built."""
    import json
    import resource
    import time

    from igpt_cli.model import CheckpointError

    save_pretrained(IGPT(IGPTConfig(n_positions=16, n_embd=32, n_layer=2, n_head=2)), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, n_embd=8192)))  # 2 blocks = 6.4 GB in float32
    rss0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.time()
    with pytest.raises(CheckpointError, match="config.json implies"):
        load_pretrained(tmp_path)
    assert time.time() - t0 < 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 1 << 20  # KiB: under 1 GiB more


def test_checkpoint_without_lm_head_keeps_a_fresh_head(small):
    m = load_pretrained(small["dir"])  # a transformers ImageGPTModel: no lm_head in the file
    assert m.lm_head.weight.shape == (512, 128) and m.lm_head.weight.device.type == "cpu"
    assert torch.isfinite(m.lm_head.weight).all()


# ---------------------------------------------------------------------------
# BERT-objective models (OpenAI's igpt-*-bert; parity with TensorFlow: test_convert.py)
# ---------------------------------------------------------------------------
def tiny(objective: str, seed: int = 0) -> IGPT:
    torch.manual_seed(seed)
    return IGPT(IGPTConfig(n_positions=16, n_embd=32, n_layer=2, n_head=2, objective=objective)).eval()


def test_bert_attends_both_ways_and_autoregressive_only_back():
    idx = torch.randint(0, 512, (2, 16))
    later = idx.clone()
    later[:, -1] = (later[:, -1] + 1) % 512  # only the last token changes
    for objective, first_changes in (("autoregressive", False), ("bert", True)):
        m = tiny(objective)
        with torch.inference_mode():
            a, b = (m.forward_intermediates(x, [2], site="resid", pool=None, bert_mask=0.0 if objective == "bert"
                                            else None)[2] for x in (idx, later))
        assert (not torch.allclose(a[:, 0], b[:, 0])) == first_changes


def test_bert_masked_positions_see_no_token_embedding():
    m = tiny("bert")
    idx = torch.randint(0, 512, (2, 16))
    other = torch.randint(0, 512, (2, 16))
    keep = torch.rand(2, 16) > 0.5
    mixed = torch.where(keep, idx, other)  # the masked positions hold different tokens
    with torch.inference_mode():
        a = m(idx, keep=keep)
        b = m(mixed, keep=keep)
        c = m(idx)
    torch.testing.assert_close(a, b)  # masked tokens do not matter
    assert not torch.allclose(a, c)  # the mask does


def test_bert_default_mask_is_the_papers_and_reproducible():
    from igpt_cli.model.igpt import BERT_MASK_PROB, bert_keep_mask

    idx = torch.randint(0, 512, (64, 16))
    keep = bert_keep_mask(idx)
    assert keep.dtype == torch.bool and keep.shape == idx.shape
    assert abs((~keep).float().mean().item() - BERT_MASK_PROB) < 0.05
    torch.testing.assert_close(bert_keep_mask(idx[5:9]), keep[5:9])  # an image's mask, whatever its batch
    m = tiny("bert")
    with torch.inference_mode():
        default = m.forward_intermediates(idx[:4], [1])[1]
        explicit = m.forward_intermediates(idx[:4], [1], bert_mask=keep[:4])[1]
        unmasked = m.forward_intermediates(idx[:4], [1], bert_mask=0.0)[1]
        all_kept = m.forward_intermediates(idx[:4], [1], bert_mask=torch.ones(4, 16, dtype=torch.bool))[1]
    torch.testing.assert_close(default, explicit)
    torch.testing.assert_close(unmasked, all_kept)
    assert not torch.allclose(default, unmasked)


def test_bert_mask_errors_name_the_parameter():
    from igpt_cli.model import KVCache

    idx = torch.randint(0, 512, (2, 16))
    with pytest.raises(ParameterError, match="bert_mask"):
        tiny("autoregressive").forward_intermediates(idx, [1], bert_mask=0.15)
    with pytest.raises(ParameterError, match="bert_mask"):
        tiny("bert").forward_intermediates(idx, [1], bert_mask=1.0)
    with pytest.raises(ParameterError, match="bert_mask"):
        tiny("bert").forward_intermediates(idx, [1], bert_mask=torch.ones(2, 8, dtype=torch.bool))
    m = tiny("bert")
    with pytest.raises(ParameterError, match="not autoregressive"):
        m(idx[:, :1], KVCache(m.config, 2))


def test_objective_round_trips_through_config_json(tmp_path):
    import json

    m = tiny("bert")
    save_pretrained(m, tmp_path / "b")
    d = json.loads((tmp_path / "b" / "config.json").read_text())
    assert d["igpt_objective"] == "bert" and d["model_type"] == "imagegpt_bert"
    back = load_pretrained(tmp_path / "b")
    assert back.config.objective == "bert"
    idx = torch.randint(0, 512, (2, 16))
    with torch.inference_mode():
        torch.testing.assert_close(back.forward_intermediates(idx, [2]), m.forward_intermediates(idx, [2]))
    save_pretrained(tiny("autoregressive"), tmp_path / "a")
    assert "igpt_objective" not in json.loads((tmp_path / "a" / "config.json").read_text())
    d["igpt_objective"] = "masked"
    (tmp_path / "b" / "config.json").write_text(json.dumps(d))
    with pytest.raises(Exception, match="igpt_objective='masked'"):
        load_pretrained(tmp_path / "b")


# ---------------------------------------------------------------------------
# torch.compile'd blocks (opt-in)
# ---------------------------------------------------------------------------
def test_compiled_blocks_give_the_eager_features(small):
    eager = load_pretrained(small["dir"])
    compiled = load_pretrained(small["dir"])
    compiled.compile_blocks()
    a, b = ours(eager, small["t"][:3], range(5)), ours(compiled, small["t"][:3], range(5))
    assert compiled._compiled_block is not None  # it really ran compiled (a C++ compiler is here)
    for layer in range(5):
        np.testing.assert_allclose(b[layer], a[layer], atol=1e-5, rtol=0)


def test_compile_falls_back_to_eager_silently_without_a_compiler(small, monkeypatch, capfd):
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor.cpp, "cxx", ("no-such-c++-compiler",))  # as on a machine without one
    eager = load_pretrained(small["dir"])
    model = load_pretrained(small["dir"])
    model.compile_blocks()
    got = ours(model, small["t"][:3], [2, 4])
    assert model._compiled_block is None  # gave up on compiling, for good
    ref = ours(eager, small["t"][:3], [2, 4])
    for layer in (2, 4):
        np.testing.assert_array_equal(got[layer], ref[layer])
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("seed", [0, 5, 2 ** 32 - 1, 2 ** 32])
def test_bert_mask_is_numpys_row_keyed_draw(seed):
    """The mask's uniforms are exactly `np.random.default_rng([seed, *row]).random(T)` for each row
    (the entropy handed over as a uint32 array, ~30x faster than the Python list, same words)."""
    from igpt_cli.model.igpt import bert_keep_mask

    rows = np.random.default_rng(seed % 97).integers(0, 512, (7, 33))
    ref = np.stack([np.random.default_rng([seed, *r.tolist()]).random(33) for r in rows]) > 0.15
    np.testing.assert_array_equal(bert_keep_mask(rows, 0.15, seed).numpy(), ref)
    np.testing.assert_array_equal(bert_keep_mask(torch.from_numpy(rows), 0.15, seed).numpy(), ref)
