"""Reranker training pairs from JaQuAD, JSTS and the synthetic multi-persona set, with hard negatives."""

from __future__ import annotations

import json
import os
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from rag_persona.errors import RagPersonaError

# JaQuAD and JSTS as shipped next to the repository (../shared/datasets); RAG_PERSONA_DATASETS overrides.
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"


def datasets_root() -> Path:
    """Where jaquad/ and jsts/ are: $RAG_PERSONA_DATASETS, else ../shared/datasets next to the repo."""
    return Path(os.environ.get("RAG_PERSONA_DATASETS") or SHARED)


SYNTHETIC = Path(__file__).resolve().parents[2] / "knowledge" / "_synthetic"
_SENTENCE_END = re.compile(r"(?<=[。！？!?])|\n+")


@dataclass(frozen=True)
class Pair:
    """One training example: a query, a passage and a relevance label in [0, 1]; source names its set."""

    query: str
    passage: str
    label: float
    source: str

    def to_dict(self) -> dict:
        return {"query": self.query, "passage": self.passage, "label": self.label, "source": self.source}


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise RagPersonaError(f"{path}: no such file (reranker training data)")
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def sentences(text: str) -> list[str]:
    """A paragraph split into sentences at 。！？ and line breaks; fragments under 8 characters dropped."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s and len(s.strip()) >= 8]


def jaquad_pairs(
    rng: random.Random, n_questions: int, negatives: int = 3, paragraph_share: float = 0.25
) -> list[Pair]:
    """JaQuAD questions against short passages like persona facts (the sentence holding the answer vs
    other sentences of the same article) and, for a share of them, whole paragraphs (the answer's
    paragraph vs other paragraphs of the same article): hard negatives on the same topic."""
    paragraphs = {p["id"]: p for p in _jsonl(datasets_root() / "jaquad" / "train_paragraphs.jsonl")}
    by_title: dict[str, list[str]] = defaultdict(list)
    for pid, p in paragraphs.items():
        by_title[p["title"]].append(pid)
    questions = _jsonl(datasets_root() / "jaquad" / "train_questions.jsonl")
    rng.shuffle(questions)
    out: list[Pair] = []
    used = 0
    for q in questions:
        if used >= n_questions:
            break
        pid = q["relevant"][0]
        para = paragraphs.get(pid)
        if para is None or not q.get("answer"):
            continue
        others = [o for o in by_title[para["title"]] if o != pid]
        if rng.random() < paragraph_share and others:
            out.append(Pair(q["query"], para["text"], 1.0, "jaquad-paragraph"))
            for o in rng.sample(others, min(negatives, len(others))):
                out.append(Pair(q["query"], paragraphs[o]["text"], 0.0, "jaquad-paragraph"))
            used += 1
            continue
        sents = sentences(para["text"])
        positive = [s for s in sents if q["answer"] in s]
        if not positive:
            continue
        pool = [s for s in sents if q["answer"] not in s]
        pool += [s for o in others for s in sentences(paragraphs[o]["text"]) if q["answer"] not in s]
        out.append(Pair(q["query"], positive[0], 1.0, "jaquad-sentence"))
        for s in rng.sample(pool, min(negatives, len(pool))):
            out.append(Pair(q["query"], s, 0.0, "jaquad-sentence"))
        used += 1
    return out


def jsts_pairs(rng: random.Random, n: int) -> list[Pair]:
    """JSTS sentence pairs with the human similarity (0-5) as a soft label: paraphrase vs near miss."""
    rows = _jsonl(datasets_root() / "jsts" / "train.jsonl")
    rng.shuffle(rows)
    return [Pair(r["sentence1"], r["sentence2"], float(r["score"]) / 5.0, "jsts") for r in rows[:n]]


def synthetic_personas(root: Path = SYNTHETIC) -> list[Path]:
    """The synthetic persona folders (each facts.jsonl + queries/)."""
    return sorted(p for p in root.iterdir() if (p / "facts.jsonl").is_file()) if root.is_dir() else []


def persona_pairs(
    folders: list[Path], split: str, rng: random.Random, negatives: int = 6, ranker=None
) -> list[Pair]:
    """Each labelled query of a persona against its relevant facts (label 1) and its hardest other facts
    (label 0): the `ranker(folder, queries)` candidates when given (what the retriever puts in front of
    the reranker), else random facts of the same persona. A query with no relevant fact yields negatives
    only, which is what teaches the reranker to say "nothing here"."""
    from rag_persona.knowledge.facts import load_knowledge, load_queries

    out: list[Pair] = []
    for folder in folders:
        kb = load_knowledge(folder / "facts.jsonl")
        texts = {f.id: f.text for f in kb.facts}
        queries = load_queries(folder / "queries" / f"{split}.jsonl", texts)
        ranked = ranker(folder, queries) if ranker else [rng.sample(list(texts), len(texts)) for _ in queries]
        for q, order in zip(queries, ranked, strict=True):
            for rid in q.relevant:
                out.append(Pair(q.query, texts[rid], 1.0, f"persona-{split}"))
            hard = [fid for fid in order if fid not in q.relevant][:negatives]
            out.extend(Pair(q.query, texts[fid], 0.0, f"persona-{split}") for fid in hard)
    return out
