"""igpt_cli.distributed: this process's place in a launch (torchrun / srun environment variables)."""
from __future__ import annotations

import pytest
import torch

from igpt_cli.distributed import DistContext
from igpt_cli.errors import InputError


def test_context_from_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    c = DistContext.from_env()
    assert (c.rank, c.world_size, c.active, c.is_main) == (0, 1, False, True)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    c = DistContext.from_env()
    assert (c.rank, c.world_size, c.local_rank, c.active, c.is_main) == (3, 4, 1, True, False)
    assert c.device_for(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(InputError, match="RANK=4"):
        DistContext.from_env()


