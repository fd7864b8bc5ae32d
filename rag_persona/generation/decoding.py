"""Chat messages to a streamed reply that stops at the model's EOS token, with how it ended."""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from rag_persona.errors import RagPersonaError
from rag_persona.generation.backend import STOP_EOS
from rag_persona.generation.config import GenerationSettings
from rag_persona.utils.tokens import eos_token_ids


@dataclass
class Reply:
    """A finished reply: text, whether the model ended it (EOS) rather than the token limit, and timings."""

    text: str
    ended_by_eos: bool
    new_tokens: int
    prompt_tokens: int
    seconds: float
    first_token_seconds: float | None = None
    stop_reason: str = ""  # eos, length or cancelled
    timings: dict = field(default_factory=dict)  # backend.Timings: prompt/cached tokens, prefill, TTFT, tok/s

    def to_dict(self) -> dict:
        return asdict(self)


def encode_messages(tokenizer, messages: list[dict]):
    """Apply the model's chat template and return input ids (1, n)."""
    if not messages:
        raise RagPersonaError("generation: no messages to answer")
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]


def generate_kwargs(settings, model, tokenizer) -> dict:
    """`generate` arguments for these settings, with the model's EOS ids and pad id in its GenerationConfig.

    `settings` is a GenerationSettings or anything with `to_generate_kwargs()` (a wrapper that adds a
    stopping criterion or a KV cache); its generation_config is copied, never changed.
    """
    kwargs = dict(settings.to_generate_kwargs())
    ids = {"eos_token_id": eos_token_ids(model, tokenizer), "pad_token_id": tokenizer.pad_token_id}
    if kwargs.get("generation_config") is None:  # settings that pass plain generate() keywords
        return {**kwargs, **ids}
    config = copy.deepcopy(kwargs["generation_config"])
    config.update(**ids)
    return {**kwargs, "generation_config": config}


def as_backend(loaded):
    """A ChatBackend for what the caller holds: an engine already, or a transformers `LoadedModel`."""
    if hasattr(loaded, "engine") and hasattr(loaded, "generate"):
        return loaded
    from rag_persona.generation.hf_engine import TransformersBackend

    return TransformersBackend(loaded)


class ReplyStream:
    """Iterate to receive text pieces as they are decoded; `.reply` is set once iteration ends.

    `loaded` is any ChatBackend (llama.cpp, transformers, remote) or a transformers `LoadedModel`; the
    prompt ids always come from `encode_messages` over our one prompt builder's messages.
    """

    def __init__(
        self,
        loaded,
        messages: list[dict],
        settings: GenerationSettings | None = None,
        cancel: threading.Event | None = None,
        retrieval_ms: float | None = None,
    ):
        self.loaded = loaded
        self.retrieval_ms = retrieval_ms  # reported with the engine's timings (the turn's retrieval)
        self.messages = messages
        self.settings = settings or GenerationSettings()
        self.cancel = cancel
        self.reply: Reply | None = None

    def __iter__(self) -> Iterator[str]:
        backend = as_backend(self.loaded)
        ids = encode_messages(backend.tokenizer, self.messages)[0].tolist()
        started = time.perf_counter()
        gen = backend.generate(ids, self.settings, self.cancel)
        first, pieces = None, []
        for piece in gen:
            if first is None and piece:
                first = time.perf_counter() - started
            pieces.append(piece)
            yield piece
        self.reply = Reply(
            text="".join(pieces).strip(),
            ended_by_eos=gen.stop_reason == STOP_EOS,
            new_tokens=gen.timings.completion_tokens,
            prompt_tokens=len(ids),
            seconds=time.perf_counter() - started,
            first_token_seconds=first,
            stop_reason=gen.stop_reason or "",
            timings={**gen.timings.to_dict(), "retrieval_ms": self.retrieval_ms},
        )


def generate_reply(loaded, messages: list[dict], settings: GenerationSettings | None = None) -> Reply:
    stream = ReplyStream(loaded, messages, settings)
    for _ in stream:
        pass
    assert stream.reply is not None
    return stream.reply
