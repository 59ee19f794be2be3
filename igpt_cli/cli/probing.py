"""`igpt probe`: features in, per-layer linear-probe accuracy out."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import LayerSpec, Overwrite
from .ui import ProgressBar, handles_input_errors, maybe_bar, probe_layer_line, render_probe_table


@handles_input_errors
def probe_command(
    train: Annotated[Path, typer.Argument(metavar="TRAIN_FEATS.h5", help="Features file to fit the probes on.")],
    test: Annotated[Optional[Path], typer.Option("--test", metavar="TEST_FEATS.h5", help=(
        "Features file to report accuracy on (default: hold out --test-fraction of TRAIN)."))] = None,
    layers: LayerSpec = None,
    test_fraction: Annotated[float, typer.Option("--test-fraction", help=(
        "Without --test: stratified fraction of TRAIN held out as the test set."))] = 0.2,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON document on stdout.")] = False,
    csv_out: Annotated[Optional[Path], typer.Option("--csv", metavar="OUT.csv", help="Write one row per layer.")] = None,
    plot_out: Annotated[Optional[Path], typer.Option("--plot", metavar="OUT.png", help="Plot accuracy vs layer.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the stratified splits.")] = 0,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Layers probed in parallel (each holds its layer in memory).")] = 1,
    overwrite: Overwrite = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Nothing on stderr but errors (no progress lines, no table).")] = False,
) -> None:
    """Linear-probe accuracy per layer: features in, per-layer accuracy out.

    Example: igpt probe train-feats.h5 --test test-feats.h5 --plot probe.png --json
    """
    import warnings

    from .. import outputs
    from ..probe import probe_files, write_csv
    from .plots import check_plot_path, write_probe_plot

    if plot_out is not None:
        check_plot_path(plot_out, overwrite, param="plot_out")
    if csv_out is not None:
        outputs.check_output_path(csv_out, overwrite)
    bar = ProgressBar.maybe(quiet, on_result=probe_layer_line)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # counted in the report instead (not_converged_fits)
        with maybe_bar(bar):
            report = probe_files(train, test, layers, test_fraction=test_fraction, seed=seed, jobs=jobs,
                                 on_progress=bar)
    d = report.to_dict()
    if not quiet:
        render_probe_table(d)
    if csv_out:
        write_csv(report, csv_out, overwrite=overwrite)
    if plot_out:
        write_probe_plot(d, plot_out)
    if as_json:
        typer.echo(json.dumps(d, indent=2, default=str))


def register(app: typer.Typer) -> None:
    """Add `probe` to the `igpt` app."""
    app.command("probe")(probe_command)
