"""Where `igpt show` finds the images of an igpt file: `open_images(path, stack)` gives an `Images`.

- A tokens file: its rows decoded through its own palette.
- A features file: the images its rows came from, in its row order. One made by `igpt extract`
  records `tokens_file` (+ `tokens_sha256`): that file is opened (a relative path relative to the
  working directory, then to the features file's folder; an absolute one, then the features file's
  folder), with a warning when its sha256 differs from the recorded one. One made by
  `igpt features` records its dataset (`source`, `split`, `size`, `resize`, `palette_sha256`,
  `selection`): its kept tokens file (`--keep-tokens`) when it is still there, else the dataset
  is opened again with the recorded settings (so the same images in the same order) and the
  rows are quantized through the palette whose sha256 was recorded (the official one, or the
  model's `preprocessor_config.json`); without it, the images are shown unquantized, with a warning.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from . import formats
from .errors import InputError, plural
from .formats import FormatError, open_igpt
from .palette import Palette

READ_BATCH = 256  # dataset images decoded per batch while looking for the shown rows


@dataclass
class Images:
    """The rows of an igpt file as pictures: what `show_tokens` draws."""
    n: int                                      # rows
    height: int
    width: int
    labels: Callable[[], np.ndarray]           # () -> every row's label, int64 [n] (-1: unlabelled)
    names: list[str]                            # class names (label i is names[i])
    read: Callable[[np.ndarray], np.ndarray]   # sorted row indices [m] -> uint8 RGB images [m, H, W, 3]
    origin: str | None = None                   # a features file's images: the tokens file or dataset read
    warnings: list[str] = field(default_factory=list)


def open_images(path: str | Path, stack: contextlib.ExitStack) -> Images:
    """The images of the tokens or features file at `path` (files stay open until `stack` closes)."""
    f = stack.enter_context(open_igpt(path))
    kind = formats.read_attrs(f).get("format")
    if kind == formats.TOKENS_FORMAT:
        return tokens_images(f, path)
    if kind == formats.FEATURES_FORMAT:
        return features_images(f, Path(path), stack)
    raise FormatError(f"{path}: igpt show draws tokens and features files, not {kind} files")


def read_rows(ds: h5py.Dataset, idx: np.ndarray, path) -> np.ndarray:
    """`ds[idx]` for sorted unique row indices (one slice when they are consecutive)."""
    if len(idx) and idx[-1] - idx[0] == len(idx) - 1:
        return formats.read_dataset(ds, slice(int(idx[0]), int(idx[-1]) + 1), path)
    return formats.read_dataset(ds, idx, path)


def _labels(f: h5py.File, n: int, path) -> np.ndarray:
    """The file's labels [n] (all -1 without a labels dataset)."""
    lab = f.get("labels")
    if not isinstance(lab, h5py.Dataset) or lab.ndim != 1 or lab.dtype.kind not in "ui" or lab.shape[0] < n:
        return np.full(n, -1, dtype=np.int64)
    return np.asarray(formats.read_dataset(lab, slice(0, n), path), dtype=np.int64)


def tokens_images(f: h5py.File, path) -> Images:
    """The rows of an open tokens file, decoded through its palette."""
    tok, h, w, palette = formats.tokens_layout(f, path)
    n = tok.shape[0]
    if n == 0:
        raise FormatError(f"{path}: tokens file has no rows")
    pal = Palette(palette, source=f"{path}:palette")

    def read(idx: np.ndarray) -> np.ndarray:
        try:
            return pal.decode(read_rows(tok, idx, path), h, w)  # [m, H*W] -> [m, H, W, 3]
        except ValueError as e:
            raise FormatError(f"{path}: {e}") from None

    return Images(n, h, w, lambda: _labels(f, n, path), formats.class_names(f, path), read)


def features_images(f: h5py.File, path: Path, stack: contextlib.ExitStack) -> Images:
    """The images the rows of an open features file came from (see the module docstring)."""
    attrs = formats.read_attrs(f)
    n = attrs.get("n_total")
    if not isinstance(n, int) or n < 1:
        raise FormatError(f"{path}: features file without rows (n_total={n!r})")
    names = formats.class_names(f, path)
    tokens_file = attrs.get("tokens_file")
    if "source" in attrs and not (tokens_file and Path(tokens_file).is_file()):
        return _dataset_images(f, attrs, path, n, names, stack)
    if not tokens_file:
        raise FormatError(f"{path}: records neither tokens_file nor source: which images it came from is unknown")
    tp = find_tokens_file(str(tokens_file), path)
    tf = stack.enter_context(open_igpt(tp, formats.TOKENS_FORMAT))
    imgs = tokens_images(tf, tp)
    warnings = []
    if attrs.get("tokens_sha256") and formats.sha256_file(tp) != attrs["tokens_sha256"]:
        warnings.append(f"{tp} has changed since {path} was extracted from it (sha256 differs): "
                        "the images may not be the ones the features came from")
    if "palette_sha256" in attrs and Palette(formats.read_dataset(tf["palette"]), source=str(tp)).sha256 \
            != attrs["palette_sha256"]:
        warnings.append(f"{tp}: palette differs from the one {path} was made with")
    if imgs.n < n:
        warnings.append(f"{tp} has {plural(imgs.n, 'row')}, {path} has {n}: showing its first "
                        f"{plural(imgs.n, 'row')} only")
    return Images(min(n, imgs.n), imgs.height, imgs.width, lambda: _labels(f, n, path)[:imgs.n], names, imgs.read,
                  origin=str(tp), warnings=warnings)


def find_tokens_file(recorded: str, features: Path) -> Path:
    """The tokens file a features file records: `recorded` as it stands (relative: to the working
    directory), then beside the features file; InputError saying where it looked when neither is there."""
    rec = Path(recorded)
    tries = [rec, features.parent / (rec.name if rec.is_absolute() else rec)]
    for p in tries:
        if p.is_file():
            return p
    looked = " and ".join(dict.fromkeys(os.path.abspath(p) for p in tries))
    raise InputError(f"{features}: its tokens file {recorded} is not found (looked at {looked})")


def _palette(attrs: dict) -> Palette | None:
    """The palette a features file made from images used: the official one or the model's (by sha256)."""
    want = attrs.get("palette_sha256")
    candidates = [Palette.default]
    pre = Path(str(attrs.get("model", ""))) / "preprocessor_config.json"
    if pre.is_file():
        candidates.append(lambda: Palette.load(pre))
    for make in candidates:
        try:
            pal = make()
        except InputError:
            continue
        if pal.sha256 == want:
            return pal
    return None


def _dataset_images(f: h5py.File, attrs: dict, path: Path, n: int, names: list[str],
                    stack: contextlib.ExitStack) -> Images:
    """The images of a features file made by `igpt features`: its dataset opened again with the recorded settings."""
    from .data import open_dataset

    src = str(attrs["source"])
    if src.startswith("["):
        src = formats.json_attr(f, "source", path, kind=list)
    sel = formats.json_attr(f, "selection", path, kind=dict, default={})
    size = int(attrs.get("size") or attrs.get("height"))
    keys = ("limit", "limit_per_class", "shuffle", "seed", "skip_bad", "max_pixels", "image_column", "label_column")
    try:
        ds = open_dataset(src, split=attrs.get("split", "all"), size=size, resize=attrs.get("resize", "bilinear"),
                          fmt=sel.get("fmt"), **{k: sel[k] for k in keys if sel.get(k) is not None})
    except InputError as e:
        raise InputError(f"{path} came from the images at {src}, which cannot be read now: {e}") from None
    pal = _palette(attrs)
    warnings = [] if pal is not None else [
        f"{path}: the palette it was made with (sha256 {str(attrs.get('palette_sha256'))[:12]}…) is not at hand: "
        "showing the images before quantization"]
    if ds.n is not None and ds.n != n:
        warnings.append(f"{src} now gives {plural(ds.n, 'image')}, {path} has {plural(n, 'row')}: the rows may "
                        "not correspond")

    def read(idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), size, size, 3), dtype=np.uint8)
        k = pos = 0
        with contextlib.closing(ds.batches(READ_BATCH)) as batches:
            for imgs, _, _ in batches:
                while k < len(idx) and idx[k] < pos + len(imgs):
                    out[k] = imgs[idx[k] - pos]
                    k += 1
                pos += len(imgs)
                if k == len(idx):
                    break
        if k < len(idx):
            raise InputError(f"{src}: has {pos} images now, fewer than row {idx[k]} of {path}")
        return out if pal is None else pal.decode(pal.quantize(out), size, size)

    origin = src if isinstance(src, str) else json.dumps(src)
    return Images(n, size, size, lambda: _labels(f, n, path), names, read, origin=origin, warnings=warnings)
