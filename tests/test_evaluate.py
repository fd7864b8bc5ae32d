"""`rag-persona evaluate`: prompts through retrieval + the prompt builder + generation, persona summary."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from conftest import cli_json, tiny_model_args
from typer.testing import CliRunner

from rag_persona.chat import PersonaChat
from rag_persona.errors import RagPersonaError
from rag_persona.evaluation.evaluate import evaluate_chat, load_prompts, rejudge
from rag_persona.generation import GenerationSettings, Reply
from rag_persona.prompts import Persona

PERSONA = Persona(id="ojousama", name="小野寺絢音", reading="おのでら あやね", summary="17歳のお嬢様。")
FACTS = {"hobby": "趣味はピアノと乗馬。", "age": "小野寺絢音の年齢は17歳。"}


@dataclass
class FakeHit:
    fact_id: str
    text: str
    score: float


class FakeRetriever:
    """Finds a fact when the query mentions its topic; nothing otherwise."""

    def __init__(self):
        self.queries = []

    def search(self, query):
        self.queries.append(query)
        hits = []
        if "趣味" in query:
            hits.append(FakeHit("hobby", FACTS["hobby"], 0.9))
        if "歳" in query:
            hits.append(FakeHit("age", FACTS["age"], 0.88))
        return hits


@dataclass
class FakeStore:
    facts: list
    path: str = "fake-index"


@dataclass
class FactRow:
    id: str
    text: str


def _prompts_file(tmp_path):
    rows = [
        {"query": "趣味は何ですか？", "golden_ids": ["hobby"], "kind": "fact"},
        {
            "query": "何歳ですか？",
            "golden_ids": ["age"],
            "kind": "fact",
            "history": [
                {"role": "user", "content": "こんにちは"},
                {"role": "assistant", "content": "ごきげんよう"},
            ],
        },
        {"query": "Pythonでソートを書いて", "golden_ids": [], "kind": "refusal"},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


def test_load_prompts_errors_name_line_and_field(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"query": "a"}\n{"golden_ids": []}\n')
    with pytest.raises(RagPersonaError, match=r"p.jsonl:2: field 'query'"):
        load_prompts(bad)
    bad.write_text('{"query": "a", "history": "oops"}\n')
    with pytest.raises(RagPersonaError, match=r"p.jsonl:1: field 'history'"):
        load_prompts(bad)
    assert load_prompts(_prompts_file(tmp_path))[1].history[0]["content"] == "こんにちは"


def test_evaluate_chat_runs_the_chat_path_with_a_tiny_model(tiny_model_dir, tmp_path):
    from rag_persona.generation import load_causal_lm

    loaded = load_causal_lm(str(tiny_model_dir), progress=lambda m: None)
    retriever = FakeRetriever()
    chat = PersonaChat(PERSONA, retriever, loaded, GenerationSettings(max_new_tokens=8))
    out = evaluate_chat(chat, load_prompts(_prompts_file(tmp_path)), FACTS)
    assert retriever.queries == ["趣味は何ですか？", "何歳ですか？", "Pythonでソートを書いて"]
    replies = out["replies"]
    assert [r["context_ids"] for r in replies] == [["hobby"], ["age"], []]
    for r in replies:
        assert {"query", "reply", "ended_by_eos", "context_ids"} <= r.keys()
        assert isinstance(r["ended_by_eos"], bool)
    s = out["summary"]
    assert s["n"] == 3 and s["n_fact"] == 2 and s["n_offtopic"] == 1
    for key in (
        "style_rate",
        "median_chars",
        "one_sentence_rate",
        "eos_rate",
        "leak_rate",
        "fact_accuracy",
        "offtopic_handling",
    ):
        assert key in s


class ScriptedChat(PersonaChat):
    """The chat path with generation replaced by scripted replies (retrieval and prompts are real)."""

    def __init__(self, replies, **kw):
        super().__init__(**kw)
        self.replies = list(replies)
        self.plans = []

    def respond(self, history, user_turn):
        from rag_persona.chat import TurnResult, plan_turn

        plan = plan_turn(self.persona, self.retriever, history, user_turn)
        self.plans.append(plan)
        text, eos = self.replies.pop(0)
        return TurnResult(plan=plan, reply=Reply(text, eos, 10, len(plan.messages), 0.1))


def _scripted_chat():
    """Three scripted replies: a right fact, a wrong number with a leaked </s> and no EOS, a declined task."""
    return ScriptedChat(
        [
            ("ピアノと乗馬をたしなんでおりますの。", True),
            ("わたくし16歳ですわ。</s>", False),
            ("まあ、わたくしプログラムは書けませんの。", True),
        ],
        persona=PERSONA,
        retriever=FakeRetriever(),
        loaded=None,
    )


def test_summary_scores_the_replies(tmp_path):
    chat = _scripted_chat()
    out = evaluate_chat(chat, load_prompts(_prompts_file(tmp_path)), FACTS)
    assert (
        chat.plans[0].messages[0]["content"].endswith("- 趣味はピアノと乗馬。")
    )  # context went into the prompt
    assert chat.plans[1].messages[1:3] == [
        {"role": "user", "content": "こんにちは"},
        {"role": "assistant", "content": "ごきげんよう"},
    ]
    s = out["summary"]
    assert s["style_rate"] == 1.0
    assert s["fact_accuracy"] == 0.5  # 16 is not 17
    assert s["offtopic_handling"] == 1.0
    assert s["eos_rate"] == pytest.approx(2 / 3, abs=1e-3)
    assert s["leak_rate"] == pytest.approx(1 / 3, abs=1e-3)
    assert [r["fact_correct"] for r in out["replies"]] == [True, False, None]


def test_rejudge_scores_stored_replies_again_without_generating(tmp_path):
    chat = _scripted_chat()
    prompts = load_prompts(_prompts_file(tmp_path))
    out = evaluate_chat(chat, prompts, FACTS)
    again = rejudge(out["replies"], prompts, PERSONA, FACTS)
    assert again == out  # same rules, same verdicts; the stored leak is kept without a tokenizer
    # A reference reply (what the held-out turn answered) now keys the fact on the part it takes.
    prompts[0].reference = "乗馬をたしなんでおりますわ。"
    replies = [dict(out["replies"][0], reply="ピアノが好きですわ。"), *out["replies"][1:]]
    assert rejudge(replies, prompts, PERSONA, FACTS)["replies"][0]["fact_correct"] is False
    prompts[0].reference = ""
    assert rejudge(replies, prompts, PERSONA, FACTS)["replies"][0]["fact_correct"] is True
    with pytest.raises(RagPersonaError, match="2 replies for 3 prompts"):
        rejudge(out["replies"][:2], prompts, PERSONA, FACTS)
    with pytest.raises(RagPersonaError, match="stands where"):
        rejudge(out["replies"][::-1], prompts, PERSONA, FACTS)


def test_evaluate_cli_prints_replies_and_summary(tiny_model_dir, tmp_path, monkeypatch):
    import rag_persona.evaluation.evaluate as ev
    from rag_persona.cli.app import app

    monkeypatch.setattr(
        ev,
        "open_retriever",
        lambda index=None, persona=None, log=None: (
            FakeStore([FactRow(k, v) for k, v in FACTS.items()]),
            FakeRetriever(),
        ),
    )
    report = cli_json(
        "evaluate", "--prompts", _prompts_file(tmp_path), *tiny_model_args(tiny_model_dir, 4), "--json"
    )
    assert len(report["replies"]) == 3 and report["summary"]["n"] == 3
    assert report["setup"]["adapter"] is None and report["setup"]["mode"] == "prompt"
    bad = CliRunner().invoke(app, ["evaluate", "--prompts", str(tmp_path / "missing.jsonl")])
    assert bad.exit_code == 2 and "prompts file not found" in bad.output


def test_evaluate_cli_xattn_mode_runs_cross_attention_chat(tiny_model_dir, persona_index, tmp_path):
    from rag_persona.cli.app import app
    from rag_persona.generation import load_causal_lm
    from rag_persona.xattn import XattnConfig, XattnModel

    base = load_causal_lm(str(tiny_model_dir), progress=lambda m: None).model  # as the chat loads it
    x = XattnModel(base, XattnConfig(layers=[1], rank=4))
    x.save(tmp_path / "xw")
    x.remove_hooks()
    prompts = tmp_path / "p.jsonl"
    rows = [
        {"query": "あなたの名前はなんですか?", "golden_ids": ["profile-name"]},
        {"query": "ごきげんよう", "kind": "greeting"},
    ]
    prompts.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    args = [
        "evaluate",
        "--prompts",
        str(prompts),
        "--model",
        str(tiny_model_dir),
        "--index",
        str(persona_index),
    ]
    report = cli_json(*args, "--mode", "xattn", "--weights", tmp_path / "xw", "--max-new-tokens", 4, "--json")
    assert report["setup"]["mode"] == "xattn" and report["setup"]["adapter"] == str(tmp_path / "xw")
    assert "profile-name" in report["replies"][0]["context_ids"]  # retrieved, then given as memory
    assert report["summary"]["n"] == 2
    bad = CliRunner().invoke(app, [*args, "--mode", "xattn", "--weights", str(tmp_path / "none")])
    assert bad.exit_code == 2 and "no cross-attention weights" in bad.output
