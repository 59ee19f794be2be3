"""The models shipped inside the package, by name (light: no torch, so a palette can name one too)."""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLED: dict[str, Path] = {  # short name -> directory shipped in the package
    "igpt-cifar8": ASSETS / "igpt-cifar8",
}


def bundled_dir(name: str | Path) -> Path | None:
    """The shipped directory a bundled name (`igpt-cifar8`) names; None for anything else, and for a
    name that is also an existing path (a local file or directory always wins)."""
    if str(name) in BUNDLED and not Path(name).exists():
        return BUNDLED[str(name)]
    return None
