"""`pretrain`: the training loop, its checkpoints, and how a run starts or resumes."""
from __future__ import annotations

import json
import os
import shutil
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import __version__
from ..errors import InputError, ParameterError
from ..model import IGPT, IGPTConfig, save_pretrained, sos_shift
from ..outputs import check_output_path, output_lock
from ..progress import OnProgress, Reporter
from ..results import Result
from ..runtime import resolve_device, resolve_dtype
from .config import (TrainConfig, check_config, check_fits_memory, config_from, kept_at, lr_at, resumed_config,
                     total_steps)
from ..formats import sha256_file
from .data import TokenData, check_val, load_tokens, make_batch
from .state import (RUN_FILES, STATE_FILE, TRAIN_META, RunState, load_optimizer, load_weights, read_state,
                    remove_temp_files, save_state, write_errors, write_text)


@dataclass
class TrainResult(Result):
    model_dir: str
    steps: int
    n_params: int
    height: int
    width: int
    seconds: float
    train_loss: float | None = None
    val_loss: float | None = None
    val_bits_per_dim: float | None = None
    resumed_from: int | None = None  # the step a resumed run continued from
    kept: list[str] | None = None  # the models kept by save_every / save_at (OUT/step-NNNNNN), all so far
    _omit_if_none = ("train_loss", "val_loss", "val_bits_per_dim", "resumed_from", "kept")


def loss_on(model: IGPT, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(sos_shift(tokens, model.config.sos_token))
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens.reshape(-1))


@torch.inference_mode()
def evaluate(model: IGPT, tokens: np.ndarray, device, autocast_dtype, batch_size: int = 256) -> float:
    """Mean next-token loss in nats over `tokens`."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(tokens), batch_size):
        x = torch.from_numpy(tokens[i:i + batch_size].astype(np.int64)).to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
            total += loss_on(model, x).item() * x.numel()
        count += x.numel()
    model.train()
    return total / count


def make_optimizer(model: IGPT, cfg: TrainConfig) -> torch.optim.AdamW:
    # Weight decay on weight matrices only: no decay on norms, biases, embeddings.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_matrix = p.dim() == 2 and not name.startswith(("wte", "wpe"))
        (decay if is_matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def write_preprocessor_config(model_dir: Path, palette: np.ndarray, height: int, width: int) -> None:
    cfg = {
        "image_processor_type": "ImageGPTImageProcessor",
        "clusters": np.asarray(palette, dtype=np.float32).tolist(),
        "do_color_quantize": True,
        "do_normalize": True,
        "do_resize": True,
        "resample": 2,
        "size": {"height": height, "width": width},
    }
    write_text(Path(model_dir) / "preprocessor_config.json", json.dumps(cfg) + "\n")


# ---------------------------------------------------------------------------
# starting and resuming
# ---------------------------------------------------------------------------
@dataclass
class _Start:
    """What the loop needs, from a new run or a resumed one."""
    cfg: TrainConfig
    model_config: IGPTConfig
    val: TokenData | None
    val_sha256: str
    val_path: str
    state: RunState | None  # the resumed run's state
    schedule_steps: int | None = None


def _fresh(out: Path, cfg: TrainConfig, data: TokenData, val_tokens) -> _Start:
    if (out / STATE_FILE).exists():
        raise InputError(f"{out}: holds a training run already (resume=True continues it)")
    present = [n for n in RUN_FILES if (out / n).exists()]
    if present:
        raise InputError(f"{out}: holds a model already ({', '.join(present)}) and no training state to resume; "
                         "train into a new or empty directory")
    val = None
    if val_tokens is not None:
        val = load_tokens(val_tokens)
        check_val(val, data)
    model_config = IGPTConfig(vocab_size=len(data.palette) + 1, n_positions=data.height * data.width,
                              n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head)
    return _Start(cfg, model_config, val, sha256_file(val_tokens) if val is not None else "",
                  str(Path(val_tokens).resolve()) if val is not None else "", None)


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


def _resumed(out: Path, given, data: TokenData, train_sha: str, train_tokens, val_tokens) -> _Start:
    path = out / STATE_FILE
    if not path.is_file():
        raise InputError(f"{out}: nothing to resume (no {STATE_FILE})")
    state = read_state(path)
    if state.train_sha256 and state.train_sha256 != train_sha:
        raise InputError(f"{train_tokens}: not the tokens file this run was trained on (its SHA-256 differs from "
                         f"the one recorded in {path}); resume with the same file, or train into a new directory")
    cfg = resumed_config(state.cfg, given, len(data.tokens), out)
    val, val_sha, val_path = _resumed_val(state, val_tokens, data)
    schedule = state.schedule_steps or total_steps(state.cfg, len(data.tokens))
    return _Start(cfg, state.model_config, val, val_sha, val_path, state, schedule)


# ---------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------
def pretrain(
    train_tokens: str | Path,
    out_dir: str | Path,
    cfg: TrainConfig | dict | None = None,
    *,
    val_tokens: str | Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    resume: bool = False,
    on_progress: OnProgress | None = None,
) -> TrainResult:
    """Pretrain (or resume pretraining) an iGPT; the output directory is locked for the whole run.

    `cfg`: a `TrainConfig`, or a dict of some of its fields. A new run takes it with the
    defaults for fields not given (`steps` or `epochs` is required). With `resume=True`:
    `cfg=None` continues the run with its own settings; a dict names the settings the user
    set and each is compared with the run's, a TrainConfig is compared on every field. A
    difference is refused (one InputError naming each differing setting), except one: a
    larger `steps` (or `epochs`) extends the run. The learning-rate schedule keeps the
    length the run was started with, so the first steps of an extended run are exactly
    the original run's, and the extra steps run at the floor rate `lr * min_lr_ratio`.

    A resumed run must use the same tokens file (its SHA-256 is recorded in the state)
    and the same validation file: `val_tokens=None` finds the run's own again by its
    recorded path. `dtype="auto"` resumes in the run's own compute dtype (bit-for-bit on
    the CPU; on a GPU with `IGPT_DETERMINISTIC=1`, see `runtime.apply_deterministic_mode`).

    Progress: one event per step (`info` holds the smoothed loss and learning rate); every
    evaluation record is also a log `message` (one JSON line).
    """
    out = Path(out_dir)
    data = load_tokens(train_tokens)  # the input first: a missing or bad file is the first thing said
    check_output_path(out, overwrite=False, directory=True)
    given = cfg
    if not resume:
        cfg = check_config(config_from(cfg))
        if not cfg.steps and not cfg.epochs:
            total_steps(cfg, 1)  # raises: how long to train
    dev = resolve_device(device)
    if not out.resolve().name:
        raise InputError(f"{out}: cannot train into the root directory")
    with output_lock(out.resolve()):  # `-o .` too: the lock sits next to the directory
        train_sha = sha256_file(train_tokens)
        start = _resumed(out, given, data, train_sha, train_tokens, val_tokens) if resume \
            else _fresh(out, cfg, data, val_tokens)
        mc = start.model_config
        K = len(data.palette)
        if mc.n_positions != data.height * data.width or mc.vocab_size != K + 1:
            raise InputError(f"{train_tokens}: tokens ({data.height}x{data.width}, {K} colours) do not fit the "
                             f"model in {out} ({mc.n_positions} positions, {mc.vocab_size - 1} colours)")
        if start.state is not None and dtype == "auto":  # bit-for-bit continuation needs the run's own dtype
            dtype = start.state.compute_dtype
        compute = resolve_dtype(dtype, dev)
        try:
            check_fits_memory(mc, dev, start.cfg.batch_size)
        except ParameterError as e:
            if start.state is None:
                raise
            raise InputError(f"{out / STATE_FILE}: {e.problem}") from None  # the run's model, not a setting
        return _train(out, data, train_sha, start, dev, compute, on_progress)


def _train(out: Path, data: TokenData, train_sha: str, start: _Start, dev: torch.device, compute: torch.dtype,
           on_progress: OnProgress | None) -> TrainResult:
    cfg, state, val = start.cfg, start.state, start.val
    state_path = out / STATE_FILE
    steps = total_steps(cfg, len(data.tokens))
    schedule = start.schedule_steps or steps
    if state is None:
        torch.manual_seed(cfg.seed)
    model = IGPT(start.model_config)
    if state is not None:
        load_weights(model, state, state_path)
    model.to(dev).train()
    opt = make_optimizer(model, cfg)
    step, saved, history = 0, None, []
    if state is not None:
        load_optimizer(opt, state, state_path)
        step = saved = state.step
        history = state.history
    created = not out.exists()
    with write_errors(out, "creating the model directory"):
        out.mkdir(exist_ok=True)
    dtype_name = str(compute).removeprefix("torch.")

    def checkpoint() -> None:
        nonlocal saved
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise _diverged(cfg, step, "the weights are not finite", saved)
        run = RunState(step, cfg, model.config, model.state_dict(), opt.state_dict(), dtype_name, history,
                       schedule, train_sha, start.val_sha256, start.val_path, loss_ema)
        # The state first: it alone is what a resume needs; a failure below it leaves it intact.
        then = f"resume continues from step {saved}" if saved is not None else "nothing was saved yet"
        with write_errors(state_path, f"writing the checkpoint of step {step}; {then}"):
            save_state(state_path, run)
        saved = step
        with write_errors(out, f"writing the model files of step {step}; resume continues from step {step}"):
            save_pretrained(model, out)
            write_preprocessor_config(out, data.palette, data.height, data.width)
            meta = {"igpt_version": __version__, "train_tokens": str(data.path),
                    "val_tokens": str(val.path) if val is not None else "", "train_sha256": train_sha,
                    "step": step, "steps": steps, "history": history, "class_names": data.class_names,
                    "config": asdict(cfg), "compute_dtype": dtype_name}
            write_text(out / TRAIN_META, json.dumps(meta, indent=1) + "\n")

    def save_step() -> None:
        # The kept model first, then the state: a stop between the two leaves the state of an
        # earlier step, so a resume redoes this step and keeps its model (never a state past a
        # kept step whose directory is missing).
        if kept_at(cfg, step):
            keep_model(out / snapshot_name(step), model, data, step, history)
        checkpoint()

    autocast = dict(device_type=dev.type, dtype=compute, enabled=compute != torch.float32)
    rep = Reporter(on_progress, "train", total=steps, unit="step", done=step)
    t0 = time.time()
    loss_ema = state.loss_ema if state is not None else None
    try:
        rep.start()
        while step < steps:
            lr = lr_at(step, schedule, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            x = make_batch(data, step, cfg).to(dev)
            with torch.autocast(**autocast):
                loss = loss_on(model, x)
            value = loss.item()
            if not math.isfinite(value):
                raise _diverged(cfg, step + 1, f"the loss is {value}", saved)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            loss_ema = value if loss_ema is None else 0.95 * loss_ema + 0.05 * value
            if step % cfg.eval_every == 0 or step == steps:
                record = {"step": step, "train_loss": round(loss_ema, 5), "lr": lr,
                          "seconds": round(time.time() - t0, 1)}
                if val is not None:
                    v = evaluate(model, val.tokens[:cfg.eval_rows], dev, compute)
                    record.update(val_loss=round(v, 5), val_bits_per_dim=round(v / math.log(2), 5))
                history.append(record)
                rep.log(json.dumps(record))
            bpd = loss_ema / math.log(2)
            rep.advance(1, info=f"loss {loss_ema:.3f} nats ({bpd:.3f} bits/dim) lr {lr:.2e}")
            if step % cfg.checkpoint_every == 0 or step == steps or kept_at(cfg, step):
                save_step()
    except KeyboardInterrupt:
        _cleanup_on_failure(out, created, save_step if saved != step else None)
        raise
    except BaseException:
        _cleanup_on_failure(out, created)
        raise
    last = history[-1] if history else {}
    return TrainResult(model_dir=str(out), steps=steps, n_params=model.num_params(), height=data.height,
                       width=data.width, seconds=round(time.time() - t0, 1), train_loss=last.get("train_loss"),
                       val_loss=last.get("val_loss"), val_bits_per_dim=last.get("val_bits_per_dim"),
                       resumed_from=state.step if state is not None else None,
                       kept=sorted(str(d) for d in out.glob("step-*") if d.is_dir()) or None)


def snapshot_name(step: int) -> str:
    """The directory (inside the run's) that keeps the model of `step`: `step-000200`."""
    return f"step-{step:06d}"


def keep_model(final: Path, model: IGPT, data: TokenData, step: int, history: list) -> None:
    """Write the model of `step` as its own Hugging Face directory, atomically (a temp
    directory renamed when complete); one that exists already (a resumed run) is kept."""
    if final.is_dir():
        return
    tmp = final.with_name(f".{final.name}.tmp")
    with write_errors(final, f"keeping the model of step {step}"):
        shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(model, tmp)
        write_preprocessor_config(tmp, data.palette, data.height, data.width)
        meta = {"igpt_version": __version__, "step": step, "history": [h for h in history if h["step"] <= step]}
        write_text(tmp / TRAIN_META, json.dumps(meta, indent=1) + "\n")
        os.replace(tmp, final)


def _cleanup_on_failure(out: Path, created: bool, save=None) -> None:
    """Save (Ctrl-C) or not; remove temp files, and the directory if this run made it and left it empty."""
    try:
        if save is not None:
            save()
    finally:
        remove_temp_files(out)
        for tmp in out.glob(".step-*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


def _diverged(cfg: TrainConfig, step: int, what: str, saved: int | None) -> ParameterError:
    kept = f"the checkpoint of step {saved} is kept" if saved is not None else "nothing was saved"
    return ParameterError("lr", cfg.lr, f"training diverged at step {step}: {what} ({kept}); "
                                        "try a smaller learning rate or a longer warm-up")

