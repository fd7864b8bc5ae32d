"""build-data over several personas: each built on its own, the rows mixed into one training set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cli_json

from rag_persona.errors import RagPersonaError
from rag_persona.knowledge.cards import card_to_persona, load_card
from training.data.build import DataConfig
from training.data.mix import build_mixed, expand_personas

CARDS = Path(__file__).parent / "data" / "cards"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def personas(tmp_path_factory) -> Path:
    """A folder of two persona folders written from two cards of different registers."""
    root = tmp_path_factory.mktemp("personas")
    for card in ("samurai_ronin", "kansai_kushikatsu"):
        card_to_persona(load_card(CARDS / f"{card}.json"), root / card)
    return root


def test_a_folder_of_personas_builds_one_mixed_set_with_every_row_in_its_own_persona(personas, tmp_path):
    out = tmp_path / "mixed"
    manifest = cli_json("build-data", "--persona", personas, "--out", out, "--eval-share", "0", "--json")
    assert [p["persona"] for p in manifest["personas"]] == ["kansai_kushikatsu", "samurai_ronin"]
    for part in manifest["personas"]:
        single = json.loads((out / part["folder"] / "manifest.json").read_text())
        assert single["counts"] == part["counts"] and single["knowledge_hash"] == part["knowledge_hash"]
    for name, count in manifest["counts"].items():
        assert count == sum(p["counts"].get(name, 0) for p in manifest["personas"])
    rows = _rows(out / "sft_d1_train.jsonl")
    names = {"samurai_ronin": "榊原蔵人", "kansai_kushikatsu": "鶴田美咲"}
    assert {r["persona"] for r in rows} == set(names)
    for row in rows:
        # each row is prompted as its own persona: the one prompt builder ran per persona
        assert row["prompt"][0]["content"].startswith(f"あなたは{names[row['persona']]}")
    # shuffled: the personas interleave instead of coming in two blocks
    order = [r["persona"] for r in rows]
    assert sum(a != b for a, b in zip(order, order[1:], strict=False)) > 1
    part_rows = _rows(out / "personas" / "samurai_ronin" / "sft_d1_train.jsonl")
    assert sorted(f"samurai_ronin/{r['id']}" for r in part_rows) == sorted(
        r["id"] for r in rows if r["persona"] == "samurai_ronin"
    )
    # ids stay unique across personas whose dialogue files share conversation ids
    for name in manifest["counts"]:
        ids = [r["id"] for r in _rows(out / name)]
        assert len(ids) == len(set(ids)), name


def test_expand_and_refusals(personas, tmp_path):
    both = [str(personas / "kansai_kushikatsu"), str(personas / "samurai_ronin")]
    assert expand_personas([str(personas)]) == both
    assert expand_personas(["kansai"]) == ["kansai"]
    with pytest.raises(RagPersonaError, match="neither a persona folder nor a folder of persona folders"):
        expand_personas([str(tmp_path)])
    with pytest.raises(RagPersonaError, match="given twice"):
        build_mixed(DataConfig(out=tmp_path / "twice"), [both[0], both[0]])
    assert not (tmp_path / "twice").exists()
    with pytest.raises(RagPersonaError, match="--index names one persona's index"):
        build_mixed(DataConfig(out=tmp_path / "idx", index=tmp_path), both)


def test_synthetic_dialogues_speak_each_personas_register_and_cite_its_facts():
    """The role-play adapter's training set: every invented character answers in its own register."""
    from rag_persona.knowledge.facts import load_knowledge
    from rag_persona.prompts import Persona
    from training.data.dialogues import load_dialogues
    from training.rerank.data import synthetic_personas

    folders = synthetic_personas()
    assert len(folders) >= 25
    for folder in folders:
        persona = Persona.load(folder)
        conversations = load_dialogues(folder / "dialogues.jsonl", set(load_knowledge(folder).ids))
        kinds = [c.kind for c in conversations]
        assert len(conversations) >= 32 and kinds.count("fact") >= 18 and kinds.count("refusal") >= 4, folder
        turns = [t for c in conversations for t in c.turns]
        # style.markers is what the persona metrics count; it lists a character's most telling words, not
        # every ending it uses (the lowest persona, gamer-kotaro, is at 0.74; its other replies end in 〜わ/草)
        in_register = sum(any(m in t.ojousama for m in persona.markers) for t in turns) / len(turns)
        assert in_register >= 0.7, (folder.name, in_register)
        test_queries = {
            json.loads(line)["query"] for line in (folder / "queries" / "test.jsonl").read_text().splitlines()
        }
        assert not test_queries & {t.user for t in turns}, folder.name  # held-out wordings stay held out
