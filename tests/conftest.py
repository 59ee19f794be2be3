import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IGPT_SHARED", ROOT.parent / "shared")) / "data"
CIFAR_TAR = SHARED / "cifar10-jpeg.tar"
PALETTE_NPY = SHARED / "kmeans_centers.npy"


@pytest.fixture(scope="session")
def cifar_tar() -> Path:
    # The shared data is part of the test environment (CI has ../shared beside the clone):
    # a missing file is a broken environment, so fail loudly rather than skip.
    assert CIFAR_TAR.is_file(), f"shared data missing: {CIFAR_TAR}"
    return CIFAR_TAR


@pytest.fixture(scope="session")
def official_palette_path() -> Path:
    assert PALETTE_NPY.is_file(), f"shared data missing: {PALETTE_NPY}"
    return PALETTE_NPY


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs for the disk-full cases (root only: skipped, saying why, where mounting is impossible)."""
    from helpers import small_tmpfs

    with small_tmpfs(tmp_path / "small-fs", "1m") as d:
        yield d


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where CUDA is: elsewhere they are skipped, saying so (the one
    marker allowed to skip; `bench/gpu_check.py` runs them on a GPU and counts them there)."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_tests:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: no CUDA device here (run `pytest -m gpu` on a GPU machine)")
    for item in gpu_tests:
        item.add_marker(skip)
