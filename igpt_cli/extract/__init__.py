"""Feature extraction: tokens in, per-layer iGPT features out.

Modules, one way: `sources.py` (what computes features: a model or the pixel baseline),
`rows.py` (the row loop and partial files), `sharded.py` (torchrun shards, part files,
merge), `stage.py` (`extract_features`, the file stage), `images.py`
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
