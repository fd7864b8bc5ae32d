"""Retrieval: embedders, the fact store and index, dense/lexical/hybrid ranking, thresholds and tuning."""

from rag_persona.retrieval.calibration import CALIBRATION, DEFAULT_THRESHOLDS, Calibration
from rag_persona.retrieval.embedders import DEFAULT_EMBEDDER, Embedder, load_embedder
from rag_persona.retrieval.lexical import LexicalIndex, content_tokens
from rag_persona.retrieval.retriever import (
    DEFAULT_K,
    DEFAULT_MODE,
    MODES,
    Hit,
    RetrievalConfig,
    Retriever,
    langchain_retriever,
    retriever_for,
)
from rag_persona.retrieval.store import (
    FactStore,
    StaleIndexError,
    build_index,
    build_store,
    default_index_dir,
    default_store,
    ensure_index,
    is_index,
    load_index,
    open_store,
)
from rag_persona.retrieval.tuning import (
    Metrics,
    Sweep,
    check_labels,
    evaluate_retriever,
    sweep,
    tune_threshold,
)

__all__ = [
    "CALIBRATION",
    "DEFAULT_EMBEDDER",
    "DEFAULT_K",
    "DEFAULT_MODE",
    "DEFAULT_THRESHOLDS",
    "MODES",
    "Calibration",
    "Embedder",
    "FactStore",
    "Hit",
    "LexicalIndex",
    "Metrics",
    "RetrievalConfig",
    "Retriever",
    "StaleIndexError",
    "Sweep",
    "build_index",
    "build_store",
    "check_labels",
    "content_tokens",
    "default_index_dir",
    "default_store",
    "ensure_index",
    "evaluate_retriever",
    "is_index",
    "langchain_retriever",
    "load_embedder",
    "load_index",
    "open_store",
    "retriever_for",
    "sweep",
    "tune_threshold",
]
