"""Feature sources: what turns a batch of token rows into per-layer feature rows.

`ModelSource` runs an iGPT checkpoint (`IGPT.forward_intermediates`); `PixelSource`
is the raw-pixel baseline (palette RGB, flattened). Both are callables
`tokens [B, T] -> {layer: [B, D] float32}` that also describe themselves for the
features file (`dims`, `config_json`, `sha256`, `site`, `sos`, `pool`). Loading, devices and
batch sizes are the model runtime's (`igpt_cli.model.runtime`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch

from ..model import IGPT, config_to_hf, sos_shift
from ..model.igpt import bert_keep_mask

PIXELS = "pixels"


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
