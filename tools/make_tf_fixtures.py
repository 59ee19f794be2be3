"""Write tests/fixtures/tf/: tiny iGPT checkpoints saved by real TensorFlow, and TF's forward on them.

Run it in a throwaway environment (TensorFlow is never a dependency of igpt):

    python3 -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu numpy
    /tmp/tfenv/bin/python tools/make_tf_fixtures.py            # writes tests/fixtures/tf/

The forward is openai/image-gpt's `src/model.py`, rebuilt in tf.compat.v1 graph mode with
the same variable names, shapes and maths: `model/wte` [n_vocab, d], `model/wpe`,
`model/sos` (autoregressive only), `model/wtet`, per block `ln_1/g`, `attn/{q,k,v,c}_proj`
[n_head, d/n_head, d] used through the same einsums, `ln_2/g`, `mlp/c_fc/w`,
`mlp/c_proj/w`, `model/ln_f/g`; gain-only norm, `x * sigmoid(1.702 x)`, the SOS shift
(autoregressive) or bidirectional attention with the embeddings multiplied by a keep mask
(BERT). The keep mask is fed in (the original draws it with `tf.random.uniform > 0.15`) so
the tests can pass the same mask.

Each checkpoint is saved as two partial bundles (`SaveV2`) merged with
`MergeV2Checkpoints`, as a sharded Saver does: `model.ckpt-7.data-0000{0,1}-of-00002`.
Adam slots, `beta1_power` and `global_step` are saved too (a converter must ignore them).
Outputs per model, `<name>/forward.npz`: `tokens` [B, T], `keep` [B, T] (BERT),
`hidden_<l>` (block l's input; l = n_layer: the ln_f output), `ln1_<l>` (ln_1 of block l)
and `logits` [B, T, n_vocab]. `not-igpt/` holds a checkpoint of something else.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

tf1 = tf.compat.v1
OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tf"
N_VOCAB, N_CTX, N_EMBD, N_HEAD, N_LAYER, BATCH = 512, 16, 16, 2, 2, 3
STEP = 7


# --- openai/image-gpt src/model.py, the parts the forward uses ---------------------------------------
def norm(x, scope, *, epsilon=1e-5):
    with tf1.variable_scope(scope):
        g = tf1.get_variable("g", [x.shape[-1]])
        s = tf.reduce_mean(tf.square(x), axis=-1, keepdims=True)
        return x * tf.math.rsqrt(s + epsilon) * g


def conv1d(x, scope, nf):
    with tf1.variable_scope(scope):
        *start, nx = x.shape.as_list()
        w = tf1.get_variable("w", [nx, nf])
        return tf.reshape(tf.matmul(tf.reshape(x, [-1, nx]), w), start + [nf])


def attn(x, scope, n_state, *, bert):
    with tf1.variable_scope(scope):
        nx = x.shape[-1]
        wk, wq, wv = (tf1.get_variable(n, [N_HEAD, nx // N_HEAD, n_state]) for n in ("k_proj", "q_proj", "v_proj"))
        k = tf.einsum("bsf,hef->bhse", x, wk)
        q = tf.einsum("bsf,hef->bhse", x, wq)
        v = tf.einsum("bsf,hef->bhse", x, wv)
        w = tf.matmul(q, k, transpose_b=True) * tf.math.rsqrt(tf.cast(v.shape[-1], tf.float32))
        if not bert:
            nd = ns = w.shape[-1]
            b = tf.cast(tf.range(nd)[:, None] >= tf.range(ns) - ns + nd, w.dtype)[None, None]
            w = w * b - 1e10 * (1 - b)
        w = w - tf.reduce_max(w, axis=-1, keepdims=True)
        w = tf.exp(w) / tf.reduce_sum(tf.exp(w), axis=-1, keepdims=True)
        a = tf.matmul(w, v)
        wc = tf1.get_variable("c_proj", [N_HEAD, nx // N_HEAD, n_state])
        return tf.einsum("bhse,hef->bsf", a, wc)


def block(x, scope, *, bert, taps):
    with tf1.variable_scope(scope):
        nx = x.shape[-1]
        h1 = norm(x, "ln_1")
        taps.append(h1)
        x = x + attn(h1, "attn", nx, bert=bert)
        h2 = norm(x, "ln_2")
        with tf1.variable_scope("mlp"):
            h = conv1d(h2, "c_fc", nx * 4)
            x = x + conv1d(h * tf.sigmoid(1.702 * h), "c_proj", nx)
        return x


def model(X, M, *, bert):
    """Returns (block inputs + [ln_f output], ln_1 outputs, logits)."""
    with tf1.variable_scope("model"):
        wpe = tf1.get_variable("wpe", [N_CTX, N_EMBD])
        wte = tf1.get_variable("wte", [N_VOCAB, N_EMBD])
        wtet = tf1.get_variable("wtet", [N_VOCAB, N_EMBD])
        h = tf.gather(wte, X)
        if bert:
            h = h * tf.expand_dims(M, 2)
        else:
            sos = tf1.get_variable("sos", [N_EMBD])
            h = tf.concat([tf.ones([BATCH, 1, N_EMBD]) * sos, h[:, :-1, :]], axis=1)
        h += tf.gather(wpe, tf.range(N_CTX))[None]
        hidden, taps = [], []
        for layer in range(N_LAYER):
            hidden.append(h)
            h = block(h, "h%d" % layer, bert=bert, taps=taps)
        h = norm(h, "ln_f")
        hidden.append(h)
        logits = tf.reshape(tf.matmul(tf.reshape(h, [-1, N_EMBD]), wtet, transpose_b=True), [BATCH, N_CTX, N_VOCAB])
        return hidden, taps, logits


# --- checkpoints --------------------------------------------------------------------------------------
def save_two_shards(values: dict[str, np.ndarray], prefix: Path) -> None:
    """Two partial SaveV2 bundles merged into `prefix` (data-00000-of-00002, data-00001-of-00002)."""
    names = sorted(values)
    halves = [names[0::2], names[1::2]]
    tmp = prefix.parent / "tmp-parts"
    parts = []
    for i, part in enumerate(halves):
        p = str(tmp / f"part-{i:05d}-of-00002")
        tf.raw_ops.SaveV2(prefix=p, tensor_names=part, shape_and_slices=[""] * len(part),
                          tensors=[tf.constant(values[n]) for n in part])
        parts.append(p)
    tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=parts, destination_prefix=str(prefix), delete_old_dirs=True)
    shutil.rmtree(tmp, ignore_errors=True)


def make(name: str, bert: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    graph = tf.Graph()
    with graph.as_default():
        X = tf1.placeholder(tf.int32, [BATCH, N_CTX])
        M = tf1.placeholder(tf.float32, [BATCH, N_CTX])
        hidden, taps, logits = model(X, M, bert=bert)
        variables = tf1.global_variables()
        values = {}
        for v in variables:  # random weights; gains around 1 so every norm's gain matters
            shape = v.shape.as_list()
            base = 1.0 if v.name.endswith("/g:0") else 0.0
            values[v.name[:-2]] = (base + rng.normal(0, 0.3 if base else 0.2, shape)).astype(np.float32)
        tokens = rng.integers(0, N_VOCAB, (BATCH, N_CTX)).astype(np.int32)
        keep = (rng.uniform(size=(BATCH, N_CTX)) > 0.15).astype(np.float32)
        with tf1.Session(graph=graph) as sess:
            sess.run([v.assign(values[v.name[:-2]]) for v in variables])
            out = sess.run({"hidden": hidden, "taps": taps, "logits": logits}, {X: tokens, M: keep})
    extra = {f"{n}/Adam": np.zeros_like(values[n]) for n in ("model/wpe", "model/ln_f/g")}
    extra.update({f"{n}/Adam_1": np.ones_like(values[n]) for n in ("model/wpe", "model/ln_f/g")})
    extra.update(beta1_power=np.float32(0.9), beta2_power=np.float32(0.95), global_step=np.int64(STEP))
    d = OUT / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    save_two_shards({**values, **extra}, d / f"model.ckpt-{STEP}")
    arrays = {"tokens": tokens, "logits": out["logits"]}
    if bert:
        arrays["keep"] = keep
    arrays.update({f"hidden_{i}": h for i, h in enumerate(out["hidden"])})
    arrays.update({f"ln1_{i}": h for i, h in enumerate(out["taps"])})
    np.savez_compressed(d / "forward.npz", **arrays)
    print(f"{d}: {sorted(p.name for p in d.iterdir())}")


def make_not_igpt() -> None:
    d = OUT / "not-igpt"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    rng = np.random.default_rng(3)
    save_two_shards({"dense/kernel": rng.normal(size=(4, 3)).astype(np.float32),
                     "dense/bias": np.zeros(3, np.float32)}, d / "model.ckpt-1")


if __name__ == "__main__":
    make("ar", bert=False, seed=0)
    make("bert", bert=True, seed=1)
    make_not_igpt()
