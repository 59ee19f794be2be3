"""`igpt train`, `igpt finetune` and `igpt demo`."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..choices import ComputeDtype
from ..errors import InputError
from .options import Device, Dtype, Json, ModelOpt, Quiet, out_option
from .ui import (ProgressBar, err, get_current_context, handles_input_errors, launched_run, maybe_bar, print_json,
                 render_probe_table)


# The options `train` and `finetune` share (their defaults are the commands' own).
Steps = Annotated[Optional[int], typer.Option("--steps", min=1, help="Optimizer steps (or use --epochs).")]
Epochs = Annotated[Optional[float], typer.Option("--epochs", min=0.0, help="Passes over the training tokens.")]
GlobalBatch = Annotated[int, typer.Option("--batch-size", min=1, help=(
    "Images per step, all processes together (the global batch under torchrun)."))]
GradAccum = Annotated[int, typer.Option("--grad-accum", min=1, help=(
    "Split each process's share of a step into K micro-batches (the same step, less memory)."))]
PeakLr = Annotated[float, typer.Option("--lr", help="Peak learning rate (linear warm-up, cosine decay).")]
Warmup = Annotated[int, typer.Option("--warmup", min=0, help="Warm-up steps.")]
NoFlip = Annotated[bool, typer.Option("--no-flip", help="Disable random horizontal flips.")]
CheckpointEvery = Annotated[int, typer.Option("--checkpoint-every", min=1, help="Steps between checkpoints.")]
OldResume = Annotated[bool, typer.Option("--resume", hidden=True, help=(
    "Continue the run saved in --out (the default when there is one; kept for older scripts)."))]


def resumes(out: Path, restart: bool, resume: bool) -> bool:
    """Whether a train/finetune run continues the run saved in `out`: rerunning resumes by default,
    --restart starts anew, the old --resume insists."""
    from ..train import STATE_FILE

    if restart and resume:
        raise InputError("--restart and --resume contradict each other: give one")
    return resume or (not restart and (out / STATE_FILE).is_file())


def typed_settings(settings: dict) -> dict:
    """The settings whose flags the user typed (`flip` is typed as --no-flip): a new run takes the
    defaults for the rest; a resumed run compares these with its own settings."""
    ctx = get_current_context()
    param = {"flip": "no_flip"}
    return {k: v for k, v in settings.items()
            if getattr(ctx.get_parameter_source(param.get(k, k)), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")}


@handles_input_errors
def train_command(
    train_tokens: Annotated[Path, typer.Argument(help="Tokens file (igpt quantize) to pretrain on.")],
    out: Annotated[Path, out_option("Model directory to write (Hugging Face ImageGPT layout); a run already "
                                    "there is resumed.")],
    val_tokens: Annotated[Optional[Path], typer.Option("--val", help="Tokens file for validation loss (bits/dim).")] = None,
    init: Annotated[Optional[str], typer.Option("--init", metavar="<model>", help=(
        "Continue pretraining this model (directory, bundled name, hub id or TF checkpoint prefix): "
        "architecture and palette come from it."))] = None,
    n_layer: Annotated[int, typer.Option("--depth", min=1, help="Transformer blocks.")] = 8,
    n_embd: Annotated[int, typer.Option("--width", min=8, help="Embedding width.")] = 256,
    n_head: Annotated[int, typer.Option("--heads", min=1, help="Attention heads.")] = 8,
    steps: Steps = None,
    epochs: Epochs = None,
    batch_size: GlobalBatch = 64,
    grad_accum: GradAccum = 1,
    lr: PeakLr = 3e-3,
    warmup_steps: Warmup = 100,
    no_flip: NoFlip = False,
    checkpoint_every: CheckpointEvery = 200,
    eval_every: Annotated[int, typer.Option("--eval-every", min=1, help="Steps between validation losses.")] = 200,
    val_images: Annotated[int, typer.Option("--val-images", min=1, help=(
        "Validation loss on this many --val images (a seeded, class-balanced subset; all if fewer)."))] = 2000,
    log_every: Annotated[int, typer.Option("--log-every", min=1, help=(
        "Steps between lines of OUT/metrics.jsonl (the loss is read from the device only then)."))] = 10,
    save_every: Annotated[Optional[int], typer.Option("--save-every", min=1, help=(
        "Keep the model every K steps as its own directory OUT/step-NNNNNN (a series for igpt sweep)."))] = None,
    save_at: Annotated[Optional[str], typer.Option("--save-at", metavar="<steps>", help=(
        "Keep the model at these steps too, e.g. 50,100,200,400,800,1600,2400."))] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the initialisation, data order and flips.")] = 0,
    device: Device = "auto",
    dtype: Dtype = ComputeDtype.auto,
    restart: Annotated[bool, typer.Option("--restart", help=(
        "Discard the run saved in --out (its state, model, logs and step-* models) and start a new one.")) ] = False,
    resume: OldResume = False,
    compile: Annotated[bool, typer.Option("--compile", help=(
        "torch.compile the model (falls back to eager where no compiler works)."))] = False,
    activation_checkpointing: Annotated[bool, typer.Option("--activation-checkpointing", help=(
        "Recompute block activations in the backward pass: less memory for large models."))] = False,
    quiet: Quiet = False,
    as_json: Json = False,
) -> None:
    """Pretrain an iGPT on palette tokens (next-token prediction with the SOS shift); resumable.

    Like igpt's other long commands (extract, features, sample, complete, score, sweep), rerunning
    it resumes: when --out holds a run (OUT/train_state.pt) it continues from its last checkpoint
    with the run's own settings (flags you give again must match them; a larger --steps extends
    the run); --restart discards it and starts anew.

    Under torchrun (or srun) every process trains its share of each global batch
    (DistributedDataParallel); rank 0 writes the run directory. OUT/metrics.jsonl and
    OUT/loss.png follow the run.

    Example: igpt train train.h5 --val test.h5 -o runs/tiny --depth 2 --width 32 --heads 2 --steps 20 --save-at 10,20
    """
    from ..train import pretrain
    from .plots import write_loss_plot

    resume = resumes(out, restart, resume)
    if not resume and steps is None and epochs is None:
        raise InputError("give --steps or --epochs")
    settings = dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, steps=steps, epochs=epochs,
                    batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, flip=not no_flip,
                    checkpoint_every=checkpoint_every, eval_every=eval_every, seed=seed, save_every=save_every,
                    save_at=_steps_list(save_at), val_images=val_images, log_every=log_every)
    cfg = typed_settings(settings)  # a resumed run continues with its own settings when none is given
    with launched_run(quiet) as (dist, bar):
        result = pretrain(train_tokens, out, cfg, val_tokens=val_tokens, init=init, device=device,
                          dtype=dtype.value, resume=resume, restart=restart, grad_accum=grad_accum, compile=compile,
                          activation_checkpointing=activation_checkpointing, dist=dist,
                          draw_loss=write_loss_plot, on_progress=bar)
    if dist.is_main:
        print_json(result)


@handles_input_errors
def finetune_command(
    train_tokens: Annotated[Path, typer.Argument(help="Labelled tokens file (igpt quantize) to fine-tune on.")],
    model: ModelOpt,
    test_tokens: Annotated[Path, typer.Option("--test", help="Labelled tokens file to report the accuracy on.")],
    out: Annotated[Path, typer.Option("-o", "--out", help=(
        "Directory to write (Hugging Face ImageGPTForImageClassification, report.json)."))],
    gen_weight: Annotated[float, typer.Option("--gen-weight", min=0.0, help=(
        "Weight of the generative (next-token) loss in the joint objective; 0: classification only."))] = 1.0,
    steps: Steps = None,
    epochs: Epochs = None,
    batch_size: GlobalBatch = 64,
    grad_accum: GradAccum = 1,
    lr: PeakLr = 1e-3,
    warmup_steps: Warmup = 50,
    weight_decay: Annotated[float, typer.Option("--weight-decay", min=0.0, help="AdamW weight decay.")] = 0.01,
    no_flip: NoFlip = False,
    checkpoint_every: CheckpointEvery = 200,
    eval_every: Annotated[int, typer.Option("--eval-every", min=1, help=(
        "Steps between history records (training losses and accuracy)."))] = 100,
    log_every: Annotated[int, typer.Option("--log-every", min=1, help="Steps between lines of OUT/metrics.jsonl.")] = 10,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the head, data order and flips.")] = 0,
    device: Device = "auto",
    dtype: Annotated[ComputeDtype, typer.Option("--dtype", help="Autocast dtype (auto: bfloat16 where fast).")] = ComputeDtype.auto,
    restart: Annotated[bool, typer.Option("--restart", help=(
        "Discard the run saved in --out (its state, model and logs) and start a new one."))] = False,
    resume: OldResume = False,
    quiet: Quiet = False,
    as_json: Json = False,
) -> None:
    """Fine-tune a model with a linear head on its mean-pooled final layer (the paper's joint objective).

    Writes a Hugging Face ImageGPTForImageClassification directory (transformers loads it with
    its id2label), OUT/metrics.jsonl, OUT/loss.png and OUT/report.json (test accuracy with its
    95 % interval; the same JSON on stdout). Data-parallel under torchrun. Like train, rerunning it
    resumes the run saved in --out (flags you give again must match it); --restart starts anew.

    Example: igpt finetune train.h5 -m igpt-cifar8 --test test.h5 -o ft --steps 10 --batch-size 16
    """
    from ..train.finetuning import finetune
    from .plots import write_loss_plot

    resume = resumes(out, restart, resume)
    if not resume and steps is None and epochs is None:
        raise InputError("give --steps or --epochs")
    settings = dict(steps=steps, epochs=epochs, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                    weight_decay=weight_decay, flip=not no_flip, checkpoint_every=checkpoint_every,
                    eval_every=eval_every, seed=seed, log_every=log_every)
    # a resumed run compares the flags the user typed with its own
    settings = typed_settings(settings) if resume else {k: v for k, v in settings.items() if v is not None}
    with launched_run(quiet) as (dist, bar):
        report = finetune(train_tokens, model, test_tokens, out, settings, gen_weight=gen_weight, device=device,
                          dtype=dtype.value, resume=resume, restart=restart, grad_accum=grad_accum,
                          dist=dist, draw_loss=write_loss_plot, on_progress=bar)
    if dist.is_main:
        if not quiet:
            layer = report.layers[0]
            lo, hi = layer["test_acc_ci"]
            err.print(f"fine-tuned test accuracy {layer['test_acc']:.1%} (95 % interval {lo:.1%}–{hi:.1%}, "
                      f"{layer['n_test']:,} images) — {out / 'report.json'}", highlight=False)
        print_json(report)


@handles_input_errors
def demo_command(
    out: Annotated[Optional[Path], out_option("Keep every intermediate file in this directory.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help=(
        "Model: a directory, a bundled name, an OpenAI TF checkpoint prefix or a Hugging Face hub id "
        "(default: the shipped igpt-cifar8)."))] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help=(
        "Where to write the probe curve PNG (default: OUT/probe.png, or ./igpt-demo.png without --out)."))] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the probe reports as one JSON document on stdout.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the files of an earlier demo.")] = False,
    quiet: Quiet = False,
) -> None:
    """Run quantize → extract → probe offline on the shipped CIFAR-10 subset and model.

    Without --out only the probe curve (./igpt-demo.png) and a completion figure
    (./igpt-demo-completions.png) are kept.

    Example: igpt demo --out demo-out
    """
    from .. import outputs
    from ..demo import check_demo_paths, run_demo
    from .plots import check_plot_path, write_probe_plot

    plot_path = plot or (out / "probe.png" if out else Path("igpt-demo.png"))
    completions = None if out else Path("igpt-demo-completions.png")
    made: list[Path] = []  # the directories this run creates for --out, innermost first
    if out is not None:
        if out.exists() and not out.is_dir():
            raise InputError(f"{out}: exists and is not a directory")
        if not overwrite and out.is_dir() and any(out.iterdir()):
            raise InputError(f"{out}: holds files already (pass overwrite=True to replace the demo's files)")
        made = [d for d in (out, *out.parents) if not d.exists()]
        out.mkdir(parents=True, exist_ok=True)
    try:
        check_demo_paths(out, model, {"plot": plot_path, "completions": completions})
        check_plot_path(plot_path, overwrite)
        if completions is not None:
            outputs.check_output_path(completions, overwrite)
        bar = ProgressBar.maybe(quiet)
        with maybe_bar(bar):
            result = run_demo(out, model=model, completions=completions, on_progress=bar)
    except BaseException:
        for d in made:  # a run that failed (a missing model…) leaves no empty --out behind
            if not d.is_dir() or any(d.iterdir()):
                break
            d.rmdir()
        raise
    rep, pix = result.model.to_dict(), result.pixels.to_dict()
    files = dict(result.files, plot=str(write_probe_plot(rep, plot_path)))
    if not quiet:
        render_probe_table(rep)
        best = next(r for r in rep["layers"] if r["layer"] == rep["best_layer"])
        base = pix["layers"][0]["test_acc"]
        err.print(f"best layer {best['layer']}: test accuracy {best['test_acc']:.1%} vs raw pixels {base:.1%} "
                  f"({100 * (best['test_acc'] - base):+.1f} points) — {result.seconds:.0f} s", highlight=False)
        err.print(f"curve: {files['plot']}", highlight=False)
        if result.kept:
            err.print("\nThe same pipeline by hand:", highlight=False)
            for cmd in result.commands:
                err.print(f"  {cmd}", highlight=False, soft_wrap=True)
    if as_json:
        print_json({"model": rep, "pixels": pix, "files": files, "seconds": result.seconds})


def _steps_list(text: str | None) -> tuple[int, ...]:
    if text is None:
        return ()
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise InputError(f"--save-at {text}: expected step numbers separated by commas (50,100,200)") from None


def register(app: typer.Typer) -> None:
    """Add `train`, `finetune`, `demo` to the `igpt` app."""
    app.command("train")(train_command)
    app.command("finetune")(finetune_command)
    app.command("demo")(demo_command)
