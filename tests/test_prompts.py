"""The one prompt builder: layout, context handling and input limits."""

from __future__ import annotations

import pytest

from rag_persona.errors import RagPersonaError
from rag_persona.prompts import (
    MAX_USER_CHARS,
    ContextFact,
    Persona,
    build_messages,
    context_block,
    system_prompt,
)
from rag_persona.settings import KNOWLEDGE_ROOT

PERSONA = Persona.load(KNOWLEDGE_ROOT / "ojousama")


def test_persona_card_loads_and_instruction_says_what_users_expect():
    assert PERSONA.name == "小野寺絢音"
    text = system_prompt(PERSONA)
    for needle in ("小野寺絢音", "お嬢様", "1文", "30文字", "無視"):
        assert needle in text


def test_context_goes_into_system_message_best_first():
    facts = [ContextFact("a", "好きな紅茶はダージリン。", 0.81), ContextFact("b", "名前は小野寺絢音。", 0.93)]
    msgs = build_messages(PERSONA, facts, [], "お名前は？")
    assert [m["role"] for m in msgs] == ["system", "user"]
    system = msgs[0]["content"]
    assert system.index("名前は小野寺絢音。") < system.index("好きな紅茶はダージリン。")
    assert msgs[-1]["content"] == "お名前は？"


def test_without_context_the_prompt_is_otherwise_identical():
    facts = [ContextFact("b", "名前は小野寺絢音。", 0.93)]
    with_ctx = build_messages(PERSONA, facts, [], "お名前は？")
    without = build_messages(PERSONA, facts, [], "お名前は？", include_context=False)
    assert without[0]["content"] == system_prompt(PERSONA)
    assert with_ctx[0]["content"] == system_prompt(PERSONA) + "\n\n" + context_block(PERSONA, facts)
    assert with_ctx[1:] == without[1:]
    assert build_messages(PERSONA, [], [], "お名前は？") == without


def test_history_is_kept_in_order_and_capped():
    history = []
    for i in range(30):
        history += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
    msgs = build_messages(PERSONA, [], history, "next")
    assert msgs[1]["content"] == "q22" and msgs[-2]["content"] == "a29" and msgs[-1]["content"] == "next"


@pytest.mark.parametrize("bad", ["", "   ", "x" * (MAX_USER_CHARS + 1)])
def test_empty_or_huge_messages_are_refused_in_one_line(bad):
    with pytest.raises(RagPersonaError) as err:
        build_messages(PERSONA, [], [], bad)
    assert str(err.value).startswith("message:") and "\n" not in str(err.value)


def test_malformed_persona_file_names_file_and_field(tmp_path):
    (tmp_path / "persona.json").write_text('{"id": "x", "name": "", "reading": "r", "summary": "s"}')
    with pytest.raises(RagPersonaError, match=r"persona.json: field 'name'"):
        Persona.load(tmp_path)
    (tmp_path / "persona.json").write_text('{"id": ')
    with pytest.raises(RagPersonaError, match=r"persona.json:1: malformed JSON"):
        Persona.load(tmp_path)
