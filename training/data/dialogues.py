"""Load the persona's dialogues (user turn, in-register answer, plain answer, fact ids) with one-line errors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rag_persona.errors import RagPersonaError
from rag_persona.utils.io import read_jsonl

STYLES = ("plain", "ojousama")
# The in-register answer's key: "styled" for any persona; the first persona's files say "ojousama".
_STYLED_KEYS = ("styled", "ojousama")


@dataclass(frozen=True)
class Turn:
    user: str
    ojousama: str
    plain: str
    facts: tuple[str, ...]

    def answer(self, style: str) -> str:
        return self.ojousama if style == "ojousama" else self.plain


@dataclass(frozen=True)
class Conversation:
    id: str
    kind: str
    turns: tuple[Turn, ...]
    generated: bool = False  # made by a teacher model, not written by a person


def load_dialogues(path: str | Path, known_fact_ids: set[str] | None = None) -> list[Conversation]:
    path = Path(path)
    conversations, seen = [], set()
    for lineno, obj in read_jsonl(path, missing="dialogues file not found"):
        where = f"{path}:{lineno}"
        cid = obj.get("id")
        if not isinstance(cid, str) or not cid.strip():
            raise RagPersonaError(f"{where}: field 'id': missing or empty")
        if cid in seen:
            raise RagPersonaError(f"{where}: field 'id': duplicate id {cid!r}")
        seen.add(cid)
        raw_turns = obj.get("turns")
        if not isinstance(raw_turns, list) or not raw_turns:
            raise RagPersonaError(f"{where}: field 'turns': must be a non-empty list")
        turns = []
        for i, t in enumerate(raw_turns):
            if not isinstance(t, dict):
                raise RagPersonaError(f"{where}: field 'turns[{i}]': must be an object")
            styled_key = next((k for k in _STYLED_KEYS if k in t), "styled")
            for field in ("user", styled_key, "plain"):
                if not isinstance(t.get(field), str) or not t[field].strip():
                    raise RagPersonaError(f"{where}: field 'turns[{i}].{field}': missing or empty")
            facts = t.get("facts", [])
            if not isinstance(facts, list) or not all(isinstance(f, str) for f in facts):
                raise RagPersonaError(f"{where}: field 'turns[{i}].facts': must be a list of fact ids")
            unknown = [f for f in facts if known_fact_ids is not None and f not in known_fact_ids]
            if unknown:
                raise RagPersonaError(f"{where}: field 'turns[{i}].facts': unknown fact id {unknown[0]!r}")
            turns.append(Turn(t["user"].strip(), t[styled_key].strip(), t["plain"].strip(), tuple(facts)))
        conversations.append(Conversation(cid, str(obj.get("kind", "")), tuple(turns)))
    return conversations
