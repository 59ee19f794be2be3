"""`igpt demo`: the whole pipeline, offline, on data and a model shipped with the package.

quantize (shipped CIFAR-10 subset) → extract (shipped pretrained iGPT, all layers,
plus the raw-pixel baseline) → probe → JSON reports; and `completions.png`, one test image
of each class completed by the model from its top half (the iGPT blog's figure). The
command draws the table and the PNG curve from the result (`igpt_cli.cli`); this module
only runs the stages.
"""
from __future__ import annotations

import json
import shlex
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .extract import extract_features
from .model import read_config, resolve_model_dir
from .outputs import check_distinct
from .probe import ProbeReport, probe_files
from .progress import OnProgress, Reporter
from .quantize import quantize_dataset
from .results import Result

ASSETS = Path(str(resources.files("igpt_cli") / "assets"))
DEMO_DATA = ASSETS / "demo-cifar10.tar"
SHIPPED_NAME = "igpt-cifar8"
SHIPPED_MODEL = ASSETS / SHIPPED_NAME


def pipeline_commands(out: Path, model: str | Path, side: int) -> list[str]:
    """The shell commands equivalent to the demo, for a user to repeat by hand (`model` as the user
    named it: the shipped one by its name, igpt-cifar8)."""
    q = shlex.quote
    data, o = q(str(DEMO_DATA)), lambda name: q(str(out / name))
    cmds = []
    for split in ("train", "test"):
        cmds.append(f"igpt quantize {data} --split {split} --size {side} --palette {q(str(model))} "
                    f"-o {o(split + '.h5')} --overwrite")
    for split in ("train", "test"):
        cmds.append(f"igpt extract {o(split + '.h5')} --model {q(str(model))} --layer all "
                    f"-o {o(split + '-feats.h5')} --overwrite")
        cmds.append(f"igpt extract {o(split + '.h5')} --model pixels -o {o(split + '-pixels.h5')} --overwrite")
    cmds.append(f"igpt probe {o('train-pixels.h5')} --test {o('test-pixels.h5')} --json > {o('probe-pixels.json')}")
    cmds.append(f"igpt probe {o('train-feats.h5')} --test {o('test-feats.h5')} --plot {o('probe.png')} "
                f"--json > {o('probe.json')}")
    return cmds


def _completions(tokens_path: Path, model: Path, png: Path) -> Path:
    """The completion figure of the shipped model on one test image per class."""
    from . import formats
    from .generate.figures import write_completion_figure
    from .palette import Palette

    with formats.open_igpt(tokens_path, formats.TOKENS_FORMAT) as f:
        tokens, h, w, palette = formats.tokens_layout(f, tokens_path)
        tokens, labels = tokens[:], f["labels"][:]
    return write_completion_figure(tokens, labels, model, png, palette=Palette(palette), height=h, width=w)


@dataclass
class DemoResult(Result):
    model: ProbeReport      # the probe of the model's layers
    pixels: ProbeReport     # the raw-pixel baseline
    files: dict             # name -> path of every file kept (none when out_dir is None)
    commands: list          # the equivalent shell pipeline
    seconds: float
    kept: bool              # whether the intermediate files were kept (out_dir given)


DEMO_FILES = ("train.h5", "test.h5", "train-feats.h5", "train-pixels.h5", "test-feats.h5", "test-pixels.h5",
              "probe.json", "probe-pixels.json", "completions.png")  # what run_demo writes into out_dir


def check_demo_paths(out_dir: str | Path | None, model: str | Path | None, others: dict | None = None) -> None:
    """Before any work: none of the demo's outputs (its files in `out_dir`, and `others`, e.g. the
    command's plot) is one of its inputs (the model's files, the shipped data) or another output."""
    from .bundled import bundled_dir

    model_dir = (bundled_dir(model) or Path(model)) if model else SHIPPED_MODEL
    outs = {name: Path(out_dir) / name for name in DEMO_FILES} if out_dir is not None else {}
    outs.update(others or {})
    ins = {f"model {p.name}": p for p in sorted(model_dir.iterdir())} if model_dir.is_dir() else {}
    check_distinct(outs, dict(ins, data=DEMO_DATA))


def run_demo(out_dir: str | Path | None = None, *, model: str | Path | None = None,
             completions: str | Path | None = None, on_progress: OnProgress | None = None) -> DemoResult:
    """Run quantize → extract → probe on the shipped data and model.

    With `out_dir` every intermediate file is kept there; without it they live in a
    temporary directory that is removed before returning. `completions`: where to write
    the completion figure (default `out_dir/completions.png`; none without `out_dir`).
    Stage progress and one log line per step go to `on_progress`.
    """
    model_name = str(model) if model else SHIPPED_NAME
    model = resolve_model_dir(model_name)
    check_demo_paths(out_dir, model, {"completions": completions})
    side = read_config(model).side
    log = Reporter(on_progress, "demo").log
    t0 = time.perf_counter()
    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="igpt-demo-")
        out = Path(tmp.name)
    else:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
    try:
        files = {}
        for split in ("train", "test"):
            files[split] = out / f"{split}.h5"
            s = quantize_dataset(DEMO_DATA, files[split], split=split, size=side, palette=model, overwrite=True,
                                 on_progress=on_progress)
            log(f"quantize  {split:5s}: {s.n} images -> {files[split]}")
        png = Path(completions) if completions is not None else (out / "completions.png" if tmp is None else None)
        if png is not None:
            files["completions"] = _completions(files["test"], model, png)
            log(f"complete  test : one image per class, 3 completions of the bottom half -> {png}")
        for split in ("train", "test"):
            for kind, source in (("feats", model), ("pixels", "pixels")):
                path = out / f"{split}-{kind}.h5"
                extract_features(files[split], source, "all" if kind == "feats" else None, path,
                                 overwrite=True, on_progress=on_progress)
                files[f"{split}-{kind}"] = path
                log(f"extract   {split:5s}: {'pixels' if kind == 'pixels' else 'iGPT layers'} -> {path}")
        pixels = probe_files(files["train-pixels"], files["test-pixels"])
        report = probe_files(files["train-feats"], files["test-feats"])
        (out / "probe.json").write_text(json.dumps(report.to_dict(), indent=1, default=str) + "\n")
        (out / "probe-pixels.json").write_text(json.dumps(pixels.to_dict(), indent=1, default=str) + "\n")
        return DemoResult(model=report, pixels=pixels,
                          files={k: str(v) for k, v in files.items()} if tmp is None else {},
                          commands=pipeline_commands(out, model_name, side),
                          seconds=round(time.perf_counter() - t0, 1), kept=tmp is None)
    finally:
        if tmp is not None:
            tmp.cleanup()
