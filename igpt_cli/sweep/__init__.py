"""`igpt sweep`: does generating better mean representing better?

Over a series of checkpoints (the steps of a training run, model sizes, …) measure the
generative loss (`igpt score`) and the linear-probe accuracy of every layer (`igpt
extract` + `igpt probe`), and correlate the two: the central figure of "Generative
Pretraining from Pixels" (probe accuracy against validation loss over checkpoints).

    import igpt_cli as igpt
    res = igpt.sweep(["runs/big", "runs/small"], "train.h5", "test.h5", "sweep/")
    res.correlations[0].spearman_rho, [(c.step, c.loss_nats, c.best_test_acc) for c in res.checkpoints]

Modules: `checkpoints` (arguments → checkpoints, families, steps), `plan` (every check before
any work; the files a sweep keeps), `stage` (`run_sweep`,
the typed results, resuming), `stats` (correlations), `report` (CSV). The figures are
drawn by the command line (`igpt_cli.cli.sweep`).
"""
from __future__ import annotations

import sys
import types

from .checkpoints import Checkpoint, expand_checkpoints, read_step
from .stage import CheckpointResult, LayerAccuracy, SweepResult, correlations, run_sweep
from .stats import Correlation, correlate

sweep = run_sweep  # `igpt_cli.sweep(...)`

__all__ = ["sweep", "run_sweep", "SweepResult", "CheckpointResult", "LayerAccuracy", "Correlation", "correlate",
           "correlations", "Checkpoint", "expand_checkpoints", "read_step"]


class _CallableModule(types.ModuleType):
    """`igpt_cli.sweep` is this package once anything imported it (the import system sets the
    attribute), so the package itself is callable: `igpt_cli.sweep(...)` is `run_sweep(...)`."""

    def __call__(self, *args, **kwargs):
        return run_sweep(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
