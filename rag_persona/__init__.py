"""rag-persona: retrieval-augmented character chatbots, and the small public API to use them from Python.

    import rag_persona as rp

    persona = rp.load_persona()                    # knowledge/<RAG_PERSONA_PERSONA>/persona.json
    retriever = rp.retriever_for(rp.open_store())  # its index, built on first use
    hits = retriever.search("好きな食べ物は？")     # [Hit(fact_id, text, score, ...)], best first
    facts = rp.retrieve_context(retriever, "好きな食べ物は？")
    messages = rp.build_messages(persona, facts, [], "好きな食べ物は？")
    chat = rp.PersonaChat(persona, retriever, rp.load_causal_lm())  # the bundled model, no adapter
    print(chat.respond([], "ごきげんよう").reply.text)

Names are loaded on first use, so `import rag_persona` stays cheap (no numpy, torch or FAISS).
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "RagPersonaError": "rag_persona.errors",
    "Persona": "rag_persona.prompts",
    "ContextFact": "rag_persona.prompts",
    "build_messages": "rag_persona.prompts",
    "open_store": "rag_persona.retrieval.store",
    "FactStore": "rag_persona.retrieval.store",
    "Retriever": "rag_persona.retrieval.retriever",
    "RetrievalConfig": "rag_persona.retrieval.retriever",
    "Hit": "rag_persona.retrieval.retriever",
    "retriever_for": "rag_persona.retrieval.retriever",
    "PersonaChat": "rag_persona.chat",
    "retrieve_context": "rag_persona.chat",
    "GenerationSettings": "rag_persona.generation",
    "load_causal_lm": "rag_persona.generation",
}

__all__ = [
    "ContextFact",
    "FactStore",
    "GenerationSettings",
    "Hit",
    "Persona",
    "PersonaChat",
    "RagPersonaError",
    "RetrievalConfig",
    "Retriever",
    "__version__",
    "build_messages",
    "load_causal_lm",
    "load_persona",
    "open_store",
    "retrieve_context",
    "retriever_for",
]

if TYPE_CHECKING:  # for editors and type checkers only; at run time __getattr__ imports on demand
    from rag_persona.chat import PersonaChat, retrieve_context
    from rag_persona.errors import RagPersonaError
    from rag_persona.generation import GenerationSettings, load_causal_lm
    from rag_persona.prompts import ContextFact, Persona, build_messages
    from rag_persona.retrieval.retriever import Hit, RetrievalConfig, Retriever, retriever_for
    from rag_persona.retrieval.store import FactStore, open_store


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rag_persona' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # import once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def load_persona(persona: str | os.PathLike | None = None) -> Persona:
    """A persona by name under knowledge/ (default: the configured one), or from a folder or persona.json path."""
    from rag_persona.chat import default_persona
    from rag_persona.prompts import Persona

    if isinstance(persona, os.PathLike) or (persona is not None and os.sep in persona):
        return Persona.load(persona)
    return default_persona(persona)
