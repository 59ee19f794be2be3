"""The tool's main picture: probe accuracy by layer (matplotlib, written as a PNG)."""
from __future__ import annotations

from pathlib import Path

from ..outputs import atomic_output


def write_probe_plot(report: dict, path: str | Path) -> Path:
    """Validation and test accuracy per layer, the best layer (by validation) starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["layers"]
    layers = [r["layer"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(layers, [100 * r["val_acc"] for r in rows], "o--", label="validation (10 % of train)")
    ax.plot(layers, [100 * r["test_acc"] for r in rows], "o-", label="test")
    best = next((r for r in rows if r["layer"] == report["best_layer"]), None)
    if best is not None:
        ax.axvline(best["layer"], color="grey", lw=0.8, ls=":")
        ax.plot([best["layer"]], [100 * best["test_acc"]], "*", ms=16, color="crimson",
                label=f"best layer {best['layer']}: {100 * best['test_acc']:.1f} %")
    ds = report.get("tokens_file") or report["train"]
    ax.set_title(f"Linear probe: {Path(str(report.get('model'))).name} on {Path(str(ds)).stem}")
    ax.set_xlabel("layer")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)
