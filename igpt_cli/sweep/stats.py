"""Correlation between generative loss and probe accuracy: Pearson and Spearman, with n."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..results import Result


@dataclass
class Correlation(Result):
    """Loss vs best-layer test accuracy over the checkpoints of `family` ("all": every checkpoint).

    A negative r means: lower loss, higher accuracy (the paper's finding). None where
    undefined (fewer than 3 checkpoints, or a constant series)."""
    family: str
    n: int
    pearson_r: float | None
    pearson_p: float | None
    spearman_rho: float | None
    spearman_p: float | None


def _clean(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def correlate(family: str, loss: Sequence[float], acc: Sequence[float]) -> Correlation:
    """Pearson's r and Spearman's rho (and their two-sided p-values) of `loss` against `acc`."""
    from scipy import stats

    x, y = np.asarray(loss, dtype=np.float64), np.asarray(acc, dtype=np.float64)
    n = len(x)
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return Correlation(family, n, None, None, None, None)
    p = stats.pearsonr(x, y)
    s = stats.spearmanr(x, y)
    return Correlation(family, n, _clean(p.statistic), _clean(p.pvalue), _clean(s.statistic), _clean(s.pvalue))
