"""Colour palettes: load, validate, fit, quantize pixels to tokens and decode back.

Quantization rule (iGPT, and Hugging Face's ImageGPT image processor): a uint8 RGB
pixel `p` becomes `x = p / 127.5 - 1`; its token is the index of the nearest palette
centre by squared Euclidean distance. Tokens are in raster order.

Speed comes from the structure of the problem: there are only 2^24 RGB colours, so
`Palette` keeps a lazily filled uint16 lookup table indexed by the packed 24-bit colour
(32 MiB). Each batch looks its pixels up; only colours never seen before get an exact
nearest-centre search (float64, so the answer is the true nearest up to genuine ties).
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np

from .errors import InputError, ParameterError, check_positive
from .jsonfile import read_json
from .seeds import random_state

DEFAULT_PALETTE = Path(__file__).parent / "assets" / "palette_igpt512.npy"
# The complete colour -> token table of the official palette (all 2^24 colours, 0.8 MB
# compressed), precomputed with `Palette.full_lookup_table()`; used for any palette whose
# centres hash to the same bytes, so quantizing with it never searches at all.
SHIPPED_LUT = Path(__file__).parent / "assets" / "palette_igpt512_lut.npz"
_UNSET = np.uint16(0xFFFF)  # sentinel in the lookup table: colour not looked up yet
MAX_K = 0xFFFF  # tokens are uint16 and 0xFFFF is the sentinel
_CELL_CACHE: dict[bytes, tuple] = {}  # candidate tables per palette (pure function of the centres)


class PaletteError(InputError):
    """A palette file of the wrong shape, range or kind."""


def _validate(centers, where: str) -> np.ndarray:
    try:
        c = np.asarray(centers, dtype=np.float64)
    except (TypeError, ValueError):
        raise PaletteError(f"{where}: palette is not a numeric array") from None
    if c.ndim != 2 or c.shape[1] != 3 or not (1 <= c.shape[0] <= MAX_K):
        raise PaletteError(f"{where}: palette must have shape (K, 3) with 1 <= K <= {MAX_K}, got {c.shape}")
    if not np.all(np.isfinite(c)):
        raise PaletteError(f"{where}: palette contains NaN or infinite values")
    lo, hi = float(c.min()), float(c.max())
    if lo < -1.0001 or hi > 1.0001:
        raise PaletteError(f"{where}: palette values must lie in [-1, 1] (pixel / 127.5 - 1), got [{lo:.3g}, {hi:.3g}]")
    return c.astype(np.float32)


class Palette:
    """K colour centres (float32 [K, 3] in [-1, 1]) with a lazily filled colour lookup table."""

    def __init__(self, centers, source: str = "<array>"):
        self.centers = _validate(centers, source)
        self.source = str(source)
        self._c64 = self.centers.astype(np.float64)
        self._c2 = np.sum(self._c64 ** 2, axis=1)
        self._lut: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.centers)

    @property
    def k(self) -> int:
        return len(self.centers)

    # -- loading -----------------------------------------------------------------------
    @classmethod
    def default(cls) -> "Palette":
        return cls(np.load(DEFAULT_PALETTE), source="igpt512")

    @classmethod
    def load(cls, spec: str | Path | None = None) -> "Palette":
        """Load a palette: None (the official 512-colour iGPT palette), a `.npy` file,
        a Hugging Face `preprocessor_config.json` (its `clusters`), a directory holding one, or a
        bundled model's name (`igpt-cifar8`: its palette)."""
        from .bundled import bundled_dir

        if spec is None or str(spec) in ("", "igpt512", "default"):
            return cls.default()
        p = bundled_dir(spec) or Path(spec)
        if not p.exists():
            raise PaletteError(f"{p}: no such palette file or directory")
        if p.is_dir():
            cfg = p / "preprocessor_config.json"
            if cfg.is_file():
                p = cfg
            elif (p / "palette.npy").is_file():
                p = p / "palette.npy"
            else:
                raise PaletteError(f"{p}: directory has no preprocessor_config.json (or palette.npy)")
        if p.suffix == ".npy":
            try:
                arr = np.load(p, allow_pickle=False)
            except (ValueError, OSError) as e:
                raise PaletteError(f"{p}: not a readable .npy array ({e})") from None
            return cls(arr, source=str(p))
        if p.suffix == ".json":
            try:
                d = read_json(p, "palette (preprocessor config)")
            except InputError as e:
                raise PaletteError(str(e)) from None
            if not isinstance(d, dict) or d.get("clusters") is None:
                raise PaletteError(f"{p}: no 'clusters' key (not an ImageGPT preprocessor config)")
            return cls(d["clusters"], source=str(p))
        raise PaletteError(f"{p}: unknown palette format (expected .npy, preprocessor_config.json or a model directory)")

    # -- quantize ----------------------------------------------------------------------
    def nearest(self, rgb: np.ndarray) -> np.ndarray:
        """Exact nearest centre for uint8 RGB colours [M, 3] (no lookup table).

        Distances are computed directly, sum((x - c)^2) in float64, against a
        conservative candidate list per 8x8x8 colour cell (every centre that can be
        nearest for some colour in the cell), so ties resolve to the lowest index exactly
        as a full argmin would.
        """
        rgb = np.asarray(rgb, dtype=np.uint8).reshape(-1, 3)
        out = np.empty(len(rgb), dtype=np.uint16)
        if len(rgb) == 0:
            return out
        x = rgb.astype(np.float64) / 127.5 - 1.0
        cells = self._cell_candidates()
        if cells is None:  # huge palettes: brute force, chunked to stay in cache
            for i in range(0, len(x), 1024):
                xb = x[i:i + 1024]
                d = ((xb[:, None, :] - self._c64[None]) ** 2).sum(-1)
                out[i:i + 1024] = np.argmin(d, axis=1)
            return out
        table, width = cells
        r = rgb.astype(np.int32)
        cell = ((r[:, 0] >> 3) << 10) | ((r[:, 1] >> 3) << 5) | (r[:, 2] >> 3)
        w = width[cell]
        for wv in np.unique(w):
            sel = np.flatnonzero(w == wv)
            step = max(1, (1 << 20) // int(wv))
            for i in range(0, len(sel), step):
                s = sel[i:i + step]
                cidx = table[cell[s], :wv]  # [m, wv], ascending centre index
                d = ((x[s, None, :] - self._c64[cidx]) ** 2).sum(-1)
                out[s] = cidx[np.arange(len(s)), np.argmin(d, axis=1)]
        return out

    def _cell_candidates(self):
        """Per colour cell (32 levels per channel: 8x8x8 colours), the centres that can be
        nearest to some colour in it: those whose distance to the cell box is <= the
        smallest farthest-corner distance of any centre. Built in two levels (16-level
        cells over all centres, then 32-level cells over their parent's candidates, which
        is exact since a sub-box only shrinks both bounds). Rows are ascending centre
        indices, padded by repeating the last candidate; returns (table, padded width)."""
        if getattr(self, "_cells", False) is not False:
            return self._cells
        key = self.centers.tobytes()
        if key in _CELL_CACHE:
            self._cells = _CELL_CACHE[key]
            return self._cells
        if self.k > 4096:
            self._cells = None
            return None
        # level 1: 16 levels per channel, all centres
        table4, cnt4 = self._refine(16, np.broadcast_to(np.arange(self.k), (16 ** 3, self.k)),
                                    np.full(16 ** 3, self.k))
        # level 2: 32 levels per channel, candidates of the parent cell only
        sub = np.arange(32 ** 3)
        parent = (((sub >> 11) & 15) << 8) | (((sub >> 6) & 15) << 4) | ((sub >> 1) & 15)
        table, cnt = self._refine(32, table4[parent], cnt4[parent])
        width = np.minimum(table.shape[1], 1 << np.ceil(np.log2(np.maximum(cnt, 1))).astype(np.int64))
        self._cells = (table, width)
        if len(_CELL_CACHE) >= 4:
            _CELL_CACHE.clear()
        _CELL_CACHE[key] = self._cells
        return self._cells

    def _refine(self, levels: int, cands: np.ndarray, cnt: np.ndarray):
        step = 256 // levels
        idx = np.arange(levels ** 3)
        q = np.stack([idx // (levels * levels), (idx // levels) % levels, idx % levels], axis=1)  # cell -> (r, g, b) level
        lo = (q * step) / 127.5 - 1.0
        hi = (q * step + step - 1) / 127.5 - 1.0
        n, m = cands.shape
        valid = np.arange(m)[None, :] < cnt[:, None]
        Dmin = np.zeros((n, m))
        Dmax = np.zeros((n, m))
        for ch in range(3):
            cc = self._c64[cands, ch]
            l, h = lo[:, ch:ch + 1], hi[:, ch:ch + 1]
            Dmin += np.maximum(0.0, np.maximum(l - cc, cc - h)) ** 2
            Dmax += np.maximum((cc - l) ** 2, (cc - h) ** 2)
        T = np.where(valid, Dmax, np.inf).min(axis=1, keepdims=True)
        keep = valid & (Dmin <= T * (1 + 1e-9) + 1e-12)  # conservative: extra candidates are harmless
        kcnt = keep.sum(axis=1)
        maxc = int(kcnt.max())
        order = np.argsort(~keep, axis=1, kind="stable")[:, :maxc]  # kept first, original (ascending) order
        table = np.take_along_axis(np.asarray(cands), order, axis=1)
        last = table[np.arange(n), kcnt - 1][:, None]
        table = np.where(np.arange(maxc)[None, :] < kcnt[:, None], table, last)
        return np.ascontiguousarray(table), kcnt

    @property
    def sha256(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.centers, dtype=np.float32).tobytes()).hexdigest()

    def full_lookup_table(self, chunk: int = 1 << 21) -> np.ndarray:
        """The token of every one of the 2^24 RGB colours (uint16 [2^24]); ~5 s."""
        lut = np.empty(1 << 24, dtype=np.uint16)
        for i in range(0, 1 << 24, chunk):
            c = np.arange(i, i + chunk, dtype=np.uint32)
            lut[i:i + chunk] = self.nearest(np.stack([c >> 16, (c >> 8) & 255, c & 255], axis=1).astype(np.uint8))
        return lut

    def _lookup_table(self) -> np.ndarray:
        if self._lut is None:
            shipped = _shipped_lut(self.sha256)
            # a complete table is never written to, so palettes may share it
            self._lut = shipped if shipped is not None else np.full(1 << 24, _UNSET, dtype=np.uint16)
        return self._lut

    def quantize(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB images [N, H, W, 3] (or pixels [..., 3]) -> uint16 tokens [N, H*W]."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.shape[-1] != 3:
            raise ValueError(f"quantize expects uint8 [..., 3] RGB, got {images.dtype} {images.shape}")
        n = images.shape[0] if images.ndim >= 2 else 1
        px = images.reshape(-1, 3)
        packed = (px[:, 0].astype(np.uint32) << 16) | (px[:, 1].astype(np.uint32) << 8) | px[:, 2]
        lut = self._lookup_table()
        tok = lut[packed]
        miss = tok == _UNSET
        if miss.any():
            new = np.unique(packed[miss])
            rgb = np.stack([(new >> 16) & 255, (new >> 8) & 255, new & 255], axis=1).astype(np.uint8)
            lut[new] = self.nearest(rgb)
            tok[miss] = lut[packed[miss]]
        return tok.reshape(n, -1)

    # -- decode ------------------------------------------------------------------------
    def decode(self, tokens: np.ndarray, height: int | None = None, width: int | None = None) -> np.ndarray:
        """uint16 tokens [N, H*W] -> uint8 RGB images [N, H, W, 3] (square when H, W are not given)."""
        tokens = np.asarray(tokens)
        if tokens.ndim == 1:
            tokens = tokens[None]
        n, L = tokens.shape[0], int(np.prod(tokens.shape[1:]))
        if height is None or width is None:
            side = int(round(L ** 0.5))
            height = width = side
        if height * width != L:
            raise ValueError(f"cannot decode {L} tokens as {height}x{width}")
        if tokens.size and int(tokens.max()) >= self.k:
            raise ValueError(f"token {int(tokens.max())} out of range for a {self.k}-colour palette")
        rgb = np.clip(np.rint((self.centers.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)
        return rgb[tokens.reshape(n, height * width)].reshape(n, height, width, 3)


def check_fit_parameters(k: int, sample_pixels: int) -> None:
    """ParameterError unless 1 <= k <= MAX_K and sample_pixels >= 1 (checked before any work)."""
    if not 1 <= k <= MAX_K:
        raise ParameterError("k", k, f"must be between 1 and {MAX_K}")
    check_positive("sample_pixels", sample_pixels, allow_none=False)


def fit_palette(pixel_batches, k: int = 512, sample_pixels: int = 1_000_000, seed: int = 0,
                batch_size: int = 4096) -> Palette:
    """Fit a k-colour palette with MiniBatchKMeans on up to `sample_pixels` pixels.

    `pixel_batches` yields uint8 RGB image batches [B, H, W, 3]; pixels are reservoir
    sampled so memory stays bounded by `sample_pixels`.
    """
    from sklearn.cluster import MiniBatchKMeans

    check_fit_parameters(k, sample_pixels)
    rng = np.random.default_rng(seed)
    sample = np.empty((sample_pixels, 3), dtype=np.uint8)
    seen = 0
    for imgs in pixel_batches:
        px = np.asarray(imgs, dtype=np.uint8).reshape(-1, 3)
        m = len(px)
        take = min(m, sample_pixels - seen) if seen < sample_pixels else 0
        if take:
            sample[seen:seen + take] = px[:take]
        rest = px[take:]
        if len(rest):  # reservoir sampling for the remainder
            idx = np.arange(seen + take, seen + m) + 1
            j = (rng.random(len(rest)) * idx).astype(np.int64)
            keep = j < sample_pixels
            sample[j[keep]] = rest[keep]
        seen += m
    n = min(seen, sample_pixels)
    if n == 0:
        raise InputError("no pixels to fit a palette on")
    x = sample[:n].astype(np.float32) / 127.5 - 1.0
    k_eff = min(k, len(np.unique(sample[:n], axis=0)))  # no more colours than distinct pixels
    km = MiniBatchKMeans(n_clusters=k_eff, batch_size=batch_size, random_state=random_state(seed), n_init=1)
    km.fit(x)
    return Palette(np.clip(km.cluster_centers_, -1.0, 1.0), source=f"fit(k={k_eff}, pixels={n})")


@functools.lru_cache(maxsize=1)
def _shipped_lut(palette_sha256: str) -> np.ndarray | None:
    if not SHIPPED_LUT.is_file():
        return None
    with np.load(SHIPPED_LUT) as z:
        if str(z["palette_sha256"]) != palette_sha256:
            return None
        lut = z["lut"]
    lut.setflags(write=False)
    return lut
