"""The one model runtime every stage runs a checkpoint with: resolve → check → load → device/dtype
→ batch size from memory → the one model-vs-tokens check.

`open_model(model, device=…, dtype=…, dist=…)` resolves what `model` names
(`resolve_model_dir`: a directory, bundled name, hub id at a revision, TF prefix), reads its
config and palette and picks the device (under torchrun `DistContext.device_for`: each rank
its own GPU) and compute dtype, all before any weight is read; `OpenedModel.load()` then
loads it once. `OpenedModel.check_tokens(height, width, palette, path)` is the one check
that a tokens file fits the model: image size, palette size, and — when the model names its
palette (`clusters` in its `preprocessor_config.json`) — the palette's colours themselves,
so tokens quantized with another palette are refused by every command alike. A model that
names no palette (a bare `config.json` + weights) cannot say which colours its tokens mean:
only the palette's size is checked then.

Batch sizes come from one memory probe (`available_memory`): `feature_batch_size` for a
forward pass over whole images (extract, features, score), `decode_batch_size` for cached
decoding (sample, complete). `ready_model` is the in-memory functions' door (an `IGPT` as
it is, or a directory loaded).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..jsonfile import read_json
from ..errors import InputError, ParameterError
from ..palette import Palette, PaletteError
from ..runtime import resolve_device, resolve_dtype
from .checkpoint import CheckpointError, find_weights, load_pretrained, load_tensor_pickle, read_config
from .igpt import IGPT, IGPTConfig, KVCache
from .resolve import resolve_model_dir

PALETTE_TOLERANCE = 1e-3  # palettes whose colours differ by less are the same palette (float32 round trips)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------
# memory and batch sizes
# ---------------------------------------------------------------------------
def _read_int(path: str, field: str | None = None) -> int | None:
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    if field is None:
        return int(text) if text.strip().isdigit() else None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # /proc/meminfo counts kB
    return None


def available_memory(device: torch.device) -> int | None:
    """Bytes the device can still hand out (None where unknown): free GPU memory, or the host's
    available memory (capped by a cgroup limit) for the CPU and MPS."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # pragma: no cover - driver trouble: do not guess
            return None
    have = [v for v in (_read_int("/proc/meminfo", "MemAvailable"), _read_int("/sys/fs/cgroup/memory.max"))
            if v is not None]
    if not have:
        try:
            have = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")]
        except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
            return None
    return min(have)


def _budget(device: torch.device) -> float:
    """The share of free memory a batch may take: half a GPU's, a quarter of the host's."""
    have = available_memory(device)
    if have is None:
        return float(1 << 30)
    return (0.5 if device.type == "cuda" else 0.25) * have


GPU_BATCH_TOKENS = 1 << 18  # tokens per forward on a GPU: 256 images of 1024 tokens, 4096 of 64
CPU_BATCH_TOKENS = 8192  # a CPU's throughput saturates once a batch holds a few thousand tokens
HOST_COPIES = 4  # host copies of a batch's output alive at once: computed, queued, being written, cast


def feature_batch_size(cfg: IGPTConfig, device: torch.device, dtype: torch.dtype, *, host_row_bytes: int = 0) -> int:
    """Images per forward pass over whole images (extract, features, score): matmuls large,
    activations well inside memory. Capped by tokens (GPU_BATCH_TOKENS, CPU_BATCH_TOKENS), so a
    short sequence gets many images per batch and a long one few; `host_row_bytes` (one image's
    output on the host, e.g. token maps of every tapped layer) also caps it by host memory."""
    T, C = cfg.n_positions, cfg.n_embd
    elt = torch.finfo(dtype).bits // 8
    # live activations of one block for one image: residual, ln, qkv, attention out, MLP hidden
    # (+ activation), float32 layer-norm copies, the attention scores of a non-fused SDPA path,
    # and the float32 logits of a scoring pass
    per_image = (T * (C * (2 + 3 + 1 + 2 * (cfg.mlp_width // C) + 2) * elt + C * 8) + cfg.n_head * T * T * 4
                 + T * cfg.vocab_size * 4)
    by_mem = int(max(1, _budget(device) // per_image))
    if host_row_bytes > 0:
        host = torch.device("cpu")
        by_mem = min(by_mem, int(max(1, _budget(host) // (HOST_COPIES * host_row_bytes))))
    if device.type == "cuda":
        return int(max(1, min(by_mem, GPU_BATCH_TOKENS // T)))
    if device.type == "cpu":
        return int(max(1, min(by_mem, CPU_BATCH_TOKENS // T)))
    return min(8, by_mem)


def cache_dtype_for(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The KV cache's dtype for a model computing in `dtype` on `device`: float32 on a CPU
    (a CPU's bfloat16 attention over a cache runs ~10x slower than its float32 one, measured
    in bench/bench_decode.py; the keys and values are stored exactly either way), else `dtype`."""
    return torch.float32 if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) else dtype


def decode_batch_size(cfg: IGPTConfig, device: torch.device, dtype: torch.dtype) -> int:
    """Rows decoded at once (sample, complete): each holds a KV cache of all positions plus the
    activations of its prompt's one full forward."""
    elt = torch.finfo(dtype).bits // 8
    T, C = cfg.n_positions, cfg.n_embd
    prefill = T * C * (8 + 2 * cfg.mlp_width // C) * elt + cfg.n_head * T * T * 4 + T * cfg.vocab_size * 4
    per_row = KVCache.bytes_for(cfg, 1, cache_dtype_for(device, dtype)) + prefill
    cap = 512 if device.type == "cuda" else 64  # a CPU's matmuls are saturated well before 64 rows
    return int(max(1, min(cap, _budget(device) // per_row)))


# ---------------------------------------------------------------------------
# what a checkpoint can do
# ---------------------------------------------------------------------------
def has_lm_head(weights: Path) -> bool:
    """Whether a checkpoint file stores `lm_head.weight` (ImageGPTForCausalImageModeling does,
    ImageGPTModel does not). Unreadable files say True: loading reports them properly."""
    try:
        if weights.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(weights), "pt") as f:
                return "lm_head.weight" in set(f.keys())
        return "lm_head.weight" in load_tensor_pickle(weights, mmap=True)
    except Exception:
        return True


def check_autoregressive(cfg: IGPTConfig, where: str | Path) -> None:
    """CheckpointError for a BERT-objective model: it cannot sample, complete or score left to right."""
    if not cfg.autoregressive:
        raise CheckpointError(f"{where}: a BERT-objective model is not autoregressive, so it cannot sample, "
                              "complete or score images left to right (use it for features: igpt extract)")


def check_generative(model_dir: Path) -> Path:
    """The weights file of a checkpoint that can generate (autoregressive, has an LM head), else CheckpointError."""
    weights = find_weights(model_dir)
    check_autoregressive(read_config(model_dir), model_dir)
    if not has_lm_head(weights):
        raise CheckpointError(f"{model_dir}: the checkpoint has no LM head (a transformers ImageGPTModel, not "
                              f"ImageGPTForCausalImageModeling), so it cannot generate or score images")
    return weights


def model_palette(model_dir: Path) -> Palette | None:
    """The palette a model names (`clusters` of its preprocessor_config.json), or None when it names none."""
    pre = model_dir / "preprocessor_config.json"
    if not pre.is_file():
        return None
    d = read_json(pre, "preprocessor config")
    if not isinstance(d, dict) or d.get("clusters") is None:
        return None
    try:
        return Palette.load(pre)
    except PaletteError as e:
        raise InputError(str(e)) from None


def model_image_settings(model_dir: Path) -> tuple[int | None, Palette | None]:
    """(size, palette) a model was trained with: its ``preprocessor_config.json`` (size, clusters),
    else ``config.json`` (size = sqrt(n_positions)) and the official iGPT palette when the model
    has 512 colours; None where neither says."""
    cfg = read_config(model_dir)
    size = cfg.side
    h, w = _preprocessor_size(model_dir)
    if h is not None and h == w:
        size = h
    palette = model_palette(model_dir)
    if palette is None and cfg.vocab_size - 1 == 512:
        palette = Palette.default()
    return size, palette


def _preprocessor_size(model_dir: Path) -> tuple[int | None, int | None]:
    try:
        s = read_json(model_dir / "preprocessor_config.json", "preprocessor config").get("size")
    except (InputError, AttributeError):
        return None, None
    h, w = (s.get("height"), s.get("width")) if isinstance(s, dict) else (s, s)
    ok = isinstance(h, int) and isinstance(w, int) and not isinstance(h, bool) and h > 0 and w > 0
    return (h, w) if ok else (None, None)


def load_model(model_dir: str | Path, device: torch.device, dtype: torch.dtype) -> IGPT:
    """Load a checkpoint directory onto `device` with weights cast to `dtype` (no autocast)."""
    model = load_pretrained(model_dir)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


# ---------------------------------------------------------------------------
# a checkpoint opened for a stage
# ---------------------------------------------------------------------------
@dataclass
class OpenedModel:
    """A checkpoint resolved and checked, its device and dtype chosen; `load()` reads the weights."""

    dir: Path
    weights: Path
    cfg: IGPTConfig
    device: torch.device
    dtype: torch.dtype
    palette: Palette | None  # the palette the model names (preprocessor_config.json), else None
    net: IGPT | None = None
    sha256: str = ""

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    @property
    def config_json(self) -> str:
        from .checkpoint import config_to_hf

        return json.dumps(config_to_hf(self.cfg), sort_keys=True)

    def load(self) -> IGPT:
        """The network on its device and dtype (loaded once), with `sha256` of its weights file."""
        if self.net is None:
            from ..formats import sha256_file

            self.net = load_model(self.dir, self.device, self.dtype)
            self.sha256 = sha256_file(self.weights)
        return self.net

    def image_size(self) -> tuple[int, int]:
        """height, width of the model's images: preprocessor_config.json's size, else the square side."""
        h, w = _preprocessor_size(self.dir)
        if h is not None and h * w == self.cfg.n_positions:
            return h, w
        if self.cfg.side is None:
            raise InputError(f"{self.dir}: n_positions={self.cfg.n_positions} is not a square image and "
                             "preprocessor_config.json gives no size")
        return self.cfg.side, self.cfg.side

    def check_tokens(self, height: int, width: int, palette: np.ndarray, where: str | Path) -> None:
        """The one model-vs-tokens check: image size, palette size, and the palette's colours when
        the model names its palette (InputError naming the file)."""
        check_model_fits(self.cfg, height, width, len(palette), where)
        if self.palette is None:
            return  # the model names no palette: its tokens' colours cannot be checked
        mine = self.palette.centers
        palette = np.asarray(palette)
        if mine.shape != palette.shape or float(np.abs(mine - palette).max()) >= PALETTE_TOLERANCE:
            raise InputError(f"{where}: its palette ({len(palette)} colours) is not the model's "
                             f"({self.dir}/preprocessor_config.json); quantize with --palette {self.dir}")


def check_model_fits(cfg: IGPTConfig, height: int, width: int, palette_size: int, where: str | Path) -> None:
    """Refuse tokens whose image size or palette size the model cannot take (InputError naming the file)."""
    if height * width != cfg.n_positions:
        side = cfg.side
        want = f"{side}x{side} images" if side else f"{cfg.n_positions} positions"
        raise InputError(f"{where}: images are {height}x{width} ({height * width} positions) "
                         f"but the model wants {want} (n_positions={cfg.n_positions}); "
                         f"quantize at that resolution")
    if palette_size > cfg.vocab_size - 1:
        raise InputError(f"{where}: palette has {palette_size} colours but the model knows "
                         f"{cfg.vocab_size - 1} (vocab_size={cfg.vocab_size} incl. SOS)")


def open_model(model: str | Path, *, device: str = "auto", dtype: str = "auto", revision: str | None = None,
               local_files_only: bool = False, quiet: bool = False, dist=None,
               generative: bool = False) -> OpenedModel:
    """Resolve and check the checkpoint `model` names and choose its device and dtype; nothing is
    loaded yet. `generative`: it must be able to generate (autoregressive, an LM head).
    `dist` (a DistContext): under a launcher each rank takes its own GPU."""
    model_dir = resolve_model_dir(model, revision=revision, local_files_only=local_files_only, quiet=quiet)
    weights = check_generative(model_dir) if generative else find_weights(model_dir)
    cfg = read_config(model_dir)
    dev = resolve_device(device)
    if dist is not None:
        dev = dist.device_for(dev)
    return OpenedModel(model_dir, weights, cfg, dev, resolve_dtype(dtype, dev), model_palette(model_dir))


def ready_model(model: IGPT | str | Path, device: str = "auto", dtype: str = "auto", *, generative: bool = False
                ) -> tuple[IGPT, torch.device, torch.dtype]:
    """The model to run in memory, its device and compute dtype: an IGPT as it is unless told
    otherwise (other values move and cast it in place), or a directory loaded onto the resolved
    device and dtype. `generative`: refuse a model that cannot generate (no LM head, BERT)."""
    if isinstance(model, IGPT):
        if generative:
            check_autoregressive(model.config, "model")
        p = next(model.parameters())
        dev = p.device if device == "auto" else resolve_device(device)
        cdt = p.dtype if dtype == "auto" else resolve_dtype(dtype, dev)
        if (dev, cdt) != (p.device, p.dtype):
            model.to(device=dev, dtype=cdt)
        return model.eval(), dev, cdt
    m = open_model(model, device=device, dtype=dtype, quiet=True, generative=generative)
    return m.load(), m.device, m.dtype


def check_tokens_array(tokens, cfg: IGPTConfig) -> np.ndarray:
    """Palette-token images as an integer array [N, n_positions] with values the model knows (else ParameterError)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] != cfg.n_positions:
        raise ParameterError("tokens", tokens.shape, f"expected [N, {cfg.n_positions}] palette indices "
                                                     f"(the model's n_positions)")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ParameterError("tokens", str(tokens.dtype), "expected integer palette indices")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= cfg.vocab_size - 1):
        raise ParameterError("tokens", (int(tokens.min()), int(tokens.max())),
                             f"values must lie in 0..{cfg.vocab_size - 2} (the model's palette)")
    return tokens
