"""Generative pretraining of an iGPT on a tokens file (next-token prediction).

The model is `igpt_cli.model.IGPT`, the same code path `igpt extract` runs. The
input is SOS-shifted like the original model: `[SOS, t_0 … t_{n-2}]` predicts
`t_0 … t_{n-1}`. The output directory is a Hugging Face ImageGPT checkpoint
(`config.json`, `model.safetensors`, `preprocessor_config.json`) that both
`igpt extract` and `transformers.ImageGPTModel.from_pretrained` load.

Resumability: the run state (`train_state.pt`: optimizer moments, step, schedule,
seed, the tokens files' SHA-256) is written every `checkpoint_every` steps and on
Ctrl-C. The data order and the flip augmentation are pure functions of (seed, step),
so `resume=True` continues with exactly the batches an uninterrupted run would have
seen; it refuses other settings (a larger `steps` extends the run) and other tokens.

Safety: every setting and the tokens are checked before work starts (`config.py`,
`data.py`); the output directory is locked for the whole run (`outputs.output_lock`:
a second run on it fails at once, naming the holder); every file is written under a
temporary name and renamed, and a failed write (a full disk) is one line, with the
temporary files removed and the last checkpoint intact (`state.py`).

Data parallel: under torchrun (or srun) `pretrain` is DistributedDataParallel training;
`batch_size` is the global batch, each rank takes a fixed slice of it (in `grad_accum`
micro-batches), so N ranks train the model one process does, up to float summation order.
Rank 0 writes the run directory.

Watching: `OUT/metrics.jsonl` (a line per logged step), `OUT/loss.png`, TensorBoard when
installed (`watch`). Continuing a model: `init=` (`init.py`).

Modules: `config` (settings, schedule, memory), `data` (tokens, batches, the validation
subset), `state` (the run state on disk), `init` (the model a run starts from), `watch`
(metrics, plot), `objective` (what the loop optimises: next-token pretraining by default),
`loop` (`pretrain`), `finetuning` (`finetune`: a classification head on the mean-pooled last
layer, the paper's joint objective, run by the same loop), `classify` (a fine-tuned model applied:
`predict_finetuned` in memory, `predict_finetuned_file` for `igpt predict -m`).
"""
from .config import TrainConfig, check_config, lr_at, total_steps
from .data import TokenData, batch_indices, flip_mask, load_tokens, make_batch, val_rows
from .loop import (TrainResult, evaluate, loss_on, make_optimizer, pretrain, split_batch,
                   write_preprocessor_config)
from .state import STATE_FILE, TRAIN_META
from .classify import predict_finetuned, predict_finetuned_file
from .finetuning import FinetuneReport, finetune

__all__ = ["TrainConfig", "TrainResult", "TokenData", "pretrain", "load_tokens", "lr_at", "batch_indices",
           "make_batch", "flip_mask", "total_steps", "check_config", "evaluate", "loss_on", "make_optimizer",
           "write_preprocessor_config", "STATE_FILE", "TRAIN_META", "split_batch", "val_rows", "finetune",
           "predict_finetuned", "predict_finetuned_file", "FinetuneReport"]
