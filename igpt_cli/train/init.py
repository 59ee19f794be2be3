"""`pretrain(init=MODEL)`: continue pretraining from a model igpt can open.

`MODEL` is anything `--model` takes (a directory, a bundled name such as `igpt-cifar8`, a
Hugging Face hub id, an OpenAI TensorFlow checkpoint prefix), resolved by
`model.resolve_model_dir` and loaded by `model.load_pretrained` (safetensors, or a pickle
read with `weights_only=True`: nothing in it is executed). The run takes the model's
architecture (every `IGPTConfig` field) and palette; it refuses, in one line each:

- a BERT-objective model (its weights were trained to fill masked tokens, not to predict
  the next one; continuing it autoregressively would be another model);
- `n_layer` / `n_embd` / `n_head` given with other values than the model's;
- tokens of another image size or another palette than the model's (quantize with
  `--palette MODEL`).

A model without an LM head (`ImageGPTModel`) starts with a fresh, seeded head.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError, ParameterError
from ..model import IGPTConfig, load_pretrained, resolve_model_dir
from ..palette import Palette, PaletteError
from .data import TokenData

ARCHITECTURE = ("n_layer", "n_embd", "n_head")


@dataclass
class InitModel:
    name: str  # as given (a bundled name, a hub id, a path)
    dir: Path  # the Hugging Face directory it resolved to
    config: IGPTConfig
    weights: dict[str, torch.Tensor]


def resolve_init(init) -> Path:
    """The directory `init` names (a hub id is downloaded and a TensorFlow prefix converted once)."""
    return resolve_model_dir(init, quiet=True)


def load_init(init, model_dir: Path, data: TokenData, given, *, param: str = "init",
              bert_refusal: str = "igpt train continues autoregressive (next-token) pretraining only") -> InitModel:
    """The model to start from, checked against the tokens and the settings the user gave
    (`param`: the parameter that names the model, in errors; `bert_refusal`: why a BERT model is refused)."""
    model_dir = Path(model_dir)
    model = load_pretrained(model_dir)
    cfg = model.config
    if not cfg.autoregressive:
        raise ParameterError(param, str(init), f"is a BERT-objective model; {bert_refusal}")
    named = given if isinstance(given, dict) else ({k: getattr(given, k) for k in ARCHITECTURE}
                                                   if given is not None else {})
    for k in ARCHITECTURE:
        if k in named and named[k] is not None and named[k] != getattr(cfg, k):
            raise ParameterError(k, named[k], f"conflicts with the model {init} ({k}={getattr(cfg, k)}); "
                                              "the architecture comes from the model: leave it out")
    if data.height * data.width != cfg.n_positions:
        side = cfg.side
        want = f"{side}x{side}" if side else f"{cfg.n_positions}-token"
        raise InputError(f"{data.path}: images are {data.height}x{data.width} but the model {init} takes {want} "
                         "images; quantize at its size")
    try:
        palette = Palette.load(model_dir).centers
    except PaletteError:
        palette = None  # the model names no palette: only its size can be checked
    same = palette is not None and palette.shape == data.palette.shape and \
        float(np.abs(palette - data.palette).max()) < 1e-3
    if not same and (palette is not None or len(data.palette) != cfg.vocab_size - 1):
        theirs = f"{len(palette)}" if palette is not None else f"{cfg.vocab_size - 1}"
        raise InputError(f"{data.path}: its palette ({len(data.palette)} colours) is not the model's ({theirs} "
                         f"colours of {init}); quantize with --palette {model_dir}")
    return InitModel(str(init), model_dir, cfg, model.state_dict())
