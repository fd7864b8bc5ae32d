"""A persona fact said back as one first-person sentence, in either style (training rows that state facts)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from rag_persona.utils.text import morphemes

_ENDINGS = {
    # (after a verb/adjective/auxiliary, after the copula だ (replacing it), after anything else)
    "ojousama": ("のですわ。", "なのですわ。", "ですわ。"),
    "plain": ("んです。", "なんです。", "です。"),
}
_FIRST_PERSON = {"ojousama": "わたくし", "plain": "私"}


def self_names(full_name: str) -> tuple[str, ...]:
    """The names a fact may use for the persona: the full name and, for names of 4+ characters, the last two
    (the given name of most Japanese names: 小野寺絢音 → 絢音, 黒田鉄斎 → 鉄斎)."""
    return (full_name, full_name[-2:]) if len(full_name) >= 4 else (full_name,)


def say_fact(fact_text: str, style: str = "ojousama", names: Sequence[str] = ()) -> str:
    """The fact verbatim, the persona's names (as subject or owner: 絢音の部屋は…) → first person, with a
    polite ending that fits its last word; the name on its own (名前は小野寺絢音) stays.

    The ending follows the part of speech of the last word (Sudachi): a verb, adjective or auxiliary takes
    「のですわ。」 (plain 「んです。」), the copula 「だ」 after a noun becomes 「なのですわ。」, a noun or
    na-adjective 「ですわ。」.
    """
    if style not in _ENDINGS:
        raise ValueError(f"style must be one of {sorted(_ENDINGS)}, got {style!r}")
    text = fact_text.strip().rstrip("。．.")
    if names:
        alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
        text = re.sub(f"(?:{alternatives})(?=[のはにがをと])", _FIRST_PERSON[style], text)
    words = morphemes(text, "C")
    after_verb, after_copula, other = _ENDINGS[style]
    if not len(words):
        return text + other
    last = words[-1]
    pos = last.part_of_speech()[0]
    before = words[-2].part_of_speech()[0] if len(words) > 1 else ""
    if pos == "助動詞" and last.surface() == "だ" and before in ("名詞", "形状詞"):
        return text[:-1] + after_copula
    if pos in ("動詞", "形容詞", "助動詞"):
        return text + after_verb
    return text + other
