"""The generative commands: `igpt sample`, `igpt complete`, `igpt score`.

Each runs under torchrun / srun as it is (every rank computes its shard of the rows, rank 0
writes the one file and prints the JSON).

Thin typer commands over `igpt_cli.generate` with the conventions of `app.py`: options
named like the library's parameters (so a library error about `top_p=` is said as
`--top-p`), choices from `igpt_cli.choices`, one progress bar on stderr, JSON on stdout.
`register(app)` adds them to the `igpt` app.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..choices import ComputeDtype
from .options import Device, Dtype, Json, Overwrite, Quiet, Restart, Revision, out_option
from .ui import handles_input_errors, launched_run, print_json, print_table

BatchSize = Annotated[Optional[int], typer.Option("--batch-size", "-b",
                                                  help="Sequences per batch (default: chosen from memory).")]
Model = Annotated[str, typer.Option("--model", "-m", help=(
    "Autoregressive model with an LM head: a directory (ImageGPTForCausalImageModeling, igpt train output), a "
    "bundled name (igpt-cifar8), an OpenAI TF checkpoint prefix or a Hugging Face hub id."))]
Png = Annotated[Optional[Path], typer.Option("--png", metavar="<grid.png>", help="Also write a PNG figure.")]
Temperature = Annotated[float, typer.Option("--temperature", "-t", help="Softmax temperature; 0 = greedy (argmax).")]
TopK = Annotated[Optional[int], typer.Option("--top-k", help="Sample among the k most likely colours only.")]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus sampling: the smallest set of colours with this "
                                                     "much probability (1 = all).")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed: same seed, device and dtype → same images.")]
Limit = Annotated[Optional[int], typer.Option("--limit", help="Only the first N images of the tokens file.")]


def command_line() -> str:
    return shlex.join(["igpt", *sys.argv[1:]])


@handles_input_errors
def sample_command(
    n: Annotated[int, typer.Option("--n", "-n", help="Number of images to sample.")],
    out: Annotated[Path, out_option("Tokens file to write (HDF5).")],
    model_arg: Annotated[Optional[str], typer.Argument(metavar="model", hidden=True, show_default=False, help=(
        "The model, as -m/--model names it (kept for older scripts)."))] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", show_default=False, help=(
        "Autoregressive model with an LM head: a directory (ImageGPTForCausalImageModeling, igpt train output), a "
        "bundled name (igpt-cifar8), an OpenAI TF checkpoint prefix or a Hugging Face hub id."))] = None,
    revision: Revision = None,
    png: Png = None,
    temperature: Temperature = 1.0,
    top_k: TopK = None,
    top_p: TopP = 1.0,
    seed: Seed = 0,
    batch_size: BatchSize = None,
    device: Device = "auto",
    dtype: Dtype = ComputeDtype.auto,
    overwrite: Overwrite = False,
    restart: Restart = False,
    quiet: Quiet = False,
    as_json: Json = False,
) -> None:
    """Sample N images from an iGPT (resumable): a tokens file, optionally a PNG grid.

    Example: igpt sample -m igpt-cifar8 -n 16 -o samples.h5 --png samples.png --temperature 0.9
    """
    from ..errors import InputError
    from ..generate import sample_file

    if model is not None and model_arg is not None and model != model_arg:
        raise InputError(f"two models given ({model_arg} and --model {model}): give one, with -m/--model")
    model = model or model_arg
    if model is None:
        raise InputError("give the model to sample from with -m/--model (e.g. -m igpt-cifar8)")

    with launched_run(quiet) as (dist, bar):
        result = sample_file(model, n, out, png=png, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                             batch_size=batch_size, device=device, dtype=dtype.value, overwrite=overwrite,
                             restart=restart, command=command_line(), revision=revision, on_progress=bar, dist=dist)
    if dist.is_main:
        print_json(result)


@handles_input_errors
def complete_command(
    tokens: Annotated[Path, typer.Argument(help="Tokens file (igpt quantize output) whose images to complete.")],
    model: Model,
    out: Annotated[Path, out_option("Tokens file of the completions to write.")],
    revision: Revision = None,
    keep_rows: Annotated[Optional[int], typer.Option("--keep-rows", help="Pixel rows kept from the top "
                                                                          "(0..height).")] = None,
    keep_fraction: Annotated[Optional[float], typer.Option("--keep-fraction", help="Fraction of the rows kept "
                                                                                   "(default 0.5).")] = None,
    n: Annotated[int, typer.Option("--n", "-n", help="Completions per image.")] = 1,
    png: Png = None,
    png_images: Annotated[int, typer.Option("--png-images", help="Images (rows) in the PNG figure.")] = 8,
    limit: Limit = None,
    temperature: Temperature = 1.0,
    top_k: TopK = None,
    top_p: TopP = 1.0,
    seed: Seed = 0,
    batch_size: BatchSize = None,
    device: Device = "auto",
    dtype: Dtype = ComputeDtype.auto,
    overwrite: Overwrite = False,
    restart: Restart = False,
    quiet: Quiet = False,
    as_json: Json = False,
) -> None:
    """Keep the top rows of each image and let the model paint the rest, n times (resumable).

    The output is a tokens file (with source_index and sample_index per row, labels copied),
    so igpt show and igpt extract work on it; --png writes the completion figure: per image
    the kept part, the completions and the original.

    Example: igpt complete test.h5 -m igpt-cifar8 --keep-rows 4 -n 4 --limit 8 -o completions.h5 --png completions.png
    """
    from ..generate import complete_file

    with launched_run(quiet) as (dist, bar):
        result = complete_file(tokens, model, out, keep_rows=keep_rows, keep_fraction=keep_fraction, n=n, png=png,
                               png_images=png_images, limit=limit, temperature=temperature, top_k=top_k,
                               top_p=top_p, seed=seed, batch_size=batch_size, device=device, dtype=dtype.value,
                               overwrite=overwrite, restart=restart, command=command_line(), revision=revision,
                               on_progress=bar, dist=dist)
    if dist.is_main:
        print_json(result)


@handles_input_errors
def score_command(
    tokens: Annotated[Path, typer.Argument(help="Tokens file (igpt quantize output) to score.")],
    model: Model,
    revision: Revision = None,
    out: Annotated[Optional[Path], out_option("Scores file to write (per-image nats and bits per token; "
                                              "resumable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON document on stdout.")] = False,
    limit: Limit = None,
    batch_size: BatchSize = None,
    device: Device = "auto",
    dtype: Dtype = ComputeDtype.auto,
    overwrite: Overwrite = False,
    restart: Restart = False,
    quiet: Quiet = False,
) -> None:
    """Negative log-likelihood of each image under the model (the paper's generative loss).

    Mean cross-entropy per token with the SOS-shifted input, in nats and bits; the summary
    (mean, standard error, per class) goes to stderr, or to stdout as JSON with --json.

    Example: igpt score test.h5 -m igpt-cifar8 -o test-scores.h5 --json
    """
    from ..generate import score_file

    with launched_run(quiet) as (dist, bar):
        result = score_file(tokens, model, out, limit=limit, batch_size=batch_size, device=device,
                            dtype=dtype.value, overwrite=overwrite, restart=restart, revision=revision,
                            on_progress=bar, dist=dist)
    if not dist.is_main:
        return
    if not quiet:
        render_scores(result.to_dict())
    if as_json:
        print_json(result)


def render_scores(d: dict) -> None:
    from rich.table import Table

    def se(v):
        return f" ± {v:.4f}" if v is not None else ""

    t = Table(title=f"score · {Path(d['model']).name} on {Path(d['tokens_file']).name}", title_justify="left")
    for col in ("class", "images", "nats/token", "bits/token"):
        t.add_column(col, justify="left" if col == "class" else "right")
    for name, c in d["per_class"].items():
        t.add_row(name, str(c["n"]), f"{c['nats_per_token']:.4f}", f"{c['bits_per_token']:.4f}")
    t.add_row("all", str(d["n"]), f"{d['nats_per_token']:.4f}{se(d['nats_per_token_se'])}",
              f"{d['bits_per_token']:.4f}{se(d['bits_per_token_se'])}", style="bold")
    print_table(t)


def register(app: typer.Typer) -> None:
    """Add `sample`, `complete` and `score` to the `igpt` app (once: calling it again changes nothing)."""
    have = {c.name for c in app.registered_commands}
    for name, fn in (("sample", sample_command), ("complete", complete_command), ("score", score_command)):
        if name not in have:
            app.command(name)(fn)
