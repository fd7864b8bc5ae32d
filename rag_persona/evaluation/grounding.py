"""Reply checks beyond style: names its own identity, invents no specifics, is well-formed Japanese.

- identity: a reply to "who are you" names the persona (full name, or its given/family part).
- invented specifics: numbers and proper nouns in a reply that appear in none of its sources — the
  retrieved context, the conversation and the whole knowledge base (a model that answers a question the
  knowledge cannot answer with 「身長は162センチですわ」 made it up). Proper nouns are Sudachi's 固有名詞;
  numbers are digit runs (Arabic or full-width, normalised) and kanji numerals with a counter (三人, 十歳).
- malformed Japanese: script from outside Japanese (Hangul, Cyrillic, Arabic, Thai, Devanagari, the
  replacement character), a Latin word of 3+ letters found in no source, or a phrase of 3+ characters
  repeated back to back (「伝統的な伝統的な」).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence

from rag_persona.utils.text import morphemes

_DIGITS = re.compile(r"\d+(?:[.,]\d+)?")
_KANJI_NUMBER = re.compile(r"[一二三四五六七八九十百千万]+(?=[歳才人年月日時分回個匹頭本枚階番位度円])")
_FOREIGN_SCRIPT = re.compile(
    "[\u0400-\u04ff\u0590-\u05ff\u0600-\u06ff\u0900-\u097f\u0e00-\u0e7f\uac00-\ud7af\ufffd]"
)
_LATIN_WORD = re.compile(r"[A-Za-z]{3,}")
_REPEAT = re.compile(r"([^\s、。！？!?「」]{3,}?)\1")


def _norm(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


def names_itself(reply: str, name: str, reading: str = "") -> bool:
    """Whether a reply names the persona: its full name, or (names of 4+ characters) the given or family
    part (小野寺絢音 → 小野寺, 絢音), or its reading's parts."""
    reply = _norm(reply)
    parts = [name]
    if len(name) >= 4:
        parts += [name[:3], name[3:], name[:2], name[2:]]
    parts += reading.split()
    return any(p and _norm(p) in reply for p in parts)


def specifics(text: str) -> list[str]:
    """Numbers and proper nouns of a text (normalised), in order, without repeats."""
    text = _norm(text)
    found = _DIGITS.findall(text) + _KANJI_NUMBER.findall(text)
    found += [m.surface() for m in morphemes(text, "C") if m.part_of_speech()[1] == "固有名詞"]
    return list(dict.fromkeys(f for f in found if f.strip()))


def invented_specifics(reply: str, sources: Iterable[str]) -> list[str]:
    """The reply's numbers and proper nouns that occur in none of the sources."""
    haystack = _norm("\n".join(sources))
    return [s for s in specifics(reply) if s not in haystack]


def malformed_parts(reply: str, sources: Sequence[str] = ()) -> list[str]:
    """What makes a reply malformed Japanese (see the module docstring); [] when it reads as Japanese."""
    text = _norm(reply)
    haystack = _norm("\n".join(sources)).lower()
    out = _FOREIGN_SCRIPT.findall(text)
    out += [w for w in _LATIN_WORD.findall(text) if w.lower() not in haystack]
    out += [m.group(1) for m in _REPEAT.finditer(text) if len(set(m.group(1))) > 1]  # not 「ははは…」
    return out
