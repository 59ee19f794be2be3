"""The tool's main picture: probe accuracy by layer (matplotlib), in the format its file name says."""
from __future__ import annotations

from pathlib import Path

from ..errors import ParameterError
from ..outputs import atomic_output, check_output_path

# what the file's extension may name (matplotlib's Agg canvas, without the raw dumps)
PLOT_FORMATS = ("png", "pdf", "svg", "svgz", "jpg", "jpeg", "webp", "tif", "tiff", "gif", "eps", "ps")


def check_plot_path(path: str | Path, overwrite: bool, param: str = "plot") -> Path:
    """An output path whose extension names a picture format matplotlib writes (checked before any work)."""
    p = check_output_path(path, overwrite)
    fmt = p.suffix.lower().lstrip(".")
    if fmt not in PLOT_FORMATS:
        raise ParameterError(param, str(path), f"unknown picture format {p.suffix or '(no extension)'!r}; "
                                               f"use one of .{', .'.join(PLOT_FORMATS)}")
    return p


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
    return _save(fig, path)


def write_confusion_plot(report: dict, path: str | Path, layer: int | None = None) -> Path:
    """The test confusion matrix (rows: true class, columns: predicted; row-normalised colours, counts
    written) of `layer`, default the best layer by validation accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    want = report["best_layer"] if layer is None else layer
    row = next(r for r in report["layers"] if r["layer"] == want)
    cm = np.asarray(row["confusion"])                                # [true, predicted]
    names = list(report.get("class_names") or [])
    names = [names[i] if i < len(names) else str(i) for i in range(len(cm))]
    frac = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    side = max(4.0, 0.45 * len(cm) + 2)
    fig, ax = plt.subplots(figsize=(side + 1, side), dpi=120)
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    if len(cm) <= 30:
        for i in range(len(cm)):
            for j in range(len(cm)):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if frac[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(cm)), names, rotation=90)
        ax.set_yticks(range(len(cm)), names)
    lo, hi = row.get("test_acc_ci") or [float("nan")] * 2
    ax.set_title(f"layer {want}: test {100 * row['test_acc']:.1f} % (95 % CI {100 * lo:.1f}–{100 * hi:.1f})")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    """Write the figure atomically in the format the extension names, then close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fmt = Path(path).suffix.lower().lstrip(".") or "png"
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="jpeg" if fmt == "jpg" else fmt)
    plt.close(fig)
    return Path(path)


def write_loss_plot(records: list[dict], fh) -> None:
    """`igpt train`'s OUT/loss.png: the training loss of every logged step and the validation losses
    (records of OUT/metrics.jsonl), as a PNG into the binary file `fh`."""
    import math

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def finite(v) -> bool:
        return isinstance(v, (int, float)) and math.isfinite(v)

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    train = [(r["step"], r["loss"]) for r in records if finite(r.get("loss"))]
    val = [(r["step"], r["val_loss"]) for r in records if finite(r.get("val_loss"))]
    if train:
        ax.plot(*zip(*train), label="train", color="tab:blue", linewidth=1)
    if val:
        ax.plot(*zip(*val), label="validation", color="tab:orange", marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    fig.savefig(fh, format="png")
