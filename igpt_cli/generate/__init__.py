"""The generative half of Image GPT: sample, complete and score images.

In memory (`decode.py`): `sample_images`, `complete_images`, `score_images`, over the one
cached decoding loop (`Decoder`) and the sampling rules in `sampling.py`. Files
(`stage.py`): `sample_file`, `complete_file`, `score_file` write tokens files or a
scores file, resumably, batch by batch (the stage kernel, `igpt_cli.stage`), and PNG figures
(`figures.py`).
"""
from __future__ import annotations

from ..model.runtime import has_lm_head
from .decode import Decoder, complete_images, sample_images, score_images
from .sampling import Sampling
from .stage import GenerateResult, ScoreResult, complete_file, sample_file, score_file

__all__ = ["Decoder", "Sampling", "GenerateResult", "ScoreResult", "complete_images", "has_lm_head",
           "sample_images", "score_images", "sample_file", "complete_file", "score_file"]
