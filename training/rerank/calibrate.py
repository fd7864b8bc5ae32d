"""Platt calibration of the reranker's logit and its default threshold, fitted on personas' dev sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rag_persona.settings import REPO_ROOT

# Dev splits of the shipped personas (single-turn and multi-turn): never test splits, never the reranker's
# own training queries. Two registers, so the calibrated probability is not one persona's.
DEV_SETS = [
    ("ojousama", "dev.jsonl"),
    ("ojousama", "dev_multiturn.jsonl"),
    ("kansai", "dev.jsonl"),
    ("kansai", "dev_multiturn.jsonl"),
]


def dev_rankings(folder: Path, depth: int = 20):
    """(labelled queries, per-query (fact id, raw logit) lists) on each dev set, from rerank-mode retrieval
    with identity calibration (a=1, b=0 leaves the logit recoverable from the probability)."""
    from rag_persona.knowledge.facts import load_queries
    from rag_persona.retrieval.reranker import load_reranker
    from rag_persona.retrieval.retriever import RetrievalConfig, Retriever
    from rag_persona.retrieval.store import build_store

    reranker = load_reranker(folder)
    saved = reranker.a, reranker.b
    reranker.a, reranker.b = 1.0, 0.0
    out = []
    try:
        for persona, name in DEV_SETS:
            kb_dir = REPO_ROOT / "knowledge" / persona
            store = build_store(kb_dir)
            queries = load_queries(kb_dir / "queries" / name, store.ids)
            r = Retriever(store, RetrievalConfig(mode="rerank", threshold=0.0, k=depth, rerank_depth=depth))
            ranks = r.rankings(
                [q.query for q in queries], depth=depth, histories=[q.history for q in queries]
            )
            out.append((persona, name, queries, ranks))
    finally:
        reranker.a, reranker.b = saved
    return out


def fit_platt(sets) -> tuple[float, float]:
    """(a, b) so that sigmoid(a * logit + b) matches relevance on the dev candidates."""
    from rag_persona.retrieval.tuning import fit_logistic

    xs, ys = [], []
    for _, _, queries, ranks in sets:
        for q, row in zip(queries, ranks, strict=True):
            for fid, p in row:
                if p <= 0.0:
                    continue  # not reranked (beyond depth)
                p = min(max(p, 1e-12), 1 - 1e-12)
                xs.append(np.log(p / (1 - p)))
                ys.append(1.0 if fid in q.relevant else 0.0)
    b, a = fit_logistic(np.asarray(xs)[:, None], np.asarray(ys), l2=1e-3)
    return float(a), float(b)


def choose_threshold(sets, a: float, b: float, k: int = 3) -> tuple[float, dict]:
    """The threshold with the best mean F1 over the dev sets once calibrated, and each set's F1 there."""
    from rag_persona.retrieval.tuning import metrics_at

    def calibrated(row):
        out = []
        for fid, p in row:
            p = min(max(p, 1e-12), 1 - 1e-12)
            out.append((fid, float(1 / (1 + np.exp(-(a * np.log(p / (1 - p)) + b)))) if p > 1e-12 else 0.0))
        return out

    cal = [(persona, name, queries, [calibrated(r) for r in ranks]) for persona, name, queries, ranks in sets]
    best = (-1.0, 0.5, {})
    for t in np.round(np.arange(0.05, 0.96, 0.01), 2):
        per = {f"{p}/{n}": metrics_at(qs, rk, float(t), k).f1 for p, n, qs, rk in cal}
        mean = float(np.mean(list(per.values())))
        if mean > best[0] + 1e-9:
            best = (mean, float(t), per)
    return best[1], {key: round(v, 3) for key, v in best[2].items()}


def calibrate(folder: Path, log=print) -> dict:
    """Fit (a, b) and the default threshold; write them into the reranker's manifest; return them."""
    from rag_persona.retrieval.reranker import MANIFEST
    from rag_persona.utils.io import read_json, write_json

    sets = dev_rankings(folder)
    a, b = fit_platt(sets)
    threshold, per_set = choose_threshold(sets, a, b)
    manifest = read_json(folder / MANIFEST)
    manifest["calibration"] = {
        "a": round(a, 5),
        "b": round(b, 5),
        "fitted_on": [f"{p}/{n}" for p, n in DEV_SETS],
    }
    manifest["default_threshold"] = threshold
    manifest["dev_f1_at_default"] = per_set
    write_json(folder / MANIFEST, manifest)
    log(f"[rerank] calibration a={a:.4f} b={b:.4f}; threshold {threshold} (dev F1 {per_set})")
    return manifest
