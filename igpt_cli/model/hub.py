"""Models by Hugging Face hub id (``openai/imagegpt-small``), through `huggingface_hub`.

`hub_snapshot(repo_id, revision=..., local_files_only=...)` is the snapshot directory of
the files igpt needs (config.json, the weights, preprocessor_config.json) in the hub
cache, downloaded when the network allows. `huggingface_hub` owns the cache: its layout
(``models--org--name/{refs,snapshots,blobs}``), ``HF_HOME`` / ``HF_HUB_CACHE`` and
``HF_HUB_OFFLINE``. Weights: safetensors when the repo has them, else
``pytorch_model.bin`` (loaded weights-only). Downloads draw huggingface_hub's own progress
bars on stderr unless `quiet`.

Offline (or local_files_only) and not cached: one `CheckpointError` that says so and
shows the command that fetches the files (`fetch_command`). `cached_models()` lists the
iGPT models in the cache for `igpt models`, reading the cache's layout itself with bounded
reads (a planted FIFO or huge ref is skipped with a warning, never waited on or read whole).
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Callable

from ..errors import InputError
from ..jsonfile import loads_bounded, read_bounded, read_json
from .checkpoint import CheckpointError

CONFIG_FILES = ["config.json", "preprocessor_config.json"]
SAFETENSORS = "*.safetensors"
PYTORCH_BIN = "pytorch_model.bin"
SAFETENSORS_HEADER_MAX = 100 << 20  # the safetensors format's own limit on its JSON header
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_hub_id(name: str) -> bool:
    """Whether `name` reads as ``org/name`` (not a path: no leading ``.``, ``/`` or ``~``, one slash)."""
    return bool(HUB_ID.match(str(name)))


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set now (read at call time, not at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def fetch_command(repo_id: str, revision: str | None = None) -> str:
    """The shell command that puts a model's files into the hub cache (huggingface_hub's `hf` CLI)."""
    rev = f" --revision {revision}" if revision else ""
    return f"hf download {repo_id}{rev} config.json model.safetensors preprocessor_config.json"


def hub_snapshot(repo_id: str, *, revision: str | None = None, local_files_only: bool = False,
                 quiet: bool = False) -> Path:
    """The cached snapshot directory of `repo_id` at `revision` (None: main) holding config.json,
    the weights and (when the repo has one) preprocessor_config.json; downloads what is missing
    unless `local_files_only` or ``HF_HUB_OFFLINE``. CheckpointError (one line) otherwise."""
    import huggingface_hub
    from huggingface_hub import utils as hf_utils

    local = local_files_only or offline()
    was_disabled = hf_utils.are_progress_bars_disabled()
    if quiet:
        hf_utils.disable_progress_bars()
    try:
        snap = _download(huggingface_hub, repo_id, revision, local, [*CONFIG_FILES, SAFETENSORS])
        if not any(snap.glob(SAFETENSORS)) and not (snap / PYTORCH_BIN).is_file():
            snap = _download(huggingface_hub, repo_id, revision, local, [*CONFIG_FILES, PYTORCH_BIN])
    finally:
        if quiet and not was_disabled:
            hf_utils.enable_progress_bars()
    if not (snap / "config.json").is_file():
        raise CheckpointError(f"{repo_id}: the cached snapshot {snap} has no config.json; "
                              f"fetch it with: {fetch_command(repo_id, revision)}")
    return snap


def _download(hf, repo_id: str, revision: str | None, local: bool, patterns: list[str]) -> Path:
    """`snapshot_download` of `patterns`, its errors as one CheckpointError."""
    from huggingface_hub import errors

    at = f"@{revision}" if revision else ""
    try:
        return Path(hf.snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                         local_files_only=local))
    except errors.LocalEntryNotFoundError:
        why = "offline" if local else "no network"
        raise CheckpointError(f"{repo_id}{at}: not in the Hugging Face cache ({why}); fetch it where there is a "
                              f"network with: {fetch_command(repo_id, revision)}") from None
    except errors.RevisionNotFoundError:
        raise CheckpointError(f"{repo_id}: no revision {revision!r} on the Hugging Face hub") from None
    except errors.RepositoryNotFoundError:
        raise CheckpointError(f"{repo_id}: no such model on the Hugging Face hub (or it is private: "
                              "log in with `hf auth login`)") from None
    except (errors.HfHubHTTPError, OSError, ValueError) as e:
        first = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{repo_id}{at}: Hugging Face hub error: {first}") from None


# ---------------------------------------------------------------------------
# What is in the cache (`igpt models`)
# ---------------------------------------------------------------------------
def model_summary(name: str, model_dir: Path, *, source: str, revision: str | None = None,
                  size_bytes: int | None = None) -> dict | None:
    """One row of `igpt models` for an ImageGPT directory (None when its config is not an ImageGPT one)."""
    from .checkpoint import find_weights, read_config

    try:
        raw = read_json(model_dir / "config.json", "model config")
        if raw.get("model_type", "imagegpt") != "imagegpt":
            return None
        cfg = read_config(model_dir)
        weights = find_weights(model_dir)
    except (OSError, ValueError, AttributeError):
        return None
    if size_bytes is None:
        size_bytes = sum(p.stat().st_size for p in model_dir.iterdir() if p.is_file())
    return dict(name=name, source=source, layers=cfg.n_layer, width=cfg.n_embd, heads=cfg.n_head,
                positions=cfg.n_positions, resolution=cfg.side, palette=cfg.vocab_size - 1,
                parameters=_parameters(weights), size_bytes=int(size_bytes), revision=revision,
                path=str(model_dir))


def _parameters(weights: Path) -> int | None:
    """Number of weights in a safetensors file, from its header (None for other files)."""
    if weights.suffix != ".safetensors":
        return None
    try:
        with open(weights, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n <= SAFETENSORS_HEADER_MAX:
                return None
            header = loads_bounded(fh.read(n), f"{weights}: header", max_bytes=SAFETENSORS_HEADER_MAX)
    except (OSError, ValueError):
        return None
    if not isinstance(header, dict):
        return None
    total = 0
    for k, v in header.items():
        if k != "__metadata__" and isinstance(v, dict):
            size = 1
            for s in v.get("shape", []):
                size *= int(s)
            total += size
    return total


REF_MAX_BYTES = 4096  # a refs/ file holds one commit hash (40 hex digits)
COMMIT_HASH = re.compile(r"^[0-9a-f]{40}$")


def hub_cache_dir() -> Path:
    """The hub cache named now (`HF_HUB_CACHE`, else under `HF_HOME`), as huggingface_hub resolves it."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def read_ref(path: str | Path) -> str:
    """The commit hash a ``refs/`` file of the hub cache holds, read bounded (`jsonfile.read_bounded`:
    a FIFO, a device or a symlink to one is never read or waited on, a file over REF_MAX_BYTES
    never read whole); InputError (one line naming the file) for anything but one commit hash."""
    data = read_bounded(path, "hub ref", max_bytes=REF_MAX_BYTES)
    text = data.decode("ascii", "replace").strip()
    if not COMMIT_HASH.match(text):
        raise InputError(f"{path}: the hub ref does not hold a commit hash")
    return text


def _scan_hub_cache(cache: Path, on_warning: Callable[[str], None]) -> list[tuple]:
    """(repo id, commit, snapshot dir, ref names, bytes, last modified) of every model snapshot in the
    hub cache `cache` (its layout: ``models--org--name/{refs,snapshots}``), read with bounded reads
    only; a ref that cannot be read safely is skipped with `on_warning`, never a crash or a hang
    (huggingface_hub's `scan_cache_dir` reads refs whole, and blocks on a FIFO)."""
    try:
        repos = [e for e in os.scandir(cache) if e.name.startswith("models--")
                 and e.is_dir(follow_symlinks=False)] if cache.is_dir() else []
    except OSError as e:
        on_warning(f"{cache}: cannot list the Hugging Face cache ({e.strerror}); skipped")
        return []
    found = []
    for entry in sorted(repos, key=lambda e: e.name):
        repo_id = entry.name[len("models--"):].replace("--", "/")
        repo = Path(entry.path)
        if (repo / "refs").is_symlink() or (repo / "snapshots").is_symlink():
            on_warning(f"{repo}: its refs or snapshots folder is a symbolic link (huggingface_hub never makes "
                       "one); skipped")
            continue
        refs: dict[str, list[str]] = {}
        for root, _dirs, files in os.walk(repo / "refs"):  # symlinked directories are not walked
            for name in sorted(files):
                path = Path(root) / name
                try:
                    commit = read_ref(path)
                except InputError as e:
                    on_warning(f"{e}; skipped")
                    continue
                refs.setdefault(commit, []).append(path.relative_to(repo / "refs").as_posix())
        try:
            snaps = [e for e in os.scandir(repo / "snapshots") if e.is_dir(follow_symlinks=False)]
        except OSError:
            continue  # no snapshots: nothing to list
        for snap in snaps:
            size, mtime = _snapshot_size(Path(snap.path))
            found.append((repo_id, snap.name, Path(snap.path), sorted(refs.get(snap.name, [])), size, mtime))
    return found


def _snapshot_size(snap: Path) -> tuple[int, float]:
    """Bytes of the regular files a snapshot holds (each blob once) and their latest mtime; what
    is not a regular file (a link to a device, a FIFO) is not counted, and nothing is read."""
    seen, size, mtime = set(), 0, 0.0
    for root, _dirs, files in os.walk(snap):
        for name in files:
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                size += st.st_size
                mtime = max(mtime, st.st_mtime)
    return size, mtime


def cached_models(on_warning: Callable[[str], None] | None = None) -> list[dict]:
    """Every ImageGPT snapshot in the hub cache, one row per revision (sorted by repo id, newest
    first). The cache is read with bounded reads only (`_scan_hub_cache`); a hostile entry (a ref
    that is a FIFO, a device, huge, or not a commit hash) is skipped and said to `on_warning`."""
    rows = []
    found = _scan_hub_cache(hub_cache_dir(), on_warning or (lambda message: None))
    for repo_id, commit, snap, refs, size, _ in sorted(found, key=lambda r: (r[0], -r[5])):
        label = f"{commit[:12]}" + (f" ({','.join(refs)})" if refs else "")
        row = model_summary(repo_id, snap, source="hub", revision=label, size_bytes=size)
        if row is not None:
            rows.append(row)
    return rows
