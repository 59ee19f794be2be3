"""Choosing the next token from the model's logits: temperature, top-k, top-p, greedy.

`Sampling` holds and checks the settings; `pick_tokens` applies them to a batch of
next-token logits. Randomness comes from the caller as one uniform number per row and
position (`row_uniforms`: a NumPy generator seeded with `(seed, row)`), and a token is
drawn by inverting the cumulative distribution. So a row's sample depends only on the
seed, its row number and the model's logits, never on the batch it ran in, the batch
size, or where an interrupted run resumed.

Order of the operations (as in Hugging Face's `generate`): logits / temperature, then
top-k (keep the k largest; ties with the k-th are kept), then top-p (keep the most likely
tokens, in decreasing order, while the probability mass before each is below p: the
smallest set whose mass reaches p), renormalise, draw. Temperature 0 is greedy (argmax).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .. import seeds
from ..errors import ParameterError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0: greedy
    top_k: int | None = None  # None: no top-k truncation
    top_p: float = 1.0  # 1: no nucleus truncation

    def __post_init__(self):
        t = self.temperature
        if t is None or not math.isfinite(float(t)) or float(t) < 0:
            raise ParameterError("temperature", t, "must be a finite number >= 0 (0 = greedy)")
        if self.top_k is not None and int(self.top_k) < 1:
            raise ParameterError("top_k", self.top_k, "must be at least 1 (leave it out for no top-k)")
        p = self.top_p
        if p is None or not (0.0 < float(p) <= 1.0):
            raise ParameterError("top_p", p, "must lie in (0, 1] (1 = no nucleus truncation)")

    @property
    def greedy(self) -> bool:
        return float(self.temperature) == 0.0

    def attrs(self) -> dict:
        """As HDF5 attrs (which cannot hold None: top_k 0 means none)."""
        return dict(temperature=float(self.temperature), top_k=int(self.top_k or 0), top_p=float(self.top_p))


def check_seed(seed) -> int:
    if seed is None:
        raise ParameterError("seed", seed, "must be an integer >= 0")
    return seeds.check_seed(seed)


def row_uniforms(seed: int, rows, length: int) -> np.ndarray:
    """Uniform numbers in [0, 1) for output rows `rows` and positions 0..length-1: float64 [len(rows), length]."""
    return np.stack([np.random.default_rng([seed, int(r)]).random(length) for r in rows]) if len(rows) else \
        np.empty((0, length))


def probabilities(logits: torch.Tensor, sampling: Sampling, n_colours: int | None = None) -> torch.Tensor:
    """The distribution sampled from: float32 [B, V] after temperature, top-k and top-p.

    `n_colours`: only tokens below it may be drawn (a palette smaller than the vocabulary).
    """
    x = logits.float()
    if n_colours is not None and n_colours < x.shape[-1]:
        x = x.clone()
        x[:, n_colours:] = -math.inf
    x = x / float(sampling.temperature)
    if sampling.top_k is not None and sampling.top_k < x.shape[-1]:
        kth = torch.topk(x, int(sampling.top_k), dim=-1).values[:, -1:]  # [B, 1]
        x = x.masked_fill(x < kth, -math.inf)
    probs = torch.softmax(x, dim=-1)  # [B, V]
    if sampling.top_p < 1.0:
        p_sorted, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(p_sorted, dim=-1) - p_sorted  # mass of the more likely tokens
        p_sorted = p_sorted.masked_fill(before >= float(sampling.top_p), 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, p_sorted / p_sorted.sum(-1, keepdim=True))
    return probs


def pick_tokens(logits: torch.Tensor, sampling: Sampling, uniforms: torch.Tensor | None,
                n_colours: int | None = None) -> torch.Tensor:
    """Next tokens [B] (int64) from logits [B, V]; `uniforms` [B] in [0, 1) (unused when greedy)."""
    if sampling.greedy:
        x = logits
        if n_colours is not None and n_colours < x.shape[-1]:
            x = x[:, :n_colours]
        return x.argmax(dim=-1)
    probs = probabilities(logits, sampling, n_colours)
    cdf_dtype = torch.float32 if probs.device.type == "mps" else torch.float64  # MPS has no float64
    cdf = torch.cumsum(probs.to(cdf_dtype), dim=-1)  # [B, V], flat over excluded tokens
    target = (uniforms.to(cdf_dtype) * cdf[:, -1]).unsqueeze(1)  # [B, 1], below the total mass
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_max(probs.shape[-1] - 1)
