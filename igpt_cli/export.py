"""Export a trained model directory for shipping: fp16 safetensors + configs, no run state.

    python -m igpt_cli.export RUN_DIR OUT_DIR
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from .model import load_pretrained, save_pretrained


def export_model(run_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    run_dir, out = Path(run_dir), Path(out_dir)
    model = load_pretrained(run_dir)
    save_pretrained(model, out, dtype=dtype)
    for name in ("preprocessor_config.json", "train_meta.json"):
        if (run_dir / name).exists():
            shutil.copyfile(run_dir / name, out / name)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(export_model(sys.argv[1], sys.argv[2]))
