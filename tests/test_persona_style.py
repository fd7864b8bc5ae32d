"""Persona-defined speech style: the prompt and the persona metrics follow persona.json; the second persona."""

from __future__ import annotations

import json
import unicodedata

import pytest

from rag_persona.chat import PersonaChat, TurnResult, plan_turn
from rag_persona.errors import RagPersonaError
from rag_persona.evaluation.evaluate import EvalPrompt, default_adapter, evaluate_chat, persona_adapter
from rag_persona.evaluation.metrics import (
    OJOUSAMA_MARKERS,
    PromptResult,
    foreign_markers,
    in_register,
    judge,
    reply_metrics,
    summarize,
)
from rag_persona.generation import Reply
from rag_persona.knowledge.facts import load_knowledge, load_queries
from rag_persona.prompts import NEUTRAL_STYLE, Persona, Style, system_prompt
from rag_persona.settings import KNOWLEDGE_ROOT

OJOUSAMA = Persona.load(KNOWLEDGE_ROOT / "ojousama")
KANSAI_DIR = KNOWLEDGE_ROOT / "kansai"
KANSAI = Persona.load(KANSAI_DIR)
OJOUSAMA_WORDS = ("お嬢様", *OJOUSAMA_MARKERS)

# The system prompt as INSTRUCTION.format(...) rendered it before styles moved into persona.json
# (PROMPT_TEMPLATE_VERSION 1). Trained adapters and built datasets depend on it character for character.
OJOUSAMA_PROMPT_V1 = (
    "あなたは小野寺絢音（おのでら あやね）です。"
    "鎌倉山の洋館に暮らす17歳のお嬢様で、横浜の聖ルミエール女学院高等部2年生。"
    "ピアノ・茶道・乗馬をたしなみ、ウィーンでピアニストになることを夢見ている。"
    "上品でおっとりしているが芯が強く、雷と料理が大の苦手。\n"
    "口調・物腰・語彙のすべてをお嬢様らしくしてください。"
    "「ごきげんよう」「〜ですわ」「〜ますの」「〜わね」などのお嬢様言葉で話します。\n"
    "返答は1文、30文字程度にまとめてください。\n"
    "以下に小野寺絢音についての情報が与えられることがあります。"
    "質問に関係しない情報も含まれるので、関係のない情報は無視してください。"
)


def _write(folder, data) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    (folder / "persona.json").write_text(text, encoding="utf-8")


# -- the prompt -------------------------------------------------------------------------------------------


def test_ojousama_prompt_is_unchanged_character_for_character():
    assert system_prompt(OJOUSAMA) == OJOUSAMA_PROMPT_V1


def test_ojousama_markers_in_persona_json_are_the_metrics_default():
    # Her results must not change with the persona's markers passed instead of the default.
    assert OJOUSAMA.markers == OJOUSAMA_MARKERS


def test_persona_without_style_or_reading_gets_a_neutral_prompt(tmp_path):
    _write(tmp_path, {"id": "taro", "name": "山田太郎", "summary": "会社員。"})
    persona = Persona.load(tmp_path)
    text = system_prompt(persona)
    assert text.startswith("あなたは山田太郎です。会社員。\n")  # no empty （） without a reading
    assert NEUTRAL_STYLE.format(name="山田太郎") in text.splitlines()
    assert not [w for w in OJOUSAMA_WORDS if w in text]
    assert persona.display_name == "山田太郎" and OJOUSAMA.display_name == "小野寺絢音（おのでら あやね）"


def test_kansai_prompt_speaks_kansai_and_no_ojousama_words():
    text = system_prompt(KANSAI)
    lines = text.splitlines()
    assert lines[0].startswith("あなたは今宮陽菜（いまみや ひな）です。")
    for needle in ("関西弁", "「ウチ」", "「〜やで」", "「〜へん」", "まいど！"):
        assert needle in lines[1]
    assert lines[2] == "返答は1文、30文字程度にまとめてください。"
    assert not [w for w in OJOUSAMA_WORDS if w in text]


def test_style_fields_render_and_instruction_wins():
    style = Style(register="標準語", first_person="僕", endings=("だよ",))
    rendered = "口調・物腰・語彙のすべてを標準語らしくしてください。一人称は「僕」です。「〜だよ」などの語尾で話します。"
    assert style.sentences("x") == rendered
    assert Style(instruction="丁寧語で話します。", register="関西弁").sentences("x") == "丁寧語で話します。"
    assert Style(markers=("だよ",)).sentences("花子") == NEUTRAL_STYLE.format(name="花子")
    custom = Persona(id="x", name="花子", summary="学生。", reply_length="返答は2文以内にしてください。")
    assert system_prompt(custom).splitlines()[2] == "返答は2文以内にしてください。"


@pytest.mark.parametrize("persona", [OJOUSAMA, KANSAI], ids=["ojousama", "kansai"])
def test_persona_round_trips_through_its_json_form(persona):
    assert Persona.from_dict(persona.to_dict()) == persona


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"id": "x", "name": "", "summary": "s"}, "name"),
        ({"id": "../x", "name": "n", "summary": "s"}, "id"),
        ({"id": "/tmp/x", "name": "n", "summary": "s"}, "id"),
        ({"id": "お嬢様", "name": "n", "summary": "s"}, "id"),
        ({"id": "x", "name": 5, "summary": "s"}, "name"),
        ({"id": "x", "name": "n"}, "summary"),
        ({"id": "x", "name": "n", "summary": "s", "reading": ["よみ"]}, "reading"),
        ({"id": "x", "name": "n", "summary": "s", "nmae": "typo"}, "nmae"),
        ({"id": "x", "name": "n", "summary": "s", "reply_length": 30}, "reply_length"),
        ({"id": "x", "name": "n", "summary": "s", "style": "お嬢様"}, "style"),
        ({"id": "x", "name": "n", "summary": "s", "style": {"tone": "明るい"}}, "style.tone"),
        ({"id": "x", "name": "n", "summary": "s", "style": {"endings": "やで"}}, "style.endings"),
        ({"id": "x", "name": "n", "summary": "s", "style": {"endings": ["やで", 3]}}, "style.endings[1]"),
        ({"id": "x", "name": "n", "summary": "s", "style": {"markers": [""]}}, "style.markers[0]"),
        ({"id": "x", "name": "n", "summary": "s", "style": {"register": 1}}, "style.register"),
    ],
)
def test_bad_persona_files_name_file_and_field_in_one_line(tmp_path, data, field):
    _write(tmp_path, data)
    with pytest.raises(RagPersonaError) as err:
        Persona.load(tmp_path)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'persona.json'}: field '{field}': ") and "\n" not in message


def test_persona_file_must_hold_an_object(tmp_path):
    _write(tmp_path, "[1, 2]")
    with pytest.raises(RagPersonaError, match=r"persona.json: expected a JSON object, got list$"):
        Persona.load(tmp_path)


# -- the metrics ----------------------------------------------------------------------------------------------

KANSAI_REPLY = "ほんまやで、8個で500円やねん。"
OJOUSAMA_REPLY = "ごきげんよう、8個で500円ですわ。"


def test_metrics_count_each_personas_own_register():
    assert in_register(KANSAI_REPLY, KANSAI.markers) and not in_register(KANSAI_REPLY, OJOUSAMA.markers)
    assert in_register(OJOUSAMA_REPLY, OJOUSAMA.markers) and not in_register(OJOUSAMA_REPLY, KANSAI.markers)
    assert not in_register(KANSAI_REPLY)  # no markers named: the お嬢様 default, as before
    kansai = reply_metrics(KANSAI_REPLY, True, markers=KANSAI.markers)
    assert kansai.style and kansai.markers == ["やで", "ねん", "ほんま"] and kansai.foreign == []
    slipped = reply_metrics(OJOUSAMA_REPLY, True, markers=KANSAI.markers)
    assert slipped.style is False and slipped.foreign == ["ですわ", "ごきげんよう"]
    assert foreign_markers("ありますので、どうぞ。", KANSAI.markers) == []  # 〜ますので is not お嬢様
    # the お嬢様's own endings are never foreign to her
    assert foreign_markers(OJOUSAMA_REPLY, OJOUSAMA.markers) == [] == foreign_markers(OJOUSAMA_REPLY)


def test_a_persona_without_markers_is_not_scored_for_style():
    m = reply_metrics("はい、そうです。", True, markers=())
    assert m.style is None and m.foreign == []
    r = judge(PromptResult("天気は？", "晴れるといいですね。", True, []), {}, markers=())
    assert r.offtopic_ok is True  # no register to miss
    assert summarize([r])["style_rate"] is None


def test_evaluate_scores_with_the_personas_markers():
    replies = iter([(KANSAI_REPLY, True), (OJOUSAMA_REPLY, True)])

    class Scripted(PersonaChat):
        def respond(self, history, user_turn):
            plan = plan_turn(self.persona, self.retriever, history, user_turn)
            text, eos = next(replies)
            return TurnResult(plan=plan, reply=Reply(text, eos, 10, len(plan.messages), 0.1))

    chat = Scripted(persona=KANSAI, retriever=None, loaded=None)
    facts = {"shop-price": "たこ焼きは8個入りで500円。"}
    prompts = [EvalPrompt("一舟いくら？", golden_ids=["shop-price"]), EvalPrompt("値段は？")]
    out = evaluate_chat(chat, prompts, facts)
    assert [r["metrics"]["style"] for r in out["replies"]] == [True, False]
    assert out["summary"]["style_rate"] == 0.5 and out["summary"]["foreign_register_rate"] == 0.5
    assert out["summary"]["fact_accuracy"] == 1.0


# -- the adapter persona.json names ---------------------------------------------------------------------------


def test_persona_adapter_resolves_folder_then_shipped_name(tmp_path):
    shipped = tmp_path / "adapters"
    (shipped / "kansai-lora").mkdir(parents=True)
    (shipped / "kansai-lora" / "rag_persona_adapter.json").write_text('{"base_model": "m1"}')
    _write(tmp_path / "p", {"id": "p", "name": "n", "summary": "s", "adapter": "kansai-lora"})
    persona = Persona.load(tmp_path / "p")
    assert persona_adapter(persona, "m1", shipped) == str((shipped / "kansai-lora").resolve())
    assert persona_adapter(persona, "m2", shipped) is None  # trained on another base model
    (tmp_path / "p" / "kansai-lora").mkdir()  # a folder beside persona.json wins
    assert persona_adapter(persona, "m2", shipped) == str((tmp_path / "p" / "kansai-lora").resolve())
    _write(tmp_path / "q", {"id": "q", "name": "n", "summary": "s", "adapter": "missing"})
    with pytest.raises(RagPersonaError, match=r"persona.json: field 'adapter': no adapter folder 'missing'"):
        persona_adapter(Persona.load(tmp_path / "q"), "m1", shipped)
    assert persona_adapter(KANSAI, "m1", shipped) is None


def test_the_ojousama_adapter_is_not_the_kansai_personas_default(tmp_path, monkeypatch):
    monkeypatch.delenv("RAG_PERSONA_CHAT_ADAPTER", raising=False)
    folder = tmp_path / "ojousama-m1"
    folder.mkdir()
    manifest = {"default": True, "base_model": "m1", "persona": "ojousama"}
    (folder / "rag_persona_adapter.json").write_text(json.dumps(manifest))
    assert default_adapter("m1", "ojousama", root=tmp_path) == str(folder)
    assert default_adapter("m1", "kansai", root=tmp_path) is None
    # a role-play adapter (persona "*") serves every persona without its own, never one that has one
    roleplay = tmp_path / "roleplay-m1"
    roleplay.mkdir()
    (roleplay / "rag_persona_adapter.json").write_text(
        json.dumps({"default": True, "base_model": "m1", "persona": "*"})
    )
    assert default_adapter("m1", "kansai", root=tmp_path) == str(roleplay)
    assert default_adapter("m1", "ojousama", root=tmp_path) == str(folder)
    assert default_adapter("m2", "kansai", root=tmp_path) is None  # trained on another base model


# -- the shipped second persona -----------------------------------------------------------------------------


def _norm(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in text if not unicodedata.category(ch).startswith(("P", "Z", "S")))


def test_kansai_persona_knowledge_and_queries_load():
    assert KANSAI.id == "kansai" and KANSAI.style.register == "関西弁" and KANSAI.style.first_person == "ウチ"
    kb = load_knowledge(KANSAI_DIR)
    assert len(kb) >= 60 and all(2 <= len(f.questions) <= 3 and f.tags for f in kb)
    own_questions = {_norm(q) for f in kb for q in f.questions}
    splits = {s: load_queries(KANSAI_DIR / "queries" / f"{s}.jsonl", kb.ids) for s in ("dev", "test")}
    texts = {}
    for split, queries in splits.items():
        assert len(queries) >= 60
        offtopic = sum(1 for q in queries if not q.relevant) / len(queries)
        assert 0.2 <= offtopic <= 0.3, split
        texts[split] = {_norm(q.query) for q in queries}
        assert len(texts[split]) == len(queries) and not texts[split] & own_questions
    assert not texts["dev"] & texts["test"]


def test_kansai_dialogues_are_in_her_register():
    ids = set(load_knowledge(KANSAI_DIR).ids)
    rows = [json.loads(line) for line in (KANSAI_DIR / "dialogues.jsonl").read_text("utf-8").splitlines()]
    assert len(rows) >= 60 and len({r["id"] for r in rows}) == len(rows)
    kinds = {r["kind"] for r in rows}
    assert {"fact", "multi", "refusal", "general", "greeting", "chitchat"} <= kinds
    assert any(len(r["turns"]) >= 3 for r in rows)
    turns = [t for r in rows for t in r["turns"]]
    assert all(set(t) == {"user", "styled", "plain", "facts"} for t in turns)
    assert all(set(t["facts"]) <= ids for t in turns) and any(t["facts"] for t in turns)
    assert [t["styled"] for t in turns if not in_register(t["styled"], KANSAI.markers)] == []
    assert [t["styled"] for t in turns if foreign_markers(t["styled"], KANSAI.markers)] == []
    assert [t["plain"] for t in turns if foreign_markers(t["plain"], KANSAI.markers)] == []
