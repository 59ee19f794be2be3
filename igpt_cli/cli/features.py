"""`igpt extract` (tokens in, per-layer features out), `igpt features` (images in, features out)
and `igpt models` (the models igpt can name)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..choices import ComputeDtype, Pool, Resize, Site, Split, StoreDtype
from .options import (Compile, Device, Dtype, FormatOpt, ImageColumn, LabelColumn, LayerSpec, LimitOpt, LimitPerClass, MaxPixels,
                      Json, ModelOpt, Overwrite, Quiet, Restart, Revision, Shuffle, SkipBad, SplitOpt, out_option)
from .ui import err, handles_input_errors, launched_run, print_json, render_models

BatchSize = Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Images per batch (default: auto).")]
NoSos = Annotated[bool, typer.Option("--no-sos", help="Feed tokens unshifted (Hugging Face's behaviour).")]
SiteOpt = Annotated[Site, typer.Option("--site", help="ln: mean of ln_1(h_l) (the paper's); resid: mean of h_l.")]
PoolOpt = Annotated[Pool, typer.Option("--pool", help=(
    "How token maps become one vector per image: mean (the paper's) or max over positions; none writes the "
    "token maps themselves ([N, T, D] per layer, T times the disk of a pooled file: the size is checked first)."))]
StoreDtypeOpt = Annotated[Optional[StoreDtype], typer.Option("--store-dtype", help=(
    "Feature dtype on disk (default: float32; float16 with --pool none)."))]


@handles_input_errors
def extract_command(
    tokens: Annotated[Path, typer.Argument(help="Tokens file (igpt quantize output).")],
    model: ModelOpt,
    out: Annotated[Path, out_option("Features file to write.")],
    layers: LayerSpec = None,
    revision: Revision = None,
    batch_size: BatchSize = None,
    device: Device = "auto",
    dtype: Dtype = ComputeDtype.auto,
    compile: Compile = False,
    no_sos: NoSos = False,
    site: SiteOpt = Site.ln,
    pool: PoolOpt = Pool.mean,
    limit: LimitOpt = None,
    store_dtype: StoreDtypeOpt = None,
    overwrite: Overwrite = False,
    restart: Restart = False,
    quiet: Quiet = False,
    as_json: Json = False,
) -> None:
    """Run a pretrained iGPT over a tokens file; write per-layer pooled features or token maps (resumable).

    Under torchrun (or srun with RANK/WORLD_SIZE/LOCAL_RANK set) every process takes a
    shard of the rows; see docs/guides/clusters.md.

    Example: igpt extract train.h5 -m igpt-cifar8 --layer 4-6 -o train-feats.h5

    Example: igpt extract test.h5 -m igpt-cifar8 --layer 4-6 -o test-feats.h5
    """
    from ..extract import extract_features

    with launched_run(quiet) as (dist, bar):
        result = extract_features(tokens, model, layers or None, out, batch_size=batch_size, device=device,
                                  dtype=dtype.value, sos=not no_sos, site=site.value, pool=pool.value,
                                  limit=limit, store_dtype=store_dtype.value if store_dtype else None, overwrite=overwrite,
                                  restart=restart, on_progress=bar, dist=dist, revision=revision,
                                  compile=compile)
    if dist.is_main:
        print_json(result)


@handles_input_errors
def features_command(
    src: Annotated[list[str], typer.Argument(help=(
        "Images: a folder, .tar/.zip, image file(s), @list.txt, a glob, a Hugging Face dataset, WebDataset "
        "shards, CIFAR, .npz/.npy."))],
    model: ModelOpt,
    out: Annotated[Path, out_option("Features file to write.")],
    layers: LayerSpec = None,
    revision: Revision = None,
    size: Annotated[Optional[int], typer.Option("--size", help="Image side (default: the model's).")] = None,
    palette: Annotated[Optional[str], typer.Option("--palette", help=(
        "Palette .npy, preprocessor_config.json, model dir or bundled model name (default: the model's).")) ] = None,
    resize: Annotated[Optional[Resize], typer.Option("--resize", help="bilinear (default, like Hugging Face) or "
                                                                      "center-crop.")] = None,
    keep_tokens: Annotated[Optional[Path], typer.Option("--keep-tokens", help=(
        "Also write the tokens file (as igpt quantize would) here.")) ] = None,
    split: SplitOpt = Split.all,
    limit: LimitOpt = None,
    limit_per_class: LimitPerClass = None,
    shuffle: Shuffle = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of --shuffle.")] = 0,
    fmt: FormatOpt = None,
    image_column: ImageColumn = None,
    label_column: LabelColumn = None,
    skip_bad: SkipBad = False,
    max_pixels: MaxPixels = None,
    batch_size: BatchSize = None,
    device: Device = "auto",
    dtype: Dtype = ComputeDtype.auto,
    compile: Compile = False,
    no_sos: NoSos = False,
    site: SiteOpt = Site.ln,
    pool: PoolOpt = Pool.mean,
    store_dtype: StoreDtypeOpt = None,
    overwrite: Overwrite = False,
    restart: Restart = False,
    quiet: Quiet = False,
    as_json: Json = False,
) -> None:
    """Images straight to features: quantize with the model's palette and size, then extract (resumable).

    Under torchrun (or srun) every process reads the images and computes its shard of them.

    Example: igpt features photos/ -m igpt-cifar8 --layer 4 -o feats.h5
    """
    from ..extract import extract_image_features

    with launched_run(quiet) as (dist, bar):
        result = extract_image_features(
            src if len(src) > 1 else src[0], model, layers or None, out, revision=revision, size=size,
            palette=palette, resize=resize.value if resize else None, keep_tokens=keep_tokens, split=split.value,
            limit=limit, limit_per_class=limit_per_class, shuffle=shuffle, seed=seed,
            fmt=fmt.value if fmt else None, image_column=image_column, label_column=label_column,
            skip_bad=skip_bad, max_pixels=max_pixels, batch_size=batch_size, device=device, dtype=dtype.value,
            compile=compile, sos=not no_sos, site=site.value, pool=pool.value, store_dtype=store_dtype.value if store_dtype else None,
            overwrite=overwrite, restart=restart, on_progress=bar, dist=dist)
    if dist.is_main:
        print_json(result)


@handles_input_errors
def models_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print the list as one JSON document on stdout.")] = False,
    quiet: Quiet = False,
) -> None:
    """List the bundled models and the ImageGPT models in the Hugging Face cache, with their shapes.

    Example: igpt models --json
    """
    from rich.markup import escape

    from ..model import list_models

    rows = list_models(on_warning=lambda message: err.print(f"[yellow]warning:[/] {escape(message)}",
                                                            highlight=False, soft_wrap=True))
    if as_json:
        print_json({"models": rows})
    elif not quiet:
        render_models(rows)


def register(app: typer.Typer) -> None:
    """Add `extract`, `features`, `models` to the `igpt` app."""
    app.command("extract")(extract_command)
    app.command("features")(features_command)
    app.command("models")(models_command)
