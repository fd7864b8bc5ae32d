"""SillyTavern character cards (V1/V2/V3, JSON or PNG) to persona folders and back.

Card → persona folder (`load_card`, then `card_to_persona`), every text after macro resolution ({{char}},
<BOT>, <CHAR> → the card's name (V3: its nickname); {{user}}, <USER> → `user_name`, default 「あなた」;
case-insensitive; {{original}} dropped; other macros kept as written):

- persona.json (the schema of rag_persona.prompts.Persona): ``id`` (--id, else the id a rag-persona export
  stored, else a lower-case ASCII slug of the name or of the file name, else "card-" + a hash of the name;
  persona ids are letters, digits, '_', '.', '-', so a card cannot choose a path); ``name``; ``summary`` =
  description, then personality (「性格：…」), scenario (「場面：…」) and system_prompt, on one line;
  ``greeting`` = first_mes; ``style.examples`` (the first MAX_PROMPT_EXAMPLES), ``style.first_person``,
  ``style.markers`` and ``style.endings`` (the first MAX_PROMPT_ENDINGS markers) from mes_example (below),
  no ``style.instruction``, so the prompt's style line is rendered from them (first person, endings,
  example lines) — an instruction would replace it. A card written by `persona_to_card` carries
  data.extensions.rag_persona (id, reading, style, reply_length): its style is taken instead of the
  derived one, the summary is the description, and ``style.instruction`` = the other two of personality
  and scenario plus system_prompt (what the export wrote there).
- facts.jsonl: one fact per enabled character_book entry: ``text`` = content (leading @@decorator lines
  dropped; a content over RAG_PERSONA_MAX_FACT_CHARS is cut at paragraph, line and sentence ends into
  facts ``<id>``, ``<id>-part2``, … with the same keys, with a warning), ``keywords`` = keys, plus
  secondary_keys unless the entry is ``selective`` (then they only filter what the keys find),
  ``questions`` = the question-like keys (`is_question`), ``constant: true`` for constant entries (questions and tags come back from the entry's
  extensions.rag_persona when a rag-persona export put them there). Ids: slug of the entry's name, else
  comment, else "entry-<id>", else "entry-<position>", made unique with -2, -3, … Disabled entries are
  skipped, and so are entries whose content is empty (the V3 spec says an empty entry adds nothing to the
  prompt): both are counted, the empty ones with a warning.
- dialogues.jsonl: one conversation per <START> block of mes_example that holds a user line answered by
  the character: turns ``{"user", "styled", "plain", "facts": []}``; a card has no plain-register version
  of the lines, so "plain" repeats "styled".

mes_example: a line "{{char}}:" / "<BOT>:" / "<name>:" (":" or "：") starts a character line, "{{user}}:" /
"<USER>:" a user line, other lines continue the line before. style.examples: the character lines that answer
a user line, then the others, in card order, without repeats, at most MAX_EXAMPLES. style.first_person: the
most frequent pronoun of FIRST_PERSONS in those lines and the greeting (a kana pronoun must not follow
kana of its own script, so 「そのうち」 is no 「うち」). style.markers (the substrings the persona metrics
count as in register): per sentence of the examples, the ending after stripping punctuation, symbols and
closing brackets; a KNOWN_ENDINGS entry it ends with (or ends with before one final よ/ね/な/ぞ/か/わ/さ)
counts at once, otherwise its last two kana (three when the two start with a small kana or ん) count when
they appear in two or more sentences and are not a NEUTRAL_ENDINGS form. Always written, possibly []
(a persona without markers is not scored for register, rather than by the お嬢様 default).
A card with no description, personality or scenario gets the summary 「<name>のキャラクター。」.

Refused, as one RagPersonaError line naming the file (and PNG chunk) and the field, before anything is
written: a file over MAX_CARD_BYTES, neither PNG nor JSON, not a card object, an unknown spec, a PNG
without a chara/ccv3 chunk or with broken base64/JSON in it, an empty name, a field of the wrong type, a
lorebook over MAX_BOOK_ENTRIES entries.

card_extras.json (EXTRAS_FILE, only when there is something to keep): what no other part of a persona folder
takes, as the card wrote it (CARD_ONLY_FIELDS such as alternate_greetings, post_history_instructions, tags;
other tools' extensions; lorebook settings; each entry's fields beyond the fact's, such as position,
priority, secondary_keys of a selective entry, under each fact's id; the disabled and empty entries). Chat does
not read it (a warning names what it holds); the export lays it back into the card.

Persona folder → card (`persona_to_card`): a chara_card_v3 JSON (V1 fields mirrored at the top level,
every V2 data field present) or a PNG placeholder image holding it base64-encoded in a ``ccv3`` tEXt chunk
and the V2 form in ``chara``. name, description = summary, first_mes = greeting, system_prompt =
style.instruction, mes_example = the first EXPORT_DIALOGUES conversations plus the examples they do not
contain, one lorebook entry per fact (keys = keywords + questions, constant kept, name = comment = fact
id; questions and tags also in the entry's extensions.rag_persona), with card_extras.json laid back in.
Lost on the way: plain answers, dialogue fact ids, the adapter. A persona of more than MAX_BOOK_ENTRIES
facts is refused (it would not read back). Reading a card: rag_persona.knowledge.card_read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rag_persona.errors import RagPersonaError
from rag_persona.knowledge.card_export import (
    ENTRY_DEFAULTS,
    EXPORT_NOTE,
    CardExport,
    build_card,
    persona_to_card,
)
from rag_persona.knowledge.card_read import BookEntry, Card, field_error, load_card, parse_card
from rag_persona.knowledge.card_text import (
    CARD_ONLY_FIELDS,
    DEFAULT_USER_NAME,
    DIALOGUES_FILE,
    EXTENSION_KEY,
    EXTRAS_FILE,
    MAX_BOOK_ENTRIES,
    MAX_CARD_BYTES,
    MAX_ID_CHARS,
    PERSONA_FILE,
    STYLE_LISTS,
    STYLE_TEXTS,
    dedupe,
    derive_markers,
    detect_first_person,
    example_dialogues,
    is_question,
    one_line,
    resolve_macros,
    sentence,
    slug,
    split_examples,
    unique_id,
)
from rag_persona.knowledge.facts import FACTS_FILE, Fact, parse_fact, write_facts
from rag_persona.settings import get_settings
from rag_persona.utils.io import atomic_folder, write_json, write_jsonl

__all__ = [
    "MAX_BOOK_ENTRIES",
    "MAX_CARD_BYTES",
    "BookEntry",
    "Card",
    "CardExport",
    "PersonaFolder",
    "build_card",
    "card_to_persona",
    "convert_card",
    "load_card",
    "parse_card",
    "persona_to_card",
    "write_persona_folder",
]

_BOOK_SETTINGS = ("scan_depth", "token_budget", "recursive_scanning", "extensions")
# Entry fields a fact carries (the export writes them again); the others are kept in EXTRAS_FILE.
_ENTRY_MAPPED = ("keys", "content", "enabled", "constant", "name", "comment", "id", "extensions")


def _set(value) -> bool:
    return value not in (None, "", [], {}, False)


def _others(extensions) -> dict:
    """An extensions object without rag-persona's own key (other tools' data, kept as it is)."""
    return {k: v for k, v in extensions.items() if k != EXTENSION_KEY} if isinstance(extensions, dict) else {}


def _card_extras(card: Card, entry_facts: dict[int, list[str]]) -> dict:
    """What the card has and a persona folder has no place for (EXTRAS_FILE): fields such as alternate
    greetings and tags, other tools' extensions, lorebook settings, each entry's own fields (under the id
    of every fact it became) and the entries that became no fact (disabled or empty). Texts stay as
    written, macros unresolved."""
    data = card.raw
    ours = str(data.get("creator_notes", "")).startswith(EXPORT_NOTE)  # it only says who exported it
    out: dict = {
        k: data[k] for k in CARD_ONLY_FIELDS if _set(data.get(k)) and not (ours and k == "creator_notes")
    }
    if _others(card.extensions):
        out["extensions"] = _others(card.extensions)
    book = data.get("character_book") if isinstance(data.get("character_book"), dict) else {}
    settings = {k: book[k] for k in _BOOK_SETTINGS if _set(book.get(k))}
    if settings:
        out["character_book"] = settings
    entries = {}
    for entry in card.entries:
        if entry.index not in entry_facts:
            continue
        kept = {
            k: v for k, v in entry.raw.items() if k not in _ENTRY_MAPPED and ENTRY_DEFAULTS.get(k, ...) != v
        }
        if kept.get("insertion_order") == entry.index:  # what the export writes for it anyway
            kept.pop("insertion_order")
        if not entry.selective:  # their keys joined the fact's keywords, which the export writes as keys
            kept.pop("secondary_keys", None)
        if _others(entry.extensions):
            kept["extensions"] = _others(entry.extensions)
        if kept:
            for fact_id in entry_facts[entry.index]:  # every part of a split entry keeps them
                entries[fact_id] = dict(sorted(kept.items()))  # sorted: stable across round trips
    if entries:
        out["entries"] = entries
    # Without their id: the export numbers them after the facts' entries (so a round trip is stable).
    skipped = [
        {k: v for k, v in e.raw.items() if k != "id"} for e in card.entries if e.index not in entry_facts
    ]
    if skipped:
        out["skipped_entries"] = skipped
    return out


@dataclass
class PersonaFolder:
    """A persona folder before it is written: persona.json's object, facts, dialogues, what was skipped."""

    persona: dict
    facts: list[Fact]
    dialogues: list[dict]
    source: str
    disabled: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)
    split: list[str] = field(default_factory=list)  # "<entry label>: N characters into K facts"
    extras: dict = field(default_factory=dict)  # EXTRAS_FILE: what chat does not use, kept for the export

    @property
    def warnings(self) -> list[str]:
        out = [f"{self.source}: lorebook {label}: empty content, skipped" for label in self.empty]
        out += [f"{self.source}: lorebook {what}" for what in self.split]
        # (nickname is used: it resolved the {{char}} macros)
        kept = [k for k in self.extras if k not in ("entries", "extensions", "character_book", "nickname")]
        kept += [f"extensions.{k}" for k in self.extras.get("extensions", {})]
        kept += [f"character_book.{k}" for k in self.extras.get("character_book", {})]
        if kept:
            out.append(
                f"{self.source}: not used in chat, kept in {EXTRAS_FILE} for the export: {', '.join(kept)}"
            )
        if not self.facts:
            out.append(
                f"{self.source}: no lorebook entry became a fact; add facts to facts.jsonl before indexing"
            )
        return out

    def summary(self, out: str | Path) -> str:
        constant = sum(1 for f in self.facts if f.extra.get("constant"))
        skipped = len(self.disabled) + len(self.empty)
        return (
            f"wrote persona '{self.persona['id']}' ({self.persona['name']}) to {out}: "
            f"{len(self.facts)} facts ({constant} constant), {len(self.dialogues)} example dialogues; "
            f"{skipped} lorebook entries skipped ({len(self.disabled)} disabled, {len(self.empty)} empty)"
        )


# ---- card → persona folder ---------------------------------------------------------------------------


def _entry_id(entry: BookEntry) -> str:
    for text in (entry.name, entry.comment, f"entry-{entry.id}" if entry.id else ""):
        if slug(text):
            return slug(text)
    return f"entry-{entry.index + 1}"


def _string_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value)


def _ours_problem(ours) -> tuple[str, str] | None:
    """(field suffix, problem) for an extensions.rag_persona object rag-persona would not have written."""
    if not isinstance(ours, dict):
        return "", f"expected an object, got {type(ours).__name__}"
    for key, value in ours.items():
        if key == "style":
            if not isinstance(value, dict):
                return ".style", f"expected an object, got {type(value).__name__}"
            for k, v in value.items():
                if not (k in STYLE_TEXTS and isinstance(v, str) or k in STYLE_LISTS and _string_list(v)):
                    return f".style.{k}", "unknown field or wrong type (see rag_persona.prompts.Style)"
        elif key in ("questions", "tags"):
            if not _string_list(value):
                return f".{key}", "expected a list of non-empty strings"
        elif not isinstance(value, str):
            return f".{key}", f"expected a string, got {type(value).__name__}"
    return None


def _ours(obj: dict, where: str, fld: str) -> dict:
    """The rag_persona object a rag-persona export put into an extensions object ({} when absent)."""
    ours = obj.get(EXTENSION_KEY)
    if ours is None:
        return {}
    problem = _ours_problem(ours)
    if problem:
        raise field_error(where, fld + problem[0], problem[1])
    return ours


def _pieces(text: str, limit: int) -> list[str]:
    """A lorebook content cut into facts of at most `limit` characters, at paragraph, line and sentence ends
    first: World Info entries run longer than one retrieved fact should."""
    if len(text) <= limit:
        return [text]
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    splitter = RecursiveCharacterTextSplitter(
        chunk_size=limit,
        chunk_overlap=0,
        separators=["\n\n", "\n", "。", "！", "？", "!", "?", "、", " ", ""],
        keep_separator="end",
    )
    return [p.strip() for p in splitter.split_text(text) if p.strip()]


def _facts(card: Card, fix: Callable[[str], str]):
    """(facts, disabled labels, empty labels, split notes, entry index → the ids of its facts)."""
    facts, disabled, empty, split, used, first = [], [], [], [], set(), {}
    limit = get_settings().max_fact_chars
    for entry in card.entries:
        if not entry.enabled:
            disabled.append(entry.label)
            continue
        lines = entry.content.split("\n")
        while lines and lines[0].lstrip().startswith("@@"):  # CCv3 decorators lead the content
            lines.pop(0)
        text = fix("\n".join(lines)).strip()
        if not text:
            empty.append(entry.label)
            continue
        fld = f"{card.field_prefix}character_book.entries[{entry.index}]"
        secondary = () if entry.selective else entry.secondary_keys
        keywords = dedupe(fix(k).strip() for k in (*entry.keys, *secondary))
        keywords = [k for k in keywords if k]
        ours = _ours(entry.extensions, card.source, f"{fld}.extensions.{EXTENSION_KEY}")
        questions = ours.get("questions", [k for k in keywords if is_question(k)])
        extra = {"keywords": keywords} if keywords else {}
        if entry.constant:
            extra["constant"] = True
        pieces = _pieces(text, limit)
        if len(pieces) > 1:
            split.append(
                f"{entry.label}: {len(text)} characters, over {limit}: split into {len(pieces)} facts"
            )
        base = _entry_id(entry)
        for n, piece in enumerate(pieces, 1):
            part = base[: MAX_ID_CHARS - 8].rstrip("-_.") + f"-part{n}"
            fact_id = unique_id(base if n == 1 else part, used)
            first.setdefault(entry.index, []).append(fact_id)
            row = {
                "id": fact_id,
                "text": piece,
                "questions": questions,
                "tags": ours.get("tags", []),
                **extra,
            }
            facts.append(parse_fact(Path(card.source), entry.index, row, limit))
    return facts, disabled, empty, split, first


# How much of the derived style the prompt shows: a few endings and example lines (the metrics use all markers).
MAX_PROMPT_ENDINGS = 5
MAX_PROMPT_EXAMPLES = 4


def _style(ours: dict, examples: list[str], greeting: str, instruction: str) -> dict:
    if "style" in ours:
        style = {k: v for k, v in ours["style"].items() if k != "instruction"}
    else:
        markers = derive_markers(examples)
        style = {
            "first_person": detect_first_person([*examples, greeting]),
            "endings": markers[:MAX_PROMPT_ENDINGS],
            "examples": examples[:MAX_PROMPT_EXAMPLES],
            "markers": markers,
        }
    style["instruction"] = instruction
    # Style.to_dict's order; markers stay even when empty: [] means "no register", absent means the endings.
    return {
        k: style[k] for k in (*STYLE_TEXTS, *STYLE_LISTS) if style.get(k) or k == "markers" and k in style
    }


def convert_card(
    card: Card, persona_id: str | None = None, user_name: str = DEFAULT_USER_NAME
) -> PersonaFolder:
    """The persona folder's contents for a card (nothing written; see the module docstring)."""
    if persona_id is not None and not persona_id.strip():
        raise RagPersonaError("persona id: empty")
    char = card.nickname.strip() or card.name

    def fix(text: str) -> str:
        return resolve_macros(text, char, user_name)

    ours = _ours(card.extensions, card.source, f"{card.field_prefix}extensions.{EXTENSION_KEY}")
    blocks = split_examples(card.mes_example, (card.name, card.nickname))
    conversations, examples = example_dialogues(blocks, fix)
    parts = {k: one_line(fix(getattr(card, k))) for k in ("description", "personality", "scenario")}
    summary_key = next((k for k, v in parts.items() if v), None)
    labels = {"personality": "性格", "scenario": "場面"}
    instruction = "".join(sentence(labels[k], parts[k]) for k in labels if k != summary_key)
    instruction += sentence("", fix(card.system_prompt))
    if "style" not in ours:
        # A card from elsewhere: its texts describe the character, so they join the summary, and the style
        # line is rendered from first person, endings and example lines (an instruction would replace it,
        # and the model would never see how the character talks).
        summary_text = " ".join(
            t for t in [parts[summary_key] if summary_key else "", instruction] if t
        ).replace("。 ", "。")
        parts = {**parts, summary_key or "description": summary_text}
        summary_key, instruction = summary_key or ("description" if summary_text else None), ""
    greeting = fix(card.first_mes).strip()
    persona = {
        "id": (persona_id or "").strip()
        or ours.get("id")
        or slug(card.name, ascii_only=True)
        or slug(card.path.stem, ascii_only=True)
        or "card-" + hashlib.sha256(card.name.encode("utf-8")).hexdigest()[:8],  # 「花子.png」: no ASCII
        "name": card.name,
        "reading": ours.get("reading", ""),
        "summary": parts[summary_key] if summary_key else f"{card.name}のキャラクター。",
        "greeting": greeting,
        "style": _style(ours, examples, greeting, instruction),
        "reply_length": ours.get("reply_length", ""),
    }
    persona = {k: v for k, v in persona.items() if v or k == "style"}
    facts, disabled, empty, split, first = _facts(card, fix)
    dialogues = [{"id": f"ex{n:04d}", "kind": "example", "turns": t} for n, t in enumerate(conversations, 1)]
    extras = _card_extras(card, first)
    return PersonaFolder(persona, facts, dialogues, card.source, disabled, empty, split, extras)


def write_persona_folder(folder: PersonaFolder, out_dir: str | Path) -> Path:
    """Write persona.json, facts.jsonl, dialogues.jsonl (and card_extras.json) whole or not at all; a non-empty folder that
    is not a persona folder (no persona.json) is refused, an earlier persona folder is replaced whole."""
    with atomic_folder(out_dir, marker=PERSONA_FILE, what="a persona folder") as work:
        write_json(work / PERSONA_FILE, folder.persona)
        write_facts(work / FACTS_FILE, folder.facts)
        write_jsonl(work / DIALOGUES_FILE, folder.dialogues)
        if folder.extras:
            write_json(work / EXTRAS_FILE, folder.extras)
    return Path(out_dir)


def card_to_persona(
    card: Card,
    out_dir: str | Path,
    persona_id: str | None = None,
    user_name: str = DEFAULT_USER_NAME,
    validate: Callable[[dict], object] | None = None,
) -> PersonaFolder:
    """Convert a card and write its persona folder; `validate(persona_dict)` may refuse it before writing
    (the CLI passes rag_persona.prompts.Persona.from_dict, which this layer cannot import)."""
    folder = convert_card(card, persona_id, user_name)
    if validate is not None:
        validate(folder.persona)
    write_persona_folder(folder, out_dir)
    return folder
