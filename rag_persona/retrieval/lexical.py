"""Lexical evidence: BM25 (the `bm25s` library) over Sudachi content words or character bigrams, as an
IDF-weighted coverage of the query in [0, 1]."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from rag_persona.errors import RagPersonaError
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


def bigram_tokens(text: str) -> list[str]:
    """Overlapping character bigrams of the text without whitespace (a lone character stays one token)."""
    t = "".join(ch for ch in text.lower() if not ch.isspace())
    return [t[i : i + 2] for i in range(len(t) - 1)] or ([t] if t else [])


# Tokenisers by name. Measured (bench/retrieval.py): content words suit persona facts, where a question and
# its fact share few words and particles would dominate bigrams; bigrams suit long passages (JSQuAD).
TOKENIZERS: dict[str, Callable[[str], list[str]]] = {"words": content_tokens, "bigrams": bigram_tokens}
DEFAULT_TOKENS = "words"


class LexicalIndex:
    """BM25 (bm25s, Lucene variant) over tokens of key rows, scored as an IDF-weighted *coverage* of the
    query in [0, 1].

    Raw BM25 grows with query length and corpus statistics. Each query token's BM25 term score is capped
    at what one occurrence in a key of average length earns (its idf: Lucene's term weight x (1 + k1)), and
    the sum is divided by the query's total idf: the share of the query's information that a key matches,
    1.0 when every token is there, on any corpus. The cap keeps a word repeated in a long passage from
    standing in for words the passage lacks (measured on JSQuAD: lexical top-1 0.867 uncapped vs 0.903).
    """

    def __init__(self, texts: Sequence[str], k1: float = 1.2, b: float = 0.75, tokens: str = DEFAULT_TOKENS):
        import bm25s

        if tokens not in TOKENIZERS:
            raise RagPersonaError(f"lexical: tokens {tokens!r} is not one of {', '.join(TOKENIZERS)}")
        self.k1, self.b, self.tokens = k1, b, tokens
        self._tokenize = TOKENIZERS[tokens]
        docs = [self._tokenize(t) for t in texts]
        self.n = len(docs)
        # Document frequencies for the query's normaliser (bm25s folds idf into its score matrix).
        self._df = Counter(tok for doc in docs for tok in set(doc))
        self._bm25 = None
        if self._df:
            self._bm25 = bm25s.BM25(k1=k1, b=b, method="lucene")
            self._bm25.index(docs, show_progress=False)
            self._vocab = self._bm25.vocab_dict

    def idf(self, term: str) -> float:
        """Lucene's idf, also for a term no key contains (df 0): such a term counts against coverage."""
        df = self._df.get(term, 0)
        return math.log(1.0 + (self.n - df + 0.5) / (df + 0.5))

    def scores(self, query: str) -> np.ndarray:
        """Coverage for every key row (zeros where no query token occurs)."""
        terms = list(dict.fromkeys(self._tokenize(query)))
        norm = sum(self.idf(t) for t in terms)
        out = np.zeros(self.n, dtype=np.float64)
        if self._bm25 is None or norm <= 0:
            return out
        for t in terms:
            if t in self._df:
                term = self._bm25.get_scores_from_ids([self._vocab[t]]).astype(np.float64)
                out += np.minimum(term * (1.0 + self.k1), self.idf(t))
        return out / norm
