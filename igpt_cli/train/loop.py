"""`pretrain`: the training loop and its checkpoints (how a run starts: `start.py`; a step's pieces: `step.py`;
what it optimises: `objective.py`).

Long (over 400 lines) because the loop is one function on purpose: the step, the logging,
the checkpoints and the failure paths share its local state, and splitting them would pass
that state around instead of reading it in one place."""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import __version__
from ..distributed import DistContext, PeerError
from ..errors import InputError, ParameterError
from ..formats import sha256_file
from ..model import IGPT
from ..outputs import check_distinct, check_output_path, output_lock
from ..progress import OnProgress, Reporter
from ..results import Result
from ..runtime import resolve_device, resolve_dtype
from .config import check_config, check_fits_memory, config_from, kept_at, lr_at, total_steps, TrainConfig
from .data import TokenData, load_tokens, make_batch, val_rows
from .objective import NextToken, write_preprocessor_config
from .init import load_init, resolve_init
from .start import Options, Start, all_or_none, discard_run, fresh_run, is_count, resumed_run, split_batch
from .state import (LOSS_PLOT, METRICS_FILE, STATE_FILE, TENSORBOARD_DIR, TRAIN_META, RunState, load_optimizer,
                    load_weights, remove_temp_files, save_state, write_errors, write_text)
from .step import compiled_or_eager, evaluate, loss_on, loss_sum, make_optimizer, to_device
from .watch import DrawLoss, RunLog

__all__ = ["TrainResult", "pretrain", "evaluate", "loss_on", "make_optimizer", "split_batch",
           "write_preprocessor_config", "snapshot_name", "keep_model"]


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT and SIGTERM until the block ends (main thread only): an interrupt then lands
    between steps, never between an optimizer update and its step count or log line, so the
    state an interrupted run saves is one the uninterrupted run passed through. A held signal
    is handed to the handler that was in place (Ctrl-C: KeyboardInterrupt) when the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    before = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        if held:
            handler = before[held[0]]
            if callable(handler):
                handler(held[0], None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(held[0])


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
    world_size: int = 1  # processes that trained this call (data-parallel ranks)
    tokens_per_s: float | None = None  # training tokens per second of this call (all ranks together)
    init: str | None = None  # the model a new run started from (init=)
    compiled: bool | None = None  # compile=True: whether torch.compile worked here (else eager)
    _omit_if_none = ("train_loss", "val_loss", "val_bits_per_dim", "resumed_from", "kept", "tokens_per_s", "init",
                     "compiled")


# ---------------------------------------------------------------------------
# ---------------------------------------------------------------------------
# ---------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------
def pretrain(
    train_tokens: str | Path,
    out_dir: str | Path,
    cfg: TrainConfig | dict | None = None,
    *,
    val_tokens: str | Path | None = None,
    init: str | Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    resume: bool = False,
    restart: bool = False,
    grad_accum: int = 1,
    compile: bool = False,
    activation_checkpointing: bool = False,
    dist: DistContext | None = None,
    draw_loss: DrawLoss | None = None,
    on_progress: OnProgress | None = None,
    objective: NextToken | None = None,
) -> TrainResult:
    """Pretrain (or resume pretraining) an iGPT; the output directory is locked for the whole run.

    `cfg`: a `TrainConfig`, or a dict of some of its fields. A new run takes it with the
    defaults for fields not given (`steps` or `epochs` is required). `restart=True` first
    removes a run already in `out_dir` (only one that holds nothing but a run's files). With `resume=True`:
    `cfg=None` continues the run with its own settings; a dict names the settings the user
    set and each is compared with the run's, a TrainConfig is compared on every field. A
    difference is refused (one InputError naming each differing setting), except one: a
    larger `steps` (or `epochs`) extends the run. The learning-rate schedule keeps the
    length the run was started with, so the first steps of an extended run are exactly
    the original run's, and the extra steps run at the floor rate `lr * min_lr_ratio`.

    `init`: continue pretraining from a model (a directory, a bundled name, a hub id or an
    OpenAI TensorFlow prefix): its architecture and palette are the run's; the tokens must
    use its palette and image size; `n_layer`/`n_embd`/`n_head` given in a dict must match it.

    A resumed run must use the same tokens file (its SHA-256 is recorded in the state)
    and the same validation file: `val_tokens=None` finds the run's own again by its
    recorded path. `dtype="auto"` resumes in the run's own compute dtype (bit-for-bit on
    the CPU; on a GPU with `IGPT_DETERMINISTIC=1`, see `runtime.apply_deterministic_mode`).

    Data parallel (`dist`, default `DistContext.from_env()`: torchrun or srun): `batch_size`
    is the global batch; each of the world's ranks computes the gradient of its equal slice
    (in `grad_accum` micro-batches, the last one synchronising), so N ranks train the model
    one process does, up to float summation order. Rank 0 writes every file.

    Watching: rank 0 appends a line per logged step to `OUT/metrics.jsonl` (and TensorBoard
    events when installed); `draw_loss(records, fh)`, when given, draws `OUT/loss.png` at each
    evaluation (the CLI passes its matplotlib drawer).

    Progress: one event per step (`info` holds the smoothed loss and learning rate, updated
    at each logged step); every evaluation record is also a log `message` (one JSON line).

    `objective`: what is trained (default `NextToken()`, next-token pretraining; fine-tuning
    with a classification head, `igpt_cli.finetune`, passes its own: `objective.py`).
    """
    objective = NextToken() if objective is None else objective
    own_dist = dist is None
    dist = DistContext.from_env() if dist is None else dist
    out = Path(out_dir)
    given = cfg
    opts = Options(grad_accum, bool(compile), bool(activation_checkpointing), draw_loss)
    try:
        if dist.active and not resume:  # wrong on every rank alike: said before the rendezvous, by rank 0
            try:
                split_batch(check_config(config_from(cfg)).batch_size, dist.world_size, opts.grad_accum)
            except InputError as e:
                if not dist.is_main:
                    raise PeerError(str(e)) from None
                raise
        dev = dist.device_for(resolve_device(device))
        dist.init(dev)
        # every rank runs rank 0's flags (torchrun starts one command, srun may not); said once, by the rank that differs
        dist.agree({"train_tokens": str(train_tokens), "out": str(out), "val_tokens": str(val_tokens),
                    "init": str(init), "cfg": asdict(given) if isinstance(given, TrainConfig) else given,
                    "device": str(device), "dtype": str(getattr(dtype, "value", dtype)), "resume": resume,
                    "options": [opts.grad_accum, opts.compile, opts.activation_checkpointing],
                    "objective": objective.settings},
                   "training flags")
        with contextlib.ExitStack() as stack:
            with all_or_none(dist):
                data = load_tokens(train_tokens)  # the input first: a missing or bad file is the first thing said
                objective.check_data(data)
                check_output_path(out, overwrite=False, directory=True)
                if not resume:
                    cfg = check_config(config_from(cfg))
                    if not cfg.steps and not cfg.epochs:
                        total_steps(cfg, 1)  # raises: how long to train
                if not out.resolve().name:
                    raise InputError(f"{out}: cannot train into the root directory")
                split_batch(opts.grad_accum if is_count(opts.grad_accum) else 1, 1, opts.grad_accum)  # its type
                init_dir = resolve_init(init) if init is not None and dist.is_main and not resume else None
                check_distinct({"out": out}, {"train_tokens": train_tokens, "val_tokens": val_tokens,
                                              objective.init_param: init_dir})
                if dist.is_main:  # `-o .` too: the lock sits next to the directory
                    stack.enter_context(output_lock(out.resolve()))
                    if restart and not resume:  # under the lock: no other run is writing it
                        discard_run(out, objective.files)
            init_dir = dist.broadcast(init_dir)  # resolved (downloaded, converted) once, by rank 0
            with all_or_none(dist):
                train_sha = sha256_file(train_tokens)
                if resume:
                    start = resumed_run(out, given, data, train_sha, train_tokens, val_tokens, init,
                                        objective.init_param)
                    if (start.state.objective or {}) != objective.settings:
                        theirs = start.state.objective or "next-token pretraining"
                        raise InputError(f"{out}: the run there was started with other objective settings "
                                         f"({theirs}, not {objective.settings or 'next-token pretraining'}); "
                                         "resume with its own, or train into a new directory")
                else:
                    start = fresh_run(out, cfg, data, val_tokens,
                                      load_init(init, init_dir, data, given, param=objective.init_param,
                                                bert_refusal=objective.bert_refusal) if init is not None else None,
                                      objective.files)
                mc = start.model_config
                K = len(data.palette)
                if mc.n_positions != data.height * data.width or mc.vocab_size != K + 1:
                    raise InputError(f"{train_tokens}: tokens ({data.height}x{data.width}, {K} colours) do not fit "
                                     f"the model in {out} ({mc.n_positions} positions, {mc.vocab_size - 1} colours)")
                if start.state is not None and dtype == "auto":  # bit-for-bit continuation needs the run's own dtype
                    dtype = start.state.compute_dtype
                compute = resolve_dtype(dtype, dev)
                _, micro = split_batch(start.cfg.batch_size, dist.world_size, opts.grad_accum)
                try:
                    check_fits_memory(mc, dev, micro)
                except ParameterError as e:
                    if start.state is None:
                        raise
                    raise InputError(f"{out / STATE_FILE}: {e.problem}") from None  # the run's model, not a setting
            return _train(out, data, train_sha, start, dev, compute, dist, opts, on_progress, objective)
    finally:
        if own_dist:
            dist.close()


def _train(out: Path, data: TokenData, train_sha: str, start: Start, dev: torch.device, compute: torch.dtype,
           dist: DistContext, opts: Options, on_progress: OnProgress | None, objective: NextToken) -> TrainResult:
    cfg, state, val = start.cfg, start.state, start.val
    main = dist.is_main
    state_path = out / STATE_FILE
    steps = total_steps(cfg, len(data.tokens))
    schedule = start.schedule_steps or steps
    per_rank, micro = split_batch(cfg.batch_size, dist.world_size, opts.grad_accum)
    first_image = dist.rank * per_rank  # this rank's slice of every global batch
    if state is None:
        torch.manual_seed(cfg.seed)
    model = objective.build(start.model_config)
    if state is not None:
        load_weights(model, state, state_path)
    elif start.init is not None:
        objective.backbone(model).load_state_dict(start.init.weights)
    model.to(dev).train()
    objective.backbone(model).activation_checkpointing = opts.activation_checkpointing
    sos = model.config.sos_token
    opt = make_optimizer(model, cfg, fused=dev.type == "cuda")
    # float16 needs a loss scale (its gradients underflow otherwise); bfloat16 and float32 do not
    scaler = torch.amp.GradScaler(dev.type, enabled=compute == torch.float16)
    step, saved, history = 0, None, []
    if state is not None:
        load_optimizer(opt, state, state_path)
        if scaler.is_enabled() and state.grad_scaler:
            scaler.load_state_dict(state.grad_scaler)
        step = saved = state.step
        history = state.history
    autocast = dict(device_type=dev.type, dtype=compute, enabled=compute != torch.float32)
    runner, compiled = model, False
    if opts.compile:
        runner, compiled = compiled_or_eager(model, to_device(make_batch(data, step, cfg, (0, micro)), dev),
                                             autocast, scaler)
    if dist.active:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(runner, device_ids=[dev.index] if dev.type == "cuda" else None)
    created = not out.exists()
    if main:
        with write_errors(out, "creating the model directory"):
            out.mkdir(exist_ok=True)
    dtype_name = str(compute).removeprefix("torch.")
    val_mine = val.tokens[val_rows(val, cfg.val_images)[dist.rank::dist.world_size]] if val is not None else None
    # the training loss stays on the device between logged steps (no host sync per step)
    ema = torch.tensor(state.loss_ema if state is not None and state.loss_ema is not None else math.nan,
                       device=dev)
    have_ema = state is not None and state.loss_ema is not None
    window, window_steps = torch.zeros((), device=dev), 0
    n_metrics = len(objective.metrics)
    window_metrics = torch.zeros(n_metrics, device=dev)  # the objective's own numbers, summed like `window`

    def checkpoint() -> None:
        nonlocal saved
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise _diverged(cfg, step, "the weights are not finite", saved)
        run = RunState(step, cfg, model.config, model.state_dict(), opt.state_dict(), dtype_name, history,
                       schedule, train_sha, start.val_sha256, start.val_path, float(ema) if have_ema else None,
                       world_size=dist.world_size, grad_scaler=scaler.state_dict() if scaler.is_enabled() else None,
                       init=init_name, objective=objective.settings)
        # The state first: it alone is what a resume needs; a failure below it leaves it intact.
        then = f"resume continues from step {saved}" if saved is not None else "nothing was saved yet"
        with write_errors(state_path, f"writing the checkpoint of step {step}; {then}"):
            save_state(state_path, run)
        saved = step
        with write_errors(out, f"writing the model files of step {step}; resume continues from step {step}"):
            objective.save(model, out, data)
            meta = {"igpt_version": __version__, "train_tokens": str(data.path),
                    "val_tokens": str(val.path) if val is not None else "", "train_sha256": train_sha,
                    "step": step, "steps": steps, "history": history, "class_names": data.class_names,
                    "config": asdict(cfg), "compute_dtype": dtype_name, "world_size": dist.world_size,
                    **({"init": init_name} if init_name else {})}
            write_text(out / TRAIN_META, json.dumps(meta, indent=1) + "\n")

    def save_step() -> None:
        # The kept model first, then the state: a stop between the two leaves the state of an
        # earlier step, so a resume redoes this step and keeps its model (never a state past a
        # kept step whose directory is missing).
        if kept_at(cfg, step):
            keep_model(out / snapshot_name(step), model, data, step, history, objective)
        checkpoint()

    def validation_loss() -> float:
        total, count = loss_sum(model, val_mine, dev, compute) if len(val_mine) else (0.0, 0)
        sums = dist.gather((total, count))
        return sum(t for t, _ in sums) / sum(c for _, c in sums)

    init_name = start.init.name if start.init is not None else (state.init if state is not None else "")
    rep = Reporter(on_progress if main else None, "train", total=steps, unit="step", done=step)
    log = None
    t0 = time.time()
    tokens_per_step = cfg.batch_size * data.height * data.width
    first_step, info = step, ""
    finished = state is not None and step >= steps   # a rerun of a finished run: nothing is rewritten
    try:
        if main and not finished:
            with write_errors(out, "starting the metrics log"):
                log = RunLog(out, step, opts.draw_loss)
        rep.start()
        t_window = time.time()
        while step < steps:
            with signals_deferred():  # one step is applied, counted, logged and saved whole
                lr = lr_at(step, schedule, cfg)
                for g in opt.param_groups:
                    g["lr"] = lr
                step_loss = None
                step_metrics = torch.zeros(n_metrics, device=dev)
                for j in range(opts.grad_accum):
                    a = first_image + j * micro
                    batch = tuple(to_device(t, dev) for t in objective.batch(data, step, cfg, (a, a + micro)))
                    last = j == opts.grad_accum - 1
                    with (runner.no_sync() if dist.active and not last else contextlib.nullcontext()):
                        with torch.autocast(**autocast):
                            loss, numbers = objective.loss(runner, batch, sos)
                            loss = loss / opts.grad_accum
                        scaler.scale(loss).backward()
                    step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
                    if numbers is not None:
                        step_metrics = step_metrics + numbers / opts.grad_accum
                scaler.unscale_(opt)  # a no-op without float16
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                step += 1
                if dist.active:  # the global batch's loss, on the device (the collective queues, nothing waits)
                    import torch.distributed as tdist

                    tdist.all_reduce(step_loss)
                    step_loss = step_loss / dist.world_size
                    if n_metrics:
                        tdist.all_reduce(step_metrics)
                        step_metrics = step_metrics / dist.world_size
                window = window + step_loss
                window_metrics = window_metrics + step_metrics
                window_steps += 1
                ema = step_loss if not have_ema else 0.95 * ema + 0.05 * step_loss
                have_ema = True
                evaluating = step % cfg.eval_every == 0 or step == steps
                if evaluating or step % cfg.log_every == 0:
                    mean = float(window) / window_steps  # the one host sync between logged steps
                    if not math.isfinite(mean):
                        raise _diverged(cfg, step, f"the loss is {mean}", saved)
                    smooth = float(ema)
                    record = {"step": step, "loss": round(mean, 6), "lr": lr,
                              "tokens_per_s": round(window_steps * tokens_per_step / max(time.time() - t_window, 1e-9),
                                                    1)}
                    extra = {k: round(float(v) / window_steps, 6)
                             for k, v in zip(objective.metrics, window_metrics.tolist())}
                    record.update(extra)
                    window, window_steps = torch.zeros((), device=dev), 0
                    window_metrics = torch.zeros(n_metrics, device=dev)
                    if evaluating:
                        entry = {"step": step, "train_loss": round(smooth, 5), "lr": lr,
                                 "seconds": round(time.time() - t0, 1), **extra}
                        if val is not None:
                            v = validation_loss()
                            entry.update(val_loss=round(v, 5), val_bits_per_dim=round(v / math.log(2), 5))
                            record.update(val_loss=round(v, 6), val_bits_per_dim=round(v / math.log(2), 6))
                        history.append(entry)
                        rep.log(json.dumps(entry))
                    if log is not None:
                        then = f"resume continues from step {saved}" if saved is not None else "nothing was saved yet"
                        with write_errors(out / METRICS_FILE, f"logging step {step}; {then}"):
                            log.log(record)
                            if evaluating:
                                log.draw()
                    info = f"loss {smooth:.3f} nats ({smooth / math.log(2):.3f} bits/dim) lr {lr:.2e}"
                    t_window = time.time()
                rep.advance(1, info=info)
                if main and (step % cfg.checkpoint_every == 0 or step == steps or kept_at(cfg, step)):
                    save_step()
    except KeyboardInterrupt:
        if main:
            _cleanup_on_failure(out, created, save_step if saved != step else None)
        raise
    except BaseException:
        if main:
            _cleanup_on_failure(out, created)
        raise
    finally:
        if log is not None:
            log.close()
    seconds = time.time() - t0
    objective.done(model, out, dist, trained=not finished)
    last = history[-1] if history else {}
    return TrainResult(model_dir=str(out), steps=steps, n_params=model.num_params(), height=data.height,
                       width=data.width, seconds=round(seconds, 1), train_loss=last.get("train_loss"),
                       val_loss=last.get("val_loss"), val_bits_per_dim=last.get("val_bits_per_dim"),
                       resumed_from=state.step if state is not None else None,
                       kept=sorted(str(d) for d in out.glob("step-*") if d.is_dir()) or None,
                       world_size=dist.world_size,
                       tokens_per_s=round((step - first_step) * tokens_per_step / seconds, 1)
                       if step > first_step and seconds > 0 else None,
                       init=start.init.name if start.init is not None else None,
                       compiled=compiled if opts.compile else None)


def snapshot_name(step: int) -> str:
    """The directory (inside the run's) that keeps the model of `step`: `step-000200`."""
    return f"step-{step:06d}"


def keep_model(final: Path, model: IGPT, data: TokenData, step: int, history: list,
               objective: NextToken | None = None) -> None:
    """Write the model of `step` as its own Hugging Face directory, atomically (a temp
    directory renamed when complete); one that exists already (a resumed run) is kept."""
    if final.is_dir():
        return
    tmp = final.with_name(f".{final.name}.tmp")
    with write_errors(final, f"keeping the model of step {step}"):
        shutil.rmtree(tmp, ignore_errors=True)
        (objective or NextToken()).save(model, tmp, data)
        meta = {"igpt_version": __version__, "step": step, "history": [h for h in history if h["step"] <= step]}
        write_text(tmp / TRAIN_META, json.dumps(meta, indent=1) + "\n")
        os.replace(tmp, final)


def _cleanup_on_failure(out: Path, created: bool, save=None) -> None:
    """Save (Ctrl-C) or not; remove temp files, and — when this run made the directory and saved
    nothing in it — its logs and the directory."""
    try:
        if save is not None:
            save()
    finally:
        remove_temp_files(out)
        for tmp in out.glob(".step-*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
        if created and out.is_dir() and not (out / STATE_FILE).exists():
            for name in (METRICS_FILE, LOSS_PLOT):
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / TENSORBOARD_DIR, ignore_errors=True)
            if not any(out.iterdir()):
                out.rmdir()


def _diverged(cfg: TrainConfig, step: int, what: str, saved: int | None) -> ParameterError:
    kept = f"the checkpoint of step {saved} is kept" if saved is not None else "nothing was saved"
    return ParameterError("lr", cfg.lr, f"training diverged at step {step}: {what} ({kept}); "
                                        "try a smaller learning rate or a longer warm-up")

