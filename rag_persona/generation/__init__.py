"""Generation: decoding settings, model loading (bundled GGUF, hub or local), streamed replies."""

from rag_persona.generation.config import GenerationSettings
from rag_persona.generation.decoding import (
    Reply,
    ReplyStream,
    encode_messages,
    generate_kwargs,
    generate_reply,
)
from rag_persona.generation.llm import (
    LoadedModel,
    compute_dtype,
    cuda_available,
    from_pretrained_kwargs,
    load_causal_lm,
    resolve_model_path,
)
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


def __getattr__(name: str):
    # The processor subclasses a transformers class: importing it loads torch and transformers, which
    # `import rag_persona.generation` (the command line, the UI) must not do until something decodes.
    if name == "ReplyNoRepeatNGram":
        from rag_persona.generation.processors import ReplyNoRepeatNGram

        return ReplyNoRepeatNGram
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BUNDLED",
    "READY_MARKER",
    "BundledModel",
    "GenerationSettings",
    "LoadedModel",
    "Reply",
    "ReplyNoRepeatNGram",
    "ReplyStream",
    "compute_dtype",
    "cuda_available",
    "encode_messages",
    "eos_token_ids",
    "from_pretrained_kwargs",
    "generate_kwargs",
    "generate_reply",
    "is_prepared",
    "join_and_verify",
    "list_models",
    "load_causal_lm",
    "prepare",
    "resolve_model_path",
]
