"""Saved probes: each layer's chosen classifier in one HDF5 file, and applying them to features.

The probes file (format "igpt-probes", version 1): attrs say which features it was fitted
on (model, model_sha256, site, pool, sos, class_names, best_layer, train file) plus
`provenance()`; group `probes/<layer>` holds `mean` [D] and `scale` [D] (the
standardisation of the training rows), `coef` [K, D], `intercept` [K], `classes` [K]
(label ids), attrs `c`, `val_acc`, `test_acc`.

`predict_file` applies one layer's probe to a features file exactly as the probe scored
its test rows (same float32 standardisation, same products), so on the test features it
reproduces the reported test accuracy. The predictions file ("igpt-predictions", version
1): `pred` [N] label ids, `pred_name` [N], `probabilities` [N, K], `classes` [K], `labels` [N].
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .. import formats
from ..errors import InputError
from ..formats import (FEATURES_FORMAT, PREDICTIONS_FORMAT, PREDICTIONS_VERSION, PROBES_FORMAT, PROBES_VERSION,
                       open_igpt)
from ..outputs import atomic_output, check_output_path
from ..results import Result
from .estimator import LinearProbe
from .protocol import apply_standardization

MATCH = ("model_sha256", "site", "pool", "sos")   # what features must share with the probes' training features


def save_probes(report, path: str | Path, *, overwrite: bool = False, device: str | None = None) -> Path:
    """Write every layer's chosen classifier of a `ProbeReport` (from `probe_files`) to `path`."""
    check_output_path(path, overwrite)
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        attrs = dict(format=PROBES_FORMAT, format_version=PROBES_VERSION, train=str(report.train),
                     layers=json.dumps([r.layer for r in report.layers]), class_names=json.dumps(report.class_names),
                     best_layer=-1 if report.best_layer is None else report.best_layer, model=str(report.model),
                     **{k: getattr(report, k) for k in MATCH if getattr(report, k) is not None})
        f.attrs.update(formats.storable_attrs({k: v for k, v in attrs.items() if v is not None}))
        formats.stamp_provenance(f, device)
        for r in report.layers:
            g = f.create_group(f"probes/{r.layer}")
            for key, value in r.classifier.items():
                if key == "c":
                    g.attrs["c"] = value
                else:
                    g.create_dataset(key, data=value)
            g.attrs.update(val_acc=r.val_acc, test_acc=r.test_acc)
    return Path(path)


@dataclass
class Probe:
    """One layer's saved classifier."""
    layer: int
    c: float
    mean: np.ndarray       # [D] float32
    scale: np.ndarray      # [D] float32
    estimator: LinearProbe  # fitted: coef_ [K, D], intercept_ [K], classes_ [K]


def load_probes(path: str | Path) -> tuple[dict, dict[int, Probe]]:
    """(file attrs, {layer: Probe}) of a probes file."""
    p = Path(path)
    with open_igpt(p, PROBES_FORMAT) as f:
        attrs = formats.read_attrs(f)
        probes = {}
        for name, g in f["probes"].items():
            est = LinearProbe(C=float(g.attrs["c"]), device="cpu")
            est.coef_, est.intercept_ = g["coef"][()], g["intercept"][()]
            est.classes_ = g["classes"][()]
            est.n_features_in_ = est.coef_.shape[1]
            probes[int(name)] = Probe(int(name), float(g.attrs["c"]), g["mean"][()], g["scale"][()], est)
    attrs["class_names"] = json.loads(attrs.get("class_names") or "[]")
    return attrs, probes


@dataclass
class PredictionReport(Result):
    """What `predict_file` did: rows, accuracy on the labelled rows whose class the probe knows."""
    features: str
    probes: str
    output: str | None
    layer: int
    n: int
    n_labelled: int
    n_known: int                  # labelled rows whose class the probe was trained on
    accuracy: float | None        # on those rows
    n_unseen: int                 # labelled rows of classes the probe never saw
    unseen_classes: list[str]
    predictions: list[dict] | None = None   # per row (with as_list): index, class, name, probabilities

    _omit_if_none = ("predictions",)


def _check_same_features(attrs: dict, probes_attrs: dict, path: Path, probes_path: Path) -> None:
    for key in MATCH:
        a, b = probes_attrs.get(key), attrs.get(key)
        if a is not None and b is not None and a != b:
            raise InputError(f"{path}: {key}={b!r} does not match the probes in {probes_path} ({key}={a!r}); "
                             "features must come from the model, site and pooling the probes were fitted on")


def predict_file(features: str | Path, probes: str | Path, layer: int | None = None, output: str | Path | None = None,
                 *, overwrite: bool = False, as_list: bool = False) -> PredictionReport:
    """Apply the saved probe of `layer` (default: the probes' best layer) to a features file.

    Writes `output` (predictions file) when given; `as_list` puts every row's prediction in
    the report. Refuses features from another model/site/pool or with other dims."""
    fp, pp = Path(features), Path(probes)
    if output is not None:
        check_output_path(output, overwrite)
    pattrs, table = load_probes(pp)
    layer = int(pattrs.get("best_layer", -1)) if layer is None else int(layer)
    if layer not in table:
        raise InputError(f"{pp}: no probe for layer {layer} (it has layers {sorted(table)})")
    probe = table[layer]
    with open_igpt(fp, FEATURES_FORMAT) as f:
        attrs = formats.check_complete_features(f, fp)
        _check_same_features(attrs, pattrs, fp, pp)
        if str(layer) not in f["features"]:
            raise InputError(f"{fp}: has no layer {layer}")
        X = np.asarray(formats.read_dataset(f["features"][str(layer)], path=fp), dtype=np.float32)
        labels = np.asarray(formats.read_dataset(f["labels"], path=fp), dtype=np.int64)
    if X.shape[1] != len(probe.mean):
        raise InputError(f"{fp}: layer {layer} has {X.shape[1]} dims, the probe expects {len(probe.mean)}")
    est = probe.estimator
    Xs = apply_standardization(X, probe.mean, probe.scale)
    proba = est.predict_proba(Xs)                     # [N, K]
    pred = est.predict(Xs)                            # label ids
    names = pattrs["class_names"]
    name_of = (lambda c: names[c] if 0 <= c < len(names) else str(c))
    labelled = labels >= 0
    known = labelled & np.isin(labels, est.classes_)
    unseen = sorted(set(labels[labelled & ~known].tolist()))
    if output is not None:
        with atomic_output(output) as tmp, h5py.File(tmp, "w") as f:
            f.attrs.update(formats.storable_attrs(dict(format=PREDICTIONS_FORMAT, format_version=PREDICTIONS_VERSION,
                                                       features=str(fp), probes=str(pp), layer=layer,
                                                       class_names=json.dumps(names))))
            formats.stamp_provenance(f)
            f.create_dataset("pred", data=pred.astype(np.int64))
            f.create_dataset("pred_name", data=np.array([name_of(int(c)) for c in pred], dtype=object),
                             dtype=formats.STR_DTYPE)
            f.create_dataset("probabilities", data=proba.astype(np.float32))
            f.create_dataset("classes", data=est.classes_.astype(np.int64))
            f.create_dataset("labels", data=labels)
    rows = [{"index": i, "class": int(c), "name": name_of(int(c)), "probabilities": [float(v) for v in p]}
            for i, (c, p) in enumerate(zip(pred, proba))] if as_list else None
    return PredictionReport(
        features=str(fp), probes=str(pp), output=None if output is None else str(output), layer=layer, n=len(X),
        n_labelled=int(labelled.sum()), n_known=int(known.sum()),
        accuracy=float((pred[known] == labels[known]).mean()) if known.any() else None,
        n_unseen=int((labelled & ~known).sum()), unseen_classes=[name_of(c) for c in unseen], predictions=rows)
