"""Linear probes on iGPT features: per-layer accuracy, the paper's central measurement.

Layers of this package, each importing only the ones before it:

- `estimator`: `LinearProbe`, a scikit-learn classifier with exactly scikit-learn's
  multinomial lbfgs logistic-regression objective, several times faster;
- `protocol`: standardisation, stratified splits, the C search (a 10 % hold-out, or
  stratified k-fold on small data; the grid extended past an edge) and `probe_layer`, the
  whole protocol on one layer's arrays;
- `runner`: `probe_files`, the stage on features files, returning a `ProbeReport` (under
  torchrun the layers are spread over the ranks);
- `knn`: the k-NN evaluation (cosine similarity, DINO's weighted or a majority vote);
- `report`: the report as CSV (JSON is `ProbeReport.to_json`);
- `predictions`: what `igpt predict` reports and writes, for probes and fine-tuned models alike;
- `torch_solver` (every C at once, CPU/CUDA), `stream` (layers read from HDF5 in chunks),
  `store` (saved probes, validated on read, `predict_file`).
"""
from __future__ import annotations

from .estimator import MAX_ITER, TOL, LinearProbe
from .protocol import (COARSE_GRID, EXTEND_DECADES, KFOLD_BELOW, REFINE_STEPS, RESULT_KEYS, VAL_FRACTION, CSearch,
                       LayerResult, choose_c, probe_layer, probe_layers, result_row, search_c, standardize,
                       stratified_split, wilson_interval)
from .knn import KNN_K, KNN_TEMPERATURE, knn_layer, knn_predict, knn_scores
from .report import write_csv
from .runner import FeatureSource, ProbeReport, check_compatible, inspect_features, probe_files
from .store import PredictionReport, load_probes, predict_file, save_probes

__all__ = [
    "LinearProbe", "TOL", "MAX_ITER",
    "probe_layer", "probe_layers", "LayerResult", "standardize", "stratified_split", "search_c", "CSearch",
    "COARSE_GRID", "REFINE_STEPS", "VAL_FRACTION", "KFOLD_BELOW", "EXTEND_DECADES", "choose_c",
    "RESULT_KEYS", "result_row", "wilson_interval",
    "probe_files", "ProbeReport", "FeatureSource", "inspect_features", "check_compatible",
    "knn_layer", "knn_predict", "knn_scores", "KNN_K", "KNN_TEMPERATURE",
    "write_csv", "save_probes", "load_probes", "predict_file", "PredictionReport",
]
