"""Chat in cross-attention mode: the retrieved facts enter the model as memory instead of prompt text."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rag_persona.chat import StreamingChat, TurnPlan, default_persona, plan_turn
from rag_persona.errors import RagPersonaError
from rag_persona.generation import GenerationSettings, ReplyStream, encode_messages, load_causal_lm
from rag_persona.retrieval.retriever import retriever_for
from rag_persona.retrieval.store import open_store
from rag_persona.xattn.config import DEFAULT_ADAPTER_DIR, WEIGHTS_FILE
from rag_persona.xattn.memory import FactEncodings, Memory, encodings_for, load_or_build_encodings
from rag_persona.xattn.model import PrefixCache, XattnModel, system_prefix_ids


def load_xattn(
    model: str | None = None,
    weights: str | Path | None = None,
    *,
    progress=print,
    allow_untrained: bool = False,
):
    """(LoadedModel, XattnModel): the base model with trained cross-attention attached.

    weights defaults to adapters/xattn/ (trained on the bundled 0.5B). Without weights for this base the
    call refuses unless allow_untrained (gates at 0: the memory then has no effect at all).
    """
    loaded = load_causal_lm(model, progress=progress)
    path = Path(weights) if weights else DEFAULT_ADAPTER_DIR
    if (path / WEIGHTS_FILE).is_file() or path.is_file():
        xmodel = XattnModel.load(loaded.model, path, base_name=model or "")
        loaded.adapter = str(path)
    elif weights or not allow_untrained:
        raise RagPersonaError(f"{path}: no cross-attention weights (train them: rag-persona train xattn)")
    else:
        xmodel = XattnModel(loaded.model, base_name=model or "")
    loaded.info["xattn"] = {"layers": xmodel.config.layers, "gates": xmodel.gates(), "weights": str(path)}
    return loaded, xmodel


@dataclass
class XattnChat(StreamingChat):
    """Like `rag_persona.chat.PersonaChat`, but the retrieved facts go in as cross-attention memory.

    The prompt is `build_messages(..., include_context=False)`: identical to prompt mode minus the
    context block. Fact encodings come from the cache in the index folder (computed once).
    """

    persona: object
    retriever: object | None
    loaded: object
    xmodel: XattnModel
    settings: object = None
    encodings: FactEncodings | None = None
    use_prefix_cache: bool = True
    _prefix: PrefixCache | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.settings is None:
            self.settings = GenerationSettings()

    def memory(self, facts: Sequence, start: int | None = None) -> Memory:
        encs = encodings_for(self.xmodel, self.loaded.tokenizer, facts, self.encodings)
        return self.xmodel.memory_for([encs], [[f.id for f in facts]], start=start)

    def prefix_for(self, messages: Sequence[dict]) -> PrefixCache | None:
        """The cached system turn (the same every turn in this mode); None if it does not prefix the prompt."""
        ids = system_prefix_ids(self.loaded.tokenizer, messages)
        if not ids:
            return None
        if self._prefix is None or self._prefix.ids != ids:
            with self.xmodel.using(None):
                self._prefix = PrefixCache(self.loaded.model, ids)
        return self._prefix

    def stream(self, history: Sequence[dict], user_turn: str) -> tuple[TurnPlan, XattnReplyStream]:
        plan = plan_turn(self.persona, self.retriever, history, user_turn, include_context=False)
        prefix = self.prefix_for(plan.messages)
        memory = self.memory(plan.context, start=len(prefix) if prefix is not None else None)
        stream = XattnReplyStream(
            self.loaded,
            plan.messages,
            self.settings,
            xmodel=self.xmodel,
            memory=memory,
            prefix=prefix if self.use_prefix_cache else None,
        )
        return plan, stream


class _PrefixedSettings:
    """Wraps any generation settings so `generate` also gets a fresh copy of a prefix KV cache.

    Wrapping rather than copying fields keeps a caller's own `to_generate_kwargs` (e.g. logits processors).
    """

    def __init__(self, inner, prefix: PrefixCache):
        self.inner, self.prefix = inner, prefix

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def to_generate_kwargs(self) -> dict:
        return {**self.inner.to_generate_kwargs(), "past_key_values": self.prefix.copy()}


class XattnReplyStream(ReplyStream):
    """A ReplyStream that holds its memory on the model while it generates (one generation at a time).

    With a prefix cache whose ids start the prompt, only the rest of the prompt is prefilled.
    """

    def __init__(
        self,
        loaded,
        messages,
        settings=None,
        *,
        xmodel: XattnModel,
        memory: Memory | None,
        prefix: PrefixCache | None = None,
    ):
        super().__init__(loaded, messages, settings)
        self.xmodel = xmodel
        self.memory = memory
        self.prefix = prefix
        self.prefilled_tokens: int | None = None

    def __iter__(self):
        ids = encode_messages(self.loaded.tokenizer, self.messages)
        if self.memory is not None and self.memory.start is None:
            head = system_prefix_ids(self.loaded.tokenizer, self.messages)
            self.memory = dataclasses.replace(self.memory, start=len(head))
        prefix = self.prefix if self.prefix is not None and self.prefix.matches(ids) else None
        if (
            prefix is not None
            and self.memory is not None
            and not self.memory.empty
            and self.memory.start < len(prefix)
        ):
            prefix = None  # the memory reaches into the prefix: it cannot come from the cache
        self.prefilled_tokens = int(ids.shape[1]) - (len(prefix) if prefix is not None else 0)
        if prefix is not None:
            self.settings = _PrefixedSettings(self.settings, prefix)
        with self.xmodel.using(self.memory):
            yield from super().__iter__()


def _chat_over(loaded, xmodel: XattnModel, store, retriever, persona, settings, progress) -> XattnChat:
    """The chat over a model with cross-attention attached; fact encodings from the index's cache."""
    encodings = load_or_build_encodings(
        xmodel,
        loaded.tokenizer,
        store.facts,
        getattr(store, "path", None),
        knowledge_hash=getattr(store, "knowledge_hash", None),
        progress=progress,
    )
    return XattnChat(
        persona=persona,
        retriever=retriever,
        loaded=loaded,
        xmodel=xmodel,
        settings=settings,
        encodings=encodings,
    )


def xattn_chat_for(
    loaded, store, retriever, persona, settings=None, weights=None, progress=print
) -> XattnChat:
    """Cross-attention mode over an already loaded model, index and retriever (what `evaluate` needs).

    The model may carry a peft adapter (the prompt mode's default): it is switched off while this mode runs.
    """
    path = Path(weights) if weights else DEFAULT_ADAPTER_DIR
    xmodel = XattnModel.load(loaded.model, path, base_name=getattr(loaded, "source", "") or "")
    return _chat_over(loaded, xmodel, store, retriever, persona, settings, progress)


def load_xattn_chat(
    model: str | None = None,
    weights: str | Path | None = None,
    *,
    index: str | Path | None = None,
    persona: str | None = None,
    settings=None,
    retriever=None,
    store=None,
    progress=print,
    allow_untrained: bool = False,
) -> XattnChat:
    """The persona, its index's retriever, the base model with cross-attention, and cached fact encodings."""
    if store is None:
        store = open_store(index, persona, log=progress)
    if retriever is None:
        retriever = retriever_for(store)
    loaded, xmodel = load_xattn(model, weights, progress=progress, allow_untrained=allow_untrained)
    return _chat_over(loaded, xmodel, store, retriever, default_persona(persona), settings, progress)
