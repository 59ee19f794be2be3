"""Feature extraction: tokens in, per-layer iGPT features out.

Modules, one way: `sources.py` (what computes features: a model or the pixel baseline),
`stage.py` (`extract_features`: what a features file holds and how a batch is computed, run
by the stage kernel `igpt_cli.stage`, which also shards under torchrun), `images.py`
(`extract_image_features`: images straight to features) and `memory.py`
(`features_from_tokens`, `features_from_images`: arrays in, arrays out).
"""
from __future__ import annotations

from ..choices import STORE_DTYPES
from .images import extract_image_features
from .memory import features_from_images, features_from_tokens
from ..distributed import DistContext
from .sources import PIXELS, ModelSource, PixelSource
from .stage import ExtractResult, extract_features

__all__ = ["extract_features", "extract_image_features", "features_from_tokens", "features_from_images", "ExtractResult", "DistContext",
           "ModelSource", "PixelSource", "PIXELS", "STORE_DTYPES"]
