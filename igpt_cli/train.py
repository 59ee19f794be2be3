"""Generative pretraining of an iGPT on a tokens file (next-token prediction).

The model is `igpt_cli.model.IGPT`, the same code path `igpt extract` runs. The
input is SOS-shifted like the original model: `[SOS, t_0 … t_{n-2}]` predicts
`t_0 … t_{n-1}`. The output directory is a Hugging Face ImageGPT checkpoint
(`config.json`, `model.safetensors`, `preprocessor_config.json`) that both
`igpt extract` and `transformers.ImageGPTModel.from_pretrained` load.

Resumability: the run state (`train_state.pt`: optimizer moments, step, schedule,
seed) is written every `checkpoint_every` steps and on Ctrl-C. The data order
and the flip augmentation are pure functions of (seed, step), so `--resume`
continues with exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__
from .errors import InputError, ParameterError
from .formats import TOKENS_FORMAT, class_names, open_igpt, read_attrs
from .model import IGPT, IGPTConfig, save_pretrained, sos_shift
from .progress import OnProgress, Reporter
from .results import Result
from .runtime import resolve_device, resolve_dtype

STATE_FILE = "train_state.pt"
TRAIN_META = "train_meta.json"


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
    eval_rows: int = 2000


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
    _omit_if_none = ("train_loss", "val_loss", "val_bits_per_dim")


@dataclass
class TokenData:
    tokens: np.ndarray  # uint16 [N, H*W]
    height: int
    width: int
    palette: np.ndarray
    class_names: list[str]
    path: str


def load_tokens(path: str | Path, limit: int | None = None) -> TokenData:
    with open_igpt(path, TOKENS_FORMAT) as f:
        a = read_attrs(f)
        n = f["tokens"].shape[0] if limit is None else min(limit, f["tokens"].shape[0])
        if n == 0:
            raise InputError(f"{path}: tokens file has no rows")
        return TokenData(f["tokens"][:n], int(a["height"]), int(a["width"]), f["palette"][:],
                         class_names(f), str(path))


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at `total`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> np.ndarray:
    """Rows of batch `step`: epochs are seeded permutations, batches wrap across epochs."""
    start = step * batch_size
    rows = []
    while len(rows) < batch_size:
        epoch, offset = divmod(start + len(rows), n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        rows.extend(perm[offset:offset + batch_size - len(rows)])
    return np.asarray(rows)


def flip_mask(step: int, batch_size: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 1_000_003, step]).random(batch_size) < 0.5


def make_batch(data: TokenData, step: int, cfg: TrainConfig) -> torch.Tensor:
    rows = batch_indices(step, len(data.tokens), cfg.batch_size, cfg.seed)
    x = data.tokens[rows].astype(np.int64)
    if cfg.flip:
        m = flip_mask(step, cfg.batch_size, cfg.seed)
        img = x.reshape(-1, data.height, data.width)
        img[m] = img[m, :, ::-1]
        x = img.reshape(len(x), -1)
    return torch.from_numpy(np.ascontiguousarray(x))


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
    (model_dir / "preprocessor_config.json").write_text(json.dumps(cfg) + "\n")


def total_steps(cfg: TrainConfig, n_rows: int) -> int:
    if cfg.steps:
        return cfg.steps
    if cfg.epochs:
        return max(1, math.ceil(cfg.epochs * n_rows / cfg.batch_size))
    raise InputError("give steps= or epochs= (how long to train)")


def pretrain(
    train_tokens: str | Path,
    out_dir: str | Path,
    cfg: TrainConfig,
    *,
    val_tokens: str | Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    resume: bool = False,
    on_progress: OnProgress | None = None,
) -> TrainResult:
    """Pretrain (or resume pretraining) an iGPT.

    Progress: one event per step (`info` holds the smoothed loss and learning rate); every
    evaluation record is also a log `message` (one JSON line).
    """
    out = Path(out_dir)
    data = load_tokens(train_tokens)
    val = load_tokens(val_tokens) if val_tokens else None
    if val is not None and (val.height, val.width) != (data.height, data.width):
        raise InputError(f"{val_tokens}: {val.height}x{val.width} tokens, training data is {data.height}x{data.width}")
    K = len(data.palette)
    dev = resolve_device(device)
    state_path = out / STATE_FILE
    if resume:
        if not state_path.is_file():
            raise InputError(f"{out}: nothing to resume (no {STATE_FILE})")
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if dtype == "auto":  # bit-for-bit continuation needs the run's own compute dtype
            dtype = state.get("compute_dtype", dtype)
        cfg = TrainConfig(**json.loads(state["train_config"]))
        model = IGPT(IGPTConfig(**json.loads(state["model_config"])))
        model.load_state_dict(state["model"])
    else:
        if state_path.exists():
            raise InputError(f"{out}: holds a training run already (resume=True continues it)")
        state = None
        torch.manual_seed(cfg.seed)
        model = IGPT(IGPTConfig(vocab_size=K + 1, n_positions=data.height * data.width, n_embd=cfg.n_embd,
                                n_layer=cfg.n_layer, n_head=cfg.n_head))
    compute = resolve_dtype(dtype, dev)
    if model.config.n_positions != data.height * data.width or model.config.vocab_size != K + 1:
        raise InputError(f"{train_tokens}: tokens ({data.height}x{data.width}, {K} colours) do not fit the model in {out}")
    if cfg.n_embd % cfg.n_head:
        raise ParameterError("n_embd", cfg.n_embd, f"not divisible by n_head={cfg.n_head}")
    steps = total_steps(cfg, len(data.tokens))
    model.to(dev).train()
    opt = make_optimizer(model, cfg)
    step = 0
    history: list[dict] = []
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        history = json.loads(state["history"])
    out.mkdir(parents=True, exist_ok=True)

    def checkpoint() -> None:
        save_pretrained(model, out)
        write_preprocessor_config(out, data.palette, data.height, data.width)
        tmp = out / (STATE_FILE + ".tmp")
        # One file holds everything a resume needs, replaced atomically: a kill at any
        # moment leaves either the previous or the new checkpoint, never a mix.
        torch.save({"model": model.state_dict(), "model_config": json.dumps(asdict(model.config)),
                    "optimizer": opt.state_dict(), "step": step, "train_config": json.dumps(asdict(cfg)),
                    "compute_dtype": str(compute).removeprefix("torch."), "history": json.dumps(history)}, tmp)
        os.replace(tmp, state_path)
        meta = {"igpt_version": __version__, "train_tokens": str(train_tokens), "val_tokens": str(val_tokens or ""),
                "step": step, "steps": steps, "history": history, "class_names": data.class_names,
                "config": asdict(cfg), "compute_dtype": str(compute).removeprefix("torch.")}
        (out / TRAIN_META).write_text(json.dumps(meta, indent=1) + "\n")

    autocast = dict(device_type=dev.type, dtype=compute, enabled=compute != torch.float32)
    rep = Reporter(on_progress, "train", total=steps, unit="step", done=step)
    rep.start()
    t0 = time.time()
    loss_ema = None
    try:
        while step < steps:
            lr = lr_at(step, steps, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            x = make_batch(data, step, cfg).to(dev)
            with torch.autocast(**autocast):
                loss = loss_on(model, x)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
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
            if step % cfg.checkpoint_every == 0 or step == steps:
                checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        raise
    last = history[-1] if history else {}
    return TrainResult(model_dir=str(out), steps=steps, n_params=model.num_params(), height=data.height,
                       width=data.width, seconds=round(time.time() - t0, 1), train_loss=last.get("train_loss"),
                       val_loss=last.get("val_loss"), val_bits_per_dim=last.get("val_bits_per_dim"))
