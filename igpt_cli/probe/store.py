"""Saved probes: each layer's chosen classifier in one HDF5 file, and applying them to features.

The probes file (format "igpt-probes", version 2): attrs say which features it was fitted
on (model, model_sha256, site, pool, sos, class_names, best_layer, train file), the
device the fits ran on and the world size that wrote it, `probes_sha256` (the digest of
every layer's arrays, checked on read) plus `provenance()`; group `probes/<layer>` holds
`mean` [D] and `scale` [D] (the standardisation of the training rows), `coef` [K, D],
`intercept` [K], `classes` [K] (label ids), attrs `c`, `val_acc`, `test_acc`, and for a
probe on concatenated layers (`igpt probe --concat`) `concat_layers` (JSON list, in order;
the group is named by the first; `mean`..`coef` span the concatenation).
`load_probes` validates all of it (shapes, finiteness, scale > 0, the digest): a
damaged or edited file is one line, never a traceback or NaN probabilities.

`predict_file` applies one layer's probe to a features file exactly as the probe scored
its test rows (same float32 standardisation, same products), so on the test features it
reproduces the reported test accuracy; the report and the predictions file are
`predictions.report_predictions`'s (shared with a fine-tuned model's predictions).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .. import formats
from ..errors import InputError
from ..formats import FEATURES_FORMAT, PROBES_FORMAT, PROBES_VERSION, FormatError, feature_layers, open_igpt
from ..layers import format_layers, parse_layers
from ..outputs import atomic_output, check_distinct, check_free_space, check_output_path, hdf5_output
from .estimator import LinearProbe
from .predictions import PredictionReport, report_predictions
from .protocol import apply_standardization
from .stream import read_layer

MATCH = ("model_sha256", "site", "pool", "sos")   # what features must share with the probes' training features
ARRAYS = ("mean", "scale", "coef", "intercept", "classes")   # one layer's probe, in digest order


def probes_digest(layers: dict[int, dict]) -> str:
    """SHA-256 of every layer's probe ({layer: {"c", "mean", "scale", "coef", "intercept", "classes"}}):
    layer, C and each array's dtype, shape and bytes, layers in increasing order."""
    h = hashlib.sha256()
    for layer in sorted(layers):
        arrays = layers[layer]
        h.update(f"layer {int(layer)} c {float(arrays['c'])!r}\n".encode())
        if arrays.get("layers"):   # a probe on concatenated layers (absent: the digest of one layer's probe)
            h.update(f"layers {[int(l) for l in arrays['layers']]}\n".encode())
        for key in ARRAYS:
            a = np.ascontiguousarray(arrays[key])
            h.update(f"{key} {a.dtype.str} {a.shape}\n".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def save_probes(report, path: str | Path, *, overwrite: bool = False, device: str | None = None,
                world_size: int = 1) -> Path:
    """Write every layer's chosen classifier of a `ProbeReport` (from `probe_files`) to `path`.

    `device`: where the fits ran (recorded; "cuda:0,cuda:1" when ranks used several, the first
    named in the provenance); `world_size`: the processes that fitted them."""
    check_distinct({"save_probes": path}, {"train": report.train, "test": report.test})
    check_output_path(path, overwrite)
    arrays = {r.layer: r.classifier for r in report.layers}
    check_free_space(path, 2 * sum(sum(np.asarray(v).nbytes for v in c.values() if hasattr(v, 'nbytes'))
                                   for c in arrays.values()) + (1 << 20))
    with atomic_output(path) as tmp, hdf5_output(tmp, path) as f:
        attrs = dict(format=PROBES_FORMAT, format_version=PROBES_VERSION, train=str(report.train),
                     layers=json.dumps([r.layer for r in report.layers]), class_names=json.dumps(report.class_names),
                     best_layer=-1 if report.best_layer is None else report.best_layer, model=str(report.model),
                     device=str(device) if device is not None else None, world_size=int(world_size),
                     probes_sha256=probes_digest(arrays),
                     **{k: getattr(report, k) for k in MATCH if getattr(report, k) is not None})
        f.attrs.update(formats.storable_attrs({k: v for k, v in attrs.items() if v is not None}))
        formats.stamp_provenance(f, None if device is None else str(device).split(",")[0])  # rank 0's device
        for r in report.layers:
            g = f.create_group(f"probes/{r.layer}")
            for key, value in r.classifier.items():
                if key == "c":
                    g.attrs["c"] = value
                elif key == "layers":
                    g.attrs["concat_layers"] = json.dumps([int(l) for l in value])
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
    val_acc: float | None = None
    layers: list[int] | None = None   # a probe on concatenated layers: them, in order (D = their dims summed)


def _float_attr(g: h5py.Group, key: str, where: str) -> float | None:
    v = g.attrs.get(key)
    if v is None:
        return None
    try:
        v = float(np.asarray(v).item())
    except (TypeError, ValueError):
        raise FormatError(f"{where}: attr {key}={v!r} is not a number") from None
    return v


def _read_probe(g, p: Path, name: str) -> dict:
    """One layer's arrays, validated: shapes that fit together, finite values, scale > 0, C > 0."""
    where = f"{p}: probe of layer {name}"
    if not isinstance(g, h5py.Group):
        raise FormatError(f"{where} is not a group")
    missing = [k for k in ARRAYS if not isinstance(g.get(k), h5py.Dataset)]
    if missing:
        raise FormatError(f"{where} has no {', '.join(missing)}")
    a = {k: np.asarray(formats.read_dataset(g[k], path=p)) for k in ARRAYS}
    c = _float_attr(g, "c", where)
    if c is None or not math.isfinite(c) or c <= 0:
        raise FormatError(f"{where}: C={c!r} must be a positive number")
    for k in ("mean", "scale", "coef", "intercept"):
        if a[k].dtype.kind not in "fiu":
            raise FormatError(f"{where}: {k} is not numeric ({a[k].dtype})")
    if a["classes"].dtype.kind not in "iu":
        raise FormatError(f"{where}: classes are not integer label ids ({a['classes'].dtype})")
    if a["coef"].ndim != 2 or min(a["coef"].shape) < 1:
        raise FormatError(f"{where}: coef has shape {a['coef'].shape}, expected [classes, dims]")
    k, d = a["coef"].shape
    for key, want in (("mean", (d,)), ("scale", (d,)), ("intercept", (k,)), ("classes", (k,))):
        if a[key].shape != want:
            raise FormatError(f"{where}: {key} has shape {a[key].shape}, expected {want} (coef is {k} x {d})")
    if k < 2:
        raise FormatError(f"{where}: {k} class; a probe has at least 2")
    for key in ("mean", "scale", "coef", "intercept"):
        if not np.isfinite(a[key]).all():
            raise FormatError(f"{where}: {key} holds NaN/inf values")
    if not (a["scale"] > 0).all():
        raise FormatError(f"{where}: scale holds {int((a['scale'] <= 0).sum())} values <= 0 "
                          "(a standardisation divides by it)")
    if len(np.unique(a["classes"])) != k:
        raise FormatError(f"{where}: classes repeat a label")
    a["c"] = c
    concat = g.attrs.get("concat_layers")
    if concat is not None:
        try:
            layers = json.loads(concat.decode() if isinstance(concat, bytes) else str(concat))
            assert isinstance(layers, list) and len(layers) >= 2 and all(isinstance(l, int) for l in layers)
        except (ValueError, AssertionError):
            raise FormatError(f"{where}: attr concat_layers={concat!r} is not a list of two or more layers") from None
        a["layers"] = layers
    return a


def load_probes(path: str | Path) -> tuple[dict, dict[int, Probe]]:
    """(file attrs, {layer: Probe}) of a probes file, every layer validated (FormatError, one line, when
    it is damaged or edited: missing group, shapes that do not fit, NaN, scale <= 0, digest mismatch)."""
    p = Path(path)
    with open_igpt(p, PROBES_FORMAT) as f:
        attrs = formats.read_attrs(f)
        attrs["class_names"] = formats.class_names(f, p)
        group = f.get("probes")
        if not isinstance(group, h5py.Group) or not len(group):
            raise FormatError(f"{p}: holds no probes (no 'probes' group); write one with igpt probe --save-probes")
        arrays, val_acc = {}, {}
        for name, g in group.items():
            try:
                layer = int(name)
            except ValueError:
                raise FormatError(f"{p}: probes/{name} is not a layer number") from None
            arrays[layer] = _read_probe(g, p, name)
            val_acc[layer] = _float_attr(g, "val_acc", f"{p}: probe of layer {name}")
        best = attrs.get("best_layer", -1)
        if isinstance(best, (np.integer, np.ndarray)):
            best = np.asarray(best).item()
        if not isinstance(best, int) or isinstance(best, bool):
            raise FormatError(f"{p}: attr best_layer={best!r} is not an integer")
        attrs["best_layer"] = best
        recorded = attrs.get("probes_sha256")
        if int(attrs.get("format_version", 1)) >= 2 and not isinstance(recorded, str):
            raise FormatError(f"{p}: has no probes_sha256 digest (written by igpt probe --save-probes, then edited?)")
        if recorded is not None and recorded != probes_digest(arrays):
            raise FormatError(f"{p}: its probes do not match the digest recorded when they were saved "
                              "(edited or damaged); fit them again with igpt probe --save-probes")
    probes = {}
    for layer, a in sorted(arrays.items()):
        est = LinearProbe(C=a["c"], device="cpu")
        est.coef_, est.intercept_, est.classes_ = a["coef"], a["intercept"], a["classes"]
        est.n_features_in_ = est.coef_.shape[1]
        probes[layer] = Probe(layer, a["c"], a["mean"].astype(np.float32), a["scale"].astype(np.float32), est,
                              val_acc[layer], a.get("layers"))
    return attrs, probes


def _text(v) -> str:
    """An HDF5 string as text (undecodable bytes replaced: a name is for reading, never for crashing)."""
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _check_same_features(attrs: dict, probes_attrs: dict, path: Path, probes_path: Path) -> None:
    for key in MATCH:
        a, b = probes_attrs.get(key), attrs.get(key)
        if a is not None and b is not None and a != b:
            raise InputError(f"{path}: {key}={b!r} does not match the probes in {probes_path} ({key}={a!r}); "
                             "features must come from the model, site and pooling the probes were fitted on")


def choose_layer(layer, probes: dict[int, Probe], best_layer: int, feature_layers: list[int],
                 features: Path, probes_path: Path) -> tuple[int, str]:
    """(the layer whose probe to apply, how it was chosen). `layer`: a spec naming one layer of the
    probes (`12`, `-1`), or None: the probes' best layer when the features have it, else the layer
    with the best validation accuracy among those the features have."""
    have = sorted(probes)
    common = [l for l in have if l in feature_layers]
    if layer is not None:
        sel = parse_layers(layer, have, where=f"{probes_path}")
        if len(sel) != 1:
            raise InputError(f"layer={layer}: names {len(sel)} layers; predict applies one layer's probe")
        (chosen,) = sel
        if chosen not in feature_layers:
            hint = (f"; choose one they share with layer={common[-1]}" if common else "")
            raise InputError(f"{features}: has no layer {chosen} (it has layers {format_layers(feature_layers)})"
                             + hint)
        return chosen, "given"
    if best_layer in common:
        return best_layer, "the probes' best layer"
    if not common:
        raise InputError(f"{features}: has layers {format_layers(feature_layers)}, the probes in {probes_path} "
                         f"have layers {format_layers(have)}: none in common; extract one of the probes' layers "
                         "(the best is " + (f"{best_layer})" if best_layer in probes else "any)"))
    chosen = max(common, key=lambda l: (probes[l].val_acc if probes[l].val_acc is not None else -1.0, -l))
    return chosen, (f"the best of the features' layers by validation accuracy "
                    f"(the probes' best layer {best_layer} is not in {features.name})")


def _probe_input(f: h5py.File, fp: Path, probe: Probe) -> np.ndarray:
    """The features `probe` takes: its layer, or its layers concatenated in the order it was fitted on."""
    layers = probe.layers or [probe.layer]
    missing = [l for l in layers if str(l) not in f["features"]]
    if missing:
        raise InputError(f"{fp}: has no layer {format_layers(missing)}; the probe of layer "
                         f"{probe.layer} concatenates layers {format_layers(layers)}")
    dims = [int(f["features"][str(l)].shape[1]) for l in layers]
    if sum(dims) != len(probe.mean):
        what = f"layer {layers[0]} has" if len(layers) == 1 else f"layers {format_layers(layers)} have"
        raise InputError(f"{fp}: {what} {sum(dims)} dims, the probe expects {len(probe.mean)}")
    parts = [read_layer(f, fp, l) for l in layers]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def predict_file(features: str | Path, probes: str | Path, layer: int | str | None = None,
                 output: str | Path | None = None, *, overwrite: bool = False,
                 as_list: bool = False) -> PredictionReport:
    """Apply one layer's saved probe to a features file.

    `layer`: a layer of the probes (an int or a spec like "-1"); default the probes' best
    layer, or, when the features lack it, the best (by validation accuracy) of the layers they
    have (`choose_layer`; the report says which and why). Writes `output` (predictions file)
    when given; `as_list` puts every row's prediction in the report. Refuses features from
    another model/site/pool, with other dims or NaN, and damaged probes files."""
    fp, pp = Path(features), Path(probes)
    if output is not None:
        check_distinct({"output": output}, {"features": fp, "probes": pp})
        check_output_path(output, overwrite)
    pattrs, table = load_probes(pp)
    with open_igpt(fp, FEATURES_FORMAT) as f:
        attrs = formats.check_complete_features(f, fp)
        _check_same_features(attrs, pattrs, fp, pp)
        layer, how = choose_layer(layer, table, pattrs["best_layer"], feature_layers(f), fp, pp)
        probe = table[layer]
        X = _probe_input(f, fp, probe)
        labels = np.asarray(formats.read_dataset(f["labels"], path=fp), dtype=np.int64)
        sources = ([_text(s) for s in formats.read_dataset(f["sources"], path=fp)]
                   if isinstance(f.get("sources"), h5py.Dataset) else [None] * len(labels))
    est = probe.estimator
    Xs = apply_standardization(X, probe.mean, probe.scale)
    return report_predictions(est.predict(Xs), est.predict_proba(Xs), est.classes_, pattrs["class_names"], labels,
                              sources, output=output, as_list=as_list,
                              attrs=dict(method="linear", features=str(fp), probes=str(pp), layer=layer),
                              features=str(fp), probes=str(pp), layer=layer, layer_choice=how, method="linear",
                              model=None if pattrs.get("model") is None else str(pattrs["model"]))
