"""`run_sweep`: generative loss and linear-probe accuracy of every checkpoint of a series.

For each checkpoint (`checkpoints.expand_checkpoints`), in `OUT/<family>/<name>/`:

    score.h5        per-image loss on the `score_on` tokens (`generate.score_file`)
    train.h5        features of the train tokens (`extract.extract_features`)
    test.h5         features of the test tokens
    result.json     the checkpoint's `CheckpointResult`, written atomically, last

then `OUT/sweep.json` (the `SweepResult`) and `OUT/sweep.csv` (`report.write_csv`).

Resumable: a checkpoint whose result.json exists (for the same inputs: the tokens files'
SHA-256, the model weights' SHA-256, the layers and the probe seed) is not recomputed;
an interrupted one resumes its score and extract files where they stopped (each stage's
own partial files) and keeps the ones already complete. A result.json of other inputs is
refused (`restart=True` recomputes it). The whole sweep holds a lock on OUT.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from ..errors import InputError, check_positive
from ..formats import sha256_file
from ..jsonfile import read_json
from ..seeds import check_seed
from ..layers import parse_layers
from ..model import find_weights, read_config, resolve_model_dir
from ..outputs import atomic_output, output_lock
from ..progress import OnProgress, Reporter
from ..provenance import provenance
from ..results import Result
from .checkpoints import Checkpoint, expand_checkpoints
from .stats import Correlation, correlate

RESULT_FILE = "result.json"
FORMAT, FORMAT_VERSION = "igpt-sweep", 1


@dataclass
class LayerAccuracy(Result):
    layer: int
    val_acc: float
    test_acc: float
    c: float  # the inverse regularisation strength chosen on validation


@dataclass
class CheckpointResult(Result):
    """One point of the sweep: a checkpoint's loss and its probe curve."""
    family: str
    name: str
    checkpoint: str  # as given
    model_dir: str  # the Hugging Face directory it resolved to
    step: int | None
    n_params: int
    loss_nats: float  # mean next-token loss on the score_on tokens, nats per token (`igpt score`)
    loss_bits: float
    best_layer: int  # by validation accuracy, as `igpt probe` chooses
    best_val_acc: float
    best_test_acc: float
    layers: list[LayerAccuracy]
    seconds: float  # spent computing it (summed over interrupted runs is not tracked: this run's)
    reused: bool = False  # read back from an earlier run's result.json


@dataclass
class SweepResult(Result):
    out: str
    train: str
    test: str
    score_on: str
    layers: list[int] | None  # None: every layer of each model
    checkpoints: list[CheckpointResult]
    correlations: list[Correlation]  # one per family with >= 1 checkpoint, then "all"
    computed: int  # checkpoints computed by this call
    reused: int  # checkpoints read back from result.json
    seconds: float
    files: dict = field(default_factory=dict)


def _layer_spec(layers) -> str | int | list | None:
    if layers is None or isinstance(layers, (str, int)):
        return layers
    return list(layers)


def _check_tokens(param: str, path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: tokens file not found ({param})")
    return p


def _read_result(path: Path) -> dict | None:
    try:
        return read_json(path, "sweep result")
    except (OSError, ValueError):
        return None  # torn or unreadable: recomputed (it is written atomically, so this is rare)


def _scored(path: Path) -> float:
    """Mean nats per token of a complete scores file (as `score_file` computes it)."""
    with h5py.File(path, "r") as f:
        return float(np.mean(f["nats_per_token"][:]))


def _params(cfg) -> int:
    from ..train.config import n_params

    return n_params(cfg)


def run_sweep(
    checkpoints: Sequence[str | Path] | str | Path,
    train: str | Path,
    test: str | Path,
    out: str | Path = "sweep",
    *,
    score_on: str | Path | None = None,
    layers: str | int | Sequence[str | int] | None = None,
    seed: int = 0,
    jobs: int = 1,
    batch_size: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    restart: bool = False,
    on_progress: OnProgress | None = None,
) -> SweepResult:
    """Score, extract and probe every checkpoint; see the module docstring.

    `checkpoints`: directories, training runs (their `step-*` series), TensorFlow prefixes
    or globs, optionally as FAMILY=ARG (`checkpoints.py`). `train`/`test`: tokens files
    the probe is fitted / tested on (C is chosen on a validation split of train, as
    `igpt probe` does; `seed` is its seed). `score_on`: the tokens the loss is measured on
    (default: `test`). `layers`: the layers extracted and probed (default all). `jobs`:
    layers probed at once. `batch_size`, `device`, `dtype`: for scoring and extraction.
    Progress: the stages' own events, and one log line per finished checkpoint.
    """
    t0 = time.perf_counter()
    train, test = _check_tokens("train", train), _check_tokens("test", test)
    score_on = _check_tokens("score_on", score_on) if score_on is not None else test
    check_positive("jobs", jobs, allow_none=False)
    check_positive("batch_size", batch_size)
    check_seed(seed)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    cks = expand_checkpoints(checkpoints)
    spec = _layer_spec(layers)
    models = []
    for ck in cks:  # every checkpoint loads and has the layers, before any work
        d = resolve_model_dir(ck.path, on_progress=on_progress)
        cfg = read_config(d)
        parse_layers(spec, range(cfg.n_layer + 1), where=str(ck.path))
        models.append((d, cfg))
    out.mkdir(parents=True, exist_ok=True)
    rep = Reporter(on_progress, "sweep")
    with output_lock(out):
        inputs = {"train_sha256": sha256_file(train), "test_sha256": sha256_file(test),
                  "score_on_sha256": sha256_file(score_on), "layers": spec, "seed": seed}
        results, computed = [], 0
        for i, (ck, (model_dir, cfg)) in enumerate(zip(cks, models)):
            r = _one(ck, model_dir, cfg, out, train, test, score_on, inputs, spec, seed=seed, jobs=jobs,
                     batch_size=batch_size, device=device, dtype=dtype, restart=restart, on_progress=on_progress)
            computed += not r.reused
            results.append(r)
            rep.log(f"[{i + 1}/{len(cks)}] {ck.family}/{ck.name}: loss {r.loss_nats:.4f} nats/token, best layer "
                    f"{r.best_layer} test {r.best_test_acc:.2%}" + (" (done before)" if r.reused else ""))
        result = SweepResult(
            out=str(out), train=str(train), test=str(test), score_on=str(score_on),
            layers=None if spec is None else sorted({l for r in results for l in (x.layer for x in r.layers)}),
            checkpoints=results, correlations=correlations(results), computed=computed,
            reused=len(results) - computed, seconds=round(time.perf_counter() - t0, 3))
        from .report import write_csv

        result.files = {"json": str(out / "sweep.json"), "csv": str(out / "sweep.csv")}
        write_csv(result, out / "sweep.csv")
        doc = dict(result.to_dict(), format=FORMAT, format_version=FORMAT_VERSION, provenance=provenance(device))
        with atomic_output(out / "sweep.json") as tmp:
            tmp.write_text(json.dumps(doc, indent=1) + "\n")
    return result


def correlations(results: Sequence[CheckpointResult]) -> list[Correlation]:
    """Loss vs best test accuracy, per family (in order) and over all checkpoints."""
    fams = list(dict.fromkeys(r.family for r in results))
    out = [correlate(f, [r.loss_nats for r in results if r.family == f],
                     [r.best_test_acc for r in results if r.family == f]) for f in fams]
    if len(fams) > 1:
        out.append(correlate("all", [r.loss_nats for r in results], [r.best_test_acc for r in results]))
    return out


def _one(ck: Checkpoint, model_dir: Path, cfg, out: Path, train: Path, test: Path, score_on: Path, inputs: dict,
         spec, *, seed: int, jobs: int, batch_size, device: str, dtype: str, restart: bool,
         on_progress) -> CheckpointResult:
    """One checkpoint: its result.json when done before with the same inputs, else computed and written."""
    from ..extract import extract_features
    from ..generate import score_file
    from ..probe import probe_files

    t0 = time.perf_counter()
    ckdir = out / ck.family / ck.name
    identity = dict(inputs, model_sha256=sha256_file(find_weights(model_dir)))
    done = _read_result(ckdir / RESULT_FILE) if (ckdir / RESULT_FILE).is_file() else None
    if done is not None and not restart:
        if done.get("identity") != identity:
            what = [k for k in identity if done.get("identity", {}).get(k) != identity[k]]
            raise InputError(f"{ckdir}: holds the result of a sweep with other inputs ({', '.join(what)} "
                             "differ); use another output directory, or restart=True to recompute it")
        return _result_from(done["result"], reused=True)
    if restart and ckdir.exists():
        shutil.rmtree(ckdir)
    ckdir.mkdir(parents=True, exist_ok=True)
    stage_kw = dict(batch_size=batch_size, device=device, dtype=dtype, on_progress=on_progress)
    score_path = ckdir / "score.h5"
    if not score_path.is_file():
        score_file(score_on, model_dir, score_path, **stage_kw)
    loss = _scored(score_path)
    feats = {}
    for split, tokens in (("train", train), ("test", test)):
        feats[split] = ckdir / f"{split}.h5"
        if not feats[split].is_file():
            extract_features(tokens, model_dir, spec, feats[split], **stage_kw)
    rep = probe_files(feats["train"], feats["test"], seed=seed, jobs=jobs, on_progress=on_progress)
    best = next(r for r in rep.layers if r.layer == rep.best_layer)
    result = CheckpointResult(
        family=ck.family, name=ck.name, checkpoint=ck.path, model_dir=str(model_dir), step=ck.step,
        n_params=_params(cfg), loss_nats=loss, loss_bits=loss / math.log(2), best_layer=best.layer,
        best_val_acc=best.val_acc, best_test_acc=best.test_acc,
        layers=[LayerAccuracy(r.layer, r.val_acc, r.test_acc, r.c) for r in rep.layers],
        seconds=round(time.perf_counter() - t0, 3))
    with atomic_output(ckdir / RESULT_FILE) as tmp:
        tmp.write_text(json.dumps({"format": FORMAT + "-checkpoint", "format_version": FORMAT_VERSION,
                                   "identity": identity, "result": result.to_dict(),
                                   "provenance": provenance(device)}, indent=1) + "\n")
    return result


def _result_from(d: dict, reused: bool) -> CheckpointResult:
    d = dict(d, layers=[LayerAccuracy(**x) for x in d["layers"]], reused=reused)
    return CheckpointResult(**d)
