"""igpt_cli.model.runtime, the one model runtime: the model-vs-tokens check (size, palette size, palette
colours) that every stage applies alike, batch sizes from one memory probe, what can generate."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from helpers import PALETTE, assert_clean_failure, hf_causal_model, hf_model, invoke, make_tokens
from igpt_cli import outputs
from igpt_cli.errors import InputError
from igpt_cli.model import BUNDLED, CheckpointError
from igpt_cli.model import runtime
from igpt_cli.palette import Palette

SHIPPED = BUNDLED["igpt-cifar8"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rt")
    _, causal = hf_causal_model(tmp, n_layer=1, n_embd=32, n_head=2, n_positions=64)
    _, bare = hf_model(tmp, n_layer=1, n_embd=32, n_head=2, n_positions=64)
    own = make_tokens(tmp / "own.h5", 3, 8, palette=Palette.load(SHIPPED).centers)  # the shipped model's palette
    other = make_tokens(tmp / "other.h5", 3, 8)  # a random 512-colour palette
    return dict(tmp=tmp, causal=causal, bare=bare, own=own, other=other)


def test_the_model_palette_is_checked_by_value_not_only_by_size():
    m = runtime.open_model("igpt-cifar8", device="cpu", dtype="float32")
    assert m.palette is not None and len(m.palette) == 512 and m.net is None  # nothing loaded yet
    m.check_tokens(8, 8, m.palette.centers, "own.h5")
    m.check_tokens(8, 8, m.palette.centers + 1e-4, "own.h5")  # a float round trip is the same palette
    with pytest.raises(InputError, match="its palette .* is not the model's .*quantize with --palette"):
        m.check_tokens(8, 8, PALETTE, "other.h5")  # same size, other colours
    with pytest.raises(InputError, match="images are 4x4"):
        m.check_tokens(4, 4, m.palette.centers, "small.h5")
    with pytest.raises(InputError, match="palette has 600 colours"):
        m.check_tokens(8, 8, np.zeros((600, 3), np.float32), "big.h5")


def test_a_model_naming_no_palette_checks_sizes_only(models):
    m = runtime.open_model(models["bare"], device="cpu")
    assert m.palette is None
    m.check_tokens(8, 8, PALETTE, "any.h5")  # its tokens' colours cannot be checked: accepted
    with pytest.raises(InputError, match="palette has 513 colours"):
        m.check_tokens(8, 8, np.zeros((513, 3), np.float32), "big.h5")


@pytest.mark.parametrize("command", ["extract", "score", "complete"])
def test_every_stage_refuses_tokens_of_another_palette_alike(models, command):
    """extract used to accept them silently (only the palette's size was checked)."""
    out = models["tmp"] / f"{command}.h5"
    args = {"extract": ["extract", models["other"], "-m", "igpt-cifar8"],
            "score": ["score", models["other"], "-m", "igpt-cifar8"],
            "complete": ["complete", models["other"], "-m", "igpt-cifar8"]}[command]
    r = invoke(*args, "--device", "cpu", "-o", out, "-q")
    assert_clean_failure(r, "is not the model's", out=out)
    assert "quantize with --palette" in r.stderr and not outputs.temp_path_for(out).exists()


def test_extract_accepts_tokens_of_the_models_own_palette(models):
    out = models["tmp"] / "own-feats.h5"
    r = invoke("extract", models["own"], "-m", "igpt-cifar8", "-l", "1", "--device", "cpu", "-o", out, "-q")
    assert r.returncode == 0, r.stderr


def test_batch_sizes_follow_the_one_memory_probe(monkeypatch):
    from igpt_cli.model import IGPTConfig

    cfg = IGPTConfig(n_positions=1024, n_embd=512, n_layer=8, n_head=8)
    cpu = torch.device("cpu")
    big = (runtime.feature_batch_size(cfg, cpu, torch.float32), runtime.decode_batch_size(cfg, cpu, torch.float32))
    assert 1 <= big[0] <= 64 and 1 <= big[1] <= 64
    monkeypatch.setattr(runtime, "available_memory", lambda dev: 64 << 20)  # 64 MiB left
    small = (runtime.feature_batch_size(cfg, cpu, torch.float32), runtime.decode_batch_size(cfg, cpu, torch.float32))
    assert small[0] < big[0] and small[1] < big[1] and min(small) >= 1
    monkeypatch.setattr(runtime, "available_memory", lambda dev: 0)
    assert runtime.feature_batch_size(cfg, cpu, torch.float32) == runtime.decode_batch_size(cfg, cpu,
                                                                                             torch.float32) == 1


def test_feature_batches_are_capped_by_tokens_not_images(monkeypatch):
    """A 64-token model gets 16x the images per batch of a 1024-token one; host output caps it too."""
    from igpt_cli.model import IGPTConfig

    monkeypatch.setattr(runtime, "available_memory", lambda dev: 1 << 40)  # memory is no limit here
    short, long = (IGPTConfig(n_positions=t, n_embd=512, n_layer=8, n_head=8) for t in (64, 1024))
    for dev in (torch.device("cuda"), torch.device("cpu")):
        a, b = (runtime.feature_batch_size(c, dev, torch.float32) for c in (short, long))
        assert a == 16 * b and b >= 1, (dev, a, b)
    assert runtime.feature_batch_size(long, torch.device("cuda"), torch.float32) == runtime.GPU_BATCH_TOKENS // 1024
    assert runtime.feature_batch_size(short, torch.device("cuda"), torch.float32) > 256  # no fixed 256 any more
    monkeypatch.setattr(runtime, "available_memory", lambda dev: (1 << 40) if dev.type == "cuda" else 1 << 30)
    row = 25 * 64 * 512 * 2  # token maps of 25 layers, float16
    capped = runtime.feature_batch_size(short, torch.device("cuda"), torch.float32, host_row_bytes=row)
    assert capped == int(0.25 * (1 << 30) // (runtime.HOST_COPIES * row)) < 4096


def test_available_memory_is_positive_on_this_host():
    have = runtime.available_memory(torch.device("cpu"))
    assert have is not None and have > 0


def test_only_a_model_with_an_lm_head_generates(models):
    m = runtime.open_model(models["causal"], device="cpu", generative=True)
    assert runtime.has_lm_head(m.weights)
    with pytest.raises(CheckpointError, match="no LM head"):
        runtime.open_model(models["bare"], device="cpu", generative=True)
    runtime.open_model(models["bare"], device="cpu")  # features need no head
    net, dev, dtype = runtime.ready_model(models["causal"], "cpu", "float32", generative=True)
    assert dev.type == "cpu" and dtype == torch.float32 and not net.training
    net.config.objective = "bert"  # a BERT-objective model predicts masked tokens, not the next one
    with pytest.raises(CheckpointError, match="not autoregressive"):
        runtime.ready_model(net, generative=True)


def test_image_size_from_the_preprocessor_config(models, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(SHIPPED, d)
    assert runtime.open_model(d, device="cpu").image_size() == (8, 8)
    assert runtime.model_image_settings(d)[0] == 8
    assert runtime.open_model(models["causal"], device="cpu").image_size() == (8, 8)  # square side of 64
    size, palette = runtime.model_image_settings(models["causal"])
    assert size == 8 and palette.sha256 == Palette.default().sha256  # 512 colours, no palette named: iGPT's
