"""Closed-book fact recall: each fact's own questions, asked with the persona prompt and no retrieved context.

This measures what the weights know (before and after continued pre-training), not what retrieval finds:
the prompt is `build_messages` with an empty fact list, decoding is greedy, and a reply counts as correct
when it states the fact by the rule of `rag_persona.evaluation.metrics.states_fact`.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rag_persona.errors import RagPersonaError
from rag_persona.evaluation.metrics import fact_key, is_ojousama, states_fact
from rag_persona.knowledge.facts import Fact, load_knowledge
from rag_persona.prompts import Persona, build_messages


@dataclass
class RecallResult:
    fact_id: str
    question: str
    reply: str
    correct: bool
    ended_by_eos: bool
    tags: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def score_reply(
    fact_id: str, fact_text: str, question: str, reply: str, persona_words=(), tokens=None
) -> bool:
    """Does the reply state the fact? (its numbers, else at least half of its key words)"""
    return states_fact(fact_key(fact_id, fact_text, question, persona_words, tokens), reply, tokens)


def pick_facts(facts: Sequence[Fact], n: int | None, seed: int = 0) -> list[Fact]:
    """Facts that have questions; with n, a seeded sample of n of them in file order."""
    asked = [f for f in facts if f.questions]
    if n is None or n >= len(asked):
        return asked
    if n <= 0:
        raise RagPersonaError(f"fact-recall: --n must be positive, got {n}")
    keep = set(random.Random(seed).sample(range(len(asked)), n))
    return [f for i, f in enumerate(asked) if i in keep]


def fact_recall(
    loaded,
    facts: Sequence[Fact],
    persona: Persona,
    *,
    max_new_tokens: int = 64,
    progress: Callable[[str], None] | None = None,
    tokens=None,
) -> dict:
    """Ask every question of every given fact; per-question results and a summary."""
    from rag_persona.evaluation.evaluate import persona_words
    from rag_persona.generation import GenerationSettings, generate_reply

    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    words = persona_words(persona)
    results: list[RecallResult] = []
    total = sum(len(f.questions) for f in facts)
    started = time.perf_counter()
    for fact in facts:
        for question in fact.questions:
            reply = generate_reply(loaded, build_messages(persona, [], [], question), settings)
            correct = score_reply(fact.id, fact.text, question, reply.text, words, tokens)
            results.append(
                RecallResult(fact.id, question, reply.text, correct, reply.ended_by_eos, list(fact.tags))
            )
            if progress:
                i = len(results)
                eta = (time.perf_counter() - started) / i * (total - i)
                mark = "ok " if correct else "-- "
                progress(f"[{i}/{total}] {mark}{question[:20]!r} → {reply.text[:40]!r} (eta {eta:.0f}s)")
    return {"questions": [r.to_dict() for r in results], "summary": summarize_recall(results)}


def _rate(values: list[bool]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def summarize_recall(results: Sequence[RecallResult]) -> dict:
    """Accuracy per question and per fact (any of its questions), EOS and style rates, accuracy per tag."""
    by_fact: dict[str, list[bool]] = {}
    by_tag: dict[str, list[bool]] = {}
    for r in results:
        by_fact.setdefault(r.fact_id, []).append(r.correct)
        for tag in r.tags[:1] or ["other"]:
            by_tag.setdefault(tag, []).append(r.correct)
    return {
        "questions": len(results),
        "accuracy": _rate([r.correct for r in results]),
        "facts": len(by_fact),
        "fact_accuracy": _rate([any(v) for v in by_fact.values()]),
        "eos_rate": _rate([r.ended_by_eos for r in results]),
        "style_rate": _rate([is_ojousama(r.reply) for r in results]),
        "median_chars": statistics.median([len(r.reply) for r in results]) if results else None,
        "by_tag": {t: _rate(v) for t, v in sorted(by_tag.items())},
    }


def run_fact_recall(
    *,
    model: str | None = None,
    adapter: str | None = None,
    persona: str | None = None,
    knowledge: str | Path | None = None,
    n: int | None = None,
    seed: int = 0,
    max_new_tokens: int = 64,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Load the model (+ adapter, none by default) and the persona's facts, and run the recall test."""
    from rag_persona.evaluation.evaluate import NO_ADAPTER
    from rag_persona.generation import load_causal_lm
    from rag_persona.settings import get_settings

    folder = Path(knowledge) if knowledge else get_settings().persona_dir(persona)
    if not folder.is_dir():
        raise RagPersonaError(f"{folder}: persona folder not found")
    kb = load_knowledge(folder)
    the_persona = Persona.load(folder)
    facts = pick_facts(kb.facts, n, seed)
    if not facts:
        raise RagPersonaError(f"{folder}: no fact has questions (facts.jsonl field 'questions')")
    if adapter is not None and adapter.strip().lower() in NO_ADAPTER:
        adapter = None
    loaded = load_causal_lm(model, adapter=adapter, progress=progress or (lambda m: None))
    out = fact_recall(loaded, facts, the_persona, max_new_tokens=max_new_tokens, progress=progress)
    out["setup"] = {
        "model": loaded.source,
        "adapter": adapter,
        "knowledge": str(folder),
        "facts_sampled": len(facts),
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "retrieval": False,
        "decoding": "greedy",
    }
    return out


def text_nll(loaded, texts: Sequence[str]) -> dict:
    """Mean negative log-likelihood per token of plain texts (no chat template, no persona prompt).

    How well the weights know a text, apart from how a chat-tuned model chooses to answer: continued
    pre-training lowers it on the documents it injected, and a later SFT that only changes the answer
    format leaves it there while closed-book recall falls.
    """
    import torch

    model, tokenizer = loaded.model, loaded.tokenizer
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:  # one at a time: no padding to mask, and these are short
            ids = tokenizer(text, return_tensors="pt").input_ids.to(model.device)
            if ids.shape[1] < 2:
                continue
            logits = model(input_ids=ids).logits[0, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    if not count:
        raise RagPersonaError("text_nll: no text of two or more tokens")
    return {"nll": round(total / count, 5), "texts": len(texts), "tokens": count}
