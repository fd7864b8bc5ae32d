"""Cross-attention context injection: retrieved facts enter a frozen causal LM as memory (config, layers, model, memory, chat)."""

from rag_persona.xattn.chat import XattnChat, XattnReplyStream, load_xattn, load_xattn_chat, xattn_chat_for
from rag_persona.xattn.config import DEFAULT_ADAPTER_DIR, WEIGHTS_FILE, XattnConfig
from rag_persona.xattn.memory import FactEncodings, Memory, encodings_for, load_or_build_encodings
from rag_persona.xattn.model import PrefixCache, XattnModel, decoder_layers, read_weights, system_prefix_ids

__all__ = [
    "DEFAULT_ADAPTER_DIR",
    "WEIGHTS_FILE",
    "FactEncodings",
    "Memory",
    "PrefixCache",
    "XattnChat",
    "XattnConfig",
    "XattnModel",
    "XattnReplyStream",
    "decoder_layers",
    "encodings_for",
    "load_or_build_encodings",
    "load_xattn",
    "load_xattn_chat",
    "read_weights",
    "system_prefix_ids",
    "xattn_chat_for",
]
