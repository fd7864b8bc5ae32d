"""Identity, invented specifics and malformed-Japanese checks (the persona model v2 metrics), on real replies."""

from __future__ import annotations

import pytest

from rag_persona.evaluation.grounding import invented_specifics, malformed_parts, names_itself, specifics
from rag_persona.evaluation.metrics import PromptResult, judge, summarize

FACTS = {
    "profile-name": "名前は小野寺絢音。",
    "profile-age": "17歳の高校2年生。",
    "family-pet-dog": "飼い犬は白いマルチーズのシャルロットで、愛称はロッテ。",
}


@pytest.mark.parametrize(
    ("reply", "ok"),
    [
        ("わたくし、小野寺絢音と申しますわ。", True),
        ("絢音とお呼びくださいませ。", True),
        ("おやすみなさい、わたくしもお会いできて嬉しいですわ。", False),  # the failure users saw
        ("お兄様ですわ…", False),
    ],
)
def test_identity_is_naming_yourself(reply, ok):
    assert names_itself(reply, "小野寺絢音", "おのでら あやね") is ok


def test_specifics_found_in_no_source_are_invented():
    sources = list(FACTS.values())
    assert "17" in specifics("わたくし、17歳ですの。")
    assert invented_specifics("わたくしは１７歳ですわ。", sources) == []  # full-width digits normalised
    assert invented_specifics("ロッテは3歳のマルチーズですわ。", sources) == ["3"]
    assert invented_specifics("身長は百六十センチ、妹の名前は花子ですわ。", sources) == ["花子"]
    assert invented_specifics("三人家族ですわ。", sources) == ["三"]


@pytest.mark.parametrize(
    ("reply", "bad"),
    [
        ("ごきげんよう、お会いできて嬉しいですわ。", []),
        ("伝統的な伝統的な茶道ですわ。", ["伝統的な"]),
        ("ピアノは안녕好きですわ。", ["안", "녕"]),
        ("I love the piano ですわ。", ["love", "the", "piano"]),
        ("ははは、そうですわね。", []),  # laughter is no doubled phrase
        ("シャルロットのwalkですわ。", ["walk"]),
    ],
)
def test_malformed_japanese(reply, bad):
    assert malformed_parts(reply, ["Chopin"]) == bad


def test_judge_and_summary_report_the_new_rates():
    replies = [
        ("君は誰？", "わたくし、小野寺絢音ですわ。", "identity", []),
        ("あなたのお名前は？", "お兄様ですわ…", "identity", []),
        ("犬は何歳？", "ロッテは5歳ですわ。", "", ["family-pet-dog"]),
        ("好きな曲は？", "ショパンのショパンのノクターンですわ。", "", []),
    ]
    results = [
        judge(
            PromptResult(query=q, reply=r, ended_by_eos=True, context_ids=[], golden_ids=g, kind=k),
            FACTS,
            identity=("小野寺絢音", "おのでら あやね"),
        )
        for q, r, k, g in replies
    ]
    assert [r.identity_ok for r in results] == [True, False, None, None]
    assert results[2].invented == ["5"] and results[3].malformed == ["ショパンの"]
    assert results[3].invented == ["ショパン"]  # a composer the knowledge never mentions
    s = summarize(results)
    assert s["identity_accuracy"] == 0.5 and s["n_identity"] == 2
    assert s["invented_rate"] == 0.5 and s["malformed_rate"] == 0.25
