"""What a sweep checks before it computes anything, and the files it keeps.

`plan_sweep` checks the tokens files (valid; the probe's files labelled, the training one
with classes it can fit), every checkpoint (it loads, can score, has the layers, fits every
tokens file: `open_checkpoint`, the one model runtime's checks), that no family or name
leaves OUT, that no file the sweep writes is one of its inputs, and that no earlier result
in OUT came from other inputs or another probe (`probe_settings`: the method, and k-NN's k,
vote and temperature, are part of a result's identity). `read_result` reads back a
checkpoint's result.json only when its recorded digest (`result_digest`) matches: an edited
or damaged one is recomputed.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import formats
from ..errors import InputError, check_positive
from ..formats import sha256_file
from ..jsonfile import read_json
from ..layers import parse_layers
from ..model.runtime import open_model
from ..outputs import check_distinct
from ..seeds import check_seed
from .checkpoints import Checkpoint, expand_checkpoints

RESULT_FILE = "result.json"
STAGE_FILES = ("score.h5", "train.h5", "test.h5", RESULT_FILE)   # in OUT/<family>/<name>/
PLOT_FILES = ("sweep-accuracy-vs-loss.png", "sweep-layers.png")   # in OUT, drawn by the command line


@dataclass
class Tokens:
    """A tokens file of the sweep, checked: its layout and digest."""
    param: str
    path: Path
    height: int
    width: int
    palette: np.ndarray
    sha256: str
    n: int          # images


def check_tokens(param: str, path, *, labelled: bool, fit: bool = False) -> Tokens:
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
    return Tokens(param, p, height, width, np.asarray(palette), sha256_file(p), int(tok.shape[0]))


def probe_settings(method: str, k: int, knn_vote: str, knn_temperature: float) -> dict:
    """The probe's settings as a sweep records them (sweep.json's `probe`, and part of every checkpoint
    result's identity): {"method": "linear"}, or k-NN's method, k, vote and temperature (None for the
    majority vote, which has none)."""
    from ..choices import KNN_VOTES, PROBE_METHODS
    from ..errors import check_choice
    from ..probe.knn import check_knn

    method = check_choice("method", method, PROBE_METHODS)
    if method == "linear":
        return {"method": "linear"}
    knn_vote = check_choice("knn_vote", knn_vote, KNN_VOTES)
    check_knn(k, knn_vote, knn_temperature)
    return {"method": "knn", "k": int(k), "knn_vote": knn_vote,
            "knn_temperature": float(knn_temperature) if knn_vote == "weighted" else None}


def stored_identity(doc: dict) -> dict:
    """The identity a result.json records; one written before sweeps had a method was a linear probe's."""
    identity = doc.get("identity")
    return {"method": "linear", **identity} if isinstance(identity, dict) else identity


def read_result(path: Path) -> dict | None:
    """A checkpoint's result.json, or None when it is torn, unreadable or fails its digest (edited)."""
    try:
        doc = read_json(path, "sweep result")
        ok = isinstance(doc, dict) and doc.get("digest") == result_digest(doc.get("identity"), doc.get("result"))
    except (InputError, OSError, ValueError, TypeError):
        return None
    return doc if ok else None


def result_digest(identity, result) -> str:
    """SHA-256 of a result.json's identity and result (canonical JSON): an edited file is not reused."""
    return hashlib.sha256(json.dumps({"identity": identity, "result": result}, sort_keys=True).encode()).hexdigest()


def open_checkpoint(path: str, on_progress):
    """(model dir, weights file, config, check(tokens)) of a checkpoint that can score, nothing loaded:
    the one model runtime's checks (`model.runtime.open_model`, whose `check_tokens` also compares
    the palette's colours)."""
    m = open_model(path, device="cpu", quiet=on_progress is None, generative=True)   # cpu: nothing runs here
    return m.dir, m.weights, m.cfg, lambda t: m.check_tokens(t.height, t.width, t.palette, t.path)


@dataclass
class Planned:
    """One checkpoint, checked: where it resolved, its config, weights digest and folder."""
    ck: Checkpoint
    model_dir: Path
    cfg: object
    model_sha256: str
    ckdir: Path


def plan_sweep(checkpoints, train, test, out: Path, score_on, spec, *, jobs: int, batch_size, restart: bool,
               seed: int, on_progress, probe: dict | None = None) -> tuple[list[Planned], dict, dict[str, Tokens]]:
    """Every check before anything is computed: the tokens files, every checkpoint (loads, can score,
    has the layers, fits the tokens), the outputs against the inputs, earlier results' inputs.
    `probe`: `probe_settings` (default: the linear probe)."""
    from ..errors import ParameterError

    probe = probe or {"method": "linear"}
    check_positive("jobs", jobs, allow_none=False)
    check_positive("batch_size", batch_size)
    check_seed(seed)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    tokens = {"train": check_tokens("train", train, labelled=True, fit=True),
              "test": check_tokens("test", test, labelled=True)}
    tokens["score_on"] = check_tokens("score_on", score_on, labelled=False) if score_on is not None \
        else tokens["test"]
    n_train = tokens["train"].n
    if probe["method"] == "knn" and probe["k"] > n_train - 1:
        raise ParameterError("k", probe["k"], f"is larger than the training set allows ({n_train} images in "
                                              f"{tokens['train'].path}; leave-one-out validation needs k <= "
                                              f"{n_train - 1})")
    planned = []
    for ck in expand_checkpoints(checkpoints):
        d, weights, cfg, check_fits = open_checkpoint(ck.path, on_progress)
        parse_layers(spec, range(cfg.n_layer + 1), where=str(ck.path))
        for t in tokens.values():
            check_fits(t)
        ckdir = out / ck.family / ck.name
        if not ckdir.resolve().is_relative_to(out.resolve()):
            raise InputError(f"{ckdir}: leaves the output directory {out} (a symlink?); remove it or use another "
                             "output directory")
        planned.append(Planned(ck, d, cfg, sha256_file(weights), ckdir))
    outs = {"sweep.json": out / "sweep.json", "sweep.csv": out / "sweep.csv", **{n: out / n for n in PLOT_FILES}}
    for p in planned:
        outs.update({f"{p.ck.family}/{p.ck.name}/{n}": p.ckdir / n for n in STAGE_FILES})
    ins = {t.param: t.path for t in tokens.values()}
    for p in planned:
        ins.update({f"checkpoint {p.ck.path} ({f.name})": f for f in p.model_dir.iterdir() if f.is_file()})
    check_distinct(outs, ins)
    inputs = {"train_sha256": tokens["train"].sha256, "test_sha256": tokens["test"].sha256,
              "score_on_sha256": tokens["score_on"].sha256, "layers": spec, "seed": seed, **probe}
    if not restart:   # an earlier sweep's result of other inputs: refused now, not after hours of work
        for p in planned:
            done = read_result(p.ckdir / RESULT_FILE)
            identity = dict(inputs, model_sha256=p.model_sha256)
            if done is not None and stored_identity(done) != identity:
                old = stored_identity(done)
                what = [k for k in dict.fromkeys([*identity, *old]) if old.get(k) != identity.get(k)]
                raise InputError(f"{p.ckdir}: holds the result of a sweep with other inputs ({', '.join(what)} "
                                 "differ); use another output directory, or restart=True to recompute it")
    return planned, inputs, tokens
