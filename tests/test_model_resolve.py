"""`--model` names: bundled short names and Hugging Face hub ids resolved from a cache laid out
exactly as huggingface_hub lays it out (refs/, snapshots/<commit>/ symlinks into blobs/), offline."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
from helpers import assert_clean_failure, hf_model, run_igpt

from igpt_cli import formats
from igpt_cli.model import BUNDLED, CheckpointError, list_models, resolve_model_dir
from igpt_cli.model.hub import fetch_command

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def add_snapshot(cache: Path, repo_id: str, commit: str, model_dir: Path, ref: str | None = "main") -> Path:
    """Put `model_dir`'s files into `cache` as huggingface_hub does: content-addressed blobs, a
    snapshot folder of relative symlinks, and `refs/<ref>` holding the commit hash."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for f in model_dir.iterdir():
        sha = hashlib.sha256(f.read_bytes()).hexdigest()
        blob = repo / "blobs" / sha
        if not blob.exists():
            shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline hub cache holding org/tiny-igpt at two commits (main -> A, branch v2 -> B)."""
    cache = tmp_path / "hub"
    _, a = hf_model(tmp_path / "a", n_layer=2, n_embd=32, n_head=2, seed=0)
    _, b = hf_model(tmp_path / "b", n_layer=2, n_embd=32, n_head=2, seed=1)
    snaps = {COMMIT_A: add_snapshot(cache, "org/tiny-igpt", COMMIT_A, a),
             COMMIT_B: add_snapshot(cache, "org/tiny-igpt", COMMIT_B, b, ref="v2")}
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache, snaps, {COMMIT_A: a, COMMIT_B: b}


def weights_sha(d: Path) -> str:
    return formats.sha256_file(d / "model.safetensors")


def test_hub_id_resolves_from_the_cache_offline(hub_cache):
    cache, snaps, dirs = hub_cache
    got = resolve_model_dir("org/tiny-igpt")
    assert got == snaps[COMMIT_A] and weights_sha(got) == weights_sha(dirs[COMMIT_A])
    assert (got / "config.json").is_symlink()  # the cache's own snapshot, not a copy


@pytest.mark.parametrize("revision", ["v2", COMMIT_B, COMMIT_A])
def test_revision_picks_its_snapshot(hub_cache, revision):
    _, snaps, dirs = hub_cache
    commit = COMMIT_B if revision == "v2" else revision
    got = resolve_model_dir("org/tiny-igpt", revision=revision)
    assert got == snaps[commit] and weights_sha(got) == weights_sha(dirs[commit])


def test_not_cached_offline_is_one_line_with_the_fetch_command(hub_cache):
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache") as e:
        resolve_model_dir("org/other-igpt")
    assert fetch_command("org/other-igpt") in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        resolve_model_dir("org/tiny-igpt", revision="c" * 40)


def test_cli_not_cached_exits_2_with_hint(tmp_path):
    env = {"HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    tok = tmp_path / "t.h5"
    r = run_igpt("features", tmp_path, "-m", "openai/imagegpt-small", "-o", tok, "-q", env=env)
    assert_clean_failure(r, "hf download openai/imagegpt-small config.json model.safetensors", out=tok)


def test_bundled_short_name_and_unknown_name():
    assert resolve_model_dir("igpt-cifar8") == BUNDLED["igpt-cifar8"]
    assert (BUNDLED["igpt-cifar8"] / "config.json").is_file()
    with pytest.raises(CheckpointError, match="igpt-cifar9: model not found"):
        resolve_model_dir("igpt-cifar9")


def test_models_lists_bundled_and_cached(hub_cache):
    rows = list_models()
    names = [(r["name"], r["source"]) for r in rows]
    assert ("igpt-cifar8", "bundled") in names
    hub = [r for r in rows if r["source"] == "hub"]
    assert len(hub) == 2 and {r["name"] for r in hub} == {"org/tiny-igpt"}
    r = hub[0]
    assert (r["layers"], r["width"], r["heads"], r["positions"], r["resolution"]) == (2, 32, 2, 64, 8)
    from transformers import ImageGPTModel

    assert r["parameters"] == sum(p.numel() for p in ImageGPTModel.from_pretrained(r["path"]).parameters())
    assert any("v2" in (x["revision"] or "") for x in hub)


@pytest.fixture
def deadline():
    """Fail (not hang) a test that blocks: SIGALRM after 20 s raises in the main thread."""
    import signal

    def expired(signum, frame):
        raise TimeoutError("blocked for 20 s")

    before = signal.signal(signal.SIGALRM, expired)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, before)


def _plant_fifo(path: Path) -> None:
    os.mkfifo(path)


def _plant_huge(path: Path) -> None:
    with open(path, "wb") as f:  # a sparse terabyte: read whole, it would exhaust memory
        f.truncate(1 << 40)


def _plant_dev_zero(path: Path) -> None:
    path.symlink_to("/dev/zero")


def _plant_not_a_hash(path: Path) -> None:
    path.write_text("not a commit hash")


@pytest.mark.parametrize("plant", [_plant_fifo, _plant_huge, _plant_dev_zero, _plant_not_a_hash],
                         ids=["fifo", "oversized", "dev-zero", "not-a-hash"])
def test_models_skips_a_hostile_ref_with_a_warning(hub_cache, deadline, plant):
    # a co-user's planted refs/ file is never waited on or read whole: skipped, said in one line
    cache, _, _ = hub_cache
    ref = cache / "models--org--tiny-igpt" / "refs" / "main"
    ref.unlink()
    plant(ref)
    said = []
    hub = [r for r in list_models(on_warning=said.append) if r["source"] == "hub"]
    assert len(said) == 1 and str(ref) in said[0] and "skipped" in said[0] and "\n" not in said[0]
    # both snapshots are still listed; the one the bad ref named has no ref label, v2 keeps its own
    assert sorted(r["revision"] for r in hub) == sorted([COMMIT_A[:12], f"{COMMIT_B[:12]} (v2)"])
    from helpers import invoke

    r = invoke("models", "--json")
    assert r.exit_code == 0 and '"org/tiny-igpt"' in r.stdout
    assert [line for line in r.stderr.splitlines() if line.strip()] == [f"warning: {said[0]}"]


def test_models_skips_a_repo_whose_snapshots_folder_is_a_symlink(hub_cache, deadline, tmp_path):
    # a symlinked snapshots/ (to / say) would make the listing walk a whole file system: skipped, said once
    cache, _, _ = hub_cache
    repo = cache / "models--org--tiny-igpt"
    shutil.move(repo / "snapshots", tmp_path / "elsewhere")
    (repo / "snapshots").symlink_to(tmp_path / "elsewhere")
    said = []
    assert [r for r in list_models(on_warning=said.append) if r["source"] == "hub"] == []
    assert len(said) == 1 and str(repo) in said[0] and "symbolic link" in said[0]
