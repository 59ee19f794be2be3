"""igpt_cli.runtime: device and compute-dtype selection."""
from __future__ import annotations

import pytest
import torch

from igpt_cli.errors import InputError
from igpt_cli.runtime import resolve_device, resolve_dtype


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
