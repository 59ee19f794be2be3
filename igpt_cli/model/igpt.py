"""Image GPT in plain PyTorch, in one file: the model `extract` and `train` both run.

Architecture (Chen et al. 2020, and Hugging Face's `ImageGPTModel`): GPT-2 blocks
`x + attn(ln_1(x))`, `x + mlp(ln_2(x))` and a final `ln_f`, where every layer norm is
iGPT's own (no mean-centring, no bias) and the MLP activation is quick_gelu,
`x * sigmoid(1.702 x)`. Attention is causal SDPA. The LM head is untied and predicts
the palette colours only (never SOS).

Features: `forward_intermediates` returns the token maps (or their pooled vectors) of
the requested layers, running only the blocks it needs. Loading and saving Hugging
Face checkpoint directories lives in `checkpoint.py`.

Shapes: B images, T = n_positions tokens, C = n_embd channels, H heads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..choices import POOLS, SITES
from ..errors import ParameterError, check_choice
from .pooling import pool_tokens


@dataclass
class IGPTConfig:
    vocab_size: int = 513  # 512 palette colours + SOS
    n_positions: int = 1024  # height * width
    n_embd: int = 512
    n_layer: int = 24
    n_head: int = 8
    n_inner: int | None = None  # MLP width, 4 * n_embd when None
    layer_norm_epsilon: float = 1e-5

    @property
    def sos_token(self) -> int:
        return self.vocab_size - 1

    @property
    def mlp_width(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def side(self) -> int | None:
        """Image side for a square sequence (32 for n_positions=1024), else None."""
        s = math.isqrt(self.n_positions)
        return s if s * s == self.n_positions else None


class LayerNorm(nn.Module):
    """iGPT's layer norm: x / sqrt(mean(x^2) + eps) * weight — no mean-centring, no bias."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # statistics in float32 whatever the compute dtype
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: IGPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x [B, T, C]
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # [B, H, T, C/H]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, C/H]
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))  # [B, T, C]


class MLP(nn.Module):
    def __init__(self, cfg: IGPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.mlp_width)
        self.c_proj = nn.Linear(cfg.mlp_width, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # [B, T, mlp_width]
        return self.c_proj(h * torch.sigmoid(1.702 * h))  # quick_gelu, back to [B, T, C]


class Block(nn.Module):
    def __init__(self, cfg: IGPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, ln_1x: torch.Tensor | None = None) -> torch.Tensor:
        """`ln_1x`: ln_1(x) when the caller already has it (a feature tap), so it is not recomputed."""
        x = x + self.attn(self.ln_1(x) if ln_1x is None else ln_1x)
        return x + self.mlp(self.ln_2(x))


class IGPT(nn.Module):
    def __init__(self, cfg: IGPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size - 1, bias=False)  # predicts colours, never SOS
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 scaled init of residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token + position embeddings: tokens [B, T] -> [B, T, C]."""
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.wte(idx) + self.wpe(pos)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Next-token logits `[B, T, vocab_size - 1]` for input tokens `[B, T]`."""
        x = self.embed(idx)  # [B, T, C]
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # [B, T, vocab_size - 1]

    def forward_intermediates(self, idx: torch.Tensor, layers, site: str = "ln",
                              pool: str | None = "mean") -> dict[int, torch.Tensor]:
        """Features of `layers` (in 0..n_layer) for input tokens `[B, T]`.

        site="ln": layer l < L is ln_1 of block l applied to h_l, the paper's f_l;
        layer L is ln_f(h_L). site="resid": h_l itself, exactly Hugging Face's
        `output_hidden_states` (whose last entry, like here, is ln_f(h_L)).
        pool=None: token maps `{layer: [B, T, C]}` in the compute dtype;
        pool="mean": the paper's average over positions, `{layer: [B, C]}` float32.
        Only the blocks up to the deepest requested layer run.
        """
        site = check_choice("site", site, SITES)
        pool = None if pool is None else check_choice("pool", pool, POOLS)
        L = self.config.n_layer
        wanted = sorted({int(layer) for layer in layers})
        if not wanted or wanted[0] < 0 or wanted[-1] > L:
            raise ParameterError("layers", wanted, f"must lie in 0..{L}")
        deepest = wanted[-1]
        out: dict[int, torch.Tensor] = {}
        x = self.embed(idx)  # [B, T, C]
        for i in range(deepest + 1):
            tap = None
            if i in wanted:
                if i == L:
                    tap = self.ln_f(x)
                else:
                    tap = self.h[i].ln_1(x) if site == "ln" else x  # [B, T, C]
                out[i] = tap if pool is None else pool_tokens(tap, pool)  # [B, T, C] or [B, C] float32
            if i < deepest:  # early exit: no block beyond the deepest tap runs
                x = self.h[i](x, tap if site == "ln" else None)  # reuse ln_1(x) when tapped
        return out

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def sos_shift(tokens: torch.Tensor, sos_token: int) -> torch.Tensor:
    """[t_0 … t_{n-1}] -> [SOS, t_0 … t_{n-2}], the input the original iGPT sees: [B, T] -> [B, T]."""
    sos = torch.full_like(tokens[:, :1], sos_token)
    return torch.cat([sos, tokens[:, :-1]], dim=1)
