"""The `igpt` command: thin typer commands over the library's stages.

Conventions: results (JSON) go to stdout, progress, tables and logs to stderr; bad input
is one line on stderr and exit status 2, never a traceback. Command functions are named
`<command>_command` and use the library's parameter names, so a library error about
`batch_size=` is reported with the flag the user typed (`ui.say_with_flags`).
"""
from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from .. import __version__
from ..choices import ComputeDtype, Pool, Resize, Site, Split, StoreDtype
from ..errors import InputError
from .generation import register as register_generation_commands
from .options import (Device, Dtype, FormatOpt, LayerSpec, LimitOpt, LimitPerClass, MaxPixels, Overwrite, Quiet,
                      ResizeOpt, Restart, Shuffle, SizeOpt, SkipBad, SplitOpt)
from .ui import (ProgressBar, click_errors, err, get_current_context, handles_input_errors, maybe_bar, print_json,
                 probe_layer_line, raise_interrupted, raise_terminated, render_file_info, render_probe_table)


class OneLineErrors(TyperGroup):
    """Usage errors (unknown option, a value that is not one of the choices, …) as one line, exit 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as e:  # typer has printed the help already
            if e.format_message().strip():
                typer.echo(e.format_message(), err=True)
            raise SystemExit(2)
        except click_errors.UsageError as e:
            where = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
            err.print(f"[bold red]error:[/] {e.format_message().replace('Value error, ', '')}{where}", highlight=False, soft_wrap=True)
            raise SystemExit(2)
        except click_errors.ClickException as e:
            err.print(f"[bold red]error:[/] {e.format_message()}", highlight=False, soft_wrap=True)
            raise SystemExit(e.exit_code)
        except typer.Abort:
            err.print("aborted")
            raise SystemExit(1)
        raise SystemExit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name="igpt",
    cls=OneLineErrors,
    help="Image GPT as an unsupervised feature extractor: quantize → extract → probe; train and demo.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
palette_app = typer.Typer(cls=OneLineErrors, help="Colour palettes: fit a new one for your own domain.",
                          no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]})
app.add_typer(palette_app, name="palette")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"igpt {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """igpt — quantize images to palette tokens, extract iGPT features, probe them, train and demo."""


def main() -> None:
    """Console-script entry point (`igpt`): SIGTERM unwinds like Ctrl-C, so temp files are removed."""
    signal.signal(signal.SIGTERM, raise_terminated)
    signal.signal(signal.SIGINT, raise_interrupted)
    app(prog_name="igpt")


# --- quantize, palette, info, show ----------------------------------------------------------
@app.command("quantize")
@handles_input_errors
def quantize_command(
    src: Annotated[Path, typer.Argument(help="Image folder, .tar/.zip of one, CIFAR python archive/folder, .npz or .npy.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Tokens file to write (HDF5).")],
    split: SplitOpt = Split.all,
    size: SizeOpt = 32,
    palette: Annotated[Optional[str], typer.Option(
        help="Palette: .npy, preprocessor_config.json or a model dir (default: the official iGPT 512-colour palette).")] = None,
    limit: LimitOpt = None,
    limit_per_class: LimitPerClass = None,
    shuffle: Shuffle = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of --shuffle.")] = 0,
    resize: ResizeOpt = Resize.bilinear,
    fmt: FormatOpt = None,
    skip_bad: SkipBad = False,
    max_pixels: MaxPixels = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Quantize a dataset to palette tokens (an igpt-tokens HDF5 file).

    Example: igpt quantize cifar10-jpeg.tar --split train -o train.h5
    """
    from ..quantize import quantize_dataset

    bar = ProgressBar.maybe(quiet)
    with maybe_bar(bar):
        result = quantize_dataset(src, out, split=split.value, size=size, palette=palette, limit=limit,
                                  limit_per_class=limit_per_class, shuffle=shuffle, seed=seed,
                                  resize=resize.value, fmt=fmt.value if fmt else None, skip_bad=skip_bad,
                                  max_pixels=max_pixels, overwrite=overwrite, on_progress=bar)
    print_json(result)


@palette_app.command("fit")
@handles_input_errors
def palette_fit_command(
    src: Annotated[Path, typer.Argument(help="Any dataset `igpt quantize` reads.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Palette .npy to write (float32 K×3 in [-1, 1]).")],
    k: Annotated[int, typer.Option("-k", help="Number of colours.")] = 512,
    sample_pixels: Annotated[int, typer.Option("--sample-pixels", help="Pixels sampled for k-means.")] = 1_000_000,
    split: SplitOpt = Split.all,
    size: SizeOpt = 32,
    limit: LimitOpt = None,
    limit_per_class: LimitPerClass = None,
    shuffle: Shuffle = False,
    resize: ResizeOpt = Resize.bilinear,
    fmt: FormatOpt = None,
    skip_bad: SkipBad = False,
    max_pixels: MaxPixels = None,
    overwrite: Overwrite = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed for --shuffle, pixel sampling and k-means.")] = 0,
    quiet: Quiet = False,
) -> None:
    """Fit a new palette with MiniBatchKMeans (for pretraining on your own domain).

    Example: igpt palette fit my-photos/ -k 512 -o palette.npy
    """
    from ..quantize import fit_palette_file

    bar = ProgressBar.maybe(quiet)
    with maybe_bar(bar):
        result = fit_palette_file(src, out, k=k, sample_pixels=sample_pixels, split=split.value, size=size,
                                  limit=limit, limit_per_class=limit_per_class, shuffle=shuffle,
                                  resize=resize.value, fmt=fmt.value if fmt else None, skip_bad=skip_bad,
                                  max_pixels=max_pixels, overwrite=overwrite, seed=seed, on_progress=bar)
    print_json(result)


@app.command("info")
@handles_input_errors
def info_command(
    file: Annotated[Path, typer.Argument(help="Any igpt file (tokens or features).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    quiet: Quiet = False,
) -> None:
    """Summarize an igpt file: kind, shapes, classes and counts, attrs.

    Example: igpt info train.h5 --json
    """
    from ..fileinfo import file_info

    d = file_info(file).to_dict()
    if as_json:
        print_json(d)
    else:
        render_file_info(d)


@app.command("show")
@handles_input_errors
def show_command(
    tokens: Annotated[Path, typer.Argument(help="A tokens file.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Picture to write; its extension names the format (.png, .jpg, .webp, …).")],
    n: Annotated[int, typer.Option("--n", help="Number of images.")] = 64,
    scale: Annotated[int, typer.Option("--scale", help="Integer upscaling of the grid.")] = 2,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Decode tokens through their palette into a PNG grid.

    Example: igpt show train.h5 -o grid.png --n 64
    """
    from ..fileinfo import show_tokens

    print_json(show_tokens(tokens, out, n=n, scale=scale, overwrite=overwrite))


# --- extract ----------------------------------------------------------------------------------
@app.command("extract")
@handles_input_errors
def extract_command(
    tokens: Annotated[Path, typer.Argument(help="Tokens file (igpt quantize output).")],
    model: Annotated[str, typer.Option("--model", "-m", help="Hugging Face ImageGPT directory (or hub name in "
                                                             "the local cache), or 'pixels'.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Features file to write.")],
    layers: LayerSpec = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b",
                                                      help="Images per batch (default: auto).")] = None,
    device: Device = "auto",
    dtype: Dtype = ComputeDtype.auto,
    no_sos: Annotated[bool, typer.Option("--no-sos", help="Feed tokens unshifted (Hugging Face's behaviour).")] = False,
    site: Annotated[Site, typer.Option("--site", help="ln: mean of ln_1(h_l) (the paper's); resid: mean of h_l.")] = Site.ln,
    pool: Annotated[Pool, typer.Option("--pool", help="How token maps become one vector per image.")] = Pool.mean,
    limit: LimitOpt = None,
    store_dtype: Annotated[StoreDtype, typer.Option("--store-dtype", help="Feature dtype on disk.")] = StoreDtype.float32,
    overwrite: Overwrite = False,
    restart: Restart = False,
    quiet: Quiet = False,
) -> None:
    """Run a pretrained iGPT over a tokens file; write per-layer averaged features (resumable).

    Under torchrun (or srun with RANK/WORLD_SIZE/LOCAL_RANK set) every process takes a
    shard of the rows; see 'Running on a cluster' in the README.

    Example: igpt extract train.h5 -m imagegpt-small/ --layer 8-16 -o train-feats.h5
    """
    from ..extract import DistContext, extract_features

    dist = DistContext.from_env()
    bar = ProgressBar.maybe(quiet or not dist.is_main)
    try:
        with maybe_bar(bar):
            result = extract_features(tokens, model, layers or None, out, batch_size=batch_size, device=device,
                                      dtype=dtype.value, sos=not no_sos, site=site.value, pool=pool.value,
                                      limit=limit, store_dtype=store_dtype.value, overwrite=overwrite,
                                      restart=restart, on_progress=bar, dist=dist)
    finally:
        dist.close()
    if dist.is_main:
        print_json(result)


# --- probe --------------------------------------------------------------------------------------
@app.command("probe")
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


# --- sample, complete, score: cli/generation.py ---------------------------------------------------
register_generation_commands(app)


# --- train, demo ----------------------------------------------------------------------------------
@app.command("train")
@handles_input_errors
def train_command(
    train_tokens: Annotated[Path, typer.Argument(help="Tokens file (igpt quantize) to pretrain on.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Model directory to write (Hugging Face ImageGPT layout).")],
    val_tokens: Annotated[Optional[Path], typer.Option("--val", help="Tokens file for validation loss (bits/dim).")] = None,
    n_layer: Annotated[int, typer.Option("--depth", min=1, help="Transformer blocks.")] = 8,
    n_embd: Annotated[int, typer.Option("--width", min=8, help="Embedding width.")] = 256,
    n_head: Annotated[int, typer.Option("--heads", min=1, help="Attention heads.")] = 8,
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, help="Optimizer steps (or use --epochs).")] = None,
    epochs: Annotated[Optional[float], typer.Option("--epochs", min=0.0, help="Passes over the training tokens.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per step.")] = 64,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (linear warm-up, cosine decay).")] = 3e-3,
    warmup_steps: Annotated[int, typer.Option("--warmup", min=0, help="Warm-up steps.")] = 100,
    no_flip: Annotated[bool, typer.Option("--no-flip", help="Disable random horizontal flips.")] = False,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", min=1, help="Steps between checkpoints.")] = 200,
    eval_every: Annotated[int, typer.Option("--eval-every", min=1, help="Steps between validation losses.")] = 200,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the initialisation, data order and flips.")] = 0,
    device: Device = "auto",
    dtype: Annotated[ComputeDtype, typer.Option("--dtype", help="Autocast dtype (auto: bfloat16 where fast).")] = ComputeDtype.auto,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run saved in --out.")] = False,
    quiet: Quiet = False,
) -> None:
    """Pretrain an iGPT on palette tokens (next-token prediction with the SOS shift).

    Example: igpt train train.h5 --val test.h5 -o my-igpt --depth 8 --width 192 --heads 6 --steps 2400
    """
    from ..train import pretrain

    if not resume and steps is None and epochs is None:
        raise InputError("give --steps or --epochs")
    settings = dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, steps=steps, epochs=epochs,
                    batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, flip=not no_flip,
                    checkpoint_every=checkpoint_every, eval_every=eval_every, seed=seed)
    # Only the flags the user typed: a new run takes the defaults for the rest; a resumed run
    # compares them with its own settings, and continues with its own when none is given.
    ctx = get_current_context()
    param = {"flip": "no_flip"}
    cfg = {k: v for k, v in settings.items()
           if getattr(ctx.get_parameter_source(param.get(k, k)), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")}
    bar = ProgressBar.maybe(quiet)
    with maybe_bar(bar):
        result = pretrain(train_tokens, out, cfg, val_tokens=val_tokens, device=device, dtype=dtype.value,
                          resume=resume, on_progress=bar)
    print_json(result)


@app.command("demo")
@handles_input_errors
def demo_command(
    out: Annotated[Optional[Path], typer.Option("--out", help="Keep every intermediate file in this directory.")] = None,
    model: Annotated[Optional[Path], typer.Option("--model", help="Model directory (default: the shipped iGPT).")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help=(
        "Where to write the probe curve PNG (default: OUT/probe.png, or ./igpt-demo.png without --out)."))] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the probe reports as JSON on stdout.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the files of an earlier demo.")] = False,
    quiet: Quiet = False,
) -> None:
    """Run quantize → extract → probe offline on the shipped CIFAR-10 subset and model.

    Without --out only the probe curve (./igpt-demo.png) and a completion figure
    (./igpt-demo-completions.png) are kept.

    Example: igpt demo --out demo-out
    """
    from .. import outputs
    from ..demo import run_demo
    from .plots import check_plot_path, write_probe_plot

    plot_path = plot or (out / "probe.png" if out else Path("igpt-demo.png"))
    completions = None if out else Path("igpt-demo-completions.png")
    if out is not None:
        if out.exists() and not out.is_dir():
            raise InputError(f"{out}: exists and is not a directory")
        if not overwrite and out.is_dir() and any(out.iterdir()):
            raise InputError(f"{out}: holds files already (pass overwrite=True to replace the demo's files)")
        out.mkdir(parents=True, exist_ok=True)
    check_plot_path(plot_path, overwrite)
    if completions is not None:
        outputs.check_output_path(completions, overwrite)
    bar = ProgressBar.maybe(quiet)
    with maybe_bar(bar):
        result = run_demo(out, model=model, completions=completions, on_progress=bar)
    rep, pix = result.model.to_dict(), result.pixels.to_dict()
    files = dict(result.files, plot=str(write_probe_plot(rep, plot_path)))
    if not quiet:
        render_probe_table(rep)
        best = next(r for r in rep["layers"] if r["layer"] == rep["best_layer"])
        base = pix["layers"][0]["test_acc"]
        err.print(f"best layer {best['layer']}: test accuracy {best['test_acc']:.1%} vs raw pixels {base:.1%} "
                  f"({100 * (best['test_acc'] - base):+.1f} points) — {result.seconds:.0f} s", highlight=False)
        err.print(f"curve: {files['plot']}", highlight=False)
        if result.kept:
            err.print("\nThe same pipeline by hand:", highlight=False)
            for cmd in result.commands:
                err.print(f"  {cmd}", highlight=False, soft_wrap=True)
    if as_json:
        print_json({"model": rep, "pixels": pix, "files": files, "seconds": result.seconds})
