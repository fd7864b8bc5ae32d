"""Character-card text: format constants, {{char}}/{{user}} macros, mes_example, style heuristics, ids.

The heuristics (style.examples, style.first_person, style.markers, question-like keys) are described in
rag_persona.knowledge.cards' module docstring; everything here is pure text in, text out.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable

# rag_persona.prompts.PERSONA_FILE: prompts sits above knowledge in the import layers, so it is named again.
PERSONA_FILE = "persona.json"
DIALOGUES_FILE = "dialogues.jsonl"
# What a card has and a persona folder has no place for, kept beside it so an export gives it back.
EXTRAS_FILE = "card_extras.json"
# The card fields no part of a persona folder takes: kept in EXTRAS_FILE, written back by the export.
CARD_ONLY_FIELDS = (
    "post_history_instructions",
    "alternate_greetings",
    "group_only_greetings",
    "tags",
    "creator",
    "character_version",
    "creator_notes",
    "nickname",
    "assets",
)
MAX_CARD_BYTES = 10 * 1024 * 1024  # a card file (JSON or PNG), read or written
MAX_BOOK_ENTRIES = 5000  # lorebook entries, read or written
EXPORT_DIALOGUES = 20
EXTENSION_KEY = "rag_persona"  # data.extensions / entry extensions key of what only rag-persona uses
V1_FIELDS = ("name", "description", "personality", "scenario", "first_mes", "mes_example")
STYLE_TEXTS = ("register", "first_person", "instruction")  # rag_persona.prompts.Style's fields, in order
STYLE_LISTS = ("endings", "examples", "markers")
MAX_EXAMPLES = 8
MAX_MARKERS = 12
MAX_ID_CHARS = 64
MAX_QUESTION_CHARS = 40
DEFAULT_USER_NAME = "あなた"

FIRST_PERSONS = (
    "わたくし", "わたし", "あたし", "アタシ", "あたい", "拙者", "それがし", "吾輩", "我輩", "わらわ",
    "おいら", "オイラ", "ウチ", "うち", "ボク", "僕", "ぼく", "オレ", "俺", "おれ", "わし", "儂", "私",
)  # fmt: skip
KNOWN_ENDINGS = (
    # 関西弁
    "やで", "やん", "やんか", "ねん", "へん", "やろ", "やな", "やねん", "さかい", "ちゃう", "まへん", "はる",
    # 古風・武士・老人
    "でござる", "ござる", "ござらぬ", "ござらん", "ござろう", "であろう", "じゃな", "じゃろう", "のじゃ",
    "おる", "せぬ", "らぬ", "候", "なり", "のう",
    # タメ口・若者
    "じゃん", "だよ", "だね", "よね", "だよね", "っしょ", "だし", "だろ", "かよ", "っす", "ッス", "もん",
    # お嬢様
    "ですわ", "ますわ", "ですの", "ますの", "かしら", "わね", "わよ", "ですこと",
    # 方言・キャラ語尾
    "だべ", "だっぺ", "ばい", "けん", "じゃけ", "なのだ", "のだ", "にゃ", "ぴょん", "でち", "ちょる",
)  # fmt: skip
NEUTRAL_ENDINGS = frozenset(
    "です ます した せん さい すか ない ある いる する なる れる った って よう から けど ので のに だけ".split()
)
_KNOWN_LONGEST = sorted(KNOWN_ENDINGS, key=len, reverse=True)
_QUESTION_WORDS = (
    "何", "なに", "なん", "どこ", "いつ", "誰", "だれ", "なぜ", "どうして", "どんな", "どう", "いくつ", "いくら",
    "どれ", "どの",
)  # fmt: skip

_CHAR_MACRO = re.compile(r"\{\{\s*char\s*\}\}|<\s*(?:bot|char)\s*>", re.I)
_USER_MACRO = re.compile(r"\{\{\s*user\s*\}\}|<\s*user\s*>", re.I)
_ORIGINAL_MACRO = re.compile(r"\{\{\s*original\s*\}\}", re.I)
_START = re.compile(r"^[ \t]*<start>[ \t]*$", re.I | re.M)
_SENTENCES = re.compile(r"[。．！？!?♪…‥\n]+")
_TRAILING = "、，,。．.！？!?…‥〜~ー－―♪☆★♡♥wWｗ」』）)】〕>＞\"'*＊ 　"
_PARTICLES = tuple("よねなぞかわさ")
_KANA_TAIL = re.compile(r"[ぁ-ゖァ-ヺー]+$")
_SMALL = set("ぁぃぅぇぉゃゅょっゎんァィゥェォャュョッン")
_SENTENCE_END = tuple("。！？!?．.」』）)")
_FIRST_PERSON = re.compile(
    "|".join(
        (rf"(?<![ぁ-ゖ]){p}" if re.fullmatch("[ぁ-ゖ]+", p) else rf"(?<![ァ-ヺ]){p}")
        if re.fullmatch("[ぁ-ゖァ-ヺ]+", p)
        else p
        for p in FIRST_PERSONS
    )
)


def resolve_macros(text: str, char: str, user: str = DEFAULT_USER_NAME) -> str:
    """{{char}} / <BOT> / <CHAR> → char, {{user}} / <USER> → user (any case); {{original}} dropped."""
    text = _ORIGINAL_MACRO.sub("", text)
    return _USER_MACRO.sub(lambda _: user, _CHAR_MACRO.sub(lambda _: char, text))


def split_examples(mes_example: str, names: Iterable[str] = ()) -> list[list[tuple[str, str]]]:
    """mes_example as <START> blocks of ("char" | "user", text) lines, macros not yet resolved."""
    alts = [r"\{\{\s*(?:char|user)\s*\}\}", r"<\s*(?:bot|char|user)\s*>", *(re.escape(n) for n in names if n)]
    speaker = re.compile(rf"^\s*({'|'.join(alts)})\s*[:：]\s*(.*)$", re.I)
    blocks = []
    for raw in _START.split(mes_example.replace("\r\n", "\n")):
        lines: list[list[str]] = []
        for line in raw.split("\n"):
            m = speaker.match(line)
            if m:
                lines.append(["user" if _USER_MACRO.fullmatch(m.group(1)) else "char", m.group(2)])
            elif lines:  # a line without a speaker continues the one before
                lines[-1][1] += "\n" + line
        blocks.append([(who, text.strip()) for who, text in lines])
    return blocks


def dedupe(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def example_dialogues(
    blocks: list[list[tuple[str, str]]], fix: Callable[[str], str]
) -> tuple[list[list[dict]], list[str]]:
    """Conversations (user line answered by the character) and the style examples (see the module doc)."""
    conversations, answers, others = [], [], []
    for block in blocks:
        turns, previous = [], None
        for who, raw in block:
            text = fix(raw).strip()
            if not text:
                previous = None
                continue
            if who == "char" and previous and previous[0] == "user":
                turns.append({"user": previous[1], "styled": text, "plain": text, "facts": []})
                answers.append(text)
            elif who == "char":
                others.append(text)
            previous = (who, text)
        if turns:
            conversations.append(turns)
    return conversations, dedupe(answers + others)[:MAX_EXAMPLES]


def _ending(text: str) -> tuple[str, bool] | None:
    """A sentence's ending and whether it is a KNOWN_ENDINGS one (None: no usable ending).

    A known ending may be followed by one sentence-final particle (「でござるよ」 counts as 「でござる」).
    """
    for candidate in (text, text[:-1] if text.endswith(_PARTICLES) else None):
        known = next((k for k in _KNOWN_LONGEST if candidate and candidate.endswith(k)), None)
        if known:
            return known, True
    tail = _KANA_TAIL.search(text)
    if tail is None or len(tail.group()) < 2:
        return None
    kana = tail.group()
    ending = kana[-3:] if kana[-2] in _SMALL and len(kana) >= 3 else kana[-2:]
    return None if ending in NEUTRAL_ENDINGS or ending[-2:] in NEUTRAL_ENDINGS else (ending, False)


def derive_markers(examples: Iterable[str]) -> list[str]:
    """Register markers from the examples' sentence endings (the heuristic of the module docstring)."""
    counts: dict[str, int] = {}
    known: set[str] = set()
    for example in examples:
        for sentence in _SENTENCES.split(example):
            found = _ending(sentence.rstrip(_TRAILING))
            if found:
                counts[found[0]] = counts.get(found[0], 0) + 1
                if found[1]:
                    known.add(found[0])
    return [e for e, n in counts.items() if e in known or n >= 2][:MAX_MARKERS]


def detect_first_person(texts: Iterable[str]) -> str:
    """The most frequent FIRST_PERSONS pronoun in the texts ('' when none); ties go to the first seen."""
    counts: dict[str, int] = {}
    for text in texts:
        for m in _FIRST_PERSON.finditer(text):
            counts[m.group()] = counts.get(m.group(), 0) + 1
    return max(counts, key=counts.__getitem__) if counts else ""


def is_question(key: str) -> bool:
    """A lorebook key that reads as a question: ends in ?/？, or ends in か/の with a question word in it."""
    key = key.strip()
    if not 2 <= len(key) <= MAX_QUESTION_CHARS:
        return False
    return key.endswith(("?", "？")) or (
        key.endswith(("か", "の")) and any(w in key for w in _QUESTION_WORDS)
    )


def one_line(text: str) -> str:
    """Lines joined into one: directly after a Japanese sentence end, else with a space."""
    out = ""
    for line in (part.strip() for part in text.split("\n")):
        if line:
            out = line if not out else out + ("" if out.endswith(_SENTENCE_END) else " ") + line
    return out


def sentence(label: str, text: str) -> str:
    text = one_line(text)
    if not text:
        return ""
    return (f"{label}：" if label else "") + text + ("" if text.endswith(_SENTENCE_END) else "。")


def slug(text: str, ascii_only: bool = False) -> str:
    """An id from free text, idempotent: NFKC, runs of characters other than word characters, '.' and '-'
    → '-'; with ascii_only (persona ids) lower case and only a-z, 0-9, '_', '.', '-' kept."""
    text = unicodedata.normalize("NFKC", text)
    if ascii_only:
        text = text.lower()
    text = re.sub(r"[^a-z0-9_.-]+" if ascii_only else r"[^\w.-]+", "-", text)
    text = re.sub(r"-{2,}", "-", text).strip("-_.")
    return text[:MAX_ID_CHARS].rstrip("-_.")


def unique_id(base: str, used: set[str]) -> str:
    candidate, n = base, 1
    while candidate in used:
        n += 1
        suffix = f"-{n}"
        candidate = base[: MAX_ID_CHARS - len(suffix)].rstrip("-_.") + suffix
    used.add(candidate)
    return candidate
