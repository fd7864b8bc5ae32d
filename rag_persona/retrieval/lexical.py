"""Lexical evidence: BM25 over Sudachi content words, as an IDF-weighted coverage of the query in [0, 1]."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from rag_persona.utils.text import morphemes

_CONTENT_POS = {"名詞", "動詞", "形容詞", "形状詞", "副詞", "記号"}


def content_tokens(text: str) -> list[str]:
    """Sudachi (mode A) content words in normalised form: nouns, verbs, adjectives, adverbs; no
    particles, auxiliaries, pronouns, prefixes, punctuation or light verbs (する, ある, いる)."""
    out = []
    for m in morphemes(text, "A"):
        pos = m.part_of_speech()
        if pos[0] not in _CONTENT_POS or pos[1] == "非自立可能":
            continue
        if pos[0] == "記号" and not m.surface().isalnum():
            continue
        form = m.normalized_form().lower()
        if form.strip():
            out.append(form)
    return out


class LexicalIndex:
    """BM25 over content tokens of key rows, scored as an IDF-weighted *coverage* of the query in [0, 1].

    Raw BM25 grows with query length and corpus statistics. Dividing by the query's own maximum (every
    query word present once in a key of average length) gives the share of the query's information
    that a key matches: 1.0 means every content word of the query is there, on any corpus.
    """

    def __init__(self, texts: Sequence[str], k1: float = 1.2, b: float = 0.75):
        self.k1, self.b = k1, b
        docs = [content_tokens(t) for t in texts]
        self.n = len(docs)
        self.lengths = np.array([len(d) for d in docs], dtype=np.float64)
        mean = float(self.lengths.mean()) if self.n else 0.0
        self.avgdl = mean if mean > 0 else 1.0
        postings: dict[str, dict[int, int]] = {}
        for row, doc in enumerate(docs):
            for tok in doc:
                bucket = postings.setdefault(tok, {})
                bucket[row] = bucket.get(row, 0) + 1
        self.postings = {
            t: (
                np.fromiter(p.keys(), dtype=np.int64, count=len(p)),
                np.fromiter(p.values(), dtype=np.float64),
            )
            for t, p in postings.items()
        }

    def idf(self, term: str) -> float:
        df = len(self.postings[term][0]) if term in self.postings else 0
        return math.log(1.0 + (self.n - df + 0.5) / (df + 0.5))

    def scores(self, query: str) -> np.ndarray:
        """Coverage for every key row (zeros where no query word occurs)."""
        out = np.zeros(self.n, dtype=np.float64)
        terms = list(dict.fromkeys(content_tokens(query)))
        norm = 0.0
        for t in terms:
            idf = self.idf(t)
            norm += idf
            if t not in self.postings:
                continue
            rows, tf = self.postings[t]
            denom = tf + self.k1 * (1 - self.b + self.b * self.lengths[rows] / self.avgdl)
            # 1 for a single occurrence in a key of average length; capped there
            out[rows] += idf * np.minimum(tf * (self.k1 + 1) / denom, 1.0)
        return out / norm if norm > 0 else out
