"""Knowledge bases and labelled queries: loading, the content hash, one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rag_persona.errors import RagPersonaError
from rag_persona.knowledge import (
    Fact,
    knowledge_hash,
    load_knowledge,
    load_queries,
    write_facts,
)
from rag_persona.settings import KNOWLEDGE_ROOT

DATA = Path(__file__).parent / "data"


def _write(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_minimal_file_loads_with_optional_fields_and_extras(tmp_path):
    kb_file = _write(
        tmp_path / "kb.jsonl",
        [
            {"id": "a", "text": "名前は高森みのり。"},
            "",
            {
                "id": "b",
                "text": " 好物はメロンパン。 ",
                "questions": ["好きな食べ物は？"],
                "tags": ["food"],
                "note": 1,
            },
        ],
    )
    kb = load_knowledge(kb_file)
    assert kb.ids == ["a", "b"]
    b = kb.by_id()["b"]
    assert b.text == "好物はメロンパン。"
    assert b.questions == ["好きな食べ物は？"] and b.tags == ["food"] and b.extra == {"note": 1}
    assert b.keys() == ["好物はメロンパン。", "好きな食べ物は？"]
    assert (b.source, b.line) == (str(kb_file), 3)
    assert b.to_dict() == {
        "id": "b",
        "text": "好物はメロンパン。",
        "questions": ["好きな食べ物は？"],
        "tags": ["food"],
        "note": 1,
    }


def test_persona_folder_reads_only_facts_jsonl():
    kb = load_knowledge(KNOWLEDGE_ROOT / "ojousama")
    assert [p.name for p in kb.files] == ["facts.jsonl"]
    assert "profile-name" in kb.ids and len(kb) > 50
    assert all(f.text for f in kb)


def test_folder_without_facts_jsonl_reads_every_fact_file(tmp_path):
    _write(tmp_path / "b.jsonl", [{"id": "b1", "text": "二つ目"}])
    _write(tmp_path / "a.jsonl", [{"id": "a1", "text": "一つ目"}])
    _write(tmp_path / "dialogues.jsonl", [{"not": "a fact"}])
    _write(tmp_path / "queries.jsonl", [{"query": "q", "relevant": []}])
    kb = load_knowledge(tmp_path)
    assert kb.ids == ["a1", "b1"]


def test_hash_ignores_layout_but_not_content(tmp_path):
    one = _write(tmp_path / "one.jsonl", [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}])
    two = tmp_path / "two.jsonl"
    two.write_text('{"text": "y",   "id": "b"}\n\n{"id": "a", "text": "x"}\n', encoding="utf-8")
    assert load_knowledge(one).hash == load_knowledge(two).hash
    three = _write(tmp_path / "three.jsonl", [{"id": "a", "text": "x"}, {"id": "b", "text": "z"}])
    assert load_knowledge(three).hash != load_knowledge(one).hash
    assert knowledge_hash([Fact("a", "x")]) != knowledge_hash([Fact("a", "x", questions=["q"])])


def test_write_facts_round_trips(tmp_path):
    # U+2028 and U+0085 stay unescaped in the JSON text and must not end a record (str.splitlines would).
    facts = [
        Fact("a", "テキスト\u2028続き", questions=["質問？"], extra={"k": [1, 2]}),
        Fact("b", "二\x85三"),
    ]
    write_facts(tmp_path / "out.jsonl", facts)
    assert "\u2028" in (tmp_path / "out.jsonl").read_text(encoding="utf-8")
    again = load_knowledge(tmp_path / "out.jsonl")
    assert [f.to_dict() for f in again] == [f.to_dict() for f in facts]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary file left behind"


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([{"id": "a", "text": "x"}, '{"id": "b", "text": '], r"kb\.jsonl:2: malformed JSON"),
        (
            [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}, {"id": "a", "text": "z"}],
            r"kb\.jsonl:3: field 'id': duplicate id 'a' \(first at .*kb\.jsonl:1\)",
        ),
        ([{"id": "a", "text": "   "}], r"kb\.jsonl:1: field 'text': empty"),
        ([{"id": "a"}], r"kb\.jsonl:1: field 'text': missing"),
        ([{"text": "x"}], r"kb\.jsonl:1: field 'id': missing"),
        ([{"id": "", "text": "x"}], r"kb\.jsonl:1: field 'id': empty"),
        ([{"id": "a", "text": 3}], r"kb\.jsonl:1: field 'text': expected a string, got int"),
        (
            [{"id": "a", "text": "x", "questions": ["ok", ""]}],
            r"kb\.jsonl:1: field 'questions\[1\]': empty string",
        ),
        ([{"id": "a", "text": "x", "questions": 5}], r"kb\.jsonl:1: field 'questions': expected a list"),
        (["[1, 2]"], r"kb\.jsonl:1: expected a JSON object, got list"),
    ],
)
def test_bad_facts_give_one_line_naming_file_line_field(tmp_path, rows, expected):
    path = _write(tmp_path / "kb.jsonl", rows)
    with pytest.raises(RagPersonaError, match=expected) as info:
        load_knowledge(path)
    assert "\n" not in str(info.value)
    assert str(path) in str(info.value)


def test_missing_and_empty_knowledge(tmp_path):
    with pytest.raises(RagPersonaError, match=r"nope\.jsonl: no such file or folder"):
        load_knowledge(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(RagPersonaError, match="no facts"):
        load_knowledge(tmp_path / "empty.jsonl")
    (tmp_path / "folder").mkdir()
    with pytest.raises(RagPersonaError, match="no facts.jsonl"):
        load_knowledge(tmp_path / "folder")


def test_queries_load_and_validate(tmp_path):
    qs = load_queries(DATA / "mini_queries.jsonl")
    assert qs[0].query == "あなたの名前はなんですか?" and qs[0].relevant == ["name"]
    assert any(not q.relevant for q in qs)
    bad = [
        ([{"query": "x"}], r"q\.jsonl:1: field 'relevant': missing"),
        ([{"query": "", "relevant": []}], r"q\.jsonl:1: field 'query': empty"),
        ([{"query": "x", "relevant": "a"}], r"q\.jsonl:1: field 'relevant': expected a list"),
        (
            [{"query": "x", "relevant": []}, {"query": "y", "relevant": ["zzz"]}],
            r"q\.jsonl:2: field 'relevant\[0\]': unknown fact id 'zzz'",
        ),
    ]
    for rows, expected in bad:
        path = _write(tmp_path / "q.jsonl", rows)
        with pytest.raises(RagPersonaError, match=expected):
            load_queries(path, known_ids=["a"])
    with pytest.raises(RagPersonaError, match=r"missing\.jsonl: no such file"):
        load_queries(tmp_path / "missing.jsonl")
