"""Feature sources: what turns a batch of token rows into per-layer feature rows.

`ModelSource` runs an iGPT checkpoint (`IGPT.forward_intermediates`); `PixelSource`
is the raw-pixel baseline (palette RGB, flattened). Both are callables
`tokens [B, T] -> {layer: [B, D] float32}` that also describe themselves for the
features file (`dims`, `config_json`, `sha256`, `site`, `sos`, `pool`). Here too:
loading a model onto a device, the automatic batch size, and file hashing.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError, ParameterError
from ..model import IGPT, IGPTConfig, config_to_hf, load_pretrained, resolve_model_dir, sos_shift
from ..model.igpt import bert_keep_mask
from ..runtime import resolve_device, resolve_dtype

PIXELS = "pixels"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_model_fits(cfg: IGPTConfig, height: int, width: int, palette_size: int, tokens_path: Path) -> None:
    """Refuse tokens whose image size or palette the model cannot take (InputError naming the file)."""
    if height * width != cfg.n_positions:
        side = cfg.side
        want = f"{side}x{side} images" if side else f"{cfg.n_positions} positions"
        raise InputError(f"{tokens_path}: images are {height}x{width} ({height * width} positions) "
                         f"but the model wants {want} (n_positions={cfg.n_positions}); "
                         f"quantize at that resolution")
    if palette_size > cfg.vocab_size - 1:
        raise InputError(f"{tokens_path}: palette has {palette_size} colours but the model knows "
                         f"{cfg.vocab_size - 1} (vocab_size={cfg.vocab_size} incl. SOS)")


def check_tokens_array(tokens, cfg: IGPTConfig) -> np.ndarray:
    """Palette-token images as an integer array [N, n_positions] with values the model knows (else ParameterError)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] != cfg.n_positions:
        raise ParameterError("tokens", tokens.shape, f"expected [N, {cfg.n_positions}] palette indices "
                                                     f"(the model's n_positions)")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ParameterError("tokens", str(tokens.dtype), "expected integer palette indices")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= cfg.vocab_size - 1):
        raise ParameterError("tokens", (int(tokens.min()), int(tokens.max())),
                             f"values must lie in 0..{cfg.vocab_size - 2} (the model's palette)")
    return tokens


def ready_model(model: IGPT | str | Path, device: str = "auto", dtype: str = "auto"
                ) -> tuple[IGPT, torch.device, torch.dtype]:
    """The model to run, its device and compute dtype: an IGPT as it is unless told otherwise
    (other values move and cast it in place), or a directory loaded onto the resolved device and dtype."""
    if isinstance(model, IGPT):
        p = next(model.parameters())
        dev = p.device if device == "auto" else resolve_device(device)
        cdt = p.dtype if dtype == "auto" else resolve_dtype(dtype, dev)
        if (dev, cdt) != (p.device, p.dtype):
            model.to(device=dev, dtype=cdt)
        return model.eval(), dev, cdt
    dev = resolve_device(device)
    cdt = resolve_dtype(dtype, dev)
    return load_model(resolve_model_dir(model), dev, cdt), dev, cdt


def load_model(model_dir: str | Path, device: torch.device, dtype: torch.dtype) -> IGPT:
    """Load a checkpoint directory onto `device` with weights cast to `dtype` (no autocast)."""
    model = load_pretrained(model_dir)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def auto_batch_size(model: IGPT, device: torch.device, dtype: torch.dtype) -> int:
    """A batch that keeps the matmuls large and the activations well inside memory."""
    cfg = model.config
    T, C = cfg.n_positions, cfg.n_embd
    elt = torch.finfo(dtype).bits // 8
    # live activations of one block for one image: residual, ln, qkv, attention out,
    # MLP hidden (+ activation), float32 layer-norm copies, plus the attention scores
    # of a non-fused SDPA path as a safety margin.
    per_image = T * (C * (2 + 3 + 1 + 2 * (cfg.mlp_width // C) + 2) * elt + C * 8) + cfg.n_head * T * T * 4
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = 0.5 * free
        return int(max(1, min(256, budget // per_image)))
    if device.type == "cpu":
        # CPU throughput saturates once a batch holds a few thousand tokens; more only costs memory.
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # pragma: no cover
            avail = 4 << 30
        by_mem = int(max(1, 0.25 * avail // per_image))
        by_tokens = max(1, 8192 // T)
        return int(max(1, min(by_mem, by_tokens, 64)))
    return 8


@dataclass
class ModelSource:
    """Features from an iGPT model: `{layer: [B, n_embd] float32}` for a token batch
    (`{layer: [B, T, n_embd]}` float32 token maps when `pool` is None)."""

    model: IGPT
    device: torch.device
    dtype: torch.dtype
    layers: list[int]
    site: str = "ln"
    sos: bool = True
    name: str = ""
    sha256: str = ""
    pool: str | None = "mean"

    @property
    def dims(self) -> dict[int, int]:
        return {layer: self.model.config.n_embd for layer in self.layers}

    @property
    def config_json(self) -> str:
        return json.dumps(config_to_hf(self.model.config), sort_keys=True)

    def __call__(self, tokens: np.ndarray) -> dict[int, np.ndarray]:
        idx = torch.from_numpy(tokens.astype(np.int64, copy=False)).to(self.device, non_blocking=True)  # [B, T]
        if self.sos:
            idx = sos_shift(idx, self.model.config.sos_token)
        keep = None  # a BERT model's input mask, drawn from the host's tokens (no copy back from the device)
        if not self.model.config.autoregressive:
            keep = bert_keep_mask(tokens).to(self.device, non_blocking=True)
        with torch.inference_mode():
            feats = self.model.forward_intermediates(idx, self.layers, site=self.site, pool=self.pool, bert_mask=keep)
        return {k: v.float().cpu().numpy() for k, v in feats.items()}


@dataclass
class PixelSource:
    """The raw-pixel baseline: palette RGB in [-1, 1], flattened H*W*3, as layer 0."""

    palette: np.ndarray
    height: int
    width: int
    layers: list[int] = field(default_factory=lambda: [0])
    name: str = PIXELS
    sha256: str = ""
    site: str = PIXELS
    sos: bool = False
    pool: str = "flatten"  # the whole image, not an average over positions
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")

    @property
    def dims(self) -> dict[int, int]:
        return {0: self.height * self.width * 3}

    @property
    def config_json(self) -> str:
        return json.dumps({"kind": PIXELS, "height": self.height, "width": self.width,
                           "palette_size": int(len(self.palette))}, sort_keys=True)

    def __call__(self, tokens: np.ndarray) -> dict[int, np.ndarray]:
        return {0: self.palette[tokens.astype(np.int64)].reshape(len(tokens), -1)}  # [B, H*W*3]
