"""Training settings and training data are checked before any work (issue 10, cases 5 and beyond)."""
import math

import h5py
import numpy as np
import pytest

from igpt_cli.errors import InputError, ParameterError
from igpt_cli.model import IGPT, IGPTConfig
from igpt_cli.train import TrainConfig, check_config, load_tokens, pretrain
from igpt_cli.train.config import n_params

from helpers import assert_clean_failure, make_tokens, run_igpt

PAL16 = np.random.default_rng(5).uniform(-1, 1, (16, 3)).astype(np.float32)
SMALL = dict(n_layer=1, n_embd=16, n_head=2, batch_size=4, warmup_steps=1, steps=2)


@pytest.fixture
def tok(tmp_path):
    return make_tokens(tmp_path / "t.h5", 32, 4, palette=PAL16)


@pytest.mark.parametrize("field,value", [
    ("lr", math.nan), ("lr", math.inf), ("lr", 0.0), ("lr", -1e-3), ("lr", "0.1"),
    ("steps", 0), ("steps", 2.5), ("epochs", 0.0), ("epochs", math.nan), ("epochs", math.inf),
    ("batch_size", 0), ("warmup_steps", -1), ("grad_clip", 0.0), ("grad_clip", math.nan),
    ("weight_decay", -0.1), ("weight_decay", math.inf), ("min_lr_ratio", 1.5), ("n_layer", 0), ("n_embd", 0),
    ("n_head", 0), ("seed", -1), ("seed", 2**64), ("checkpoint_every", 0), ("eval_every", 0), ("val_images", 0), ("log_every", 0),
    ("flip", "yes"), ("n_layer", True),
])
def test_out_of_range_settings_are_named_before_any_work(tmp_path, tok, field, value):
    cfg = TrainConfig(**{**SMALL, field: value})
    with pytest.raises(ParameterError) as e:
        pretrain(tok, tmp_path / "m", cfg)
    assert e.value.param == field and str(e.value).startswith(f"{field}=")
    assert not (tmp_path / "m").exists()


def test_heads_must_divide_width_and_one_setting_is_enough_to_be_named():
    with pytest.raises(ParameterError, match=r"n_embd=30: not divisible by n_head=4"):
        check_config(TrainConfig(n_embd=30, n_head=4))
    assert check_config(TrainConfig(grad_clip=math.inf)).grad_clip == math.inf  # inf: no clipping


def test_parameter_count_is_exact_without_building_the_model():
    for cfg in (IGPTConfig(vocab_size=17, n_positions=16, n_embd=16, n_layer=1, n_head=2),
                IGPTConfig(vocab_size=513, n_positions=64, n_embd=64, n_layer=3, n_head=4, n_inner=100)):
        assert n_params(cfg) == IGPT(cfg).num_params()


@pytest.mark.parametrize("field,value", [("n_embd", 65536), ("n_layer", 10**6), ("batch_size", 10**9)])
def test_a_model_too_large_for_memory_is_refused_up_front(tmp_path, tok, field, value):
    with pytest.raises(ParameterError) as e:
        pretrain(tok, tmp_path / "m", TrainConfig(**{**SMALL, "n_head": 1, field: value}), device="cpu")
    assert e.value.param == field and "GiB" in str(e.value) and "available" in str(e.value)
    assert not (tmp_path / "m").exists()


def test_dict_settings_unknown_names_are_refused(tmp_path, tok):
    with pytest.raises(ParameterError, match="cfg='depth': not a training setting"):
        pretrain(tok, tmp_path / "m", {"depth": 2, "steps": 1})
    with pytest.raises(InputError, match="steps=N or epochs=E"):
        pretrain(tok, tmp_path / "m", {"n_layer": 1})


# --- the tokens ------------------------------------------------------------------------------------
def _edit(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)
    return path


def _replace_tokens(values):
    def fn(f):
        del f["tokens"]
        f.create_dataset("tokens", data=values)
    return fn


@pytest.mark.parametrize("edit,needle", [
    (lambda f: f.__delitem__("palette"), "lacks palette"),
    (lambda f: f.attrs.__delitem__("height"), "lacks height"),
    (lambda f: f.__delitem__("tokens"), "lacks tokens"),
    (lambda f: f.attrs.__setitem__("width", "wide"), "width"),
    (lambda f: f.attrs.__setitem__("class_names", "{not json"), "class_names"),
    (lambda f: f["palette"].__setitem__(0, [np.nan, 0, 0]), "palette has values that are not finite"),
    (_replace_tokens(np.full((4, 16), 16, np.uint16)), "token value 16 at row 0 is not in 0..15"),
    (_replace_tokens(np.array([[0] * 16, [0] * 15 + [-3]], np.int32)), "token value -3 at row 1"),
    (_replace_tokens(np.zeros((4, 15), np.uint16)), "tokens must be integers of shape [N, 16]"),
    (_replace_tokens(np.zeros((4, 16), np.float32)), "tokens must be integers"),
    (_replace_tokens(np.zeros((0, 16), np.uint16)), "no rows"),
])
def test_bad_tokens_files_are_one_line_naming_the_file(tmp_path, tok, edit, needle):
    _edit(tok, edit)
    with pytest.raises(InputError) as e:
        load_tokens(tok)
    assert str(tok) in str(e.value) and needle in str(e.value), str(e.value)


def test_tokens_beyond_the_palette_fail_the_cli_in_one_line(tmp_path):
    tok = make_tokens(tmp_path / "t.h5", 32, 4, palette=PAL16, high=20)  # values up to 19, 16 colours
    r = run_igpt("train", tok, "-o", tmp_path / "m", "--steps", "1", "--depth", "1", "--width", "16", "--heads", "2")
    assert_clean_failure(r, "is not in 0..15", out=tmp_path / "m")


def test_cli_refuses_unusable_numbers_in_one_line(tmp_path, tok):
    common = ["train", tok, "-o", tmp_path / "m", "--steps", "1"]
    for args, needle in ((["--width", "65536"], "--width 65536: "), (["--lr", "nan"], "--lr nan: "),
                         (["--lr", "inf"], "--lr inf: "), (["--lr=-0.5"], "--lr -0.5: "),
                         (["--seed=-1"], "--seed -1: ")):
        assert_clean_failure(run_igpt(*common, *args), needle, out=tmp_path / "m")


def test_validation_file_must_match_the_training_data(tmp_path, tok):
    cfg = TrainConfig(**SMALL)
    other_size = make_tokens(tmp_path / "v8.h5", 8, 8, palette=PAL16)
    with pytest.raises(InputError, match="8x8 tokens, training data is 4x4"):
        pretrain(tok, tmp_path / "m", cfg, val_tokens=other_size)
    other_palette = make_tokens(tmp_path / "vp.h5", 8, 4, palette=PAL16[::-1].copy())
    with pytest.raises(InputError, match="another palette"):
        pretrain(tok, tmp_path / "m", cfg, val_tokens=other_palette)
    empty = _edit(make_tokens(tmp_path / "v0.h5", 8, 4, palette=PAL16), _replace_tokens(np.zeros((0, 16), np.uint16)))
    with pytest.raises(InputError, match="v0.h5: tokens file has no rows"):
        pretrain(tok, tmp_path / "m", cfg, val_tokens=empty)
    assert not (tmp_path / "m").exists()


def test_truncated_or_foreign_tokens_files_fail_the_cli_in_one_line(tmp_path, tok):
    cut = tmp_path / "cut.h5"
    cut.write_bytes(tok.read_bytes()[:3000])
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = np.zeros(3)
    for bad in (cut, tmp_path / "foreign.h5", tmp_path):
        r = run_igpt("train", bad, "-o", tmp_path / "m", "--steps", "1")
        assert_clean_failure(r, bad.name, out=tmp_path / "m")


def test_a_diverging_run_stops_with_one_line_keeping_the_last_checkpoint(tmp_path, tok):
    cfg = TrainConfig(**{**SMALL, "steps": 40, "lr": 1e12, "warmup_steps": 0, "grad_clip": math.inf,
                         "checkpoint_every": 1, "eval_every": 1})
    with pytest.raises(ParameterError, match=r"lr=1000000000000.0: training diverged at step \d+") as e:
        pretrain(tok, tmp_path / "m", cfg, dtype="float32")
    assert "kept" in str(e.value) or "nothing was saved" in str(e.value)
    from safetensors.numpy import load_file
    if (tmp_path / "m" / "model.safetensors").exists():  # whatever was saved holds finite weights
        assert all(np.isfinite(v).all() for v in load_file(tmp_path / "m" / "model.safetensors").values())
