"""How a layer's token map becomes one vector per image.

iGPT's linear probes read the average over positions (Chen et al. 2020, section 3.2);
`POOLS` lists the pools there are, and `pool_tokens` applies one: "mean" (the paper's),
"max" (the largest activation of each channel over positions), or "none" (the token map
itself, for users' own pooling). Pooled vectors are float32 whatever the compute dtype
(the mean's sum is taken in float32, so bfloat16 runs lose no precision in it).
"""
from __future__ import annotations

import torch

from ..choices import POOLS
from ..errors import check_choice

TOKEN_MAPS = "none"  # the pool that keeps every position


def pool_tokens(x: torch.Tensor, pool: str = "mean") -> torch.Tensor:
    """Token maps [B, T, C] -> pooled features [B, C] float32 ("none": the maps [B, T, C] as they are)."""
    pool = check_choice("pool", pool, POOLS)
    if pool == TOKEN_MAPS:
        return x  # [B, T, C]
    if pool == "max":
        return x.amax(dim=1).float()  # [B, C]: a max is exact in any dtype
    return x.mean(dim=1, dtype=torch.float32)  # [B, C]
