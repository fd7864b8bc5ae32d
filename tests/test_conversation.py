"""Conversation-aware retrieval: a follow-up that names no topic finds the facts of the topic before it."""

from __future__ import annotations

import pytest

from rag_persona.chat import plan_turn, retrieve_contexts
from rag_persona.errors import RagPersonaError
from rag_persona.retrieval.retriever import RetrievalConfig, Retriever, context_query

HISTORY = [
    {"role": "user", "content": "乗馬はしているの？"},
    {"role": "assistant", "content": "ええ、毎週土曜日に葉山の乗馬クラブで練習しておりますの。"},
]


def test_context_query_per_mode():
    assert context_query([], "いつから？") is None
    assert context_query(HISTORY, "いつから？", "last") is None
    assert context_query(HISTORY, "いつから？", "carry") == "乗馬はしているの？"
    assert context_query(HISTORY, "いつから？", "concat") == "乗馬はしているの？ いつから？"
    assert context_query(HISTORY, "いつから？", "concat_reply").startswith(
        "乗馬はしているの？ ええ、毎週土曜日"
    )
    with pytest.raises(RagPersonaError, match="conversation"):
        RetrievalConfig(conversation="everything")


@pytest.mark.parametrize("mode", ["dense", "hybrid"])
def test_a_follow_up_ranks_the_previous_topics_fact_higher(persona_store, mode):
    last_only = Retriever(persona_store, RetrievalConfig(mode=mode, conversation="last"))
    aware = Retriever(persona_store, RetrievalConfig(mode=mode))

    def place(retriever, history):
        ranking = [fid for fid, _ in retriever.rankings(["いつから？"], depth=None, histories=[history])[0]]
        return ranking.index("hobby-riding")

    assert place(aware, HISTORY) < place(last_only, HISTORY)
    assert place(aware, HISTORY) <= 2  # 「いつから？」 after riding: when she started riding, near the top
    # the context only raises scores, and without a history the turn is searched as before
    cur = dict(last_only.rankings(["いつから？"], depth=None)[0])
    ctx = dict(aware.rankings(["いつから？"], depth=None, histories=[HISTORY])[0])
    assert all(ctx[f] >= s - 1e-4 for f, s in cur.items())  # (batched embedding: last-bit noise)
    assert aware.rankings(["いつから？"], depth=None) == last_only.rankings(["いつから？"], depth=None)


def test_every_caller_gets_the_same_conversation_aware_context(persona_store, persona):
    retriever = Retriever(persona_store, RetrievalConfig(mode="hybrid"))
    plan = plan_turn(persona, retriever, HISTORY, "いつから？")
    batch = retrieve_contexts(retriever, ["いつから？", "いつから？"], [HISTORY, []])
    assert [f.id for f in plan.context] == [f.id for f in batch[0]]
    assert plan.messages[1:3] == HISTORY  # retrieval reads the history; the prompt carries it unchanged
