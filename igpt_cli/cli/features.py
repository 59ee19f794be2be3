"""`igpt extract`: tokens in, per-layer features out."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..choices import ComputeDtype, Pool, Site, StoreDtype
from .options import Device, Dtype, LayerSpec, LimitOpt, Overwrite, Quiet, Restart
from .ui import ProgressBar, handles_input_errors, maybe_bar, print_json


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


def register(app: typer.Typer) -> None:
    """Add `extract` to the `igpt` app."""
    app.command("extract")(extract_command)
