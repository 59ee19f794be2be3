"""This process's place in a multi-process run: torchrun, Slurm's srun, or one plain process.

Every heavy command runs under any launcher that sets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
`MASTER_ADDR` and `MASTER_PORT` (torchrun does; so does `srun` with those exported), with
nothing else changed on its command line. `DistContext.from_env()` reads them (a plain
process is world size 1, and then every method here is a no-op), `device_for` maps a rank to
its device, `init` joins the process group (NCCL for CUDA with a GPU per rank, gloo otherwise) plus a gloo
control group with a long timeout for the small messages of the protocol: `gather`,
`broadcast`, `check` (any rank's error stops every rank, the failing one loudly),
`agree` (every rank must run the same settings: rank 0's hash is the reference) and
`barrier`.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass, field

import torch

from .errors import InputError


class PeerError(InputError):
    """Another rank failed with bad input; this rank exits 2 without repeating the message."""

    quiet = True


def _env_int(name: str, default: int | None = None) -> int | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise InputError(f"environment variable {name}={v!r}: expected an integer") from None


def _env_seconds(name: str, default: float) -> float:
    v = os.environ.get(name)
    try:
        return float(v) if v else default
    except ValueError:
        raise InputError(f"environment variable {name}={v!r}: expected seconds") from None


@dataclass
class DistContext:
    """This process's place in a multi-process run (world_size 1: a plain single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # ranks on this node (torchrun's LOCAL_WORLD_SIZE; 1 when not said)
    init_timeout_s: float = 300.0
    wait_timeout_s: float = 7 * 24 * 3600.0
    part_wait_s: float = 60.0
    group: object = field(default=None, repr=False)
    initialized: bool = False

    @classmethod
    def from_env(cls) -> "DistContext":
        ws = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        local = _env_int("LOCAL_RANK", rank if ws and ws > 1 else 0)
        if ws < 1:
            raise InputError(f"WORLD_SIZE={ws}: must be at least 1")
        if not 0 <= rank < ws:
            raise InputError(f"RANK={rank} is not in 0..{ws - 1} (WORLD_SIZE={ws})")
        return cls(rank=rank, world_size=ws, local_rank=local, local_world_size=_env_int("LOCAL_WORLD_SIZE", 1) or 1,
                   init_timeout_s=_env_seconds("IGPT_DIST_TIMEOUT", 300.0),
                   part_wait_s=_env_seconds("IGPT_PART_WAIT", 60.0))

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device_for(self, dev: torch.device) -> torch.device:
        """This rank's device: a bare `cuda` becomes `cuda:(LOCAL_RANK mod visible GPUs)`, so more
        ranks than GPUs share them round-robin (Slurm with one GPU per task sees one: cuda:0),
        and becomes this process's current CUDA device. An explicit index under a multi-process
        launcher would put every rank on that GPU: refused. A plain process: `dev` unchanged
        (the current device is the caller's business)."""
        if not self.active or dev.type != "cuda":
            return dev
        if dev.index is not None:
            raise InputError(f"device {dev} names one GPU, but this is rank {self.rank} of {self.world_size}: "
                             "pass device 'cuda' (each rank takes cuda:LOCAL_RANK) and choose GPUs with "
                             "CUDA_VISIBLE_DEVICES")
        n = torch.cuda.device_count()
        if n < 1:
            raise InputError(f"rank {self.rank}: no CUDA device is visible")
        dev = torch.device("cuda", self.local_rank % n)
        torch.cuda.set_device(dev)
        return dev

    def backend_for(self, device: torch.device) -> str:
        """NCCL for CUDA with one GPU per rank; gloo on CPUs, and where this node's ranks share
        GPUs (NCCL refuses two ranks on one GPU: "Duplicate GPU detected"). torchrun says how many
        ranks share the node (LOCAL_WORLD_SIZE); without it every rank is assumed to have its own."""
        if device.type != "cuda":
            return "gloo"
        return "gloo" if self.local_world_size > torch.cuda.device_count() else "nccl"

    def init(self, device: torch.device) -> None:
        """Join the process group (`backend_for(device)`); failures are one-line input errors."""
        if not self.active or self.initialized:
            return
        import torch.distributed as dist

        backend = self.backend_for(device)
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if missing:
            raise InputError(f"WORLD_SIZE={self.world_size} is set but {' and '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} not: launch with torchrun or srun "
                             f"(see docs/guides/clusters.md)")
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        try:
            if not dist.is_initialized():
                timeout = _dt.timedelta(seconds=self.init_timeout_s)
                store = None
                if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
                    # torchrun shares its rendezvous store with the workers and keeps it across
                    # --max-restarts attempts: without a per-attempt prefix a restarted gloo group
                    # reads the dead attempt's peer addresses and never connects (pytorch#135712).
                    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                         world_size=self.world_size, is_master=False, timeout=timeout)
                    attempt = (f"igpt/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/"
                               f"attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}")
                    store = dist.PrefixStore(attempt, base)
                dist.init_process_group(backend=backend, store=store, rank=self.rank, world_size=self.world_size,
                                        timeout=timeout)
            # control messages: CPU tensors over gloo, patient enough for uneven shards
            self.group = dist.new_group(backend="gloo", timeout=_dt.timedelta(seconds=self.wait_timeout_s))
        except Exception as e:  # noqa: BLE001 - any rendezvous failure is reported in one line
            msg = " ".join(str(e).split())
            msg = msg if len(msg) < 300 else msg[:297] + "…"
            raise InputError(f"rank {self.rank} of {self.world_size}: rendezvous at {where} ({backend}) failed "
                             f"within {self.init_timeout_s:g} s: {type(e).__name__}: {msg}") from None
        self.initialized = True

    # --- collectives over the gloo control group ---------------------------------
    def gather(self, obj) -> list:
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def check(self, error: str | None) -> None:
        """Collective: if any rank has an error, every rank raises (the failing ones loudly)."""
        errors = self.gather(error)
        if error:
            raise InputError(error)
        for r, e in enumerate(errors):
            if e:
                raise PeerError(f"rank {r} failed: {e}")

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def agree(self, settings: dict, what: str = "settings") -> None:
        """Collective: every rank must run with rank 0's `settings` (the flags that shape the
        result); a rank whose settings differ stops every rank with a line naming the difference."""
        if not self.active:
            return
        mine = settings_hash(settings)
        everyone = self.gather((mine, settings))
        ref_hash, ref = everyone[0]
        for r, (h, s) in enumerate(everyone):
            if h != ref_hash:
                keys = sorted(k for k in set(ref) | set(s) if ref.get(k) != s.get(k))
                diff = ", ".join(f"{k}: {s.get(k)!r} vs {ref.get(k)!r}" for k in keys[:3])
                msg = (f"rank {r} of {self.world_size} runs with other {what} than rank 0 ({diff}); "
                       "start every rank with the same command")
                raise InputError(msg) if self.rank == r else PeerError(msg)  # said once, by that rank

    def run_checked(self, fn):
        """Collective: `fn()` on every rank; if any rank raises an InputError, every rank raises.
        The failing ranks re-raise their own error, except that a rank whose error is rank 0's (every
        rank checked the same thing) stays quiet (PeerError) so the line is said once; the others
        raise PeerError naming the first failing rank."""
        error = None
        try:
            value = fn()
        except InputError as e:
            error = e
        if self.active:
            errors = self.gather(None if error is None else str(error))
            failed = next(((r, e) for r, e in enumerate(errors) if e), None)
            if failed is not None:
                if error is not None and not self.is_main and errors[0] == str(error):
                    raise PeerError(str(error))
                if error is None:
                    raise PeerError(f"rank {failed[0]} failed: {failed[1]}")
        if error is not None:
            raise error
        return value

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def close(self) -> None:
        if self.initialized:
            import torch.distributed as dist

            try:
                dist.destroy_process_group()
            except Exception:  # pragma: no cover
                pass
            self.initialized = False




def settings_hash(settings: dict) -> str:
    """A stable digest of a settings dict (JSON with sorted keys; non-JSON values by their str)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def env_world_size() -> int:
    """WORLD_SIZE of the environment (1 outside a launcher)."""
    return int(_env_int("WORLD_SIZE", 1) or 1)
