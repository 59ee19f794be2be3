"""Device and compute-dtype selection shared by every command that runs a model.

`resolve_device` also applies the reproducibility switch `IGPT_DETERMINISTIC=1` when the
device is a GPU (`apply_deterministic_mode`): deterministic CUDA kernels
(`torch.use_deterministic_algorithms`) and a fixed cuBLAS workspace, meant to give the same
bits run after run for the same command on the same GPU model, driver and torch
(`bench/gpu_check.py` measures it). The CPU needs no switch: the same command on the same
machine and thread count gives the same bits already.
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import torch

from .errors import InputError, ParameterError

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


def resolve_device(name: str) -> torch.device:
    name = str(getattr(name, "value", name) or "auto").lower()
    deterministic_requested()  # a bad IGPT_DETERMINISTIC is one line on any device
    if name == "auto":
        if torch.cuda.is_available():
            apply_deterministic_mode()
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = name.split(":")[0]
    if kind not in DEVICES:
        raise ParameterError("device", name, f"unknown device (choose from {', '.join(DEVICES)})")
    if kind == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ParameterError("device", name, f"no CUDA GPU available ({why}); use device 'cpu' or 'auto'")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ParameterError("device", name, "Apple MPS is not available on this machine; use device 'cpu' or 'auto'")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ParameterError("device", name, str(e)) from None
    if kind == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ParameterError("device", name, f"only {torch.cuda.device_count()} CUDA device(s) visible")
    if kind == "cuda":
        apply_deterministic_mode()
    return dev


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: oneDNN runs bf16 matmuls natively (≈2–3× float32)."""
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # pragma: no cover - private API drift
            pass
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def cuda_has_fast_bf16(device: torch.device) -> bool:
    """Native bf16 tensor cores on this GPU (compute capability 8.0+: A100, H100, L4, RTX 30xx…).

    Not `torch.cuda.is_bf16_supported()`: by default that counts emulation (True on a T4 or
    V100, where bf16 runs several times slower than float32) and asks about the current
    device, not `device`."""
    if torch.version.hip:  # ROCm: every GPU torch supports runs bf16
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index)[0] >= 8


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    name = str(getattr(name, "value", name) or "auto").lower()
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if cuda_has_fast_bf16(device) else torch.float32
        if device.type == "cpu":
            return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
        return torch.float32
    if name not in DTYPES:
        raise ParameterError("dtype", name, f"unknown dtype (choose from auto, {', '.join(DTYPES)})")
    return DTYPES[name]


# ---------------------------------------------------------------------------
# reproducibility on GPUs
# ---------------------------------------------------------------------------
DETERMINISTIC_ENV = "IGPT_DETERMINISTIC"
# cuBLAS is deterministic run to run only with a fixed workspace (NVIDIA's cuBLAS docs,
# "Results reproducibility"); torch checks this variable when deterministic mode is on.
CUBLAS_WORKSPACE = ":4096:8"


def deterministic_requested() -> bool:
    """`IGPT_DETERMINISTIC` as a switch: 1/true/yes/on, or 0/false/no/off/unset."""
    value = os.environ.get(DETERMINISTIC_ENV, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise InputError(f"environment variable {DETERMINISTIC_ENV}={os.environ[DETERMINISTIC_ENV]!r}: expected 1 or 0")


def apply_deterministic_mode() -> bool:
    """With `IGPT_DETERMINISTIC=1`: deterministic CUDA kernels for the rest of the process and
    `CUBLAS_WORKSPACE_CONFIG` (unless already set). Returns whether the mode is on.

    Strict (`torch.use_deterministic_algorithms(True)`): attention's backward then takes its
    deterministic path (flash and memory-efficient SDPA accumulate dQ without atomics only in
    strict mode; with `warn_only` they merely warn), and an op with no deterministic CUDA kernel
    stops the command with torch's error naming it rather than quietly varying. Called before
    the first GPU work of a command, as cuBLAS reads the variable when it starts. It removes
    run-to-run noise, not differences between batch shapes: cuBLAS picks kernels by shape."""
    if not deterministic_requested():
        return False
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    return True
