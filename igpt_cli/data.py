"""Dataset readers: every input format as batches of uint8 RGB images, already resized.

`open_dataset(src, ...)` detects the format from the path (or takes `fmt`) and returns a
`Dataset` whose `.batches(batch_size)` yields `(images uint8 [B, S, S, 3], labels int64 [B],
sources list[str])`, plus `.class_names`. Readers stream: memory is bounded by a batch
(plus a list of member names), never by the dataset.

Formats:
- ``imagefolder``: ``<split>/<class>/<file>`` or ``<class>/<file>`` trees, as a directory,
  a ``.tar`` (optionally compressed) or a ``.zip`` archive read in place (no extraction).
  Directories and zips are read in sorted order, tar archives in archive order. Class
  indices come from the sorted class folders of *all* splits, so train and test agree.
- ``cifar``: the CIFAR-10 / CIFAR-100 "python version" (``cifar-10-python.tar.gz``,
  ``cifar-100-python.tar.gz`` or their extracted folders).
- ``npz`` / ``npy``: uint8 arrays ``N×H×W×C`` or ``N×H×W`` (labels from ``y``, ``labels``,
  ``y_train``...; ``x_train``/``x_test`` pairs give splits).

Conversion follows Hugging Face's ImageGPT processor: grayscale/palette images become
RGB, transparency is composited onto white, then a PIL bilinear resize to size×size
(no crop); ``resize="center-crop"`` first crops the central square.
"""
from __future__ import annotations

import io
import os
import pickle
import tarfile
import warnings
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from .errors import InputError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
SPLIT_NAMES = ("train", "test", "val", "valid", "validation")
SPLIT_CHOICES = ("train", "test", "val", "valid", "validation", "all")
FORMATS = ("imagefolder", "cifar", "npz", "npy")
RESIZE_MODES = ("bilinear", "center-crop")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")

Batch = tuple[np.ndarray, np.ndarray, list[str]]


class DataError(InputError):
    """Bad dataset input."""


class UnknownFormatError(DataError):
    pass


class SplitError(DataError):
    pass


class EmptyDatasetError(DataError):
    pass


class BadImageError(DataError):
    pass


# ---------------------------------------------------------------------------
# Image conversion (matches transformers' convert_to_rgb + PIL bilinear resize)
# ---------------------------------------------------------------------------

def pil_to_rgb(im: Image.Image) -> Image.Image:
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def fit_size(im: Image.Image, size: int, resize: str) -> Image.Image:
    if resize == "center-crop" and im.width != im.height:
        s = min(im.width, im.height)
        left, top = (im.width - s) // 2, (im.height - s) // 2
        im = im.crop((left, top, left + s, top + s))
    if im.size != (size, size):
        im = im.resize((size, size), resample=Image.BILINEAR)
    return im


_FORMAT_HINT = {".jpg": ("JPEG",), ".jpeg": ("JPEG",), ".png": ("PNG",)}
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _fast_jpeg(data: bytes) -> Image.Image | None:
    """Decode a plain 3-component JPEG with PIL's own libjpeg decoder, skipping
    `Image.open`'s Python-level marker parsing (about twice as fast for tiny images;
    pixels are identical since it is the same decoder with the same arguments).
    Returns None for anything else (grayscale, CMYK, Adobe APP14, truncated, corrupt):
    the caller then goes through `Image.open`, which also produces the error message."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        m = data[i + 1]
        if m == 0xFF:
            i += 1
            continue
        if m == 0x01 or 0xD0 <= m <= 0xD8:
            i += 2
            continue
        if m == 0xEE:  # Adobe colour-transform conventions: leave to PIL
            return None
        if m in _SOF:
            if i + 10 > n or data[i + 9] != 3:
                return None
            h, w = (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8]
            if not (0 < w <= 4096 and 0 < h <= 4096):
                return None
            im = Image.new("RGB", (w, h))
            dec = Image.core.jpeg_decoder("RGB", "RGB", "")
            try:
                dec.setimage(im.im, (0, 0, w, h))
                consumed, err = dec.decode(data)
            finally:
                dec.cleanup()
            return im if consumed < 0 and err >= 0 else None
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


def decode_image(data: bytes, size: int, resize: str, name: str = "") -> np.ndarray:
    """Encoded image bytes -> uint8 RGB [size, size, 3] (HF ImageGPT conversion and resize)."""
    hint = _FORMAT_HINT.get(os.path.splitext(name)[1].lower())
    im = _fast_jpeg(data) if data[:2] == b"\xff\xd8" else None
    if im is not None:
        return np.asarray(fit_size(im, size, resize))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            im = Image.open(io.BytesIO(data), formats=hint)  # the hint skips probing every plugin
        except Image.UnidentifiedImageError:
            if hint is None:
                raise
            im = Image.open(io.BytesIO(data))  # misnamed file: let PIL probe
        im.load()
    return np.asarray(fit_size(pil_to_rgb(im), size, resize))


def array_to_rgb(a: np.ndarray) -> np.ndarray:
    """uint8 [N,H,W] / [N,H,W,1|3|4] -> uint8 [N,H,W,3] (alpha composited onto white)."""
    if a.ndim == 3:
        return np.repeat(a[..., None], 3, axis=-1)
    c = a.shape[-1]
    if c == 1:
        return np.repeat(a, 3, axis=-1)
    if c == 4:
        alpha = a[..., 3:4] / 255.0
        return np.round(alpha * a[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def resize_batch(imgs: np.ndarray, size: int, resize: str) -> np.ndarray:
    if imgs.shape[1:3] == (size, size):
        return imgs
    return np.stack([np.asarray(fit_size(Image.fromarray(im), size, resize)) for im in imgs])


# ---------------------------------------------------------------------------
# Dataset base
# ---------------------------------------------------------------------------

class Dataset:
    kind = "?"

    def __init__(self, path: Path, split: str, size: int, resize: str, limit: int | None, skip_bad: bool):
        self.path = Path(path)
        self.split = split
        self.size = size
        self.resize = resize
        self.limit = limit
        self.skip_bad = skip_bad
        self.class_names: list[str] = []
        self.splits: list[str] = []
        self.skipped = 0
        self.n: int | None = None  # number of images to expect, when known
        self.workers: int | None = None  # decode processes (image folders); None: automatic

    def _check_split(self) -> None:
        if self.split == "all":
            return
        if self.split not in self.splits:
            have = ", ".join(self.splits) if self.splits else "none: use --split all"
            raise SplitError(f"{self.path}: no split {self.split!r} (available splits: {have})")

    def batches(self, batch_size: int = 256) -> Iterator[Batch]:
        raise NotImplementedError

    def images(self, batch_size: int = 256) -> Iterator[np.ndarray]:
        for imgs, _, _ in self.batches(batch_size):
            yield imgs

    def _limited(self, it: Iterator[Batch]) -> Iterator[Batch]:
        left = self.limit
        for imgs, labels, sources in it:
            if left is not None:
                if left <= 0:
                    return
                if len(imgs) > left:
                    imgs, labels, sources = imgs[:left], labels[:left], sources[:left]
                left -= len(imgs)
            if len(imgs):
                yield imgs, labels, sources


# ---------------------------------------------------------------------------
# Image folders: directory, tar, zip
# ---------------------------------------------------------------------------

def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTS and not os.path.basename(name).startswith(".")


class ImageFolder(Dataset):
    kind = "imagefolder"

    def __init__(self, path, split, size, resize, limit, skip_bad):
        super().__init__(path, split, size, resize, limit, skip_bad)
        p = self.path
        name = p.name.lower()
        if p.is_dir():
            self.container = "dir"
            names = []
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                rel = os.path.relpath(root, p)
                for f in sorted(files):
                    if _is_image(f):
                        names.append(f if rel == "." else f"{rel}/{f}".replace(os.sep, "/"))
        elif name.endswith(".zip"):
            self.container = "zip"
            try:
                with zipfile.ZipFile(p) as z:
                    names = sorted(n for n in z.namelist() if not n.endswith("/") and _is_image(n))
            except (zipfile.BadZipFile, OSError) as e:
                raise DataError(f"{p}: not a readable zip archive ({e})") from None
        else:
            self.container = "tar"
            names = []
            self._offsets: dict[str, tuple[int, int]] | None = None
            try:
                if _is_plain_tar(p):
                    try:
                        offsets = {}
                        for n, off, sz in _scan_tar_fast(p):
                            if _is_image(n):
                                names.append(n)
                                offsets[n] = (off, sz)
                        self._offsets = offsets
                    except _FastTarUnsupported:
                        names = []
                if self._offsets is None:
                    with tarfile.open(p) as tf:
                        for m in _iter_tar(tf):
                            if m.isfile() and _is_image(m.name):
                                names.append(m.name)
            except (tarfile.TarError, OSError, EOFError) as e:
                raise DataError(f"{p}: not a readable tar archive ({e})") from None
        self._layout(names)

    def _layout(self, names: list[str]) -> None:
        parts = [(n[2:] if n.startswith("./") else n).split("/") for n in names]
        # strip common wrapper folders (e.g. an archive holding "cifar10/train/cat/0.jpg")
        strip = 0
        while parts and all(len(q) - strip >= 3 for q in parts):
            first = {q[strip] for q in parts}
            if len(first) != 1 or next(iter(first)) in SPLIT_NAMES:
                break
            strip += 1
        rel = [q[strip:] for q in parts]
        split_layout = bool(rel) and all(len(q) >= 2 for q in rel) and any(q[0] in SPLIT_NAMES for q in rel)
        if split_layout:
            self.splits = sorted({q[0] for q in rel})
            classes = sorted({q[1] for q in rel if len(q) >= 3})
        else:
            self.splits = []
            classes = sorted({q[0] for q in rel if len(q) >= 2})
        self.class_names = classes
        self._check_split()
        index = {c: i for i, c in enumerate(classes)}
        self._entries: dict[str, int] = {}  # member name -> label (only the selected split)
        for n, q in zip(names, rel):
            if split_layout:
                if self.split != "all" and q[0] != self.split:
                    continue
                label = index[q[1]] if len(q) >= 3 else -1
            else:
                label = index[q[0]] if len(q) >= 2 else -1
            self._entries[n] = label
        if not self._entries:
            what = f"split {self.split!r} of " if self.split != "all" else ""
            raise EmptyDatasetError(f"{self.path}: no images found in {what}this {self.container} "
                                    f"(looked for {', '.join(sorted(IMAGE_EXTS))})")
        self.n = len(self._entries) if self.limit is None else min(self.limit, len(self._entries))

    def _members(self) -> Iterator[tuple[str, bytes | Exception]]:
        p = self.path
        if self.container == "dir":
            for n in self._entries:
                try:
                    yield n, (p / n).read_bytes()
                except OSError as e:
                    yield n, e
        elif self.container == "zip":
            with zipfile.ZipFile(p) as z:
                for n in self._entries:
                    try:
                        yield n, z.read(n)
                    except (zipfile.BadZipFile, OSError, ValueError) as e:  # CRC errors etc.
                        yield n, e
        elif self._offsets is not None:
            with open(p, "rb") as fh:
                for n in self._entries:
                    off, sz = self._offsets[n]
                    fh.seek(off)
                    data = fh.read(sz)
                    yield n, data if len(data) == sz else OSError("truncated archive member")
        else:
            try:
                with tarfile.open(p) as tf:
                    for m in _iter_tar(tf):
                        if m.name in self._entries:
                            f = tf.extractfile(m)
                            yield m.name, f.read() if f is not None else OSError("not a regular file")
            except (tarfile.TarError, OSError, EOFError) as e:
                raise DataError(f"{p}: tar archive is corrupt ({e})") from None

    def _source(self, member: str) -> str:
        return member if self.container == "dir" else f"{self.path.name}:{member}"

    def batches(self, batch_size: int = 256) -> Iterator[Batch]:
        return self._limited(self._batches(batch_size))

    def _chunks(self, batch_size: int) -> Iterator[list[tuple[str, bytes | str]]]:
        chunk = []
        for name, data in self._members():
            if isinstance(data, Exception):
                data = str(data) or type(data).__name__
            chunk.append((name, data))
            if len(chunk) == batch_size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def _decoded(self, batch_size: int) -> Iterator[tuple[list, tuple]]:
        """(chunk, decode result) pairs in order; decoding runs in a small process pool
        for large datasets (JPEG decoding dominates once quantizing is a table lookup)."""
        args = (self.size, self.resize)
        workers = self.workers
        if workers is None:
            workers = min(2, os.cpu_count() or 1) if (self.n or 0) >= 4096 else 0
        if workers <= 1:
            for chunk in self._chunks(batch_size):
                yield chunk, _decode_chunk(chunk, *args)
            return
        import multiprocessing as mp
        from collections import deque

        # fork: no re-import of __main__ (works from scripts without a main guard); the
        # workers only run _decode_chunk. The CLI progress bar refreshes without a thread.
        with mp.get_context("fork").Pool(workers) as pool:
            pending: deque = deque()
            for chunk in self._chunks(batch_size):
                pending.append((chunk, pool.apply_async(_decode_chunk, (chunk, *args))))
                if len(pending) > 2 * workers:
                    c, r = pending.popleft()
                    yield c, r.get()
            while pending:
                c, r = pending.popleft()
                yield c, r.get()

    def _batches(self, batch_size: int) -> Iterator[Batch]:
        for chunk, (imgs, errors) in self._decoded(batch_size):
            if errors:
                if not self.skip_bad:
                    i, msg = errors[0]
                    name = chunk[i][0]
                    where = str(self.path / name) if self.container == "dir" else f"{self.path}:{name}"
                    raise BadImageError(f"{where}: cannot read image ({msg}); use --skip-bad to skip such files")
                self.skipped += len(errors)
                bad = {i for i, _ in errors}
                chunk = [c for i, c in enumerate(chunk) if i not in bad]
            if chunk:
                yield (imgs, np.asarray([self._entries[n] for n, _ in chunk], dtype=np.int64),
                       [self._source(n) for n, _ in chunk])


def _decode_chunk(chunk: list[tuple[str, bytes | str]], size: int, resize: str):
    """Decode a chunk of (name, bytes | error text): (uint8 [k, S, S, 3] of the good ones,
    [(index, message)] of the bad ones)."""
    out = np.empty((len(chunk), size, size, 3), dtype=np.uint8)
    errors, k = [], 0
    for i, (name, data) in enumerate(chunk):
        try:
            if isinstance(data, str):
                raise OSError(data)
            out[k] = decode_image(data, size, resize, name)
            k += 1
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad image
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            errors.append((i, msg))
    return out[:k], errors


class _FastTarUnsupported(Exception):
    pass


_REGULAR = (b"0", b"\0", b"7")


def _scan_tar_fast(path: Path) -> Iterator[tuple[str, int, int]]:
    """(member name, data offset, size) of the regular files of an *uncompressed* tar,
    from its 512-byte headers alone (ustar prefix, GNU long names and pax paths handled).
    Much faster than `tarfile` for archives of many small files. Raises
    `_FastTarUnsupported` for anything unusual (the caller falls back to `tarfile`)
    and `DataError` on a corrupt header."""
    with open(path, "rb") as f:
        pos, longname, paxname = 0, None, None
        while True:
            f.seek(pos)
            h = f.read(512)
            if len(h) < 512 or h.count(0) == 512:
                return
            chk = h[148:156].split(b"\0", 1)[0].strip()
            try:
                ok = int(chk or b"-1", 8) == sum(h[:148]) + 256 + sum(h[156:])
            except ValueError:
                ok = False
            if not ok:
                raise DataError(f"{path}: corrupt tar header at byte {pos}")
            if h[124] & 0x80:
                raise _FastTarUnsupported("base-256 size")
            size = int(h[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            typ = h[156:157]
            name = h[0:100].split(b"\0", 1)[0]
            if h[257:262] == b"ustar":
                prefix = h[345:500].split(b"\0", 1)[0]
                if prefix:
                    name = prefix + b"/" + name
            data = pos + 512
            if typ == b"L":
                longname = f.read(size).split(b"\0", 1)[0]
            elif typ == b"x":
                for rec in _pax_records(f.read(size)):
                    if rec[0] == b"path":
                        paxname = rec[1]
                    elif rec[0] == b"size":
                        raise _FastTarUnsupported("pax size")
            elif typ in (b"g", b"K"):
                pass
            elif typ == b"S":
                raise _FastTarUnsupported("sparse member")
            else:
                name = paxname or longname or name
                longname = paxname = None
                if typ in _REGULAR:
                    yield name.decode("utf-8", "surrogateescape"), data, size
            pos = data + (size + 511) // 512 * 512


def _pax_records(buf: bytes):
    i = 0
    while i < len(buf):
        sp = buf.find(b" ", i)
        if sp < 0:
            return
        n = int(buf[i:sp])
        kv = buf[sp + 1:i + n - 1]
        k, _, v = kv.partition(b"=")
        yield k, v
        i += n


def _is_plain_tar(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(6)
    return not (head.startswith(b"\x1f\x8b") or head.startswith(b"BZh") or head.startswith(b"\xfd7zXZ"))


def _iter_tar(tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Iterate tar members without tarfile keeping them all in memory."""
    while True:
        m = tf.next()
        if m is None:
            return
        yield m
        tf.members = []  # bounded memory for huge archives


# ---------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 python version
# ---------------------------------------------------------------------------

CIFAR_FILES = {
    "cifar10": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"], "meta": "batches.meta",
                "labels": b"labels", "names": b"label_names"},
    "cifar100": {"train": ["train"], "test": ["test"], "meta": "meta",
                 "labels": b"fine_labels", "names": b"fine_label_names"},
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles of dicts of lists and numpy arrays. Allow exactly the
    numpy reconstructors they need and nothing else, so a hostile file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(data: bytes, where: str) -> dict:
    try:
        d = _ArraysOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{where}: not a CIFAR pickle ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise DataError(f"{where}: not a CIFAR pickle (not a dict)")
    return d


class CifarPython(Dataset):
    kind = "cifar"

    def __init__(self, path, split, size, resize, limit, skip_bad):
        super().__init__(path, split, size, resize, limit, skip_bad)
        p = self.path
        self.archive = not p.is_dir()
        if self.archive:
            try:
                with tarfile.open(p) as tf:
                    members = [m.name for m in _iter_tar(tf) if m.isfile()]
            except (tarfile.TarError, OSError, EOFError) as e:
                raise DataError(f"{p}: not a readable tar archive ({e})") from None
        else:
            members = [str(f.relative_to(p)).replace(os.sep, "/") for f in sorted(p.rglob("*")) if f.is_file()]
        base = {os.path.basename(m): m for m in members}
        if "batches.meta" in base or "data_batch_1" in base or "test_batch" in base:
            self.variant = "cifar10"
        elif "meta" in base and ("train" in base or "test" in base):
            self.variant = "cifar100"
        else:
            raise UnknownFormatError(f"{p}: not a CIFAR-10/100 python archive (no batches.meta, data_batch_*, "
                                     "test_batch, or meta/train/test)")
        spec = CIFAR_FILES[self.variant]
        self.splits = [s for s in ("train", "test") if any(f in base for f in spec[s])]
        self._check_split()
        wanted = [s for s in ("train", "test") if self.split in ("all", s)]
        self._files = [base[f] for s in wanted for f in spec[s] if f in base]
        if not self._files:
            raise EmptyDatasetError(f"{p}: no CIFAR batches for split {self.split!r}")
        self._meta = base.get(spec["meta"])
        self._read_meta()

    def _read_bytes(self, wanted: list[str]) -> Iterator[tuple[str, bytes]]:
        """Yield (member, bytes) for the wanted members, in the given order for folders and
        in archive order for archives (one sequential pass, nothing extracted)."""
        if not self.archive:
            for m in wanted:
                yield m, (self.path / m).read_bytes()
            return
        want = set(wanted)
        got = {}
        try:
            with tarfile.open(self.path) as tf:
                for m in _iter_tar(tf):
                    if m.name in want:
                        got[m.name] = tf.extractfile(m).read()
                        # yield in requested order as soon as possible
                        while wanted and wanted[0] in got:
                            k = wanted.pop(0)
                            yield k, got.pop(k)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"{self.path}: tar archive is corrupt ({e})") from None
        for k in wanted:
            if k in got:
                yield k, got.pop(k)

    def _where(self, member: str) -> str:
        return f"{self.path}:{member}" if self.archive else str(self.path / member)

    def _read_meta(self) -> None:
        spec = CIFAR_FILES[self.variant]
        if self._meta is None:
            self.class_names = [str(i) for i in range(10 if self.variant == "cifar10" else 100)]
            return
        for m, data in self._read_bytes([self._meta]):
            d = _unpickle(data, self._where(m))
            names = d.get(spec["names"])
            if names is None:
                raise DataError(f"{self._where(m)}: no {spec['names'].decode()} key")
            self.class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]

    def batches(self, batch_size: int = 256) -> Iterator[Batch]:
        return self._limited(self._batches(batch_size))

    def _batches(self, batch_size: int) -> Iterator[Batch]:
        spec = CIFAR_FILES[self.variant]
        for m, data in self._read_bytes(list(self._files)):
            where = self._where(m)
            d = _unpickle(data, where)
            del data
            x = d.get(b"data")
            y = d.get(spec["labels"], d.get(b"labels"))
            if x is None or y is None:
                raise DataError(f"{where}: CIFAR batch lacks 'data' or labels")
            x = np.asarray(x, dtype=np.uint8)
            if x.ndim != 2 or x.shape[1] != 3072:
                raise DataError(f"{where}: CIFAR 'data' must be N×3072 uint8, got {x.shape}")
            y = np.asarray(y, dtype=np.int64)
            if len(y) != len(x):
                raise DataError(f"{where}: {len(x)} images but {len(y)} labels")
            imgs = x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            src = f"{self.path.name}:{m}" if self.archive else m
            for i in range(0, len(imgs), batch_size):
                b = np.ascontiguousarray(imgs[i:i + batch_size])
                yield (resize_batch(b, self.size, self.resize), y[i:i + batch_size],
                       [f"{src}[{j}]" for j in range(i, i + len(b))])


# ---------------------------------------------------------------------------
# NumPy arrays
# ---------------------------------------------------------------------------

IMAGE_KEYS = ("x", "X", "images", "image", "imgs", "data", "arr_0")
LABEL_KEYS = ("y", "Y", "labels", "label", "targets", "target", "arr_1")
NAME_KEYS = ("class_names", "label_names", "classes")


class ArrayDataset(Dataset):
    def __init__(self, path, split, size, resize, limit, skip_bad):
        super().__init__(path, split, size, resize, limit, skip_bad)
        p = self.path
        self.kind = "npy" if p.suffix.lower() == ".npy" else "npz"
        parts: list[tuple[str, np.ndarray, np.ndarray | None]] = []  # (key, images, labels)
        try:
            if self.kind == "npy":
                x = np.load(p, mmap_mode="r", allow_pickle=False)
                self.splits = []
                self._check_split()
                parts.append(("", x, None))
            else:
                z = np.load(p, allow_pickle=False)
                keys = list(z.files)
                split_keys = [s for s in SPLIT_NAMES if f"x_{s}" in keys]
                if split_keys:
                    self.splits = split_keys
                    self._check_split()
                    for s in split_keys:
                        if self.split in ("all", s):
                            parts.append((f"x_{s}", z[f"x_{s}"], z[f"y_{s}"] if f"y_{s}" in keys else None))
                else:
                    self.splits = []
                    self._check_split()
                    xk = next((k for k in IMAGE_KEYS if k in keys), None)
                    if xk is None:
                        cands = [k for k in keys if z[k].dtype == np.uint8 and z[k].ndim in (3, 4)]
                        if len(cands) != 1:
                            raise UnknownFormatError(f"{p}: cannot tell which array holds the images "
                                                     f"(keys: {', '.join(keys)}; expected one of {', '.join(IMAGE_KEYS)})")
                        xk = cands[0]
                    yk = next((k for k in LABEL_KEYS if k in keys and k != xk), None)
                    parts.append((xk, z[xk], z[yk] if yk else None))
                nk = next((k for k in NAME_KEYS if k in keys), None)
                if nk:
                    self.class_names = [str(s) for s in z[nk].tolist()]
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
            raise DataError(f"{p}: not a readable {self.kind} file ({e})") from None
        checked = []
        for key, x, y in parts:
            where = f"{p}[{key}]" if key else str(p)
            if x.dtype != np.uint8:
                raise DataError(f"{where}: images must be uint8, got {x.dtype}")
            if x.ndim == 4 and x.shape[-1] not in (1, 3, 4) and x.shape[1] in (1, 3, 4):
                x = x.transpose(0, 2, 3, 1)  # channel-first -> channel-last
            if not (x.ndim == 3 or (x.ndim == 4 and x.shape[-1] in (1, 3, 4))):
                raise DataError(f"{where}: images must be N×H×W or N×H×W×C (C in 1, 3, 4), got shape {x.shape}")
            if y is not None:
                y = np.asarray(y).reshape(-1)
                if len(y) != len(x):
                    raise DataError(f"{where}: {len(x)} images but {len(y)} labels")
                if not np.issubdtype(y.dtype, np.integer):
                    raise DataError(f"{where}: labels must be integers, got {y.dtype}")
                y = y.astype(np.int64)
            checked.append((key, x, y))
        self._parts = checked
        total = sum(len(x) for _, x, _ in checked)
        if total == 0:
            raise EmptyDatasetError(f"{p}: no images (empty array)")
        if not self.class_names:
            ys = [y for _, _, y in checked if y is not None and len(y)]
            if ys:
                self.class_names = [str(i) for i in range(int(max(int(y.max()) for y in ys)) + 1)]
        self.n = total if limit is None else min(limit, total)

    def batches(self, batch_size: int = 256) -> Iterator[Batch]:
        return self._limited(self._batches(batch_size))

    def _batches(self, batch_size: int) -> Iterator[Batch]:
        for key, x, y in self._parts:
            tag = f"{self.path.name}[{key}]" if key else self.path.name
            for i in range(0, len(x), batch_size):
                b = array_to_rgb(np.asarray(x[i:i + batch_size]))
                lab = y[i:i + batch_size] if y is not None else np.full(len(b), -1, dtype=np.int64)
                yield resize_batch(b, self.size, self.resize), lab, [f"{tag}[{j}]" for j in range(i, i + len(b))]


# ---------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------

def _looks_like_cifar_tar(p: Path) -> bool:
    name = p.name.lower()
    if name.startswith(("cifar-10-python", "cifar-100-python")):
        return True
    try:
        with tarfile.open(p) as tf:
            for i, m in enumerate(_iter_tar(tf)):
                b = os.path.basename(m.name)
                if b in ("batches.meta", "data_batch_1", "test_batch") or m.name.endswith("cifar-100-python/meta"):
                    return True
                if _is_image(m.name) or i > 20:
                    return False
    except (tarfile.TarError, OSError, EOFError):
        return False
    return False


def detect_format(path: str | Path) -> str:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    if p.is_dir():
        if any((p / f).is_file() for f in ("batches.meta", "data_batch_1", "test_batch")):
            return "cifar"
        if (p / "meta").is_file() and ((p / "train").is_file() or (p / "test").is_file()):
            return "cifar"
        if (p / "cifar-10-batches-py").is_dir() or (p / "cifar-100-python").is_dir():
            return "cifar"
        return "imagefolder"
    name = p.name.lower()
    if name.endswith(".npz"):
        return "npz"
    if name.endswith(".npy"):
        return "npy"
    if name.endswith(".zip"):
        return "imagefolder"
    if name.endswith(TAR_SUFFIXES):
        return "cifar" if _looks_like_cifar_tar(p) else "imagefolder"
    raise UnknownFormatError(f"{p}: unknown input format (expected an image folder, .tar/.zip archive, "
                             "CIFAR python archive or folder, .npz or .npy; or pass --format)")


def open_dataset(src: str | Path, split: str = "all", size: int = 32, resize: str = "bilinear",
                 fmt: str | None = None, limit: int | None = None, skip_bad: bool = False) -> Dataset:
    """Open any supported dataset for streaming (see module docstring)."""
    p = Path(src)
    if resize not in RESIZE_MODES:
        raise DataError(f"--resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    if size < 1:
        raise DataError(f"--size must be positive, got {size}")
    if limit is not None and limit < 1:
        raise DataError(f"--limit must be positive, got {limit}")
    if split not in SPLIT_CHOICES:
        raise SplitError(f"{p}: unknown split {split!r} (choose from {', '.join(SPLIT_CHOICES)})")
    if fmt is None:
        fmt = detect_format(p)
    elif not p.exists():
        raise DataError(f"{p}: no such file or directory")
    if fmt not in FORMATS:
        raise UnknownFormatError(f"{p}: unknown --format {fmt!r} (choose from {', '.join(FORMATS)})")
    if fmt == "cifar" and p.is_dir():
        for sub in ("cifar-10-batches-py", "cifar-100-python"):
            if (p / sub).is_dir():
                p = p / sub
                break
    cls = {"imagefolder": ImageFolder, "cifar": CifarPython, "npz": ArrayDataset, "npy": ArrayDataset}[fmt]
    return cls(p, split, size, resize, limit, skip_bad)
