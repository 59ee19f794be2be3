"""Training settings: `TrainConfig`, their checks, the learning-rate schedule, the memory check.

Every setting is checked before any work starts (`check_config`): a bad value is a
`ParameterError` named by its `TrainConfig` field (`lr=nan: must be a finite number above
0`). The model size is checked against the memory of the device (`check_fits_memory`):
weights, gradients and the two Adam moments alone take 16 bytes per parameter, so a model
whose parameters cannot even hold that is refused up front instead of being killed by the
kernel (`n_embd=65536` on any machine); so is a batch whose logits and block inputs alone
cannot fit (`batch_size=10**9`).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields, replace

import torch

from ..errors import InputError, ParameterError
from ..model import IGPTConfig
from ..model.runtime import available_memory  # the one memory probe (also for batch sizes)


@dataclass
class TrainConfig:
    n_layer: int = 8
    n_embd: int = 256
    n_head: int = 8
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    flip: bool = True  # random horizontal flips (in token space)
    seed: int = 0
    checkpoint_every: int = 200
    eval_every: int = 200
    val_images: int = 2000  # validation loss on a seeded, class-balanced subset of this many images
    log_every: int = 10  # a metrics line (and one read of the loss from the device) every this many steps
    save_every: int | None = None  # keep a model directory OUT/step-NNNNNN every this many steps …
    save_at: tuple[int, ...] = ()  # … and at these steps (a checkpoint series for `igpt sweep`)

# Settings that say what is kept or logged, not how the model trains: a resumed run may change them.
KEEPING = ("save_every", "save_at", "log_every")


FIELDS = tuple(f.name for f in fields(TrainConfig))
# integer settings -> smallest allowed value
_COUNTS = {"n_layer": 1, "n_embd": 1, "n_head": 1, "batch_size": 1, "warmup_steps": 0, "seed": 0,
           "checkpoint_every": 1, "eval_every": 1, "val_images": 1, "log_every": 1}
MAX_SEED = 2**63 - 1  # torch.manual_seed and numpy's SeedSequence take 0 .. 2**63-1 here


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _number(cfg: TrainConfig, name: str, low: float, high: float = math.inf, *, open_low: bool = False,
            allow_inf: bool = False) -> None:
    v = getattr(cfg, name)
    ok = _is_real(v) and not math.isnan(v) and (allow_inf or math.isfinite(v)) and \
        (v > low if open_low else v >= low) and v <= high
    if not ok:
        kind = "a number" if allow_inf else "a finite number"
        where = f"above {low:g}" if open_low else f"at least {low:g}"
        raise ParameterError(name, v, f"must be {kind} {where}" + (f" and at most {high:g}" if high < math.inf else ""))


def check_config(cfg: TrainConfig) -> TrainConfig:
    """`cfg` if every setting is in range, else a ParameterError naming the field."""
    if not isinstance(cfg, TrainConfig):
        raise ParameterError("cfg", type(cfg).__name__, "expected a TrainConfig")
    for name, low in _COUNTS.items():
        v = getattr(cfg, name)
        if not _is_int(v) or v < low:
            raise ParameterError(name, v, f"must be an integer of at least {low}")
    if cfg.seed > MAX_SEED:
        raise ParameterError("seed", cfg.seed, f"must be at most {MAX_SEED}")
    if cfg.steps is not None and (not _is_int(cfg.steps) or cfg.steps < 1):
        raise ParameterError("steps", cfg.steps, "must be an integer of at least 1")
    if cfg.epochs is not None:
        _number(cfg, "epochs", 0, open_low=True)
    _number(cfg, "lr", 0, open_low=True)
    _number(cfg, "min_lr_ratio", 0, 1)
    _number(cfg, "weight_decay", 0)
    _number(cfg, "grad_clip", 0, open_low=True, allow_inf=True)  # inf: no clipping
    if not isinstance(cfg.flip, bool):
        raise ParameterError("flip", cfg.flip, "must be True or False")
    if cfg.n_embd % cfg.n_head:
        raise ParameterError("n_embd", cfg.n_embd, f"not divisible by n_head={cfg.n_head}")
    if cfg.save_every is not None and (not _is_int(cfg.save_every) or cfg.save_every < 1):
        raise ParameterError("save_every", cfg.save_every, "must be an integer of at least 1")
    try:
        given = tuple(cfg.save_at)
        save_at = tuple(sorted({int(v) for v in given if _is_int(v) and v >= 1}))
        bad = len(save_at) != len(given)  # a value out of range, not an integer, or repeated
    except TypeError:
        bad = True
    if bad:
        raise ParameterError("save_at", cfg.save_at, "must be distinct step numbers of at least 1")
    return replace(cfg, save_at=save_at)


def kept_at(cfg: TrainConfig, step: int) -> bool:
    """Whether the model of `step` is kept as its own directory (`save_every`, `save_at`)."""
    return bool(cfg.save_every and step % cfg.save_every == 0) or step in cfg.save_at


def config_from(given) -> TrainConfig:
    """A TrainConfig from a TrainConfig, a mapping of some of its fields (the rest default), or None."""
    if given is None:
        return TrainConfig()
    if isinstance(given, TrainConfig):
        return given
    try:
        items = dict(given)
    except (TypeError, ValueError):
        raise ParameterError("cfg", type(given).__name__, "expected a TrainConfig or a dict of its fields") from None
    unknown = [k for k in items if k not in FIELDS]
    if unknown:
        raise ParameterError("cfg", unknown[0], f"not a training setting (settings: {', '.join(FIELDS)})")
    return TrainConfig(**items)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at `total` (and flat after it)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def total_steps(cfg: TrainConfig, n_rows: int) -> int:
    if cfg.steps:
        return cfg.steps
    if cfg.epochs:
        return max(1, math.ceil(cfg.epochs * n_rows / cfg.batch_size))
    raise InputError("give steps=N or epochs=E (how long to train)")


# ---------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------
def n_params(cfg: IGPTConfig) -> int:
    """Parameters of an IGPT with this config (exact; no memory allocated)."""
    C, M, V = cfg.n_embd, cfg.mlp_width, cfg.vocab_size
    block = 2 * C + (3 * C * C + 3 * C) + (C * C + C) + (C * M + M) + (M * C + C)  # ln_1, ln_2, attn, mlp
    return V * C + cfg.n_positions * C + cfg.n_layer * block + C + C * (V - 1)  # wte, wpe, blocks, ln_f, head


def training_bytes(cfg: IGPTConfig, batch_size: int = 1) -> int:
    """A lower bound of training memory: float32 weights, gradients and two Adam moments, plus
    what autograd must keep for a batch (the float32 logits and every block's input)."""
    activations = 4 * batch_size * cfg.n_positions * (cfg.vocab_size - 1 + cfg.n_layer * cfg.n_embd)
    return 16 * n_params(cfg) + activations


def check_fits_memory(model_cfg: IGPTConfig, dev: torch.device, batch_size: int) -> None:
    """ParameterError if training cannot fit in the device's memory, naming n_embd (or n_layer when
    one layer would fit) when the model alone is too large, else batch_size."""
    have = available_memory(dev)
    need = training_bytes(model_cfg, batch_size)
    if have is None or need <= have:
        return
    gib = 2**30
    if 16 * n_params(model_cfg) <= have:
        raise ParameterError("batch_size", batch_size, f"a batch of {batch_size:,} images of {model_cfg.n_positions} "
                             f"tokens needs at least {need / gib:,.1f} GiB to train on, but {dev.type} has "
                             f"{have / gib:,.1f} GiB available")
    param = "n_layer" if 16 * n_params(replace(model_cfg, n_layer=1)) <= have else "n_embd"
    raise ParameterError(param, getattr(model_cfg, param),
                         f"a {model_cfg.n_layer}-layer model of width {model_cfg.n_embd} has "
                         f"{n_params(model_cfg):,} parameters; training it needs at least {need / gib:,.1f} GiB "
                         f"(weights, gradients, Adam moments) but {dev.type} has {have / gib:,.1f} GiB available")


# ---------------------------------------------------------------------------
# resuming: the run's own settings, or an extension
# ---------------------------------------------------------------------------
def resumed_config(run: TrainConfig, given, n_rows: int, where) -> TrainConfig:
    """The settings a resumed run continues with.

    `given` None: the run's own. A TrainConfig: every field is compared with the run's; a
    mapping: only the fields it names (the ones a user set). Any difference is refused in
    one InputError naming each differing setting, except a longer run: `steps` (or
    `epochs`) giving more steps than the run was planned for extends it.
    """
    if given is None:
        return run
    if isinstance(given, TrainConfig):
        items = asdict(given)
    else:
        config_from(given)  # checks the names
        items = dict(given)
    merged = check_config(replace(run, **items))
    diffs = [f"{k}={v!r} (the run's: {getattr(run, k)!r})" for k, v in items.items()
             if k not in ("steps", "epochs", *KEEPING) and v != getattr(run, k)]
    old, new = total_steps(run, n_rows), total_steps(merged, n_rows)
    if new < old:
        k = "steps" if items.get("steps") is not None or run.steps else "epochs"
        diffs.append(f"{k}={items.get(k, getattr(merged, k))!r} (the run's: {old} steps; a resumed run can only "
                     "be made longer)")
    if diffs:
        raise InputError(f"{where}: the run there was started with other settings: {', '.join(diffs)}; "
                         "resume without them to continue it (only a larger number of steps extends it), "
                         "or train into a new directory")
    return merged
