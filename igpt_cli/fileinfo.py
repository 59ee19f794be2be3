"""Looking inside igpt files: `file_info` summarizes any igpt file (tokens, features, scores,
probes, predictions): kind, dataset shapes, class counts, attrs (provenance included) and, for
probes, predictions and scores files, a `summary` of what they hold (`_SUMMARIES`).

The picture side (`show_tokens`, `igpt show`) lives in `igpt_cli.show`; it is re-exported here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from . import formats
from .formats import open_igpt
from .results import Result
from .show import ShowResult, show_tokens

__all__ = ["FileInfo", "file_info", "ShowResult", "show_tokens"]  # show_*: re-exported

_JSON_ATTRS = ("class_names", "layers", "model_config")  # attrs stored as JSON text, shown decoded
_LABEL_CHUNK = 1 << 20  # labels counted this many at a time (bounded memory for huge files)


@dataclass
class FileInfo(Result):
    path: str
    kind: Optional[str]                # the `format` attr: "igpt-tokens", "igpt-features", "igpt-probes", …
    format_version: Optional[int]
    datasets: dict                     # HDF5 dataset name ("features/12" in groups) -> {"shape", "dtype"}
    n: Optional[int]                   # rows (None without a labels dataset)
    class_counts: Optional[dict]       # class name -> rows, plus "(unlabelled)" when any; left out when n is None
    classes: list                      # class names
    attrs: dict                        # the other file attributes (provenance, model config, …)
    summary: Optional[dict] = None     # probes, predictions, scores: what they hold (see `_SUMMARIES`)

    _omit_if_none = ("class_counts", "summary")


def file_info(path: str | Path) -> FileInfo:
    """Summary of any igpt file (any format_version this igpt reads).

    FormatError (one line) for a file that is not one, or whose `class_names`, `layers` or
    `model_config` attr is not the JSON it should be."""
    with open_igpt(path) as f:
        attrs = formats.read_attrs(f)
        names = formats.class_names(f, path)
        decoded = {k: formats.json_attr(f, k, path) for k in _JSON_ATTRS if k in f.attrs}
        datasets = {}

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                datasets[name] = {"shape": list(obj.shape), "dtype": str(obj.dtype)}

        f.visititems(visit)
        lab = f.get("labels")
        labelled = isinstance(lab, h5py.Dataset) and lab.ndim == 1 and lab.dtype.kind in "ui"
        n = int(lab.shape[0]) if labelled else None
        counts = _class_counts(lab, n, names) if labelled else None
        summarize = _SUMMARIES.get(attrs.get("format"))
        summary = summarize(f, path, names) if summarize else None
    other = {k: v for k, v in attrs.items() if k not in ("format", "format_version")}
    other.update(decoded)
    return FileInfo(path=str(path), kind=attrs.get("format"), format_version=attrs.get("format_version"),
                    datasets=datasets, n=n, class_counts=counts, classes=names, attrs=other,
                    summary=summary)


def _class_counts(labels: h5py.Dataset, n: int, names: list[str]) -> dict[str, int]:
    """Rows per class name; labels outside the classes count as "(unlabelled)" (only when any)."""
    bc = np.zeros(len(names) + 1, dtype=np.int64)  # [0]: unlabelled, [i + 1]: class i
    for i in range(0, n, _LABEL_CHUNK):
        lab = labels[i:i + _LABEL_CHUNK]
        lab = np.where((lab >= 0) & (lab < len(names)), lab, -1)
        bc += np.bincount(lab + 1, minlength=len(names) + 1)
    counts = {c: int(bc[i + 1]) for i, c in enumerate(names)}
    if bc[0]:
        counts["(unlabelled)"] = int(bc[0])
    return counts


def _probes_summary(f: h5py.File, path, names: list[str]) -> dict:
    """Each layer's probe (C, accuracies, dims, classes) and the features they were fitted on."""
    layers = []
    probes = f.get("probes")
    for name in sorted(probes, key=int) if isinstance(probes, h5py.Group) else []:
        g = probes[name]
        coef = g.get("coef")
        row = {"layer": int(name), **{k: formats.read_attrs(g).get(k) for k in ("c", "val_acc", "test_acc")}}
        if isinstance(coef, h5py.Dataset) and coef.ndim == 2:
            row.update(classes=int(coef.shape[0]), dims=int(coef.shape[1]))
        layers.append(row)
    attrs = formats.read_attrs(f)
    features = {k: attrs[k] for k in ("model", "model_sha256", "site", "pool", "sos", "train") if k in attrs}
    return {"layers": layers, "best_layer": attrs.get("best_layer"), "features": features}


def _predictions_summary(f: h5py.File, path, names: list[str]) -> dict:
    """Rows predicted per class, and the accuracy on the labelled rows of classes the probe knows."""
    pred = np.asarray(formats.read_dataset(f["pred"], path=path), dtype=np.int64)           # [N]
    labels = np.asarray(formats.read_dataset(f["labels"], path=path), dtype=np.int64) \
        if "labels" in f else np.full(len(pred), -1)                                       # [N]
    classes = np.asarray(formats.read_dataset(f["classes"], path=path)) if "classes" in f else np.unique(pred)
    ids, counts = np.unique(pred, return_counts=True)
    known = (labels >= 0) & np.isin(labels, classes)
    return {"layer": formats.read_attrs(f).get("layer"), "n": len(pred),
            "predicted_counts": {(names[i] if 0 <= i < len(names) else str(i)): int(c) for i, c in zip(ids, counts)},
            "n_labelled": int((labels >= 0).sum()), "n_known": int(known.sum()),
            "accuracy": float((pred[known] == labels[known]).mean()) if known.any() else None}


def _scores_summary(f: h5py.File, path, names: list[str]) -> dict:
    """Rows scored so far and their mean bits per token."""
    bits = np.asarray(formats.read_dataset(f["bits_per_token"], path=path), dtype=np.float64)
    done = np.isfinite(bits)
    return {"n_scored": int(done.sum()), "mean_bits_per_token": float(bits[done].mean()) if done.any() else None}


_SUMMARIES = {"igpt-probes": _probes_summary, "igpt-predictions": _predictions_summary,
              formats.SCORES_FORMAT: _scores_summary}  # format -> (open file, path, class names) -> summary dict
