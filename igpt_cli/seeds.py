"""Seeds: what every command accepts (0 .. 2**64 - 1, checked before any work) and how a seed
reaches libraries with narrower ranges (scikit-learn takes 0 .. 2**32 - 1)."""
from __future__ import annotations

import numpy as np

from .errors import ParameterError

MAX_SEED = 2**64 - 1  # numpy's SeedSequence takes any; torch.manual_seed and HDF5 attributes stop here


def check_seed(seed, param: str = "seed") -> int:
    """`seed` as an int, or a ParameterError unless it is an integer in 0..MAX_SEED."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= MAX_SEED:
        raise ParameterError(param, seed, f"must be an integer from 0 to {MAX_SEED} (2**64 - 1)")
    return int(seed)


def random_state(seed: int):
    """A scikit-learn `random_state` for `seed`: the seed itself where scikit-learn accepts it (so
    results stay what they were), else a RandomState seeded with the whole seed."""
    seed = check_seed(seed)
    return seed if seed < 2**32 else np.random.RandomState(np.random.MT19937(seed))
