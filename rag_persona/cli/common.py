"""What every `rag-persona` command shares: the typer app, one-line errors, progress on stderr, JSON out."""

from __future__ import annotations

import functools
import inspect
import json
from typing import Annotated

import typer

from rag_persona.errors import RagPersonaError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


def friendly(fn):
    """Turn a RagPersonaError into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RagPersonaError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _progress(msg: str) -> None:
    typer.echo(f"[rag-persona] {msg}", err=True)


def echo_json(obj) -> None:
    typer.echo(json.dumps(obj, ensure_ascii=False, indent=2))


def keywords_for(target, options: dict, **override) -> dict:
    """The command's options (its `locals()` on entry) that `target`, a function or dataclass, takes by
    name, then `override`: the options are named after the API's keywords, so each name is written once."""
    names = inspect.signature(target).parameters
    return {k: v for k, v in options.items() if k in names} | override


def open_index(index: str | None, persona: str | None = None):
    """The named index folder, else the persona's (built, with progress, when missing or stale)."""
    from rag_persona.retrieval.store import open_store

    return open_store(index, persona, progress=True, log=_progress)


PersonaOpt = Annotated[
    str | None,
    typer.Option(
        "--persona", help="Persona: an id under knowledge/ (default: ojousama) or a persona folder."
    ),
]


JsonOpt = Annotated[bool, typer.Option("--json")]
ModelOpt = Annotated[
    str | None, typer.Option("--model", help="Bundled alias, hub id or local folder (default: bundled 0.5B).")
]
AdapterOpt = Annotated[
    str | None,
    typer.Option("--adapter", help="A peft adapter folder ('none': base model; default: the shipped one)."),
]
EngineOpt = Annotated[
    str,
    typer.Option(
        "--engine",
        help="auto (llama.cpp for GGUF chat on CPU, transformers for HF models and CUDA), llama.cpp, "
        "transformers, or the URL of an OpenAI-compatible server (vLLM, llama.cpp server).",
    ),
]
