"""Image GPT in plain PyTorch: one model code path for `extract` and `train`.

Architecture (Chen et al. 2020, and Hugging Face's `ImageGPTModel`):
GPT-2 blocks `x + attn(ln_1(x))`, `x + mlp(ln_2(x))`, a final `ln_f`, where every
layer norm is iGPT's own (no mean-centring, no bias) and the MLP activation is
`x * sigmoid(1.702 x)`. The LM head is untied. Hugging Face checkpoint directories
(`config.json` + `model.safetensors` or `pytorch_model.bin`) load unchanged.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

SITES = ("ln", "resid")


from .errors import InputError


class CheckpointError(InputError):
    """A model directory or checkpoint that cannot be loaded."""


@dataclass
class IGPTConfig:
    vocab_size: int = 513  # 512 palette colours + SOS
    n_positions: int = 1024  # height * width
    n_embd: int = 512
    n_layer: int = 24
    n_head: int = 8
    n_inner: int | None = None  # MLP width, 4 * n_embd when None
    layer_norm_epsilon: float = 1e-5

    @property
    def sos_token(self) -> int:
        return self.vocab_size - 1

    @property
    def mlp_width(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def side(self) -> int | None:
        """Image side for a square sequence (32 for n_positions=1024), else None."""
        s = math.isqrt(self.n_positions)
        return s if s * s == self.n_positions else None

    @classmethod
    def from_hf_dict(cls, d: dict) -> "IGPTConfig":
        names = {f.name for f in fields(cls)}
        kwargs = {k: d[k] for k in names if k in d and d[k] is not None}
        act = d.get("activation_function", "quick_gelu")
        if act != "quick_gelu":
            raise CheckpointError(f"activation_function {act!r} is not iGPT's quick_gelu")
        return cls(**kwargs)

    def to_hf_dict(self) -> dict:
        d = asdict(self)
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


class IGPTLayerNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight — no mean-centring, no bias."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # statistics in float32 whatever the compute dtype
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: IGPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: IGPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.mlp_width)
        self.c_proj = nn.Linear(cfg.mlp_width, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        return self.c_proj(h * torch.sigmoid(1.702 * h))


class Block(nn.Module):
    def __init__(self, cfg: IGPTConfig):
        super().__init__()
        self.ln_1 = IGPTLayerNorm(cfg.n_embd, cfg.layer_norm_epsilon)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = IGPTLayerNorm(cfg.n_embd, cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, ln_1x: torch.Tensor | None = None) -> torch.Tensor:
        """`ln_1x`: ln_1(x) when the caller already has it (feature taps), to skip recomputing it."""
        x = x + self.attn(self.ln_1(x) if ln_1x is None else ln_1x)
        return x + self.mlp(self.ln_2(x))


class IGPT(nn.Module):
    def __init__(self, cfg: IGPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = IGPTLayerNorm(cfg.n_embd, cfg.layer_norm_epsilon)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size - 1, bias=False)  # predicts colours, never SOS
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 scaled init of residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.wte(idx) + self.wpe(pos)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Next-token logits `[B, T, vocab_size - 1]` for input tokens `[B, T]`."""
        x = self.embed(idx)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def forward_intermediates(
        self, idx: torch.Tensor, layers: list[int], site: str = "ln"
    ) -> dict[int, torch.Tensor]:
        """Sequence-averaged features `{layer: [B, n_embd] float32}` for layers in 0..n_layer.

        site="ln": layer l < L is mean(ln_1 of block l applied to h_l), the paper's f_l;
        layer L is mean(ln_f(h_L)).
        site="resid": mean(h_l), exactly Hugging Face's `output_hidden_states`
        (whose last entry, like here, is ln_f(h_L)).
        Only the blocks up to the deepest requested layer run.
        """
        if site not in SITES:
            raise ValueError(f"site must be one of {SITES}, got {site!r}")
        L = self.config.n_layer
        wanted = set(layers)
        if not wanted or min(wanted) < 0 or max(wanted) > L:
            raise ValueError(f"layers must lie in 0..{L}, got {sorted(wanted)}")
        out: dict[int, torch.Tensor] = {}
        x = self.embed(idx)
        for i in range(max(wanted) + 1):
            tap = None
            if i in wanted:
                if i == L:
                    tap = self.ln_f(x)
                else:
                    tap = self.h[i].ln_1(x) if site == "ln" else x
                out[i] = tap.mean(dim=1, dtype=torch.float32)
            if i < L and i < max(wanted):
                x = self.h[i](x, tap if (site == "ln" and tap is not None) else None)
        return out

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def sos_shift(tokens: torch.Tensor, sos_token: int) -> torch.Tensor:
    """[t_0 … t_{n-1}] -> [SOS, t_0 … t_{n-2}], the input the original iGPT sees."""
    sos = torch.full_like(tokens[:, :1], sos_token)
    return torch.cat([sos, tokens[:, :-1]], dim=1)


# ---------------------------------------------------------------------------
# Hugging Face checkpoint directories
# ---------------------------------------------------------------------------
# HF keeps GPT-2's Conv1D layers, whose weights are stored [in, out]; ours are
# nn.Linear, [out, in]. These are the suffixes to transpose.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


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


def read_config(model_dir: str | Path) -> IGPTConfig:
    path = Path(model_dir) / "config.json"
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable config ({e})") from None
    try:
        return IGPTConfig.from_hf_dict(d)
    except TypeError as e:
        raise CheckpointError(f"{path}: bad config ({e})") from None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickle with code in it, …
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None


def hf_to_native(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of old .bin files, not weights
        k = k.removeprefix("transformer.")
        if k.endswith(_CONV1D):
            v = v.t()
        out[k] = v
    return out


def native_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if k.endswith(_CONV1D):
            v = v.t()
        out[k if k.startswith("lm_head") else f"transformer.{k}"] = v.contiguous()
    return out


def load_pretrained(model_dir: str | Path) -> IGPT:
    """Load a Hugging Face ImageGPT directory (never executes code from it)."""
    cfg = read_config(model_dir)
    weights = find_weights(model_dir)
    sd = hf_to_native(_read_state_dict(weights))
    model = IGPT(cfg)
    expected = model.state_dict()
    # ImageGPTModel (no head) checkpoints have no lm_head: features do not need it.
    if "lm_head.weight" not in sd:
        sd["lm_head.weight"] = expected["lm_head.weight"]
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise CheckpointError(f"{weights}: missing weights {missing[:3]}{'…' if len(missing) > 3 else ''}")
    for k, v in expected.items():
        if sd[k].shape != v.shape:
            raise CheckpointError(
                f"{weights}: {k} has shape {tuple(sd[k].shape)}, config.json implies {tuple(v.shape)}"
            )
    model.load_state_dict({k: sd[k].float() for k in expected}, strict=True)
    return model.eval()


def save_pretrained(model: IGPT, model_dir: str | Path, dtype: torch.dtype = torch.float32) -> None:
    """Write config.json + model.safetensors readable by `transformers` and by `load_pretrained`."""
    from safetensors.torch import save_file

    d = Path(model_dir)
    d.mkdir(parents=True, exist_ok=True)
    sd = native_to_hf({k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items()})
    # write-then-rename: a reader (or a kill) never sees half a file
    save_file(sd, str(d / ".model.safetensors.tmp"), metadata={"format": "pt"})
    os.replace(d / ".model.safetensors.tmp", d / "model.safetensors")
    (d / ".config.json.tmp").write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
    os.replace(d / ".config.json.tmp", d / "config.json")
