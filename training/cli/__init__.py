"""`rag-persona` commands for training, registered into the library's CLI through an entry point."""

from __future__ import annotations

import typer

from . import data, merge, recall, rerank, train


def register(app: typer.Typer) -> None:
    """Add every training command group to the `rag-persona` app (entry point training.cli:register)."""
    for group in (data, train, recall, merge, rerank):
        group.register(app)
