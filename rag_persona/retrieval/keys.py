"""Key rows: a fact's text and each of its questions as one row, their unit vectors and the FAISS index over them.

A fact's text is embedded as a passage, each question as a query (question-to-question matching is
symmetric). Rows of one fact are contiguous, its text first; ``owner[row]`` maps a row back to its fact.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from rag_persona.knowledge.facts import Fact
from rag_persona.retrieval.embedders import Embedder

KEY_TEXT, KEY_QUESTION = 0, 1


def fact_keys(facts: Iterable[Fact]) -> tuple[list[str], list[int], list[int]]:
    """(key texts, owning fact index, kind) for every key row, in row order."""
    texts: list[str] = []
    owner: list[int] = []
    kinds: list[int] = []
    for i, fact in enumerate(facts):
        texts.append(fact.text)
        owner.append(i)
        kinds.append(KEY_TEXT)
        for q in fact.questions:
            texts.append(q)
            owner.append(i)
            kinds.append(KEY_QUESTION)
    return texts, owner, kinds


def embed_keys(
    embedder: Embedder,
    texts: list[str],
    kinds: list[int],
    *,
    batch_size: int = 256,
    progress: bool = False,
    desc: str = "embedding",
) -> np.ndarray:
    """Unit vectors for key rows: texts as passages, questions as queries; a tqdm bar when asked."""
    out = np.zeros((len(texts), embedder.dim), dtype=np.float32)
    kinds_arr = np.asarray(kinds, dtype=np.int8)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(texts), desc=desc, unit="key", dynamic_ncols=True)
    try:
        for kind, encode in ((KEY_TEXT, embedder.encode_passages), (KEY_QUESTION, embedder.encode_queries)):
            rows = np.flatnonzero(kinds_arr == kind)
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                out[chunk] = encode([texts[i] for i in chunk])
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return out


def flat_index(vectors: np.ndarray):
    """An exact inner-product FAISS index holding the (unit) vectors, one per key row."""
    import faiss

    index = faiss.IndexFlatIP(int(vectors.shape[1]))
    if len(vectors):
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index
