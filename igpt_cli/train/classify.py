"""A fine-tuned classifier applied: class logits of tokens (`class_logits`, what `finetune` scores its
test file with), `predict_finetuned` (tokens or images in memory, or a tokens file) and
`predict_finetuned_file` (`igpt predict -m`: a tokens file or images of any kind `igpt quantize`
reads, in; the report and predictions file of `igpt predict --probes` out).

The model is a fine-tuned directory (`finetune`'s output, or any `ImageGPTForImageClassification`
of an autoregressive iGPT) named as `-m` names models everywhere (`model.resolve`); a plain
language model, or a BERT-objective one, is refused.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError, ParameterError
from ..model import IGPTConfig, sos_shift
from ..model.classifier import IGPTClassifier, load_classifier
from ..outputs import check_distinct
from ..results import Result
from ..runtime import resolve_device
from .data import TokenData, load_tokens

EVAL_BATCH = 256


@torch.inference_mode()
def classify(model: IGPTClassifier, tokens: np.ndarray, device: torch.device,
             batch_size: int = EVAL_BATCH) -> np.ndarray:
    """Predicted class of each row of `tokens` [N, T] (float32, the model left in train mode)."""
    return class_logits(model, tokens, device, batch_size).argmax(-1).numpy()


@torch.inference_mode()
def class_logits(model: IGPTClassifier, tokens: np.ndarray, device: torch.device,
                 batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """Class logits [N, num_labels] (float32, on the CPU) of tokens [N, T]."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(tokens), batch_size):
        x = torch.from_numpy(np.asarray(tokens[i:i + batch_size]).astype(np.int64)).to(device)
        logits, _ = model(sos_shift(x, model.config.sos_token), generative=False)
        out.append(logits.float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros((0, model.num_labels))




@dataclass
class Predictions(Result):
    """What a fine-tuned model says of each image: the class index, its name, the probabilities."""
    predictions: list[int]
    labels: list[str]
    probabilities: list[list[float]]
    class_names: list[str]


def load_finetuned(model: str | Path, param: str = "model") -> tuple[IGPTClassifier, list[str], Path, Any, int | None]:
    """(classifier, class names, its directory, its palette or None, its image side or None) of a
    fine-tuned model (a directory, a bundled name or a hub id, as `-m` everywhere); refused (one
    line) when it is no classifier (a plain language-model directory) or a BERT-objective model."""
    from ..model.resolve import resolve_model_dir
    from ..model.runtime import model_image_settings
    from ..palette import PaletteError

    model_dir = resolve_model_dir(model)
    clf, names = load_classifier(model_dir)
    if not clf.config.autoregressive:
        raise ParameterError(param, str(model), "is a BERT-objective model; only autoregressive "
                                                "fine-tuned models are applied")
    try:
        side, palette = model_image_settings(model_dir)
    except PaletteError:
        side, palette = None, None
    return clf, names, model_dir, palette, side


def check_tokens_fit(data: TokenData, cfg: IGPTConfig, palette, model: str | Path) -> None:
    """InputError naming the tokens file: another resolution or another palette than the model's."""
    if data.height * data.width != cfg.n_positions:
        raise InputError(f"{data.path}: {data.height}x{data.width} tokens, the model {model} takes "
                         f"{cfg.n_positions} tokens per image")
    if palette is not None and (palette.centers.shape != data.palette.shape
                                or float(np.abs(palette.centers - data.palette).max()) >= 1e-3):
        raise InputError(f"{data.path}: quantized with another palette than the model {model}; "
                         f"quantize with --palette {model}")


def _check_batch_size(batch_size) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ParameterError("batch_size", batch_size, "must be an integer of at least 1")


def predict_finetuned(tokens_or_images: Any, model_dir: str | Path, *, device: str = "auto",
                      batch_size: int = EVAL_BATCH) -> Predictions:
    """Classify with a fine-tuned directory (`finetune`'s output, or any
    `ImageGPTForImageClassification` of an autoregressive iGPT).

    `tokens_or_images`: a tokens file (path), palette tokens [N, H*W] (integers), or uint8 RGB
    images [N, H, W, 3] at the model's size (quantized with the model's palette). Tokens must
    come from the model's palette: a file quantized with another palette is refused.
    (`predict_finetuned_file` takes image folders and archives too, and writes a predictions file.)"""
    _check_batch_size(batch_size)
    model, names, _, palette, _ = load_finetuned(model_dir, "model_dir")
    cfg = model.config
    if isinstance(tokens_or_images, (str, Path)):
        data = load_tokens(tokens_or_images)
        check_tokens_fit(data, cfg, palette, model_dir)
        tokens = data.tokens
    else:
        arr = np.asarray(tokens_or_images)
        if arr.ndim == 4 and arr.shape[-1] == 3 and arr.dtype == np.uint8:
            if palette is None:
                raise InputError(f"{model_dir}: names no palette (preprocessor_config.json): give tokens, "
                                 "not images")
            if arr.shape[1] * arr.shape[2] != cfg.n_positions:
                raise ParameterError("tokens_or_images", f"images {arr.shape[1]}x{arr.shape[2]}",
                                     f"the model takes {cfg.n_positions} pixels per image; resize them first")
            tokens = palette.quantize(arr)
        elif arr.ndim == 2 and np.issubdtype(arr.dtype, np.integer) and arr.shape[1] == cfg.n_positions:
            if arr.size and (arr.min() < 0 or arr.max() >= cfg.vocab_size - 1):
                raise ParameterError("tokens_or_images", "tokens", f"values must lie in 0..{cfg.vocab_size - 2}")
            tokens = arr
        else:
            raise ParameterError("tokens_or_images", f"{arr.dtype} {arr.shape}",
                                 f"expected a tokens file, tokens [N, {cfg.n_positions}] or uint8 images [N, H, W, 3]")
    dev = resolve_device(device)
    model.to(dev)
    probs = torch.softmax(class_logits(model, tokens, dev, batch_size), dim=-1)
    pred = probs.argmax(-1).tolist()
    return Predictions(predictions=pred, labels=[names[p] for p in pred], probabilities=probs.tolist(),
                       class_names=names)


def _tokens_file_kind(path: Path) -> str | None:
    """The igpt kind of an HDF5 file at `path` (None: not an HDF5 file, e.g. an image or an archive)."""
    import h5py

    from ..formats import open_igpt, read_attrs

    if not path.is_file() or not (path.suffix.lower() in (".h5", ".hdf5") or h5py.is_hdf5(path)):
        return None   # (an .h5 file that is no HDF5: open_igpt says so)
    with open_igpt(path) as f:
        return read_attrs(f).get("format")


def _model_ids(labels: np.ndarray, input_names: list[str], names: list[str]) -> tuple[np.ndarray, list[str]]:
    """The input's labels as the model's class ids, matched by class name (the input's classes the
    model does not have get ids after the model's, and their names after its names); -1 stays -1.
    An input without class names has labels that are the model's ids already."""
    labels = np.asarray(labels, dtype=np.int64)
    if not input_names:
        return labels, list(names)
    all_names = list(names) + [n for n in input_names if n not in names]
    ids = np.array([all_names.index(n) for n in input_names] + [-1], dtype=np.int64)
    return np.where((labels >= 0) & (labels < len(input_names)), ids[np.clip(labels, 0, len(input_names))],
                    np.where(labels < 0, -1, labels + len(all_names))), all_names


def predict_finetuned_file(src: Any, model: str | Path, output: str | Path | None = None, *,
                           overwrite: bool = False, as_list: bool = False, device: str = "auto",
                           batch_size: int = EVAL_BATCH):
    """Apply a fine-tuned model to a tokens file (quantized with the model's palette at its size) or
    to images (anything `data.open_dataset` reads: a folder, an archive, one image, a list or a
    glob), quantized with the model's palette at the model's size as they stream by. Returns the
    `probe.predictions.PredictionReport` `igpt predict --probes` returns (accuracy on the labelled
    rows, matched to the model's classes by name) and writes the same predictions file `output`
    (attrs `method` "finetune", `model`) when given. Refused before any work: a model that is no
    classifier or a BERT model, tokens of another palette or size, a features file, `output` equal
    to an input."""
    from ..data import open_dataset
    from ..formats import FEATURES_FORMAT, TOKENS_FORMAT, labels_and_sources, open_igpt
    from ..outputs import check_output_path
    from ..probe.predictions import report_predictions

    _check_batch_size(batch_size)
    paths = src if isinstance(src, (list, tuple)) else [src]
    if output is not None:
        check_distinct({"output": output}, {f"src[{i}]" if len(paths) > 1 else "src": p for i, p in enumerate(paths)
                                            if isinstance(p, (str, Path)) and Path(p).is_file()})
        check_output_path(output, overwrite)
    clf, names, model_dir, palette, side = load_finetuned(model)
    cfg = clf.config
    dev = resolve_device(device)
    clf.to(dev)
    kind = _tokens_file_kind(Path(paths[0])) if len(paths) == 1 and isinstance(paths[0], (str, Path)) else None
    if kind == FEATURES_FORMAT:
        raise InputError(f"{paths[0]}: is a features file; a fine-tuned model takes tokens or images "
                         "(saved probes take features: --probes)")
    if kind is not None and kind != TOKENS_FORMAT:
        raise InputError(f"{paths[0]}: is an {kind} file; a fine-tuned model takes a tokens file or images")
    if kind == TOKENS_FORMAT:
        data = load_tokens(paths[0])
        check_tokens_fit(data, cfg, palette, model)
        with open_igpt(paths[0], TOKENS_FORMAT) as f:
            labels, sources = labels_and_sources(f, len(data.tokens), paths[0])
        logits = class_logits(clf, data.tokens, dev, batch_size)
        input_names, what = list(data.class_names or []), "a tokens file"
    else:
        if palette is None or side is None:
            raise InputError(f"{model}: names no palette or image size (preprocessor_config.json); give it "
                             "a tokens file quantized with its palette, not images")
        ds = open_dataset(src, size=side)
        parts, label_parts, sources = [], [], []
        with contextlib.closing(ds.batches(batch_size)) as batches:
            for imgs, lab, srcs in batches:
                parts.append(class_logits(clf, palette.quantize(imgs), dev, batch_size))
                label_parts.append(np.asarray(lab, dtype=np.int64))
                sources.extend(str(s) for s in srcs)
        if not parts:
            raise InputError(f"{src}: no images")
        logits, labels = torch.cat(parts), np.concatenate(label_parts)
        input_names, what = list(ds.class_names or []), "images"
    probs = torch.softmax(logits, dim=-1).numpy()
    labels, all_names = _model_ids(labels, input_names, names)
    src_text = str(src) if not isinstance(src, (list, tuple)) else ", ".join(map(str, src))
    return report_predictions(probs.argmax(-1), probs, np.arange(len(names)), all_names, labels, list(sources),
                              output=output, as_list=as_list, device=str(dev),
                              attrs=dict(method="finetune", input=src_text, model=str(model_dir),
                                         layer=cfg.n_layer),
                              features=src_text, probes=None, layer=cfg.n_layer,
                              layer_choice=f"the fine-tuned model's last layer ({what} in)", method="finetune",
                              model=str(model_dir))
