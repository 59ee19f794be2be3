"""`igpt sweep` (being built)."""
from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add `sweep` to the `igpt` app."""
