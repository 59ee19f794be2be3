"""The run directory: the resumable state (`train_state.pt`), checkpoints, and write failures.

`train_state.pt` holds everything a resume needs (weights, optimizer moments, step,
settings, history, the SHA-256 of the tokens files) in one file replaced atomically
(written to `train_state.pt.tmp`, fsynced, renamed). It is read with
`torch.load(weights_only=True)`, which never executes code, and then checked key by key:
a hostile, truncated, foreign or old file is one line naming the file and the problem.

Format versions: 2 (this one) added `format`, `format_version`, `train_sha256`,
`val_sha256`, `val_tokens`, `schedule_steps` and `loss_ema`; a version-1 state (igpt 0.1 before
them) is still resumed, without the tokens-file check it cannot do. Optional keys, absent from
older version-2 states: `world_size` (the processes that trained it, information only: a run
resumes on any number), `grad_scaler` (float16 training's loss scale), `init` (the model a
`--init` run started from), `objective` (a fine-tuning run's settings, JSON). A state's `eval_rows` setting is read as `val_images`.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator

import torch

from ..errors import InputError
from ..model import IGPTConfig
from ..model.checkpoint import load_tensor_pickle, why_unreadable
from ..outputs import OutputError
from ..runtime import DTYPES
from .config import TrainConfig, check_config

STATE_FILE = "train_state.pt"
TRAIN_META = "train_meta.json"
STATE_FORMAT = "igpt-train-state"
STATE_VERSION = 2
# files a run directory holds: a new run refuses a directory that has any of them
RUN_FILES = (STATE_FILE, TRAIN_META, "config.json", "model.safetensors", "pytorch_model.bin",
             "preprocessor_config.json")
# temp files of a checkpoint (ours, and save_pretrained's): removed when a checkpoint fails
METRICS_FILE = "metrics.jsonl"  # one JSON line per logged step (rank 0 writes it)
LOSS_PLOT = "loss.png"  # training and validation loss curves, redrawn at each evaluation
TENSORBOARD_DIR = "tensorboard"  # event files, when the tensorboard package is installed
TEMP_FILES = (STATE_FILE + ".tmp", ".model.safetensors.tmp", ".config.json.tmp", ".preprocessor_config.json.tmp",
              f".{TRAIN_META}.tmp", f".{METRICS_FILE}.tmp", f".{LOSS_PLOT}.tmp")

_V1_KEYS = {"model": dict, "model_config": str, "optimizer": dict, "step": int, "train_config": str,
            "compute_dtype": str, "history": str}
_V2_KEYS = {**_V1_KEYS, "train_sha256": str, "val_sha256": str, "val_tokens": str, "schedule_steps": int}


@dataclass
class RunState:
    step: int
    cfg: TrainConfig
    model_config: IGPTConfig
    model: dict
    optimizer: dict
    compute_dtype: str
    history: list
    schedule_steps: int | None = None  # the length the learning-rate schedule was planned for
    train_sha256: str = ""  # "" in version-1 states
    val_sha256: str = ""
    val_tokens: str = ""
    loss_ema: float | None = None  # the smoothed training loss, so a resumed run logs what an uninterrupted one does
    world_size: int = 1
    grad_scaler: dict | None = None  # torch.amp.GradScaler's state (float16 training only)
    init: str = ""  # the model the run started from (train --init), "" for random weights
    objective: dict | None = None  # the objective's settings (fine-tuning's); None or {} for pretraining
    version: int = STATE_VERSION

    def to_save(self) -> dict:
        return {"format": STATE_FORMAT, "format_version": STATE_VERSION, "model": self.model,
                "model_config": json.dumps(asdict(self.model_config)), "optimizer": self.optimizer,
                "step": self.step, "train_config": json.dumps(asdict(self.cfg)), "compute_dtype": self.compute_dtype,
                "history": json.dumps(self.history), "schedule_steps": self.schedule_steps,
                "train_sha256": self.train_sha256, "val_sha256": self.val_sha256, "val_tokens": self.val_tokens,
                "loss_ema": self.loss_ema, "world_size": self.world_size, "init": self.init,
                **({"objective": json.dumps(self.objective)} if self.objective else {}),
                **({"grad_scaler": self.grad_scaler} if self.grad_scaler is not None else {})}


# ---------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------
def _chain(e: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen:  # torch re-raises a failed write as a RuntimeError
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _is_disk_full(e: BaseException) -> bool:
    return any(getattr(x, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(x)
               or "os error 28" in str(x) or "Disk quota exceeded" in str(x) for x in _chain(e))


@contextlib.contextmanager
def write_errors(path: Path, what: str) -> Iterator[None]:
    """Turn a failed write inside the block into one line naming `path`: "no space left on
    device (…)" for a full disk or quota, "cannot write (…)" for other OS errors."""
    try:
        yield
    except InputError:
        raise
    except Exception as e:  # OSError, or a library's own error wrapping one (safetensors)
        if _is_disk_full(e):
            raise OutputError(f"{path}: no space left on device ({what})") from None
        os_error = next((x for x in _chain(e) if isinstance(x, OSError)), None)
        if os_error is not None:
            raise OutputError(f"{path}: cannot write ({os_error.strerror or os_error}; {what})") from None
        raise


def replace_file(path: Path, write) -> None:
    """`write(fh)` into `<path>.tmp` (or `.<name>.tmp`), fsync, rename onto `path`; the temp file
    never outlives a failure."""
    tmp = path.with_name(path.name + ".tmp") if path.name == STATE_FILE else path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_state(path: Path, state: RunState) -> None:
    replace_file(path, lambda fh: torch.save(state.to_save(), fh))


def write_text(path: Path, text: str) -> None:
    replace_file(path, lambda fh: fh.write(text.encode()))


def remove_temp_files(out: Path) -> None:
    for name in TEMP_FILES:
        with contextlib.suppress(OSError):
            (out / name).unlink(missing_ok=True)


# ---------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------
def read_state(path: Path) -> RunState:
    """The run state in `path`, checked; InputError naming the file and the problem otherwise."""
    def bad(problem: str) -> InputError:
        return InputError(f"{path}: {problem}; this is not a training state igpt can resume")

    try:
        raw = load_tensor_pickle(path)
    except MemoryError:
        raise bad("too large to load") from None
    except Exception as e:
        raise InputError(f"{path}: {why_unreadable(e)}") from None
    if not isinstance(raw, dict):
        raise bad(f"holds a {type(raw).__name__}, not a dict")
    fmt, version = raw.get("format", STATE_FORMAT), raw.get("format_version", 1)
    if fmt != STATE_FORMAT:
        raise bad(f"format {fmt!r}")
    if not isinstance(version, int) or version > STATE_VERSION:
        raise bad(f"format_version {version!r} is newer than this igpt reads ({STATE_VERSION})")
    keys = _V1_KEYS if version == 1 else _V2_KEYS
    missing = [k for k in keys if k not in raw]
    if missing:
        raise bad(f"missing {', '.join(missing)}")
    wrong = [k for k, t in keys.items() if not isinstance(raw[k], t) or (t is int and isinstance(raw[k], bool))]
    if wrong:
        raise bad(f"wrong type of {', '.join(wrong)}")
    try:
        model_config = IGPTConfig(**_json_dict(raw["model_config"], IGPTConfig))
        cfg = check_config(TrainConfig(**_renamed(json.loads(raw["train_config"]), TrainConfig)))
        history = json.loads(raw["history"])
    except InputError as e:
        raise bad(f"train_config: {e}") from None
    except (ValueError, TypeError) as e:
        raise bad(f"bad settings ({e})") from None
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise bad("history is not a list of records")
    mine = (model_config.n_layer, model_config.n_embd, model_config.n_head)
    if mine != (cfg.n_layer, cfg.n_embd, cfg.n_head) or not all(isinstance(v, int) and v > 0 for v in
                                                                   (*mine, model_config.vocab_size,
                                                                    model_config.n_positions)):
        raise bad(f"model_config {mine} does not match train_config")
    if not (model_config.n_inner is None or (isinstance(model_config.n_inner, int) and model_config.n_inner > 0)) \
            or not isinstance(model_config.layer_norm_epsilon, (int, float)) or not model_config.layer_norm_epsilon > 0:
        raise bad("model_config has a bad n_inner or layer_norm_epsilon")
    if raw["compute_dtype"] not in DTYPES:
        raise bad(f"compute_dtype {raw['compute_dtype']!r}")
    if raw["step"] < 0 or (version > 1 and raw["schedule_steps"] < 1):
        raise bad("negative step")
    extra = {k: raw[k] for k in ("schedule_steps", "train_sha256", "val_sha256", "val_tokens") if k in raw}
    if isinstance(raw.get("loss_ema"), float) and math.isfinite(raw["loss_ema"]):
        extra["loss_ema"] = raw["loss_ema"]
    if isinstance(raw.get("world_size"), int) and raw["world_size"] >= 1:
        extra["world_size"] = raw["world_size"]
    if isinstance(raw.get("grad_scaler"), dict):
        extra["grad_scaler"] = raw["grad_scaler"]
    if isinstance(raw.get("init"), str):
        extra["init"] = raw["init"]
    if "objective" in raw:
        try:
            objective = json.loads(raw["objective"]) if isinstance(raw["objective"], str) else None
        except ValueError:
            objective = None
        if not isinstance(objective, dict):
            raise bad("objective is not a JSON object")
        extra["objective"] = objective
    return RunState(step=raw["step"], cfg=cfg, model_config=model_config, model=raw["model"],
                    optimizer=raw["optimizer"], compute_dtype=raw["compute_dtype"], history=history,
                    version=version, **extra)


def _renamed(d, cls) -> dict:
    """Settings saved under an older name: `eval_rows` is now `val_images`."""
    if isinstance(d, dict) and "eval_rows" in d and "val_images" not in d:
        d = {("val_images" if k == "eval_rows" else k): v for k, v in d.items()}
    return _json_dict(d, cls)


def _json_dict(text, cls) -> dict:
    d = json.loads(text) if isinstance(text, str) else text
    if not isinstance(d, dict):
        raise ValueError(f"{cls.__name__} is not a JSON object")
    names = {f.name for f in fields(cls)}
    unknown = [k for k in d if k not in names]
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field {unknown[0]!r}")
    return d


def check_optimizer_state(opt: torch.optim.Optimizer, path: Path) -> None:
    """Adam moments of the right shapes for every parameter (else the first step would crash)."""
    for group in opt.param_groups:
        for p in group["params"]:
            s = opt.state.get(p, {})
            for k in ("exp_avg", "exp_avg_sq"):
                if k in s and (not isinstance(s[k], torch.Tensor) or s[k].shape != p.shape):
                    raise InputError(f"{path}: optimizer state {k} does not fit the model; "
                                     "this is not a training state igpt can resume")


def _does_not_fit(path: Path, e: BaseException) -> InputError:
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    return InputError(f"{path}: weights or optimizer state do not fit the model ({first[:160]}); "
                      "this is not a training state igpt can resume")


def load_weights(model: torch.nn.Module, state: RunState, path: Path) -> None:
    try:
        model.load_state_dict(state.model)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise _does_not_fit(path, e) from None


def load_optimizer(opt: torch.optim.Optimizer, state: RunState, path: Path) -> None:
    try:
        opt.load_state_dict(state.optimizer)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise _does_not_fit(path, e) from None
    check_optimizer_state(opt, path)
