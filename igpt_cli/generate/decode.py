"""Generation and likelihood in memory: token arrays in, token arrays (or losses) out.

`Decoder` is the one cached decoding loop: it feeds `[SOS, kept tokens …]` through the
model once (filling a preallocated `KVCache`), then one token per step, each step reusing
the keys and values of all earlier positions. `sample_images`, `complete_images` and
`score_images` are the public in-memory functions; the file stages (`stage.py`) run the
same `Decoder` and `nll_rows` batch by batch into resumable files.

Models: an `IGPT` instance (used as it is, unless `device`/`dtype` say otherwise) or a
checkpoint directory. A checkpoint without an LM head (a Hugging Face `ImageGPTModel`) is
refused: `load_pretrained` would fill the head with random numbers, fine for features but
meaningless for generation and likelihood. So is a BERT-objective model (OpenAI's
`igpt-*-bert`): it predicts masked tokens from both sides, not the next one, so it is refused
as "not autoregressive" (it still gives features: `igpt extract`). Loading, those checks and
the batch sizes are the model runtime's (`igpt_cli.model.runtime`).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError, ParameterError, check_positive
from ..model import IGPT, IGPTConfig, KVCache, sos_shift
from ..model.runtime import cache_dtype_for, check_tokens_array, decode_batch_size, feature_batch_size, ready_model
from ..progress import OnProgress, Reporter
from .sampling import Sampling, check_seed, pick_tokens, row_uniforms

LN2 = math.log(2.0)


# ---------------------------------------------------------------------------
# the cached decoding loop
# ---------------------------------------------------------------------------
SMALL_STEP_WORK = 8e6  # below this per matmul (FLOPs, or 10 x weight bytes), a CPU step is all thread sync


@contextlib.contextmanager
def cpu_threads_for(cfg: IGPTConfig, batch: int, device: torch.device, dtype: torch.dtype = torch.float32):
    """One CPU thread while decoding steps too small to share: each op of a step then costs
    microseconds (in FLOPs and in weight bytes read), and waking other threads for it costs
    more (far more on a busy machine)."""
    C = cfg.n_embd
    work = max(2 * batch * C * 3 * C, 10 * 3 * C * C * (torch.finfo(dtype).bits // 8))  # the qkv matmul
    small = device.type == "cpu" and work < SMALL_STEP_WORK
    before = torch.get_num_threads()
    if small and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


@dataclass
class Decoder:
    """Generates token rows with one model, sampling setting and seed (see `sampling.py`)."""

    model: IGPT
    sampling: Sampling
    seed: int = 0
    n_colours: int | None = None  # only tokens below this are drawn (the palette's size)
    reporter: Reporter | None = None  # advanced by B tokens per decoded step (every few steps)
    report_every: int = 16
    # every step with the same shapes (`KVCache(static=True)`), what capturing the step in a CUDA
    # graph needs; off by default: uncaptured, it reads the whole cache every step
    static_cache: bool = False
    _cache: KVCache | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def cache_for(self, batch: int) -> KVCache:
        """A cache of `batch` rows for all positions, reused between batches of the same size
        (`cache_dtype_for`: float32 on a CPU; `static_cache`: the fixed-shape kind)."""
        c = self._cache
        if c is None or c.k.shape[1] != batch:
            self._cache = None  # free the old one first
            c = self._cache = KVCache(self.model.config, batch, device=self.device, static=self.static_cache,
                                      dtype=cache_dtype_for(self.device, self.dtype))
        c.reset()
        return c

    @torch.inference_mode()
    def rows(self, kept: np.ndarray, row_ids: np.ndarray) -> np.ndarray:
        """Complete token rows: `kept` [B, P] prefixes (P may be 0) -> uint16 [B, n_positions].

        Row b's random numbers come from (seed, row_ids[b]) alone.
        """
        cfg = self.model.config
        B, P = kept.shape
        T = cfg.n_positions
        steps = T - P
        out = np.empty((B, T), dtype=np.uint16)
        out[:, :P] = kept
        if steps == 0 or B == 0:
            return out
        dev = self.device
        u = None if self.sampling.greedy else torch.from_numpy(row_uniforms(self.seed, row_ids, T)[:, P:]).to(dev)
        sos = np.full((B, 1), cfg.sos_token, dtype=np.int64)
        prompt = torch.from_numpy(np.concatenate([sos, kept.astype(np.int64)], 1)).to(dev)  # [B, 1 + P]
        cache = self.cache_for(B)
        logits = self.model(prompt, cache, last_only=True)  # [B, V]
        new = torch.empty((B, steps), dtype=torch.int64, device=dev)
        pending = 0
        with cpu_threads_for(cfg, B, dev, self.dtype):
            for s in range(steps):
                tok = pick_tokens(logits, self.sampling, None if u is None else u[:, s], self.n_colours)  # [B]
                new[:, s] = tok
                if s + 1 < steps:
                    logits = self.model(tok[:, None], cache, last_only=True)
                pending += 1
                if self.reporter is not None and (pending == self.report_every or s + 1 == steps):
                    self.reporter.advance(B * pending)
                    pending = 0
        out[:, P:] = new.cpu().numpy()
        return out


@torch.inference_mode()
def nll_rows(model: IGPT, tokens: np.ndarray) -> np.ndarray:
    """Mean cross-entropy in nats per token of each row under the model, with the SOS-shifted
    input the model was trained on: uint tokens [B, T] -> float64 [B]."""
    dev = next(model.parameters()).device
    idx = torch.from_numpy(np.asarray(tokens).astype(np.int64)).to(dev)  # [B, T]
    logits = model(sos_shift(idx, model.config.sos_token))  # [B, T, V]
    ce = F.cross_entropy(logits.float().transpose(1, 2), idx, reduction="none")  # [B, T]
    return ce.double().mean(1).cpu().numpy()


# ---------------------------------------------------------------------------
# checks shared with the file stages
# ---------------------------------------------------------------------------
def keep_tokens_for(height: int, width: int, keep_rows: int | None, keep_fraction: float | None) -> tuple[int, int]:
    """(rows kept, tokens kept) for `keep_rows` or `keep_fraction` of `height` rows (default: half)."""
    if keep_rows is not None and keep_fraction is not None:
        raise ParameterError("keep_rows", keep_rows, "give keep_rows or keep_fraction, not both")
    if keep_rows is None:
        f = 0.5 if keep_fraction is None else keep_fraction
        if not 0.0 <= float(f) <= 1.0:
            raise ParameterError("keep_fraction", keep_fraction, "must lie in [0, 1]")
        keep_rows = int(round(float(f) * height))
    if not 0 <= int(keep_rows) <= height:
        raise ParameterError("keep_rows", keep_rows, f"must lie in 0..{height} (the image height)")
    return int(keep_rows), int(keep_rows) * width




def square_side(cfg: IGPTConfig) -> int:
    if cfg.side is None:
        raise InputError(f"the model's n_positions={cfg.n_positions} is not a square image; "
                         "give the image width")
    return cfg.side


# ---------------------------------------------------------------------------
# the public in-memory functions
# ---------------------------------------------------------------------------
def _batches(n: int, bs: int):
    for i in range(0, n, bs):
        yield i, min(i + bs, n)


def sample_images(model: IGPT | str | Path, n: int, *, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float = 1.0, seed: int = 0, batch_size: int | None = None, device: str = "auto",
                  dtype: str = "auto", on_progress: OnProgress | None = None) -> np.ndarray:
    """`n` unconditional samples: uint16 tokens [n, n_positions] (decode them with a `Palette`).

    Each sequence starts from SOS alone; `temperature` 0 is greedy. Same seed, device and
    dtype: the same samples, on the CPU whatever the batch size (on a GPU another batch
    size can flip a rare token: docs/guides/gpu.md, "Reproducibility on GPUs"). Progress: task "sample",
    unit "token".
    """
    sampling = Sampling(temperature, top_k, top_p)
    seed = check_seed(seed)
    check_positive("n", n, allow_none=False)
    check_positive("batch_size", batch_size)
    net, dev, cdt = ready_model(model, device, dtype, generative=True)
    T = net.config.n_positions
    bs = min(batch_size or decode_batch_size(net.config, dev, cdt), n)
    reporter = Reporter(on_progress, "sample", n * T, "token")
    reporter.start()
    dec = Decoder(net, sampling, seed, reporter=reporter)
    out = np.empty((n, T), dtype=np.uint16)
    for i, j in _batches(n, bs):
        out[i:j] = dec.rows(np.empty((j - i, 0), dtype=np.uint16), np.arange(i, j))
    return out


def complete_images(tokens: np.ndarray, model: IGPT | str | Path, *, keep_rows: int | None = None,
                    keep_fraction: float | None = None, n: int = 1, width: int | None = None,
                    temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0, seed: int = 0,
                    batch_size: int | None = None, device: str = "auto", dtype: str = "auto",
                    on_progress: OnProgress | None = None) -> np.ndarray:
    """Complete images from their top rows: tokens [N, n_positions] -> uint16 [N, n, n_positions].

    The first `keep_rows` rows (or `keep_fraction` of the height; default half) of each
    image are kept and the rest is sampled, `n` times per image. `width`: the image width
    (default: the square side of the model's n_positions). Completion `j` of image `i` is
    output row `i * n + j`, whose random numbers come from (seed, that row).
    """
    sampling = Sampling(temperature, top_k, top_p)
    seed = check_seed(seed)
    check_positive("n", n, allow_none=False)
    check_positive("batch_size", batch_size)
    net, dev, cdt = ready_model(model, device, dtype, generative=True)
    cfg = net.config
    tokens = check_tokens_array(tokens, cfg)
    width = width or square_side(cfg)
    if cfg.n_positions % width:
        raise ParameterError("width", width, f"does not divide n_positions={cfg.n_positions}")
    _, keep = keep_tokens_for(cfg.n_positions // width, width, keep_rows, keep_fraction)
    rows = len(tokens) * n
    out = np.empty((rows, cfg.n_positions), dtype=np.uint16)
    bs = min(batch_size or decode_batch_size(cfg, dev, cdt), max(rows, 1))
    reporter = Reporter(on_progress, "complete", rows * (cfg.n_positions - keep), "token")
    reporter.start()
    dec = Decoder(net, sampling, seed, reporter=reporter)
    for i, j in _batches(rows, bs):
        ids = np.arange(i, j)
        out[i:j] = dec.rows(tokens[ids // n, :keep].astype(np.uint16), ids)
    return out.reshape(len(tokens), n, cfg.n_positions)


def score_images(tokens: np.ndarray, model: IGPT | str | Path, *, batch_size: int | None = None,
                 device: str = "auto", dtype: str = "auto", on_progress: OnProgress | None = None) -> np.ndarray:
    """Negative log-likelihood of each image: mean cross-entropy in nats per token, float64 [N]
    (divide by ln 2 for bits per token). The input is SOS-shifted, as in training."""
    check_positive("batch_size", batch_size)
    net, dev, cdt = ready_model(model, device, dtype, generative=True)
    tokens = check_tokens_array(tokens, net.config)
    n = len(tokens)
    bs = min(batch_size or feature_batch_size(net.config, dev, cdt), max(n, 1))
    reporter = Reporter(on_progress, "score", n, "image")
    reporter.start()
    return nll_batches(net, tokens, 0, n, bs, reporter)


def nll_batches(net: IGPT, tokens, start: int, stop: int, batch_size: int, reporter: Reporter) -> np.ndarray:
    """`nll_rows` of token rows [start, stop) (an array or h5py dataset) in batches: float64 [stop - start]."""
    out = np.empty(stop - start, dtype=np.float64)
    for i, j in _batches(stop - start, batch_size):
        out[i:j] = nll_rows(net, tokens[start + i:start + j])
        reporter.advance(j - i)
    return out
