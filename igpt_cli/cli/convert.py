"""`igpt convert` (being built)."""
from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add `convert` to the `igpt` app."""
