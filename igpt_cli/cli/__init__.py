"""The command line: the typer app (`app`), its entry point (`main`), and all drawing (ui, plots).

Nothing outside this package imports it; it imports the library."""
from .app import app, main

__all__ = ["app", "main"]
