"""`rag-persona fact-recall`: closed-book recall of the persona's facts, to measure continued pre-training."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rag_persona.cli import _progress, echo_json, friendly, keywords_for


def fact_recall_cmd(
    model: Annotated[
        str | None, typer.Option("--model", help="Bundled alias, hub id or local folder (a CPT output).")
    ] = None,
    adapter: Annotated[
        str | None,
        typer.Option("--adapter", help="A peft adapter folder (default: none, the plain model)."),
    ] = None,
    persona: Annotated[str | None, typer.Option("--persona", help="Persona under knowledge/.")] = None,
    knowledge: Annotated[
        Path | None, typer.Option("--knowledge", help="A persona folder (overrides --persona).")
    ] = None,
    n: Annotated[
        int | None, typer.Option("--n", help="A seeded sample of N facts (default: every fact).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Ask each fact's own questions with the persona prompt and NO retrieved context (greedy), and
    score whether each reply states the fact."""
    options = dict(locals())
    from training.recall import run_fact_recall

    report = run_fact_recall(**keywords_for(run_fact_recall, options, progress=_progress))
    if as_json:
        echo_json(report)
        return
    for q in report["questions"]:
        typer.echo(
            f"{'ok' if q['correct'] else '--'} {q['fact_id']:<20} {q['question'][:24]:<26} {q['reply']}"
        )
    s = report["summary"]
    typer.echo(
        f"accuracy {s['accuracy']} over {s['questions']} questions; fact accuracy {s['fact_accuracy']} "
        f"over {s['facts']} facts; EOS rate {s['eos_rate']}; style rate {s['style_rate']}"
    )


def register(app: typer.Typer) -> None:
    """Add these commands to the `rag-persona` app."""
    app.command("fact-recall")(friendly(fact_recall_cmd))
