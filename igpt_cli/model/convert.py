"""OpenAI's original TensorFlow iGPT checkpoints -> Hugging Face ImageGPT directories.

The release (openai/image-gpt `download.py`: `igpt-{s,m,l}[-bert]`, `model.ckpt-STEP`) uses
the variable names of its `src/model.py` (no biases anywhere):

    model/wte [n_vocab, d]   model/wpe [n_ctx, d]   model/sos [d] (autoregressive only)
    model/wtet [n_vocab, d] (the untied output embedding)   model/ln_f/g [d]
    model/h{i}/ln_1/g, ln_2/g [d]
    model/h{i}/attn/{q,k,v}_proj [n_head, d/n_head, d]   q[b,h,s,e] = sum_f x[b,s,f] w[h,e,f]
    model/h{i}/attn/c_proj [n_head, d/n_head, d]         y[b,s,f] = sum_{h,e} a[b,h,s,e] w[h,e,f]
    model/h{i}/mlp/c_fc/w [d, 4d], mlp/c_proj/w [4d, d] (x @ w)

Mapped onto Hugging Face's layout (GPT-2 Conv1D weights are [in, out]): q/k/v become the
columns of `c_attn` (each `w.reshape(d, d).T`, head-major as our heads split), `c_proj` is
`w.reshape(d, d)`, biases are zero, `sos` is row 512 of `wte` (the SOS token; zeros for a
BERT model), `wtet` the LM head. n_layer, n_embd, n_head (q_proj's leading dimension) and
n_ctx come from the variables; a checkpoint without `model/sos` is a BERT-objective model
(config `igpt_objective: bert`). Adam slots, `beta1_power`, `global_step` are ignored.

`convert_checkpoint` writes the directory tensor by tensor: each tensor is read from the
memory-mapped shards, rearranged and appended to `model.safetensors` (written here, header
first), so peak memory is one tensor, not the model. `converted_model_dir` is what
`--model PREFIX` uses: the conversion cached under `$IGPT_CACHE` (default ~/.cache/igpt).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..formats import sha256_file
from ..jsonfile import read_json
from ..outputs import check_distinct, check_output_path
from ..palette import DEFAULT_PALETTE, Palette, PaletteError
from ..progress import OnProgress, Reporter
from ..results import Result
from .checkpoint import CheckpointError, config_from_hf, config_to_hf, weight_map
from .igpt import IGPT, IGPTConfig
from .tf_checkpoint import TFCheckpoint

CLUSTERS_FILE = "kmeans_centers.npy"  # download.py --clusters
CLUSTER_SEARCH_DEPTH = 3  # the checkpoint's directory and this many parents are searched for it


@dataclass
class ConvertResult(Result):
    out: str
    objective: str
    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int
    n_params: int
    clusters: str  # the file used, or "official palette (…)"
    shards: int


def cache_root() -> Path:
    return Path(os.environ.get("IGPT_CACHE") or Path.home() / ".cache" / "igpt")


# ---------------------------------------------------------------------------
# variables -> config and weights
# ---------------------------------------------------------------------------
def tf_config(ckpt: TFCheckpoint) -> IGPTConfig:
    """The IGPTConfig the variables of an original iGPT checkpoint imply (CheckpointError if not iGPT)."""
    if "model/wte" not in ckpt:
        raise CheckpointError(f"{ckpt.prefix}: not an iGPT checkpoint (no model/wte)")
    n_vocab, d = _shape(ckpt, "model/wte", 2)
    n_layer = 0
    while f"model/h{n_layer}/attn/q_proj" in ckpt:
        n_layer += 1
    if n_layer == 0:
        raise CheckpointError(f"{ckpt.prefix}: not an iGPT checkpoint (no model/h0/attn/q_proj)")
    n_head, head_dim, _ = _shape(ckpt, "model/h0/attn/q_proj", 3)
    hf = dict(vocab_size=n_vocab + 1, n_positions=_shape(ckpt, "model/wpe", 2)[0], n_embd=d, n_layer=n_layer,
              n_head=n_head, activation_function="quick_gelu")
    width = _shape(ckpt, "model/h0/mlp/c_fc/w", 2)[1]
    if width != 4 * d:
        hf["n_inner"] = width
    if "model/sos" not in ckpt:
        hf["igpt_objective"] = "bert"
    try:
        cfg = config_from_hf(hf)
    except CheckpointError as e:
        raise CheckpointError(f"{ckpt.prefix}: {e}") from None
    if n_head * head_dim != d:
        raise CheckpointError(f"{ckpt.prefix}: model/h0/attn/q_proj has shape {ckpt.shape('model/h0/attn/q_proj')}, "
                              f"which does not split n_embd={d} into heads")
    return cfg


def _shape(ckpt: TFCheckpoint, name: str, ndim: int) -> tuple[int, ...]:
    if name not in ckpt:
        raise CheckpointError(f"{ckpt.prefix}: incomplete iGPT checkpoint (no {name})")
    s = ckpt.shape(name)
    if len(s) != ndim:
        raise CheckpointError(f"{ckpt.prefix}: {name} has shape {s}, expected {ndim} dimensions")
    return s


def hf_weights(ckpt: TFCheckpoint, cfg: IGPTConfig) -> dict[str, tuple[tuple[int, ...], callable]]:
    """Every Hugging Face weight: name -> (shape, a function that builds it as float32 from the shards)."""
    d, V = cfg.n_embd, cfg.vocab_size
    w = cfg.mlp_width

    def var(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in ckpt:
            raise CheckpointError(f"{ckpt.prefix}: incomplete iGPT checkpoint (no {name})")
        if ckpt.shape(name) != shape:
            raise CheckpointError(f"{ckpt.prefix}: {name} has shape {ckpt.shape(name)}, expected {shape}")
        return np.asarray(ckpt.read(name), dtype=np.float32)

    def heads(name: str) -> np.ndarray:  # [n_head, d/n_head, d] -> [d (h, e), d (f)]
        return var(name, (cfg.n_head, d // cfg.n_head, d)).reshape(d, d)

    def wte() -> np.ndarray:
        sos = var("model/sos", (d,)) if cfg.autoregressive else np.zeros(d, np.float32)
        return np.concatenate([var("model/wte", (V - 1, d)), sos[None]])  # [V, d]: SOS is the last token

    def zeros(n: int):
        return lambda: np.zeros(n, np.float32)

    build = {"wte.weight": wte, "wpe.weight": lambda: var("model/wpe", (cfg.n_positions, d)),
             "ln_f.weight": lambda: var("model/ln_f/g", (d,)), "lm_head.weight": lambda: var("model/wtet", (V - 1, d))}
    for i in range(cfg.n_layer):
        p = f"model/h{i}/"
        build.update({
            f"h.{i}.ln_1.weight": lambda p=p: var(p + "ln_1/g", (d,)),
            f"h.{i}.attn.c_attn.weight": lambda p=p: np.concatenate(
                [heads(p + f"attn/{n}_proj").T for n in "qkv"], axis=1),  # [d in, 3d out]
            f"h.{i}.attn.c_attn.bias": zeros(3 * d),
            f"h.{i}.attn.c_proj.weight": lambda p=p: heads(p + "attn/c_proj"),  # [d in (h, e), d out]
            f"h.{i}.attn.c_proj.bias": zeros(d),
            f"h.{i}.ln_2.weight": lambda p=p: var(p + "ln_2/g", (d,)),
            f"h.{i}.mlp.c_fc.weight": lambda p=p: var(p + "mlp/c_fc/w", (d, w)),
            f"h.{i}.mlp.c_fc.bias": zeros(w),
            f"h.{i}.mlp.c_proj.weight": lambda p=p: var(p + "mlp/c_proj/w", (w, d)),
            f"h.{i}.mlp.c_proj.bias": zeros(d),
        })
    with torch.device("meta"):  # our shapes, without memory; Hugging Face's are transposed where flagged
        ours = IGPT(cfg).state_dict()
    out = {}
    for name, (hf, transposed) in weight_map(cfg.n_layer).items():
        shape = tuple(ours[name].shape)
        out[hf] = (shape[::-1] if transposed else shape, build[name])
    return out


def write_safetensors(path: Path, tensors: dict[str, tuple[tuple[int, ...], callable]], reporter: Reporter) -> int:
    """Write float32 `tensors` (name -> (shape, builder)) as a safetensors file, one tensor in memory at a
    time: the header (names, shapes, offsets) first, then each tensor's bytes. Returns the element count."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (shape, _) in tensors.items():
        n = int(np.prod(shape, dtype=np.int64)) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for name, (shape, build) in tensors.items():
            arr = np.ascontiguousarray(build(), dtype="<f4")
            assert arr.shape == tuple(shape), (name, arr.shape, shape)
            f.write(memoryview(arr).cast("B"))
            reporter.advance(1, info=name)
    return offset // 4


# ---------------------------------------------------------------------------
# clusters
# ---------------------------------------------------------------------------
def find_clusters(prefix: Path, clusters: str | Path | None) -> tuple[Path, bool]:
    """(palette file, whether it is the official one shipped with igpt): `clusters` if given, else
    kmeans_centers.npy beside the checkpoint or in its parent directories, else the official palette."""
    if clusters is not None:
        return Path(clusters), False
    d = prefix.resolve().parent
    for _ in range(CLUSTER_SEARCH_DEPTH + 1):
        if (d / CLUSTERS_FILE).is_file():
            return d / CLUSTERS_FILE, False
        d = d.parent
    return DEFAULT_PALETTE, True


def load_clusters(path: Path, n_colours: int) -> np.ndarray:
    try:
        palette = Palette.load(path)
    except PaletteError as e:
        raise InputError(f"clusters: {e}") from None
    if palette.k != n_colours:
        raise InputError(f"clusters: {path} has {palette.k} colours, the checkpoint's model predicts {n_colours}")
    return palette.centers


def _write_preprocessor_config(out: Path, clusters: np.ndarray, side: int | None) -> None:
    size = {"height": side, "width": side} if side else {"height": 32, "width": 32}
    cfg = dict(image_processor_type="ImageGPTImageProcessor", clusters=clusters.tolist(), do_color_quantize=True,
               do_normalize=True, do_resize=True, resample=2, size=size)
    (out / "preprocessor_config.json").write_text(json.dumps(cfg) + "\n")


# ---------------------------------------------------------------------------
# conversion
# ---------------------------------------------------------------------------
def convert_checkpoint(prefix: str | Path, out: str | Path, *, clusters: str | Path | None = None,
                       on_progress: OnProgress | None = None) -> ConvertResult:
    """Convert the TF checkpoint `prefix` into the Hugging Face directory `out` (config.json,
    model.safetensors, preprocessor_config.json with the clusters). The directory appears
    whole or not at all: it is written beside `out` under a temporary name and renamed.
    Progress: task "convert", unit "tensor"."""
    prefix, out = Path(prefix), Path(out)
    check_output_path(out, overwrite=False, directory=True)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out}: output directory exists and is not empty")
    ckpt = TFCheckpoint(prefix)
    cfg = tf_config(ckpt)
    palette_path, official = find_clusters(prefix, clusters)
    check_distinct({"out": out}, {"index": f"{prefix}.index", "clusters": palette_path,
                                  **{f"shard {i}": p for i, p in enumerate(ckpt.shards)}})
    centers = load_clusters(palette_path, cfg.vocab_size - 1)
    tensors = hf_weights(ckpt, cfg)
    reporter = Reporter(on_progress, "convert", len(tensors), "tensor")
    reporter.start()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        n_params = write_safetensors(tmp / "model.safetensors", tensors, reporter)
        (tmp / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2) + "\n")
        _write_preprocessor_config(tmp, centers, cfg.side)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    used = f"official palette ({palette_path.name}, equal to OpenAI's kmeans_centers.npy)" if official \
        else str(palette_path)
    return ConvertResult(str(out), cfg.objective, cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_positions, n_params,
                         used, ckpt.num_shards)


def model_tensor_names(cfg: IGPTConfig) -> list[str]:
    """The checkpoint tensors the converted model is made of (what `hf_weights` reads; Adam slots and
    step counters are not among them)."""
    names = ["model/wte", "model/wpe", "model/ln_f/g", "model/wtet"] + (["model/sos"] if cfg.autoregressive else [])
    for i in range(cfg.n_layer):
        p = f"model/h{i}/"
        names += [p + n for n in ("ln_1/g", "attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/c_proj", "ln_2/g",
                                  "mlp/c_fc/w", "mlp/c_proj/w")]
    return names


CACHE_RECORD = "igpt_cache.json"  # in each cache entry: where it came from and the digests of its files
CACHE_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


def _source_identity(ckpt: TFCheckpoint, palette_path: Path) -> dict:
    """What a cache entry was converted from: the index's digest, each shard's name and size, the clusters' digest."""
    return {"index_sha256": sha256_file(Path(f"{ckpt.prefix}.index")),
            "shards": {p.name: p.stat().st_size for p in ckpt.shards},
            "clusters_sha256": sha256_file(palette_path) if palette_path.is_file() else None}


def _entry_record(entry: Path, source: dict) -> dict:
    return {"format": "igpt-converted-cache", "format_version": 1, "source": source,
            "sha256": {name: sha256_file(entry / name) for name in CACHE_FILES}}


def _entry_problem(entry: Path, source: dict) -> str | None:
    """Why the cache entry `entry` cannot be used for `source` (None: it can): missing files, a record
    of another source, or a file whose digest is not the recorded one."""
    if not entry.is_dir():
        return "absent"
    try:
        record = read_json(entry / CACHE_RECORD, "cache record")
    except InputError as e:
        return str(e)
    if not isinstance(record, dict) or record.get("source") != source or not isinstance(record.get("sha256"), dict):
        return "its record names another checkpoint"
    for name in CACHE_FILES:
        path = entry / name
        try:
            if not path.is_file() or path.is_symlink() or sha256_file(path) != record["sha256"].get(name):
                return f"{name} does not match its recorded digest"
        except OSError as e:
            return f"{name}: {e.strerror}"
    return None


def converted_model_dir(prefix: str | Path, on_progress: OnProgress | None = None) -> Path:
    """The Hugging Face directory of TF checkpoint `prefix`, converted once into
    `$IGPT_CACHE/converted/<sha256 of the index and clusters>/` and reused after.

    Every use verifies the checkpoint (its shards exist with the sizes the index implies and the
    CRC32C of every tensor the model is made of) and the cache entry (the digests recorded when it
    was written, and the source it was written from); an entry that does not match is rebuilt.
    Progress: task "verify" (unit "tensor"), then "convert" when it is (re)built."""
    prefix = Path(prefix)
    ckpt = TFCheckpoint(prefix)  # the index, and every shard with the size it implies
    cfg = tf_config(ckpt)
    palette_path, _ = find_clusters(prefix, None)
    source = _source_identity(ckpt, palette_path)
    key = hashlib.sha256(f"{source['index_sha256']} {source['clusters_sha256']}".encode()).hexdigest()[:24]
    final = cache_root() / "converted" / key
    problem = _entry_problem(final, source)
    if problem is None:
        names = model_tensor_names(cfg)
        reporter = Reporter(on_progress, "verify", len(names), "tensor")
        reporter.start()
        for name in names:  # a conversion reads (and checks) them all itself
            ckpt.read(name)
            reporter.advance(1, info=name)
        return final
    if problem != "absent":
        Reporter(on_progress, "convert", None).log(f"{final}: cached conversion of {prefix} not used ({problem}); "
                                                   "converting again")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        convert_checkpoint(prefix, staging, on_progress=on_progress)
        record = json.dumps(_entry_record(staging, source), indent=2) + "\n"
        (staging / CACHE_RECORD).write_text(record)
        if (final.exists() or final.is_symlink()) and _entry_problem(final, source) is None:
            return final  # another process rebuilt it meanwhile (this one's is removed below)
        if final.exists() or final.is_symlink():  # a stale entry: moved aside, then removed
            old = final.with_name(f".{final.name}.old.{os.getpid()}")
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(staging, final)
        except OSError:  # another process put a (verified) entry there first
            if _entry_problem(final, source) is not None:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
