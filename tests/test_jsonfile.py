"""igpt_cli.jsonfile: the one bounded reader for JSON read from disk — and the readers that use it
(`igpt models` over the Hugging Face cache, a model directory's config, HDF5 JSON attributes)."""
from __future__ import annotations

import json
import os
import shutil

import h5py
import pytest

from helpers import assert_clean_failure, invoke, make_tokens
from igpt_cli import formats, jsonfile
from igpt_cli.jsonfile import JSONFileError, loads_bounded, read_json
from igpt_cli.model import BUNDLED, list_models


def test_reads_json_and_follows_symlinks_to_regular_files(tmp_path):
    (tmp_path / "a.json").write_text('{"x": [1, 2]}')
    (tmp_path / "link.json").symlink_to(tmp_path / "a.json")
    assert read_json(tmp_path / "link.json") == {"x": [1, 2]}


@pytest.mark.parametrize("case, needle", [
    ("dev-zero", "not a regular file"),
    ("fifo", "not a regular file"),  # never opened for a blocking read: no writer needed to get here
    ("directory", "not a regular file"),
    ("huge", "more than"),
    ("not-json", "not valid JSON"),
    ("not-utf8", "not UTF-8"),
    ("missing", "No such file"),
])
def test_refuses_what_is_not_a_small_json_file(tmp_path, monkeypatch, case, needle):
    p = tmp_path / "config.json"
    if case == "dev-zero":
        p.symlink_to("/dev/zero")
    elif case == "fifo":
        os.mkfifo(p)
    elif case == "directory":
        p.mkdir()
    elif case == "huge":
        monkeypatch.setattr(jsonfile, "MAX_JSON_BYTES", 100)
        p.write_text(json.dumps({"x": "y" * 200}))
    elif case == "not-json":
        p.write_text("{not json")
    elif case == "not-utf8":
        p.write_bytes(b'{"x": "\xff"}')
    with pytest.raises(JSONFileError, match=needle) as e:
        read_json(p, "model config")
    assert str(e.value).startswith(str(p)) and "\n" not in str(e.value)


def test_loads_bounded_caps_json_held_elsewhere():
    assert loads_bounded('[1]', "attr x") == [1]
    with pytest.raises(JSONFileError, match="attr x: 11 bytes of JSON, more than 10"):
        loads_bounded('[1,2,3,4,5]', "attr x", max_bytes=10)


def test_models_skips_a_cached_config_that_is_a_symlink_to_dev_zero(tmp_path, monkeypatch):
    # the cache as huggingface_hub lays it out, one snapshot's config.json pointing at /dev/zero
    import huggingface_hub.constants

    from test_model_resolve import add_snapshot

    cache = tmp_path / "hub"
    model = tmp_path / "m"
    shutil.copytree(BUNDLED["igpt-cifar8"], model)
    add_snapshot(cache, "org/good", "a" * 40, model)
    bad = add_snapshot(cache, "org/bad", "b" * 40, model)
    (bad / "config.json").unlink()
    (bad / "config.json").symlink_to("/dev/zero")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert {r["name"] for r in list_models() if r["source"] == "hub"} == {"org/good"}
    r = invoke("models", "--json")
    assert r.exit_code == 0 and "org/bad" not in r.stdout and "org/good" in r.stdout


@pytest.mark.parametrize("command", ["extract", "score"])
def test_a_model_with_a_huge_config_is_one_line_and_never_read(tmp_path, command):
    model = tmp_path / "m"
    shutil.copytree(BUNDLED["igpt-cifar8"], model)
    os.truncate(model / "config.json", jsonfile.MAX_JSON_BYTES + 1)  # sparse: costs no disk
    tokens = make_tokens(tmp_path / "t.h5", 3, 8)
    r = invoke(command, tokens, "-m", model, "-o", tmp_path / "o.h5", "-q")
    assert_clean_failure(r, "config.json: the model config is 16,777,217 bytes, more than", out=tmp_path / "o.h5")


def test_an_oversized_json_attribute_is_a_format_error(tmp_path, monkeypatch):
    tokens = make_tokens(tmp_path / "t.h5", 3, 8)
    monkeypatch.setattr(jsonfile, "MAX_JSON_BYTES", 10)
    with h5py.File(tokens, "r") as f, pytest.raises(formats.FormatError, match="attr class_names"):
        formats.json_attr(f, "class_names")
