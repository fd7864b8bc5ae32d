"""Retrieval metrics on labelled queries, threshold sweeps, the chosen threshold and its plot.

Metrics (micro-averaged over queries):

- precision = relevant hits / hits, recall = relevant hits / relevant facts, F1 of the two;
- top1_hit_rate: among queries that have relevant facts, the share whose first hit is relevant;
- offtopic_rejection: among queries whose relevant list is empty, the share that got no hit at all.

A sweep scores every query once (ranked candidates with scores) and then applies each threshold to the
same ranking, so a sweep over hundreds of thresholds costs one retrieval pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rag_persona.errors import RagPersonaError
from rag_persona.knowledge.facts import LabelledQuery
from rag_persona.retrieval.calibration import Calibration
from rag_persona.retrieval.retriever import RetrievalConfig, Retriever, retriever_for
from rag_persona.utils.io import write_file_atomic

# One ranked candidate list per query: (fact id, score), best first.
Ranking = list[tuple[str, float]]


@dataclass
class Metrics:
    precision: float
    recall: float
    f1: float
    top1_hit_rate: float
    offtopic_rejection: float
    queries: int
    on_topic: int
    off_topic: int
    hits: int
    threshold: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def metrics_from_hits(queries: Sequence[LabelledQuery], hits: Sequence[Sequence[str]]) -> Metrics:
    """Metrics for retrieved id lists (best first), one per labelled query."""
    if len(queries) != len(hits):
        raise ValueError("one hit list per query")
    tp = n_hits = n_rel = 0
    top1 = on = off = rejected = 0
    for q, ids in zip(queries, hits, strict=True):
        rel = set(q.relevant)
        ids = list(ids)
        n_hits += len(ids)
        n_rel += len(rel)
        tp += sum(1 for i in ids if i in rel)
        if rel:
            on += 1
            top1 += bool(ids) and ids[0] in rel
        else:
            off += 1
            rejected += not ids
    precision = tp / n_hits if n_hits else 1.0
    recall = tp / n_rel if n_rel else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return Metrics(
        precision=precision,
        recall=recall,
        f1=f1,
        top1_hit_rate=top1 / on if on else 1.0,
        offtopic_rejection=rejected / off if off else 1.0,
        queries=len(queries),
        on_topic=on,
        off_topic=off,
        hits=n_hits,
    )


def apply_threshold(rankings: Sequence[Ranking], threshold: float, k: int) -> list[list[str]]:
    """Hits per query: candidates scoring at least the threshold, at most k."""
    return [[fid for fid, s in r if s >= threshold][:k] for r in rankings]


def metrics_at(
    queries: Sequence[LabelledQuery], rankings: Sequence[Ranking], threshold: float, k: int
) -> Metrics:
    m = metrics_from_hits(queries, apply_threshold(rankings, threshold, k))
    m.threshold = float(threshold)
    return m


def ranking_recall_at(queries: Sequence[LabelledQuery], rankings: Sequence[Ranking], n: int) -> float:
    """Share of relevant facts found among the first n candidates, ignoring any threshold."""
    found = total = 0
    for q, r in zip(queries, rankings, strict=True):
        top = {fid for fid, _ in r[:n]}
        found += sum(1 for rid in q.relevant if rid in top)
        total += len(q.relevant)
    return found / total if total else 1.0


def candidate_thresholds(rankings: Sequence[Ranking], n: int = 400) -> np.ndarray:
    """A grid over the observed score range, plus every observed score near it (exact breakpoints)."""
    scores = np.array([s for r in rankings for _, s in r], dtype=np.float64)
    if scores.size == 0:
        raise RagPersonaError("tune: no candidate scores to sweep (empty index or no queries)")
    lo, hi = float(scores.min()), float(scores.max())
    grid = np.linspace(lo, hi + 1e-9, n)
    return np.unique(np.round(np.concatenate([grid, scores]), 6))


@dataclass
class Sweep:
    thresholds: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    top1_hit_rate: np.ndarray
    offtopic_rejection: np.ndarray
    chosen: float
    chosen_metrics: Metrics
    k: int

    def to_dict(self) -> dict:
        return {
            "threshold": self.chosen,
            "k": self.k,
            "metrics": self.chosen_metrics.to_dict(),
            "plateau": self.plateau(),
        }

    def plateau(self, tolerance: float = 0.01) -> list[float]:
        """The threshold range whose F1 is within tolerance of the best."""
        ok = self.thresholds[self.f1 >= self.f1.max() - tolerance]
        return [float(ok.min()), float(ok.max())]


def sweep(
    queries: Sequence[LabelledQuery],
    rankings: Sequence[Ranking],
    *,
    k: int,
    thresholds: np.ndarray | None = None,
    tolerance: float = 0.005,
) -> Sweep:
    """Metrics at every threshold; choose the F1-maximising one, robustly.

    Ties (F1 within ``tolerance`` of the best) are broken toward robustness: among the near-best
    thresholds, take the middle of the widest contiguous run, so the choice sits on a plateau rather
    than on the edge of a cliff that one more query would push it over.
    """
    if not queries:
        raise RagPersonaError("tune: no labelled queries")
    ts = candidate_thresholds(rankings) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    rows = [metrics_at(queries, rankings, float(t), k) for t in ts]
    f1 = np.array([m.f1 for m in rows])
    best = f1.max()
    near = f1 >= best - tolerance
    # widest contiguous run of near-best thresholds (in threshold order)
    runs: list[tuple[int, int]] = []
    start = None
    for i, ok in enumerate(near):
        if ok and start is None:
            start = i
        if not ok and start is not None:
            runs.append((start, i - 1))
            start = None
    if start is not None:
        runs.append((start, len(near) - 1))
    lo, hi = max(runs, key=lambda r: (ts[r[1]] - ts[r[0]], f1[r[0] : r[1] + 1].mean()))
    chosen = float((ts[lo] + ts[hi]) / 2)
    chosen_metrics = metrics_at(queries, rankings, chosen, k)
    return Sweep(
        thresholds=ts,
        precision=np.array([m.precision for m in rows]),
        recall=np.array([m.recall for m in rows]),
        f1=f1,
        top1_hit_rate=np.array([m.top1_hit_rate for m in rows]),
        offtopic_rejection=np.array([m.offtopic_rejection for m in rows]),
        chosen=round(chosen, 4),
        chosen_metrics=chosen_metrics,
        k=k,
    )


def plot_sweep(result: Sweep, path: str | Path, title: str = "") -> Path:
    """PNG of precision, recall, F1 (and off-topic rejection) against threshold, the choice marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    t = result.thresholds
    ax.plot(t, result.precision, label="precision")
    ax.plot(t, result.recall, label="recall")
    ax.plot(t, result.f1, label="F1", linewidth=2.2)
    ax.plot(t, result.offtopic_rejection, label="off-topic rejection", linestyle=":")
    ax.plot(t, result.top1_hit_rate, label="top-1 hit rate", linestyle="--", alpha=0.7)
    ax.axvline(result.chosen, color="black", linewidth=1)
    m = result.chosen_metrics
    ax.annotate(
        f"threshold {result.chosen:.3f}\nF1 {m.f1:.3f}",
        xy=(result.chosen, m.f1),
        xytext=(8, -30),
        textcoords="offset points",
        fontsize=8,
    )
    ax.set_xlabel("threshold (retrieval score)")
    ax.set_ylabel("metric")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title or "threshold sweep")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    try:
        return write_file_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


# -- evaluation and tuning on an index -------------------------------------------------------------
def evaluate_retriever(
    retriever, queries: Sequence[LabelledQuery], *, threshold: float | None = None, k: int | None = None
) -> Metrics:
    """Metrics of a retriever (its own threshold and k unless given) on labelled queries."""
    t = retriever.threshold if threshold is None else float(threshold)
    k = retriever.k if k is None else int(k)
    rankings = query_rankings(retriever, queries, max(k, 1))
    return metrics_at(queries, rankings, t, k)


def query_rankings(retriever, queries: Sequence[LabelledQuery], depth: int) -> list[Ranking]:
    """Rankings for labelled queries, each read with its conversation history (multi-turn sets)."""
    return retriever.rankings([q.query for q in queries], depth=depth, histories=[q.history for q in queries])


def tune_threshold(
    store,
    queries: Sequence[LabelledQuery],
    *,
    mode: str | None = None,
    k: int | None = None,
    plot: str | Path | None = None,
    save: bool = True,
    source: str | None = None,
) -> Sweep:
    """Sweep thresholds for an index on labelled queries, store the chosen one in its manifest."""
    retriever = retriever_for(store, mode=mode, k=k)
    check_labels(store, queries)
    rankings = query_rankings(retriever, queries, max(retriever.k, 1))
    result = sweep(queries, rankings, k=retriever.k)
    if plot is not None:
        name = Path(store.path).name if store.path else "index"
        plot_sweep(result, plot, title=f"{name}: {retriever.mode}, k={retriever.k}, {len(queries)} queries")
    info = {**result.to_dict(), "queries": source, "n_queries": len(queries)}
    store.set_threshold(retriever.mode, result.chosen, info)
    store.manifest["retrieval"] = {
        **store.manifest.get("retrieval", {}),
        "mode": retriever.mode,
        "k": retriever.k,
    }
    if save and store.path is not None:
        store.save()
    return result


def check_labels(store, queries: Sequence[LabelledQuery]) -> None:
    """Refuse labelled queries naming a fact id that the index does not hold (one line, FILE:LINE)."""
    known = set(store.ids)
    for q in queries:
        for i, rid in enumerate(q.relevant):
            if rid not in known:
                raise RagPersonaError(
                    f"{q.source}:{q.line}: field 'relevant[{i}]': fact id {rid!r} is not in the index"
                )


# -- fitting the score calibration (how calibration.CALIBRATION was made) ---------------------------
def fit_logistic(X: np.ndarray, y: np.ndarray, l2: float = 1.0, iters: int = 50) -> np.ndarray:
    """L2-regularised logistic regression by Newton's method; returns [bias, w1, w2, ...]."""
    X = np.column_stack([np.ones(len(X)), np.asarray(X, dtype=np.float64)])
    y = np.asarray(y, dtype=np.float64)
    w = np.zeros(X.shape[1])
    reg = np.full(X.shape[1], l2)
    reg[0] = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(X @ w, -60, 60)))
        grad = X.T @ (p - y) + reg * w
        hess = (X * (p * (1 - p))[:, None]).T @ X + np.diag(reg) + 1e-9 * np.eye(X.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def calibration_features(
    retriever, queries: Sequence[LabelledQuery]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per key kind ('text', 'question'): rows (z, gap, lexical) for every candidate fact, and labels."""
    ids = retriever.store.ids
    rows: dict[str, list] = {"text": [], "question": []}
    labels: dict[str, list] = {"text": [], "question": []}
    for q, c in zip(queries, retriever.candidates([q.query for q in queries]), strict=True):
        rel = np.array([ids[f] in q.relevant for f in c.facts])
        gap_t = c.z_text - c.z_text.max()
        rows["text"].append(np.column_stack([c.z_text, gap_t, c.lex_text]))
        labels["text"].append(rel)
        has_q = np.isfinite(c.z_question)
        if has_q.any():
            gap_q = c.z_question[has_q] - c.z_question[has_q].max()
            rows["question"].append(np.column_stack([c.z_question[has_q], gap_q, c.lex_question[has_q]]))
            labels["question"].append(rel[has_q])
    return {kind: (np.concatenate(rows[kind]), np.concatenate(labels[kind])) for kind in rows if rows[kind]}


def fit_calibration(store, queries: Sequence[LabelledQuery], l2: float = 1.0) -> dict:
    """Fit `calibration.Calibration` weights for dense and hybrid on an index and labelled queries."""
    out = {}
    for mode in ("dense", "hybrid"):
        feats = calibration_features(Retriever(store, RetrievalConfig(mode=mode, threshold=0.0)), queries)
        for kind, (X, y) in feats.items():
            cols = [0, 1, 2] if mode == "hybrid" else [0, 1]
            w = fit_logistic(X[:, cols], y, l2=l2)
            out[(mode, kind)] = Calibration(
                bias=round(float(w[0]), 3),
                w_z=round(float(w[1]), 3),
                w_gap=round(float(w[2]), 3),
                w_lex=round(float(w[3]), 3) if mode == "hybrid" else 0.0,
            )
    return out
