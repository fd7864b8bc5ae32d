"""Optional teacher-model augmentation: paraphrased user turns, marked as generated (off by default)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence

from rag_persona.prompts import MAX_USER_CHARS

from .dialogues import Conversation

PARAPHRASE_INSTRUCTION = (
    "次の質問を、意味を変えずに別の言い方で1つだけ書き換えてください。"
    "書き換えた質問だけを1行で出力してください。\n質問: {question}"
)

Teacher = Callable[[str], str]


def teacher_from_model(name: str | None = None, max_new_tokens: int = 48) -> Teacher:
    """A teacher backed by any chat model (the bundled one by default), greedy so runs repeat."""
    from rag_persona.generation import GenerationSettings, generate_reply, load_causal_lm

    loaded = load_causal_lm(name, progress=lambda msg: None)
    settings = GenerationSettings(max_new_tokens=max_new_tokens)

    def ask(prompt: str) -> str:
        return generate_reply(loaded, [{"role": "user", "content": prompt}], settings).text

    return ask


def clean_paraphrase(original: str, text: str) -> str | None:
    """First non-empty line, stripped of quotes and labels; None when unusable."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    for prefix in ("質問:", "質問：", "書き換え:", "書き換え："):
        if line.startswith(prefix):
            line = line[len(prefix) :].strip()
    line = line.strip("「」\"'` ")
    if not line or line == original or len(line) > min(MAX_USER_CHARS, 4 * len(original) + 20):
        return None
    return line


def paraphrase_conversations(
    conversations: Sequence[Conversation],
    teacher: Teacher,
    n: int,
    rng: random.Random,
    is_held_out: Callable[[str], bool],
) -> list[Conversation]:
    """Up to n new single-turn conversations whose user turn the teacher rephrased."""
    pool = sorted((c for c in conversations if len(c.turns) == 1), key=lambda c: c.id)
    rng.shuffle(pool)
    out = []
    for conv in pool:
        if len(out) >= n:
            break
        turn = conv.turns[0]
        text = clean_paraphrase(turn.user, teacher(PARAPHRASE_INSTRUCTION.format(question=turn.user)))
        if text is None or is_held_out(text):
            continue
        out.append(
            Conversation(
                id=f"{conv.id}-para",
                kind=conv.kind,
                turns=(dataclasses.replace(turn, user=text),),
                generated=True,
            )
        )
    return out
