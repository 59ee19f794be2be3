"""igpt_cli.generate in memory: fidelity against transformers (greedy completion, likelihood), the
cached decoding loop, and checkpoints that cannot generate."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import hf_causal_model, hf_model
from igpt_cli.errors import InputError, ParameterError
from igpt_cli.generate import Decoder, Sampling, complete_images, sample_images, score_images
from igpt_cli.generate.decode import cpu_threads_for
from igpt_cli.model import IGPT, IGPTConfig, load_pretrained


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    hf, d = hf_causal_model(tmp_path_factory.mktemp("causal"), n_layer=3, n_embd=64, n_head=4, n_positions=64)
    t = np.random.default_rng(0).integers(0, 512, (5, 64)).astype(np.uint16)
    return dict(hf=hf, dir=d, t=t)


@pytest.mark.parametrize("keep_rows", [0, 3, 8])
def test_greedy_completion_equals_transformers_generate(causal, keep_rows):
    """temperature 0 = transformers' generate(do_sample=False) from SOS + the kept tokens, token for token."""
    t = causal["t"]
    got = complete_images(t, causal["dir"], keep_rows=keep_rows, n=2, temperature=0, dtype="float32")
    assert got.shape == (5, 2, 64) and got.dtype == np.uint16
    keep = keep_rows * 8
    np.testing.assert_array_equal(got[:, 0], got[:, 1])  # greedy: no randomness
    np.testing.assert_array_equal(got[:, 0, :keep], t[:, :keep])
    if keep == 64:
        np.testing.assert_array_equal(got[:, 0], t)  # nothing left to sample
        return
    prompt = torch.cat([torch.full((5, 1), 512), torch.from_numpy(t[:, :keep].astype(np.int64))], 1)
    with torch.no_grad():
        ref = causal["hf"].generate(input_ids=prompt, do_sample=False, max_new_tokens=64 - keep, pad_token_id=0)
    np.testing.assert_array_equal(got[:, 0], ref[:, 1:].numpy())


def test_score_equals_cross_entropy_of_transformers_logits(causal):
    t = causal["t"]
    got = score_images(t, causal["dir"], batch_size=2, dtype="float32")
    idx = torch.from_numpy(t.astype(np.int64))
    with torch.no_grad():
        logits = causal["hf"](input_ids=torch.cat([torch.full((5, 1), 512), idx[:, :-1]], 1)).logits
    ref = torch.nn.functional.cross_entropy(logits.transpose(1, 2), idx, reduction="none").double().mean(1)
    assert got.shape == (5,) and got.dtype == np.float64
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-5, rtol=0)  # per image
    bf16 = score_images(t, causal["dir"], dtype="bfloat16")
    np.testing.assert_allclose(bf16, got, atol=2e-2)


def test_samples_depend_on_seed_and_row_not_on_batching(causal):
    model = load_pretrained(causal["dir"])
    a = sample_images(model, 5, seed=1, batch_size=2)
    b = sample_images(model, 5, seed=1, batch_size=5)
    c = sample_images(model, 5, seed=2, batch_size=5)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and a.shape == (5, 64) and int(a.max()) < 512
    comp = complete_images(causal["t"][:2], model, keep_fraction=0.5, n=3, seed=1, batch_size=4)
    np.testing.assert_array_equal(comp, complete_images(causal["t"][:2], model, keep_rows=4, n=3, seed=1,
                                                        batch_size=6))
    assert (comp[:, 0] != comp[:, 1]).any()  # completions of one image differ


def test_decoder_reuses_one_preallocated_cache_and_reports_tokens():
    from igpt_cli.progress import Reporter

    torch.manual_seed(0)
    model = IGPT(IGPTConfig(vocab_size=17, n_positions=16, n_embd=32, n_layer=2, n_head=2)).eval()
    events = []
    dec = Decoder(model, Sampling(1.0), seed=0, n_colours=5, reporter=Reporter(events.append, "sample", 3 * 16),
                  report_every=4)
    rows = dec.rows(np.empty((3, 0), np.uint16), np.arange(3))
    cache = dec._cache
    assert rows.shape == (3, 16) and int(rows.max()) < 5  # only the palette's colours
    dec.rows(np.zeros((3, 4), np.uint16), np.arange(3))
    assert dec._cache is cache  # same batch size: the same buffers
    assert [e.done for e in events] == [12, 24, 36, 48, 60, 72, 84]  # 16 steps then 12, by 4 steps of 3 rows


def test_small_decode_steps_run_on_one_thread():
    cfg = IGPTConfig(n_positions=16, n_embd=32, n_layer=1, n_head=2)
    before = torch.get_num_threads()
    with cpu_threads_for(cfg, 4, torch.device("cpu")):
        inside = torch.get_num_threads()
    assert inside == 1 and torch.get_num_threads() == before
    with cpu_threads_for(IGPTConfig(), 16, torch.device("cpu")):  # imagegpt-small at batch 16: all threads
        assert torch.get_num_threads() == before


def test_checkpoint_without_lm_head_cannot_generate_or_score(tmp_path):
    _, d = hf_model(tmp_path, n_layer=1, n_embd=32, n_head=2)  # transformers ImageGPTModel: no head
    for call in (lambda: sample_images(d, 1), lambda: score_images(np.zeros((1, 64), np.uint16), d),
                 lambda: complete_images(np.zeros((1, 64), np.uint16), d)):
        with pytest.raises(InputError, match="no LM head.*cannot generate or score"):
            call()
    load_pretrained(d)  # features still load it


def test_bad_arguments_name_the_parameter(causal):
    model = load_pretrained(causal["dir"])
    t = causal["t"]
    for call, needle in ((lambda: sample_images(model, 0), "n=0"),
                         (lambda: sample_images(model, 2, temperature=-1), "temperature=-1"),
                         (lambda: sample_images(model, 2, seed=-3), "seed=-3"),
                         (lambda: complete_images(t, model, keep_rows=9), "keep_rows=9: must lie in 0..8"),
                         (lambda: complete_images(t, model, keep_rows=2, keep_fraction=0.5), "not both"),
                         (lambda: complete_images(t, model, keep_fraction=1.5), "keep_fraction=1.5"),
                         (lambda: complete_images(t[:, :32], model), "tokens=(5, 32)"),
                         (lambda: score_images(t + 600, model), "must lie in 0..511")):
        with pytest.raises(ParameterError) as e:
            call()
        assert needle in str(e.value), (needle, str(e.value))


def test_bfloat16_model_keeps_a_float32_cache_on_cpu(causal):
    """A CPU's bfloat16 attention over a cache is ~10x slower than its float32 one: the Decoder
    keeps keys and values in float32 (stored exactly) and attends in float32; the cached logits
    stay the bfloat16 model's full-forward ones within bfloat16 rounding."""
    from igpt_cli.generate.decode import cache_dtype_for
    from igpt_cli.model import KVCache

    cpu = torch.device("cpu")
    assert cache_dtype_for(cpu, torch.bfloat16) == torch.float32
    assert cache_dtype_for(cpu, torch.float32) == torch.float32
    assert cache_dtype_for(torch.device("cuda"), torch.bfloat16) == torch.bfloat16
    model = load_pretrained(causal["dir"]).to(torch.bfloat16)
    dec = Decoder(model, Sampling(0.0))
    assert dec.cache_for(2).k.dtype == torch.float32
    idx = torch.cat([torch.full((2, 1), 512), torch.from_numpy(causal["t"][:2, :-1].astype(np.int64))], 1)
    with torch.inference_mode():
        full = model(idx).float()
        cache = KVCache(model.config, 2, dtype=torch.float32)
        cached = torch.cat([model(idx[:, :5], cache)] + [model(idx[:, p:p + 1], cache) for p in range(5, 64)], 1)
    assert cached.dtype == torch.bfloat16
    scale = full.abs().max().item()
    assert (cached.float() - full).abs().max().item() <= 0.03 * scale


@pytest.mark.parametrize("keep_rows", [0, 3])
def test_static_cache_decoder_equals_transformers_generate(causal, keep_rows):
    """The fixed-shape (CUDA-graph-ready) cache decodes greedily exactly as transformers' generate."""
    t = causal["t"]
    keep = keep_rows * 8
    dec = Decoder(load_pretrained(causal["dir"]), Sampling(0.0), static_cache=True)
    got = dec.rows(t[:, :keep], np.arange(5))
    assert dec._cache.static
    prompt = torch.cat([torch.full((5, 1), 512), torch.from_numpy(t[:, :keep].astype(np.int64))], 1)
    with torch.no_grad():
        ref = causal["hf"].generate(input_ids=prompt, do_sample=False, max_new_tokens=64 - keep, pad_token_id=0)
    np.testing.assert_array_equal(got, ref[:, 1:].numpy())
