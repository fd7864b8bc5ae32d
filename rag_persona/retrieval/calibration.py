"""Calibrated relevance: a query's evidence per candidate fact → a probability-like score, and its thresholds.

Per key kind (a fact's text, its own questions) ``logit = bias + w_z z + w_gap gap + w_lex lex`` where z is
the background z-score (`background.py`), ``gap = z - max z`` over this query's candidates (a fact far below
the best match is a weaker candidate than its z alone says) and lex the lexical coverage (`lexical.py`,
hybrid mode only). A fact's score is ``sigmoid(max over its key kinds)``, in (0, 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Calibration:
    """logit = bias + w_z * z + w_gap * (z - best z for the query) + w_lex * lexical coverage."""

    bias: float
    w_z: float
    w_gap: float
    w_lex: float = 0.0

    def logit(self, z: np.ndarray, gap: np.ndarray, lex: np.ndarray) -> np.ndarray:
        return self.bias + self.w_z * z + self.w_gap * gap + self.w_lex * lex


# Fitted by `rag_persona.retrieval.tuning.fit_calibration` (L2 = 1) on the ojousama index and
# knowledge/ojousama/queries/dev.jsonl; bench/retrieval.py --calibrate refits and prints them.
CALIBRATION: dict[tuple[str, str], Calibration] = {
    ("dense", "text"): Calibration(bias=-6.036, w_z=1.484, w_gap=1.338),
    ("dense", "question"): Calibration(bias=-5.531, w_z=1.05, w_gap=1.717),
    ("hybrid", "text"): Calibration(bias=-5.763, w_z=1.338, w_gap=1.368, w_lex=1.868),
    ("hybrid", "question"): Calibration(bias=-5.288, w_z=0.919, w_gap=1.709, w_lex=1.74),
}
# F1-optimal on the ojousama dev split with every fact's questions removed (a minimal-form persona),
# k = DEFAULT_K; the middle of the near-best plateau. tune-threshold refines them per index.
# rerank: only a fallback; a reranker's manifest carries the threshold chosen with its own calibration
# (the fusion of its logit with the hybrid's, fitted on the ojousama and kansai dev sets: 0.33 shipped).
DEFAULT_THRESHOLDS: dict[str, float] = {"dense": 0.24, "hybrid": 0.19, "lexical": 0.28, "rerank": 0.5}


def default_threshold(mode: str, reranker: str | None = None) -> float:
    """The default for a mode; rerank reads the one chosen with the reranker's own calibration."""
    if mode == "rerank":
        from rag_persona.retrieval.reranker import reranker_threshold

        return reranker_threshold(reranker, DEFAULT_THRESHOLDS["rerank"])
    return DEFAULT_THRESHOLDS[mode]


@dataclass
class Candidates:
    """Per query: candidate facts and their evidence, the input to the calibrated score."""

    facts: np.ndarray  # fact indices
    cos: np.ndarray  # best cosine over the fact's keys (nan in lexical mode)
    z_text: np.ndarray  # background z of the text key
    z_question: np.ndarray  # best background z over question keys (-inf: none)
    lex_text: np.ndarray  # lexical coverage of the text key
    lex_question: np.ndarray  # best coverage over question keys (0: none)


def no_candidates() -> Candidates:
    e = np.zeros(0)
    return Candidates(np.zeros(0, dtype=np.int64), e, e, e, e, e)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


def score_candidates(cands: Candidates, mode: str, calibration: dict | None = None) -> np.ndarray:
    """sigmoid(max(text logit, question logit)) for one query's candidates."""
    cal = calibration or CALIBRATION
    if len(cands.facts) == 0:
        return np.zeros(0)
    zt, zq = cands.z_text, cands.z_question
    gap_t = zt - zt.max()
    has_q = np.isfinite(zq)
    logit = cal[(mode, "text")].logit(zt, gap_t, cands.lex_text)
    if has_q.any():
        gap_q = np.where(has_q, zq - zq[has_q].max(), 0.0)
        lq = cal[(mode, "question")].logit(np.where(has_q, zq, 0.0), gap_q, cands.lex_question)
        logit = np.where(has_q, np.maximum(logit, lq), logit)
    return sigmoid(logit)
