"""Looking inside igpt files: `file_info` summarizes any igpt file (tokens, features, scores,
probes, predictions): kind, dataset shapes, class counts, attrs (provenance included) and, for
features, probes, predictions and scores files, a `summary` of what they hold (`_SUMMARIES`).

It also summarizes the other files igpt reads and writes (`_OTHER_KINDS`): a palette `.npy`,
a model directory or a bundled model's name, a training state `train_state.pt` (read with
`torch.load(weights_only=True)`: no code runs) and a sweep's `sweep.json` (or its directory) / `result.json`.
A partial file (`.out.h5.tmp`, a part file `.out.h5.part-r-of-K.tmp`) says how far it got:
`n` is then the rows done, `progress` holds `n_done` of `n_total`.

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
    summary: Optional[dict] = None     # features, probes, predictions, scores and the non-HDF5 kinds: what they hold
    progress: Optional[dict] = None    # a partial file: {"n_done", "n_total"} (rows written of the finished length)

    _omit_if_none = ("class_counts", "summary", "progress")


def file_info(path: str | Path) -> FileInfo:
    """Summary of any igpt file (any format_version this igpt reads), a palette `.npy`, a model
    directory or bundled model name, a `train_state.pt` or a sweep's JSON.

    FormatError / InputError (one line) for a file that is none of these, or whose
    `class_names`, `layers` or `model_config` attr is not the JSON it should be."""
    for matches, describe in _OTHER_KINDS:
        if matches(Path(path)):
            return describe(Path(path))
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
        progress = _progress(attrs)
        n = int(lab.shape[0]) if labelled else None
        if progress is not None and n is not None:
            n = min(n, progress["n_done"])   # the rows after n_done are preallocated, not written
        counts = _class_counts(lab, n, names) if labelled else None
        summarize = _SUMMARIES.get(attrs.get("format"))
        summary = summarize(f, path, names) if summarize else None
    other = {k: v for k, v in attrs.items() if k not in ("format", "format_version")}
    other.update(decoded)
    return FileInfo(path=str(path), kind=attrs.get("format"), format_version=attrs.get("format_version"),
                    datasets=datasets, n=n, class_counts=counts, classes=names, attrs=other,
                    summary=summary, progress=progress)


def _progress(attrs: dict) -> dict | None:
    """{"n_done", "n_total"} of a file a stage has not finished (`complete` false), else None."""
    done, total = attrs.get("n_done"), attrs.get("n_total")
    if attrs.get("complete", True) or not isinstance(done, (int, np.integer)) or not isinstance(total, (int, np.integer)):
        return None
    out = {"n_done": int(done), "n_total": int(total)}
    if all(isinstance(attrs.get(k), (int, np.integer)) for k in ("shard_start", "shard_stop", "rows_total")):
        out.update(shard=[int(attrs["shard_start"]), int(attrs["shard_stop"])], rows_total=int(attrs["rows_total"]))
    return out


def _class_counts(labels: h5py.Dataset, n: int, names: list[str]) -> dict[str, int]:
    """Rows per class name; labels outside the classes count as "(unlabelled)" (only when any)."""
    bc = np.zeros(len(names) + 1, dtype=np.int64)  # [0]: unlabelled, [i + 1]: class i
    for i in range(0, n, _LABEL_CHUNK):
        lab = labels[i:min(i + _LABEL_CHUNK, n)]
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


def _features_summary(f: h5py.File, path, names: list[str]) -> dict:
    """The pool, what one image's features are per layer (a vector [D], or a token map [T, D]
    when pool is "none"), and the bytes of all of them."""
    attrs = formats.read_attrs(f)
    feats = f.get("features")
    shapes = {k: list(ds.shape[1:]) for k, ds in feats.items() if isinstance(ds, h5py.Dataset)} \
        if isinstance(feats, h5py.Group) else {}
    nbytes = sum(int(ds.size) * ds.dtype.itemsize for ds in feats.values() if isinstance(ds, h5py.Dataset)) \
        if isinstance(feats, h5py.Group) else 0
    return {"pool": attrs.get("pool", formats.implied_pool(attrs.get("site"))),
            "token_maps": formats.is_token_maps(attrs),
            "per_image": {k: "x".join(map(str, v)) for k, v in sorted(shapes.items(), key=lambda kv: int(kv[0]))
                          if k.lstrip("-").isdigit()},
            "feature_bytes": nbytes}


def _scores_summary(f: h5py.File, path, names: list[str]) -> dict:
    """Rows scored so far and their mean bits per token."""
    bits = np.asarray(formats.read_dataset(f["bits_per_token"], path=path), dtype=np.float64)
    done = np.isfinite(bits)
    return {"n_scored": int(done.sum()), "mean_bits_per_token": float(bits[done].mean()) if done.any() else None}


_SUMMARIES = {"igpt-probes": _probes_summary, "igpt-predictions": _predictions_summary,
              formats.SCORES_FORMAT: _scores_summary, formats.FEATURES_FORMAT: _features_summary}  # format -> (open file, path, class names) -> summary dict


# ---------------------------------------------------------------------------
# The files that are not HDF5: palette, model, training state, sweep
# ---------------------------------------------------------------------------

def _other(path: Path, kind: str, version, summary: dict, attrs: dict | None = None) -> FileInfo:
    return FileInfo(path=str(path), kind=kind, format_version=version, datasets={}, n=None, class_counts=None,
                    classes=[], attrs=attrs or {}, summary=summary)


def _palette_info(path: Path) -> FileInfo:
    """A palette .npy: its colours, checked as every command that takes --palette checks them."""
    from .formats import sha256_file
    from .palette import Palette

    pal = Palette.load(path)
    c = pal.centers
    return _other(path, "palette", None, {"colours": pal.k, "min": round(float(c.min()), 4),
                                         "max": round(float(c.max()), 4), "sha256": sha256_file(path)})


def _is_model(path: Path) -> bool:
    from .model import BUNDLED

    return path.is_dir() or (str(path) in BUNDLED and not path.exists())


def _model_info(path: Path) -> FileInfo:
    """A model directory (Hugging Face ImageGPT layout) or a bundled model's name: what `igpt models` shows."""
    from .errors import InputError
    from .model import BUNDLED
    from .model.hub import model_summary

    d = BUNDLED[str(path)] if str(path) in BUNDLED and not path.exists() else path
    if not (d / "config.json").is_file() and (d / "sweep.json").is_file():   # a sweep's output directory
        return _sweep_info(d / "sweep.json")
    if not (d / "config.json").is_file():
        raise InputError(f"{path}: is a directory without config.json: not a model directory (igpt info "
                         "reads igpt .h5 files, a palette .npy, a model directory, train_state.pt and sweep.json)")
    bundled = d.resolve() in {b.resolve() for b in BUNDLED.values()}
    row = model_summary(str(path), d, source="bundled" if bundled else "directory")
    if row is None:
        raise InputError(f"{path}: config.json is not an ImageGPT model config, or the weights are missing")
    row = {k: v for k, v in row.items() if k != "name" and v is not None}
    row["palette_file"] = (d / "preprocessor_config.json").is_file()
    return _other(path, "model", None, row)


def _train_state_info(path: Path) -> FileInfo:
    """A training state (`torch.load(weights_only=True)`, checked as `train --resume` checks it)."""
    from .train.state import read_state

    st = read_state(path)
    m, last = st.model_config, (st.history[-1] if st.history else {})
    summary = {"step": st.step, "schedule_steps": st.schedule_steps,
               "model": {"layers": m.n_layer, "width": m.n_embd, "heads": m.n_head, "vocab_size": m.vocab_size,
                         "positions": m.n_positions},
               "compute_dtype": st.compute_dtype, "world_size": st.world_size, "init": st.init or None,
               "last_record": last, "records": len(st.history)}
    files = {"train_sha256": st.train_sha256, "val_sha256": st.val_sha256, "val_tokens": st.val_tokens}
    return _other(path, "igpt-train-state", st.version, {k: v for k, v in summary.items() if v is not None},
                  {k: v for k, v in files.items() if v})   # "" in states written without them


def _sweep_info(path: Path) -> FileInfo:
    """A sweep's sweep.json (a row per checkpoint, the correlations) or a checkpoint's result.json."""
    from .errors import InputError
    from .jsonfile import read_json
    from .formats import SWEEP_FORMAT as FORMAT

    doc = read_json(path, "sweep result")
    kind = doc.get("format") if isinstance(doc, dict) else None
    if kind == FORMAT + "-checkpoint" and isinstance(doc.get("result"), dict):
        rows = [doc["result"]]
    elif kind == FORMAT and isinstance(doc.get("checkpoints"), list):
        rows = doc["checkpoints"]
    else:
        raise InputError(f"{path}: not an igpt sweep result (format={kind!r}); igpt info reads sweep.json "
                         "and a checkpoint's result.json")
    keys = ("family", "name", "step", "loss_bits", "best_layer", "best_test_acc")
    table = [{k: r.get(k) for k in keys} for r in rows if isinstance(r, dict)]
    summary = {"checkpoints": table}
    if kind == FORMAT:
        summary["correlations"] = doc.get("correlations")
    attrs = {k: v for k, v in doc.items() if k in ("train", "test", "score_on", "layers", "provenance")}
    return _other(path, kind, doc.get("format_version"), summary, attrs)


_OTHER_KINDS = (  # (does the path name this kind?, its FileInfo); anything else is read as an igpt HDF5 file
    (lambda p: p.suffix == ".npy", _palette_info),
    (_is_model, _model_info),
    (lambda p: p.suffix == ".pt", _train_state_info),
    (lambda p: p.suffix == ".json", _sweep_info),
)
