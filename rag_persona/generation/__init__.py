"""Generation: decoding settings, model loading (bundled GGUF, hub or local), streamed replies."""

from rag_persona.generation.decoding import (
    GenerationSettings,
    Reply,
    ReplyNoRepeatNGram,
    ReplyStream,
    encode_messages,
    generate_reply,
)
from rag_persona.generation.llm import LoadedModel, cuda_available, from_pretrained_kwargs, load_causal_lm, resolve_model_path
from rag_persona.generation.models import (
    BUNDLED,
    READY_MARKER,
    BundledModel,
    is_prepared,
    join_and_verify,
    list_models,
    prepare,
)
from rag_persona.utils.tokens import eos_token_ids

__all__ = [
    "BUNDLED",
    "READY_MARKER",
    "BundledModel",
    "GenerationSettings",
    "LoadedModel",
    "Reply",
    "ReplyNoRepeatNGram",
    "ReplyStream",
    "cuda_available",
    "encode_messages",
    "eos_token_ids",
    "from_pretrained_kwargs",
    "generate_reply",
    "is_prepared",
    "join_and_verify",
    "list_models",
    "load_causal_lm",
    "prepare",
    "resolve_model_path",
]
