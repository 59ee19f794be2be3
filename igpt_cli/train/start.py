"""How a run starts: a new run's or a resumed run's settings, model and validation data,
the split of a global batch over ranks and micro-batches, and failing on every rank at once.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from pathlib import Path

from ..distributed import DistContext, PeerError
from ..errors import InputError, ParameterError
from ..formats import sha256_file
from ..model import IGPTConfig
from .config import TrainConfig, resumed_config, total_steps
from .data import TokenData, check_val, load_tokens
from .init import InitModel
from .state import RUN_FILES, STATE_FILE, RunState, read_state
from .watch import DrawLoss


@dataclass
class Start:
    """What the loop needs, from a new run or a resumed one."""
    cfg: TrainConfig
    model_config: IGPTConfig
    val: TokenData | None
    val_sha256: str
    val_path: str
    state: RunState | None  # the resumed run's state
    schedule_steps: int | None = None
    init: InitModel | None = None  # a new run's starting model (init=)


@dataclass
class Options:
    """How this call runs (not what it trains: none of these changes the model beyond float rounding)."""
    grad_accum: int = 1
    compile: bool = False
    activation_checkpointing: bool = False
    draw_loss: DrawLoss | None = None


def discard_run(out: Path, extra: tuple[str, ...] = ()) -> None:
    """`restart=True`: remove the training run in `out` (its state, model, logs and kept step-*
    models, and the `extra` files its objective wrote) so that a new one starts there. Only a directory that holds nothing but what a run
    writes is emptied; anything else in it is refused (never lose a user's other files)."""
    from .state import LOSS_PLOT, METRICS_FILE, TENSORBOARD_DIR

    if not out.is_dir():
        return
    ours = set(RUN_FILES) | {METRICS_FILE, LOSS_PLOT, TENSORBOARD_DIR} | set(extra)
    entries = list(out.iterdir())
    others = [p.name for p in entries if p.name not in ours and not p.name.startswith("step-")
              and not (p.name.startswith(".") and p.name.endswith((".tmp", ".lock")))]
    if others:
        raise InputError(f"{out}: holds files no training run wrote ({', '.join(sorted(others)[:3])}); "
                         "restart into a new directory or remove them")
    import shutil

    for p in entries:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def fresh_run(out: Path, cfg: TrainConfig, data: TokenData, val_tokens, init: InitModel | None,
              files: tuple[str, ...] = ()) -> Start:
    """A new run in `out`. Refused when `out` holds a run, a model, or a file a run would replace there:
    the objective's `files` (a fine-tuning report), or logs (metrics.jsonl, loss.png) that are not
    those of a run that saved nothing (killed before its first checkpoint: started anew)."""
    if (out / STATE_FILE).exists():
        raise InputError(f"{out}: holds a training run already (resume=True continues it, restart=True "
                         "discards it)")
    present = [n for n in RUN_FILES if (out / n).exists()]
    if present:
        raise InputError(f"{out}: holds a model already ({', '.join(present)}) and no training state to resume; "
                         "train into a new or empty directory")
    from .state import LOSS_PLOT, METRICS_FILE
    from .watch import is_run_log

    run_log = is_run_log(out / METRICS_FILE)
    theirs = [n for n in (METRICS_FILE, LOSS_PLOT) if os.path.lexists(out / n) and not run_log]
    theirs += [n for n in files if os.path.lexists(out / n)]
    if theirs:
        raise InputError(f"{out}: holds {', '.join(theirs[:3])}{' …' if len(theirs) > 3 else ''} and no training "
                         "state to resume; a new run would replace them: train into a new or empty directory")
    val = None
    if val_tokens is not None:
        val = load_tokens(val_tokens)
        check_val(val, data)
    if init is not None:  # the architecture is the model's
        model_config = init.config
        cfg = replace(cfg, n_layer=model_config.n_layer, n_embd=model_config.n_embd, n_head=model_config.n_head)
    else:
        model_config = IGPTConfig(vocab_size=len(data.palette) + 1, n_positions=data.height * data.width,
                                  n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head)
    return Start(cfg, model_config, val, sha256_file(val_tokens) if val is not None else "",
                  str(Path(val_tokens).resolve()) if val is not None else "", None, init=init)


def _resumed_val(state: RunState, val_tokens, data: TokenData) -> tuple[TokenData | None, str, str]:
    """The validation file of a resumed run: the run's own (found again by its recorded path when
    `val_tokens` is None), never another one. Returns (data, SHA-256, absolute path)."""
    if state.version >= 2 and not state.val_sha256:
        if val_tokens is not None:
            raise ParameterError("val_tokens", str(val_tokens), "this run has no validation file; resume without "
                                                                "one (or train into a new directory)")
        return None, "", ""
    if state.version < 2 and val_tokens is None:  # an old state recorded no file: take what is given
        return None, "", ""
    path = Path(val_tokens if val_tokens is not None else state.val_tokens)
    if val_tokens is None and not path.is_file():
        raise InputError(f"{path}: the validation file of this run is gone; pass val_tokens=FILE (the same file, moved)")
    val = load_tokens(path)
    sha = sha256_file(path)
    if state.version >= 2 and sha != state.val_sha256:
        raise ParameterError("val_tokens", str(path), f"not the validation file this run started with "
                                                      f"({state.val_tokens}: its SHA-256 differs)")
    check_val(val, data)
    return val, sha, str(path.resolve())


def resumed_run(out: Path, given, data: TokenData, train_sha: str, train_tokens, val_tokens, init,
                init_param: str = "init") -> Start:
    path = out / STATE_FILE
    if not path.is_file():
        raise InputError(f"{out}: nothing to resume (no {STATE_FILE})")
    state = read_state(path)
    if state.train_sha256 and state.train_sha256 != train_sha:
        raise InputError(f"{train_tokens}: not the tokens file this run was trained on (its SHA-256 differs from "
                         f"the one recorded in {path}); resume with the same file, or train into a new directory")
    if init is not None and str(init) != state.init:
        started = f"started from {state.init}" if state.init else "started from random weights"
        raise ParameterError(init_param, str(init), f"this run {started}; a resumed run continues from its own "
                                                    "state" + (": resume without init" if init_param == "init" else ""))
    cfg = resumed_config(state.cfg, given, len(data.tokens), out)
    val, val_sha, val_path = _resumed_val(state, val_tokens, data)
    schedule = state.schedule_steps or total_steps(state.cfg, len(data.tokens))
    return Start(cfg, state.model_config, val, val_sha, val_path, state, schedule)


def split_batch(batch_size: int, world_size: int, grad_accum: int) -> tuple[int, int]:
    """(images per rank, images per micro-batch) of a global batch; ParameterError naming batch_size
    (not divisible by the world size: every rank must take the same share, so that the mean of the
    ranks' gradients is the full batch's) or grad_accum (not dividing the per-rank batch)."""
    if not is_count(grad_accum):
        raise ParameterError("grad_accum", grad_accum, "must be an integer of at least 1")
    if batch_size % world_size:
        raise ParameterError("batch_size", batch_size, f"must be a multiple of the world size {world_size} "
                                                       f"(each of the {world_size} ranks takes an equal share)")
    per_rank = batch_size // world_size
    if per_rank % grad_accum:
        where = f"the {per_rank} images of each of {world_size} ranks" if world_size > 1 else \
            f"the batch of {per_rank} images"
        raise ParameterError("grad_accum", grad_accum, f"must divide {where} into equal micro-batches")
    return per_rank, per_rank // grad_accum


def is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


@contextlib.contextmanager
def all_or_none(dist: DistContext):
    """Collective: the block either succeeds on every rank or raises on every rank — the first
    failing rank with its own error, the others quietly (`PeerError`), so a launcher prints one line."""
    failure: BaseException | None = None
    try:
        yield
    except BaseException as e:  # noqa: BLE001 - re-raised below, after the other ranks heard of it
        if not dist.active:
            raise
        failure = e
    if not dist.active:
        return
    errors = dist.gather(None if failure is None else (str(failure) or type(failure).__name__))
    first = next((r for r, e in enumerate(errors) if e), None)
    if first is None:
        return
    if first == dist.rank:
        raise failure
    raise PeerError(f"rank {first} failed: {errors[first]}")
