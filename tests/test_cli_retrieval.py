"""The retrieval commands of DESIGN.md: index, search, eval-retrieval, tune-threshold (--json parses)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rag_persona.cli.app import app

DATA = Path(__file__).parent / "data"
runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    kb = root / "kb.jsonl"
    shutil.copy(DATA / "mini_kb.jsonl", kb)
    result = run("index", "--kb", str(kb), "--out", str(root / "index"), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["facts"] == 10 and info["keys"] == 11 and info["embedder"]["name"] == "e5-small"
    return root / "index"


def test_search_json(index):
    result = run("search", "--index", str(index), "--json", "あなたの名前はなんですか?")
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert hits[0]["id"] == "name" and set(hits[0]) == {"id", "text", "score"}
    assert len(hits) <= 3
    capped = json.loads(
        run("search", "--index", str(index), "--threshold", "0", "--k", "2", "--json", "猫").stdout
    )
    assert len(capped) == 2 and capped[0]["score"] >= capped[1]["score"]
    assert json.loads(run("search", "--index", str(index), "--json", "日本の首都は？").stdout) == []
    lexical = json.loads(run("search", "--index", str(index), "--mode", "lexical", "--json", "誕生日").stdout)
    assert lexical[0]["id"] == "birthday"


def test_eval_and_tune_threshold_json(index, tmp_path):
    queries = str(DATA / "mini_queries.jsonl")
    result = run("eval-retrieval", "--index", str(index), "--queries", queries, "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    for key in ("precision", "recall", "f1", "top1_hit_rate", "offtopic_rejection"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["threshold_source"] == "default"
    plot = tmp_path / "sweep.png"
    result = run("tune-threshold", "--index", str(index), "--queries", queries, "--plot", str(plot), "--json")
    assert result.exit_code == 0, result.output
    tuned = json.loads(result.stdout)
    assert plot.read_bytes()[:4] == b"\x89PNG"
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["threshold"] == tuned["threshold"] and manifest["threshold_mode"] == "hybrid"
    after = json.loads(run("eval-retrieval", "--index", str(index), "--queries", queries, "--json").stdout)
    assert after["threshold_source"] == "tuned" and after["f1"] >= metrics["f1"] - 1e-9
    plain = run("tune-threshold", "--index", str(index), "--queries", queries)
    assert float(plain.stdout.strip()) == pytest.approx(tuned["threshold"])


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"id": "x", "text": "ok"}\n{"id": "y", "text": \n', r"kb\.jsonl:2: malformed JSON"),
        (
            '{"id": "x", "text": "ok"}\n{"id": "x", "text": "again"}\n',
            r"kb\.jsonl:2: field 'id': duplicate id",
        ),
        ('{"id": "x", "text": ""}\n', r"kb\.jsonl:1: field 'text': empty"),
    ],
)
def test_bad_knowledge_is_one_line_and_leaves_the_index_untouched(index, tmp_path, line, expected):
    before = {p.name: p.read_bytes() for p in index.iterdir()}
    bad = tmp_path / "kb.jsonl"
    bad.write_text(line, encoding="utf-8")
    result = run("index", "--kb", str(bad), "--out", str(index))
    assert result.exit_code == 2
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message
    assert re.search(expected, message), message
    assert {p.name: p.read_bytes() for p in index.iterdir()} == before


def test_missing_files_are_one_line(index, tmp_path):
    result = run("index", "--kb", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "i"))
    assert result.exit_code == 2 and "nope.jsonl: no such file or folder" in result.stderr
    result = run("eval-retrieval", "--index", str(index), "--queries", str(tmp_path / "q.jsonl"), "--json")
    assert result.exit_code == 2 and "q.jsonl: no such file" in result.stderr
    result = run("search", "--index", str(tmp_path / "nowhere"), "--json", "x")
    assert result.exit_code == 2 and "no such index folder" in result.stderr


def test_search_without_index_uses_the_default_persona(tmp_path, monkeypatch):
    monkeypatch.setenv("RAG_PERSONA_HOME", str(tmp_path / "home"))
    result = run("search", "--json", "あなたの名前はなんですか?")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["id"] == "profile-name"
    assert (tmp_path / "home" / "indexes" / "ojousama" / "manifest.json").is_file()


def test_persona_flag_picks_the_persona_for_index_search_and_eval(tmp_path, monkeypatch):
    monkeypatch.setenv("RAG_PERSONA_HOME", str(tmp_path / "home"))
    result = run("index", "--persona", "kansai", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["index"] == str(tmp_path / "home" / "indexes" / "kansai")
    result = run("search", "--persona", "kansai", "--json", "猫舌なん？")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["id"] == "weakness-nekojita"
    queries = Path(__file__).parents[1] / "knowledge" / "kansai" / "queries" / "dev_multiturn.jsonl"
    result = run("eval-retrieval", "--persona", "kansai", "--queries", str(queries), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["queries"] == 42
    missing = run("search", "--persona", str(tmp_path / "nope"), "x")
    assert missing.exit_code == 2 and "no such persona folder" in missing.stderr
