"""The probe stage on files: features file(s) in, a `ProbeReport` (accuracy per layer) out.

Checks the files (complete, labelled, finite, train and test from the same model, site,
pooling and layers), holds out a stratified test split when there is no test file, runs
`probe_layer` on every requested layer (one layer in memory at a time, or `jobs` layers
in parallel threads; with the torch solver and `jobs` 1, as many layers as fit in memory
together in one batched optimisation, `probe_layers`) and reports each finished layer as
a progress event. With `method="knn"` each layer is evaluated by `knn.knn_layer` instead;
`concat` probes the layers' concatenation as one; `shots` adds few-shot probes per layer.

The module is long (over 420 lines) because `probe_files` is one plan shared by every way of
running the layers (in memory, streamed, grouped, threaded, over torchrun ranks, k-NN,
concatenated, few-shot), and splitting it would pass that plan's dozen values around.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .. import formats
from ..choices import PROBE_METHODS, PROBE_SOLVERS
from ..errors import InputError, ParameterError, check_choice, check_positive
from ..formats import FEATURES_FORMAT, check_complete_features, feature_layers, open_igpt
from ..layers import format_layers, parse_layers
from ..progress import OnProgress, Reporter
from ..results import Result
from ..seeds import check_seed
from .estimator import DEFAULT_SOLVER, MAX_ITER, TOL, LinearProbe, resolve_probe_device
from .protocol import (COARSE_GRID, EXTEND_DECADES, FEW_VAL_ROWS, KFOLD_BELOW, KFOLDS, REFINE_STEPS, VAL_FRACTION,
                       LayerResult, check_labels, fits_layers_at_once, probe_layer, probe_layers, stratified_split)
from .fewshot import ONE_SHOT_C, check_shots, few_shot
from .knn import KNN_K, KNN_TEMPERATURE, check_knn, knn_layer, plan_knn_memory
from .stream import H5Rows, parse_bytes, plan_memory, read_layer

if TYPE_CHECKING:
    from ..distributed import DistContext

# attrs that must agree between the train and test features files (`read_attrs` gives a
# version-1 file, which has no "pool", the pooling it implies)
MATCH_ATTRS = ("model", "model_sha256", "site", "pool", "sos")


@dataclass
class FeatureSource:
    path: Path
    attrs: dict
    layers: list[int]
    dims: dict[int, int]
    labels: np.ndarray
    class_names: list[str]


def inspect_features(path: str | Path) -> FeatureSource:
    """Open a features file, check it is complete and labelled; read labels and metadata."""
    p = Path(path)
    with open_igpt(p, FEATURES_FORMAT) as f:
        attrs = check_complete_features(f, p)  # also: 2-D features with as many rows as labels
        layers = feature_layers(f)
        dims = {l: int(f["features"][str(l)].shape[1]) for l in layers}
        labels = np.asarray(formats.read_dataset(f["labels"], path=p), dtype=np.int64)
        names = formats.class_names(f, p)
        # JSON-text attrs as objects in the report (the same representation as `igpt info --json`)
        attrs = dict(attrs, model_config=formats.json_attr(f, "model_config", p, kind=dict))
    n_unl = int((labels < 0).sum())
    if n_unl:
        raise InputError(f"{p}: {n_unl} of {len(labels)} rows are unlabelled (label -1); "
                         "probing needs labelled rows")
    if len(labels) == 0:
        raise InputError(f"{p}: no rows")
    return FeatureSource(p, attrs, layers, dims, labels, names)


def check_compatible(train: FeatureSource, test: FeatureSource, layers: Sequence[int] | None = None) -> None:
    """Refuse train/test files from different models, sites, pooling or class lists, or whose
    `layers` (default: every layer of train) are missing from test or of other widths."""
    for key in MATCH_ATTRS:
        a, b = train.attrs.get(key), test.attrs.get(key)
        if key == "model_sha256" and (not a or not b):
            continue
        if key == "model" and train.attrs.get("model_sha256") and \
                train.attrs.get("model_sha256") == test.attrs.get("model_sha256"):
            continue  # same weights under a different path
        if a != b:
            raise InputError(f"{test.path}: {key}={b!r} does not match {train.path} ({key}={a!r}); "
                             "train and test features must come from the same model, site and settings")
    layers = train.layers if layers is None else list(layers)
    missing = [l for l in layers if l not in test.dims]
    if missing:
        raise InputError(f"{test.path}: has no layer {format_layers(missing)} (it has layers "
                         f"{format_layers(test.layers)}; {train.path} has {format_layers(train.layers)})")
    for l in layers:
        if train.dims[l] != test.dims[l]:
            raise InputError(f"{test.path}: layer {l} has {test.dims[l]} dims, {train.path} has {train.dims[l]}")
    if train.class_names and test.class_names and train.class_names != test.class_names:
        raise InputError(f"{test.path}: class_names do not match {train.path}")


def _unit_rows(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), float32."""
    X = np.asarray(X, dtype=np.float32)
    n = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(n == 0, 1, n)


def _read_layer(src: FeatureSource, layer: int) -> np.ndarray:
    with open_igpt(src.path, FEATURES_FORMAT) as f:
        return read_layer(f, src.path, layer)


# ---------------------------------------------------------------------------
# Several layers at once (the torch solver, layers held in memory together)
# ---------------------------------------------------------------------------

LAYER_GROUP_COPIES = 5   # per layer in a group: raw train+test, the search's standardised split, the final copy, slack
MEMORY_FRACTION = 0.25   # of the available memory, without max_memory


def layer_groups(layers: list[int], n_rows: int, dims: dict[int, int], max_memory: int | None) -> list[list[int]]:
    """Consecutive layers grouped so that each group's features (LAYER_GROUP_COPIES copies of each
    layer's rows) fit in `max_memory` bytes (default: MEMORY_FRACTION of the available memory)."""
    if max_memory is None:
        try:
            max_memory = int(MEMORY_FRACTION * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):  # pragma: no cover
            max_memory = 1 << 30
    groups: list[list[int]] = []
    used = 0
    for l in layers:
        need = LAYER_GROUP_COPIES * n_rows * dims[l] * 4
        if groups and used + need <= max_memory and dims[l] == dims[groups[-1][0]]:
            groups[-1].append(l)
            used += need
        else:
            groups.append([l])
            used = need
    return groups


def probe_layer_group(tr: FeatureSource, te: FeatureSource | None, layers: list[int], tr_idx, te_idx,
                      y_train: np.ndarray, y_test: np.ndarray, seed: int, estimator, probe_kw: dict) -> list:
    """`probe_layers` on `layers` read from the files (test rows: the test file's, or the held-out ones)."""
    X_train, X_test = {}, {}
    for l in layers:
        X = _read_layer(tr, l)
        X_train[l], X_test[l] = (X[tr_idx], X[te_idx]) if te is None else (X, _read_layer(te, l))
        del X
    return probe_layers(X_train, y_train, X_test, y_test, seed, estimator=estimator, class_names=tr.class_names,
                        **probe_kw)


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------

@dataclass
class ProbeReport(Result):
    """Accuracy per layer and where it came from; `to_dict()` is the CLI's `--json` document."""

    igpt_version: Any         # the igpt version that extracted the train features (its attr)
    train: str
    test: str | None
    test_mode: str            # "file" | "held_out"
    test_fraction: float | None
    seed: int
    # provenance of the train features file (its attrs)
    model: Any
    model_sha256: Any
    model_config: Any
    site: Any
    pool: Any                 # for format-version-1 files, which have no such attr, the one they imply
    sos: Any
    compute_dtype: Any
    tokens_file: Any
    tokens_sha256: Any
    test_tokens_file: Any
    class_names: list[str]
    protocol: dict
    best_layer: int | None          # by validation accuracy (ties: larger test accuracy, then lower layer)
    best_test_layer: int | None     # by test accuracy, for reference only
    not_converged_fits: int
    seconds: float
    world_size: int                 # processes the layers were spread over (torchrun); 1: one process
    warnings: list[str]             # what makes the numbers less certain (small validation, C at the grid's edge)
    layers: list[LayerResult]       # the result rows (each with the shared keys of `protocol.result_row`)
    method: str = "linear"          # "linear" or "knn" (as `protocol.method` and each row's `method`)


PROVENANCE_ATTRS = ("igpt_version", "model", "model_sha256", "model_config", "site", "pool", "sos",
                    "compute_dtype", "tokens_file", "tokens_sha256")


def _protocol(estimator, probe_kw: dict, device: str, shots=None, seeds: int = 5) -> dict:
    if estimator is None or type(estimator) is LinearProbe:
        classifier = "multinomial logistic regression, L2, lbfgs (C * sum CE + 0.5 ||W||^2)"
        tol = estimator.tol if estimator is not None else TOL if probe_kw.get("tol") is None else probe_kw["tol"]
    else:
        classifier, tol = repr(estimator), estimator.get_params().get("tol")
    params = estimator.get_params() if estimator is not None else {}
    return {
        "method": "linear",
        "solver": params.get("solver"),
        "device": device,
        "ci_method": "wilson (95 %)",
        "standardize": "train statistics only",
        "classifier": classifier,
        "c_grid": list(probe_kw.get("grid", COARSE_GRID)),
        "c_refine_decades": list(probe_kw.get("refine", REFINE_STEPS)),
        "val_fraction": VAL_FRACTION,
        "tol": tol,
        "selection": (f"stratified {VAL_FRACTION:g} validation split (max accuracy, ties: smaller C) from "
                      f"{KFOLD_BELOW} training rows, else stratified k-fold (max accuracy, ties: lower validation "
                      f"loss, then smaller C); a best C at the grid's edge extends it up to {EXTEND_DECADES} "
                      "decades; refit on full train"),
        **({} if shots is None else {"few_shot": {
            "shots": list(shots), "seeds": int(seeds),
            "draws": "n rows per class without replacement, numpy default_rng([seed, n, draw])",
            "selection": (f"C by stratified min({KFOLDS}, n)-fold cross-validation within the shots; 1 shot: C "
                          f"fixed at {ONE_SHOT_C:g}"),
            "std": "sample standard deviation over seeds (ddof 1)"}}),
    }


def _knn_protocol(k: int, vote: str, temperature: float, device: str) -> dict:
    return {
        "method": "knn",
        "device": device,
        "ci_method": "wilson (95 %)",
        "similarity": "cosine (L2-normalised features)",
        "k": int(k),
        "vote": vote,
        "temperature": float(temperature) if vote == "weighted" else None,
        "classifier": (f"{k}-NN, vote weighted by exp(similarity / {temperature:g}) (DINO)" if vote == "weighted"
                       else f"{k}-NN, majority vote (ties: the smaller class id)"),
        "selection": "none (k is given); val_acc: leave-one-out k-NN accuracy on the training rows",
    }


def report_warnings(results: Sequence[LayerResult]) -> list[str]:
    """Sentences for what makes a report's numbers less certain: few rows to choose C on, a C at the
    edge of the grid."""
    out = []
    kfold = sorted({r.selection for r in results if r.selection not in ("holdout", "leave-one-out")})
    if kfold:
        n = min(r.n_train for r in results)
        out.append(f"C chosen by stratified {'/'.join(kfold)} cross-validation over the {n} training rows "
                   f"(fewer than {KFOLD_BELOW}: a 10 % validation split would be too small)")
    few = [r for r in results if r.n_val < FEW_VAL_ROWS and r.method == "linear"]
    if few:
        out.append(f"only {min(r.n_val for r in few)} rows validated C: its choice, and the probabilities, are "
                   f"uncertain (at least {FEW_VAL_ROWS} labelled training rows make it meaningful)")
    edge = [r.layer for r in results if r.c_at_edge]
    if edge:
        out.append(f"layer {format_layers(edge)}: the chosen C is at the edge of the grid even after extending it "
                   f"{EXTEND_DECADES} decades; the best C may lie beyond it")
    return out


def fit_device(estimator, device) -> str:
    """Where `estimator`'s fits actually run: the torch solver's device, else the CPU (the scipy and
    scikit-learn solvers, and any other scikit-learn classifier, are numpy code)."""
    if isinstance(estimator, LinearProbe) and estimator.solver == "torch":
        return str(device)
    return "cpu"


# ---------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------

def probe_files(train: str | Path, test: str | Path | None = None, layers: Sequence[str] | None = None, *,
                test_fraction: float = 0.2, seed: int = 0, jobs: int = 1, estimator=None,
                on_progress: OnProgress | None = None, solver: str = "auto", device: str = "auto",
                max_memory: int | str | None = None, save_probes: str | Path | None = None,
                overwrite: bool = False, dist: DistContext | None = None, method: str = "linear",
                k: int = KNN_K, knn_vote: str = "weighted", knn_temperature: float = KNN_TEMPERATURE,
                concat: bool = False, shots: Sequence[int] | None = None, seeds: int = 5,
                **probe_kw) -> ProbeReport:
    """Probe every requested layer of a features file.

    Without `test`, a stratified `test_fraction` of `train` is held out as the test set.
    With `test`, the layers probed are those both files hold (`layers` selects among them).
    Reads one layer at a time (`jobs` layers at a time when jobs > 1). `estimator` and
    `probe_kw` (grid, refine, tol, max_iter) go to `probe_layer`; without `estimator`, a
    `LinearProbe` with `solver` ("torch" | "scipy" | "sklearn"; "auto": torch, the fastest on
    CPU and GPU and the one that streams) on `device` (auto | cpu | cuda).
    `max_memory` (bytes, or "512M", "2G"): a layer that does not fit is streamed from the
    file in row chunks (torch solver; for k-NN, the training rows in blocks, `knn.plan_knn_memory`). `save_probes`: write each layer's chosen classifier
    there (`store.save_probes`; never one of the inputs). Progress: one "probe" event per
    finished layer, its `LayerResult` as the event's `result`.

    `dist` (a `DistContext` with world size > 1, e.g. under torchrun): the layers are spread
    over the ranks (each on its own GPU where there are GPUs), every rank must run the same
    settings, and every rank returns the whole report, equal to one process's; only rank 0
    writes `save_probes`.

    `concat`: ONE probe on the concatenation of the selected layers (at least two), in their order,
    reported as one `LayerResult` (`layer`: the first, `layers`: all). The linear probe standardises
    each feature, i.e. each layer on its own; k-NN L2-normalises each layer before concatenating
    (each layer weighs the same in the cosine). The layers are held in memory (no streaming).

    `shots` (e.g. [1, 5, 10]): also few-shot linear probes on each layer (`fewshot.few_shot`: that
    many training rows per class, `seeds` draws each, mean and std of test accuracy), in each
    result's `few_shot`. Layers are then held in memory (no streaming).

    `method` "knn": instead of the linear probe, the k-NN evaluation of each layer (`knn.knn_layer`:
    `k` neighbours, `knn_vote` "weighted" (DINO, `knn_temperature`) or "majority", on `device`).
    """
    ctx = dist if dist is not None and dist.active else None
    check_positive("jobs", jobs, allow_none=False)
    check_seed(seed)
    max_memory = parse_bytes(max_memory)
    if estimator is None:
        solver = check_choice("solver", solver, PROBE_SOLVERS)
    method = check_choice("method", method, PROBE_METHODS)
    if method == "knn":
        check_knn(k, knn_vote, knn_temperature)
        if save_probes is not None:
            raise ParameterError("save_probes", str(save_probes), "saved probes are linear probes; k-NN has none "
                                 "(it keeps the training set)")
        if estimator is not None:
            raise ParameterError("estimator", repr(estimator), "is for the linear probe, not method 'knn'")
    if shots is not None:
        shots = check_shots(shots, seeds)
        if method == "knn":
            raise ParameterError("shots", ",".join(map(str, shots)), "few-shot probes are linear (not method 'knn')")
    dev = resolve_probe_device(device)       # a missing GPU is refused before any work
    if ctx is not None:
        dev = ctx.device_for(dev)            # cuda -> this rank's GPU
        ctx.init(dev)
        ctx.agree(dict(train=str(train), test=None if test is None else str(test), layers=layers,
                       test_fraction=test_fraction, seed=seed, jobs=jobs, solver=solver, device=str(device),
                       max_memory=max_memory, save_probes=None if save_probes is None else str(save_probes),
                       overwrite=overwrite, estimator=repr(estimator), method=method, k=k, knn_vote=knn_vote,
                       knn_temperature=knn_temperature, concat=concat, shots=shots, seeds=seeds, probe_kw=repr(sorted(probe_kw.items()))),
                  "probe settings")
    if estimator is None:
        tol, max_iter = probe_kw.pop("tol", None), probe_kw.pop("max_iter", None)
        estimator = LinearProbe(tol=TOL if tol is None else tol, max_iter=MAX_ITER if max_iter is None else max_iter,
                                solver="torch" if solver == "auto" and dev.type == "cuda" else
                                DEFAULT_SOLVER if solver == "auto" else solver, device=str(dev))
        auto = solver == "auto"
    else:
        auto = False
    run = (lambda fn: ctx.run_checked(fn)) if ctx is not None else (lambda fn: fn())
    plan = run(lambda: _plan(train, test, layers, test_fraction=test_fraction, seed=seed, estimator=estimator,
                             auto=auto, max_memory=max_memory, save_probes=save_probes, overwrite=overwrite,
                             n_c=len(probe_kw.get("grid", COARSE_GRID)), method=method, k=k))
    tr, te, sel = plan["train"], plan["test"], plan["layers"]
    if shots is not None:
        check_shots(shots, seeds, plan["y_train"], tr.class_names)
    if concat and len(sel) < 2:
        raise ParameterError("concat", True, f"needs at least two layers (layers={format_layers(sel)}); "
                             "name them, e.g. layers=10,12,14")
    tr_idx, te_idx, y_train, y_test, chunks = (plan[k] for k in ("tr_idx", "te_idx", "y_train", "y_test", "chunks"))
    mine = sel[ctx.rank::ctx.world_size] if ctx is not None else sel
    if concat:   # one probe: rank 0 fits it
        mine = sel[:1] if ctx is None or ctx.is_main else []

    progress = Reporter(on_progress, "probe", total=1 if concat else len(sel), unit="layer")
    progress_lock = threading.Lock()  # layers finish on worker threads when jobs > 1

    def run_concat() -> LayerResult:
        parts_tr, parts_te = [], []
        for l in sel:
            X = _read_layer(tr, l)
            Xtr, Xte = (X[tr_idx], X[te_idx]) if te is None else (X, _read_layer(te, l))
            if method == "knn":
                Xtr, Xte = _unit_rows(Xtr), _unit_rows(Xte)
            parts_tr.append(Xtr)
            parts_te.append(Xte)
            del X
        Xtr, Xte = np.concatenate(parts_tr, axis=1), np.concatenate(parts_te, axis=1)
        del parts_tr, parts_te
        if method == "knn":
            r = knn_layer(Xtr, y_train, Xte, y_test, k=k, vote=knn_vote, temperature=knn_temperature,
                          device=str(dev), layer=sel[0], class_names=tr.class_names)
        else:
            r = probe_layer(Xtr, y_train, Xte, y_test, seed, estimator=estimator, layer=sel[0],
                            class_names=tr.class_names, **probe_kw)
        r.layers = list(sel)
        if r.classifier is not None:
            r.classifier["layers"] = list(sel)
        return finish(with_few_shot(r, Xtr, Xte))

    def with_few_shot(r: LayerResult, Xtr, Xte) -> LayerResult:
        if shots is not None:
            r.few_shot = few_shot(Xtr, y_train, Xte, y_test, shots, seeds, seed, estimator=estimator,
                                  class_names=tr.class_names, **probe_kw)
        return r

    def run_layer(l: int) -> LayerResult:
        if concat:
            return run_concat()
        if method == "knn":
            mem = chunks[l]
            if mem is not None and mem.train_rows is not None:   # streamed: the rows stay in the file
                X = H5Rows(tr.path, l, mem.train_rows)
                Xtr, Xte = (X.take(tr_idx), X.take(te_idx)) if te is None else \
                    (X, H5Rows(te.path, l, mem.query_rows))
            else:
                X = _read_layer(tr, l)
                Xtr, Xte = (X[tr_idx], X[te_idx]) if te is None else (X, _read_layer(te, l))
                del X
            return finish(knn_layer(Xtr, y_train, Xte, y_test, k=k, vote=knn_vote, temperature=knn_temperature,
                                    device=str(dev), layer=l, class_names=tr.class_names,
                                    chunk_rows=None if mem is None else mem.query_rows))
        if chunks[l] is not None and shots is None:       # out of core: the rows stay in the file
            X = H5Rows(tr.path, l, chunks[l])
            X, Xte = (X.take(tr_idx), X.take(te_idx)) if te is None else (X, H5Rows(te.path, l, chunks[l]))
            return finish(probe_layer(X, y_train, Xte, y_test, seed, estimator=estimator, layer=l,
                                      class_names=tr.class_names, **probe_kw))
        X = _read_layer(tr, l)
        if te is None:
            Xtr, Xte = X[tr_idx], X[te_idx]
            del X
        else:
            Xtr, Xte = X, _read_layer(te, l)
        return finish(with_few_shot(probe_layer(Xtr, y_train, Xte, y_test, seed, estimator=estimator, layer=l,
                                                class_names=tr.class_names, **probe_kw), Xtr, Xte))

    def finish(r: LayerResult) -> LayerResult:
        r.pool = tr.attrs.get("pool")   # the report's rows carry it (`result_row`)
        with progress_lock:
            progress.advance(1, info=f"layer {r.layer}: test {r.test_acc:.1%}", result=r)
        return r

    def run_mine() -> list[LayerResult]:
        groups = layer_groups(mine, len(y_train) + len(y_test), tr.dims, max_memory) if jobs == 1 and \
            method == "linear" and not concat and shots is None and fits_layers_at_once(estimator) \
            and all(chunks[l] is None for l in mine) else None
        if groups is not None:  # several layers in memory at once: one batched optimisation per group
            return [finish(r) for g in groups
                    for r in probe_layer_group(tr, te, g, tr_idx, te_idx, y_train, y_test, seed, estimator, probe_kw)]
        if jobs == 1:
            return [run_layer(l) for l in mine]
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1), ThreadPoolExecutor(max_workers=jobs) as ex:
            return list(ex.map(run_layer, mine))

    progress.start()
    t0 = time.perf_counter()
    results = run(run_mine)
    used = str(dev) if method == "knn" else fit_device(estimator, dev)
    if ctx is not None:   # every rank gets every layer's result (rank 0 reports the others' as they arrive)
        everyone = ctx.gather((used, results))
        for r in (r for rank, (_, rs) in enumerate(everyone) if rank != ctx.rank for r in rs):
            finish(r)
        by_layer = {r.layer: r for _, rs in everyone for r in rs}
        results = [by_layer[l] for l in (sel[:1] if concat else sel)]
        used = ",".join(dict.fromkeys(d for d, _ in everyone))
    wall = time.perf_counter() - t0

    best = max(results, key=lambda r: (r.val_acc, r.test_acc, -r.layer)) if results else None
    best_test = max(results, key=lambda r: (r.test_acc, -r.layer)) if results else None
    report = ProbeReport(
        train=str(tr.path),
        test=str(te.path) if te is not None else None,
        test_mode="file" if te is not None else "held_out",
        test_fraction=None if te is not None else test_fraction,
        seed=seed,
        **{k: tr.attrs.get(k) for k in PROVENANCE_ATTRS},
        test_tokens_file=te.attrs.get("tokens_file") if te is not None else None,
        class_names=tr.class_names,
        protocol=_knn_protocol(k, knn_vote, knn_temperature, used) if method == "knn" else
        _protocol(estimator, probe_kw, used, shots, seeds),
        best_layer=best.layer if best else None,
        best_test_layer=best_test.layer if best_test else None,
        not_converged_fits=int(sum(r.not_converged_fits for r in results)),
        seconds=round(wall, 3),
        world_size=ctx.world_size if ctx is not None else 1,
        warnings=report_warnings(results),
        layers=results,
        method=method,
    )
    if save_probes is not None and (ctx is None or ctx.is_main):
        from .store import save_probes as write_probes

        write_probes(report, save_probes, overwrite=overwrite, device=used, world_size=report.world_size)
    return report


def _plan(train, test, layers, *, test_fraction: float, seed: int, estimator, auto: bool, max_memory,
          save_probes, overwrite: bool, n_c: int, method: str = "linear", k: int = KNN_K) -> dict:
    """Every check before any fit: outputs, inputs, layers, labels, splits and the memory plan."""
    from ..outputs import check_distinct, check_output_path

    check_distinct({"save_probes": save_probes}, {"train": train, "test": test})
    if save_probes is not None:
        check_output_path(save_probes, overwrite)
    if test is None and not 0 < test_fraction < 1:
        raise ParameterError("test_fraction", test_fraction, "must be between 0 and 1")
    tr = inspect_features(train)
    te = inspect_features(test) if test is not None else None
    if te is None:
        sel = parse_layers(layers, tr.layers, where=str(tr.path))
    else:
        both = [l for l in tr.layers if l in te.dims]
        if not both:
            check_compatible(tr, te)   # says which file lacks what
        if not layers and tr.layers != te.layers:
            raise InputError(f"{te.path}: has layers {format_layers(te.layers)}, {tr.path} has layers "
                             f"{format_layers(tr.layers)}; name the layers to probe, e.g. layers={format_layers(both)} "
                             "(the layers both files hold)")
        sel = parse_layers(layers, both, where=f"{tr.path} with {te.path} (the layers both hold)")
        check_compatible(tr, te, sel)

    if te is None:
        check_labels(tr.labels, f"{tr.path}", tr.class_names)
        tr_idx, te_idx = stratified_split(tr.labels, test_fraction, seed, min_rest_per_class=2,
                                          what=str(tr.path), split="test")
        y_train, y_test = tr.labels[tr_idx], tr.labels[te_idx]
    else:
        tr_idx = te_idx = None
        y_train, y_test = tr.labels, te.labels
    check_labels(y_train, f"{tr.path}: training split" if te is None else f"{tr.path}", tr.class_names)

    # layers that do not fit in max_memory are streamed (decided, and a too small cap refused, before any fit)
    n_rows = len(y_train) + len(y_test)
    if method == "knn":   # k-NN: a `KnnMemory` per layer (None: no cap)
        chunks = {l: plan_knn_memory(max_memory, len(y_train), len(y_test), tr.dims[l], k, l) for l in sel}
        return dict(train=tr, test=te, layers=sel, tr_idx=tr_idx, te_idx=te_idx, y_train=y_train, y_test=y_test,
                    chunks=chunks)
    chunks = {l: plan_memory(max_memory, n_rows, tr.dims[l], len(np.unique(y_train)), n_c, l) for l in sel}
    if any(c is not None for c in chunks.values()) and auto:
        estimator.set_params(solver="torch")
    if any(c is not None for c in chunks.values()) and getattr(estimator, "solver", None) != "torch":
        raise ParameterError("max_memory", max_memory, "streaming layers from the file needs solver 'torch'")
    return dict(train=tr, test=te, layers=sel, tr_idx=tr_idx, te_idx=te_idx, y_train=y_train, y_test=y_test,
                chunks=chunks)
