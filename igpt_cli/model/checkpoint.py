"""Hugging Face ImageGPT checkpoint directories: read, load, save, and find in the local cache.

A directory holds `config.json` and `model.safetensors` (or an older
`pytorch_model.bin`), as `transformers` writes for `ImageGPTForCausalImageModeling`
(or `ImageGPTModel`, which has no LM head and no `transformer.` prefix). Loading never
executes code from the directory: safetensors, or `torch.load(weights_only=True)`.

Weight names are translated by an explicit table (`weight_map`): our name -> the
Hugging Face name, and whether Hugging Face stores that weight transposed (GPT-2's
Conv1D layers keep [in, out]; ours are nn.Linear, [out, in]).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path

import torch

from ..errors import InputError
from .igpt import IGPT, IGPTConfig

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class CheckpointError(InputError):
    """A model directory or checkpoint that cannot be loaded."""


# ---------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------
def config_from_hf(d: dict) -> IGPTConfig:
    """An IGPTConfig from a Hugging Face ImageGPT config dict (unknown keys ignored)."""
    names = {f.name for f in fields(IGPTConfig)}
    kwargs = {k: d[k] for k in names if k in d and d[k] is not None}
    act = d.get("activation_function", "quick_gelu")
    if act != "quick_gelu":
        raise CheckpointError(f"activation_function {act!r} is not iGPT's quick_gelu")
    return IGPTConfig(**kwargs)


def config_to_hf(cfg: IGPTConfig) -> dict:
    """The config.json dict `transformers.ImageGPTConfig` reads for this model."""
    d = asdict(cfg)
    d.update(
        model_type="imagegpt",
        architectures=["ImageGPTForCausalImageModeling"],
        activation_function="quick_gelu",
        attn_pdrop=0.0,
        embd_pdrop=0.0,
        resid_pdrop=0.0,
        initializer_range=0.02,
        scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False,
        tie_word_embeddings=False,
        use_cache=False,
    )
    return d


def read_config(model_dir: str | Path) -> IGPTConfig:
    path = Path(model_dir) / "config.json"
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable config ({e})") from None
    try:
        return config_from_hf(d)
    except TypeError as e:
        raise CheckpointError(f"{path}: bad config ({e})") from None


# ---------------------------------------------------------------------------
# weight names
# ---------------------------------------------------------------------------
# Per block: our name (= the HF name after `transformer.h.<i>.`) -> stored transposed by HF.
BLOCK_WEIGHTS: dict[str, bool] = {
    "ln_1.weight": False,
    "attn.c_attn.weight": True,
    "attn.c_attn.bias": False,
    "attn.c_proj.weight": True,
    "attn.c_proj.bias": False,
    "ln_2.weight": False,
    "mlp.c_fc.weight": True,
    "mlp.c_fc.bias": False,
    "mlp.c_proj.weight": True,
    "mlp.c_proj.bias": False,
}
HF_PREFIX = "transformer."  # ImageGPTForCausalImageModeling's body; ImageGPTModel files lack it


def weight_map(n_layer: int) -> dict[str, tuple[str, bool]]:
    """Every weight of an `n_layer` IGPT: our name -> (Hugging Face name, stored transposed by HF)."""
    names = {"wte.weight": ("transformer.wte.weight", False), "wpe.weight": ("transformer.wpe.weight", False)}
    for i in range(n_layer):
        for name, transposed in BLOCK_WEIGHTS.items():
            names[f"h.{i}.{name}"] = (f"transformer.h.{i}.{name}", transposed)
    names["ln_f.weight"] = ("transformer.ln_f.weight", False)
    names["lm_head.weight"] = ("lm_head.weight", False)
    return names


# ---------------------------------------------------------------------------
# load and save
# ---------------------------------------------------------------------------
def find_weights(model_dir: str | Path) -> Path:
    d = Path(model_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d}: model directory not found")
    if not (d / "config.json").is_file():
        raise CheckpointError(f"{d}: no config.json in model directory")
    for name in WEIGHT_FILES:
        if (d / name).is_file():
            return d / name
    raise CheckpointError(f"{d}: no weights (expected {' or '.join(WEIGHT_FILES)})")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickle with code in it, …
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None


def load_pretrained(model_dir: str | Path) -> IGPT:
    """Load a Hugging Face ImageGPT directory as a float32 IGPT in eval mode (never executes code from it).

    Entries outside the weight map (the causal-mask buffers `attn.bias` and
    `attn.masked_bias` of old .bin files) are ignored. A checkpoint without `lm_head`
    (ImageGPTModel) keeps the freshly initialised head: features do not need it.
    """
    cfg = read_config(model_dir)
    weights = find_weights(model_dir)
    stored = _read_state_dict(weights)
    model = IGPT(cfg)
    expected = model.state_dict()
    sd, missing = {}, []
    for ours, (hf, transposed) in weight_map(cfg.n_layer).items():
        v = stored.get(hf, stored.get(hf.removeprefix(HF_PREFIX)))
        if v is None:
            if ours == "lm_head.weight":
                v = expected[ours]
            else:
                missing.append(ours)
                continue
        elif transposed:
            v = v.t()
        if v.shape != expected[ours].shape:
            raise CheckpointError(f"{weights}: {ours} has shape {tuple(v.shape)}, "
                                  f"config.json implies {tuple(expected[ours].shape)}")
        sd[ours] = v.float()
    if missing:
        raise CheckpointError(f"{weights}: missing weights {missing[:3]}{'…' if len(missing) > 3 else ''}")
    model.load_state_dict(sd, strict=True)
    return model.eval()


def save_pretrained(model: IGPT, model_dir: str | Path, dtype: torch.dtype = torch.float32) -> None:
    """Write config.json + model.safetensors readable by `transformers` and by `load_pretrained`."""
    from safetensors.torch import save_file

    d = Path(model_dir)
    d.mkdir(parents=True, exist_ok=True)
    ours = model.state_dict()
    sd = {}
    for name, (hf, transposed) in weight_map(model.config.n_layer).items():
        v = ours[name].detach().to("cpu", dtype)
        sd[hf] = (v.t() if transposed else v).contiguous()
    # write-then-rename: a reader (or a kill) never sees half a file
    save_file(sd, str(d / ".model.safetensors.tmp"), metadata={"format": "pt"})
    os.replace(d / ".model.safetensors.tmp", d / "model.safetensors")
    (d / ".config.json.tmp").write_text(json.dumps(config_to_hf(model.config), indent=2) + "\n")
    os.replace(d / ".config.json.tmp", d / "config.json")


# ---------------------------------------------------------------------------
# the local Hugging Face cache
# ---------------------------------------------------------------------------
def resolve_model_dir(model: str | Path) -> Path:
    """A directory as given, or a Hugging Face hub name (`openai/imagegpt-small`) found in the local HF cache."""
    p = Path(model)
    if p.is_dir() or "/" not in str(model) or str(model).startswith((".", "/", "~")):
        return p
    hub = Path(os.environ.get("HF_HUB_CACHE")
               or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    snaps = sorted((hub / f"models--{str(model).replace('/', '--')}" / "snapshots").glob("*/config.json"),
                   key=lambda c: c.stat().st_mtime)
    return snaps[-1].parent if snaps else p
