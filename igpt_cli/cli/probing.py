"""`igpt probe`: features in, per-layer linear-probe accuracy out; `igpt predict`: saved probes or a fine-tuned model applied."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..choices import KNN_K, KNN_TEMPERATURE, KnnVote, ProbeMethod, ProbeSolver
from ..errors import InputError
from .options import (LAYERS_METAVAR, K, Device, KnnTemperature, KnnVoteOpt, LayerSpec, Method, Overwrite, Quiet,
                      out_option)
from .ui import ProgressBar, handles_input_errors, maybe_bar, probe_layer_line, render_probe_table


@handles_input_errors
def probe_command(
    train: Annotated[Path, typer.Argument(metavar="train_feats", help="Features file to fit the probes on.")],
    test: Annotated[Optional[Path], typer.Option("--test", metavar="<test-feats.h5>", help=(
        "Features file to report accuracy on (default: hold out --test-fraction of TRAIN)."))] = None,
    layers: LayerSpec = None,
    test_fraction: Annotated[float, typer.Option("--test-fraction", help=(
        "Without --test: stratified fraction of TRAIN held out as the test set."))] = 0.2,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON document on stdout.")] = False,
    csv_out: Annotated[Optional[Path], typer.Option("--csv", metavar="<out.csv>", help="Write one row per layer.")] = None,
    plot_out: Annotated[Optional[Path], typer.Option("--plot", metavar="<out.png>", help="Plot accuracy vs layer.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the stratified splits.")] = 0,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Layers probed in parallel (each holds its layer in memory).")] = 1,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    solver: Annotated[ProbeSolver, typer.Option("--solver", help=(
        "torch: every C of the search in one pass over the data (CPU or CUDA); scipy: one C after the other "
        "(numpy); sklearn: scikit-learn's own LogisticRegression (the reference); auto: torch."))] = ProbeSolver.auto,
    device: Device = "auto",
    max_memory: Annotated[Optional[str], typer.Option("--max-memory", metavar="<bytes>", help=(
        "Cap on what the probe holds (e.g. 512M, 2G): a layer that does not fit is streamed from the file "
        "in row chunks (same result; linear: one file read per pass; knn: the training rows in blocks)."))] = None,
    save_probes: Annotated[Optional[Path], typer.Option("--save-probes", metavar="<probes.h5>", help=(
        "Save each layer's chosen classifier (standardisation, weights, C, classes) for `igpt predict`."))] = None,
    plot_confusion: Annotated[Optional[Path], typer.Option("--plot-confusion", metavar="<out.png>", help=(
        "Picture of the test confusion matrix of the best layer (or of the one --layer names)."))] = None,
    method: Method = ProbeMethod.linear,
    k: K = KNN_K,
    knn_vote: KnnVoteOpt = KnnVote.weighted,
    knn_temperature: KnnTemperature = KNN_TEMPERATURE,
    concat: Annotated[bool, typer.Option("--concat", help=(
        "One probe on the concatenation of the --layer layers (each standardised on its own), reported as one "
        "row; --save-probes and `igpt predict` concatenate the same layers."))] = False,
    shots: Annotated[Optional[str], typer.Option("--shots", metavar="<n,n,...>", help=(
        "Also few-shot linear probes per layer: N training images per class (e.g. 1,5,10), C by cross-validation "
        "within the shots (1 shot: C fixed at 1); mean ± std of test accuracy over --seeds draws."))] = None,
    seeds: Annotated[int, typer.Option("--seeds", help="--shots: draws per shot count.")] = 5,
) -> None:
    """Linear-probe accuracy per layer: features in, per-layer accuracy out.

    Example: igpt probe train-feats.h5 --test test-feats.h5 --save-probes probes.h5 --plot probe.png --json
    """
    import warnings

    from .. import outputs
    from ..distributed import DistContext, PeerError
    from ..errors import InputError
    from ..probe import probe_files, write_csv
    from .plots import check_plot_path, write_confusion_plot, write_probe_plot

    dist = DistContext.from_env()
    try:
        outputs.check_distinct({"--save-probes": save_probes, "--csv": csv_out, "--plot": plot_out,
                                "--plot-confusion": plot_confusion}, {"TRAIN_FEATS.h5": train, "--test": test})
        if plot_out is not None:
            check_plot_path(plot_out, overwrite, param="plot_out")
        if plot_confusion is not None:
            check_plot_path(plot_confusion, overwrite, param="plot_confusion")
        if csv_out is not None:
            outputs.check_output_path(csv_out, overwrite)
    except InputError as e:
        if not dist.is_main:   # every rank checks the same paths: rank 0 says it once
            raise PeerError(str(e)) from None
        raise
    bar = ProgressBar.maybe(quiet or not dist.is_main, on_result=probe_layer_line)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # counted in the report instead (not_converged_fits)
            with maybe_bar(bar):
                report = probe_files(train, test, layers, test_fraction=test_fraction, seed=seed, jobs=jobs,
                                     on_progress=bar, solver=solver.value, device=device, max_memory=max_memory,
                                     save_probes=save_probes, overwrite=overwrite, dist=dist,
                                     method=method.value, k=k, knn_vote=knn_vote.value,
                                     knn_temperature=knn_temperature, concat=concat,
                                     shots=None if shots is None else parse_shots(shots), seeds=seeds)
    finally:
        dist.close()
    if not dist.is_main:   # rank 0 alone writes and prints the one report
        return
    d = report.to_dict()
    if not quiet:
        render_probe_table(d)
    if csv_out:
        write_csv(report, csv_out, overwrite=overwrite)
    if plot_out:
        write_probe_plot(d, plot_out)
    if plot_confusion:
        write_confusion_plot(d, plot_confusion)
    if as_json:
        typer.echo(json.dumps(d, indent=2, default=str))


def parse_shots(text: str) -> list[int]:
    """"1,5,10" -> [1, 5, 10] (anything else: one line naming --shots)."""
    from ..errors import ParameterError

    try:
        return [int(p) for p in text.split(",")]
    except ValueError:
        raise ParameterError("shots", text, "must be comma-separated image counts per class, e.g. 1,5,10") from None


PREDICT_TABLE_ROWS = 1000  # predict without -o/--json prints at most this many rows (the rest: use -o or --json)


@handles_input_errors
def predict_command(
    src: Annotated[Path, typer.Argument(metavar="input", help=(
        "With --probes: a features file. With -m/--model: a tokens file quantized with the model's palette, or "
        "images (a folder, an archive, one image; what `igpt quantize` reads), quantized at the model's size."))],
    probes: Annotated[Optional[Path], typer.Option("--probes", metavar="<probes.h5>", help=(
        "Probes saved by `igpt probe --save-probes`, applied to features."))] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", metavar="<dir>", help=(
        "A fine-tuned model (the directory `igpt finetune` writes), applied to tokens or images."))] = None,
    layer: Annotated[Optional[list[str]], typer.Option("--layer", "-l", metavar=LAYERS_METAVAR, help=(
        "--probes: which layer's probe: one layer of the spec every command takes, e.g. 6 or -1 for the last "
        "(default: the probes' best layer, or the best of the layers the features hold)."))] = None,
    output: Annotated[Optional[Path], out_option(
        "Write predictions (class index, class name, probabilities, sources) to this HDF5 file.")] = None,
    output_alias: Annotated[Optional[Path], typer.Option("--output", hidden=True, help="Old spelling of --out.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report with every row's prediction as JSON.")] = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    device: Device = "auto",
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help=(
        "-m/--model: images per batch (default 256)."))] = None,
) -> None:
    """Apply saved probes to features, or a fine-tuned model to tokens or images: predicted class and
    probabilities per row, accuracy where labelled.

    Without -o or --json, prints one row per image (source, predicted class, probability).

    Example: igpt predict test-feats.h5 --probes probes.h5 -o predictions.h5

    Example: igpt predict test.h5 -m ft -o ft-predictions.h5
    """
    from ..probe import predict_file
    from .ui import err, plural, print_json

    from .. import outputs

    output = output or output_alias
    if (probes is None) == (model is None):
        raise InputError("give --probes PROBES.h5 (features in) or -m/--model FINETUNED_DIR (tokens or images in), "
                         "exactly one of them")
    outputs.check_distinct({"--out": output}, {"features" if probes is not None else "input": src, "probes": probes})
    if probes is not None:
        for flag, given in (("--device", device != "auto"), ("--batch-size", batch_size is not None)):
            if given:
                raise InputError(f"{flag} applies to -m/--model; saved probes run on the CPU")
        if layer:
            try:
                (one,) = (int(v) for v in layer)   # one layer: 6, or -1 for the last
            except ValueError:
                raise InputError(f"--layer {','.join(layer)}: predict applies one layer's probe; give one layer "
                                 "number (e.g. --layer 6, or -1 for the last)") from None
            layer = str(one)
        report = predict_file(src, probes, layer, output, overwrite=overwrite, as_list=as_json or output is None)
        what = f"layer {report.layer} ({report.layer_choice})"
    else:
        from ..train.classify import EVAL_BATCH, predict_finetuned_file

        if layer:
            raise InputError("--layer applies to --probes; a fine-tuned model classifies from its last layer")
        report = predict_finetuned_file(src, model, output, overwrite=overwrite, as_list=as_json or output is None,
                                        device=device, batch_size=EVAL_BATCH if batch_size is None else batch_size)
        what = f"fine-tuned {model}"
    acc = "n/a" if report.accuracy is None else f"{report.accuracy:.2%}"
    if not quiet:
        err.print(f"{what}: {plural(report.n, 'row')}, accuracy {acc} on "
                  f"{plural(report.n_known, 'labelled row')}"
                  + (f"; {plural(report.n_unseen, 'row')} of classes the "
                     f"{'probes' if probes is not None else 'model'} never saw "
                     f"({', '.join(report.unseen_classes)})" if report.n_unseen else ""), highlight=False,
                  soft_wrap=True)
    if as_json:
        print_json(report)
    elif output is None:
        render_predictions(report.to_dict())


def render_predictions(d: dict) -> None:
    """One row per image on stdout: index, source, predicted class and its probability, true label."""
    from rich.console import Console
    from rich.table import Table

    from .ui import err

    rows = d["predictions"]
    by = f"layer {d['layer']}" if d.get("probes") else f"fine-tuned {Path(str(d.get('model'))).name}"
    t = Table(title=f"igpt predict · {Path(d['features']).name} · {by}", title_justify="left")
    for col, just in (("row", "right"), ("source", "left"), ("predicted", "left"), ("prob", "right"),
                      ("label", "left")):
        t.add_column(col, justify=just, overflow="fold")
    for r in rows[:PREDICT_TABLE_ROWS]:
        label = "" if r["label"] < 0 else str(r["label"])
        t.add_row(str(r["index"]), r["source"] or "", r["name"], f"{max(r['probabilities']):.1%}", label)
    Console(soft_wrap=False).print(t)
    if len(rows) > PREDICT_TABLE_ROWS:
        err.print(f"{len(rows) - PREDICT_TABLE_ROWS} more rows: write them all with -o OUT.h5 or --json",
                  highlight=False)


def register(app: typer.Typer) -> None:
    """Add `probe` and `predict` to the `igpt` app."""
    app.command("probe")(probe_command)
    app.command("predict")(predict_command)
