"""Cross-attention context injection: retrieved facts enter a frozen causal LM as memory (config, layers, model, memory, chat)."""

from rag_persona.xattn.memory import encodings_for, load_or_build_encodings
from rag_persona.xattn.model import (
    DEFAULT_ADAPTER_DIR,
    WEIGHTS_FILE,
    PrefixCache,
    XattnConfig,
    XattnModel,
    XattnReplyStream,
    decoder_layers,
    load_xattn_chat,
    read_weights,
    system_prefix_ids,
    xattn_chat_for,
)

__all__ = [
    "DEFAULT_ADAPTER_DIR",
    "WEIGHTS_FILE",
    "PrefixCache",
    "XattnConfig",
    "XattnModel",
    "XattnReplyStream",
    "decoder_layers",
    "encodings_for",
    "load_or_build_encodings",
    "load_xattn_chat",
    "read_weights",
    "system_prefix_ids",
    "xattn_chat_for",
]
