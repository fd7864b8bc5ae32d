"""Persona metrics: style markers, length, sentences, leaks, fact accuracy, off-topic handling."""

from __future__ import annotations

import pytest

from rag_persona.evaluation.metrics import (
    OJOUSAMA_MARKERS,
    PromptResult,
    char_length,
    does_task,
    fact_key,
    is_ojousama,
    judge,
    leaked_special_text,
    reply_metrics,
    sentence_count,
    states_fact,
    summarize,
)

PERSONA_WORDS = ["小野寺絢音", "小野寺", "絢音"]
FACTS = {
    "profile-name": "名前は小野寺絢音（おのでら あやね）。",
    "profile-age": "小野寺絢音の年齢は17歳。",
    "hobby": "趣味はピアノと乗馬。",
    "birthday": "誕生日は4月3日で、春生まれ。",
}


@pytest.mark.parametrize(
    "text",
    [
        "ごきげんよう、お会いできて嬉しいですわ。",
        "紅茶はいかがですの？",
        "素敵なお話ですわね",
        "わたくし、17歳でございます。",
        "よろしくてよ、でしてよ",
    ],
)
def test_ojousama_replies_are_recognised(text):
    assert is_ojousama(text)


@pytest.mark.parametrize(
    "text",
    [
        "こんにちは！何かお手伝いできることはありますか？",
        "ありがとうございます。",
        "ちょっと待ってよ",
        "私は17歳です。",
        "Hello!",
    ],
)
def test_plain_replies_are_not(text):
    assert not is_ojousama(text)


def test_marker_list_is_one_tuple_of_strings():
    assert all(isinstance(m, str) and m for m in OJOUSAMA_MARKERS)
    assert len(set(OJOUSAMA_MARKERS)) == len(OJOUSAMA_MARKERS)


def test_length_and_sentences():
    assert char_length("ごきげんよう、 嬉しいですわ。") == 14
    assert sentence_count("ごきげんようですわ。") == 1
    assert sentence_count("ごきげんよう。嬉しいですわ！またお話ししましょうね") == 3
    assert sentence_count("「ごきげんよう」ですわ。") == 1
    assert sentence_count("はい。\nそうです") == 2


def test_leaked_special_text():
    assert leaked_special_text("嬉しいですわ。</s>") == ["</s>"]
    assert leaked_special_text("ですわ<|im_end|>") == ["<|im_end|>"]
    assert leaked_special_text("[/INST] はい") == ["[/INST]"]
    assert leaked_special_text("ごきげんよう、嬉しいですわ。") == []
    assert leaked_special_text("x <my_eos> y", extra=["<my_eos>"]) == ["<my_eos>"]


def test_reply_metrics_combines_the_checks():
    m = reply_metrics("ごきげんよう、嬉しいですわ。</s>", ended_by_eos=False)
    assert m.style and m.sentences == 1 and not m.ended_by_eos and m.leaked == ["</s>"]
    assert "ですわ" in m.markers and "ごきげんよう" in m.markers


def test_fact_key_uses_numbers_and_content_words():
    age = fact_key("profile-age", FACTS["profile-age"], "何歳ですか？", PERSONA_WORDS)
    assert age.numbers == ["17"]
    assert states_fact(age, "わたくしは17歳ですわ。")
    assert not states_fact(age, "わたくしは16歳ですわ。")
    hobby = fact_key("hobby", FACTS["hobby"], "趣味は何ですか？", PERSONA_WORDS)
    assert "ピアノ" in hobby.words and "趣味" not in hobby.words  # the question's words are no evidence
    assert states_fact(hobby, "ピアノと乗馬をたしなんでおりますの。")
    assert not states_fact(hobby, "趣味はお料理ですわ。")
    name = fact_key("profile-name", FACTS["profile-name"], "お名前は？", PERSONA_WORDS)
    assert "小野寺" in name.words  # a fact about her name keeps the name as its key
    assert "おのでら" not in " ".join(name.words)  # readings in brackets are dropped
    assert states_fact(name, "わたくし、小野寺絢音と申しますわ。")
    birthday = fact_key("birthday", FACTS["birthday"], "誕生日はいつ？", PERSONA_WORDS)
    assert birthday.numbers == ["4", "3"]
    assert states_fact(birthday, "４月３日ですわ。")  # full-width digits are normalised


def test_a_compound_key_word_is_found_in_its_short_units():
    born = fact_key("born", "出身地は神奈川県鎌倉市。", "どこ生まれなの？", PERSONA_WORDS)
    assert states_fact(born, "神奈川県の鎌倉市で生まれたのですわ。")
    assert not states_fact(born, "神奈川県の横浜市で生まれたのですわ。")


def test_a_reference_reply_keys_the_fact_on_the_part_it_answers():
    father = "父は小野寺宗一郎（そういちろう）、50歳で小野寺商事の社長。"
    query, reference = "お父さんも音楽家？", "いいえ、父は小野寺商事の社長をしておりますの。"
    full = fact_key("father", father, query, PERSONA_WORDS)
    assert full.numbers == ["50"] and not states_fact(full, reference)  # the old key failed the reference
    key = fact_key("father", father, query, PERSONA_WORDS, reference=reference)
    assert key.numbers == [] and "社長" in key.words
    assert states_fact(key, "いいえ、お父様は小野寺商事の社長ですわ。")
    assert not states_fact(key, "お父様は50歳ですわ。")  # true, but not what was asked
    assert not states_fact(key, "ええ、お父様はヴァイオリニストですわ。")
    # A name question: the reference names her, so her name is the key even though it is a persona word.
    name = fact_key(
        "profile-name",
        FACTS["profile-name"],
        "何て呼べばいい？",
        PERSONA_WORDS,
        reference="絢音とお呼びくださいませ。",
    )
    assert states_fact(name, "絢音と呼んでくださいまし。")
    assert not states_fact(name, "友人は「ひかりさん」と呼んでおりますわ。")
    # A reference that takes nothing of the fact leaves the full key.
    assert fact_key("father", father, query, PERSONA_WORDS, reference="ふふ、秘密ですわ。") == full
    result = judge(
        PromptResult(query, "父は小野寺商事の社長ですわ。", True, ["father"], ["father"]),
        {"father": father},
        persona_words=PERSONA_WORDS,
        reference=reference,
    )
    assert result.fact_correct is True


def test_does_task():
    assert does_task("```python\nprint('hi')\n```")
    assert does_task("def f(x):\n    return x")
    assert not does_task("まあ、わたくしプログラムは書けませんの。")


def _result(reply, golden=(), context=(), eos=True, query="趣味は何ですか？"):
    return PromptResult(
        query=query, reply=reply, ended_by_eos=eos, context_ids=list(context), golden_ids=list(golden)
    )


def test_judge_and_summary():
    results = [
        judge(
            _result("ピアノと乗馬ですわ。", golden=["hobby"], context=["hobby"]),
            FACTS,
            persona_words=PERSONA_WORDS,
        ),
        judge(
            _result("お料理ですわ。", golden=["hobby"], context=["hobby"]), FACTS, persona_words=PERSONA_WORDS
        ),
        judge(
            _result("まあ、お天気のお話ですの？素敵ですわね。", query="明日の天気は？"),
            FACTS,
            persona_words=PERSONA_WORDS,
        ),
        # off-topic, but repeats an irrelevant retrieved fact: not handled
        judge(
            _result("ピアノと乗馬が趣味ですわ。", context=["hobby"], query="株価は？"),
            FACTS,
            persona_words=PERSONA_WORDS,
        ),
        judge(
            _result("Sure! def f(): return 1", eos=False, query="コード書いて"),
            FACTS,
            persona_words=PERSONA_WORDS,
        ),
    ]
    assert [r.fact_correct for r in results] == [True, False, None, None, None]
    assert [r.offtopic_ok for r in results] == [None, None, True, False, False]
    s = summarize(results)
    assert s["n"] == 5 and s["n_fact"] == 2 and s["n_offtopic"] == 3
    assert s["fact_accuracy"] == 0.5
    assert s["offtopic_handling"] == pytest.approx(1 / 3, abs=1e-3)
    assert s["style_rate"] == 0.8 and s["eos_rate"] == 0.8 and s["leak_rate"] == 0.0
    assert s["foreign_register_rate"] == 0.0  # her own endings are never foreign
    assert s["one_sentence_rate"] == 0.6  # the weather reply and the code reply have two
    assert s["median_chars"] == 13


def test_the_judge_accepts_the_shipped_reference_replies_and_rejects_shuffled_ones():
    """Every fact-bearing turn of the shipped dialogues: its own お嬢様 and plain replies state its facts by the
    judge keyed on the お嬢様 reply, and the replies of other turns (shuffled) almost never do."""
    import json
    import random

    from rag_persona.evaluation.evaluate import persona_words
    from rag_persona.knowledge.facts import load_knowledge
    from rag_persona.prompts import Persona
    from rag_persona.settings import KNOWLEDGE_ROOT

    folder = KNOWLEDGE_ROOT / "ojousama"
    facts = {f.id: f.text for f in load_knowledge(folder).facts}
    words = persona_words(Persona.load(folder))
    turns = [
        t
        for name in ("dialogues.jsonl", "dialogues_v2.jsonl")
        for line in (folder / name).read_text(encoding="utf-8").splitlines()
        for t in json.loads(line)["turns"]
        if t.get("facts") and all(f in facts for f in t["facts"])
    ]
    assert len(turns) > 300

    def states(turn, reply):
        keys = [fact_key(f, facts[f], turn["user"], words, reference=turn["ojousama"]) for f in turn["facts"]]
        return any(states_fact(k, reply) for k in keys)

    rate = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert rate([states(t, t["ojousama"]) for t in turns]) >= 0.95
    assert rate([states(t, t["plain"]) for t in turns]) >= 0.90
    others = [t["ojousama"] for t in turns]
    random.Random(0).shuffle(others)
    assert rate([states(t, o) for t, o in zip(turns, others, strict=True)]) <= 0.08
