"""Options shared by several commands (one definition each, so every command says the same)."""
from __future__ import annotations

import re
from typing import Annotated, Optional

import typer

from ..choices import ComputeDtype, DatasetFormat, KnnVote, ProbeMethod, Resize, Split

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help=(
    "Nothing on stderr but errors and warnings (no progress bar, progress lines or tables)."))]
Json = Annotated[bool, typer.Option("--json", help=(
    "Print the result as one JSON document on stdout (commands that write a file print it always)."))]


def out_option(help: str, metavar: str | None = None):
    """The `-o/--out` option of a command that writes a file or directory (one spelling everywhere)."""
    return typer.Option("--out", "-o", help=help, metavar=metavar)


Compile = Annotated[bool, typer.Option("--compile", help=(
    "Run the model through torch.compile: faster on long runs, the first batch compiles (tens of seconds "
    "on a CPU); eager where compilation is unavailable."))]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")]
LAYERS_METAVAR = "<layers>"
LayerSpec = Annotated[Optional[list[str]], typer.Option(
    "--layer", "-l", metavar=LAYERS_METAVAR, help="Layer(s): 12, 8-16, -1, 0,4,8 or all (repeatable). Default: all.")]

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")


def parse_device(value) -> str:
    """`--device`: auto, cpu, cuda, cuda:N or mps, checked by the argument parser (one list everywhere)."""
    v = str(value)
    if v in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", v):
        return v
    raise typer.BadParameter(f"{v!r} is not one of {', '.join(DEVICE_CHOICES)}")


Device = Annotated[str, typer.Option("--device", parser=parse_device, metavar="<auto|cpu|cuda|cuda:N|mps>",
                                     help="Where to compute (auto: cuda, then mps, then cpu).")]
SplitOpt = Annotated[Split, typer.Option("--split", help="Which split to read.")]
SizeOpt = Annotated[int, typer.Option("--size", help="Images are resized to size×size.")]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", help="At most N images.")]
ResizeOpt = Annotated[Resize, typer.Option("--resize", help="bilinear: whole image (like Hugging Face); "
                                                            "center-crop: central square first (the paper's ImageNet protocol).")]
FormatOpt = Annotated[Optional[DatasetFormat], typer.Option("--format", help="Override format detection.")]
SkipBad = Annotated[bool, typer.Option("--skip-bad", help="Skip unreadable images and count them.")]
LimitPerClass = Annotated[Optional[int], typer.Option("--limit-per-class", help="At most N images of each class.")]
Shuffle = Annotated[bool, typer.Option("--shuffle", help="Take --limit/--limit-per-class images in a seeded random "
                                                         "order instead of the sorted one.")]
MaxPixels = Annotated[Optional[int], typer.Option("--max-pixels", help=(
    "Refuse (or with --skip-bad skip) images larger than this many pixels, before decoding them "
    "(default: 89,478,485, PIL's decompression-bomb limit)."))]
Restart = Annotated[bool, typer.Option("--restart", help="Discard a partial run instead of resuming it.")]
Dtype = Annotated[ComputeDtype, typer.Option("--dtype", help="Compute dtype (auto: bfloat16 where fast).")]
ImageColumn = Annotated[Optional[str], typer.Option("--image-column", help=(
    "Column holding the images (Hugging Face datasets) or their extension (WebDataset: jpg, png…). Default: detect."))]
LabelColumn = Annotated[Optional[str], typer.Option("--label-column", help=(
    "Column holding the labels (Hugging Face datasets) or the label sidecar (WebDataset: cls, json field, txt). "
    "Default: detect."))]
Revision = Annotated[Optional[str], typer.Option("--revision", help="Hub revision of --model: branch, tag or commit hash.")]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help=(
    "Model: a directory, a bundled name (igpt-cifar8), an OpenAI TF checkpoint prefix or a Hugging Face hub "
    "id (openai/imagegpt-small)."))]

# the probe's evaluation method (`igpt probe`, and `igpt sweep` for each checkpoint)
Method = Annotated[ProbeMethod, typer.Option("--method", help=(
    "linear: the logistic-regression probe (C searched); knn: k-nearest neighbours on cosine similarity "
    "(DINO's evaluation; no training)."))]
K = Annotated[int, typer.Option("--k", help="--method knn: neighbours per vote.")]
KnnVoteOpt = Annotated[KnnVote, typer.Option("--knn-vote", help=(
    "--method knn: weighted (each neighbour counts exp(similarity / T), DINO) or majority."))]
KnnTemperature = Annotated[float, typer.Option("--knn-temperature", metavar="<t>", help=(
    "--method knn --knn-vote weighted: the temperature T."))]
