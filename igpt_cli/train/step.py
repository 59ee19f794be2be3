"""One training step's pieces: the loss, the optimizer, device copies, `torch.compile` or eager.

`loss_on` is the next-token loss the loop and evaluation share; `make_optimizer` AdamW with
weight decay on weight matrices only (fused on CUDA); `compiled_or_eager` tries
`torch.compile` on a real step and falls back to the eager model wherever it fails (no C++
compiler, an unsupported op), silently: the result says which one ran.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..model import IGPT, sos_shift
from .config import TrainConfig


def loss_on(model, tokens: torch.Tensor, sos_token: int | None = -1) -> torch.Tensor:
    """Mean next-token loss (nats) of `model` on `tokens` [B, T]; `sos_token` defaults to the
    model's own (pass it when `model` is wrapped, e.g. by DistributedDataParallel)."""
    sos = model.config.sos_token if sos_token == -1 else sos_token
    logits = model(sos_shift(tokens, sos))
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens.reshape(-1))


@torch.inference_mode()
def loss_sum(model: IGPT, tokens: np.ndarray, device, autocast_dtype, batch_size: int = 256) -> tuple[float, int]:
    """(sum of next-token losses in nats, tokens counted) over `tokens`; the model is left in train mode."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(tokens), batch_size):
        x = torch.from_numpy(tokens[i:i + batch_size].astype(np.int64)).to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
            total += loss_on(model, x).item() * x.numel()
        count += x.numel()
    model.train()
    return total, count


def evaluate(model: IGPT, tokens: np.ndarray, device, autocast_dtype, batch_size: int = 256) -> float:
    """Mean next-token loss in nats over `tokens`."""
    total, count = loss_sum(model, tokens, device, autocast_dtype, batch_size)
    return total / count


def make_optimizer(model: IGPT, cfg: TrainConfig, fused: bool = False) -> torch.optim.AdamW:
    # Weight decay on weight matrices only: no decay on norms, biases, embeddings.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:  # a frozen part (fine-tuning without the generative term: lm_head)
            continue
        is_matrix = p.dim() == 2 and name.split(".")[-2] not in ("wte", "wpe")
        (decay if is_matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), **({"fused": True} if fused else {}))


def to_device(x: torch.Tensor, dev: torch.device) -> torch.Tensor:
    if dev.type == "cuda":  # pinned host memory: the copy runs without blocking the host
        return x.pin_memory().to(dev, non_blocking=True)
    return x.to(dev)


# torch.compile's backend (a test swaps in one that fails, as a machine without a compiler does)
COMPILE_BACKEND = "inductor"


def compiled_or_eager(model: IGPT, x: torch.Tensor, autocast: dict, scaler) -> tuple[torch.nn.Module, bool]:
    """`torch.compile(model)` when it compiles and runs a training step here (tried on `x`, its
    gradients then cleared), else `model` itself: (module to train, whether it is compiled).
    A machine without a working compiler trains eagerly, silently."""
    try:
        compiled = torch.compile(model, backend=COMPILE_BACKEND)
        with torch.autocast(**autocast):
            loss = loss_on(compiled, x, model.config.sos_token)
        scaler.scale(loss).backward()
        return compiled, True
    except Exception:  # noqa: BLE001 - no compiler, an unsupported op, …: eager is always right
        return model, False
    finally:
        model.zero_grad(set_to_none=True)
