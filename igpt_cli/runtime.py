"""Device and compute-dtype selection shared by `extract` and `train`."""
from __future__ import annotations

import functools
import re
from pathlib import Path

import torch

from .errors import ParameterError

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


def resolve_device(name: str) -> torch.device:
    name = str(getattr(name, "value", name) or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
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


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    name = str(getattr(name, "value", name) or "auto").lower()
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        if device.type == "cpu":
            return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
        return torch.float32
    if name not in DTYPES:
        raise ParameterError("dtype", name, f"unknown dtype (choose from auto, {', '.join(DTYPES)})")
    return DTYPES[name]
