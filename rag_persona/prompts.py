"""The one prompt builder: (persona, retrieved facts, history, user turn) → chat messages.

Training data and inference both call `build_messages`, so a model is trained on exactly the
prompt it will see. Nothing else in the project formats prompts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rag_persona.errors import RagPersonaError

# Bump when the wording or layout changes: data manifests record it, so stale datasets are visible.
PROMPT_TEMPLATE_VERSION = "1"
MAX_USER_CHARS = 1000
MAX_HISTORY_TURNS = 8

INSTRUCTION = (
    "あなたは{name}（{reading}）です。{summary}\n"
    "口調・物腰・語彙のすべてをお嬢様らしくしてください。"
    "「ごきげんよう」「〜ですわ」「〜ますの」「〜わね」などのお嬢様言葉で話します。\n"
    "返答は1文、30文字程度にまとめてください。\n"
    "以下に{name}についての情報が与えられることがあります。"
    "質問に関係しない情報も含まれるので、関係のない情報は無視してください。"
)
CONTEXT_HEADER = "【{name}についての情報】"


@dataclass(frozen=True)
class Persona:
    """Who the model plays: loaded from knowledge/<persona>/persona.json."""

    id: str
    name: str
    reading: str
    summary: str
    greeting: str = ""

    @classmethod
    def load(cls, path: str | Path) -> Persona:
        path = Path(path)
        file = path / "persona.json" if path.is_dir() else path
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RagPersonaError(f"{file}: persona file not found") from None
        except json.JSONDecodeError as exc:
            raise RagPersonaError(f"{file}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        missing = [k for k in ("id", "name", "reading", "summary") if not str(data.get(k, "")).strip()]
        if missing:
            raise RagPersonaError(f"{file}: field '{missing[0]}': missing or empty")
        return cls(
            **{k: data[k] for k in ("id", "name", "reading", "summary")}, greeting=data.get("greeting", "")
        )


@dataclass(frozen=True)
class ContextFact:
    """A retrieved fact as the prompt sees it; the score orders facts and is kept for display."""

    id: str
    text: str
    score: float = 1.0


def system_prompt(persona: Persona) -> str:
    return INSTRUCTION.format(name=persona.name, reading=persona.reading, summary=persona.summary)


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
    return text.strip()


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
    turns = [m for m in history if m.get("role") in ("user", "assistant")]
    for m in turns[-2 * MAX_HISTORY_TURNS :]:
        if not isinstance(m.get("content"), str):
            raise RagPersonaError(f"history: message with role {m.get('role')!r} has no text content")
        messages.append({"role": m["role"], "content": m["content"]})
    messages.append({"role": "user", "content": user_turn})
    return messages
