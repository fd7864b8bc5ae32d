"""build-data: SFT/DPO files from the knowledge base, identical prompts to the chat path, deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_tokenizer

from rag_persona.chat import default_persona, plan_turn
from rag_persona.errors import RagPersonaError
from rag_persona.knowledge.facts import load_queries
from rag_persona.retrieval.retriever import retriever_for
from rag_persona.retrieval.store import build_index
from rag_persona.settings import KNOWLEDGE_ROOT
from training.data.build import DataConfig, build_datasets, normalise
from training.data.dialogues import load_dialogues

PERSONA_DIR = KNOWLEDGE_ROOT / "ojousama"


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("index") / "ojousama"
    build_index(PERSONA_DIR, out)
    return out


@pytest.fixture(scope="module")
def built(index_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("data") / "v1"
    return out, build_datasets(DataConfig(out=out, index=index_dir, seed=7))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_files_variants_and_manifest(built, index_dir):
    out, manifest = built
    names = {p.name for p in out.iterdir()}
    for variant in ("d0", "d1", "d2"):
        assert f"sft_{variant}_train.jsonl" in names and f"sft_{variant}_eval.jsonl" in names
    assert {"dpo_d0_train.jsonl", "dpo_d1_train.jsonl", "manifest.json", "eval_prompts.jsonl"} <= names
    counts = manifest["counts"]
    assert counts["sft_d2_train.jsonl"] == counts["sft_d0_train.jsonl"] + counts["sft_d1_train.jsonl"]
    assert counts["sft_d1_train.jsonl"] >= 400
    assert manifest["prompt_template_version"] and manifest["seed"] == 7
    assert (
        manifest["knowledge_hash"] == json.loads((index_dir / "manifest.json").read_text())["knowledge_hash"]
    )
    d0 = _rows(out / "sft_d0_train.jsonl")
    d1 = _rows(out / "sft_d1_train.jsonl")
    assert {r["style"] for r in d0} == {"plain"} and {r["style"] for r in d1} == {"ojousama"}
    assert "ですわ" in "".join(r["completion"][0]["content"] for r in d1)
    dpo = _rows(out / "dpo_d1_train.jsonl")[0]
    assert set(dpo) >= {"prompt", "chosen", "rejected"} and dpo["chosen"] != dpo["rejected"]


def test_raft_shares_are_applied_on_train_only(built):
    out, _ = built
    train = _rows(out / "sft_d1_train.jsonl")
    kinds = [r["raft"] for r in train]
    share = {k: kinds.count(k) / len(kinds) for k in set(kinds)}
    assert 0.2 < share["distractors"] < 0.4 and 0.03 < share["drop_golden"] < 0.15
    for r in train:
        if r["raft"] == "drop_golden":
            assert not set(r["golden_ids"]) & set(r["context_ids"])
    assert {r["raft"] for r in _rows(out / "sft_d1_eval.jsonl")} == {"none"}


def test_prompt_is_token_for_token_what_the_chat_path_builds(built, index_dir):
    from rag_persona.retrieval.store import load_index

    out, _ = built
    persona = default_persona()
    retriever = retriever_for(load_index(index_dir))
    tokenizer = make_tokenizer()
    rows = [r for r in _rows(out / "sft_d1_train.jsonl") if r["raft"] == "none"]
    multi = [r for r in rows if r["turn"] > 0][:5]
    assert multi, "multi-turn examples must exist"
    for row in rows[:20] + multi:
        history = row["prompt"][1:-1]
        plan = plan_turn(persona, retriever, history, row["prompt"][-1]["content"])
        assert [f.id for f in plan.context] == row["context_ids"]
        ours = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True)
        chat = tokenizer.apply_chat_template(plan.messages, add_generation_prompt=True)
        assert ours == chat


def test_same_seed_is_byte_identical_and_threshold_changes_contexts(built, index_dir, tmp_path):
    out, manifest = built
    again = tmp_path / "again"
    build_datasets(DataConfig(out=again, index=index_dir, seed=7))
    for p in sorted(out.iterdir()):
        assert (again / p.name).read_bytes() == p.read_bytes(), p.name
    strict = tmp_path / "strict"
    m2 = build_datasets(DataConfig(out=strict, index=index_dir, seed=7, threshold=0.99))
    assert m2["retrieval"]["threshold"] == 0.99 != manifest["retrieval"]["threshold"]
    a = [r["context_ids"] for r in _rows(out / "sft_d1_eval.jsonl")]
    b = [r["context_ids"] for r in _rows(strict / "sft_d1_eval.jsonl")]
    assert a != b and sum(map(len, b)) < sum(map(len, a))


def test_no_retrieval_test_query_reaches_training_data(built):
    out, manifest = built
    test_queries = {normalise(q.query) for q in load_queries(PERSONA_DIR / "queries" / "test.jsonl")}
    for name in manifest["files"]:
        for row in _rows(out / name):
            messages = row.get("prompt") or []
            users = [m["content"] for m in messages if m["role"] == "user"] + [row.get("query", "")]
            assert not {normalise(u) for u in users if u} & test_queries, (name, row["id"])


def test_bad_dialogue_line_names_file_line_and_field(tmp_path):
    path = tmp_path / "dialogues.jsonl"
    path.write_text(
        '{"id": "c1", "turns": [{"user": "a", "ojousama": "b", "plain": "c", "facts": []}]}\n'
        '{"id": "c2", "turns": [{"user": "a", "ojousama": "", "plain": "c"}]}\n',
        encoding="utf-8",
    )
    with pytest.raises(RagPersonaError, match=r"dialogues.jsonl:2: field 'turns\[0\].ojousama'"):
        load_dialogues(path)
    path.write_text(
        '{"id": "c1", "turns": [{"user": "a", "ojousama": "b", "plain": "c", "facts": ["nope"]}]}\n'
    )
    with pytest.raises(RagPersonaError, match="unknown fact id 'nope'"):
        load_dialogues(path, {"profile-name"})


def test_failed_build_leaves_previous_output_untouched(built, index_dir, monkeypatch):
    out, _ = built
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import training.data.build as build

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(build, "file_sha256", boom)
    with pytest.raises(RuntimeError):
        build_datasets(DataConfig(out=out, index=index_dir, seed=7))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not list(out.parent.glob(".v1.tmp-*"))


def test_render_prompt_cli_prints_the_chat_messages(index_dir):
    from typer.testing import CliRunner

    from rag_persona.cli.app import app

    result = CliRunner().invoke(
        app, ["render-prompt", "--index", str(index_dir), "--json", "あなたの名前はなんですか?"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [m["role"] for m in out["messages"]] == ["system", "user"]
    assert out["context"][0]["id"] == "profile-name"
    assert "名前は小野寺絢音" in out["messages"][0]["content"]
    bad = CliRunner().invoke(app, ["render-prompt", "--index", str(index_dir), "--history", "{", "hi"])
    assert bad.exit_code == 2 and "--history: invalid JSON" in bad.output
    bad = CliRunner().invoke(app, ["render-prompt", "--history", '[{"role": "usr", "content": "x"}]', "hi"])
    assert (
        bad.exit_code == 2 and "--history: item 1 (role 'usr'): role must be user or assistant" in bad.output
    )
    bad = CliRunner().invoke(app, ["render-prompt", "  "])
    assert bad.exit_code == 2 and "message: empty" in bad.output


def test_teacher_paraphrases_are_marked_generated_and_train_only(index_dir, tmp_path):
    asked = []

    def teacher(prompt: str) -> str:
        asked.append(prompt)
        question = prompt.rsplit("質問: ", 1)[1]
        return f"質問: ねえ、{question}\n(余計な説明)"

    out = tmp_path / "aug"
    manifest = build_datasets(
        DataConfig(out=out, index=index_dir, seed=7, augment_paraphrases=5), teacher=teacher
    )
    assert manifest["generated_conversations"] == 5 and len(asked) == 5
    generated = [r for r in _rows(out / "sft_d1_train.jsonl") if r["generated"]]
    assert len(generated) == 5
    assert all(r["prompt"][-1]["content"].startswith("ねえ、") for r in generated)
    assert all(r["conversation"].endswith("-para") for r in generated)
    assert not [r for r in _rows(out / "sft_d1_eval.jsonl") if r["generated"]]
    plain = _rows(out / "sft_d1_train.jsonl")
    assert sum(not r["generated"] for r in plain) == len(plain) - 5


def test_fact_questions_add_train_only_turns_answered_by_the_fact(index_dir, built, tmp_path):
    from rag_persona.knowledge.facts import load_knowledge

    out = tmp_path / "fq"
    manifest = build_datasets(DataConfig(out=out, index=index_dir, seed=7, fact_questions=True))
    kb = load_knowledge(PERSONA_DIR)
    held_out = {normalise(q.query) for q in load_queries(PERSONA_DIR / "queries" / "test.jsonl")}
    expected = sum(1 for f in kb.facts for q in f.questions if normalise(q) not in held_out)
    assert manifest["fact_question_conversations"] == expected > 100
    rows = [r for r in _rows(out / "dpo_d1_train.jsonl") if r["kind"] == "fact-question"]
    assert len(rows) == expected
    name = next(r for r in rows if r["golden_ids"] == ["profile-name"])
    assert name["prompt"][-1]["content"] in kb.by_id()["profile-name"].questions
    assert name["chosen"][0]["content"] == "名前は小野寺絢音（おのでら あやね）ですわ。"
    assert name["rejected"][0]["content"] == "名前は小野寺絢音（おのでら あやね）です。"
    # The dialogue rows and the held-out split are exactly those of the build without the option.
    base_dir, _ = built
    for f in ("sft_d1_eval.jsonl", "eval_prompts.jsonl"):
        assert (out / f).read_bytes() == (base_dir / f).read_bytes()
    dialogue = [r for r in _rows(out / "sft_d1_train.jsonl") if r["kind"] != "fact-question"]
    assert dialogue == _rows(base_dir / "sft_d1_train.jsonl")


def test_v2_dialogues_join_the_build_and_reach_the_eval_prompts(index_dir, tmp_path):
    out = tmp_path / "v2"
    manifest = build_datasets(
        DataConfig(out=out, index=index_dir, seed=7, dialogues=["dialogues.jsonl", "dialogues_v2.jsonl"])
    )
    assert set(manifest["dialogues_sha256"]) == {"dialogues.jsonl", "dialogues_v2.jsonl"}
    kinds = {row["kind"] for row in _rows(out / "eval_prompts.jsonl")}
    assert {"identity", "unanswerable"} <= kinds | {r["kind"] for r in _rows(out / "sft_d1_train.jsonl")}
    train_ids = {row["id"].split("-t")[0] for row in _rows(out / "sft_d1_train.jsonl")}
    assert any(i.startswith("v2-") for i in train_ids) and any(i.startswith("c") for i in train_ids)
    # the same file twice: every id repeats, one error line, nothing written
    with pytest.raises(RagPersonaError, match=r"conversation id 'c0001' also in dialogues.jsonl"):
        build_datasets(DataConfig(out=tmp_path / "dup", index=index_dir, dialogues=["dialogues.jsonl"] * 2))
    assert not (tmp_path / "dup").exists()
