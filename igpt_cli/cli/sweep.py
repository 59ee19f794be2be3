"""`igpt sweep`: loss and probe accuracy (linear or k-NN) over checkpoints, its table and its two figures."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..choices import KNN_K, KNN_TEMPERATURE, ComputeDtype, KnnVote, ProbeMethod
from .options import K, Device, Dtype, Json, KnnTemperature, KnnVoteOpt, LayerSpec, Method, Quiet, Restart, out_option
from .ui import ProgressBar, err, handles_input_errors, maybe_bar, print_json, print_table



@handles_input_errors
def sweep_command(
    checkpoints: Annotated[list[str], typer.Argument(help=(
        "Checkpoints: model directories, training runs (their step-* series), TensorFlow prefixes or globs; "
        "NAME=ARG names the series (family)."))],
    train: Annotated[Path, typer.Option("--train", help="Tokens file the probes are fitted on (C chosen on a "
                                                        "validation split of it; k-NN's neighbours).")],
    test: Annotated[Path, typer.Option("--test", help="Tokens file the probes are tested on.")],
    out: Annotated[Path, out_option("Directory for the per-checkpoint files, sweep.json, sweep.csv and the two "
                                    "PNGs (resumable).")],
    score_on: Annotated[Optional[Path], typer.Option("--score-on", help=(
        "Tokens file the generative loss is measured on (default: --test)."))] = None,
    layers: LayerSpec = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the probe's validation split.")] = 0,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Layers probed at once.")] = 1,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Images per batch when scoring "
                                                                                "and extracting.")] = None,
    device: Device = "auto",
    dtype: Dtype = ComputeDtype.auto,
    restart: Restart = False,
    quiet: Quiet = False,
    as_json: Json = False,
    method: Method = ProbeMethod.linear,
    k: K = KNN_K,
    knn_vote: KnnVoteOpt = KnnVote.weighted,
    knn_temperature: KnnTemperature = KNN_TEMPERATURE,
) -> None:
    """Does generating better mean representing better? Generative loss and probe accuracy per checkpoint.

    For each checkpoint: loss on --score-on (igpt score), features of --train and --test (igpt extract),
    probe of every layer (igpt probe: linear, or k-NN with --method knn); then a table, the correlation
    between loss and best accuracy, sweep.csv, sweep.json and two PNGs (accuracy vs loss; accuracy by
    layer and checkpoint). Rerun to resume: finished checkpoints are not recomputed (a result of another
    --method or k-NN setting is refused: another -o, or --restart).

    Example: igpt sweep runs/tiny --train train.h5 --test test.h5 --layer -1 -o sweep/   # the checkpoints igpt train saved
    """
    from ..distributed import DistContext
    from ..sweep import run_sweep
    from ..sweep.plan import PLOT_FILES

    dist = DistContext.from_env()
    bar = ProgressBar.maybe(quiet or not dist.is_main)
    try:
        with maybe_bar(bar):
            result = run_sweep(checkpoints, train, test, out, score_on=score_on, layers=layers or None, seed=seed,
                               jobs=jobs, batch_size=batch_size, device=device, dtype=dtype.value,
                               restart=restart, on_progress=bar, dist=dist, method=method.value, k=k,
                               knn_vote=knn_vote.value, knn_temperature=knn_temperature)
    finally:
        dist.close()
    if not dist.is_main:   # rank 0 alone draws, prints and writes
        return
    d = result.to_dict()
    loss_plot, layer_plot = (out / name for name in PLOT_FILES)
    d["files"].update(loss_plot=str(write_loss_plot(d, loss_plot)), layer_plot=str(write_layer_plot(d, layer_plot)))
    if not quiet:
        render_sweep_table(d)
    print_json(d)


def render_sweep_table(d: dict) -> None:
    """One row per checkpoint, then the correlations (stderr)."""
    from rich.table import Table

    t = Table(title=f"igpt sweep · loss on {Path(d['score_on']).name} · {probe_text(d['probe'])} "
                    f"{Path(d['train']).name} → {Path(d['test']).name}", title_justify="left")
    for col in ("family", "checkpoint", "step", "params", "loss nats", "bits", "best layer", "val acc",
                "test acc"):
        t.add_column(col, justify="left" if col in ("family", "checkpoint") else "right",
                     no_wrap=col == "checkpoint")
    for r in d["checkpoints"]:
        t.add_row(r["family"], r["name"], "" if r["step"] is None else str(r["step"]), f"{r['n_params'] / 1e6:.2f} M",
                  f"{r['loss_nats']:.4f}", f"{r['loss_bits']:.4f}", str(r["best_layer"]), f"{r['best_val_acc']:.2%}",
                  f"{r['best_test_acc']:.2%}")
    print_table(t)
    for c in d["correlations"]:
        err.print(f"{c['family']}: {correlation_text(c)}", highlight=False)
    err.print(f"{d['computed']} computed, {d['reused']} done before; {d['seconds']:.0f} s", highlight=False)


def probe_text(probe: dict) -> str:
    """What the sweep's probe was, for its table and figures: "linear probe" or "k-NN (k=20, weighted, T=0.07)"."""
    if probe.get("method") != "knn":
        return "linear probe"
    vote = probe["knn_vote"] + (f", T={probe['knn_temperature']:g}" if probe.get("knn_temperature") else "")
    return f"k-NN (k={probe['k']}, {vote})"


def correlation_text(c: dict) -> str:
    if c["pearson_r"] is None:
        return f"correlation undefined (n={c['n']})"
    return (f"loss vs best test accuracy: Pearson r = {c['pearson_r']:+.3f} (p = {c['pearson_p']:.2g}), "
            f"Spearman rho = {c['spearman_rho']:+.3f} (p = {c['spearman_p']:.2g}), n = {c['n']}")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    from ..outputs import atomic_output

    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    _pyplot().close(fig)
    return path


def _families(d: dict) -> dict[str, list[dict]]:
    fams: dict[str, list[dict]] = {}
    for r in d["checkpoints"]:
        fams.setdefault(r["family"], []).append(r)
    return fams


def write_loss_plot(d: dict, path: Path) -> Path:
    """The paper's figure: best-layer test accuracy against generative loss, one series per family."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.6), dpi=120)
    corr = {c["family"]: c for c in d["correlations"]}
    for fam, rows in _families(d).items():
        x = [r["loss_bits"] for r in rows]
        y = [100 * r["best_test_acc"] for r in rows]
        c = corr.get(fam, {})
        label = f"{fam} ({rows[0]['n_params'] / 1e6:.2f} M params)"
        if c.get("spearman_rho") is not None:
            label += f": Pearson {c['pearson_r']:+.2f}, Spearman {c['spearman_rho']:+.2f}, n={c['n']}"
        ax.plot(x, y, "o-", label=label)
        for r, xi, yi in zip(rows, x, y):
            if r["step"] is not None:
                ax.annotate(f"{r['step']}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.invert_xaxis()  # training runs left to right: loss falls
    ax.set_xlabel(f"generative loss on {Path(d['score_on']).name} (bits per token; lower → right)")
    ax.set_ylabel(f"{probe_text(d['probe'])} test accuracy, best layer (%)")
    ax.set_title("Does generating better mean representing better?")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def write_layer_plot(d: dict, path: Path) -> Path:
    """Test accuracy by layer (columns) and checkpoint (rows), one heatmap per family; ★ the layer chosen
    on validation."""
    import numpy as np

    plt = _pyplot()
    fams = _families(d)
    heights = [max(1.2, 0.35 * len(rows) + 0.9) for rows in fams.values()]
    fig, axes = plt.subplots(len(fams), 1, figsize=(7.5, sum(heights)), dpi=120, squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (fam, rows) in zip(axes[:, 0], fams.items()):
        layers = sorted({x["layer"] for r in rows for x in r["layers"]})
        acc = np.full((len(rows), len(layers)), np.nan)
        for i, r in enumerate(rows):
            for x in r["layers"]:
                acc[i, layers.index(x["layer"])] = 100 * x["test_acc"]
        im = ax.imshow(acc, aspect="auto", cmap="viridis")
        for i, r in enumerate(rows):
            for j, l in enumerate(layers):
                if not np.isnan(acc[i, j]):
                    star = "★" if l == r["best_layer"] else ""
                    ax.text(j, i, f"{acc[i, j]:.1f}{star}", ha="center", va="center", fontsize=6,
                            color="white" if acc[i, j] < np.nanmean(acc) else "black")
        ax.set_xticks(range(len(layers)), [str(l) for l in layers])
        ax.set_yticks(range(len(rows)), [r["name"] if r["step"] is None else f"step {r['step']}" for r in rows],
                      fontsize=7)
        ax.set_title(f"{fam}: {probe_text(d['probe'])} test accuracy (%) by layer and checkpoint (★ best layer by "
                     "validation)", fontsize=9)
        ax.set_xlabel("layer")
        fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    return _save(fig, path)


def register(app: typer.Typer) -> None:
    """Add `sweep` to the `igpt` app."""
    app.command("sweep")(sweep_command)
