"""Calibration of the reranker (its logit fused with the hybrid's) and its default threshold, on dev sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rag_persona.settings import REPO_ROOT

# Dev splits of the shipped personas: never test splits, never the reranker's own training queries. Two
# registers, so the calibrated probability is not one persona's. The fusion weights are fitted on the
# single-turn sets (one query string per candidate list, as the reranker scores it); the threshold is
# chosen on all four, multi-turn included, through the same retriever the chat uses.
FIT_SETS = [("ojousama", "dev.jsonl"), ("kansai", "dev.jsonl")]
THRESHOLD_SETS = FIT_SETS + [("ojousama", "dev_multiturn.jsonl"), ("kansai", "dev_multiturn.jsonl")]


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-9, 1 - 1e-9)
    return np.log(p / (1 - p))


def fusion_features(reranker, depth: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """([hybrid logit, reranker logit] per (query, candidate), relevance 0/1) over the FIT_SETS."""
    from rag_persona.knowledge.facts import load_queries
    from rag_persona.retrieval.retriever import RetrievalConfig, Retriever
    from rag_persona.retrieval.store import build_store

    X, y = [], []
    for persona, name in FIT_SETS:
        kb_dir = REPO_ROOT / "knowledge" / persona
        store = build_store(kb_dir)
        queries = load_queries(kb_dir / "queries" / name, store.ids)
        hybrid = Retriever(store, RetrievalConfig(mode="hybrid", threshold=0.0, k=depth))
        for q, row in zip(queries, hybrid.rankings([q.query for q in queries], depth=depth), strict=True):
            logits = reranker.logits(q.query, [store.fact(fid).text for fid, _ in row])
            for (fid, p), rl in zip(row, logits, strict=True):
                X.append([_logit(p), rl])
                y.append(1.0 if fid in q.relevant else 0.0)
    return np.asarray(X), np.asarray(y)


def choose_threshold(folder: Path, k: int = 3) -> tuple[float, dict]:
    """The threshold with the best mean F1 over THRESHOLD_SETS in rerank mode, and each set's F1 there."""
    from rag_persona.knowledge.facts import load_queries
    from rag_persona.retrieval.retriever import RetrievalConfig, Retriever
    from rag_persona.retrieval.store import build_store
    from rag_persona.retrieval.tuning import metrics_at

    sets = []
    for persona, name in THRESHOLD_SETS:
        kb_dir = REPO_ROOT / "knowledge" / persona
        store = build_store(kb_dir)
        queries = load_queries(kb_dir / "queries" / name, store.ids)
        config = RetrievalConfig(mode="rerank", threshold=0.0, k=k, reranker=str(folder))
        ranks = Retriever(store, config).rankings(
            [q.query for q in queries], depth=k, histories=[q.history for q in queries]
        )
        sets.append((f"{persona}/{name}", queries, ranks))
    best = (-1.0, 0.5, {})
    for t in np.round(np.arange(0.05, 0.96, 0.01), 2):
        per = {key: metrics_at(qs, rk, float(t), k).f1 for key, qs, rk in sets}
        mean = float(np.mean(list(per.values())))
        if mean > best[0] + 1e-9:
            best = (mean, float(t), per)
    return best[1], {key: round(v, 3) for key, v in best[2].items()}


def calibrate(folder: Path, log=print) -> dict:
    """Fit the fusion (a, c, b), then the default threshold; write both into the reranker's manifest."""
    from rag_persona.retrieval.reranker import MANIFEST, load_reranker
    from rag_persona.retrieval.tuning import fit_logistic
    from rag_persona.utils.io import read_json, write_json

    reranker = load_reranker(folder)
    X, y = fusion_features(reranker)
    b, c, a = (float(v) for v in fit_logistic(X, y, l2=1e-3))
    reranker.a, reranker.b, reranker.c = a, b, c  # the cached instance scores with the new fit at once
    manifest = read_json(folder / MANIFEST)
    manifest["calibration"] = {
        "a": round(a, 5),
        "b": round(b, 5),
        "c": round(c, 5),
        "formula": "sigmoid(a * reranker_logit + c * hybrid_logit + b)",
        "fitted_on": [f"{p}/{n}" for p, n in FIT_SETS],
    }
    write_json(folder / MANIFEST, manifest)
    threshold, per_set = choose_threshold(folder)
    manifest["default_threshold"] = threshold
    manifest["dev_f1_at_default"] = per_set
    write_json(folder / MANIFEST, manifest)
    log(f"[rerank] fusion a={a:.4f} c={c:.4f} b={b:.4f}; threshold {threshold} (dev F1 {per_set})")
    return manifest
