"""One persona turn end to end: retrieve context, build the messages, generate a reply."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from rag_persona.generation import GenerationSettings, Reply, ReplyStream
from rag_persona.prompts import ContextFact, Persona, build_messages


class SearchesFacts(Protocol):
    def search(self, query: str) -> list: ...


@dataclass
class TurnPlan:
    """What the model is given for one turn: the messages, and the facts retrieved for it."""

    messages: list[dict]
    context: list[ContextFact]
    retrieval_ms: float | None = None


def _as_context(hits) -> list[ContextFact]:
    return [ContextFact(id=h.fact_id, text=h.text, score=float(h.score)) for h in hits]


def retrieve_context(
    retriever: SearchesFacts | None, user_turn: str, history: Sequence[dict] = ()
) -> list[ContextFact]:
    """Retrieval exactly as every caller (chat, API, evaluation, data building) runs it: the user turn read
    with the conversation before it (`Retriever.search_turn`) when the retriever can."""
    if retriever is None:
        return []
    if hasattr(retriever, "search_turn"):
        return _as_context(retriever.search_turn(user_turn.strip(), history))
    return _as_context(retriever.search(user_turn.strip()))


def retrieve_contexts(
    retriever: SearchesFacts | None,
    user_turns: Sequence[str],
    histories: Sequence[Sequence[dict]] | None = None,
) -> list[list[ContextFact]]:
    """The same retrieval for many turns at once (one batched embedding call when the retriever has it)."""
    if retriever is None:
        return [[] for _ in user_turns]
    turns = [t.strip() for t in user_turns]
    histories = list(histories) if histories is not None else [()] * len(turns)
    if hasattr(retriever, "search_many"):
        return [_as_context(hits) for hits in retriever.search_many(turns, histories=histories)]
    return [retrieve_context(retriever, t, h) for t, h in zip(turns, histories, strict=True)]


def plan_turn(
    persona: Persona,
    retriever: SearchesFacts | None,
    history: Sequence[dict],
    user_turn: str,
    *,
    include_context: bool = True,
) -> TurnPlan:
    started = time.perf_counter()
    context = retrieve_context(retriever, user_turn, history)
    retrieval_ms = round((time.perf_counter() - started) * 1000, 2)
    messages = build_messages(persona, context, history, user_turn, include_context=include_context)
    return TurnPlan(messages=messages, context=context, retrieval_ms=retrieval_ms)


@dataclass
class TurnResult:
    plan: TurnPlan
    reply: Reply


class StreamingChat:
    """A chat mode: `stream` plans one turn and returns its reply stream; answering whole or in pieces follows."""

    def stream(self, history: Sequence[dict], user_turn: str) -> tuple[TurnPlan, ReplyStream]:
        raise NotImplementedError

    def respond(self, history: Sequence[dict], user_turn: str) -> TurnResult:
        plan, stream = self.stream(history, user_turn)
        for _ in stream:
            pass
        return TurnResult(plan=plan, reply=stream.reply)

    def iter_text(self, history: Sequence[dict], user_turn: str) -> Iterator[str]:
        _, stream = self.stream(history, user_turn)
        yield from stream


@dataclass
class PersonaChat(StreamingChat):
    """A persona, a retriever and a chat model (any ChatBackend or a LoadedModel); `stream` answers one turn."""

    persona: Persona
    retriever: SearchesFacts | None
    loaded: object
    settings: GenerationSettings = field(default_factory=GenerationSettings)

    def stream(self, history: Sequence[dict], user_turn: str) -> tuple[TurnPlan, ReplyStream]:
        plan = plan_turn(self.persona, self.retriever, history, user_turn)
        return plan, ReplyStream(self.loaded, plan.messages, self.settings, retrieval_ms=plan.retrieval_ms)


def default_persona(persona: str | None = None) -> Persona:
    from rag_persona.settings import get_settings

    return Persona.load(Path(get_settings().persona_dir(persona)))
