"""Every kind of igpt file carries provenance attrs (command line, versions, device, UTC time), and
`igpt info` shows them (table and --json)."""
from __future__ import annotations

import json
from datetime import datetime

import h5py
import numpy as np
import pytest
from helpers import invoke

from igpt_cli import (complete_file, extract_features, extract_image_features, formats, quantize_dataset,
                      sample_file, score_file)
from igpt_cli.model import BUNDLED
from igpt_cli.provenance import PROVENANCE_KEYS

MODEL = "igpt-cifar8"
RUN = dict(batch_size=4, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def files(tmp_path_factory, cifar_tar):
    """One file of every kind igpt writes, from the shipped model and the CIFAR-10 tar."""
    t = tmp_path_factory.mktemp("prov")
    quantize_dataset(cifar_tar, t / "tok.h5", split="test", size=8, limit=4, palette=BUNDLED[MODEL])
    extract_features(t / "tok.h5", MODEL, "1", t / "feats.h5", **RUN)
    extract_image_features(cifar_tar, MODEL, "1", t / "imgfeats.h5", split="test", limit=4, **RUN)
    score_file(t / "tok.h5", MODEL, t / "scores.h5", **RUN)
    sample_file(MODEL, 2, t / "samples.h5", **RUN)
    complete_file(t / "tok.h5", MODEL, t / "completions.h5", limit=2, **RUN)
    return t


KINDS = ["tok.h5", "feats.h5", "imgfeats.h5", "scores.h5", "samples.h5", "completions.h5"]


@pytest.mark.parametrize("name", KINDS)
def test_every_file_kind_has_provenance(files, name):
    with formats.open_igpt(files / name) as f:
        a = formats.read_attrs(f)
    missing = [k for k in PROVENANCE_KEYS if k not in a]
    assert not missing, (name, missing)
    assert a["igpt_version"] and a["numpy_version"] == np.__version__ and a["h5py_version"] == h5py.version.version
    assert datetime.fromisoformat(a["created_utc"]).utcoffset().total_seconds() == 0
    assert a["device_name"] and a["command"]
    if name != "tok.h5":  # the model ran: torch was loaded
        import torch

        assert a["torch_version"] == str(torch.__version__)


def test_long_command_lines_are_cut(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["igpt", "features", *[f"img{i:06d}.jpg" for i in range(5000)]])
    with h5py.File(tmp_path / "x.h5", "w") as f:
        formats.stamp_provenance(f)
        cmd = f.attrs["command"]
    assert cmd.startswith("igpt features img000000.jpg") and len(cmd) < formats.MAX_COMMAND + 50


def test_info_prints_provenance(files):
    r = invoke("info", files / "feats.h5")
    assert r.returncode == 0
    for k in PROVENANCE_KEYS:
        assert f"{k}:" in r.stdout, k
    d = json.loads(invoke("info", files / "tok.h5", "--json").stdout)
    assert set(PROVENANCE_KEYS) <= set(d["attrs"])
