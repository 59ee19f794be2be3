"""The sweep as a CSV file: one row per checkpoint (its probe's method and k), the probe curve as
`test_acc_<layer>` columns."""
from __future__ import annotations

import csv
from pathlib import Path

from ..outputs import atomic_output


def write_csv(result, path: str | Path) -> Path:
    """One row per checkpoint (family, step, loss, the probe's method and k, best layer, accuracies, one
    column per layer); replaced atomically on every run (it is derived from the checkpoints' result files)."""
    rows = result.checkpoints
    layers = sorted({x.layer for r in rows for x in r.layers})
    probe = result.probe
    cols = ["family", "name", "step", "n_params", "loss_nats", "loss_bits", "method", "k", "best_layer",
            "best_val_acc", "best_test_acc", *[f"test_acc_{l}" for l in layers], "checkpoint"]
    with atomic_output(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(cols)
            for r in rows:
                acc = {x.layer: x.test_acc for x in r.layers}
                w.writerow([r.family, r.name, "" if r.step is None else r.step, r.n_params, f"{r.loss_nats:.6f}",
                            f"{r.loss_bits:.6f}", probe["method"], probe.get("k", ""), r.best_layer,
                            f"{r.best_val_acc:.6f}", f"{r.best_test_acc:.6f}",
                            *["" if l not in acc else f"{acc[l]:.6f}" for l in layers], r.checkpoint])
    return Path(path)
