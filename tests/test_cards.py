"""Character cards ⇄ persona folders: parsing, macros, lorebook facts, round trips, bad cards, CLI."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from conftest import cli_json, run_cli, tiny_model_args
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from typer.testing import CliRunner

from rag_persona.cli.app import app
from rag_persona.errors import RagPersonaError
from rag_persona.knowledge.card_text import PERSONA_FILE as CARDS_PERSONA_FILE
from rag_persona.knowledge.card_text import (
    derive_markers,
    detect_first_person,
    is_question,
    resolve_macros,
    slug,
    unique_id,
)
from rag_persona.knowledge.cards import (
    MAX_BOOK_ENTRIES,
    MAX_CARD_BYTES,
    card_to_persona,
    convert_card,
    load_card,
    persona_to_card,
)
from rag_persona.knowledge.facts import load_knowledge
from rag_persona.prompts import PERSONA_FILE, Persona
from rag_persona.settings import KNOWLEDGE_ROOT
from training.data.dialogues import load_dialogues

CARDS = Path(__file__).parent / "data" / "cards"
FIXTURES = ["kansai_kushikatsu", "samurai_ronin", "student_casual"]
runner = CliRunner()


def card_json(name: str) -> dict:
    return json.loads((CARDS / f"{name}.json").read_text(encoding="utf-8"))


def b64(obj) -> str:
    return base64.b64encode(json.dumps(obj, ensure_ascii=False).encode("utf-8")).decode("ascii")


def write_png(path: Path, **chunks: str) -> Path:
    """A small PNG with the given tEXt chunks, written with Pillow as SillyTavern does."""
    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    Image.new("RGB", (8, 8), (200, 120, 40)).save(path, format="PNG", pnginfo=info)
    return path


def folder_files(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.iterdir())}


def no_trace(out: Path) -> bool:
    """Neither the folder nor a hidden work/backup sibling of it exists."""
    return not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


# ---- parsing the fixtures ----------------------------------------------------------------------------------


def test_persona_file_name_matches_the_prompt_builders():
    assert CARDS_PERSONA_FILE == PERSONA_FILE


def test_v2_kansai_card():
    card = load_card(CARDS / "kansai_kushikatsu.json")
    assert card.spec == "chara_card_v2" and card.name == "鶴田美咲" and len(card.entries) == 8
    folder = convert_card(card)
    persona = Persona.from_dict(folder.persona)
    assert persona.id == "kansai_kushikatsu"
    # description, personality and scenario describe the character: all in the summary, no instruction,
    # so the prompt's style line shows first person, endings and example lines.
    assert persona.summary == (
        "大阪・新世界で串カツ屋「串かつ 鶴や」を切り盛りする二代目女将、32歳。鶴田美咲は父から店を継いで8年目になる。"
        "性格：気っ風がよく面倒見がいい。声が大きくて冗談好き。場面：あなたは仕事帰りにふらりと店に立ち寄った客。"
    )
    assert persona.greeting == "いらっしゃい！あなた、カウンター空いてるで。まずは土手焼きからいっとく？"
    assert persona.style.instruction == "" and persona.style.endings == ("やで", "やねん", "ねん")
    style_line = persona.style.sentences(persona.name)
    assert (
        "一人称は「うち」です。" in style_line
        and "「〜やで」" in style_line
        and "そら牛串やで！" in style_line
    )
    # Answers to a user line first, then the lone character line; continuation lines stay in their line.
    assert persona.style.examples == (
        "そら牛串やで！うちの一番人気やねん。",
        "二度づけは禁止やで。キャベツですくってかけたらええねん。",
        "ほな、からしは抜いとくわ。\n気にせんでええよ、うちに任しとき！",
        "今日はええレンコン入ってるで、揚げたろか？",
    )
    assert persona.style.first_person == "うち"
    assert persona.markers == ("やで", "やねん", "ねん")
    facts = {f.id: f for f in folder.facts}
    assert list(facts) == [
        "店の名前",
        "二度づけ禁止",
        "看板メニュー",
        "揚げ油",
        "定休日",
        "家族",
        "好きなもの",
    ]
    assert "裏メニュー" not in facts and folder.disabled == ["entries[6] ('裏メニュー')"]
    assert facts["店の名前"].text == "鶴田美咲の店は大阪・新世界の串カツ屋「串かつ 鶴や」。"
    assert facts["店の名前"].questions == ["お店の名前は何ですか？"]
    assert facts["店の名前"].extra == {"keywords": ["店の名前", "お店の名前は何ですか？"]}
    assert facts["二度づけ禁止"].extra == {"keywords": ["ソース", "二度づけ"], "constant": True}
    assert facts["定休日"].questions == ["定休日はいつ？"]
    # @@decorators are dropped; a selective entry's secondary keys only narrow its keys' matches.
    assert facts["好きなもの"].text.startswith("鶴田美咲は阪神タイガース")
    assert facts["好きなもの"].extra["keywords"] == ["好きな", "阪神"]
    assert [len(d["turns"]) for d in folder.dialogues] == [2, 1]
    turn = folder.dialogues[0]["turns"][1]
    assert turn == {
        "user": "ソースはどうやって使うんですか？",
        "styled": "二度づけは禁止やで。キャベツですくってかけたらええねん。",
        "plain": "二度づけは禁止やで。キャベツですくってかけたらええねん。",
        "facts": [],
    }


def test_v3_samurai_card_uses_the_nickname_and_name_prefixed_lines():
    card = load_card(CARDS / "samurai_ronin.json")
    assert card.spec == "chara_card_v3" and card.nickname == "蔵人"
    folder = convert_card(card, persona_id="ronin", user_name="町人")
    persona = Persona.from_dict(folder.persona)
    assert persona.id == "ronin"
    assert persona.greeting == "拙者、榊原蔵人と申す。隣に越してこられたのは町人殿でござるか。"
    # No personality: the scenario and system_prompt follow the description; {{original}} is dropped.
    assert persona.summary.endswith(
        "場面：町人は長屋の隣に越してきたばかりの町人。蔵人は古風な武士言葉で話す。"
    )
    assert persona.style.instruction == ""
    assert (
        persona.style.examples[1]
        == "若い頃はいささか鳴らしたものでござるよ。今は竹刀より筆を握る日が多いがな。"
    )
    assert persona.style.first_person == "拙者" and persona.markers == ("でござる", "のじゃ")
    facts = {f.id: f for f in folder.facts}
    assert facts["出身"].text == "蔵人は美濃国の生まれ。"
    assert facts["身の上"].extra == {"constant": True}  # a constant entry without keys
    assert facts["流派"].questions == ["流派は何か"] and facts["住まい"].questions == ["どこに住んでいるの"]
    assert facts["刀-2"].text == "刀の鍔には桔梗の透かし彫りがある。"  # same name twice: unique ids
    assert "秘密" not in facts and len(folder.facts) == 8


def test_v2_student_card_reads_data_over_the_v1_mirror():
    folder = convert_card(load_card(CARDS / "student_casual.json"))
    persona = Persona.from_dict(folder.persona)
    assert persona.summary.startswith("早瀬陸は都立高校に通う2年生")
    assert persona.style.first_person == "俺" and persona.markers == ("だよね", "だし", "だろ")
    ids = [f.id for f in folder.facts]
    assert ids == ["部活", "クラス", "好きな食べ物", "苦手科目", "家族", "趣味", "entry-42"]
    assert [f.id for f in folder.facts if f.extra.get("constant")] == ["クラス"]
    assert folder.facts[1].text == "早瀬陸とあなたは2年B組のクラスメイト。"


def test_v1_card_without_lorebook():
    card = load_card(CARDS / "v1_librarian.json")
    assert card.spec == "chara_card_v1" and card.entries == []
    folder = convert_card(card)
    persona = Persona.from_dict(folder.persona)
    assert persona.greeting == "こんにちは、あなたさん。何かお探しですか？"
    assert persona.style.first_person == "私"
    assert (
        persona.style.markers == ()
    )  # polite standard Japanese: no register markers, not the お嬢様 default
    assert folder.facts == [] and "no lorebook entry became a fact" in folder.warnings[-1]
    assert folder.dialogues[0]["turns"][1]["styled"] == "貸出から二週間です。延長もできますよ。"


def test_png_cards_v2_v3_and_ccv3_preferred(tmp_path):
    card = card_json("kansai_kushikatsu")
    from_json = convert_card(load_card(CARDS / "kansai_kushikatsu.json"))
    v2 = load_card(write_png(tmp_path / "v2.png", chara=b64(card)))
    assert v2.spec == "chara_card_v2" and v2.source.endswith("(PNG chunk 'chara')")
    v3_card = card_json("samurai_ronin")
    v3 = load_card(write_png(tmp_path / "v3.png", ccv3=b64(v3_card)))
    assert v3.spec == "chara_card_v3" and v3.name == "榊原蔵人"
    both = load_card(write_png(tmp_path / "both.png", chara=b64(card), ccv3=b64(v3_card)))
    assert both.name == "榊原蔵人"  # the V3 spec: use ccv3 when both are there
    from_png = convert_card(v2, persona_id="kansai_kushikatsu")
    assert from_png.persona == from_json.persona and from_png.facts == from_json.facts


def test_macros_any_case_and_form():
    text = "{{char}}と{{CHAR}}と<BOT>と<bot>と<char>、{{ user }}と{{User}}と<USER>{{original}}"
    assert resolve_macros(text, "陽菜", "太郎") == "陽菜と陽菜と陽菜と陽菜と陽菜、太郎と太郎と太郎"
    assert resolve_macros("{{user}}さん", "x") == "あなたさん"


def test_ids():
    names = ["Tavern Rules", "ＡＢＣ", "店の名前！", " -x- ", "a" * 80, "??"]
    assert [slug(n) for n in names] == ["Tavern-Rules", "ABC", "店の名前", "x", "a" * 64, ""]
    assert all(slug(slug(n)) == slug(n) for n in names)
    assert slug("鶴田美咲") == "鶴田美咲" and slug("鶴田美咲", ascii_only=True) == ""
    assert slug("Kansai Shop v2", ascii_only=True) == "kansai-shop-v2"
    used: set[str] = set()
    assert [unique_id(b, used) for b in ["a", "a", "a-2", "a"]] == ["a", "a-2", "a-2-2", "a-3"]
    long = [unique_id("b" * 64, used) for _ in range(2)]
    assert long[1] == "b" * 62 + "-2" and all(slug(x) == x for x in long)


def test_heuristics_on_their_own():
    assert derive_markers(["せやねん。ほんまやで！", "知らんわ。"]) == ["やねん", "やで"]
    assert derive_markers(["元気ですか？", "元気です。"]) == []  # standard endings are no register
    assert derive_markers(["それでええやんか。", "まあええやんか"]) == ["やんか"]
    assert detect_first_person(["そのうち行くわ", "ボクはボクだよ"]) == "ボク"  # 「そのうち」 is no 「うち」
    assert [k for k in ["定休日はいつ？", "何歳", "好きな食べ物は何ですか", "趣味"] if is_question(k)] == [
        "定休日はいつ？",
        "好きな食べ物は何ですか",
    ]


# ---- writing folders and round trips -----------------------------------------------------------------------


def test_card_to_persona_writes_a_folder_every_loader_accepts(tmp_path):
    out = tmp_path / "kansai"
    folder = card_to_persona(load_card(CARDS / "kansai_kushikatsu.json"), out)
    files = ["card_extras.json", "dialogues.jsonl", "facts.jsonl", "persona.json"]
    assert sorted(p.name for p in out.iterdir()) == files
    persona = Persona.load(out)
    assert persona.to_dict() == folder.persona
    kb = load_knowledge(out)
    assert kb.ids == [f.id for f in folder.facts]
    assert kb.by_id()["二度づけ禁止"].to_dict() == {
        "id": "二度づけ禁止",
        "text": "「串かつ 鶴や」ではソースの二度づけは禁止。",
        "keywords": ["ソース", "二度づけ"],
        "constant": True,
    }
    conversations = load_dialogues(out / "dialogues.jsonl", set(kb.ids))  # the training loader
    assert [c.turns[0].ojousama for c in conversations] == [
        "そら牛串やで！うちの一番人気やねん。",
        "ほな、からしは抜いとくわ。\n気にせんでええよ、うちに任しとき！",
    ]


def _strip_ours(card: dict) -> dict:
    """The card as another editor would keep it if it dropped rag-persona's extensions."""
    card["data"]["extensions"].pop("rag_persona")
    for entry in card["data"]["character_book"]["entries"]:
        entry["extensions"].pop("rag_persona", None)
    return card


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("suffix", [".json", ".png"])
def test_round_trip(tmp_path, name, suffix):
    first = tmp_path / "first"
    card_to_persona(load_card(CARDS / f"{name}.json"), first, user_name="客")
    exported = persona_to_card(first, tmp_path / f"card{suffix}")
    assert exported.path.exists() and exported.entries == len(load_knowledge(first))
    second = tmp_path / "second"
    card_to_persona(load_card(exported.path), second, user_name="客")
    assert folder_files(second) == folder_files(first)
    # Without rag-persona's extensions the same folder is derived again from the card's text alone.
    card = json.loads(exported.path.read_text()) if suffix == ".json" else None
    if card is not None:
        stripped = tmp_path / "stripped.json"
        stripped.write_text(json.dumps(_strip_ours(card), ensure_ascii=False), encoding="utf-8")
        third = tmp_path / "third"
        card_to_persona(load_card(stripped), third, persona_id=Persona.load(first).id, user_name="客")
        assert folder_files(third) == folder_files(first)


@pytest.mark.parametrize("persona", ["kansai", "ojousama"])
def test_shipped_persona_to_card_and_back(tmp_path, persona):
    source = KNOWLEDGE_ROOT / persona
    result = persona_to_card(source, tmp_path / "card.json")
    card = json.loads(result.path.read_text())
    assert card["spec"] == "chara_card_v3" and card["spec_version"] == "3.0"
    data = card["data"]
    v2_fields = [
        "name",
        "description",
        "personality",
        "scenario",
        "first_mes",
        "mes_example",
        "creator_notes",
    ]
    v2_fields += ["system_prompt", "post_history_instructions", "alternate_greetings", "character_book"]
    assert set(v2_fields + ["tags", "creator", "character_version", "extensions"]) <= set(data)
    assert all(card[k] == data[k] for k in ("name", "description", "first_mes", "mes_example"))
    assert (
        data["mes_example"].startswith("<START>\n{{user}}: ") and data["mes_example"].count("<START>") >= 20
    )
    out = tmp_path / "back"
    card_to_persona(load_card(result.path), out)
    original = Persona.load(source).to_dict()
    original.pop("adapter", None)
    assert Persona.load(out).to_dict() == original
    before, after = load_knowledge(source), load_knowledge(out)
    assert [(f.id, f.text, f.questions, f.tags) for f in after] == [
        (f.id, f.text, f.questions, f.tags) for f in before
    ]
    assert all(f.extra["keywords"] == f.questions for f in after if f.questions)


def test_png_export_has_both_chunks(tmp_path):
    first = tmp_path / "p"
    card_to_persona(load_card(CARDS / "samurai_ronin.json"), first)
    out = persona_to_card(first, tmp_path / "card.png").path
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (256, 320)
        chunks = dict(img.text)
    v2 = json.loads(base64.b64decode(chunks["chara"]))
    v3 = json.loads(base64.b64decode(chunks["ccv3"]))
    assert v2["spec"] == "chara_card_v2" and v2["spec_version"] == "2.0"
    assert v3["spec"] == "chara_card_v3" and v3["data"]["name"] == v2["data"]["name"] == "榊原蔵人"
    entries = v3["data"]["character_book"]["entries"]
    assert [e["name"] for e in entries if e.get("constant")] == ["身の上"]
    assert [e["name"] for e in entries if not e["enabled"]] == ["秘密"]  # a disabled entry, kept
    assert next(e for e in entries if e["name"] == "流派")["keys"] == ["剣術", "流派は何か"]


def test_reimport_replaces_a_persona_folder_and_refuses_other_folders(tmp_path):
    out = tmp_path / "p"
    card_to_persona(load_card(CARDS / "student_casual.json"), out)
    (out / "stale.txt").write_text("old")
    card_to_persona(load_card(CARDS / "kansai_kushikatsu.json"), out)
    assert Persona.load(out).name == "鶴田美咲" and not (out / "stale.txt").exists()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(RagPersonaError, match=r"notes: folder is not empty and holds no persona\.json"):
        card_to_persona(load_card(CARDS / "student_casual.json"), other)
    assert [p.name for p in other.iterdir()] == ["todo.txt"]


def test_a_refused_persona_writes_nothing(tmp_path):
    def refuse(persona: dict):
        raise RagPersonaError("nope")

    out = tmp_path / "p"
    with pytest.raises(RagPersonaError, match="nope"):
        card_to_persona(load_card(CARDS / "student_casual.json"), out, validate=refuse)
    assert no_trace(out)


# ---- bad cards ---------------------------------------------------------------------------------------------


def _big_book(n: int) -> dict:
    card = card_json("student_casual")
    entry = card["data"]["character_book"]["entries"][0]
    card["data"]["character_book"]["entries"] = [dict(entry, name=f"e{i}") for i in range(n)]
    return card


def _with(name: str, path: list, value) -> dict:
    card = card_json(name)
    target = card
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return card


BAD_JSON = {
    "not-json.json": ("これはカードではありません", r"not a character card: neither a PNG nor JSON"),
    "list.json": ([1, 2], r"not a character card \(expected a JSON object, got list\)"),
    "no-card.json": ({"title": "x"}, r"not a character card \(no 'spec' and no V1 field 'name'"),
    "spec.json": ({"spec": "chara_card_v9", "data": {}}, r"unknown card spec 'chara_card_v9'"),
    "no-data.json": ({"spec": "chara_card_v2"}, r"field 'data': expected an object"),
    "empty-name.json": (_with("kansai_kushikatsu", ["data", "name"], "  "), r"field 'data\.name': empty"),
    "v1-name.json": ({"name": "", "description": "x"}, r"field 'name': empty"),
    "keys.json": (
        _with("samurai_ronin", ["data", "character_book", "entries", 0, "keys"], 5),
        r"field 'data\.character_book\.entries\[0\]\.keys': expected a list of strings, got int",
    ),
    "enabled.json": (
        _with("samurai_ronin", ["data", "character_book", "entries", 2, "enabled"], "yes"),
        r"entries\[2\]\.enabled': expected true or false",
    ),
    "huge-number.json": ('{"name": "a", "x": 1' + "0" * 5000 + "}", r"broken JSON \(Exceeds the limit"),
    "nested.json": ("[" * 200_000 + "]" * 200_000, r"broken JSON"),
    "path-id.json": (
        _with("samurai_ronin", ["data", "extensions"], {"rag_persona": {"id": "../../outside"}}),
        r"field 'id': '\.\./\.\./outside': use letters, digits",
    ),
    "too-many.json": (
        _big_book(MAX_BOOK_ENTRIES + 1),
        rf"lorebook has {MAX_BOOK_ENTRIES + 1} entries, the limit",
    ),
    "surrogate.json": (None, r"field 'data\.description': not valid Unicode"),
}


@pytest.mark.parametrize("file_name", list(BAD_JSON))
def test_bad_json_cards(tmp_path, file_name):
    content, message = BAD_JSON[file_name]
    path = tmp_path / file_name
    if file_name == "surrogate.json":  # JSON may spell a lone surrogate; Python decodes it without complaint
        card = _with("kansai_kushikatsu", ["data", "description"], "SURROGATE")
        path.write_text(json.dumps(card).replace("SURROGATE", "\\ud800"), encoding="utf-8")
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "out"
    result = runner.invoke(app, ["persona", "import", str(path), "--out", str(out)])
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}")
    assert re.search(message, lines[0]), lines[0]
    assert no_trace(out)


def test_bad_png_cards(tmp_path):
    card = card_json("student_casual")
    cases = {
        "no-chunk.png": (
            write_png(tmp_path / "no-chunk.png", Title="just a picture"),
            r"PNG holds no character card",
        ),
        "base64.png": (
            write_png(tmp_path / "base64.png", chara="eyJu!!!"),
            r"PNG chunk 'chara'\): broken base64",
        ),
        "json.png": (
            write_png(tmp_path / "json.png", ccv3=base64.b64encode(b'{"spec": ').decode()),
            r"PNG chunk 'ccv3'\): broken JSON",
        ),
        "spec.png": (
            write_png(tmp_path / "spec.png", chara=b64({"spec": "other", "data": card["data"]})),
            r"PNG chunk 'chara'\): unknown card spec 'other'",
        ),
    }
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    cases["broken.png"] = (broken, r"not a readable PNG image \(Pillow cannot identify it\)")
    whole = write_png(tmp_path / "whole.png", chara=b64(card)).read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole[: len(whole) // 2])
    cases["cut.png"] = (cut, r"not a readable PNG image \(Truncated")
    for name, (path, message) in cases.items():
        out = tmp_path / f"out-{name}"
        with pytest.raises(RagPersonaError, match=message) as err:
            card_to_persona(load_card(path), out)
        assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
        assert no_trace(out)


def test_png_chunks_are_read_as_sillytavern_reads_them(tmp_path):
    """Chunk names in any case, base64 without padding or with line breaks, a broken ccv3 beside a good
    chara."""
    card = card_json("student_casual")
    raw = json.dumps(card, ensure_ascii=False).encode("utf-8")
    wrapped = base64.encodebytes(raw).decode("ascii")  # a line break every 76 characters
    padded = base64.b64encode(raw + b" " * ((1 - len(raw)) % 3)).decode("ascii")  # one byte past a triple
    assert padded.endswith("==")
    unpadded = padded.rstrip("=")
    pngs = [
        write_png(tmp_path / "upper.png", Chara=wrapped),
        write_png(tmp_path / "unpadded.png", chara=unpadded),
        write_png(tmp_path / "fallback.png", ccv3="not base64!", chara=b64(card)),
    ]
    for png in pngs:
        assert load_card(png).name == card["data"]["name"], png.name


def test_a_long_entry_becomes_several_facts_and_selective_keys_only_filter(tmp_path):
    card = card_json("samurai_ronin")
    entry = card["data"]["character_book"]["entries"][3]
    paragraphs = ["一文目の長い説明でござる。" * 60, "二段落目の説明でござる。" * 60, "結び。"]
    entry.update(content="\n\n".join(paragraphs), name="長い項目", keys=["剣"], secondary_keys=["流派"])
    entry.update(selective=True, position="after_char")
    path = tmp_path / "long.json"
    path.write_text(json.dumps(card, ensure_ascii=False), encoding="utf-8")
    folder = card_to_persona(load_card(path), tmp_path / "out")
    parts = [f for f in folder.facts if f.id.startswith("長い項目")]
    assert [f.id for f in parts] == ["長い項目", "長い項目-part2"]
    assert all(len(f.text) <= 1000 for f in parts)
    assert "".join(f.text for f in parts).replace("\n", "") == "".join(paragraphs)
    assert all(
        f.extra["keywords"] == ["剣"] for f in parts
    )  # 流派 narrows 剣's matches; alone it finds nothing
    assert any("1507 characters, over 1000: split into 2 facts" in w for w in folder.warnings)
    back = json.loads(persona_to_card(tmp_path / "out", tmp_path / "back.json").path.read_text())
    parts_back = [e for e in back["data"]["character_book"]["entries"] if e["name"].startswith("長い項目")]
    for e in parts_back:  # every part keeps the entry's own fields, so none fires on 剣 alone
        assert (e["selective"], e["secondary_keys"], e["position"]) == (True, ["流派"], "after_char")


def test_what_a_persona_has_no_place_for_comes_back_in_the_export(tmp_path):
    """Alternate greetings, post-history instructions, tags, other tools' extensions, lorebook settings,
    an entry's own fields and disabled entries survive card → persona folder → card; a Japanese-only name
    gets a hashed id."""
    card = card_json("kansai_kushikatsu")
    card["data"].update(name="花子", post_history_instructions="{{char}}は短く答える。")
    card["data"]["extensions"]["depth_prompt"] = {"prompt": "x", "depth": 4}
    entry = card["data"]["character_book"]["entries"][1]
    entry.update(position="after_char", priority=3, extensions={"probability": 50})
    card["data"]["character_book"]["entries"][2]["content"] = " "  # enabled but empty: no fact, kept
    path = tmp_path / "花子.json"
    path.write_text(json.dumps(card, ensure_ascii=False), encoding="utf-8")
    folder = card_to_persona(load_card(path), tmp_path / "p")
    assert re.fullmatch(r"card-[0-9a-f]{8}", folder.persona["id"])
    assert convert_card(load_card(CARDS / "samurai_ronin.json")).persona["id"] != folder.persona["id"]
    notes = [w for w in folder.warnings if "kept in card_extras.json for the export" in w]
    assert len(notes) == 1
    for name in ("post_history_instructions", "alternate_greetings", "tags", "extensions.depth_prompt"):
        assert name in notes[0]
    back = json.loads(persona_to_card(tmp_path / "p", tmp_path / "back.json").path.read_text())["data"]
    for key in ("post_history_instructions", "alternate_greetings", "tags", "creator", "creator_notes"):
        assert back[key] == card["data"][key], key
    assert back["extensions"]["depth_prompt"] == {"prompt": "x", "depth": 4}
    assert back["extensions"]["talkativeness"] == card["data"]["extensions"]["talkativeness"]
    book, original = back["character_book"], card["data"]["character_book"]
    assert (book["scan_depth"], book["token_budget"]) == (original["scan_depth"], original["token_budget"])
    by_name = {e["name"]: e for e in book["entries"]}
    again = by_name[entry["name"]]
    assert (again["position"], again["priority"], again["extensions"]["probability"]) == ("after_char", 3, 50)
    selective = by_name["好きなもの"]
    assert (selective["selective"], selective["secondary_keys"]) == (True, ["野球"])
    assert [e["name"] for e in book["entries"] if not e["enabled"]] == ["裏メニュー"]
    assert by_name["看板メニュー"]["content"] == " " and "看板メニュー" not in {f.id for f in folder.facts}
    assert len({e["id"] for e in book["entries"]}) == len(book["entries"])


def test_export_refuses_what_import_would_and_an_out_path_under_a_file_is_one_line(tmp_path):
    out = tmp_path / "p"
    card_to_persona(load_card(CARDS / "student_casual.json"), out)
    fact = json.loads((out / "facts.jsonl").read_text(encoding="utf-8").splitlines()[0])
    # As many facts as a lorebook holds, plus the card's disabled entry kept in card_extras.json: one over.
    rows = [json.dumps(dict(fact, id=f"f{i}"), ensure_ascii=False) for i in range(MAX_BOOK_ENTRIES)]
    (out / "facts.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(
        RagPersonaError,
        match=rf"{MAX_BOOK_ENTRIES} facts \(\+ 1 skipped entries kept in card_extras.json\), a card's lorebook",
    ):
        persona_to_card(out, tmp_path / "big.json")
    assert not (tmp_path / "big.json").exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = runner.invoke(
        app, ["persona", "import", str(CARDS / "student_casual.json"), "--out", str(blocker / "p")]
    )
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert "is a file" in result.stderr


def test_oversized_card_file(tmp_path):
    path = tmp_path / "huge.json"
    card = card_json("student_casual")
    card["data"]["creator_notes"] = "x" * MAX_CARD_BYTES
    path.write_text(json.dumps(card), encoding="utf-8")
    with pytest.raises(
        RagPersonaError, match=rf"huge\.json: \d+ bytes, the limit for a card file is {MAX_CARD_BYTES}"
    ):
        load_card(path)


def test_empty_entries_are_skipped_with_a_warning(tmp_path):
    card = card_json("kansai_kushikatsu")
    entries = card["data"]["character_book"]["entries"]
    entries[2]["content"] = "   "
    entries[3]["content"] = "@@depth 4\n"  # nothing left once the decorator is dropped
    path = tmp_path / "card.json"
    path.write_text(json.dumps(card, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "out"
    result = run_cli("persona", "import", path, "--out", out)
    assert result.stdout.splitlines() == [
        f"wrote persona 'card' (鶴田美咲) to {out}: 5 facts (1 constant), 2 example dialogues; "
        "3 lorebook entries skipped (1 disabled, 2 empty)"
    ]
    assert "entries[2] ('看板メニュー'): empty content, skipped" in result.stderr
    assert "entries[3] ('揚げ油'): empty content, skipped" in result.stderr
    assert "看板メニュー" not in load_knowledge(out).ids


# ---- CLI ---------------------------------------------------------------------------------------------------


def test_cli_import_export(tmp_path):
    out = tmp_path / "ronin"
    card = CARDS / "samurai_ronin.json"
    result = run_cli("persona", "import", card, "--out", out, "--id", "ronin", "--user-name", "町人")
    assert result.stdout.splitlines() == [
        f"wrote persona 'ronin' (榊原蔵人) to {out}: 8 facts (1 constant), 2 example dialogues; "
        "1 lorebook entries skipped (1 disabled, 0 empty)"
    ]
    assert Persona.load(out).greeting.endswith("町人殿でござるか。")
    png = tmp_path / "ronin.png"
    assert run_cli("persona", "export", out, "--out", png).stdout.splitlines() == [
        f"wrote chara_card_v3 PNG card for 榊原蔵人 to {png}: "
        "8 lorebook entries (1 constant), 2 example dialogues"
    ]
    bad = runner.invoke(app, ["persona", "export", str(out), "--out", str(tmp_path / "card.txt")])
    assert (
        bad.exit_code == 2
        and bad.stderr.strip() == f"error: {tmp_path / 'card.txt'}: a card file name ends in .json or .png"
    )
    missing = runner.invoke(app, ["persona", "export", str(tmp_path / "nothing"), "--out", str(png)])
    assert (
        missing.exit_code == 2
        and missing.stderr == f"error: {tmp_path / 'nothing'}: no such persona folder\n"
    )


def test_cli_import_index_search_end_to_end(tmp_path):
    """A card's lorebook fact found by the real index and search commands on the bundled embedder."""
    persona = tmp_path / "kushikatsu"
    run_cli("persona", "import", CARDS / "kansai_kushikatsu.json", "--out", persona)
    index = tmp_path / "index"
    info = cli_json("index", "--kb", persona, "--out", index, "--json")
    assert info["facts"] == 7 and info["keys"] == 9  # 7 facts + their 2 question-like keys
    for query, expected in [
        ("お店は何曜日が休みですか？", "定休日"),
        ("ソースに二回つけてもいい？", "二度づけ禁止"),
    ]:
        assert json.loads(run_cli("search", "--index", index, "--json", query).stdout)[0]["id"] == expected


@pytest.mark.parametrize(
    ("card", "question", "fact", "name"),
    [
        ("kansai_kushikatsu", "定休日っていつなん？", "定休日", "鶴田美咲"),
        ("samurai_ronin", "お主の流派は何か", "流派", "榊原蔵人"),
        ("student_casual", "部活なにやってんの？", "部活", "早瀬陸"),
    ],
)
def test_import_then_ask_with_persona_folder_end_to_end(
    tmp_path, monkeypatch, tiny_model_dir, card, question, fact, name
):
    """import → ask --persona DIR (its index built on first use) → the card's prompt and lorebook fact,
    for cards of three registers; the chat model is a tiny random one (mechanics, not quality)."""
    monkeypatch.setenv("RAG_PERSONA_HOME", str(tmp_path / "home"))
    persona = tmp_path / card
    run_cli("persona", "import", CARDS / f"{card}.json", "--out", persona)
    model_args = [*tiny_model_args(tiny_model_dir, 3), "--engine", "transformers", "--json"]
    reply = cli_json("ask", question, "--persona", persona, *model_args)
    assert fact in [c["id"] for c in reply["context"]]
    system = cli_json("render-prompt", question, "--persona", persona, "--json")["messages"][0]["content"]
    assert system.startswith(f"あなたは{name}です。") and "お嬢様" not in system
