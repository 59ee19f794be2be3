"""Hugging Face ImageGPT checkpoint directories: read, load and save (finding one by name: `resolve.py`).

A directory holds `config.json` and `model.safetensors` (or an older
`pytorch_model.bin`), as `transformers` writes for `ImageGPTForCausalImageModeling`
(or `ImageGPTModel`, which has no LM head and no `transformer.` prefix). Loading never
executes code from the directory: safetensors, or `torch.load(weights_only=True)`.

Weight names are translated by an explicit table (`weight_map`): our name -> the
Hugging Face name, and whether Hugging Face stores that weight transposed (GPT-2's
Conv1D layers keep [in, out]; ours are nn.Linear, [out, in]).

config.json is checked before anything is built (`CONFIG_LIMITS`: integer sizes in sane
ranges, `n_head` dividing `n_embd`), and the weights' shapes are compared with the ones
the config implies on a model built without memory (the meta device), so a bad or
absurd config is one CheckpointError naming config.json and the key, never an
allocation of hundreds of gigabytes.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import re
from dataclasses import asdict, fields
from pathlib import Path

import torch

from ..errors import InputError
from ..jsonfile import read_json
from .igpt import IGPT, OBJECTIVES, IGPTConfig

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
OBJECTIVE_KEY = "igpt_objective"  # config.json key of IGPTConfig.objective (transformers ignores it)
BERT_MODEL_TYPE = "imagegpt_bert"  # transformers has no BERT iGPT: its AutoModel refuses such a directory


class CheckpointError(InputError):
    """A model directory or checkpoint that cannot be loaded."""


# ---------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------
# integer keys -> (smallest, largest) accepted; iGPT-XL is 48 x 3072 at 64x64 = 4096 positions
CONFIG_LIMITS = {
    "vocab_size": (2, 65537),  # palette colours (uint16 tokens) + SOS
    "n_positions": (1, 65536),  # up to 256 x 256 images
    "n_embd": (1, 16384),
    "n_layer": (1, 1024),
    "n_head": (1, 16384),
    "n_inner": (1, 65536),
}


def _check_config(kwargs: dict) -> None:
    """Types and ranges of config values (CheckpointError `key=value: problem`)."""
    for key, (lo, hi) in CONFIG_LIMITS.items():
        if key not in kwargs:
            continue
        v = kwargs[key]
        if not isinstance(v, int) or isinstance(v, bool):
            raise CheckpointError(f"{key}={v!r}: must be an integer")
        if not lo <= v <= hi:
            raise CheckpointError(f"{key}={v}: must be between {lo} and {hi}")
    eps = kwargs.get("layer_norm_epsilon")
    if eps is not None and (not isinstance(eps, (int, float)) or isinstance(eps, bool)
                            or not math.isfinite(eps) or not 0 < eps < 1):
        raise CheckpointError(f"layer_norm_epsilon={eps!r}: must be a number between 0 and 1")
    if kwargs.get("objective", OBJECTIVES[0]) not in OBJECTIVES:
        raise CheckpointError(f"{OBJECTIVE_KEY}={kwargs['objective']!r}: expected one of {', '.join(OBJECTIVES)}")
    cfg = IGPTConfig(**kwargs)
    if cfg.n_embd % cfg.n_head:
        raise CheckpointError(f"n_head={cfg.n_head}: must divide n_embd={cfg.n_embd}")


def config_from_hf(d: dict) -> IGPTConfig:
    """An IGPTConfig from a Hugging Face ImageGPT config dict (unknown keys ignored).

    CheckpointError `key=value: problem` for a value of the wrong type or out of range."""
    if not isinstance(d, dict):
        raise CheckpointError(f"expected a JSON object, not {type(d).__name__}")
    names = {f.name for f in fields(IGPTConfig)} - {"objective"}
    kwargs = {k: d[k] for k in names if k in d and d[k] is not None}
    if d.get(OBJECTIVE_KEY) is not None:
        kwargs["objective"] = d[OBJECTIVE_KEY]
    act = d.get("activation_function", "quick_gelu")
    if act != "quick_gelu":
        raise CheckpointError(f"activation_function={act!r}: not iGPT's quick_gelu")
    _check_config(kwargs)
    return IGPTConfig(**kwargs)


def config_to_hf(cfg: IGPTConfig) -> dict:
    """The config.json dict `transformers.ImageGPTConfig` reads for this model (a BERT-objective
    model gets its own model_type and `igpt_objective`: transformers cannot run it)."""
    d = asdict(cfg)
    objective = d.pop("objective")
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
    if objective != "autoregressive":
        d.update({"model_type": BERT_MODEL_TYPE, "architectures": ["IGPTBertModel"], OBJECTIVE_KEY: objective})
    return d


def read_config(model_dir: str | Path) -> IGPTConfig:
    path = Path(model_dir) / "config.json"
    try:
        d = read_json(path, "model config")
    except InputError as e:
        raise CheckpointError(str(e)) from None
    try:
        return config_from_hf(d)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (TypeError, ValueError) as e:
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


def load_tensor_pickle(path: str | Path, **kw):
    """`torch.load` that never executes code (weights_only) and stays quiet: torch's warnings about
    what it refused would be a second stderr line next to the caller's one-line error."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True, **kw)


def why_unreadable(e: BaseException) -> str:
    """One line saying why `load_tensor_pickle` refused a file (torch's own messages run over many lines)."""
    text = str(e)
    if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in text:
        m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(r"Unsupported operand \d+", text)
        what = f" ({m.group(1) if m.groups() else m.group(0)})" if m else ""
        return f"it holds Python objects other than tensors{what}; refused, nothing in it was run"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)
    return f"unreadable: truncated or not a torch file ({first[:160]})"


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return load_tensor_pickle(path)
    except Exception as e:  # corrupt file, pickle with code in it, …
        if path.suffix == ".safetensors":
            first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {first[:160]})") from None
        raise CheckpointError(f"{path}: cannot read weights: {why_unreadable(e)}") from None


def load_pretrained(model_dir: str | Path) -> IGPT:
    """Load a Hugging Face ImageGPT directory (or a bundled model by name: `load_pretrained("igpt-cifar8")`)
    as a float32 IGPT in eval mode (never executes code from it).

    Entries outside the weight map (the causal-mask buffers `attn.bias` and
    `attn.masked_bias` of old .bin files) are ignored. A checkpoint without `lm_head`
    (ImageGPTModel) keeps the freshly initialised head: features do not need it.
    """
    from ..bundled import bundled_dir

    model_dir = bundled_dir(model_dir) or model_dir
    cfg = read_config(model_dir)
    weights = find_weights(model_dir)
    stored = _read_state_dict(weights)
    if not isinstance(stored, dict) or not all(isinstance(v, torch.Tensor) for v in stored.values()):
        raise CheckpointError(f"{weights}: not a state dict of tensors")
    with torch.device("meta"):  # the shapes config.json implies, without allocating the model
        expected = IGPT(cfg).state_dict()
    sd, missing = {}, []
    for ours, (hf, transposed) in weight_map(cfg.n_layer).items():
        v = stored.get(hf, stored.get(hf.removeprefix(HF_PREFIX)))
        if v is None:
            if ours != "lm_head.weight":  # no head (ImageGPTModel): the fresh one is kept below
                missing.append(ours)
            continue
        if transposed:
            v = v.t()
        if v.shape != expected[ours].shape:
            raise CheckpointError(f"{weights}: {ours} has shape {tuple(v.shape)}, "
                                  f"config.json implies {tuple(expected[ours].shape)}")
        sd[ours] = v.float()
    if missing:
        raise CheckpointError(f"{weights}: missing weights {missing[:3]}{'…' if len(missing) > 3 else ''}")
    model = IGPT(cfg)
    sd.setdefault("lm_head.weight", model.state_dict()["lm_head.weight"])
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
