"""The one prompt builder: (persona, retrieved facts, history, user turn) → chat messages.

Training data and inference both call `build_messages`, so a model is trained on exactly the
prompt it will see. Nothing else in the project formats prompts.

The template itself is neutral; everything character-specific (name, reading, summary, speech style,
reply length) comes from the persona's persona.json:

    {"id", "name", "reading"?, "summary", "greeting"?,
     "style"?: {"register", "first_person", "endings": [...], "examples": [...], "instruction", "markers": [...]},
     "adapter"?, "reply_length"?}

The system prompt is four lines: who the model is (name, reading, summary), how it speaks (style.instruction
verbatim, else sentences rendered from register / first_person / endings / examples, else a neutral line),
how long a reply is (reply_length), and how to treat the facts that may follow.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rag_persona.errors import RagPersonaError
from rag_persona.utils.io import read_json
from rag_persona.utils.text import unicode_problem

# Bump when the wording or layout changes: data manifests record it, so stale datasets are visible.
# (Version 1's text is what knowledge/ojousama/persona.json still renders, character for character.)
PROMPT_TEMPLATE_VERSION = "1"
MAX_USER_CHARS = 1000
MAX_HISTORY_TURNS = 8
PERSONA_FILE = "persona.json"

IDENTITY = "あなたは{name}（{reading}）です。{summary}"
IDENTITY_NO_READING = "あなたは{name}です。{summary}"
NEUTRAL_STYLE = "{name}らしい自然な口調で話してください。"
DEFAULT_REPLY_LENGTH = "返答は1文、30文字程度にまとめてください。"
CONTEXT_NOTE = (
    "以下に{name}についての情報が与えられることがあります。"
    "質問に関係しない情報も含まれるので、関係のない情報は無視してください。"
)
CONTEXT_HEADER = "【{name}についての情報】"

_STYLE_TEXTS = ("register", "first_person", "instruction")
_STYLE_LISTS = ("endings", "examples", "markers")
_OPTIONAL_TEXTS = ("reading", "greeting", "adapter", "reply_length")
# Ids name folders (build-data's per-persona parts), API models and URLs: a card must not choose a path.
PERSONA_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_PERSONA_KEYS = ("id", "name", "reading", "summary", "greeting", "style", "adapter", "reply_length")


@dataclass(frozen=True)
class Style:
    """How the persona speaks (persona.json "style"); every field is optional.

    `markers` are the substrings that count a reply as in register for the persona metrics; None (the key
    left out) means the endings.
    """

    register: str = ""
    first_person: str = ""
    endings: tuple[str, ...] = ()
    examples: tuple[str, ...] = ()
    instruction: str = ""
    markers: tuple[str, ...] | None = None

    @property
    def register_markers(self) -> tuple[str, ...]:
        return self.endings if self.markers is None else self.markers

    def sentences(self, name: str) -> str:
        """The style line of the system prompt: the instruction verbatim, else rendered from the fields."""
        if self.instruction:
            return self.instruction
        parts = []
        if self.register:
            parts.append(f"口調・物腰・語彙のすべてを{self.register}らしくしてください。")
        if self.first_person:
            parts.append(f"一人称は「{self.first_person}」です。")
        if self.endings:
            parts.append("".join(f"「〜{e}」" for e in self.endings) + "などの語尾で話します。")
        if self.examples:
            parts.append("話し方の例：" + "".join(f"「{x}」" for x in self.examples))
        return "".join(parts) or NEUTRAL_STYLE.format(name=name)

    def to_dict(self) -> dict:
        out: dict = {k: getattr(self, k) for k in _STYLE_TEXTS if getattr(self, k)}
        out.update({k: list(getattr(self, k)) for k in ("endings", "examples") if getattr(self, k)})
        if self.markers is not None:
            out["markers"] = list(self.markers)
        return out


def _bad(where: str, name: str, problem: str) -> RagPersonaError:
    return RagPersonaError(f"{where}: field '{name}': {problem}")


def _text(data: dict, key: str, where: str, prefix: str = "") -> str:
    """An optional string field ('' when absent or null)."""
    value = data.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _bad(where, prefix + key, f"expected a string, got {type(value).__name__}")
    return value


def _texts(data: dict, key: str, where: str, prefix: str = "") -> tuple[str, ...] | None:
    """An optional list of non-empty strings (None when absent)."""
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, list):
        raise _bad(where, prefix + key, f"expected a list of strings, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise _bad(where, f"{prefix}{key}[{i}]", "expected a non-empty string")
    return tuple(value)


def _unknown(data: dict, known: Sequence[str], where: str, prefix: str = "") -> None:
    extra = [k for k in data if k not in known]
    if extra:
        raise _bad(where, prefix + extra[0], f"unknown field; known: {', '.join(known)}")


def parse_style(value, where: str) -> Style | None:
    """Validate persona.json's "style" object (None when absent)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad(where, "style", f"expected an object, got {type(value).__name__}")
    _unknown(value, _STYLE_TEXTS + _STYLE_LISTS, where, "style.")
    texts = {k: _text(value, k, where, "style.") for k in _STYLE_TEXTS}
    lists = {k: _texts(value, k, where, "style.") for k in _STYLE_LISTS}
    return Style(
        **texts, endings=lists["endings"] or (), examples=lists["examples"] or (), markers=lists["markers"]
    )


@dataclass(frozen=True)
class Persona:
    """Who the model plays: loaded from knowledge/<persona>/persona.json (see the module docstring)."""

    id: str
    name: str
    reading: str = ""
    summary: str = ""
    greeting: str = ""
    style: Style | None = None
    adapter: str = ""  # a folder relative to the persona folder, or a shipped adapter's folder name
    reply_length: str = ""  # the length sentence; empty: DEFAULT_REPLY_LENGTH
    folder: Path | None = field(default=None, compare=False, repr=False)  # where persona.json was read

    @classmethod
    def load(cls, path: str | Path) -> Persona:
        path = Path(path)
        if not path.exists() and path.suffix != ".json":
            raise RagPersonaError(f"{path}: no such persona folder")
        file = path / PERSONA_FILE if path.is_dir() else path
        return cls.from_dict(read_json(file, missing="persona file not found"), str(file), folder=file.parent)

    @classmethod
    def from_dict(cls, data, where: str = PERSONA_FILE, folder: Path | None = None) -> Persona:
        """Validate a persona.json object; every problem is one line naming `where` and the field."""
        if not isinstance(data, dict):
            raise RagPersonaError(f"{where}: expected a JSON object, got {type(data).__name__}")
        _unknown(data, _PERSONA_KEYS, where)
        required = {}
        for key in ("id", "name", "summary"):
            value = data.get(key)
            if value is not None and not isinstance(value, str):
                raise _bad(where, key, f"expected a string, got {type(value).__name__}")
            if not (value or "").strip():
                raise _bad(where, key, "missing or empty")
            required[key] = value
        if not PERSONA_ID.fullmatch(required["id"]):
            raise _bad(
                where,
                "id",
                f"{required['id'][:80]!r}: use letters, digits, '_', '.' and '-', starting with a letter or "
                "digit, at most 64 (it names folders and API models)",
            )
        optional = {k: _text(data, k, where) for k in _OPTIONAL_TEXTS}
        return cls(**required, **optional, style=parse_style(data.get("style"), where), folder=folder)

    def to_dict(self) -> dict:
        """The persona.json form (optional fields only when set)."""
        out: dict = {
            k: getattr(self, k) for k in ("id", "name", "reading", "summary", "greeting") if getattr(self, k)
        }
        if self.style is not None:
            out["style"] = self.style.to_dict()
        out.update({k: getattr(self, k) for k in ("adapter", "reply_length") if getattr(self, k)})
        return out

    @property
    def display_name(self) -> str:
        """「name（reading）」, or the name alone when there is no reading."""
        return f"{self.name}（{self.reading}）" if self.reading else self.name

    @property
    def markers(self) -> tuple[str, ...] | None:
        """The substrings that put a reply in this persona's register; None for a persona without a style
        (the persona metrics then use their default, the お嬢様 markers)."""
        return None if self.style is None else self.style.register_markers


@dataclass(frozen=True)
class ContextFact:
    """A retrieved fact as the prompt sees it; the score orders facts and is kept for display."""

    id: str
    text: str
    score: float = 1.0


def system_prompt(persona: Persona) -> str:
    """Identity + summary, style, reply length, and the note on the facts that may follow: one line each."""
    identity = IDENTITY if persona.reading else IDENTITY_NO_READING
    style = (
        persona.style.sentences(persona.name) if persona.style else NEUTRAL_STYLE.format(name=persona.name)
    )
    return "\n".join(
        [
            identity.format(name=persona.name, reading=persona.reading, summary=persona.summary),
            style,
            persona.reply_length or DEFAULT_REPLY_LENGTH,
            CONTEXT_NOTE.format(name=persona.name),
        ]
    )


def context_block(persona: Persona, facts: Sequence[ContextFact]) -> str:
    """The facts as one text block, best first; empty when there are none."""
    if not facts:
        return ""
    ordered = sorted(facts, key=lambda f: -f.score)
    lines = [CONTEXT_HEADER.format(name=persona.name)] + [f"- {f.text}" for f in ordered]
    return "\n".join(lines)


def check_user_turn(text: str) -> str:
    """Refuse empty or oversized messages with one clear line."""
    if not isinstance(text, str) or not text.strip():
        raise RagPersonaError("message: empty; say something to the persona")
    if len(text) > MAX_USER_CHARS:
        raise RagPersonaError(f"message: {len(text)} characters, the limit is {MAX_USER_CHARS}")
    problem = unicode_problem(text)
    if problem:
        raise RagPersonaError(f"message: {problem}")
    return text.strip()


def kept_history(history: Sequence[dict]) -> list[dict]:
    """The user/assistant messages of history that the prompt keeps: the last MAX_HISTORY_TURNS exchanges'
    worth of messages (other roles are dropped: the persona's own instruction is the system message)."""
    turns = [m for m in history if m.get("role") in ("user", "assistant")]
    return turns[-2 * MAX_HISTORY_TURNS :]


def build_messages(
    persona: Persona,
    facts: Sequence[ContextFact],
    history: Sequence[dict],
    user_turn: str,
    *,
    include_context: bool = True,
) -> list[dict]:
    """Chat messages for the model's chat template.

    With include_context=False the facts are left out of the text (the cross-attention mode
    supplies them as memory instead); everything else is identical.
    """
    user_turn = check_user_turn(user_turn)
    system = system_prompt(persona)
    block = context_block(persona, facts) if include_context else ""
    if block:
        system = f"{system}\n\n{block}"
    messages = [{"role": "system", "content": system}]
    for m in kept_history(history):
        if not isinstance(m.get("content"), str):
            raise RagPersonaError(f"history: message with role {m.get('role')!r} has no text content")
        messages.append({"role": m["role"], "content": m["content"]})
    messages.append({"role": "user", "content": user_turn})
    return messages
