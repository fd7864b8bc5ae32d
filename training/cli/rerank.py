"""`rag-persona train-reranker`: train, calibrate and ship the cross-encoder reranker (CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rag_persona.cli import friendly, keywords_for


def train_reranker_cmd(
    out: Annotated[
        Path, typer.Option("--out", help="Output folder (the shipped one: adapters/reranker-e5-small).")
    ],
    jaquad_questions: Annotated[int, typer.Option(help="JaQuAD questions to draw pairs from.")] = 3000,
    jsts_pairs: Annotated[int, typer.Option(help="JSTS pairs (soft labels).")] = 1500,
    train_layers: Annotated[int, typer.Option(help="Top e5 layers to train (with the head).")] = 6,
    max_steps: Annotated[int, typer.Option(help="Stop after N steps (-1: one epoch).")] = 800,
    batch_size: Annotated[int, typer.Option()] = 16,
    learning_rate: Annotated[float, typer.Option()] = 5e-5,
    threads: Annotated[int, typer.Option(help="CPU threads (1 on a busy machine).")] = 2,
    seed: Annotated[int, typer.Option()] = 0,
    calibrate_only: Annotated[
        bool, typer.Option("--calibrate-only", help="Refit calibration and threshold of an existing --out.")
    ] = False,
) -> None:
    """Train the reranker on JaQuAD, JSTS and the synthetic personas' train queries, then fit its
    calibration and default threshold on the shipped personas' dev sets."""
    options = dict(locals())
    from training.rerank.calibrate import calibrate
    from training.rerank.train import RerankerRecipe, train_reranker

    if not calibrate_only:
        recipe = RerankerRecipe(**keywords_for(RerankerRecipe, options))
        train_reranker(recipe, out, log=typer.echo)
    calibrate(out, log=typer.echo)


def register(app: typer.Typer) -> None:
    """Add this command to the `rag-persona` app."""
    app.command("train-reranker")(friendly(train_reranker_cmd))
