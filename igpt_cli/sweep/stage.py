"""`run_sweep`: generative loss and probe accuracy of every checkpoint of a series.

For each checkpoint (`checkpoints.expand_checkpoints`), in `OUT/<family>/<name>/`:

    score.h5        per-image loss on the `score_on` tokens (`generate.score_file`)
    train.h5        features of the train tokens (`extract.extract_features`)
    test.h5         features of the test tokens
    result.json     the checkpoint's `CheckpointResult`, written atomically, last

then `OUT/sweep.json` (the `SweepResult`) and `OUT/sweep.csv` (`report.write_csv`).

The probe is `igpt probe`'s: the linear probe (C chosen on a validation split of train), or with
`method="knn"` the k-NN evaluation (`probe.knn`: `k`, `knn_vote`, `knn_temperature`; its
validation accuracy is leave-one-out on train); the settings are recorded in sweep.json
(`probe`) and in each result.json's identity.

Every checkpoint and input is checked before anything is computed (each checkpoint loads,
can score and has the layers; the tokens files are valid, labelled and fit every model;
no output is one of the inputs; no family or name leaves OUT).

Resumable: a checkpoint whose result.json exists (for the same inputs: the tokens files'
SHA-256, the model weights' SHA-256, the layers, the probe seed and the probe's settings: a linear
result is never reused for k-NN, nor one k for another) is not recomputed;
an interrupted one resumes its score and extract files where they stopped (each stage's
own partial files) and keeps the ones already complete (when they record this
checkpoint's weights and tokens). A result.json of other inputs is refused
(`restart=True` recomputes it); one whose recorded digest does not match (edited or
damaged) is recomputed. The whole sweep holds a lock on OUT.

Under torchrun (`dist`), the checkpoints are spread over the ranks (each on its own GPU
where there are GPUs); each rank runs its checkpoints' score, extract and probe as one
process would, and rank 0 gathers the results and writes sweep.json and sweep.csv: the
same result as one process.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from .. import formats
from ..choices import KNN_K, KNN_TEMPERATURE
from ..outputs import atomic_output, output_lock
from ..progress import OnProgress, Reporter
from ..provenance import provenance
from ..results import Result
from .plan import (RESULT_FILE, Planned, Tokens, plan_sweep, probe_settings, read_result, result_digest,
                   stored_identity)
from .stats import Correlation, correlate

FORMAT, FORMAT_VERSION = formats.SWEEP_FORMAT, formats.SWEEP_VERSION


@dataclass
class LayerAccuracy(Result):
    layer: int
    val_acc: float
    test_acc: float
    c: float | None  # the inverse regularisation strength chosen on validation (None: k-NN)


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
    probe: dict  # the probe's settings (`plan.probe_settings`): method, and k-NN's k, vote, temperature
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


def _scored(path: Path) -> float:
    """Mean nats per token of a complete scores file (as `score_file` computes it)."""
    with h5py.File(path, "r") as f:
        return float(np.mean(f["nats_per_token"][:]))


def _params(cfg) -> int:
    from ..train.config import n_params

    return n_params(cfg)


def _belongs(path: Path, model_sha256: str, tokens: Tokens) -> bool:
    """Whether a stage file left in a checkpoint's folder was computed from these weights and tokens."""
    try:
        with h5py.File(path, "r") as f:
            a = formats.read_attrs(f)
    except OSError:
        return False
    return a.get("model_sha256") == model_sha256 and a.get("tokens_sha256", tokens.sha256) == tokens.sha256


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
    dist=None,
    method: str = "linear",
    k: int = KNN_K,
    knn_vote: str = "weighted",
    knn_temperature: float = KNN_TEMPERATURE,
) -> SweepResult:
    """Score, extract and probe every checkpoint; see the module docstring.

    `checkpoints`: directories, training runs (their `step-*` series), TensorFlow prefixes
    or globs, optionally as FAMILY=ARG (`checkpoints.py`). `train`/`test`: tokens files
    the probe is fitted / tested on (C is chosen on a validation split of train, as
    `igpt probe` does; `seed` is its seed). `score_on`: the tokens the loss is measured on
    (default: `test`). `layers`: the layers extracted and probed (default all). `jobs`:
    layers probed at once. `batch_size`, `device`, `dtype`: for scoring, extraction and
    the probe (which runs on the same device, or on the CPU when that is mps).
    `method`: "linear" (the linear probe) or "knn" (`igpt probe --method knn`: `k` neighbours,
    `knn_vote` "weighted" with `knn_temperature`, or "majority"); recorded in the result.
    `dist` (a `distributed.DistContext` with world size > 1, e.g. under torchrun): the
    checkpoints are spread over the ranks; every rank returns the whole result, rank 0
    alone writes sweep.json and sweep.csv.
    Progress: the stages' own events, and one log line per finished checkpoint.
    """
    from ..runtime import resolve_device

    t0 = time.perf_counter()
    out = Path(out)
    spec = _layer_spec(layers)
    probe = probe_settings(method, k, knn_vote, knn_temperature)
    ctx = dist if dist is not None and dist.active else None
    dev = resolve_device(device)
    if ctx is not None:
        dev = ctx.device_for(dev)   # cuda -> this rank's GPU
        ctx.init(dev)
        ctx.agree(dict(checkpoints=[str(c) for c in ([checkpoints] if isinstance(checkpoints, (str, Path))
                                                       else checkpoints)],
                       train=str(train), test=str(test), out=str(out), score_on=None if score_on is None
                       else str(score_on), layers=spec, seed=seed, jobs=jobs, batch_size=batch_size,
                       device=str(device), dtype=dtype, restart=restart, probe=probe), "sweep settings")
    run = ctx.run_checked if ctx is not None else (lambda fn: fn())
    main = ctx is None or ctx.is_main
    rep = Reporter(on_progress, "sweep")
    with contextlib.ExitStack() as stack:
        def checked(now: bool):
            if not now:
                return None
            plan = plan_sweep(checkpoints, train, test, out, score_on, spec, jobs=jobs, batch_size=batch_size,
                         restart=restart, seed=seed, on_progress=on_progress, probe=probe)
            if main:
                out.mkdir(parents=True, exist_ok=True)
                stack.enter_context(output_lock(out))
            return plan

        # rank 0 checks first (and converts a TensorFlow checkpoint into the cache once), then the others
        first = run(lambda: checked(main))
        second = run(lambda: checked(not main)) if ctx is not None else None
        planned, inputs, tokens = first if first is not None else second
        mine = [i for i in range(len(planned)) if ctx is None or i % ctx.world_size == ctx.rank]

        def say(i: int, r: CheckpointResult) -> None:
            rep.log(f"[{i + 1}/{len(planned)}] {r.family}/{r.name}: loss {r.loss_nats:.4f} nats/token, best layer "
                    f"{r.best_layer} test {r.best_test_acc:.2%}" + (" (done before)" if r.reused else ""))

        def compute() -> list[tuple[int, CheckpointResult]]:
            done = []
            for i in mine:
                r = _one(planned[i], out, tokens, inputs, spec, seed=seed, jobs=jobs, batch_size=batch_size,
                         device=dev, dtype=dtype, restart=restart, on_progress=on_progress, rep=rep, probe=probe)
                say(i, r)
                done.append((i, r))
            return done

        done = run(compute)
        if ctx is not None:
            everyone = [x for part in ctx.gather(done) for x in part]
            for i, r in sorted(x for x in everyone if x[0] not in mine):
                say(i, r)
            done = sorted(everyone, key=lambda x: x[0])
        results = [r for _, r in done]
        computed = sum(not r.reused for r in results)
        result = SweepResult(
            out=str(out), train=str(tokens["train"].path), test=str(tokens["test"].path),
            score_on=str(tokens["score_on"].path),
            layers=None if spec is None else sorted({l for r in results for l in (x.layer for x in r.layers)}),
            probe=probe,
            checkpoints=results, correlations=correlations(results), computed=computed,
            reused=len(results) - computed, seconds=round(time.perf_counter() - t0, 3))
        from .report import write_csv

        result.files = {"json": str(out / "sweep.json"), "csv": str(out / "sweep.csv")}
        if main:
            write_csv(result, out / "sweep.csv")
            doc = dict(result.to_dict(), format=FORMAT, format_version=FORMAT_VERSION,
                       provenance=dict(provenance(str(dev)), world_size=ctx.world_size if ctx else 1))
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


def probe_device(dev) -> str:
    """The probe's device for the stages' device `dev`: the same one, or the CPU for mps (the probe runs
    on cpu or cuda)."""
    return str(dev) if dev.type in ("cpu", "cuda") else "cpu"


def _one(p: Planned, out: Path, tokens: dict[str, Tokens], inputs: dict, spec, *, seed: int, jobs: int,
         batch_size, device, dtype: str, restart: bool, on_progress, rep: Reporter,
         probe: dict | None = None) -> CheckpointResult:
    """One checkpoint: its result.json when done before with the same inputs, else computed and written."""
    from ..extract import extract_features
    from ..generate import score_file
    from ..probe import probe_files

    t0 = time.perf_counter()
    ck, model_dir, cfg, ckdir = p.ck, p.model_dir, p.cfg, p.ckdir
    identity = dict(inputs, model_sha256=p.model_sha256)
    if restart and ckdir.exists():
        shutil.rmtree(ckdir)
    elif (ckdir / RESULT_FILE).is_file():
        done = read_result(ckdir / RESULT_FILE)
        if done is not None and stored_identity(done) == identity:
            return _result_from(done["result"], reused=True)
        if done is None:
            rep.log(f"{ckdir / RESULT_FILE}: edited or damaged (its digest does not match); recomputing it")
    ckdir.mkdir(parents=True, exist_ok=True)
    stage_kw = dict(batch_size=batch_size, device=str(device), dtype=dtype, on_progress=on_progress)
    files = {"score_on": ckdir / "score.h5", "train": ckdir / "train.h5", "test": ckdir / "test.h5"}
    for split, path in files.items():   # a stage file of other weights or tokens is not reused
        if path.is_file() and not _belongs(path, p.model_sha256, tokens[split]):
            rep.log(f"{path}: computed from other weights or tokens; computing it again")
            path.unlink()
    if not files["score_on"].is_file():
        score_file(tokens["score_on"].path, model_dir, files["score_on"], **stage_kw)
    loss = _scored(files["score_on"])
    for split in ("train", "test"):
        if not files[split].is_file():
            extract_features(tokens[split].path, model_dir, spec, files[split], **stage_kw)
    settings = probe or {"method": "linear"}
    rep_ = probe_files(files["train"], files["test"], seed=seed, jobs=jobs, on_progress=on_progress,
                       device=probe_device(device), method=settings["method"], k=settings.get("k", KNN_K),
                       knn_vote=settings.get("knn_vote", "weighted"),
                       knn_temperature=settings.get("knn_temperature") or KNN_TEMPERATURE)
    best = next(r for r in rep_.layers if r.layer == rep_.best_layer)
    result = CheckpointResult(
        family=ck.family, name=ck.name, checkpoint=ck.path, model_dir=str(model_dir), step=ck.step,
        n_params=_params(cfg), loss_nats=loss, loss_bits=loss / math.log(2), best_layer=best.layer,
        best_val_acc=best.val_acc, best_test_acc=best.test_acc,
        layers=[LayerAccuracy(r.layer, r.val_acc, r.test_acc, r.c) for r in rep_.layers],
        seconds=round(time.perf_counter() - t0, 3))
    body = result.to_dict()
    with atomic_output(ckdir / RESULT_FILE) as tmp:
        tmp.write_text(json.dumps({"format": FORMAT + "-checkpoint", "format_version": FORMAT_VERSION,
                                   "identity": identity, "result": body, "digest": result_digest(identity, body),
                                   "provenance": dict(provenance(str(device)), probe_device=rep_.protocol["device"])},
                                  indent=1) + "\n")
    return result


def _result_from(d: dict, reused: bool) -> CheckpointResult:
    d = dict(d, layers=[LayerAccuracy(**x) for x in d["layers"]], reused=reused)
    return CheckpointResult(**d)
