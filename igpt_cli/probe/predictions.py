"""Predictions, whoever made them: the report `igpt predict` prints and the predictions file it writes.

Saved probes applied to features (`store.predict_file`) and a fine-tuned model applied to tokens
or images (`train.finetuning.predict_finetuned_file`) both end here, so the two give one JSON
report and one file format. The predictions file ("igpt-predictions", version 1): `pred` [N]
class ids, `pred_name` [N], `probabilities` [N, K], `classes` [K] (the ids the columns of
`probabilities` stand for), `labels` [N] (-1: unlabelled), `sources` [N] (image names, "" where
unknown); attrs `method` ("linear" for probes, "finetune" for a fine-tuned model), `class_names`
(the names of the ids, the input's classes the predictor never saw after its own), the
provenance, and what made them (`features` + `probes` + `layer`, or `input` + `model` + `layer`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import formats
from ..formats import PREDICTIONS_FORMAT, PREDICTIONS_VERSION
from ..outputs import atomic_output, check_free_space, hdf5_output
from ..results import Result
from .protocol import wilson_interval


@dataclass
class PredictionReport(Result):
    """What `igpt predict` did: rows, accuracy on the labelled rows whose class the predictor knows."""
    features: str                 # the input: a features file (probes), a tokens file or images (a fine-tuned model)
    probes: str | None            # the probes file (None: a fine-tuned model)
    output: str | None
    layer: int
    layer_choice: str             # how the layer was chosen ("given", "the probes' best layer", ...)
    n: int
    n_labelled: int
    n_known: int                  # labelled rows whose class the predictor was trained on
    accuracy: float | None        # on those rows
    n_unseen: int                 # labelled rows of classes the predictor never saw
    unseen_classes: list[str]
    method: str = "linear"        # "linear" (saved probes) or "finetune" (a fine-tuned model)
    model: str | None = None      # the model the features came from (probes), or the fine-tuned directory
    accuracy_interval: list[float] | None = None   # 95 % Wilson interval of `accuracy`
    predictions: list[dict] | None = None   # per row (with as_list): index, source, label, class, name, probabilities

    _omit_if_none = ("predictions",)


def report_predictions(pred: np.ndarray, proba: np.ndarray, classes: np.ndarray, names: Sequence[str],
                       labels: np.ndarray, sources: Sequence[str | None], *, output: str | Path | None,
                       attrs: dict, as_list: bool = False, device: str | None = "cpu",
                       **fields) -> PredictionReport:
    """The report of `pred` [N] (class ids), `proba` [N, K] (columns: `classes` [K]), `labels` [N]
    (class ids, -1 unlabelled) and `sources` [N]; the predictions file `output` written (atomically)
    when given, with `attrs` (what made the predictions) and the provenance (`device`). `names`: the
    name of each class id. `fields`: the report's other fields (features, probes, layer, ...)."""
    names = list(names)
    pred, labels = np.asarray(pred, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    classes = np.asarray(classes, dtype=np.int64)

    def name_of(c: int) -> str:
        return names[c] if 0 <= c < len(names) else str(c)

    labelled = labels >= 0
    known = labelled & np.isin(labels, classes)
    unseen = sorted(set(labels[labelled & ~known].tolist()))
    if output is not None:
        check_free_space(output, proba.nbytes + len(pred) * 64 + (1 << 20))
        with atomic_output(output) as tmp, hdf5_output(tmp, output) as f:
            f.attrs.update(formats.storable_attrs(dict(format=PREDICTIONS_FORMAT, format_version=PREDICTIONS_VERSION,
                                                       **{k: v for k, v in attrs.items() if v is not None},
                                                       class_names=json.dumps(names))))
            formats.stamp_provenance(f, device)
            f.create_dataset("pred", data=pred)
            f.create_dataset("pred_name", data=np.array([name_of(int(c)) for c in pred], dtype=object),
                             dtype=formats.STR_DTYPE)
            f.create_dataset("probabilities", data=np.asarray(proba, dtype=np.float32))
            f.create_dataset("classes", data=classes)
            f.create_dataset("labels", data=labels)
            f.create_dataset("sources", data=np.array(["" if s is None else s for s in sources], dtype=object),
                             dtype=formats.STR_DTYPE)
    rows = [{"index": i, "source": s, "label": int(y), "class": int(c), "name": name_of(int(c)),
             "probabilities": [float(v) for v in p]}
            for i, (s, y, c, p) in enumerate(zip(sources, labels, pred, proba))] if as_list else None
    correct = int((pred[known] == labels[known]).sum())
    return PredictionReport(
        output=None if output is None else str(output), n=len(pred), n_labelled=int(labelled.sum()),
        n_known=int(known.sum()), accuracy=correct / int(known.sum()) if known.any() else None,
        accuracy_interval=wilson_interval(correct, int(known.sum())) if known.any() else None,
        n_unseen=int((labelled & ~known).sum()), unseen_classes=[name_of(c) for c in unseen], predictions=rows,
        **fields)
