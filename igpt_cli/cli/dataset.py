"""`igpt quantize` and `igpt palette fit`: datasets in, tokens files and palettes out."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..choices import Resize, Split
from .options import (
    FormatOpt, ImageColumn, LabelColumn, LimitOpt, LimitPerClass, Json, MaxPixels, Overwrite, Quiet, ResizeOpt,
    Shuffle, SizeOpt, SkipBad, SplitOpt, out_option
)
from .ui import ProgressBar, handles_input_errors, maybe_bar, print_json


def sources_arg(src: list[str]) -> "str | list[str]":
    """One SRC as itself (its messages name it), several as a list read as one dataset."""
    return src[0] if len(src) == 1 else src


@handles_input_errors
def quantize_command(
    src: Annotated[list[str], typer.Argument(help=(
        "Image folder, .tar/.zip of one, CIFAR python archive/folder, .npz/.npy, image file(s), @list.txt, "
        "'glob/*.jpg', Hugging Face dataset (save_to_disk folder, Parquet), WebDataset shard(s) "
        "('shard-{000..009}.tar'), or OpenAI's pre-quantized cifar10_trX.npy."))],
    out: Annotated[Path, out_option("Tokens file to write (HDF5).")],
    split: SplitOpt = Split.all,
    size: Annotated[Optional[int], typer.Option("--size", help=(
        "Images are resized to size×size (default 32; pre-quantized tokens keep theirs)."))] = None,
    palette: Annotated[Optional[str], typer.Option("--palette", help=(
        "Palette: .npy, preprocessor_config.json, a model dir or a bundled model's name (igpt-cifar8) "
        "(default: the official iGPT 512-colour palette)."))] = None,
    limit: LimitOpt = None,
    limit_per_class: LimitPerClass = None,
    shuffle: Shuffle = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of --shuffle.")] = 0,
    resize: ResizeOpt = Resize.bilinear,
    fmt: FormatOpt = None,
    skip_bad: SkipBad = False,
    max_pixels: MaxPixels = None,
    image_column: ImageColumn = None,
    label_column: LabelColumn = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    as_json: Json = False,
) -> None:
    """Quantize a dataset to palette tokens (an igpt-tokens HDF5 file).

    Example: igpt quantize demo-cifar10.tar --split train --size 8 --limit-per-class 20 -o train.h5   # the demo's data (igpt demo prints its path)

    Example: igpt quantize demo-cifar10.tar --split test --size 8 --limit-per-class 10 -o test.h5
    """
    from ..quantize import quantize_dataset

    bar = ProgressBar.maybe(quiet)
    with maybe_bar(bar):
        result = quantize_dataset(sources_arg(src), out, split=split.value, size=size, palette=palette, limit=limit,
                                  limit_per_class=limit_per_class, shuffle=shuffle, seed=seed,
                                  resize=resize.value, fmt=fmt.value if fmt else None, skip_bad=skip_bad,
                                  max_pixels=max_pixels, image_column=image_column, label_column=label_column,
                                  overwrite=overwrite, on_progress=bar)
    print_json(result)


@handles_input_errors
def palette_fit_command(
    src: Annotated[list[str], typer.Argument(help="Any dataset `igpt quantize` reads (one or several paths).")],
    out: Annotated[Path, out_option("Palette .npy to write (float32 K×3 in [-1, 1]).")],
    k: Annotated[int, typer.Option("--colors", "-k", help="Number of colours.")] = 512,
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
    as_json: Json = False,
) -> None:
    """Fit a new palette with MiniBatchKMeans (for pretraining on your own domain).

    Example: igpt palette fit demo-cifar10.tar --colors 16 --limit 200 --sample-pixels 20000 -o palette.npy
    """
    from ..quantize import fit_palette_file

    bar = ProgressBar.maybe(quiet)
    with maybe_bar(bar):
        result = fit_palette_file(sources_arg(src), out, k=k, sample_pixels=sample_pixels, split=split.value, size=size,
                                  limit=limit, limit_per_class=limit_per_class, shuffle=shuffle,
                                  resize=resize.value, fmt=fmt.value if fmt else None, skip_bad=skip_bad,
                                  max_pixels=max_pixels, overwrite=overwrite, seed=seed, on_progress=bar)
    print_json(result)


def register(app: typer.Typer) -> None:
    """Add `quantize`, `fit` to the `igpt` app."""
    palette_app = typer.Typer(cls=app.info.cls, help="Colour palettes: fit a new one for your own domain.",
                              no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]})
    palette_app.command("fit")(palette_fit_command)
    app.add_typer(palette_app, name="palette")
    app.command("quantize")(quantize_command)
