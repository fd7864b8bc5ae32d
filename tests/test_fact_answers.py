"""A fact said back in the first person: the ending follows the last word, the persona's names become I."""

from __future__ import annotations

import pytest

from training.data.fact_answers import say_fact, self_names


@pytest.mark.parametrize(
    ("fact", "ojousama", "plain"),
    [
        ("絢音の年齢は17歳。", "わたくしの年齢は17歳ですわ。", "私の年齢は17歳です。"),
        (
            "ピアノを5歳から習っている。",
            "ピアノを5歳から習っているのですわ。",
            "ピアノを5歳から習っているんです。",
        ),
        ("好きな本は原書で読んだ。", "好きな本は原書で読んだのですわ。", "好きな本は原書で読んだんです。"),
        ("一番好きなのは春だ。", "一番好きなのは春なのですわ。", "一番好きなのは春なんです。"),
        ("ひかりは占いが大好き。", "ひかりは占いが大好きですわ。", "ひかりは占いが大好きです。"),
        (
            "名前は小野寺絢音（おのでら あやね）。",
            "名前は小野寺絢音（おのでら あやね）ですわ。",
            "名前は小野寺絢音（おのでら あやね）です。",
        ),
        (
            "美咲は小野寺絢音にとって姉のような存在。",
            "美咲はわたくしにとって姉のような存在ですわ。",
            "美咲は私にとって姉のような存在です。",
        ),
    ],
)
def test_fact_said_back_in_both_styles(fact, ojousama, plain):
    names = self_names("小野寺絢音")
    assert say_fact(fact, "ojousama", names) == ojousama
    assert say_fact(fact, "plain", names) == plain


def test_names_and_styles():
    assert self_names("小野寺絢音") == ("小野寺絢音", "絢音") and self_names("鈴木") == ("鈴木",)
    assert say_fact("絢音の年齢は17歳。") == "絢音の年齢は17歳ですわ。"  # no names given: none replaced
    with pytest.raises(ValueError, match="style"):
        say_fact("年齢は17歳。", "kansai")
