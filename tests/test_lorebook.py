"""Lorebook signals in retrieval: a fact's `keywords` (World Info keys) and `constant` flag, on the real e5."""

from __future__ import annotations

import json

import pytest

from rag_persona.retrieval.retriever import CONSTANT_SCORE, KEYWORD_SCORE, retriever_for
from rag_persona.retrieval.store import build_store

FACTS = [
    {"id": "shop", "text": "商店街でたこ焼き屋を営んでいる。"},
    {"id": "dog", "text": "柴犬のコテツを飼っている。"},
    # Nothing in this text is near 「ミナミ」: only its key can bring it up.
    {"id": "area", "text": "生まれも育ちも難波の近くである。", "keywords": ["ミナミ", "地元"]},
    {"id": "speech", "text": "いつも関西弁で話す。", "constant": True},
    {"id": "sauce", "text": "ソースは秘伝の配合である。", "keywords": ["ソース"]},
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    kb = tmp_path_factory.mktemp("lorebook") / "facts.jsonl"
    kb.write_text("".join(json.dumps(f, ensure_ascii=False) + "\n" for f in FACTS), encoding="utf-8")
    return build_store(kb, "e5-small")


@pytest.mark.parametrize("mode", ["dense", "hybrid", "lexical"])
def test_a_key_in_the_query_brings_its_fact_in_above_the_threshold(store, mode):
    retriever = retriever_for(store, mode=mode)
    without = {h.fact_id: h.score for h in retriever.search("週末はミナミで遊ぶの？", threshold=0.0, k=10)}
    assert without["area"] >= KEYWORD_SCORE
    hits = retriever.search("ミナミってよく行く？")
    assert hits[0].fact_id == "area" and hits[0].score == pytest.approx(KEYWORD_SCORE, abs=0.1)
    # Keys are matched case-insensitively as substrings, like World Info's defaults.
    assert "sauce" in [h.fact_id for h in retriever.search("この ソース 美味しい！")]


def test_constant_facts_are_always_in_context_outside_k(store):
    retriever = retriever_for(store, mode="hybrid")
    for query in ("柴犬飼ってる？", "今日は雨やな", "ミナミ"):
        hits = retriever.search(query, k=1)
        ids = [h.fact_id for h in hits]
        assert ids.count("speech") == 1 and hits[-1].score == CONSTANT_SCORE
        assert len([i for i in ids if i != "speech"]) <= 1


def test_without_a_key_nothing_changes(store):
    retriever = retriever_for(store, mode="dense")
    top = retriever.search("犬を飼ってる？", k=1)
    assert top[0].fact_id == "dog" and top[0].score < KEYWORD_SCORE
