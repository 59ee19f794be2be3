"""The package's structure: one-way imports, no UI in the library, a public API."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from helpers import ENV, ROOT

PKG = ROOT / "igpt_cli"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> igpt_cli modules it imports (at any level of the file, lazy imports included)."""
    modules = {module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    pkg = base[:len(base) - node.level + 1]
                    mod = ".".join(pkg + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name and t.startswith("igpt_cli"):
                    deps.add(t)
        graph[name] = deps
    return graph


def test_import_graph_has_no_cycle():
    graph = import_graph()
    # a package's __init__ re-exporting its own submodules is not a cycle of code
    graph = {m: {d for d in deps if not (d.startswith(m + ".") and PKG.joinpath(*m.split(".")[1:]).is_dir())}
             for m, deps in graph.items()}
    graph = {m: {d for d in deps if d != "igpt_cli"} for m, deps in graph.items()}  # lazy top-level API
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in graph.get(m, ()):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [m, d]))
            if not state.get(d):
                visit(d, stack + [m])
        state[m] = 2

    for m in graph:
        if not state.get(m):
            visit(m, [])


def test_only_the_cli_imports_typer_and_rich():
    for path in PKG.rglob("*.py"):
        if "cli" in path.relative_to(PKG).parts[:1]:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            for n in names:
                assert n.split(".")[0] not in ("typer", "rich", "matplotlib"), f"{path}: imports {n}"
    graph = import_graph()
    for path in PKG.rglob("*.py"):  # and nothing outside the cli package imports it (but `python -m igpt_cli`)
        if "cli" not in path.relative_to(PKG).parts[:1] and path.name != "__main__.py":
            assert "igpt_cli.cli" not in graph.get(module_name(path), set()), path


def test_library_import_loads_no_ui():
    code = ("import igpt_cli, igpt_cli.probe, igpt_cli.extract; import sys; "
            "assert 'typer' not in sys.modules and 'rich' not in sys.modules, sorted(sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr


def test_public_api_names_resolve():
    import igpt_cli

    for name in igpt_cli.__all__:
        assert getattr(igpt_cli, name) is not None, name


def test_modules_are_short_or_say_why():
    for path in PKG.rglob("*.py"):
        text = path.read_text()
        if text.count("\n") > 420:
            doc = ast.get_docstring(ast.parse(text)) or ""
            assert "long" in doc.lower() or "lines" in doc.lower(), f"{path}: {text.count(chr(10))} lines, no reason given"


# The tiers, bottom to top: a module may import from its own tier and the tiers below, never above.
# A module's tier is that of the longest entry below that prefixes its dotted name (relative to
# igpt_cli), so a new module inside a listed package (`model/runtime.py`, `train/ddp.py`) needs no
# entry; a new top-level module or package needs one line here.
TIERS = {
    "formats": [  # file schemas and the vocabulary every layer shares; no model, no torch work
        "", "formats", "errors", "outputs", "provenance", "choices", "progress", "results", "jsonfile", "seeds",
    ],
    "core": [  # the model, data readers, palettes, devices, processes, and the stage kernel
        "model", "palette", "data", "layers", "runtime", "distributed", "stage", "runner", "bundled",
    ],
    "stages": [  # files in, files out: one command's work each
        "quantize", "extract", "generate", "probe", "train", "export", "show", "show_sources", "fileinfo",
    ],
    "pipelines": [  # stages composed of other stages
        "sweep", "demo",
    ],
    "cli": ["cli", "__main__"],
}
TIER_ORDER = list(TIERS)


def tier_of(module: str) -> str:
    """The tier of an igpt_cli module, by the longest listed prefix of its name ("" = the package root:
    `__version__` and the lazy public API, which imports nothing when loaded)."""
    rel = module.removeprefix("igpt_cli").removeprefix(".")
    best = None
    for tier, prefixes in TIERS.items():
        for p in prefixes:
            if rel == p or (p and rel.startswith(p + ".")):
                if best is None or len(p) > len(best[1]):
                    best = (tier, p)
    assert best is not None, (f"igpt_cli.{rel} is in no tier: add '{rel.split('.')[0]}' to one of "
                              f"{', '.join(TIERS)} in TIERS (tests/test_package.py)")
    return best[0]


def test_imports_point_down_the_tiers():
    graph = import_graph()
    bad = []
    for module, deps in graph.items():
        mine = TIER_ORDER.index(tier_of(module))
        for dep in deps:
            if TIER_ORDER.index(tier_of(dep)) > mine:
                bad.append(f"{module} ({tier_of(module)}) imports {dep} ({tier_of(dep)})")
    assert not bad, "imports against the tiers (cli -> pipelines -> stages -> core -> formats):\n" + "\n".join(sorted(bad))


def test_tier_rules_place_new_modules_and_name_unknown_ones():
    assert tier_of("igpt_cli.model.runtime") == "core" and tier_of("igpt_cli.stage") == "core"
    assert tier_of("igpt_cli.train.ddp") == "stages" and tier_of("igpt_cli.cli.app") == "cli"
    assert tier_of("igpt_cli.show_sources") == "stages" and tier_of("igpt_cli") == "formats"
    try:
        tier_of("igpt_cli.telemetry.upload")
    except AssertionError as e:
        assert "add 'telemetry' to one of formats, core, stages, pipelines, cli" in str(e)
    else:
        raise AssertionError("an unknown module was given a tier")


def test_stages_share_the_kernel_and_runtime_not_each_other():
    """extract and generate run models through `model.runtime` and write files through `stage`,
    never through each other; the kernel and the runtime import no stage."""
    graph = import_graph()
    for m, deps in graph.items():
        for a, b in (("igpt_cli.extract", "igpt_cli.generate"), ("igpt_cli.generate", "igpt_cli.extract")):
            if m == a or m.startswith(a + "."):
                assert not [d for d in deps if d == b or d.startswith(b + ".")], (m, sorted(deps))
    for low in ("igpt_cli.stage", "igpt_cli.model.runtime"):
        stages = [d for d in graph[low]
                  if d.split(".")[1:2] in (["extract"], ["generate"], ["sweep"], ["train"], ["cli"])]
        assert not stages, (low, stages)


# --- What the wheel carries ------------------------------------------------------------------------
# `pip install igpt-cli` (or a wheel from `pip wheel .`) must run `igpt demo` outside a checkout: the
# bundled model, the palette and its lookup table and the demo data are package data, and a glob in
# pyproject.toml that misses one breaks only the installed tool, never the tests run from a checkout.

def _package_files() -> list[str]:
    """Every file of the igpt_cli package as the repository has it (git's list where this is a clone,
    else the tree less caches), relative to the project root."""
    r = subprocess.run(["git", "ls-files", "-z", "igpt_cli"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode == 0 and r.stdout:
        return sorted(n for n in r.stdout.split("\0") if n and (ROOT / n).is_file())
    return sorted(str(p.relative_to(ROOT)) for p in PKG.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")


def _runtime_asset_paths() -> dict[str, Path]:
    """The package-data paths the code loads at run time: every Path (or dict of Paths) bound at
    module level, pointing inside igpt_cli/assets, in every module whose source names the folder."""
    import importlib

    assets, found = PKG / "assets", {}
    for path in sorted(PKG.rglob("*.py")):
        if '"assets"' not in path.read_text():
            continue
        module = importlib.import_module(module_name(path))
        for attr, value in vars(module).items():
            for i, v in (value.items() if isinstance(value, dict) else [(None, value)]):
                if isinstance(v, Path) and v.resolve().is_relative_to(assets.resolve()):
                    found[f"{module.__name__}.{attr}" + (f"[{i!r}]" if i is not None else "")] = v.resolve()
    return found


def test_runtime_assets_are_files_of_the_package():
    """What the code loads from igpt_cli/assets exists and is in the repository (so in the wheel, below)."""
    found = _runtime_asset_paths()
    names = {Path(n).name for n in found.values()}
    assert {"palette_igpt512.npy", "palette_igpt512_lut.npz", "demo-cifar10.tar", "igpt-cifar8"} <= names, found
    tracked = set(_package_files())
    for where, path in found.items():
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        assert files, f"{where} = {path}: no such file or directory"
        for f in files:
            assert str(f.relative_to(ROOT.resolve())) in tracked, f"{where}: {f} is not in the repository"


def test_wheel_carries_every_file_of_the_package(tmp_path):
    """The wheel the project's build backend makes (setuptools, which torch brings into every venv; the
    tree copied, so the checkout gets no build/ of its own) holds every file of igpt_cli, package data
    included, and the `igpt` console script: ~1 s of CPU for the ~9 MB wheel."""
    import zipfile

    src = tmp_path / "src"
    files = _package_files()
    for name in [*files, "pyproject.toml", "README.md"]:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes((ROOT / name).read_bytes())
    code = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dist")], cwd=src, capture_output=True,
                       text=True, env=dict(ENV, PYTHONPATH=""), timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    wheel = tmp_path / "dist" / r.stdout.split()[-1]
    with zipfile.ZipFile(wheel) as z:
        inside = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in inside if n.endswith(".dist-info/entry_points.txt"))
    missing = [f for f in files if f not in inside]
    assert not missing, f"files of igpt_cli not in the wheel (pyproject.toml package-data?): {missing}"
    assert "igpt = igpt_cli.cli:main" in entry_points
    assert not [n for n in inside if n.startswith(("tests/", "docs/", "bench/"))]
