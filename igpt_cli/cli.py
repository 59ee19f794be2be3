"""Command-line interface: thin typer commands over the library functions.

Conventions: results (JSON) go to stdout, progress and tables to stderr; bad input
is one line on stderr and exit status 2 (`InputError`), never a traceback.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .errors import InputError

app = typer.Typer(
    name="igpt",
    help="Image GPT as an unsupervised feature extractor: quantize → extract → probe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)


def fail(msg: str) -> None:
    err.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def handles_input_errors(fn):
    """Turn InputError (and Ctrl-C) into one clean line and an exit status."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as e:
            if getattr(e, "quiet", False):  # another process already reported it (distributed runs)
                raise typer.Exit(2)
            fail(str(e))
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130)

    return wrapper


@app.callback()
def main() -> None:
    """igpt — quantize images to palette tokens, extract iGPT features, probe them."""


# --- quantize / palette / info / show commands (issue 2) ---

from pathlib import Path as _Path  # noqa: E402

palette_app = typer.Typer(help="Colour palettes: fit a new one for your own domain.", no_args_is_help=True)
app.add_typer(palette_app, name="palette")


def _print_json(d: dict) -> None:
    import json as _json

    typer.echo(_json.dumps(d))


class _Bar:
    """Rich progress bar on stderr (transient); a no-op when quiet."""

    def __init__(self, quiet: bool, what: str):
        self.quiet, self.what, self.progress, self.task = quiet, what, None, None

    def __enter__(self):
        if not self.quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn(self.what), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), console=err, transient=True)
            self.progress.__enter__()
        return self

    def start(self, total):
        if self.progress is not None:
            self.task = self.progress.add_task(self.what, total=total)

    def advance(self, k: int) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.advance(self.task, k)

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
        return False


@app.command()
@handles_input_errors
def quantize(
    src: _Path = typer.Argument(..., help="Image folder, .tar/.zip of one, CIFAR python archive/folder, .npz or .npy."),
    out: _Path = typer.Option(..., "-o", "--out", help="Tokens file to write (HDF5)."),
    split: str = typer.Option("all", help="train, test (val, ...) or all."),
    size: int = typer.Option(32, help="Images are resized to size×size."),
    palette: str = typer.Option(None, help="Palette: .npy, preprocessor_config.json or a model dir "
                                         "(default: the official iGPT 512-colour palette)."),
    limit: int = typer.Option(None, help="Quantize at most N images."),
    resize: str = typer.Option("bilinear", help="bilinear (whole image, like HF) or center-crop."),
    fmt: str = typer.Option(None, "--format", help="Override detection: imagefolder, cifar, npz, npy."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable images and count them."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Quantize a dataset to palette tokens (an igpt-tokens HDF5 file)."""
    from .quantize import quantize_dataset

    with _Bar(quiet, "quantize") as bar:
        summary = quantize_dataset(src, out, split=split, size=size, palette=palette, limit=limit, resize=resize,
                                   fmt=fmt, skip_bad=skip_bad, overwrite=overwrite, on_start=bar.start,
                                   progress=bar.advance)
    _print_json(summary)


@palette_app.command("fit")
@handles_input_errors
def palette_fit(
    src: _Path = typer.Argument(..., help="Any dataset `igpt quantize` reads."),
    out: _Path = typer.Option(..., "-o", "--out", help="Palette .npy to write (float32 K×3 in [-1, 1])."),
    k: int = typer.Option(512, "-k", help="Number of colours."),
    sample_pixels: int = typer.Option(1_000_000, "--sample-pixels", help="Pixels sampled for k-means."),
    split: str = typer.Option("all"),
    size: int = typer.Option(32),
    limit: int = typer.Option(None),
    resize: str = typer.Option("bilinear"),
    fmt: str = typer.Option(None, "--format"),
    skip_bad: bool = typer.Option(False, "--skip-bad"),
    overwrite: bool = typer.Option(False, "--overwrite"),
    seed: int = typer.Option(0),
) -> None:
    """Fit a new palette with MiniBatchKMeans (for pretraining on your own domain)."""
    from .quantize import fit_palette_file

    _print_json(fit_palette_file(src, out, k=k, sample_pixels=sample_pixels, split=split, size=size, limit=limit,
                                 resize=resize, fmt=fmt, skip_bad=skip_bad, overwrite=overwrite, seed=seed))


@app.command()
@handles_input_errors
def info(
    file: _Path = typer.Argument(..., help="Any igpt file (tokens or features)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Summarize an igpt file: kind, shapes, classes and counts, attrs."""
    import json as _json

    from .quantize import file_info

    d = file_info(file)
    if as_json:
        typer.echo(_json.dumps(d))
        return
    typer.echo(f"{d['path']}: {d['kind']} (format_version {d['format_version']}), {d['n']} rows")
    for name, s in d["datasets"].items():
        typer.echo(f"  {name:<14} {s['dtype']:<8} {tuple(s['shape'])}")
    if d.get("class_counts"):
        typer.echo("  classes: " + ", ".join(f"{c} {n}" for c, n in d["class_counts"].items()))
    for k2, v in d["attrs"].items():
        typer.echo(f"  {k2}: {v if not isinstance(v, (list, dict)) else _json.dumps(v)}")


@app.command()
@handles_input_errors
def show(
    tokens: _Path = typer.Argument(..., help="A tokens file."),
    out: _Path = typer.Option(..., "-o", "--out", help="PNG to write."),
    n: int = typer.Option(64, "--n", help="Number of images."),
    scale: int = typer.Option(2, help="Integer upscaling of the grid."),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Decode tokens through their palette into a PNG grid."""
    from .quantize import show_tokens

    _print_json(show_tokens(tokens, out, n=n, scale=scale, overwrite=overwrite))

# --- extract commands (issue 3) ---


@app.command()
@handles_input_errors
def extract(
    tokens: str = typer.Argument(..., help="Tokens file (igpt quantize output)."),
    model: str = typer.Option(..., "--model", "-m", help="Hugging Face ImageGPT directory, or 'pixels'."),
    layer: list[str] = typer.Option(None, "--layer", "-l",
                                    help="Layer(s): 12, 8-16, -1, all (repeatable). Default: all."),
    out: str = typer.Option(..., "--out", "-o", help="Features file to write."),
    batch_size: int = typer.Option(None, "--batch-size", "-b", help="Images per batch (default: auto)."),
    device: str = typer.Option("auto", help="auto|cpu|cuda|mps (auto: cuda, then mps, then cpu)."),
    dtype: str = typer.Option("auto", help="auto|float32|bfloat16|float16 (auto: bf16 where fast)."),
    no_sos: bool = typer.Option(False, "--no-sos", help="Feed tokens unshifted (Hugging Face's behaviour)."),
    site: str = typer.Option("ln", help="ln: mean of ln_1(h_l) (the paper's); resid: mean of h_l."),
    limit: int = typer.Option(None, help="Only the first N images."),
    store_dtype: str = typer.Option("float32", "--store-dtype", help="float32|float16 on disk."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    restart: bool = typer.Option(False, "--restart", help="Discard a partial run instead of resuming it."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Run a pretrained iGPT over a tokens file; write per-layer averaged features (resumable).

    Under torchrun (or srun with RANK/WORLD_SIZE/LOCAL_RANK set) every process takes a
    shard of the rows; see 'Running on a cluster' in the README.
    """
    import json

    from .distributed import DistContext
    from .extract import extract_features

    dist = DistContext.from_env()
    try:
        summary = extract_features(
            tokens, model, layer or None, out, batch_size=batch_size, device=device, dtype=dtype,
            sos=not no_sos, site=site, limit=limit, store_dtype=store_dtype, progress=not quiet and dist.is_main,
            overwrite=overwrite, restart=restart, log=None if quiet else (lambda m: err.print(m, highlight=False)),
            dist=dist,
        )
    finally:
        dist.close()
    if dist.is_main:
        print(json.dumps(summary))


# --- probe commands (issue 4) ---


@app.command("probe")
@handles_input_errors
def probe_cmd(
    train: str = typer.Argument(..., metavar="TRAIN_FEATS.h5", help="features file to fit the probes on"),
    test: str = typer.Option(None, "--test", metavar="TEST_FEATS.h5",
                             help="features file to report accuracy on (default: hold out --test-fraction of TRAIN)"),
    layer: list[str] = typer.Option(None, "--layer", "-l",
                                    help="layers: 8, -1, 8-16, 0,4,8 or all (repeatable; default all)"),
    test_fraction: float = typer.Option(0.2, "--test-fraction",
                                        help="without --test: stratified fraction of TRAIN held out as test set"),
    as_json: bool = typer.Option(False, "--json", help="print the report as one JSON document on stdout"),
    csv_out: str = typer.Option(None, "--csv", metavar="OUT.csv", help="write one row per layer"),
    plot_out: str = typer.Option(None, "--plot", metavar="OUT.png",
                                 help="plot accuracy vs layer (needs the 'plot' extra: matplotlib)"),
    seed: int = typer.Option(0, "--seed", help="seed for the stratified splits"),
    jobs: int = typer.Option(1, "--jobs", "-j", help="layers probed in parallel (each holds its layer in memory)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress lines"),
) -> None:
    """Linear-probe accuracy per layer: features in, per-layer accuracy out."""
    from . import formats, probe

    if plot_out:
        probe.check_plot_available()
        formats.check_output_path(plot_out, overwrite=True)
    if csv_out:
        formats.check_output_path(csv_out, overwrite=True)

    def progress(r: "probe.LayerResult") -> None:
        if not quiet:
            err.print(f"layer {r.layer}: val {r.val_acc:.2%} (C={r.c:.3g}) test {r.test_acc:.2%} "
                      f"[{r.seconds:.1f} s]", highlight=False)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # counted in the report instead (not_converged_fits)
        report = probe.probe_files(train, test, layer, test_fraction=test_fraction, seed=seed, jobs=jobs,
                                   on_layer=progress)
    probe.render_table(report, err)
    if csv_out:
        probe.write_csv(report, csv_out)
    if plot_out:
        probe.write_plot(report, plot_out)
    if as_json:
        print(probe.report_json(report))

# --- train / demo commands (issue 5) ---


@app.command("train")
@handles_input_errors
def train_cmd(
    train_tokens: Path = typer.Argument(..., help="Tokens file (igpt quantize) to pretrain on."),
    out: Path = typer.Option(..., "-o", "--out", help="Model directory to write (Hugging Face ImageGPT layout)."),
    val: Optional[Path] = typer.Option(None, "--val", help="Tokens file for validation loss (bits/dim)."),
    layers: int = typer.Option(8, "--layers", min=1, help="Transformer blocks."),
    width: int = typer.Option(256, "--width", min=8, help="Embedding width."),
    heads: int = typer.Option(8, "--heads", min=1, help="Attention heads."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Optimizer steps (or use --epochs)."),
    epochs: Optional[float] = typer.Option(None, "--epochs", min=0.0, help="Passes over the training tokens."),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    lr: float = typer.Option(3e-3, "--lr", help="Peak learning rate (linear warm-up, cosine decay)."),
    warmup: int = typer.Option(100, "--warmup", min=0, help="Warm-up steps."),
    no_flip: bool = typer.Option(False, "--no-flip", help="Disable random horizontal flips."),
    checkpoint_every: int = typer.Option(200, "--checkpoint-every", min=1),
    eval_every: int = typer.Option(200, "--eval-every", min=1),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda|mps"),
    dtype: str = typer.Option("auto", "--dtype", help="auto|float32|bfloat16|float16 (autocast)"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run saved in --out."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Pretrain an iGPT on palette tokens (next-token prediction with the SOS shift)."""
    from .train import TrainConfig, train

    if not resume and steps is None and epochs is None:
        raise InputError("give --steps or --epochs")
    cfg = TrainConfig(n_layer=layers, n_embd=width, n_head=heads, steps=steps, epochs=epochs,
                      batch_size=batch_size, lr=lr, warmup_steps=warmup, flip=not no_flip,
                      checkpoint_every=checkpoint_every, eval_every=eval_every, seed=seed)
    log = None if quiet else (lambda msg: err.print(msg, highlight=False))
    summary = train(train_tokens, out, cfg, val_tokens=val, device=device, dtype=dtype, resume=resume,
                    progress=not quiet, log=log)
    print(json.dumps(summary))


@app.command("demo")
@handles_input_errors
def demo_cmd(
    out: Optional[Path] = typer.Option(None, "--out", help="Keep every intermediate file in this directory."),
    model: Optional[Path] = typer.Option(None, "--model", help="Model directory (default: the shipped iGPT)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Where to write the probe curve PNG."),
    as_json: bool = typer.Option(False, "--json", help="Print the probe report as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Run quantize → extract → probe offline on the shipped CIFAR-10 subset and model."""
    from .demo import run_demo
    from .probe import render_table

    log = (lambda msg: None) if quiet else (lambda msg: err.print(msg, highlight=False))
    result = run_demo(out, model=model, plot=plot, progress=not quiet, log=log)
    rep, pix = result["model"], result["pixels"]
    if not quiet:
        render_table(rep, err)
        best = next(r for r in rep["layers"] if r["layer"] == rep["best_layer"])
        base = pix["layers"][0]["test_acc"]
        err.print(f"best layer {best['layer']}: test accuracy {best['test_acc']:.1%} vs raw pixels {base:.1%} "
                  f"({100 * (best['test_acc'] - base):+.1f} points) — {result['seconds']:.0f} s", highlight=False)
        if "plot" in result["files"]:
            err.print(f"curve: {result['files']['plot']}", highlight=False)
        if result["kept"]:
            err.print("\nThe same pipeline by hand:", highlight=False)
            for cmd in result["commands"]:
                err.print(f"  {cmd}", highlight=False, soft_wrap=True)
    if as_json:
        print(json.dumps({"model": rep, "pixels": pix, "files": result["files"], "seconds": result["seconds"]},
                         default=str))
