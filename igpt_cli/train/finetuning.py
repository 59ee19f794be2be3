"""`finetune`: the paper's fine-tuning evaluation — the whole model with a linear head on the
average-pooled final representation, on the joint objective
`L = L_clf + gen_weight * L_gen` (classification cross-entropy plus the next-token loss of
`igpt score`; `gen_weight=0`: classification only, the next-token head frozen).

It is the trainer's loop with another objective (`FinetuneObjective`): the same step,
gradient accumulation, data parallelism under torchrun, checkpoints and resume,
`metrics.jsonl` (with `cls_loss`, `gen_loss` and `train_acc`), bf16 autocast on a GPU.
The model is read like `train --init` reads it (a directory, a bundled name, a hub id, a
TensorFlow prefix); a BERT-objective model is refused (its generative term would be the
masked-token loss, and its input is not SOS-shifted: not implemented).

The classifier reads the SOS-shifted tokens `[SOS, t_0 … t_{n-2}]`, the input of the
original iGPT (and of `igpt extract`), so one forward pass gives both terms. The output
directory is a Hugging Face `ImageGPTForImageClassification` (`model/classifier.py`):
`transformers` loads it with its `id2label` and, fed the same input ids, gives our logits.
At the end the test file is classified and `OUT/report.json` written: the probe reports'
schema (`method="finetune"`, `pool="mean"`, `layer` = the last, the test accuracy with its
Wilson interval, n_train/n_val/n_test, per-class accuracy, confusion; its one row carries the
keys every evaluation's row shares, `probe.protocol.result_row`).

`predict_finetuned` (in `classify`, re-exported here) applies a fine-tuned directory to tokens or images.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import __version__
from ..distributed import DistContext
from ..errors import InputError, ParameterError
from ..jsonfile import read_json
from ..model import IGPTConfig, sos_shift
from ..model.classifier import IGPTClassifier, save_classifier
from ..outputs import check_distinct
from ..progress import OnProgress
from ..results import Result
from .classify import (EVAL_BATCH, Predictions, check_tokens_fit, class_logits, classify,  # noqa: F401
                       load_finetuned, predict_finetuned, predict_finetuned_file)
from .config import TrainConfig
from .data import TokenData, batch_labels, check_val, load_tokens, make_batch
from .loop import pretrain, write_preprocessor_config
from .objective import NextToken
from .state import TRAIN_META, write_errors, write_text
from .watch import DrawLoss

__all__ = ["finetune", "FinetuneObjective", "FinetuneReport", "make_report", "REPORT_FILE",
           # applying a fine-tuned model (module `classify`), re-exported where it was first documented
           "EVAL_BATCH", "Predictions", "check_tokens_fit", "class_logits", "classify", "load_finetuned",
           "predict_finetuned", "predict_finetuned_file"]

REPORT_FILE = "report.json"


def class_names_of(data: TokenData) -> list[str]:
    """The class names of a labelled tokens file (its own, else the label numbers)."""
    if data.class_names:
        return list(data.class_names)
    return [str(i) for i in range(int(np.max(data.labels)) + 1)]


def check_labelled(data: TokenData, n_classes: int | None, what: str) -> None:
    """InputError naming the file: no labels (none stored, or every one -1), images without a
    label (-1), or labels outside 0..n_classes-1."""
    y = np.asarray(data.labels) if data.labels is not None else None
    if y is None or (len(y) and (y < 0).all()):  # -1: no label (sampled images, unlabelled datasets)
        raise InputError(f"{data.path}: has no labels; fine-tuning needs labelled {what} tokens "
                         "(quantize a labelled dataset)")
    if (y < 0).any():
        raise InputError(f"{data.path}: {int((y < 0).sum()):,} of {len(y):,} images have no label (-1); "
                         f"fine-tuning needs a label for every {what} image")
    n = n_classes if n_classes is not None else len(class_names_of(data))
    bad = (y < 0) | (y >= n)
    if bad.any():
        raise InputError(f"{data.path}: label {int(y[bad][0])} is out of range: the classes are 0..{n - 1} "
                         f"({n} class names)")


class FinetuneObjective(NextToken):
    """Classification cross-entropy of `IGPTClassifier` plus `gen_weight` times the next-token loss."""

    init_param = "model"
    files = (REPORT_FILE,)
    bert_refusal = "igpt finetune fine-tunes autoregressive models only (for a BERT model the generative " \
                   "term would be the masked-token loss)"

    def __init__(self, gen_weight: float, test_tokens: str | Path, model: str | Path, train_tokens: str | Path):
        self.gen_weight = float(gen_weight)
        self.test_path = test_tokens
        self.model_name, self.train_path = str(model), str(train_tokens)
        self.class_names: list[str] = []
        self.test: TokenData | None = None
        self.n_train = 0
        self.report: FinetuneReport | None = None
        self.metrics = ("cls_loss", "gen_loss", "train_acc") if self.gen_weight > 0 else ("cls_loss", "train_acc")

    @property
    def settings(self) -> dict:
        return {"objective": "finetune", "gen_weight": self.gen_weight,
                **({"class_names": self.class_names} if self.class_names else {})}

    def check_data(self, data: TokenData) -> None:
        check_labelled(data, None, "training")
        self.class_names = class_names_of(data)
        self.n_train = len(data.tokens)
        test = load_tokens(self.test_path)
        check_val(test, data)
        if test.class_names and data.class_names and list(test.class_names) != list(data.class_names):
            raise InputError(f"{test.path}: its classes ({', '.join(test.class_names)}) are not the training "
                             f"file's ({', '.join(data.class_names)}); labels would mean other classes")
        check_labelled(test, len(self.class_names), "test")
        self.test = test

    def build(self, model_config: IGPTConfig) -> torch.nn.Module:
        model = IGPTClassifier(model_config, len(self.class_names))
        if self.gen_weight == 0:  # unused: frozen, so neither the optimizer nor DDP waits for its gradient
            model.transformer.lm_head.requires_grad_(False)
        return model

    def backbone(self, model):
        return model.transformer

    def batch(self, data, step, cfg, part):
        return make_batch(data, step, cfg, part), batch_labels(data, step, cfg, part)

    def loss(self, runner, batch, sos):
        x, y = batch
        logits, gen = runner(sos_shift(x, sos), generative=self.gen_weight > 0)
        logits = logits.float()
        cls = F.cross_entropy(logits, y)
        acc = (logits.argmax(-1) == y).float().mean()
        if gen is None:
            return cls, torch.stack([cls.detach(), acc])
        g = F.cross_entropy(gen.float().reshape(-1, gen.shape[-1]), x.reshape(-1))
        return cls + self.gen_weight * g, torch.stack([cls.detach(), g.detach(), acc])

    def save(self, model, out, data):
        save_classifier(model, out, self.class_names)
        write_preprocessor_config(out, data.palette, data.height, data.width)

    def done(self, model, out, dist, *, trained=True):
        if not trained:   # a rerun of a finished run: its saved report, nothing rewritten
            saved = dist.broadcast(self.saved_report(out) if dist.is_main else None)
            if saved is not None:
                self.report = saved
                return
        t0 = time.perf_counter()
        test = self.test
        mine = np.arange(dist.rank, len(test.tokens), dist.world_size)
        dev = next(model.parameters()).device
        pred = classify(model, test.tokens[mine], dev)
        parts = dist.gather((mine, pred))
        report = None
        if dist.is_main:
            y_pred = np.empty(len(test.tokens), dtype=np.int64)
            for rows, p in parts:
                y_pred[rows] = p
            meta = json.loads((out / TRAIN_META).read_text())  # the final checkpoint's (written before this)
            cfg = meta.get("config", {})
            last = meta["history"][-1] if meta.get("history") else {}
            protocol = {"objective": "classification cross-entropy + gen_weight * next-token cross-entropy",
                        "gen_weight": self.gen_weight, "head": "linear, no bias, on the mean over positions of ln_f",
                        **{k: cfg.get(k) for k in ("steps", "epochs", "batch_size", "lr", "warmup_steps",
                                                   "weight_decay", "flip", "seed")}}
            training = {"steps": meta.get("step"), "world_size": meta.get("world_size"),
                        **{k: v for k, v in last.items() if k != "step"}}
            report = make_report(np.asarray(test.labels, dtype=np.int64), y_pred, self.class_names,
                                 n_layer=model.config.n_layer, dim=model.config.n_embd,
                                 seconds=time.perf_counter() - t0, train=self.train_path, test=str(test.path),
                                 seed=cfg.get("seed", 0), model=self.model_name,
                                 model_config=asdict(model.config), model_dir=str(out),
                                 compute_dtype=meta.get("compute_dtype", ""), protocol=protocol, training=training,
                                 n_train=self.n_train)
            with write_errors(out / REPORT_FILE, "writing the report"):
                write_text(out / REPORT_FILE, report.to_json(indent=2) + "\n")
        self.report = dist.broadcast(report)

    @staticmethod
    def saved_report(out: Path) -> "FinetuneReport | None":
        """The report a finished run wrote (OUT/report.json), or None when it is missing or not one."""
        from dataclasses import fields

        try:
            d = read_json(out / REPORT_FILE, "fine-tuning report")
            return FinetuneReport(**{f.name: d[f.name] for f in fields(FinetuneReport)})
        except (OSError, ValueError, KeyError, TypeError):
            return None


# ---------------------------------------------------------------------------
# the report: the probe reports' schema
# ---------------------------------------------------------------------------
@dataclass
class FinetuneReport(Result):
    """A fine-tuning run's test accuracy in the probe reports' schema (one entry in `layers`)."""
    method: str
    igpt_version: str
    train: str
    test: str
    test_mode: str
    seed: int
    model: str
    model_config: dict
    model_dir: str
    site: str
    pool: str
    sos: bool
    compute_dtype: str
    class_names: list[str]
    protocol: dict
    best_layer: int
    best_test_layer: int
    seconds: float
    layers: list[dict]
    training: dict


def make_report(y_test: np.ndarray, y_pred: np.ndarray, class_names: list[str], *, n_layer: int, dim: int,
                seconds: float, **context) -> FinetuneReport:
    from ..probe.protocol import result_row, wilson_interval  # the probe reports' (imported here: scikit-learn)

    correct = y_pred == y_test
    per_class = {name: (float(correct[y_test == c].mean()) if (y_test == c).any() else None)
                 for c, name in enumerate(class_names)}
    n = len(class_names)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (y_test, y_pred), 1)
    layer = {"layer": n_layer, "c": None, "val_acc": None,
             "test_acc": float(correct.mean()) if len(correct) else math.nan,
             "per_class_acc": per_class, "n_train": context.get("n_train"), "n_val": 0, "n_test": int(len(y_test)),
             "dim": dim, "seconds": round(seconds, 3), "test_acc_ci": wilson_interval(int(correct.sum()), len(correct)),
             "ci_method": "wilson", "confusion": confusion.tolist()}
    layer.update(result_row(method="finetune", layers=[n_layer], pool="mean", c=None, k=None,
                            n_train=layer["n_train"], n_val=0, n_test=len(y_test), accuracy=layer["test_acc"],
                            accuracy_interval=layer["test_acc_ci"]))
    return FinetuneReport(
        method="finetune", igpt_version=__version__, train=context.get("train", ""), test=context.get("test", ""),
        test_mode="file", seed=context.get("seed", 0), model=context.get("model", ""),
        model_config=context.get("model_config", {}), model_dir=context.get("model_dir", ""), site="ln",
        pool="mean", sos=True, compute_dtype=context.get("compute_dtype", ""), class_names=list(class_names),
        protocol=context.get("protocol", {}), best_layer=n_layer, best_test_layer=n_layer,
        seconds=round(seconds, 3), layers=[layer], training=context.get("training", {}))


# ---------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------
def finetune(
    train_tokens: str | Path,
    model: str | Path,
    test_tokens: str | Path,
    out_dir: str | Path,
    cfg: TrainConfig | dict | None = None,
    *,
    gen_weight: float = 1.0,
    device: str = "auto",
    dtype: str = "auto",
    resume: bool = False,
    restart: bool = False,
    grad_accum: int = 1,
    dist: DistContext | None = None,
    draw_loss: DrawLoss | None = None,
    on_progress: OnProgress | None = None,
) -> FinetuneReport:
    """Fine-tune `model` on a labelled tokens file and classify `test_tokens`; returns the report
    (also `OUT/report.json`). `cfg`: the trainer's settings (`TrainConfig` or a dict of its
    fields; the architecture comes from the model). `gen_weight`: the weight of the
    generative term (the paper's joint objective has 1; 0 is classification only).
    Resume (`resume=True`; `restart=True` discards a saved run), data parallelism and the output
    directory's lock are the trainer's (`pretrain`).
    Bad input (unlabelled tokens, labels out of range, a test file of another size or palette
    than the training tokens, tokens of another size or palette than the model, a BERT model)
    is refused before anything is written.
    """
    if isinstance(gen_weight, bool) or not isinstance(gen_weight, (int, float)) or not math.isfinite(gen_weight) \
            or gen_weight < 0:
        raise ParameterError("gen_weight", gen_weight, "must be a finite number of at least 0")
    if model is None:
        raise ParameterError("model", model, "fine-tuning needs a model to start from")
    out = Path(out_dir)
    check_distinct({"out_dir": out}, {"train_tokens": train_tokens, "test_tokens": test_tokens})
    objective = FinetuneObjective(gen_weight, test_tokens, model, train_tokens)
    pretrain(train_tokens, out, cfg, init=model, device=device, dtype=dtype, resume=resume, restart=restart,
             grad_accum=grad_accum, dist=dist, draw_loss=draw_loss, on_progress=on_progress, objective=objective)
    return objective.report
