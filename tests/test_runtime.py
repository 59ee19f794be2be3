"""igpt_cli.runtime: device and compute-dtype selection."""
from __future__ import annotations

import os

import pytest
import torch

from igpt_cli.errors import InputError
from igpt_cli.runtime import apply_deterministic_mode, resolve_device, resolve_dtype


def test_device_and_dtype():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(InputError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            resolve_device("cuda")
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) in (torch.float32, torch.bfloat16)
    with pytest.raises(InputError):
        resolve_dtype("int8", torch.device("cpu"))


# --- the automatic dtype on a GPU: the chosen device's own capability, never emulation -------------
def fake_gpus(monkeypatch, capabilities: list[tuple[int, int]], current: int = 0):
    """CUDA as torch reports it on a machine with these GPUs (compute capabilities), without one.
    `is_bf16_supported` answers as torch does on a T4/V100 by default: True, by emulation."""
    def capability(device=None):
        index = device.index if isinstance(device, torch.device) else device
        return capabilities[current if index is None else index]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.version, "hip", None)


def test_auto_dtype_follows_the_chosen_gpu_not_emulation(monkeypatch):
    fake_gpus(monkeypatch, [(7, 5), (9, 0)])  # a T4 as cuda:0, an H100 as cuda:1
    assert resolve_dtype("auto", resolve_device("cuda:0")) == torch.float32  # emulated bf16 is slow: not chosen
    assert resolve_dtype("auto", resolve_device("cuda:1")) == torch.bfloat16
    assert resolve_dtype("auto", resolve_device("cuda")) == torch.float32  # bare cuda: the current device, cuda:0
    fake_gpus(monkeypatch, [(7, 0), (8, 0)], current=1)
    assert resolve_dtype("auto", resolve_device("cuda")) == torch.bfloat16  # the current device is the A100
    assert resolve_dtype("auto", resolve_device("cuda:0")) == torch.float32  # not the current one: V100
    assert resolve_dtype("bfloat16", resolve_device("cuda:0")) == torch.bfloat16  # asked for: given


# --- IGPT_DETERMINISTIC ------------------------------------------------------------------------------
@pytest.fixture
def restore_determinism(monkeypatch):
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_deterministic_switch_applies_on_gpus_only(monkeypatch, restore_determinism):

    torch.use_deterministic_algorithms(False)
    monkeypatch.setenv("IGPT_DETERMINISTIC", "1")
    assert resolve_device("cpu").type == "cpu"
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    fake_gpus(monkeypatch, [(9, 0)])
    assert resolve_device("cuda") == torch.device("cuda")
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's own choice is kept
    assert apply_deterministic_mode() and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    torch.use_deterministic_algorithms(False)
    monkeypatch.setenv("IGPT_DETERMINISTIC", "0")
    assert resolve_device("auto") == torch.device("cuda") and not torch.are_deterministic_algorithms_enabled()


def test_bad_deterministic_value_is_one_line(monkeypatch):
    monkeypatch.setenv("IGPT_DETERMINISTIC", "sometimes")
    with pytest.raises(InputError, match=r"IGPT_DETERMINISTIC='sometimes': expected 1 or 0") as e:
        resolve_device("cpu")
    assert "\n" not in str(e.value)


@pytest.mark.gpu
def test_auto_dtype_on_this_gpu_matches_its_capability():
    dev = resolve_device("cuda")
    major, _ = torch.cuda.get_device_capability(dev)
    assert resolve_dtype("auto", dev) == (torch.bfloat16 if major >= 8 else torch.float32)
    assert torch.cuda.is_bf16_supported(including_emulation=False) == (major >= 8)


@pytest.mark.gpu
def test_deterministic_mode_repeats_cuda_training_bit_for_bit(tmp_path):
    """README "Reproducibility": with IGPT_DETERMINISTIC=1 two identical training runs on one GPU
    give the same bits (a child process: the mode lasts for the rest of a process)."""
    import subprocess
    import sys

    from helpers import ENV, make_tokens

    tok = make_tokens(tmp_path / "t.h5", 64, 4, high=16)
    code = ("import sys; from igpt_cli import TrainConfig, pretrain\n"
            "cfg = TrainConfig(n_layer=2, n_embd=32, n_head=2, steps=6, batch_size=8, warmup_steps=1, seed=0)\n"
            "for d in sys.argv[2:]: pretrain(sys.argv[1], d, cfg, device='cuda', dtype='float32')")
    r = subprocess.run([sys.executable, "-c", code, str(tok), str(tmp_path / "a"), str(tmp_path / "b")],
                       capture_output=True, text=True, env=dict(ENV, IGPT_DETERMINISTIC="1"), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
