"""Query → facts above a threshold, at most k, each with its score: dense, lexical or hybrid.

PLACEHOLDER docstring: scoring described below once calibrated.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import RagPersonaError
from .knowledge import Fact
from .store import FactStore, fact_keys

MODES = ("dense", "lexical", "hybrid")


# -- Japanese tokens for BM25 ---------------------------------------------------------------------
_CONTENT_POS = {"名詞", "動詞", "形容詞", "形状詞", "副詞", "接頭辞", "接尾辞", "記号"}
_TOKENIZER_LOCK = threading.Lock()
_TOKENIZER = None


def _sudachi():
    global _TOKENIZER
    with _TOKENIZER_LOCK:
        if _TOKENIZER is None:
            from sudachipy import dictionary

            _TOKENIZER = dictionary.Dictionary(dict="core").create()
        return _TOKENIZER


def content_tokens(text: str) -> list[str]:
    """Sudachi (mode A) content words in normalised form: nouns, verbs, adjectives...; no particles,
    auxiliaries, pronouns, punctuation or light verbs (する, ある, いる)."""
    from sudachipy import tokenizer as sudachi_tokenizer

    mode = sudachi_tokenizer.Tokenizer.SplitMode.A
    out = []
    with _TOKENIZER_LOCK:
        morphemes = list(_sudachi().tokenize(text, mode)) if _TOKENIZER else None
    if morphemes is None:
        tok = _sudachi()
        with _TOKENIZER_LOCK:
            morphemes = list(tok.tokenize(text, mode))
    for m in morphemes:
        pos = m.part_of_speech()
        if pos[0] not in _CONTENT_POS or pos[1] == "非自立可能":
            continue
        if pos[0] in ("記号",) and not m.surface().isalnum():
            continue
        form = m.normalized_form().lower()
        if form.strip():
            out.append(form)
    return out


class LexicalIndex:
    """BM25 over content tokens of key rows, scored as an IDF-weighted *coverage* of the query in [0, 1].

    Raw BM25 grows with query length and corpus statistics; dividing by the query's largest possible
    score (every query term present, tf saturated) gives the share of the query's information that a
    key matches, a scale that means the same thing on any corpus.
    """

    def __init__(self, texts: Sequence[str], k1: float = 1.2, b: float = 0.75):
        self.k1, self.b = k1, b
        docs = [content_tokens(t) for t in texts]
        self.n = len(docs)
        self.lengths = np.array([len(d) for d in docs], dtype=np.float64)
        self.avgdl = float(self.lengths.mean()) if self.n and self.lengths.mean() > 0 else 1.0
        postings: dict[str, dict[int, int]] = {}
        for row, doc in enumerate(docs):
            for tok in doc:
                postings.setdefault(tok, {})
                postings[tok][row] = postings[tok].get(row, 0) + 1
        self.postings = {
            t: (np.fromiter(p.keys(), dtype=np.int64), np.fromiter(p.values(), dtype=np.float64))
            for t, p in postings.items()
        }

    def idf(self, term: str) -> float:
        df = len(self.postings[term][0]) if term in self.postings else 0
        return math.log(1.0 + (self.n - df + 0.5) / (df + 0.5))

    def scores(self, query: str) -> np.ndarray:
        """Coverage score for every key row (zeros where nothing matches)."""
        out = np.zeros(self.n, dtype=np.float64)
        terms = list(dict.fromkeys(content_tokens(query)))
        if not terms:
            return out
        norm = 0.0
        for t in terms:
            idf = self.idf(t)
            norm += idf
            if t not in self.postings:
                continue
            rows, tf = self.postings[t]
            denom = tf + self.k1 * (1 - self.b + self.b * self.lengths[rows] / self.avgdl)
            w = np.minimum(tf * (self.k1 + 1) / denom / (self.k1 + 1), 1.0)
            out[rows] += idf * w
        return out / norm if norm > 0 else out


@dataclass
class RetrievalConfig:
    mode: str = "hybrid"
    threshold: float | None = None
    k: int = 5
    use_questions: bool = True
    candidates: int = 256

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise RagPersonaError(f"retrieval: mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.k < 1:
            raise RagPersonaError(f"retrieval: k must be at least 1, got {self.k}")


@dataclass
class Hit:
    fact_id: str
    text: str
    score: float
    fact: Fact | None = field(default=None, repr=False, compare=False)

    @property
    def id(self) -> str:
        return self.fact_id

    def to_dict(self) -> dict:
        return {"id": self.fact_id, "text": self.text, "score": round(float(self.score), 4)}


def _unused() -> None:  # pragma: no cover - placeholder while the scoring is calibrated
    _ = (asdict, fact_keys, FactStore)
