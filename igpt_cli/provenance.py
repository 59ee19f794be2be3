"""Where an output file came from: one dict of attrs written into every igpt file.

`provenance(device=...)` gives the command line that made the file, the versions of igpt,
torch, numpy, h5py and Python, the host's device name, the creation time (UTC, ISO 8601) and
the number of processes that wrote it (`world_size`: 1, or the launcher's WORLD_SIZE).
Writers add it to their HDF5 attrs under `PROVENANCE_KEYS` beside their own model and data
hashes; `igpt info` shows it. Nothing here reads a file or imports torch unless it is
already loaded (a tokens file written without torch says so: ``torch_version`` = "").
"""
from __future__ import annotations

import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

from . import __version__

PROVENANCE_KEYS = ("created_utc", "command", "igpt_version", "python_version", "numpy_version", "torch_version",
                   "h5py_version", "device_name", "world_size")


def command_line(argv: list[str] | None = None) -> str:
    """The process's command line, program name without its directory (`igpt extract …`)."""
    argv = list(sys.argv if argv is None else argv) or ["python"]
    return shlex.join([Path(argv[0]).name, *argv[1:]])


def device_name(device: str | None = None) -> str:
    """A readable name of the compute device: the GPU's name for cuda, the CPU model otherwise."""
    if device and str(device).startswith("cuda") and "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.device(device))
    if device and str(device).startswith("mps"):
        return "Apple MPS"
    return _cpu_name()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def world_size() -> int:
    """Processes of this run: the launcher's WORLD_SIZE (torchrun, srun), else 1."""
    import os

    try:
        return max(1, int(os.environ.get("WORLD_SIZE") or 1))
    except ValueError:
        return 1


def provenance(device: str | None = None, command: str | None = None) -> dict[str, str | int]:
    """The attrs every output file carries (see the module docstring)."""
    import h5py
    import numpy as np

    torch = sys.modules.get("torch")
    return {
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else command_line(),
        "igpt_version": __version__,
        "python_version": platform.python_version(),
        "numpy_version": np.__version__,
        "torch_version": getattr(torch, "__version__", "") if torch else "",
        "h5py_version": h5py.version.version,
        "device_name": device_name(device),
        "world_size": world_size(),
    }
