"""The iGPT model: `igpt.py` (the network and its feature API), `pooling.py` (token maps to
vectors) `checkpoint.py` (Hugging Face directories in and out) and `resolve.py` (what `--model` names),
`hub.py` (Hugging Face hub ids)."""
from __future__ import annotations

from ..choices import POOLS, SITES
from .checkpoint import (CheckpointError, config_from_hf, config_to_hf, find_weights, load_pretrained,
                         read_config, save_pretrained, weight_map)
from .igpt import IGPT, IGPTConfig, KVCache, sos_shift
from .pooling import pool_tokens
from .resolve import BUNDLED, list_models, resolve_model_dir

__all__ = ["IGPT", "IGPTConfig", "KVCache", "CheckpointError", "SITES", "POOLS", "pool_tokens", "sos_shift",
           "load_pretrained", "save_pretrained", "read_config", "find_weights", "resolve_model_dir",
           "config_from_hf", "config_to_hf", "weight_map", "BUNDLED", "list_models"]
