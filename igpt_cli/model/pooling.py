"""How a layer's token map becomes one vector per image.

iGPT's linear probes read the average over positions (Chen et al. 2020, section 3.2);
`POOLS` lists the pools there are, and `pool_tokens` applies one. The mean is taken in
float32 whatever the compute dtype, so bfloat16 runs lose no precision in the sum.
"""
from __future__ import annotations

import torch

from ..choices import POOLS
from ..errors import check_choice


def pool_tokens(x: torch.Tensor, pool: str = "mean") -> torch.Tensor:
    """Token maps [B, T, C] -> pooled features [B, C] float32."""
    check_choice("pool", pool, POOLS)
    return x.mean(dim=1, dtype=torch.float32)  # [B, C]
