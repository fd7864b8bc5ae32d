"""Query → facts above a threshold, at most k, each with its score: dense, lexical or hybrid.

Why not a raw cosine threshold: multilingual-e5 puts almost every pair between 0.75 and 0.9, a question
key (query-to-query) scores higher than a fact text (query-to-passage) for the same match, and some
queries sit close to everything. A threshold on raw cosine therefore moves with the model, the persona,
the query and the key kind. Scores here are *calibrated*:

1. **Background z-score.** Each query is also compared with a fixed background of unrelated text
   (`BACKGROUND_PASSAGES` for fact texts, `BACKGROUND_QUERIES` for a fact's own questions, which are
   query-like; `background.py`). A key's cosine becomes ``z = (cos - mean_bg) / std_bg``: how far above
   an unrelated sentence it stands *for this query*. The unit is the same for every model and query.
2. **Relative to the best.** ``gap = z - max z`` over the facts for this query: a fact far below the
   best match is a weaker candidate than its z alone says (the "top-3 always" failure).
3. **Lexical coverage** (hybrid): BM25 over Sudachi content words, divided by the query's own maximum,
   i.e. the IDF-weighted share of the query's words that the key contains, in [0, 1] on any corpus
   (`lexical.py`).
4. A logistic combination per key kind, ``logit = bias + w_z z + w_gap gap + w_lex lex``, whose weights
   (`CALIBRATION`, `calibration.py`) were fitted once on the ojousama dev split; the score is
   ``sigmoid(max over key kinds)``, a relevance probability in (0, 1). A fact's score is its best key's
   (text or question).

The default thresholds (`DEFAULT_THRESHOLDS`) were tuned on the ojousama dev split *with the facts'
questions hidden*, i.e. for a persona in the minimal ``{"id", "text"}`` form, because that is what a
user brings; ``tune-threshold`` refines them per index. ``lexical`` mode scores by coverage alone.
This module gathers that evidence per query and applies threshold and k.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from rag_persona.errors import RagPersonaError
from rag_persona.knowledge.facts import Fact
from rag_persona.retrieval.background import background_vectors
from rag_persona.retrieval.calibration import Candidates, default_threshold, no_candidates, score_candidates
from rag_persona.retrieval.keys import KEY_QUESTION
from rag_persona.retrieval.lexical import LexicalIndex
from rag_persona.retrieval.store import FactStore

MODES = ("dense", "lexical", "hybrid", "rerank")
# hybrid stays the default: the shipped (CPU-trained) reranker raises F1 and off-topic rejection on most
# sets but lowers thresholded top-1 on some (bench/results/retrieval.md); `--mode rerank` opts in.
DEFAULT_MODE = "hybrid"
DEFAULT_K = 3
# Exact scoring against every key up to this many rows; FAISS top candidates above it.
EXACT_LIMIT = 20_000
# Lorebook keys (a fact's "keywords", SillyTavern World Info style): a fact whose key occurs in the query
# scores at least this, i.e. passes any tuned threshold (they lie in 0.2-0.6) and ranks with strong dense
# matches; a fact marked "constant" is in every context, outside k, as a constant World Info entry is.
KEYWORD_SCORE = 0.9
CONSTANT_SCORE = 1.0
# Conversation-aware retrieval (a follow-up such as 「いつから？」 names no topic): the turn is also searched
# with a context query built from the previous exchange, and a fact's score becomes the weighted geometric
# mean of its own and its context score when that is higher (max(s, s^(1-w)·s_ctx^w)), so the context
# raises only facts the turn itself gives some support: "last" searches the last user turn alone; "carry"
# uses the previous user turn as context; "concat" the previous user turn followed by this one;
# "concat_reply" also the persona's reply between them. Measured on the dev multi-turn sets at the default
# threshold: concat with w 0.5 kept F1 (ojousama 0.49 → 0.49, kansai 0.46 → 0.48) and raised follow-up
# top-1 (0.636 → 0.649, 0.643 → 0.714); an additive lift or a max() with the context score found more
# follow-ups but carried the previous topic into off-topic turns (rejection 0.37 → 0.13) and lowered F1.
CONVERSATION_MODES = ("last", "carry", "concat", "concat_reply")
DEFAULT_CONVERSATION = "concat"
DEFAULT_CONTEXT_WEIGHT = 0.5


def context_query(
    history: Sequence[dict], user_turn: str, conversation: str = DEFAULT_CONVERSATION
) -> str | None:
    """The context query for a turn from the conversation before it, or None (no history, or "last")."""
    if conversation == "last":
        return None
    turns = [
        m for m in history if m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
    ]
    users = [i for i, m in enumerate(turns) if m["role"] == "user"]
    if not users:
        return None
    prev_user = turns[users[-1]]["content"].strip()
    if conversation == "carry":
        return prev_user or None
    reply = ""
    if conversation == "concat_reply":
        reply = " ".join(m["content"].strip() for m in turns[users[-1] + 1 :] if m["role"] == "assistant")
    return " ".join(t for t in (prev_user, reply, user_turn.strip()) if t) or None


# -- configuration and results --------------------------------------------------------------------
@dataclass
class RetrievalConfig:
    """mode: dense | lexical | hybrid | rerank (hybrid candidates, the top rerank_depth re-scored by the
    cross-encoder in `reranker`, default the shipped one); threshold: None = the index's tuned value, else
    the default."""

    mode: str = DEFAULT_MODE
    threshold: float | None = None
    k: int = DEFAULT_K
    use_questions: bool = True
    candidates: int = 256
    rerank_depth: int = 20
    reranker: str | None = None
    conversation: str = DEFAULT_CONVERSATION
    context_weight: float = DEFAULT_CONTEXT_WEIGHT

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise RagPersonaError(f"retrieval: field 'mode': {self.mode!r} is not one of {', '.join(MODES)}")
        if int(self.rerank_depth) < 1:
            raise RagPersonaError(
                f"retrieval: field 'rerank_depth': must be at least 1, got {self.rerank_depth}"
            )
        if int(self.k) < 1:
            raise RagPersonaError(f"retrieval: field 'k': must be at least 1, got {self.k}")
        if self.conversation not in CONVERSATION_MODES:
            raise RagPersonaError(
                f"retrieval: field 'conversation': {self.conversation!r} is not one of {', '.join(CONVERSATION_MODES)}"
            )
        if self.threshold is not None and not 0.0 <= float(self.threshold) <= 1.0:  # NaN fails too
            raise RagPersonaError(
                f"retrieval: field 'threshold': {self.threshold} is not a score between 0 and 1 "
                "(every mode's scores are calibrated into [0, 1])"
            )


@dataclass
class Hit:
    """A retrieved fact with its calibrated score (and the raw evidence behind it)."""

    fact_id: str
    text: str
    score: float
    cosine: float | None = None
    lexical: float | None = None
    fact: Fact | None = field(default=None, repr=False, compare=False)

    @property
    def id(self) -> str:
        return self.fact_id

    def to_dict(self) -> dict:
        return {"id": self.fact_id, "text": self.text, "score": round(float(self.score), 4)}


class Retriever:
    """Thresholded, capped retrieval over a `FactStore`; `search` returns hits sorted by score."""

    def __init__(self, store: FactStore, config: RetrievalConfig | None = None):
        self.store = store
        self.config = config or RetrievalConfig()
        if self.config.threshold is not None:
            self.threshold_source = "explicit"
        elif store.tuned_threshold(self.config.mode) is not None:
            self.config.threshold = float(store.tuned_threshold(self.config.mode))
            self.threshold_source = "tuned"
        else:
            self.config.threshold = default_threshold(self.config.mode, self.config.reranker)
            self.threshold_source = "default"
        self._lexical: LexicalIndex | None = None
        self._lock = threading.Lock()
        counts = np.bincount(store.key_fact, minlength=len(store.facts)) if len(store.facts) else np.zeros(0)
        self._fact_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._keywords = [
            (i, [k.lower() for k in f.extra.get("keywords", []) if isinstance(k, str) and k.strip()])
            for i, f in enumerate(store.facts)
        ]
        self._keywords = [(i, keys) for i, keys in self._keywords if keys]
        self._constant = [i for i, f in enumerate(store.facts) if f.extra.get("constant") is True]

    # -- convenience accessors -------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def threshold(self) -> float:
        return float(self.config.threshold)

    @property
    def k(self) -> int:
        return int(self.config.k)

    @property
    def lexical_index(self) -> LexicalIndex:
        with self._lock:
            if self._lexical is None:
                texts = [t for f in self.store.facts for t in f.keys()]
                self._lexical = LexicalIndex(texts)
            return self._lexical

    # -- search ----------------------------------------------------------------------------------
    def search(self, query: str, *, threshold: float | None = None, k: int | None = None) -> list[Hit]:
        """Facts scoring at least the threshold, best first, at most k."""
        return self.search_many([query], threshold=threshold, k=k)[0]

    def search_turn(
        self,
        user_turn: str,
        history: Sequence[dict] = (),
        *,
        threshold: float | None = None,
        k: int | None = None,
    ) -> list[Hit]:
        """Facts for a chat turn: the user turn read in the light of the conversation before it."""
        return self.search_many([user_turn], threshold=threshold, k=k, histories=[history])[0]

    def search_many(
        self,
        queries: Sequence[str],
        *,
        threshold: float | None = None,
        k: int | None = None,
        histories: Sequence[Sequence[dict]] | None = None,
    ) -> list[list[Hit]]:
        t = self.threshold if threshold is None else float(threshold)
        k = self.k if k is None else int(k)
        out = []
        for scored in self._turn_scores(queries, histories):
            hits = []
            for fact_index, score, cos, lexical in scored[:k]:
                if score < t:
                    break
                fact = self.store.facts[fact_index]
                hits.append(Hit(fact.id, fact.text, score, cosine=cos, lexical=lexical, fact=fact))
            shown = {h.fact_id for h in hits}
            for i in self._constant:
                fact = self.store.facts[i]
                if fact.id not in shown:
                    hits.append(Hit(fact.id, fact.text, CONSTANT_SCORE, fact=fact))
            out.append(hits)
        return out

    def _scored(self, query: str, cands: Candidates) -> list[tuple[int, float, float | None, float]]:
        """(fact index, score, cosine, lexical) per candidate, best first: the calibrated score, raised to
        KEYWORD_SCORE for a fact whose lorebook key occurs in the query (added when not a candidate)."""
        scores = self.score(cands)
        if self.mode == "rerank":
            scores = self._rerank(query, cands, scores)
        rows = {
            int(cands.facts[i]): (
                float(scores[i]),
                None if np.isnan(cands.cos[i]) else float(cands.cos[i]),
                float(max(cands.lex_text[i], cands.lex_question[i])),
            )
            for i in range(len(cands.facts))
        }
        if self._keywords:
            text = query.lower()
            for i, keys in self._keywords:
                if any(key in text for key in keys):
                    score, cos, lexical = rows.get(i, (0.0, None, 0.0))
                    rows[i] = (max(score, KEYWORD_SCORE), cos, lexical)
        ranked = sorted(rows.items(), key=lambda kv: -kv[1][0])  # stable: ties keep candidate order
        return [(i, score, cos, lexical) for i, (score, cos, lexical) in ranked]

    def _rerank(self, query: str, cands: Candidates, hybrid: np.ndarray) -> np.ndarray:
        """The cross-encoder's probability, fused with the hybrid's logit, for the hybrid's top rerank_depth
        candidates (0 for the rest): the cheap scores choose what the expensive one reads."""
        from rag_persona.retrieval.reranker import load_reranker

        out = np.zeros(len(hybrid))
        top = np.argsort(-hybrid, kind="stable")[: int(self.config.rerank_depth)]
        if len(top):
            texts = [self.store.facts[int(cands.facts[i])].text for i in top]
            p = np.clip(hybrid[top], 1e-9, 1 - 1e-9)
            prior = np.log(p / (1 - p))
            out[top] = load_reranker(self.config.reranker).probability(query, texts, prior)
        return out

    def _turn_scores(
        self, queries: Sequence[str], histories: Sequence[Sequence[dict]] | None = None
    ) -> list[list[tuple[int, float, float | None, float]]]:
        """`_scored` per query; with histories, raised toward the context query's scores (see
        CONVERSATION_MODES; all queries of the batch, context ones included, embedded in one call)."""
        queries = list(queries)
        histories = list(histories) if histories is not None else [()] * len(queries)
        if len(histories) != len(queries):
            raise RagPersonaError("search: one history per query expected")
        contexts = [
            context_query(h, q, self.config.conversation) for q, h in zip(queries, histories, strict=True)
        ]
        extra = [c for c in contexts if c]
        batch = queries + extra
        scored = [self._scored(q, c) for q, c in zip(batch, self.candidates(batch), strict=True)]
        out, j = [], len(queries)
        for i, ctx in enumerate(contexts):
            if not ctx:
                out.append(scored[i])
                continue
            merged = {f: (s, cos, lex) for f, s, cos, lex in scored[i]}
            w = self.config.context_weight
            for f, s_ctx, _, _ in scored[j]:
                if f in merged and s_ctx > 0:
                    s, cos, lex = merged[f]
                    merged[f] = (max(s, max(s, 0.0) ** (1 - w) * s_ctx**w), cos, lex)
            j += 1
            ranked = sorted(merged.items(), key=lambda kv: -kv[1][0])
            out.append([(f, s, cos, lex) for f, (s, cos, lex) in ranked])
        return out

    def rank(
        self,
        queries: Sequence[str],
        depth: int | None = None,
        histories: Sequence[Sequence[dict]] | None = None,
    ) -> list[list[tuple[int, float]]]:
        """Per query, (fact index, calibrated score) for candidate facts, best first, no threshold."""
        rankings = []
        for scored in self._turn_scores(queries, histories):
            if depth is not None:
                scored = scored[:depth]
            rankings.append([(i, score) for i, score, _, _ in scored])
        return rankings

    def rankings(
        self, queries: Sequence[str], depth: int = 20, histories: Sequence[Sequence[dict]] | None = None
    ) -> list[list[tuple[str, float]]]:
        """Per query, (fact id, score) best first: the input of threshold sweeps."""
        ids = self.store.ids
        return [[(ids[f], s) for f, s in r] for r in self.rank(queries, depth, histories)]

    def score(self, cands: Candidates) -> np.ndarray:
        """Calibrated scores for one query's candidates."""
        if self.mode == "lexical":
            return np.maximum(cands.lex_text, cands.lex_question)
        return score_candidates(cands, "hybrid" if self.mode == "rerank" else self.mode)

    # -- evidence --------------------------------------------------------------------------------
    def candidates(self, queries: Sequence[str]) -> list[Candidates]:
        """Candidate facts and their raw evidence for each query."""
        queries = list(queries)
        for q in queries:
            if not isinstance(q, str) or not q.strip():
                raise RagPersonaError("search: field 'query': empty")
        if len(self.store.facts) == 0:
            return [no_candidates() for _ in queries]
        if self.mode == "lexical":
            return [self._lexical_candidates(q) for q in queries]
        return self._dense_candidates(queries)

    def _key_rows(self, facts: np.ndarray) -> np.ndarray:
        """All key rows of the given facts (keys of one fact are contiguous)."""
        if len(facts) == len(self.store.facts):
            return np.arange(self.store.n_keys, dtype=np.int64)
        starts, ends = self._fact_start[facts], self._fact_start[facts + 1]
        lens = ends - starts
        offsets = np.concatenate([[0], np.cumsum(lens)[:-1]])
        return (np.repeat(starts - offsets, lens) + np.arange(int(lens.sum()))).astype(np.int64)

    def _lexical_candidates(self, query: str) -> Candidates:
        store = self.store
        lex = self.lexical_index.scores(query)
        rows = np.flatnonzero(lex > 0)
        if len(rows) > 4 * self.config.candidates:
            rows = rows[np.argsort(-lex[rows])[: 4 * self.config.candidates]]
        facts = np.unique(store.key_fact[rows]) if len(rows) else np.zeros(0, dtype=np.int64)
        lt, lq = self._per_fact(facts, lex, lex)
        n = len(facts)
        nan = np.full(n, np.nan)
        return Candidates(facts, nan, nan, np.full(n, -np.inf), lt, lq)

    def _per_fact(self, facts: np.ndarray, text_vals: np.ndarray, q_vals: np.ndarray, fill: float = 0.0):
        """(value of the text key, best value over question keys) per fact from per-row arrays."""
        store = self.store
        text = text_vals[self._fact_start[facts]] if len(facts) else np.zeros(0)
        best_q = np.full(len(facts), fill, dtype=np.float64)
        if len(facts) and self.config.use_questions:
            rows = self._key_rows(facts)
            qmask = store.key_kind[rows] == KEY_QUESTION
            if qmask.any():
                pos = np.searchsorted(facts, store.key_fact[rows[qmask]])
                np.maximum.at(best_q, pos, q_vals[rows[qmask]])
        return np.asarray(text, dtype=np.float64), best_q

    def _dense_candidates(self, queries: list[str]) -> list[Candidates]:
        store = self.store
        emb = store.embedder
        qv = emb.encode_queries(queries)
        bp, bq = background_vectors(emb)
        sp, sq = qv @ bp.T, qv @ bq.T
        mu_p, sd_p = sp.mean(1), np.maximum(sp.std(1), 1e-6)
        mu_q, sd_q = sq.mean(1), np.maximum(sq.std(1), 1e-6)
        vectors = store.vectors
        exact = store.n_keys <= EXACT_LIMIT
        if exact:
            all_cos = qv @ vectors.T if store.n_keys else np.zeros((len(queries), 0), dtype=np.float32)
        else:
            _, found = store.index.search(np.ascontiguousarray(qv), min(self.config.candidates, store.n_keys))
        hybrid = self.mode in ("hybrid", "rerank")
        out = []
        for i, query in enumerate(queries):
            lex = self.lexical_index.scores(query) if hybrid else None
            if exact:
                facts = np.arange(len(store.facts), dtype=np.int64)
                cos_rows = all_cos[i].astype(np.float64)
            else:
                rows = found[i][found[i] >= 0]
                if hybrid:
                    hits = np.flatnonzero(lex > 0)
                    if len(hits):
                        rows = np.concatenate([rows, hits[np.argsort(-lex[hits])[: self.config.candidates]]])
                facts = np.unique(store.key_fact[rows])
                key_rows = self._key_rows(facts)
                cos_rows = np.full(store.n_keys, np.nan)
                cos_rows[key_rows] = vectors[key_rows] @ qv[i]
            z_p = (cos_rows - mu_p[i]) / sd_p[i]
            z_q = (cos_rows - mu_q[i]) / sd_q[i]
            zt, zq = self._per_fact(facts, z_p, z_q, fill=-np.inf)
            ct, cq = self._per_fact(facts, cos_rows, cos_rows, fill=-np.inf)
            if hybrid:
                lt, lq = self._per_fact(facts, lex, lex)
            else:
                lt, lq = np.zeros(len(facts)), np.zeros(len(facts))
            out.append(Candidates(facts, np.maximum(ct, cq), zt, zq, lt, lq))
        return out


def retriever_for(
    store: FactStore,
    mode: str | None = None,
    threshold: float | None = None,
    k: int | None = None,
    conversation: str | None = None,
) -> Retriever:
    """A retriever with the index's defaults (stored mode and k, tuned threshold) unless overridden."""
    stored = store.manifest.get("retrieval") or {}
    config = RetrievalConfig(
        mode=mode or stored.get("mode") or DEFAULT_MODE,
        threshold=threshold,
        k=int(k if k is not None else stored.get("k") or DEFAULT_K),  # k=0 is refused, not the default
        conversation=conversation or DEFAULT_CONVERSATION,
    )
    return Retriever(store, config)


def langchain_retriever(retriever: Retriever):
    """A `langchain_core` BaseRetriever over ours: Documents with metadata id and score."""
    # imported here: langchain-core takes over a second to import and only this adapter needs it
    from rag_persona.retrieval.langchain_adapter import PersonaLangChainRetriever

    return PersonaLangChainRetriever(retriever=retriever)
