"""Persona metrics: register (style), length, sentences, EOS, leaked special-token text, facts, off-topic.

A reply is in register when it holds one of the persona's style markers (persona.json style.markers, see
`Persona.markers`); callers that name no markers get the お嬢様 markers, the project's default register, whose
list lives here and nowhere else (knowledge/ojousama/persona.json carries the same list, pinned by a test).
Every check is a plain, documented rule so a score can be explained by pointing at the reply.
"""

from __future__ import annotations

import re
import statistics
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

from rag_persona.evaluation.grounding import invented_specifics, malformed_parts, names_itself
from rag_persona.utils.text import morphemes

# -- お嬢様言葉 markers (the one list) ------------------------------------------------------------------
# Sentence endings and words of the register (../shared/REFERENCE.md). Deliberately left out: bare
# 「ございます」 (ありがとうございます is ordinary keigo), bare 「てよ」 (待ってよ is casual), bare 「わ」.
OJOUSAMA_ENDINGS: tuple[str, ...] = (
    "ですわ",
    "ますわ",
    "でしたわ",
    "ましたわ",
    "ませんわ",
    "ですの",
    "ますの",
    "でしたの",
    "ましたの",
    "ませんの",
    "わね",
    "わよ",
    "でしてよ",
    "ましてよ",
    "ですこと",
    "かしら",
    "でございます",
    "ございますわ",
    "ございますの",
)
OJOUSAMA_WORDS: tuple[str, ...] = ("ごきげんよう", "ご機嫌よう", "わたくし")
OJOUSAMA_MARKERS: tuple[str, ...] = OJOUSAMA_ENDINGS + OJOUSAMA_WORDS

# -- literal special-token text ------------------------------------------------------------------------
# Replies are decoded with special tokens skipped, so any of these in a reply is *text* the model printed.
_SPECIAL_LITERALS = (
    "</s>",
    "<s>",
    "<eos>",
    "<bos>",
    "<pad>",
    "<unk>",
    "[INST]",
    "[/INST]",
    "<start_of_turn>",
    "<end_of_turn>",
)
SPECIAL_TEXT_RE = re.compile(
    "|".join(
        [re.escape(s) for s in _SPECIAL_LITERALS] + [r"<\|[A-Za-z0-9_]{1,40}\|>", r"<\uff5c[^>]{1,40}\uff5c>"]
    )
)


def special_token_texts() -> tuple[str, ...]:
    """Literal special-token strings of well-known tokenizer families."""
    return _SPECIAL_LITERALS + (
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|eot_id|>",
        "<|end_of_text|>",
        "<|begin_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|end|>",
    )


def leaked_special_text(text: str, extra: Iterable[str] = ()) -> list[str]:
    found = SPECIAL_TEXT_RE.findall(text)
    found += [s for s in extra if s and s in text and s not in found]
    return found


# -- per reply --------------------------------------------------------------------------------------------
_SENTENCE_END = re.compile(r"[。．！？!?]+[」』）)]*|\n+")


def style_markers(text: str, markers: Sequence[str] | None = None) -> list[str]:
    """The markers (default: the お嬢様 markers) found in the text, in list order."""
    return [m for m in (OJOUSAMA_MARKERS if markers is None else markers) if m in text]


def in_register(text: str, markers: Sequence[str] | None = None) -> bool:
    return bool(style_markers(text, markers))


def is_ojousama(text: str) -> bool:
    return in_register(text)


# 「ですの」「ますの」… followed by 「で」 are ordinary 「〜ますので」, not the お嬢様 ending (foreign check only).
_FOREIGN = {m: re.compile(re.escape(m) + ("(?!で)" if m.endswith("の") else "")) for m in OJOUSAMA_MARKERS}


def foreign_markers(text: str, markers: Sequence[str] | None = None) -> list[str]:
    """お嬢様 markers in the reply of a persona whose own markers do not include them: a non-お嬢様 persona
    slipping into the register the shipped adapter was trained on (none for the お嬢様 herself).

    Stricter than `style_markers`: 「ですの」「ますの」… followed by 「で」 are ordinary 「〜ますので」 and
    do not count (the style rate keeps its old rule so earlier results stay comparable).
    """
    own = set(OJOUSAMA_MARKERS if markers is None else markers)
    return [m for m in OJOUSAMA_MARKERS if m not in own and _FOREIGN[m].search(text)]


def char_length(text: str) -> int:
    """Characters, not counting whitespace."""
    return sum(1 for ch in text if not ch.isspace())


def sentence_count(text: str) -> int:
    """Sentences split at 。！？!? and line breaks; a trailing fragment without a mark counts as one."""
    parts = [p for p in _SENTENCE_END.split(text.strip()) if p.strip(" 　「」『』（）()…・〜~♪")]
    return len(parts)


@dataclass
class ReplyMetrics:
    style: bool | None  # None: the persona has no style markers, so there is no register to check
    markers: list[str]
    chars: int
    sentences: int
    ended_by_eos: bool
    leaked: list[str]
    foreign: list[str] = field(default_factory=list)  # お嬢様 markers a non-お嬢様 persona used

    def to_dict(self) -> dict:
        return asdict(self)


def reply_metrics(
    text: str, ended_by_eos: bool, extra_special: Iterable[str] = (), markers: Sequence[str] | None = None
) -> ReplyMetrics:
    """The per-reply checks; `markers` are the persona's style markers (None: the お嬢様 markers)."""
    found = style_markers(text, markers)
    no_register = markers is not None and not markers
    return ReplyMetrics(
        style=None if no_register else bool(found),
        markers=found,
        chars=char_length(text),
        sentences=sentence_count(SPECIAL_TEXT_RE.sub("", text)),  # a leak is counted once, as a leak
        ended_by_eos=bool(ended_by_eos),
        leaked=leaked_special_text(text, extra_special),
        foreign=foreign_markers(text, markers),
    )


# -- facts ----------------------------------------------------------------------------------------------
# Fact accuracy: does the reply carry the key information of a golden fact? The key of a fact is
#   * the numbers in it (NFKC; 17歳 → 17, 4月3日 → 4, 3) that the question does not already contain: when
#     there are any, all of them must appear in the reply; otherwise
#   * its content words (Sudachi mode C nouns, verbs, adjectives in normalised form), minus words the question
#     already contains, readings in brackets and the persona's own name (kept only when the fact is about
#     the name), of which at least half must appear in the reply (surface or normalised form).
# It is a "mentions the key content" check: a reply that negates a fact with its words still counts.
# A compound key word (神奈川県鎌倉市) is also found when all its short units are (「神奈川県の鎌倉市」).
# With a reference reply (held-out dialogue turns carry one), the key is only what the reference takes from
# the fact: a question about one part of a fact (「お父さんも音楽家？」 of 「父は…50歳で小野寺商事の社長」)
# is answered by that part, and the full-fact key judged 31% of the reference replies themselves wrong.
# A reply is correct when it matches at least one of its golden facts. Off-topic handling uses the same
# key to tell whether a reply repeats an (irrelevant) retrieved fact.
_BRACKETS = re.compile(r"[（(][^）)]*[）)]")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_GENERIC = {
    "こと",
    "もの",
    "よう",
    "ため",
    "とき",
    "方",
    "私",
    "わたくし",
    "自分",
    "好き",
    "する",
    "ある",
    "いる",
    "なる",
}


def _norm(text: str) -> str:
    return unicodedata.normalize("NFKC", text).lower()


_CONTENT_POS = ("名詞", "動詞", "形容詞", "形状詞")


def _default_tokens(text: str) -> list[str]:
    """Sudachi (mode C, whole names) content words in normalised form."""
    out = []
    for m in morphemes(text, "C"):
        pos = m.part_of_speech()
        if pos[0] not in _CONTENT_POS or pos[1] in ("非自立可能", "数詞") or "代名詞" in pos[0]:
            continue
        form = m.normalized_form().lower()
        if form.strip():
            out.append(form)
    return out


@dataclass
class FactKey:
    fact_id: str
    numbers: list[str]
    words: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def fact_key(
    fact_id: str,
    fact_text: str,
    query: str = "",
    persona_words: Iterable[str] = (),
    tokens: Callable[[str], list[str]] | None = None,
    reference: str = "",
) -> FactKey:
    """The numbers and content words a reply must carry to state the fact (rules above); with a
    `reference` reply, only those the reference carries (the full key when it carries none)."""
    tokens = tokens or _default_tokens
    text = _norm(_BRACKETS.sub("", fact_text))
    q = _norm(query)
    query_words = set(tokens(q)) if q else set()
    persona = {_norm(w) for w in persona_words}
    numbers = [n for n in dict.fromkeys(_NUMBER.findall(text)) if n not in _NUMBER.findall(q)]
    candidates = [
        w for w in dict.fromkeys(tokens(text)) if _meaningful(w) and w not in query_words | _GENERIC
    ]
    words = [w for w in candidates if w not in persona]
    if not words and not numbers:
        words = candidates  # a fact about the persona herself (her name): her name is the key
    if reference:
        # What the reference states of the fact, the persona's own name included (a name question's answer).
        ref = _norm(reference)
        ref_words = set(tokens(ref))
        taken = FactKey(
            fact_id,
            [n for n in numbers if n in set(_NUMBER.findall(ref))],
            [w for w in candidates if _holds(w, ref, ref_words)],
        )
        if taken.numbers or taken.words:
            return taken
    return FactKey(fact_id, numbers, words)


def _holds(word: str, text: str, text_words: set[str]) -> bool:
    """Whether normalised text holds a key word: as written, as a normalised token, or (a compound) every
    one of its short units."""
    if word in text or word in text_words:
        return True
    parts = [m.surface() for m in morphemes(word, "A")]
    return len(parts) > 1 and all(part in text for part in parts)


def _meaningful(word: str) -> bool:
    """Drop numbers and one-character kana/latin words; keep one-kanji nouns (雷, 猫)."""
    if _NUMBER.fullmatch(word):
        return False
    return len(word) > 1 or unicodedata.name(word, "").startswith("CJK UNIFIED")


def key_coverage(key: FactKey, reply: str, tokens: Callable[[str], list[str]] | None = None) -> float:
    """Share of the key the reply holds: all of the numbers when the fact has any, else its words."""
    tokens = tokens or _default_tokens
    r = _norm(reply)
    if key.numbers:
        found = set(_NUMBER.findall(r))
        return sum(1 for n in key.numbers if n in found) / len(key.numbers)
    if not key.words:
        return 0.0
    reply_words = set(tokens(r)) if r else set()
    hit = sum(1 for w in key.words if _holds(w, r, reply_words))
    return hit / len(key.words)


def states_fact(key: FactKey, reply: str, tokens: Callable[[str], list[str]] | None = None) -> bool:
    """Every number of the fact, or (no numbers) at least half of its key words."""
    need = 1.0 if key.numbers else 0.5
    return bool(key.numbers or key.words) and key_coverage(key, reply, tokens) >= need


# -- off-topic ----------------------------------------------------------------------------------------------
# A request the persona should decline or deflect (code, translation, long tasks) is "done" when the reply
# looks like the task's product: code fences or code syntax, or a long multi-sentence answer.
_TASK_OUTPUT = re.compile(
    r"```|\bdef |\bimport |\bprint\(|\breturn\b|#include|\bSELECT\b|\bfunction\b|[{};]\s*$", re.M
)


def does_task(reply: str) -> bool:
    return bool(_TASK_OUTPUT.search(reply)) or char_length(reply) > 120


@dataclass
class PromptResult:
    """One evaluated prompt: what was asked, what came back, and its checks."""

    query: str
    reply: str
    ended_by_eos: bool
    context_ids: list[str]
    golden_ids: list[str] = field(default_factory=list)
    kind: str = ""
    metrics: ReplyMetrics | None = None
    fact_correct: bool | None = None
    offtopic_ok: bool | None = None
    new_tokens: int = 0
    seconds: float = 0.0
    identity_ok: bool | None = None  # prompts of kind "identity": the reply names the persona
    invented: list[str] = field(default_factory=list)  # numbers / proper nouns found in no source
    malformed: list[str] = field(default_factory=list)  # foreign script, stray Latin, doubled phrases

    def to_dict(self) -> dict:
        out = asdict(self)
        out["metrics"] = self.metrics.to_dict() if self.metrics else None
        return out


def judge(
    result: PromptResult,
    facts: dict[str, str],
    *,
    persona_words: Iterable[str] = (),
    extra_special: Iterable[str] = (),
    tokens: Callable[[str], list[str]] | None = None,
    markers: Sequence[str] | None = None,
    identity: tuple[str, str] | None = None,
    sources: Sequence[str] = (),
    reference: str = "",
) -> PromptResult:
    """Fill in metrics, fact correctness (golden prompts) and off-topic handling (no golden fact), and the
    grounding checks (rag_persona.evaluation.grounding).

    `markers`: the persona's style markers (None: the お嬢様 markers). An off-topic reply is handled when it
    is in register (unless the persona has no markers), repeats no retrieved fact and does not do the task.
    `identity`: the persona's (name, reading), checked on prompts of kind "identity". `sources`: texts a
    reply may take specifics from besides the knowledge (`facts`) and the query: the conversation, the
    persona's own description. `reference`: the prompt's reference reply; golden facts are keyed on what
    it takes from them (`fact_key`).
    """
    result.metrics = reply_metrics(result.reply, result.ended_by_eos, extra_special, markers)
    grounded = [*facts.values(), result.query, *sources]
    result.invented = invented_specifics(result.reply, grounded)
    result.malformed = malformed_parts(result.reply, grounded)
    if identity is not None and result.kind == "identity":
        result.identity_ok = names_itself(result.reply, *identity)
    persona_words = list(persona_words)
    if result.golden_ids:
        keys = [
            fact_key(fid, facts[fid], result.query, persona_words, tokens, reference)
            for fid in result.golden_ids
            if fid in facts
        ]
        result.fact_correct = any(states_fact(k, result.reply, tokens) for k in keys)
        result.offtopic_ok = None
    else:
        keys = [
            fact_key(fid, facts[fid], result.query, persona_words, tokens)
            for fid in result.context_ids
            if fid in facts
        ]
        repeats_context = any(states_fact(k, result.reply, tokens) for k in keys)
        in_style = result.metrics.style is not False
        result.offtopic_ok = in_style and not repeats_context and not does_task(result.reply)
        result.fact_correct = None
    return result


def _rate(values: Sequence[bool]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def summarize(results: Sequence[PromptResult], length_range: tuple[int, int] = (15, 45)) -> dict:
    """Rates over all replies; fact accuracy over golden prompts; off-topic handling over the rest.

    style_rate: share of replies in the persona's register (None when it has no markers);
    foreign_register_rate: share of replies holding お嬢様 markers that are not the persona's own.
    """
    ms = [r.metrics for r in results if r.metrics is not None]
    chars = [m.chars for m in ms]
    fact = [bool(r.fact_correct) for r in results if r.fact_correct is not None]
    off = [bool(r.offtopic_ok) for r in results if r.offtopic_ok is not None]
    lo, hi = length_range
    return {
        "n": len(ms),
        "style_rate": _rate([m.style for m in ms if m.style is not None]),
        "foreign_register_rate": _rate([bool(m.foreign) for m in ms]),
        "median_chars": statistics.median(chars) if chars else None,
        "length_in_range_rate": _rate([lo <= c <= hi for c in chars]),
        "one_sentence_rate": _rate([m.sentences == 1 for m in ms]),
        "eos_rate": _rate([m.ended_by_eos for m in ms]),
        "leak_rate": _rate([bool(m.leaked) for m in ms]),
        "fact_accuracy": _rate(fact),
        "n_fact": len(fact),
        "offtopic_handling": _rate(off),
        "n_offtopic": len(off),
        "mean_new_tokens": round(statistics.fmean([r.new_tokens for r in results]), 1) if results else None,
        "identity_accuracy": _rate([r.identity_ok for r in results if r.identity_ok is not None]),
        "n_identity": sum(r.identity_ok is not None for r in results),
        "invented_rate": _rate([bool(r.invented) for r in results]),
        "malformed_rate": _rate([bool(r.malformed) for r in results]),
    }
