"""An iGPT with a classification head: `IGPTClassifier`, saved and loaded as a Hugging Face
`ImageGPTForImageClassification` directory.

The head is transformers' own: a linear map without bias (`score`) of the average over
positions of the final representation (`ln_f` of the last block, `last_hidden_state`).
The backbone keeps its next-token head (`lm_head`) so one forward pass gives both the
class logits and the generative logits of the paper's joint fine-tuning objective; the
saved directory holds only what `ImageGPTForImageClassification` has (the backbone under
`transformer.` and `score.weight`), with `id2label`/`label2id` in its config.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointError, config_to_hf, find_weights, _read_state_dict, read_config, weight_map
from .igpt import IGPT, IGPTConfig

CLASSIFIER_ARCHITECTURE = "ImageGPTForImageClassification"


class IGPTClassifier(nn.Module):
    def __init__(self, cfg: IGPTConfig, num_labels: int):
        super().__init__()
        self.config = cfg
        self.num_labels = num_labels
        self.transformer = IGPT(cfg)
        self.score = nn.Linear(cfg.n_embd, num_labels, bias=False)
        nn.init.normal_(self.score.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, *, generative: bool = True):
        """(class logits [B, num_labels], next-token logits [B, T, vocab_size - 1] or None) for
        input tokens `idx` [B, T] (for an autoregressive model: the SOS-shifted tokens)."""
        L = self.config.n_layer
        h = self.transformer.forward_intermediates(idx, [L], pool=None)[L]  # ln_f of the last block: [B, T, C]
        logits = self.score(h.mean(dim=1))
        return logits, (self.transformer.lm_head(h) if generative else None)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def save_classifier(model: IGPTClassifier, model_dir: str | Path, class_names: list[str]) -> None:
    """config.json + model.safetensors that `transformers.ImageGPTForImageClassification` loads
    (with `id2label`), each written under a temporary name and renamed."""
    from safetensors.torch import save_file

    d = Path(model_dir)
    d.mkdir(parents=True, exist_ok=True)
    ours = model.transformer.state_dict()
    sd = {}
    for name, (hf, transposed) in weight_map(model.config.n_layer).items():
        if name == "lm_head.weight":  # ImageGPTForImageClassification has no next-token head
            continue
        v = ours[name].detach().to("cpu", torch.float32)
        sd[hf] = (v.t() if transposed else v).contiguous()
    sd["score.weight"] = model.score.weight.detach().to("cpu", torch.float32).contiguous()
    save_file(sd, str(d / ".model.safetensors.tmp"), metadata={"format": "pt"})
    os.replace(d / ".model.safetensors.tmp", d / "model.safetensors")
    cfg = config_to_hf(model.config)
    names = list(class_names) if class_names else [str(i) for i in range(model.num_labels)]
    cfg.update(architectures=[CLASSIFIER_ARCHITECTURE], num_labels=model.num_labels,
               id2label={str(i): n for i, n in enumerate(names)}, label2id={n: i for i, n in enumerate(names)})
    (d / ".config.json.tmp").write_text(json.dumps(cfg, indent=2) + "\n")
    os.replace(d / ".config.json.tmp", d / "config.json")


def load_classifier(model_dir: str | Path) -> tuple[IGPTClassifier, list[str]]:
    """A fine-tuned directory (`ImageGPTForImageClassification`) as (float32 classifier in eval
    mode, class names in label order); CheckpointError naming the file otherwise."""
    path = Path(model_dir) / "config.json"
    cfg = read_config(model_dir)
    try:
        raw = json.loads(path.read_text())
        id2label = {int(k): str(v) for k, v in raw.get("id2label", {}).items()}
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: bad id2label ({e})") from None
    weights = find_weights(model_dir)
    stored = _read_state_dict(weights)
    score = stored.get("score.weight")
    if not isinstance(score, torch.Tensor) or score.ndim != 2 or score.shape[1] != cfg.n_embd:
        raise CheckpointError(f"{weights}: no classification head (score.weight [num_labels, {cfg.n_embd}]); "
                              "not a fine-tuned model (igpt finetune writes one)")
    n = score.shape[0]
    if sorted(id2label) != list(range(n)):
        id2label = {i: str(i) for i in range(n)}
    model = IGPTClassifier(cfg, n)
    sd = {}
    for ours, (hf, transposed) in weight_map(cfg.n_layer).items():
        v = stored.get(hf)
        if v is None:
            if ours == "lm_head.weight":
                continue
            raise CheckpointError(f"{weights}: missing weight {hf}")
        sd[ours] = (v.t() if transposed else v).float()
    sd.setdefault("lm_head.weight", model.transformer.lm_head.weight.detach())
    try:
        model.transformer.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{weights}: weights do not fit config.json ({str(e).splitlines()[0][:160]})") from None
    with torch.no_grad():
        model.score.weight.copy_(score.float())
    return model.eval(), [id2label[i] for i in range(n)]
