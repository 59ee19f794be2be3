"""The one place for every fixed set of choices (light: no torch, so the CLI starts fast).

Library functions take the plain strings (or these str Enums); the CLI uses the Enums so
`--help` lists the choices and the argument parser rejects anything else.
"""
from __future__ import annotations

from enum import Enum


class Split(str, Enum):
    """Which part of a dataset: a split folder/array name, or all of them."""
    train = "train"
    test = "test"
    val = "val"
    valid = "valid"
    validation = "validation"
    all = "all"


class Resize(str, Enum):
    """How an image becomes size×size: bilinear on the whole image (Hugging Face), or centre crop first."""
    bilinear = "bilinear"
    center_crop = "center-crop"


class DatasetFormat(str, Enum):
    imagefolder = "imagefolder"
    cifar = "cifar"
    npz = "npz"
    npy = "npy"
    files = "files"
    hf = "hf"
    webdataset = "webdataset"
    openai_tokens = "openai-tokens"


class Site(str, Enum):
    """Where features are tapped: ln_1 of each block (the paper's), or the raw residual stream."""
    ln = "ln"
    resid = "resid"


class Pool(str, Enum):
    """How a token map [T, D] becomes one vector [D] (mean, max over positions), or none: the map itself."""
    mean = "mean"
    max = "max"
    none = "none"


class ComputeDtype(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class StoreDtype(str, Enum):
    float32 = "float32"
    float16 = "float16"


class ProbeMethod(str, Enum):
    """How `igpt probe` evaluates a layer: a linear probe, or k-nearest neighbours (DINO's k-NN)."""
    linear = "linear"
    knn = "knn"


class KnnVote(str, Enum):
    """The k-NN vote: weighted by exp(similarity / temperature) (DINO), or one vote per neighbour."""
    weighted = "weighted"
    majority = "majority"


KNN_K = 20              # DINO's k-NN defaults: neighbours per vote and the weighted vote's temperature
KNN_TEMPERATURE = 0.07


class ProbeSolver(str, Enum):
    """The probe's solver of scikit-learn's logistic-regression objective (`igpt_cli.probe.estimator`)."""
    auto = "auto"
    torch = "torch"
    scipy = "scipy"
    sklearn = "sklearn"


def values(enum: type[Enum]) -> tuple[str, ...]:
    return tuple(m.value for m in enum)


SPLIT_CHOICES = values(Split)
SPLIT_NAMES = tuple(s for s in SPLIT_CHOICES if s != "all")
RESIZE_MODES = values(Resize)
FORMATS = values(DatasetFormat)
SITES = values(Site)
POOLS = values(Pool)
DTYPE_CHOICES = values(ComputeDtype)
STORE_DTYPES = values(StoreDtype)
PROBE_SOLVERS = values(ProbeSolver)
PROBE_METHODS = values(ProbeMethod)
KNN_VOTES = values(KnnVote)
DEVICES = ("auto", "cpu", "cuda", "mps")  # plus "cuda:N": a string option, not an Enum
