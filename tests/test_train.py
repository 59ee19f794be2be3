import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from igpt_cli import formats
from igpt_cli.model import load_pretrained, sos_shift
from igpt_cli.train import TrainConfig, batch_indices, load_tokens, lr_at, make_batch, pretrain

from helpers import ENV, ROOT, run_igpt


def write_tokens(path: Path, n: int = 96, side: int = 4, k: int = 16, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    palette = rng.uniform(-1, 1, size=(k, 3)).astype(np.float32)
    # structured tokens (left half / right half colours) so there is something to learn
    tokens = rng.integers(0, k, size=(n, side * side)).astype(np.uint16)
    tokens[:, ::2] = tokens[:, :1] % 4
    labels = rng.integers(0, 2, size=n)
    with h5py.File(path, "w") as f:
        formats.create_tokens_file(f, height=side, width=side, palette=palette, class_names=["a", "b"],
                                   split="train", source="synthetic", resize="bilinear")
        formats.append_rows(f, tokens=tokens, labels=labels,
                            sources=np.array([f"x[{i}]" for i in range(n)], dtype=object))
    return path


TINY = dict(n_layer=2, n_embd=32, n_head=4, batch_size=8, lr=1e-2, warmup_steps=2, eval_every=3,
            checkpoint_every=3)


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # monotone decay after warm-up
    assert lr_at(100, 100, cfg) == pytest.approx(0.1)


def test_batches_cover_each_epoch_exactly_once():
    n, b = 50, 8
    rows = np.concatenate([batch_indices(s, n, b, seed=3) for s in range(25)])  # 200 rows = 4 epochs
    for e in range(4):
        assert sorted(rows[e * n:(e + 1) * n]) == list(range(n))
    assert not np.array_equal(rows[:n], rows[n:2 * n])  # each epoch reshuffled


def test_flip_augmentation_flips_rows_in_token_space(tmp_path):
    data = load_tokens(write_tokens(tmp_path / "t.h5"))
    cfg = TrainConfig(batch_size=16, flip=True, seed=1)
    flipped = make_batch(data, 0, cfg).numpy().reshape(16, 4, 4)
    plain = make_batch(data, 0, TrainConfig(batch_size=16, flip=False, seed=1)).numpy().reshape(16, 4, 4)
    same = [np.array_equal(a, b) for a, b in zip(flipped, plain)]
    mirrored = [np.array_equal(a, b[:, ::-1]) for a, b in zip(flipped, plain)]
    assert all(s or m for s, m in zip(same, mirrored)) and not all(same)


def test_training_lowers_validation_loss(tmp_path):
    tok = write_tokens(tmp_path / "t.h5")
    events = []
    summary = pretrain(tok, tmp_path / "m", TrainConfig(steps=30, **TINY), val_tokens=tok, dtype="float32",
                       on_progress=events.append)
    hist = json.loads((tmp_path / "m" / "train_meta.json").read_text())["history"]
    assert hist[-1]["val_loss"] < hist[0]["val_loss"] - 0.2
    assert summary.val_bits_per_dim == pytest.approx(hist[-1]["val_loss"] / np.log(2), rel=1e-4)
    assert list(summary.to_dict()) == ["model_dir", "steps", "n_params", "height", "width", "seconds",
                                       "train_loss", "val_loss", "val_bits_per_dim", "world_size", "tokens_per_s"]
    # one progress event per step (plus the start), the evaluation records as log lines
    steps = [e.done for e in events if not e.message]
    assert steps == list(range(31)) and all(e.task == "train" and e.total == 30 for e in events)
    assert [json.loads(e.message)["step"] for e in events if e.message] == [h["step"] for h in hist]


def test_resume_is_bit_for_bit(tmp_path):
    tok = write_tokens(tmp_path / "t.h5")
    cfg = TrainConfig(steps=9, **TINY)
    pretrain(tok, tmp_path / "full", cfg, dtype="float32")

    def interrupt_at_step_3(ev):  # Ctrl-C right after step 3's log line
        if ev.message and json.loads(ev.message)["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(tok, tmp_path / "cut", cfg, dtype="float32", on_progress=interrupt_at_step_3)
    assert json.loads((tmp_path / "cut" / "train_meta.json").read_text())["step"] == 3
    pretrain(tok, tmp_path / "cut", dtype="float32", resume=True)  # cfg=None: the run's own settings
    a = (tmp_path / "full" / "model.safetensors").read_bytes()
    b = (tmp_path / "cut" / "model.safetensors").read_bytes()
    assert a == b


def test_output_loads_in_transformers_with_same_hidden_states(tmp_path):
    import transformers
    tok = write_tokens(tmp_path / "t.h5")
    pretrain(tok, tmp_path / "m", TrainConfig(steps=4, **TINY), dtype="float32")
    ours = load_pretrained(tmp_path / "m")
    hf = transformers.ImageGPTForCausalImageModeling.from_pretrained(tmp_path / "m").eval()
    x = sos_shift(torch.from_numpy(load_tokens(tok).tokens[:5].astype(np.int64)), ours.config.sos_token)
    with torch.no_grad():
        out = hf(x, output_hidden_states=True)
        feats = ours.forward_intermediates(x, list(range(3)), site="resid")
        logits = ours(x)
    for layer in range(3):
        assert torch.allclose(feats[layer], out.hidden_states[layer].mean(1), atol=1e-5)
    assert torch.allclose(logits, out.logits, atol=1e-4)
    proc = transformers.ImageGPTImageProcessor.from_pretrained(tmp_path / "m")
    assert np.allclose(np.asarray(proc.clusters), load_tokens(tok).palette)
    assert proc.size == {"height": 4, "width": 4}


def test_cli_bad_input(tmp_path):
    tok = write_tokens(tmp_path / "t.h5")
    r = run_igpt("train", str(tok), "-o", str(tmp_path / "m"))
    assert r.returncode == 2 and "--steps or --epochs" in r.stderr and "Traceback" not in r.stderr
    r = run_igpt("train", str(tok), "-o", str(tmp_path / "m"), "--resume")
    assert r.returncode == 2 and "nothing to resume" in r.stderr
    r = run_igpt("train", str(tmp_path / "missing.h5"), "-o", str(tmp_path / "m"), "--steps", "2")
    assert r.returncode == 2 and "missing.h5" in r.stderr and "Traceback" not in r.stderr
    r = run_igpt("train", str(tok), "-o", str(tmp_path / "m"), "--steps", "2", "--width", "30", "--heads", "4")
    assert r.returncode == 2 and "divisible" in r.stderr
    assert "--width 30: not divisible by --heads 4" in r.stderr  # library says n_embd=, the CLI its flags
    r = run_igpt("train", str(tok), "-o", str(tmp_path / "m"), "--steps", "2", "--layers", "2")
    assert r.returncode == 2 and "--layers" in r.stderr  # renamed --depth: --layer always means "which layers"


def test_cli_killed_run_resumes_to_the_same_weights(tmp_path):
    tok = write_tokens(tmp_path / "t.h5", n=64)
    common = ["--depth", "2", "--width", "32", "--heads", "4", "--batch-size", "8", "--steps", "40",
              "--checkpoint-every", "5", "--eval-every", "5", "--dtype", "float32", "--quiet"]
    ref = run_igpt("train", str(tok), "-o", str(tmp_path / "ref"), *common)
    assert ref.returncode == 0, ref.stderr
    proc = subprocess.Popen([sys.executable, "-m", "igpt_cli", "train", str(tok), "-o", str(tmp_path / "cut"),
                             *common], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = tmp_path / "cut" / "train_meta.json"
    deadline = time.time() + 60
    while time.time() < deadline and not meta.exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads(meta.read_text())["step"]
    assert done < 40, "the run finished before it could be killed"
    r = run_igpt("train", str(tok), "-o", str(tmp_path / "cut"), "--resume", "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["steps"] == 40
    assert (tmp_path / "ref" / "model.safetensors").read_bytes() == (tmp_path / "cut" / "model.safetensors").read_bytes()


# --- data parallel pieces, validation subset, GPU-path options tested honestly on the CPU ---------------
def test_slices_of_a_global_batch_are_the_global_batch(tmp_path):
    data = load_tokens(write_tokens(tmp_path / "t.h5", n=37))
    cfg = TrainConfig(batch_size=12, flip=True, seed=4)
    for step in (0, 3, 7):  # 7 * 12 rows crosses an epoch boundary
        whole = make_batch(data, step, cfg)
        parts = torch.cat([make_batch(data, step, cfg, (a, a + 3)) for a in range(0, 12, 3)])
        assert torch.equal(whole, parts)


def test_validation_subset_is_seeded_and_class_balanced(tmp_path):
    from igpt_cli.train.data import val_rows

    path = write_tokens(tmp_path / "v.h5", n=60)
    data = load_tokens(path)
    data.labels = np.repeat(np.arange(3), 20)  # class-sorted, as quantize writes a folder
    rows = val_rows(data, 12)
    assert list(np.bincount(data.labels[rows])) == [4, 4, 4] and list(rows) == sorted(rows)
    assert np.array_equal(rows, val_rows(data, 12)) and not np.array_equal(rows, np.arange(12))
    data.labels = np.array([0] * 50 + [1] * 5 + [2] * 5)  # a class runs out: the others fill in
    assert list(np.bincount(data.labels[val_rows(data, 21)])) == [11, 5, 5]
    assert list(val_rows(data, 100)) == list(range(60))  # all of them
    data.labels = None
    assert len(set(val_rows(data, 12))) == 12


def test_compile_falls_back_to_eager_where_no_compiler_works(tmp_path, monkeypatch):
    import igpt_cli.train.step as loop

    def no_compiler(gm, example_inputs):  # what inductor does without a working C++ compiler
        raise RuntimeError("Compiler: cc is not found")

    tok = write_tokens(tmp_path / "t.h5")
    eager = pretrain(tok, tmp_path / "eager", TrainConfig(steps=3, **TINY), dtype="float32")
    monkeypatch.setattr(loop, "COMPILE_BACKEND", no_compiler)
    res = pretrain(tok, tmp_path / "c", TrainConfig(steps=3, **TINY), dtype="float32", compile=True)
    assert res.compiled is False and eager.compiled is None
    assert (tmp_path / "eager" / "model.safetensors").read_bytes() == (tmp_path / "c" / "model.safetensors").read_bytes()


def test_activation_checkpointing_computes_the_same_gradients():
    from igpt_cli.model import IGPT, IGPTConfig
    from igpt_cli.train import loss_on

    torch.manual_seed(0)
    model = IGPT(IGPTConfig(vocab_size=17, n_positions=16, n_embd=32, n_layer=3, n_head=4)).train()
    x = torch.randint(0, 16, (5, 16))
    grads = []
    for recompute in (False, True):
        model.zero_grad()
        model.activation_checkpointing = recompute
        loss_on(model, x).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_float16_trains_with_a_saved_loss_scale(tmp_path):
    from igpt_cli.train.state import read_state

    tok = write_tokens(tmp_path / "t.h5")
    cfg = TrainConfig(steps=6, **TINY)
    pretrain(tok, tmp_path / "full", cfg, dtype="float16")

    def stop_at_3(ev):
        if ev.task == "train" and ev.done == 3 and not ev.started:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(tok, tmp_path / "cut", cfg, dtype="float16", on_progress=stop_at_3)
    scale = read_state(tmp_path / "cut" / "train_state.pt").grad_scaler
    assert scale is not None and scale["scale"] > 1  # gradients were scaled (fp16 underflows otherwise)
    pretrain(tok, tmp_path / "cut", resume=True)  # in the run's own float16, its scale restored
    full, cut = load_pretrained(tmp_path / "full"), load_pretrained(tmp_path / "cut")
    for a, b in zip(full.parameters(), cut.parameters()):
        assert torch.equal(a, b)
    assert all(torch.isfinite(p).all() for p in full.parameters())
    assert read_state(tmp_path / "full" / "train_state.pt").compute_dtype == "float16"


def test_an_interrupt_during_a_step_lands_after_it():
    """Ctrl-C or SIGTERM in the middle of a step (between the optimizer update and its step count,
    say) is held until the step is whole, then raised as usual: a saved state is always one the
    uninterrupted run passed through."""
    import os
    import signal

    from igpt_cli.train.loop import signals_deferred

    order = []
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C's own (pytest-xdist workers ignore it)
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                order.append("step finished")
        assert order == ["step finished"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is back
    finally:
        signal.signal(signal.SIGINT, before)
