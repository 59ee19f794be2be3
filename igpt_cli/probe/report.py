"""A probe report as a CSV file, one row per layer.

JSON is `ProbeReport.to_dict()` / `.to_json(indent=2)` (what `igpt probe --json` prints).
Drawing (the results table, the accuracy-by-layer plot) is the command line's business
(`igpt_cli.cli`).
"""
from __future__ import annotations

import csv
from pathlib import Path

from ..outputs import atomic_output, check_output_path
from ..results import Result
from .runner import ProbeReport


def _as_dict(report: ProbeReport | dict) -> dict:
    return report.to_dict() if isinstance(report, Result) else report


def write_csv(report: ProbeReport | dict, path: str | Path, *, overwrite: bool = False) -> None:
    """One row per layer: C, accuracies, sizes, provenance, per-class accuracy (`acc_<class>`).

    An existing file is replaced only with `overwrite=True` (OutputError otherwise, before
    anything is written); callers that probe first should check the path before the fits
    (`outputs.check_output_path(path, overwrite)`)."""
    check_output_path(path, overwrite)
    report = _as_dict(report)
    names = list(report["layers"][0]["per_class_acc"]) if report["layers"] else []
    cols = ["layer", "c", "val_acc", "test_acc", "n_train", "n_val", "n_test", "dim", "seconds",
            "model", "site", "sos", "method", "k"] + [f"acc_{n}" for n in names]
    with atomic_output(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(cols)
            for r in report["layers"]:
                layer = "+".join(map(str, r["layers"])) if r.get("layers") else r["layer"]
                w.writerow([layer, "" if r["c"] is None else repr(r["c"]), f"{r['val_acc']:.6f}", f"{r['test_acc']:.6f}", r["n_train"],
                            r["n_val"], r["n_test"], r["dim"], r["seconds"], report.get("model"),
                            report.get("site"), report.get("sos"), r.get("method", "linear"),
                            "" if r.get("k") is None else r["k"]]
                           + ["" if r["per_class_acc"].get(n) is None else f"{r['per_class_acc'][n]:.6f}"
                              for n in names])
