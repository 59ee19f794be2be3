"""What the training loop optimises: the module it builds, a step's batch, the loss, the files a
checkpoint writes. `NextToken` (next-token pretraining, `pretrain`) is the default; fine-tuning
with a classification head (`igpt_cli.finetune`) is another objective run by the same loop, so
both share the step, gradient accumulation, data parallelism, checkpoints and resume.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..model import IGPT, IGPTConfig, save_pretrained
from .config import TrainConfig
from .data import TokenData, make_batch
from .state import write_text
from .step import loss_on


class NextToken:
    """Next-token pretraining of an `IGPT` (the mean cross-entropy of `loss_on`)."""

    settings: dict = {}  # recorded in the run state; a resumed run must have the same ("" for pretraining)
    metrics: tuple[str, ...] = ()  # extra per-step numbers the loss reports (logged next to `loss`)
    files: tuple[str, ...] = ()  # files it writes into OUT besides the run's own (a restart removes them too)
    init_param = "init"  # the parameter naming the starting model, in errors
    files: tuple[str, ...] = ()  # files the objective writes into the run directory besides a checkpoint's
    bert_refusal = "igpt train continues autoregressive (next-token) pretraining only"

    def build(self, model_config: IGPTConfig) -> torch.nn.Module:
        return IGPT(model_config)

    def backbone(self, model: torch.nn.Module) -> IGPT:
        """The IGPT inside the trained module (where `init` weights go)."""
        return model

    def check_data(self, data: TokenData) -> None:
        """InputError when the training tokens cannot serve this objective."""

    def batch(self, data: TokenData, step: int, cfg: TrainConfig, part: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        return (make_batch(data, step, cfg, part),)

    def loss(self, runner, batch: tuple[torch.Tensor, ...], sos: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the loss to minimise, the `metrics` as one detached tensor [len(metrics)] or None)."""
        return loss_on(runner, batch[0], sos), None

    def save(self, model: torch.nn.Module, out: Path, data: TokenData) -> None:
        """The model files of a checkpoint (a Hugging Face directory)."""
        save_pretrained(model, out)
        write_preprocessor_config(out, data.palette, data.height, data.width)

    def done(self, model: torch.nn.Module, out: Path, dist, *, trained: bool = True) -> None:
        """Called on every rank with the trained module when the loop has finished, while the run
        directory is still locked (a fine-tuning run evaluates its test set and writes its report).
        `trained` is False for a rerun of a run that had finished already: nothing may be rewritten."""


def write_preprocessor_config(model_dir: Path, palette: np.ndarray, height: int, width: int) -> None:
    cfg = {
        "image_processor_type": "ImageGPTImageProcessor",
        "clusters": np.asarray(palette, dtype=np.float32).tolist(),
        "do_color_quantize": True,
        "do_normalize": True,
        "do_resize": True,
        "resample": 2,
        "size": {"height": height, "width": width},
    }
    write_text(Path(model_dir) / "preprocessor_config.json", json.dumps(cfg) + "\n")
