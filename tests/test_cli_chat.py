"""The chat commands with a tiny random model: `ask` (plain and --json) and the terminal `chat` loop."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from rag_persona.cli.app import app

runner = CliRunner()


def test_ask_streams_a_reply_or_prints_it_as_json(tiny_model_dir):
    args = [
        "ask",
        "ごきげんよう",
        "--model",
        str(tiny_model_dir),
        "--adapter",
        "none",
        "--max-new-tokens",
        "3",
    ]
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    reply = json.loads(res.stdout[res.stdout.index("{") :])
    assert 0 < reply["new_tokens"] <= 3 and isinstance(reply["ended_by_eos"], bool)
    plain = runner.invoke(app, args)
    assert plain.exit_code == 0, plain.output
    assert "tokens in" in plain.stderr and "ended by" in plain.stderr


def test_chat_answers_each_line_skips_a_refused_one_and_stops_at_an_empty_line(tiny_model_dir, persona_index):
    args = ["chat", "--model", str(tiny_model_dir), "--adapter", "none", "--index", str(persona_index)]
    lines = ["あなたの名前はなんですか?", "x" * 1001, "日本の首都は？", "", "never read"]
    res = runner.invoke(app, args, input="\n".join(lines) + "\n")
    assert res.exit_code == 0, res.output
    assert res.stdout.count("bot> ") == 2
    assert "error: message: 1001 characters, the limit is 1000" in res.stderr
    contexts = [line for line in res.stderr.splitlines() if "context: " in line]
    assert len(contexts) == 2
    assert "profile-name (" in contexts[0] and contexts[1].endswith("context: (none)")


def test_chat_refuses_an_unknown_mode():
    res = runner.invoke(app, ["chat", "--mode", "telepathy"])
    assert res.exit_code == 2 and "mode 'telepathy' is not one of prompt, xattn" in res.output


def test_a_missing_or_foreign_adapter_folder_is_refused_before_the_model_opens(tmp_path, monkeypatch):
    import rag_persona.generation.engines as engines

    def never(*args, **kwargs):
        raise AssertionError("the model was opened before the adapter was checked")

    monkeypatch.setattr(engines, "open_engine", never)
    res = runner.invoke(app, ["ask", "こんにちは", "--adapter", str(tmp_path / "nope")])
    assert res.exit_code == 2 and res.stderr.strip().endswith("nope: no such adapter folder"), res.output
    res = runner.invoke(app, ["ask", "こんにちは", "--adapter", str(tmp_path)])
    assert res.exit_code == 2 and "not a peft adapter folder (no adapter_config.json)" in res.stderr


def test_a_bad_setting_a_missing_model_folder_and_a_zero_limit_are_one_line(tmp_path, monkeypatch):
    res = runner.invoke(app, ["ask", "hi", "--engine", "transformers", "--model", str(tmp_path / "none")])
    assert res.exit_code == 2 and res.stderr.strip().endswith("none: no such model folder"), res.output
    res = runner.invoke(app, ["evaluate", "prompts.jsonl", "--limit", "0"])
    assert res.exit_code == 2 and "--limit" in res.output
    monkeypatch.setenv("RAG_PERSONA_MAX_FACT_CHARS", "abc")
    res = runner.invoke(app, ["search", "名前"])
    assert res.exit_code == 2 and res.stderr.startswith("error: RAG_PERSONA_MAX_FACT_CHARS='abc': "), (
        res.output
    )


def test_what_counts_as_a_local_path_for_a_model_or_adapter_name(tmp_path, monkeypatch):
    from rag_persona.utils.io import means_local_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert means_local_path("./x") and means_local_path("~/x") and means_local_path(str(tmp_path / "nope"))
    assert means_local_path("runs/sft-0.5b")  # under a folder that exists here
    assert not means_local_path("Qwen/Qwen2.5-0.5B-Instruct")  # a hub id
    assert not means_local_path("")  # no parts at all: was an IndexError
