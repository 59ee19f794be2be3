"""`run_sweep`: generative loss and linear-probe accuracy of every checkpoint of a series.

For each checkpoint (`checkpoints.expand_checkpoints`), in `OUT/<family>/<name>/`:

    score.h5        per-image loss on the `score_on` tokens (`generate.score_file`)
    train.h5        features of the train tokens (`extract.extract_features`)
    test.h5         features of the test tokens
    result.json     the checkpoint's `CheckpointResult`, written atomically, last

then `OUT/sweep.json` (the `SweepResult`) and `OUT/sweep.csv` (`report.write_csv`).

Every checkpoint and input is checked before anything is computed (each checkpoint loads,
can score and has the layers; the tokens files are valid, labelled and fit every model;
no output is one of the inputs; no family or name leaves OUT).

Resumable: a checkpoint whose result.json exists (for the same inputs: the tokens files'
SHA-256, the model weights' SHA-256, the layers and the probe seed) is not recomputed;
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
import hashlib
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
from ..errors import InputError, check_positive
from ..formats import sha256_file
from ..layers import parse_layers
from ..model import read_config, resolve_model_dir
from ..outputs import atomic_output, check_distinct, output_lock
from ..progress import OnProgress, Reporter
from ..provenance import provenance
from ..results import Result
from .checkpoints import Checkpoint, expand_checkpoints
from .stats import Correlation, correlate

RESULT_FILE = "result.json"
STAGE_FILES = ("score.h5", "train.h5", "test.h5", RESULT_FILE)   # in OUT/<family>/<name>/
PLOT_FILES = ("sweep-accuracy-vs-loss.png", "sweep-layers.png")   # in OUT, drawn by the command line
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


@dataclass
class _Tokens:
    """A tokens file of the sweep, checked: its layout and digest."""
    param: str
    path: Path
    height: int
    width: int
    palette: np.ndarray
    sha256: str


def _check_tokens(param: str, path, *, labelled: bool, fit: bool = False) -> _Tokens:
    """A valid tokens file with images; `labelled` (the probe's files): every row labelled; `fit` (the
    probe's training file): also classes it can fit (>= 2, each with >= 2 rows)."""
    from ..probe.protocol import check_labels

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: tokens file not found ({param})")
    with formats.open_igpt(p, formats.TOKENS_FORMAT) as f:
        tok, height, width, palette = formats.tokens_layout(f, p)
        if tok.shape[0] == 0:
            raise InputError(f"{p}: the tokens file holds no images ({param})")
        formats.check_token_values(tok, len(palette), p, tok.shape[0])
        if labelled:
            labels = np.asarray(formats.read_dataset(f["labels"], path=p)) if "labels" in f else np.full(1, -1)
            if (labels < 0).any():
                raise InputError(f"{p}: {int((labels < 0).sum())} rows are unlabelled ({param}); "
                                 "the probe needs labelled rows")
            if fit:
                check_labels(labels, f"{p} ({param})", formats.class_names(f, p))
    return _Tokens(param, p, height, width, np.asarray(palette), sha256_file(p))


def _read_result(path: Path) -> dict | None:
    """A checkpoint's result.json, or None when it is torn, unreadable or fails its digest (edited)."""
    try:
        doc = json.loads(path.read_text())
        ok = isinstance(doc, dict) and doc.get("digest") == _digest(doc.get("identity"), doc.get("result"))
    except (OSError, ValueError, TypeError):
        return None
    return doc if ok else None


def _digest(identity, result) -> str:
    """SHA-256 of a result.json's identity and result (canonical JSON): an edited file is not reused."""
    return hashlib.sha256(json.dumps({"identity": identity, "result": result}, sort_keys=True).encode()).hexdigest()


def _scored(path: Path) -> float:
    """Mean nats per token of a complete scores file (as `score_file` computes it)."""
    with h5py.File(path, "r") as f:
        return float(np.mean(f["nats_per_token"][:]))


def _params(cfg) -> int:
    from ..train.config import n_params

    return n_params(cfg)


def _belongs(path: Path, model_sha256: str, tokens: _Tokens) -> bool:
    """Whether a stage file left in a checkpoint's folder was computed from these weights and tokens."""
    try:
        with h5py.File(path, "r") as f:
            a = formats.read_attrs(f)
    except OSError:
        return False
    return a.get("model_sha256") == model_sha256 and a.get("tokens_sha256", tokens.sha256) == tokens.sha256


def _open_checkpoint(path: str, on_progress):
    """(model dir, weights file, config, check(tokens)) of a checkpoint that can score, nothing loaded:
    the one model runtime's checks (`model.runtime.open_model`, whose `check_tokens` also compares
    the palette's colours), or, in a tree without that runtime, the stages' own."""
    try:
        from ..model.runtime import open_model
    except ImportError:   # before the model runtime: the checks score and extract ran
        from ..extract.sources import check_model_fits
        from ..generate.decode import check_generative

        d = resolve_model_dir(path, on_progress=on_progress)
        cfg = read_config(d)
        return d, check_generative(d), cfg, \
            lambda t: check_model_fits(cfg, t.height, t.width, len(t.palette), t.path)
    m = open_model(path, device="cpu", quiet=on_progress is None, generative=True)   # cpu: nothing runs here
    return m.dir, m.weights, m.cfg, lambda t: m.check_tokens(t.height, t.width, t.palette, t.path)


@dataclass
class _Planned:
    """One checkpoint, checked: where it resolved, its config, weights digest and folder."""
    ck: Checkpoint
    model_dir: Path
    cfg: object
    model_sha256: str
    ckdir: Path


def _plan(checkpoints, train, test, out: Path, score_on, spec, *, jobs: int, batch_size, restart: bool, seed: int,
          on_progress) -> tuple[list[_Planned], dict, dict[str, _Tokens]]:
    """Every check before anything is computed: the tokens files, every checkpoint (loads, can score,
    has the layers, fits the tokens), the outputs against the inputs, earlier results' inputs."""
    check_positive("jobs", jobs, allow_none=False)
    check_positive("batch_size", batch_size)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    tokens = {"train": _check_tokens("train", train, labelled=True, fit=True),
              "test": _check_tokens("test", test, labelled=True)}
    tokens["score_on"] = _check_tokens("score_on", score_on, labelled=False) if score_on is not None \
        else tokens["test"]
    planned = []
    for ck in expand_checkpoints(checkpoints):
        d, weights, cfg, check_tokens = _open_checkpoint(ck.path, on_progress)
        parse_layers(spec, range(cfg.n_layer + 1), where=str(ck.path))
        for t in tokens.values():
            check_tokens(t)
        ckdir = out / ck.family / ck.name
        if not ckdir.resolve().is_relative_to(out.resolve()):
            raise InputError(f"{ckdir}: leaves the output directory {out} (a symlink?); remove it or use another "
                             "output directory")
        planned.append(_Planned(ck, d, cfg, sha256_file(weights), ckdir))
    outs = {"sweep.json": out / "sweep.json", "sweep.csv": out / "sweep.csv", **{n: out / n for n in PLOT_FILES}}
    for p in planned:
        outs.update({f"{p.ck.family}/{p.ck.name}/{n}": p.ckdir / n for n in STAGE_FILES})
    ins = {t.param: t.path for t in tokens.values()}
    for p in planned:
        ins.update({f"checkpoint {p.ck.path} ({f.name})": f for f in p.model_dir.iterdir() if f.is_file()})
    check_distinct(outs, ins)
    inputs = {"train_sha256": tokens["train"].sha256, "test_sha256": tokens["test"].sha256,
              "score_on_sha256": tokens["score_on"].sha256, "layers": spec, "seed": seed}
    if not restart:   # an earlier sweep's result of other inputs: refused now, not after hours of work
        for p in planned:
            done = _read_result(p.ckdir / RESULT_FILE)
            identity = dict(inputs, model_sha256=p.model_sha256)
            if done is not None and done.get("identity") != identity:
                what = [k for k in identity if done.get("identity", {}).get(k) != identity[k]]
                raise InputError(f"{p.ckdir}: holds the result of a sweep with other inputs ({', '.join(what)} "
                                 "differ); use another output directory, or restart=True to recompute it")
    return planned, inputs, tokens


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
) -> SweepResult:
    """Score, extract and probe every checkpoint; see the module docstring.

    `checkpoints`: directories, training runs (their `step-*` series), TensorFlow prefixes
    or globs, optionally as FAMILY=ARG (`checkpoints.py`). `train`/`test`: tokens files
    the probe is fitted / tested on (C is chosen on a validation split of train, as
    `igpt probe` does; `seed` is its seed). `score_on`: the tokens the loss is measured on
    (default: `test`). `layers`: the layers extracted and probed (default all). `jobs`:
    layers probed at once. `batch_size`, `device`, `dtype`: for scoring, extraction and
    the probe (which runs on the same device, or on the CPU when that is mps).
    `dist` (a `distributed.DistContext` with world size > 1, e.g. under torchrun): the
    checkpoints are spread over the ranks; every rank returns the whole result, rank 0
    alone writes sweep.json and sweep.csv.
    Progress: the stages' own events, and one log line per finished checkpoint.
    """
    from ..runtime import resolve_device

    t0 = time.perf_counter()
    out = Path(out)
    spec = _layer_spec(layers)
    ctx = dist if dist is not None and dist.active else None
    dev = resolve_device(device)
    if ctx is not None:
        dev = ctx.device_for(dev)   # cuda -> this rank's GPU
        ctx.init(dev)
        ctx.agree(dict(checkpoints=[str(c) for c in ([checkpoints] if isinstance(checkpoints, (str, Path))
                                                       else checkpoints)],
                       train=str(train), test=str(test), out=str(out), score_on=None if score_on is None
                       else str(score_on), layers=spec, seed=seed, jobs=jobs, batch_size=batch_size,
                       device=str(device), dtype=dtype, restart=restart), "sweep settings")
    run = ctx.run_checked if ctx is not None else (lambda fn: fn())
    main = ctx is None or ctx.is_main
    rep = Reporter(on_progress, "sweep")
    with contextlib.ExitStack() as stack:
        def checked(now: bool):
            if not now:
                return None
            plan = _plan(checkpoints, train, test, out, score_on, spec, jobs=jobs, batch_size=batch_size,
                         restart=restart, seed=seed, on_progress=on_progress)
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
                         device=dev, dtype=dtype, restart=restart, on_progress=on_progress, rep=rep)
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


def _one(p: _Planned, out: Path, tokens: dict[str, _Tokens], inputs: dict, spec, *, seed: int, jobs: int,
         batch_size, device, dtype: str, restart: bool, on_progress, rep: Reporter) -> CheckpointResult:
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
        done = _read_result(ckdir / RESULT_FILE)
        if done is not None and done.get("identity") == identity:
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
    rep_ = probe_files(files["train"], files["test"], seed=seed, jobs=jobs, on_progress=on_progress,
                       device=probe_device(device))
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
                                   "identity": identity, "result": body, "digest": _digest(identity, body),
                                   "provenance": dict(provenance(str(device)), probe_device=rep_.protocol["device"])},
                                  indent=1) + "\n")
    return result


def _result_from(d: dict, reused: bool) -> CheckpointResult:
    d = dict(d, layers=[LayerAccuracy(**x) for x in d["layers"]], reused=reused)
    return CheckpointResult(**d)
