"""On-policy DPO pairs: the model's own failing replies to training prompts, judged as evaluate judges."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli
from typer.testing import CliRunner

from rag_persona.cli.app import app
from rag_persona.errors import RagPersonaError
from rag_persona.prompts import ContextFact, build_messages
from rag_persona.settings import KNOWLEDGE_ROOT
from rag_persona.utils.io import write_jsonl
from training.data.onpolicy import (
    MARKER,
    TRAIN_FILE,
    Sampled,
    onpolicy_pairs,
    per_kind_counts,
    pick_rows,
    reply_source,
)

FACTS = {
    "profile-age": "小野寺絢音は17歳の高校2年生。",
    "hobby-piano": "趣味はピアノで、5歳から習っている。",
}


def _row(persona, rid, query, chosen, kind, golden=(), context=(), raft="none"):
    ctx = [ContextFact(fid, FACTS[fid], 0.9) for fid in context]
    return {
        "id": rid,
        "prompt": build_messages(persona, ctx, [], query),
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": "plain"}],
        "kind": kind,
        "golden_ids": list(golden),
        "context_ids": list(context),
        "raft": raft,
    }


@pytest.fixture
def rows(persona):
    return [
        _row(
            persona, "a-t0", "何歳なの？", "わたくしは17歳ですわ。", "fact", ["profile-age"], ["profile-age"]
        ),
        _row(persona, "b-t0", "君は誰？", "わたくしは小野寺絢音と申しますの。", "identity"),
        _row(
            persona,
            "c-t0",
            "ピアノはいつから？",
            "5歳から習っておりますの。",
            "fact",
            ["hobby-piano"],
            ["hobby-piano"],
        ),
        # The golden fact is not in the prompt: its chosen answer would teach stating what the context lacks.
        _row(persona, "d-t0", "ピアノ歴は？", "5歳から続けておりますわ。", "fact", ["hobby-piano"], []),
        _row(
            persona,
            "e-t0",
            "何歳？",
            "17歳ですわ。",
            "fact",
            ["profile-age"],
            ["profile-age"],
            raft="drop_golden",
        ),
        _row(persona, "f-t0", "1キロって何メートル？", "1000メートルですわ。", "general"),
        # Who she is: the system prompt names her, whatever retrieval found.
        _row(persona, "g-t0", "どちら様？", "小野寺絢音と申しますの。", "identity", ["profile-name"], []),
    ]


def test_only_grounded_rows_are_answered_capped_per_kind(rows):
    picked = [r["id"] for r in pick_rows(rows, per_kind=10, seed=0)]
    assert picked == ["a-t0", "b-t0", "c-t0", "f-t0", "g-t0"]
    capped = pick_rows(rows, per_kind=1, seed=0)
    assert sorted(r["kind"] for r in capped) == ["fact", "general", "identity"]
    assert pick_rows(rows, per_kind=1, seed=0) == capped  # seeded
    named = pick_rows(rows, per_kind=per_kind_counts("0,fact=2", "--per-kind"), seed=0)
    assert [r["id"] for r in named] == ["a-t0", "c-t0"]
    with pytest.raises(RagPersonaError, match="identity=x"):
        per_kind_counts("3,identity=x", "--per-kind")
    with pytest.raises(RagPersonaError, match="default N"):
        per_kind_counts("identity=3", "--per-kind")


def test_failing_replies_become_rejected_and_passing_ones_do_not(rows, persona):
    replies = {
        "a-t0": Sampled("わたくしは15歳ですわ。", True),  # wrong fact, invented number
        "b-t0": Sampled("ごきげんよう、お会いできて嬉しいですわ。", True),  # never names herself
        "c-t0": Sampled("5歳からピアノを習っておりますの。", True),  # right
        # The reference's own "1000" is in no fact: the judge's invented-specifics rule excuses it here.
        "f-t0": Sampled("1キロは1000メートルですわ。", True),
    }
    picked = [r for r in pick_rows(rows, per_kind=10, seed=0) if r["id"] in replies]
    pairs, counts = onpolicy_pairs(picked, lambda r, k: replies[r["id"]], persona, FACTS)
    by_id = {p["id"]: p for p in pairs}
    assert sorted(by_id) == ["a-t0", "b-t0"]
    assert by_id["a-t0"]["onpolicy"] == ["fact", "invented"]
    assert by_id["b-t0"]["onpolicy"] == ["identity"]
    assert by_id["b-t0"]["rejected"] == [{"role": "assistant", "content": replies["b-t0"].text}]
    assert by_id["b-t0"]["chosen"] == rows[1]["chosen"] and by_id["b-t0"]["prompt"] == rows[1]["prompt"]
    assert counts["rows"] == 4 and counts["pairs"] == 2 and counts["greedy"] == 2


def test_a_passing_greedy_reply_gets_sampled_tries_until_one_fails(rows, persona):
    picked = [r for r in pick_rows(rows, per_kind=10, seed=0) if r["id"] == "b-t0"]
    tries = [Sampled("わたくしは小野寺絢音ですわ。", True), Sampled("ごきげんよう、嬉しいですわ。", True)]
    seen = []

    def sample(row, k):
        seen.append(k)
        return tries[min(k, 1)]

    pairs, counts = onpolicy_pairs(picked, sample, persona, FACTS, attempts=lambda r: 3)
    assert seen == [0, 1] and counts["sampled"] == 1
    assert pairs[0]["onpolicy"] == ["identity"] and pairs[0]["onpolicy_attempt"] == 1
    assert pairs[0]["rejected"][0]["content"] == tries[1].text


def test_cli_answers_with_the_model_writes_the_folder_and_resumes(tmp_path, tiny_model_dir, rows):
    data = tmp_path / "data"
    write_jsonl(data / "dpo_d1_train.jsonl", rows)
    write_jsonl(data / "dpo_d1_eval.jsonl", rows[:1])
    out = tmp_path / "pairs"
    # A reply kept from a killed run is used, not generated again: the reference itself (so no pair).
    # One another adapter wrote is not this model's reply: b-t0 is answered again (and fails).
    cache = tmp_path / "pairs.replies.jsonl"
    mine = reply_source(str(tiny_model_dir), None, "transformers")
    other = reply_source(str(tiny_model_dir), tmp_path / "other-adapter", "transformers")
    write_jsonl(
        cache,
        [
            {"id": "c-t0", "text": rows[2]["chosen"][0]["content"], "ended_by_eos": True, "by": mine},
            {"id": "b-t0", "text": rows[1]["chosen"][0]["content"], "ended_by_eos": True, "by": other},
        ],
    )
    args = ["--data", str(data), "--out", str(out), "--model", str(tiny_model_dir), "--adapter", "none"]
    args += [
        "--engine",
        "transformers",
        "--persona",
        str(KNOWLEDGE_ROOT / "ojousama"),
        "--mix",
        "1",
        "--json",
    ]
    result = run_cli("onpolicy-pairs", *args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / MARKER).read_text(encoding="utf-8"))
    train = [json.loads(line) for line in (out / TRAIN_FILE).read_text(encoding="utf-8").splitlines()]
    # The random model's replies fail (or run on without EOS) on every row but the one answered from the cache.
    paired = sorted(r["id"] for r in train if "onpolicy" in r)
    assert paired == ["a-t0", "b-t0", "f-t0", "g-t0"]
    assert manifest["counts"]["rows"] == 5 and manifest["counts"]["pairs"] == 4
    assert len(train) == 5 and manifest["mixed_source_rows"] == 1  # plus one source row for the register
    assert not cache.exists()
    assert "1 cached replies by another model/adapter/engine ignored" in result.output
    kept = [json.loads(line) for line in (out / "replies.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(r["id"] for r in kept) == [
        "a-t0",
        "b-t0",
        "c-t0",
        "f-t0",
        "g-t0",
    ]  # every reply, kept with the pairs
    # Someone else's folder is refused, untouched.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine", encoding="utf-8")
    args[args.index(str(out))] = str(foreign)
    refused = CliRunner().invoke(app, ["onpolicy-pairs", *args])
    assert refused.exit_code != 0 and "foreign" in refused.output and "grounded prompts" not in refused.output
    assert sorted(p.name for p in foreign.iterdir()) == ["keep.txt"]


def test_a_cached_reply_belongs_to_the_adapter_weights_that_wrote_it(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"first")
    before = reply_source("qwen2.5-coder-0.5b", adapter, "llama.cpp")
    assert before == reply_source("qwen2.5-coder-0.5b", str(adapter), "llama.cpp")
    assert before != reply_source("qwen2.5-coder-0.5b", adapter, "transformers")
    (adapter / "adapter_model.safetensors").write_bytes(b"retrained in place")
    assert before != reply_source("qwen2.5-coder-0.5b", adapter, "llama.cpp")


def test_bad_source_rows_and_a_missing_eval_file_are_refused_before_any_reply(tmp_path, rows, monkeypatch):
    import rag_persona.generation.engines as engines

    def never(*args, **kwargs):
        raise AssertionError("the model was opened before the data was checked")

    monkeypatch.setattr(engines, "open_engine", never)
    data = tmp_path / "data"
    args = ["onpolicy-pairs", "--data", str(data), "--out", str(tmp_path / "pairs"), "--adapter", "none"]
    cases = [
        (
            [*rows, rows[0]],
            rows,
            f"dpo_d1_train.jsonl:{len(rows) + 1}: field 'id': 'a-t0' repeats an earlier row's",
        ),
        ([{**rows[0], "chosen": []}], rows, "dpo_d1_train.jsonl:1: field 'chosen': missing"),
        (rows, None, "dpo_d1_eval.jsonl: DPO data file not found"),
    ]
    for train, evaluation, message in cases:
        write_jsonl(data / "dpo_d1_train.jsonl", train)
        (data / "dpo_d1_eval.jsonl").unlink(missing_ok=True)
        if evaluation is not None:
            write_jsonl(data / "dpo_d1_eval.jsonl", evaluation)
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2 and message in res.stderr, res.output
    res = CliRunner().invoke(app, [*args, "--mix", "-1"])
    assert res.exit_code == 2 and "--mix" in res.output
