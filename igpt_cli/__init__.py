"""igpt: Image GPT as an unsupervised feature extractor and generative model.

The Python API (nothing here imports the command line, typer or rich):

    import igpt_cli as igpt
    igpt.quantize_dataset("cifar10-jpeg.tar", "train.h5", split="train")
    igpt.extract_features("train.h5", "imagegpt-small/", "8-16", "train-feats.h5")
    report = igpt.probe_files("train-feats.h5", "test-feats.h5")
    X, y = igpt.load_features("train-feats.h5", layer=12)

Names are imported on first use, so `import igpt_cli` stays light (torch loads only when
a model is needed).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    # stages (files in, files out; typed results with .to_dict())
    "quantize_dataset": "quantize", "fit_palette_file": "quantize",
    "extract_features": "extract", "extract_image_features": "extract", "probe_files": "probe", "pretrain": "train", "TrainConfig": "train",
    "finetune": "train", "predict_finetuned": "train", "predict_finetuned_file": "train",
    "run_demo": "demo", "sweep": "sweep", "run_sweep": "sweep", "file_info": "fileinfo", "show_tokens": "show",
    # in memory (numpy in, numpy out)
    "features_from_tokens": "extract", "features_from_images": "extract", "load_features": "formats",
    "open_dataset": "data", "Palette": "palette", "LinearProbe": "probe", "probe_layer": "probe",
    "predict_file": "probe", "load_probes": "probe",
    # generation and likelihood
    "sample_images": "generate", "complete_images": "generate", "score_images": "generate",
    "sample_file": "generate", "complete_file": "generate", "score_file": "generate",
    # the model
    "IGPT": "model", "IGPTConfig": "model", "resolve_model_dir": "model", "list_models": "model", "load_pretrained": "model", "save_pretrained": "model",
    # errors, progress, choices
    "InputError": "errors", "ParameterError": "errors", "ProgressEvent": "progress",
    "Split": "choices", "Resize": "choices", "Site": "choices", "Pool": "choices",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
