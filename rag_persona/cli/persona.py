"""`rag-persona persona import|export`: SillyTavern character cards to persona folders and back."""

from __future__ import annotations

from typing import Annotated

import typer

from rag_persona.cli.common import _progress, app, friendly
from rag_persona.knowledge.card_text import DEFAULT_USER_NAME

persona_app = typer.Typer(
    no_args_is_help=True, help="Persona folders ⇄ SillyTavern character cards (V1/V2/V3, JSON or PNG)."
)
app.add_typer(persona_app, name="persona")


@persona_app.command("import")
@friendly
def persona_import(
    card: Annotated[
        str, typer.Argument(help="Character card: a .json file or a .png with a chara/ccv3 chunk.")
    ],
    out: Annotated[str, typer.Option("--out", help="Persona folder to write (replaced atomically).")],
    persona_id: Annotated[
        str | None, typer.Option("--id", help="Persona id (default: from the card or its file name).")
    ] = None,
    user_name: Annotated[
        str, typer.Option("--user-name", help="What {{user}} / <USER> becomes in the card's texts.")
    ] = DEFAULT_USER_NAME,
) -> None:
    """Write a persona folder (persona.json, facts.jsonl, dialogues.jsonl, card_extras.json) from a card."""
    from rag_persona.knowledge.cards import card_to_persona, load_card
    from rag_persona.prompts import Persona

    loaded = load_card(card)
    folder = card_to_persona(
        loaded, out, persona_id, user_name, validate=lambda d: Persona.from_dict(d, loaded.source)
    )
    for warning in folder.warnings:
        _progress(warning)
    typer.echo(folder.summary(out))


@persona_app.command("export")
@friendly
def persona_export(
    persona_dir: Annotated[str, typer.Argument(help="Persona folder (persona.json, facts.jsonl, …).")],
    out: Annotated[str, typer.Option("--out", help="Card file to write: CARD.json or CARD.png.")],
) -> None:
    """Write a persona folder as a chara_card_v3 card (JSON, or a PNG with ccv3 and chara chunks)."""
    from rag_persona.knowledge.cards import persona_to_card
    from rag_persona.prompts import Persona

    Persona.load(
        persona_dir
    )  # the full persona.json check, with its one-line errors, before anything is written
    typer.echo(persona_to_card(persona_dir, out).summary())
