"""igpt_cli.distributed: which GPU each rank takes, and which process-group backend it joins.

No GPU here: torch's CUDA queries are replaced by what torch reports on a machine with N GPUs
(`device_count`, `is_available`), and the one C call under `torch.cuda.set_device` is recorded,
so torch's own `set_device` (its argument checks included) runs for real.
"""
from __future__ import annotations

import pytest
import torch

from igpt_cli.distributed import DistContext
from igpt_cli.errors import InputError


@pytest.fixture
def gpus(monkeypatch):
    """`gpus(n)`: n visible GPUs; returns the list of device indices `set_device` was called with."""
    calls: list[int] = []

    def visible(n: int) -> list[int]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch._C, "_cuda_setDevice", calls.append, raising=False)
        return calls

    return visible


def launched(rank: int, world: int, local_rank: int | None = None, local_world: int | None = None) -> DistContext:
    return DistContext(rank=rank, world_size=world, local_rank=rank if local_rank is None else local_rank,
                       local_world_size=world if local_world is None else local_world)


def test_ranks_take_the_visible_gpus_round_robin(gpus):
    calls = gpus(2)
    devices = [launched(r, 3).device_for(torch.device("cuda")) for r in range(3)]
    assert devices == [torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cuda", 0)]
    assert calls == [0, 1, 0]  # each rank's current device is its own
    # two nodes of 4 ranks and 4 GPUs: LOCAL_RANK, not RANK, picks the GPU
    gpus(4)
    assert launched(6, 8, local_rank=2, local_world=4).device_for(torch.device("cuda")) == torch.device("cuda", 2)
    # Slurm with one GPU per task: every rank sees one GPU, cuda:0
    calls = gpus(1)
    assert launched(5, 8, local_rank=1).device_for(torch.device("cuda")) == torch.device("cuda", 0)


def test_an_explicit_gpu_under_a_launcher_is_refused_in_one_line(gpus):
    calls = gpus(2)
    with pytest.raises(InputError) as e:
        launched(1, 2).device_for(torch.device("cuda", 0))
    msg = str(e.value)
    assert "\n" not in msg and "cuda:0 names one GPU" in msg and "rank 1 of 2" in msg and "CUDA_VISIBLE_DEVICES" in msg
    assert calls == []
    gpus(0)
    with pytest.raises(InputError, match="rank 0: no CUDA device is visible"):
        launched(0, 2).device_for(torch.device("cuda"))


def test_a_plain_process_keeps_its_device(gpus):
    calls = gpus(2)
    plain = DistContext()
    for name in ("cuda", "cuda:1", "cpu"):  # bare `cuda` stays bare: set_device would refuse it
        assert plain.device_for(torch.device(name)) == torch.device(name)
    assert calls == []
    assert launched(1, 2).device_for(torch.device("cpu")) == torch.device("cpu")  # CPU ranks: nothing to map


def test_from_env_reads_the_local_world(monkeypatch):
    for k, v in dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2").items():
        monkeypatch.setenv(k, v)
    c = DistContext.from_env()
    assert (c.rank, c.world_size, c.local_rank, c.local_world_size) == (3, 4, 1, 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert DistContext.from_env().local_world_size == 1  # srun: not said


def test_backend_nccl_only_with_a_gpu_per_rank(gpus):
    gpus(8)
    assert launched(0, 8).backend_for(torch.device("cuda", 0)) == "nccl"
    assert launched(0, 16, local_world=8).backend_for(torch.device("cuda", 0)) == "nccl"  # 2 nodes x 8
    gpus(1)
    # 2 ranks on one GPU: NCCL would stop with "Duplicate GPU detected"; gloo runs
    assert launched(1, 2).backend_for(torch.device("cuda", 0)) == "gloo"
    assert launched(1, 2, local_world=1).backend_for(torch.device("cuda", 0)) == "nccl"  # one task per GPU (srun)
    assert launched(0, 2).backend_for(torch.device("cpu")) == "gloo"


@pytest.mark.gpu
def test_ranks_map_onto_this_machines_gpus():
    n = torch.cuda.device_count()
    for r in range(n + 1):
        assert launched(r, n + 1).device_for(torch.device("cuda")) == torch.device("cuda", r % n)
        assert torch.cuda.current_device() == r % n
    torch.cuda.set_device(0)


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


