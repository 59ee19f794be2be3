"""Image GPT in plain PyTorch, in one file: the model `extract` and `train` both run.

Architecture (Chen et al. 2020, and Hugging Face's `ImageGPTModel`): GPT-2 blocks
`x + attn(ln_1(x))`, `x + mlp(ln_2(x))` and a final `ln_f`, where every layer norm is
iGPT's own (no mean-centring, no bias) and the MLP activation is quick_gelu,
`x * sigmoid(1.702 x)`. Attention is causal SDPA. The LM head is untied and predicts
the palette colours only (never SOS).

Features: `forward_intermediates` returns the token maps (or their pooled vectors) of
the requested layers, running only the blocks it needs. Loading and saving Hugging
Face checkpoint directories lives in `checkpoint.py`.

BERT-objective models (OpenAI's `igpt-{s,m,l}-bert` release, `objective="bert"`): the same
weights, but attention is bidirectional, there is no SOS shift (the input is the image's own
tokens) and the token embeddings of masked positions are zeroed (the original multiplies them
by the keep mask). `keep` [B, T] (True = visible) is that mask; `forward_intermediates` draws
it by default as OpenAI's evaluation did (`bert_keep_mask`, see there).

Generation: `forward(idx, cache=KVCache(...))` runs the same blocks incrementally. The
cache is preallocated for `n_positions` (keys and values of every layer, written in
place, never grown by concatenation); each call appends the keys and values of its
tokens at `cache.pos` and attends to everything before them (a `static` cache: over all
positions with a mask, so that every step has the same shapes). Without a cache
(extract, train) nothing changes.

Shapes: B images, T = n_positions tokens, C = n_embd channels, H heads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils.checkpoint
import numpy as np
import torch.nn.functional as F

from ..choices import POOLS, SITES
from ..errors import ParameterError, check_choice
from .pooling import pool_tokens


OBJECTIVES = ("autoregressive", "bert")
# OpenAI's BERT models were trained, and evaluated (run.py --eval builds the same graph), with each
# token masked with probability 0.15: `M = uniform([B, T]) > bert_mask_prob`.
BERT_MASK_PROB = 0.15


@dataclass
class IGPTConfig:
    vocab_size: int = 513  # 512 palette colours + SOS
    n_positions: int = 1024  # height * width
    n_embd: int = 512
    n_layer: int = 24
    n_head: int = 8
    n_inner: int | None = None  # MLP width, 4 * n_embd when None
    layer_norm_epsilon: float = 1e-5
    objective: str = "autoregressive"  # or "bert" (OBJECTIVES)

    @property
    def autoregressive(self) -> bool:
        return self.objective == "autoregressive"

    @property
    def sos_token(self) -> int | None:
        """The SOS token (the last of the vocabulary); None for a BERT model, which has no SOS shift."""
        return self.vocab_size - 1 if self.autoregressive else None

    @property
    def mlp_width(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def side(self) -> int | None:
        """Image side for a square sequence (32 for n_positions=1024), else None."""
        s = math.isqrt(self.n_positions)
        return s if s * s == self.n_positions else None


class LayerNorm(nn.Module):
    """iGPT's layer norm: x / sqrt(mean(x^2) + eps) * weight — no mean-centring, no bias.

    That is an RMS norm, so it runs as PyTorch's `F.rms_norm` (one fused kernel; the
    statistics are float32 inside it whatever the compute dtype, the output is x's dtype)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)  # (autocast: fp32 weight)
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)


class KVCache:
    """Keys and values of every layer for a batch, preallocated for `max_len` positions.

    `k`, `v`: [n_layer, B, H, max_len, C/H]; positions `0 .. pos-1` are filled. A forward
    with the cache writes its T tokens at `pos .. pos+T-1` (in place) and advances `pos`.

    `dtype` may be wider than the model's (a float32 cache for a bfloat16 model: keys and
    values stored exactly, attention computed in float32, its output cast back).

    `static=True`: every step has the same shapes, whatever its position (what a CUDA graph
    or `torch.compile(mode="reduce-overhead")` needs): attention runs over all `max_len`
    positions with a mask (the unfilled ones masked out, so the buffers start zeroed), the
    new keys and values go in with `index_copy_`, and the position lives on the device too
    (`position`, advanced in place). Same logits as the default (sliced) cache up to float
    rounding; the sliced one reads only the filled part, which a CPU step prefers.
    """

    def __init__(self, cfg: IGPTConfig, batch: int, *, device=None, dtype: torch.dtype = torch.float32,
                 max_len: int | None = None, static: bool = False):
        max_len = cfg.n_positions if max_len is None else max_len
        if not 1 <= max_len <= cfg.n_positions:
            raise ParameterError("max_len", max_len, f"must lie in 1..{cfg.n_positions} (n_positions)")
        shape = (cfg.n_layer, batch, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)
        alloc = torch.zeros if static else torch.empty  # masked positions still enter q.k: keep them finite
        self.k = alloc(shape, device=device, dtype=dtype)
        self.v = alloc(shape, device=device, dtype=dtype)
        self.max_len, self.pos, self.static = max_len, 0, static
        self.position = torch.zeros((), dtype=torch.int64, device=device) if static else None
        self.keys = torch.arange(max_len, device=device) if static else None  # [max_len]

    @staticmethod
    def bytes_for(cfg: IGPTConfig, batch: int, dtype: torch.dtype, max_len: int | None = None) -> int:
        """Memory of a cache for `batch` sequences (keys and values of all layers)."""
        per_pos = 2 * cfg.n_layer * cfg.n_embd * (torch.finfo(dtype).bits // 8)
        return batch * (cfg.n_positions if max_len is None else max_len) * per_pos

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def reset(self) -> None:
        self.pos = 0
        if self.position is not None:
            self.position.zero_()


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: IGPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.causal = cfg.autoregressive  # BERT models attend both ways
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                pos: int = 0, static: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`kv`: this layer's (keys, values) cache buffers [B, H, max_len, C/H]; x holds positions pos.. .
        `static`: (positions [T], mask [T, max_len]) of a static cache (`KVCache(static=True)`)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x [B, T, C]
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # [B, H, T, C/H]
        if kv is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # [B, H, T, C/H]
        elif static is not None:  # fixed shapes: write at the device-side positions, attend over max_len, masked
            positions, mask = static
            kbuf, vbuf = kv
            kbuf.index_copy_(2, positions, k.to(kbuf.dtype))
            vbuf.index_copy_(2, positions, v.to(vbuf.dtype))
            y = F.scaled_dot_product_attention(q.to(kbuf.dtype), kbuf, vbuf, attn_mask=mask).to(x.dtype)
        else:
            kbuf, vbuf = kv
            q = q.to(kbuf.dtype)  # a float32 cache under a bfloat16 model: attention in float32
            kbuf[:, :, pos:pos + T] = k  # in place: the cache never grows
            vbuf[:, :, pos:pos + T] = v
            k, v = kbuf[:, :, :pos + T], vbuf[:, :, :pos + T]  # [B, H, pos+T, C/H]
            if T == 1 or pos == 0:  # one new token sees everything; a first chunk is plain causal
                y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
            else:  # a later chunk: query i (position pos+i) sees keys 0..pos+i
                keys = torch.arange(pos + T, device=x.device)
                mask = keys[None, :] <= (pos + torch.arange(T, device=x.device))[:, None]  # [T, pos+T]
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            y = y.to(x.dtype)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))  # [B, T, C]


GELU_SCALE = 1.702  # quick_gelu(h) = h * sigmoid(1.702 h) = silu(1.702 h) / 1.702


class MLP(nn.Module):
    """c_proj(quick_gelu(c_fc(x))) with one element-wise pass over the wide hidden tensor: the
    1.702 scale rides in c_fc's product (`addmm` alpha/beta: 1.702 (x W^T + b)) and its inverse
    in c_proj's, so quick_gelu is a plain SiLU (in place when no gradient is recorded)."""

    def __init__(self, cfg: IGPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.mlp_width)
        self.c_proj = nn.Linear(cfg.mlp_width, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [B*T, C]
        fc, proj = self.c_fc, self.c_proj
        h = torch.addmm(fc.bias, x, fc.weight.t(), beta=GELU_SCALE, alpha=GELU_SCALE)  # [B*T, mlp_width]
        h = F.silu(h, inplace=not torch.is_grad_enabled())  # = 1.702 quick_gelu(c_fc(x))
        y = torch.addmm(proj.bias, h, proj.weight.t(), alpha=1.0 / GELU_SCALE)  # c_proj(quick_gelu(c_fc(x)))
        return y.view(*shape[:-1], y.shape[-1])  # [B, T, C]


class Block(nn.Module):
    def __init__(self, cfg: IGPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, ln_1x: torch.Tensor | None = None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None, pos: int = 0,
                static: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`ln_1x`: ln_1(x) when the caller already has it (a feature tap), so it is not recomputed.
        `kv`, `pos`: this block's KV-cache buffers and the position of x's first token (generation);
        `static`: a static cache's (positions, mask)."""
        x = x + self.attn(self.ln_1(x) if ln_1x is None else ln_1x, kv, pos, static)
        return x + self.mlp(self.ln_2(x))


class IGPT(nn.Module):
    def __init__(self, cfg: IGPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size - 1, bias=False)  # predicts colours, never SOS
        # training only: recompute each block's activations in the backward pass instead of keeping
        # them (activation checkpointing: memory of one block's activations, ~1/3 more compute)
        self.activation_checkpointing = False
        self._compiled_block = None  # torch.compile'd `run_block` (`compile_blocks`), else None: eager
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

    def compile_blocks(self, enabled: bool = True, **compile_kw) -> None:
        """Run the blocks through `torch.compile` (one graph serves every block; inductor fuses
        the norms, the activation and the residual adds), or eagerly again with `enabled=False`.

        Opt-in: the first call compiles (tens of seconds on a CPU, see docs/performance.md),
        which pays only on long runs. Where compilation is unavailable (no C++
        compiler for inductor on a CPU, no Triton on a GPU, an inductor error), the first
        call falls back to eager blocks, silently and for good. Only full-sequence forwards
        (features, scores, training) use it; cached decoding steps stay eager."""
        self._compiled_block = torch.compile(run_block, **compile_kw) if enabled else None

    def _block(self, i: int, x: torch.Tensor, ln_1x: torch.Tensor | None = None) -> torch.Tensor:
        """Block i on x (no cache), compiled when `compile_blocks` asked for it and it works."""
        compiled = self._compiled_block
        if compiled is not None:
            try:
                return compiled(self.h[i], x, ln_1x)
            except Exception:  # compilation unavailable here: eager from now on (the block is pure, rerun it)
                self._compiled_block = None
        return self.h[i](x, ln_1x)

    def embed(self, idx: torch.Tensor, start: int | torch.Tensor = 0, keep: torch.Tensor | None = None
              ) -> torch.Tensor:
        """Token + position embeddings: tokens [B, T] at positions start.. -> [B, T, C]
        (`start` may be the positions themselves, a tensor [T]).
        `keep` [B, T]: token embeddings where it is False (masked, BERT) are zeroed."""
        pos = start if isinstance(start, torch.Tensor) else torch.arange(start, start + idx.shape[1],
                                                                         device=idx.device)
        tok = self.wte(idx)  # [B, T, C]
        if keep is not None:
            tok = tok * keep.to(device=tok.device, dtype=tok.dtype)[..., None]
        return tok + self.wpe(pos)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, *, last_only: bool = False,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits `[B, T, vocab_size - 1]` for input tokens `[B, T]`.

        With `cache` the tokens sit at positions `cache.pos ..` after those already in the
        cache (whose keys and values are reused), and the cache advances by T.
        `last_only`: logits of the last position only, `[B, vocab_size - 1]`.
        `keep` [B, T] (BERT models): visible positions; None = all visible.
        """
        pos = 0 if cache is None else cache.pos
        T = idx.shape[1]
        if cache is not None:
            if idx.shape[0] != cache.k.shape[1]:
                raise ParameterError("idx", tuple(idx.shape), f"batch does not match the cache's {cache.k.shape[1]}")
            if pos + T > cache.max_len:
                raise ParameterError("idx", tuple(idx.shape), f"{T} more tokens overflow the cache "
                                                              f"({pos} of {cache.max_len} positions used)")
        if cache is not None and not self.config.autoregressive:
            raise ParameterError("cache", "KVCache", "a BERT-objective model is not autoregressive")
        static = None
        if cache is not None and cache.static:  # positions and mask from the device-side position: fixed shapes
            positions = cache.position + torch.arange(T, device=idx.device)  # [T]
            static = positions, cache.keys[None, :] <= positions[:, None]  # [T], [T, max_len]
        x = self.embed(idx, pos if static is None else static[0], keep)  # [B, T, C]
        recompute = self.activation_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.h):
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            elif cache is None:
                x = self._block(i, x)
            else:
                x = block(x, kv=(cache.k[i], cache.v[i]), pos=pos, static=static)
        if cache is not None:
            cache.pos = pos + T
            if static is not None:
                cache.position += T
        if last_only:
            x = x[:, -1]  # [B, C]
        return self.lm_head(self.ln_f(x))  # [B, T, vocab_size - 1] (or [B, vocab_size - 1])

    def forward_intermediates(self, idx: torch.Tensor, layers, site: str = "ln", pool: str | None = "mean",
                              bert_mask: float | torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """Features of `layers` (in 0..n_layer) for input tokens `[B, T]`.

        site="ln": layer l < L is ln_1 of block l applied to h_l, the paper's f_l;
        layer L is ln_f(h_L). site="resid": h_l itself, exactly Hugging Face's
        `output_hidden_states` (whose last entry, like here, is ln_f(h_L)).
        pool=None or "none": token maps `{layer: [B, T, C]}` in the compute dtype;
        pool="mean": the paper's average over positions, "max": the maximum over positions,
        `{layer: [B, C]}` float32 (`pooling.pool_tokens`).
        Only the blocks up to the deepest requested layer run.
        `bert_mask` (BERT models only; `idx` is then the image's tokens, not SOS-shifted):
        None = OpenAI's evaluation, a random BERT_MASK_PROB mask (`bert_keep_mask`); a
        probability (0 = nothing masked); or the keep mask itself, a bool tensor [B, T].
        """
        site = check_choice("site", site, SITES)
        pool = None if pool is None else check_choice("pool", pool, POOLS)
        L = self.config.n_layer
        wanted = sorted({int(layer) for layer in layers})
        if not wanted or wanted[0] < 0 or wanted[-1] > L:
            raise ParameterError("layers", wanted, f"must lie in 0..{L}")
        deepest = wanted[-1]
        out: dict[int, torch.Tensor] = {}
        x = self.embed(idx, keep=self.keep_for(idx, bert_mask))  # [B, T, C]
        for i in range(deepest + 1):
            tap = None
            if i in wanted:
                if i == L:
                    tap = self.ln_f(x)
                else:
                    tap = self.h[i].ln_1(x) if site == "ln" else x  # [B, T, C]
                out[i] = tap if pool is None else pool_tokens(tap, pool)  # [B, T, C] or [B, C] float32
            if i < deepest:  # early exit: no block beyond the deepest tap runs
                x = self._block(i, x, tap if site == "ln" else None)  # reuse ln_1(x) when tapped
        return out

    def keep_for(self, idx: torch.Tensor, bert_mask: float | torch.Tensor | None) -> torch.Tensor | None:
        """The keep mask [B, T] that `bert_mask` means for tokens `idx` (None: nothing masked)."""
        if self.config.autoregressive:
            if bert_mask is not None:
                raise ParameterError("bert_mask", bert_mask, "only BERT-objective models mask their input")
            return None
        if isinstance(bert_mask, torch.Tensor):
            if tuple(bert_mask.shape) != tuple(idx.shape):
                raise ParameterError("bert_mask", tuple(bert_mask.shape), f"must have the tokens' shape "
                                                                          f"{tuple(idx.shape)}")
            return bert_mask
        prob = BERT_MASK_PROB if bert_mask is None else float(bert_mask)
        if not 0.0 <= prob < 1.0:
            raise ParameterError("bert_mask", bert_mask, "a masking probability must lie in [0, 1)")
        return None if prob == 0.0 else bert_keep_mask(idx, prob).to(idx.device)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def run_block(block: Block, x: torch.Tensor, ln_1x: torch.Tensor | None) -> torch.Tensor:
    """`block(x, ln_1x)`: the function `IGPT.compile_blocks` compiles (one graph for every block)."""
    return block(x, ln_1x)


def sos_shift(tokens: torch.Tensor, sos_token: int | None) -> torch.Tensor:
    """[t_0 … t_{n-1}] -> [SOS, t_0 … t_{n-2}], the input the original iGPT sees: [B, T] -> [B, T].
    `sos_token` None (a BERT model's `config.sos_token`): the tokens themselves, unshifted."""
    if sos_token is None:
        return tokens
    sos = torch.full_like(tokens[:, :1], sos_token)
    return torch.cat([sos, tokens[:, :-1]], dim=1)


def bert_keep_mask(tokens: torch.Tensor | np.ndarray, prob: float = BERT_MASK_PROB, seed: int = 0) -> torch.Tensor:
    """OpenAI's BERT input mask, reproducibly: bool [B, T] on the host, False (masked) with probability `prob`.

    The original draws `uniform > prob` afresh on every run; here each row's uniforms come
    from a generator seeded with (`seed`, the row's tokens), so an image gets the same mask
    whatever its batch, position in the file or device. Give the host's token array where
    there is one (the feature sources do): a device tensor has to be copied back first.
    """
    rows = np.asarray(tokens, dtype=np.int64) if isinstance(tokens, np.ndarray) else \
        tokens.detach().to("cpu", torch.int64).numpy()  # [B, T]
    return torch.from_numpy(_row_keyed_uniforms(seed, rows) > prob)  # [B, T]


def _row_keyed_uniforms(seed: int, rows: np.ndarray) -> np.ndarray:
    """Uniforms [B, T] in [0, 1), row b's from `np.random.default_rng([seed, *rows[b]])`.

    The entropy goes to NumPy as one uint32 array per row, not a Python list: the same seed
    words (every value below 2**32 is one word either way), so the same numbers, ~30x faster."""
    B, T = rows.shape
    if not len(rows):
        return np.zeros(rows.shape)
    if 0 <= seed < 2 ** 32 and rows.min() >= 0 and rows.max() < 2 ** 32:
        entropy = np.empty((B, T + 1), dtype=np.uint32)
        entropy[:, 0], entropy[:, 1:] = seed, rows
        return np.stack([np.random.default_rng(e).random(T) for e in entropy])
    return np.stack([np.random.default_rng([seed, *row.tolist()]).random(T) for row in rows])
