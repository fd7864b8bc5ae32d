"""`rag-persona ask|chat|render-prompt|evaluate`: the chat model with and without the persona pipeline."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Annotated

import typer

from rag_persona.cli.common import (
    AdapterOpt,
    EngineOpt,
    JsonOpt,
    ModelOpt,
    PersonaOpt,
    _progress,
    app,
    echo_json,
    friendly,
    open_index,
)
from rag_persona.errors import RagPersonaError

IndexOpt = Annotated[str | None, typer.Option("--index", help="Index folder (default: persona's).")]


def _write_stream(stream) -> None:
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()


def open_chat_engine(engine: str, model: str | None, adapter: str | None, persona: str | None = None):
    """The chat model on the chosen engine, with the persona's default adapter unless one (or 'none') is
    named (a persona without its own adapter gets the shipped role-play adapter, else the base model)."""
    from rag_persona.evaluation.evaluate import resolve_adapter
    from rag_persona.generation.engines import open_engine

    return open_engine(engine, model, adapter=resolve_adapter(model, adapter, persona), progress=_progress)


@app.command()
@friendly
def ask(
    message: Annotated[str, typer.Argument(help="What to say to the persona.")],
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    engine: EngineOpt = "auto",
    persona: PersonaOpt = None,
    index: IndexOpt = None,
    no_persona: Annotated[
        bool, typer.Option("--no-persona", help="The bare model: no persona prompt, no retrieval.")
    ] = False,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 96,
    as_json: JsonOpt = False,
) -> None:
    """One persona turn (retrieve → build → generate), streamed; --json gives reply, context and timings."""
    from rag_persona.chat import PersonaChat, default_persona
    from rag_persona.generation import GenerationSettings, ReplyStream
    from rag_persona.generation.backend import timing_line
    from rag_persona.retrieval.retriever import retriever_for

    backend = open_chat_engine(engine, model, adapter, None if no_persona else persona)
    settings = GenerationSettings(max_new_tokens)
    if no_persona:
        context, stream = [], ReplyStream(backend, [{"role": "user", "content": message}], settings)
    else:
        store = open_index(index, persona)
        turn = PersonaChat(default_persona(persona), retriever_for(store), backend, settings)
        plan, stream = turn.stream([], message)
        context = plan.context
    if as_json:
        for _ in stream:
            pass
        reply = stream.reply
        echo_json(
            {
                "reply": reply.text,
                "context": [{"id": f.id, "text": f.text, "score": round(f.score, 4)} for f in context],
                "timings": reply.timings,
                "ended_by_eos": reply.ended_by_eos,
                "stop_reason": reply.stop_reason,
                "new_tokens": reply.new_tokens,
                "engine": backend.engine,
                "model": backend.source,
                "adapter": getattr(backend, "adapter", None),
            }
        )
        return
    _write_stream(stream)
    typer.echo("")
    reply = stream.reply
    end = "EOS" if reply.ended_by_eos else reply.stop_reason
    _progress(
        f"{reply.new_tokens} tokens in {reply.seconds:.1f}s on {backend.engine}, ended by {end}; "
        + timing_line(reply.timings)
    )


def _terminal_chat(answer: Callable[[list[dict], str], tuple[str, object] | None]) -> None:
    """Read a line, stream the reply, keep the history; Ctrl-D or an empty line ends the chat.

    answer(history, message) gives (a context line for stderr, the reply stream), or None to skip the turn.
    """
    history: list[dict] = []
    while True:
        try:
            message = input("you> ").strip()
        except EOFError:
            break
        if not message:
            break
        turn = answer(history, message)
        if turn is None:
            continue
        note, stream = turn
        _progress(note)
        sys.stdout.write("bot> ")
        _write_stream(stream)
        sys.stdout.write("\n")
        history += [{"role": "user", "content": message}, {"role": "assistant", "content": stream.reply.text}]


@app.command()
@friendly
def chat(
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    mode: Annotated[
        str, typer.Option("--mode", help="prompt, or xattn: retrieved facts enter by cross-attention.")
    ] = "prompt",
    index: IndexOpt = None,
    engine: EngineOpt = "auto",
    persona: PersonaOpt = None,
) -> None:
    """A terminal chat with history (Ctrl-D or an empty line to leave)."""
    if mode == "xattn":
        return _chat_xattn(model)
    if mode != "prompt":
        raise RagPersonaError(f"chat: mode {mode!r} is not one of prompt, xattn")
    from rag_persona.chat import PersonaChat, default_persona
    from rag_persona.retrieval.retriever import retriever_for

    store = open_index(index, persona)
    persona_chat = PersonaChat(
        default_persona(persona), retriever_for(store), open_chat_engine(engine, model, adapter, persona)
    )

    def answer(history: list[dict], message: str):
        try:
            plan, stream = persona_chat.stream(history, message)
        except RagPersonaError as exc:  # a refused message: say why and keep chatting
            typer.echo(f"error: {exc}", err=True)
            return None
        return "context: " + (", ".join(f"{f.id} ({f.score:.2f})" for f in plan.context) or "(none)"), stream

    _terminal_chat(answer)


def _chat_xattn(model: str | None) -> None:
    """The terminal chat in cross-attention mode (rag_persona.xattn): base model + trained blocks."""
    from rag_persona.xattn import load_xattn_chat

    xchat = load_xattn_chat(model, progress=_progress)

    def answer(history: list[dict], message: str):
        plan, stream = xchat.stream(history, message)
        return f"memory: {', '.join(f.id for f in plan.context) or '(no facts retrieved)'}", stream

    _terminal_chat(answer)


def _history_turns(history: str | None) -> list[dict]:
    """--history as a list of {role, content} messages, or one line saying what is wrong with it."""
    if not history:
        return []
    try:
        turns = json.loads(history)
    except json.JSONDecodeError as exc:
        raise RagPersonaError(f"--history: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(turns, list) or not all(isinstance(m, dict) for m in turns):
        raise RagPersonaError("--history: expected a JSON list of {role, content} objects")
    for i, m in enumerate(turns, 1):
        # system/developer items are dropped as the API drops them (render-prompt's own output fed back)
        known = m.get("role") in ("user", "assistant", "system", "developer")
        if not known or not isinstance(m.get("content"), str):
            raise RagPersonaError(
                f"--history: item {i} (role {m.get('role')!r}): role must be user or assistant "
                "(system is dropped), content a string"
            )
    return turns


@app.command("render-prompt")
@friendly
def render_prompt(
    query: Annotated[str, typer.Argument(help="The user turn.")],
    index: IndexOpt = None,
    persona: PersonaOpt = None,
    history: Annotated[
        str | None, typer.Option("--history", help="JSON list of earlier {role, content} messages.")
    ] = None,
    no_context: Annotated[
        bool, typer.Option("--no-context", help="As the cross-attention mode sees it.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """The messages the model would get for this turn, after retrieval."""
    from rag_persona.chat import default_persona, plan_turn
    from rag_persona.prompts import check_user_turn
    from rag_persona.retrieval.retriever import retriever_for

    turns = _history_turns(history)
    check_user_turn(query)  # before the index and its embedder open
    plan = plan_turn(
        default_persona(persona),
        retriever_for(open_index(index, persona)),
        turns,
        query,
        include_context=not no_context,
    )
    if as_json:
        echo_json({"messages": plan.messages, "context": [f.__dict__ for f in plan.context]})
        return
    for m in plan.messages:
        typer.echo(f"--- {m['role']}\n{m['content']}")


@app.command()
@friendly
def evaluate(
    prompts: Annotated[str, typer.Option("--prompts", help="JSONL: query, history, golden_ids, kind.")],
    model: ModelOpt = None,
    adapter: Annotated[
        str | None,
        typer.Option("--adapter", help="Adapter folder, or 'none' (default: the chat's default adapter)."),
    ] = None,
    index: IndexOpt = None,
    mode: Annotated[str, typer.Option("--mode", help="prompt (context in the prompt) or xattn.")] = "prompt",
    weights: Annotated[
        str | None,
        typer.Option("--weights", help="xattn mode: cross-attention weights (default adapters/xattn)."),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 96,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Only the first N prompts.")] = None,
    engine: EngineOpt = "auto",
    persona: PersonaOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Each prompt through retrieval + the prompt builder + generation; persona metrics over the replies."""
    from rag_persona.evaluation.evaluate import run_evaluation

    report = run_evaluation(
        prompts,
        model=model,
        adapter=adapter,
        index=index,
        mode=mode,
        weights=weights,
        max_new_tokens=max_new_tokens,
        limit=limit,
        engine=engine,
        persona=persona,
        progress=_progress,
    )
    if as_json:
        echo_json(report)
        return
    for r in report["replies"]:
        end = "EOS" if r["ended_by_eos"] else "limit"
        typer.echo(f"{r['query'][:30]:<32} {end:<5} {r['reply']}")
    for key, value in report["summary"].items():
        typer.echo(f"{key:<22} {value}")
