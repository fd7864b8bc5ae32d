"""Faults a hostile or careless user causes: each case of the reliability issue as a test.

Disk: outputs never replace someone else's folder, killed writers leave nothing behind that the next run
does not clean, a crash between the two renames of a swap is undone on the next read. Knowledge: limits
checked once where facts enter, edits embed outside the lock chats wait on, a broken source file does not
take serving down. API: every error OpenAI-shaped (never a bare 500 or a hang, fuzzed with hypothesis over
the request schema), body size and numeric bounds, 404/405, unknown models, abandoned requests cancelled.
Servers are real (uvicorn on 127.0.0.1, the echo model of test_api); kills are real SIGKILLs.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from test_api import Server, chat, echo_engine

from rag_persona.errors import RagPersonaError
from rag_persona.knowledge.facts import load_knowledge
from rag_persona.settings import KNOWLEDGE_ROOT

REPO = Path(__file__).resolve().parent.parent


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _small_kb(folder: Path, n: int = 6) -> Path:
    """A persona-style knowledge folder with the first n facts of the お嬢様."""
    folder.mkdir(parents=True)
    lines = (KNOWLEDGE_ROOT / "ojousama" / "facts.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    (folder / "facts.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


# -- disk: guarded, atomic output folders ------------------------------------------------------------------
def test_build_data_refuses_a_folder_it_did_not_write(persona_index, tmp_path):
    from training.data.build import DataConfig, build_datasets

    out = tmp_path / "mine"
    (out / "kb").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes", encoding="utf-8")
    with pytest.raises(RagPersonaError, match=r"mine: folder is not empty and holds no eval_prompts.jsonl"):
        build_datasets(DataConfig(out=out, index=persona_index, seed=7))
    assert (out / "notes.txt").read_text(encoding="utf-8") == "my notes" and (out / "kb").is_dir()
    assert _siblings(out) == []
    # An index folder has a manifest.json too, and neither kind of output replaces the other.
    with pytest.raises(RagPersonaError, match=r"holds no eval_prompts.jsonl; refusing to replace it"):
        build_datasets(DataConfig(out=persona_index, index=persona_index, seed=7))
    assert (persona_index / "index.faiss").is_file()


_KILLED_BUILD = """
import os, signal, sys
from rag_persona.retrieval import store
from rag_persona.utils import io

stage = sys.argv[3]
if stage == "writing":  # killed while the new index is written into its work folder
    real = store._write_store_files
    def write_then_die(s, folder):
        real(s, folder)
        os.kill(os.getpid(), signal.SIGKILL)
    store._write_store_files = write_then_die
else:  # killed between the two renames of the swap: the old index moved aside, the new one not yet in
    real_rename = os.rename
    def rename_then_die(src, dst):
        real_rename(src, dst)
        if ".old-" in str(dst):
            os.kill(os.getpid(), signal.SIGKILL)
    io.os.rename = rename_then_die
store.build_index(sys.argv[1], sys.argv[2], "e5-small")
"""


def test_a_corrupt_index_is_one_error_line_and_index_rebuilds_it(tmp_path):
    from typer.testing import CliRunner

    from rag_persona.cli.app import app
    from rag_persona.retrieval.store import build_index, load_index

    kb = _small_kb(tmp_path / "kb")
    out = tmp_path / "index"
    build_index(kb, out, "e5-small")
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    (out / "manifest.json").write_text(json.dumps({**manifest, "embedder": "e5-small"}), encoding="utf-8")
    with pytest.raises(RagPersonaError, match="manifest.json: field 'embedder': expected"):
        load_index(out)
    (out / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    (out / "index.faiss").write_bytes(b"junk" * 64)
    with pytest.raises(
        RagPersonaError, match=r"index\.faiss: not a readable FAISS index .*; rebuild the index$"
    ):
        load_index(out)
    res = CliRunner().invoke(app, ["search", "名前", "--index", str(out)])
    assert res.exit_code == 2 and len(res.stderr.splitlines()) == 1 and "rebuild the index" in res.stderr
    res = CliRunner().invoke(app, ["index", "--kb", str(kb), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "earlier index unreadable, its tuned threshold not kept" in res.stderr
    assert len(load_index(out)) == 6


@pytest.mark.parametrize("stage", ["writing", "between-renames"])
def test_killed_index_build_keeps_the_old_index_and_the_next_run_cleans_up(tmp_path, stage):
    from rag_persona.retrieval.store import build_index, load_index

    kb = _small_kb(tmp_path / "kb")
    out = tmp_path / "index"
    build_index(kb, out, "e5-small")
    with (kb / "facts.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps({"id": "new", "text": "新しい事実。"}, ensure_ascii=False) + "\n")
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_BUILD, str(kb), str(out), stage],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    if stage == "writing":
        assert any(".tmp-" in s for s in _siblings(out)) and (out / "manifest.json").is_file()
    else:
        assert not out.exists() and any(".old-" in s for s in _siblings(out))
    # A reader restores the old index from its backup (and leaves a running writer's work alone) ...
    assert len(load_index(out, check=False)) == 6
    # ... and the next build cleans every leftover sibling.
    assert len(build_index(kb, out, "e5-small")) == 7
    assert _siblings(out) == []


# -- knowledge: limits, edits outside the lock, a broken source file ---------------------------------------
def test_fact_length_and_encoding_are_checked_where_facts_enter(tmp_path, monkeypatch):
    kb = tmp_path / "facts.jsonl"
    kb.write_text(
        json.dumps({"id": "a", "text": "短い事実。"}, ensure_ascii=False)
        + "\n"
        + json.dumps({"id": "long", "text": "あ" * 1001}, ensure_ascii=False)
        + "\n",
        encoding="utf-8",
    )
    with pytest.raises(
        RagPersonaError, match=r"facts.jsonl:2: field 'text': 1001 characters, the limit is 1000"
    ):
        load_knowledge(kb)
    monkeypatch.setenv("RAG_PERSONA_MAX_FACT_CHARS", "2000")
    assert len(load_knowledge(kb)) == 2
    kb.write_text('{"id": "s", "text": "ok", "questions": ["bad \\ud800 key"]}\n', encoding="utf-8")
    with pytest.raises(
        RagPersonaError, match=r":1: field 'questions\[0\]': not valid Unicode \(lone surrogate"
    ):
        load_knowledge(kb)


def test_lexical_analysis_never_hits_sudachis_input_limit():
    from rag_persona.retrieval.lexical import content_tokens

    # 4-byte characters: 16,000 of them (the old chunk size) are 64,000 bytes, over Sudachi's 49,149.
    text = "😀" * 30_000 + "紅茶が好き"
    assert "紅茶" in content_tokens(text)


class _GatedEmbedder:
    """The real embedder, but embedding passages (a new fact's text) waits for the test to open the gate:
    it holds an edit mid-embed while query embedding (every chat's search) runs freely."""

    def __init__(self, real, gate: threading.Event, started: threading.Event):
        self.real, self.gate, self.started = real, gate, started

    def __getattr__(self, name):
        return getattr(self.real, name)

    def encode_passages(self, texts):
        self.started.set()
        assert self.gate.wait(60)
        return self.real.encode_passages(texts)


def test_an_edit_embeds_beside_the_index_while_chats_keep_searching(tmp_path, persona):
    from rag_persona.retrieval.store import build_index

    kb = _small_kb(tmp_path / "kb")
    store = build_index(kb, tmp_path / "index", "e5-small")
    engine = echo_engine(store, persona)
    assert engine.search("紅茶は好き？", "dense", 0.0, 3)  # the first search embeds its background set
    gate, started = threading.Event(), threading.Event()
    store._embedder = _GatedEmbedder(store.embedder, gate, started)
    editor = threading.Thread(
        target=engine.edit_store, args=("add", {"id": "horse", "text": "乗馬クラブで白馬に乗る。"})
    )
    editor.start()
    try:
        assert started.wait(30), "the edit never started embedding"
        t0 = time.monotonic()
        hits = engine.search("紅茶は好き？", "dense", 0.0, 3)  # answered from the old index meanwhile
        assert time.monotonic() - t0 < 5 and hits and "horse" not in {h.fact_id for h in hits}
        assert "horse" not in engine.store.ids
    finally:
        gate.set()
        editor.join(60)
    assert engine.search("馬に乗りますか", "dense", 0.0, 1)[0].fact_id == "horse"
    assert "horse" in [json.loads(line)["id"] for line in (kb / "facts.jsonl").read_text().splitlines()]
    # A 52 KB fact (once a 500 on every hybrid turn, minutes of embedding under the lock) is one line.
    before = (kb / "facts.jsonl").read_bytes()
    with pytest.raises(RagPersonaError, match=r"field 'text': 52000 characters, the limit is 1000"):
        engine.edit_store("add", {"id": "huge", "text": "あ" * 52_000})
    assert (kb / "facts.jsonl").read_bytes() == before and "huge" not in engine.store.ids


def test_a_typo_in_the_source_file_serves_the_last_good_index_with_a_warning(tmp_path, persona, capsys):
    from rag_persona.retrieval.store import ensure_index

    kb = _small_kb(tmp_path / "kb")
    ensure_index(kb, tmp_path / "index", "e5-small")
    with (kb / "facts.jsonl").open("a", encoding="utf-8") as f:
        f.write('{"id": "broken", "text": \n')
    store = ensure_index(kb, tmp_path / "index", "e5-small")
    assert len(store) == 6 and "facts.jsonl:7" in store.warning and "last good index" in store.warning
    assert "facts.jsonl:7" in capsys.readouterr().err
    engine = echo_engine(store, persona)
    from ui.engine import Personas
    from ui.tabs.common import Page

    header = Page(Personas.of(engine)).header_md()  # the page's banner
    assert header.startswith("> ⚠️ ") and "facts.jsonl:7" in header
    with Server(engine) as server:
        health = httpx.get(f"{server.url}/v1/health", timeout=10).json()
        assert any("facts.jsonl:7" in w for w in health["warnings"])
        assert chat(server.url, [{"role": "user", "content": "紅茶は？"}], max_tokens=64)["choices"]
    (kb / "facts.jsonl").unlink()
    shutil.rmtree(tmp_path / "index")
    with pytest.raises(RagPersonaError, match="no facts.jsonl"):  # no last good index: the error itself
        ensure_index(kb, tmp_path / "index", "e5-small")


# -- the API ---------------------------------------------------------------------------------------------------
def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def _post(url: str, content: bytes | str, **kw) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json"},
        timeout=30,
        **kw,
    )


def _nested(depth: int) -> str:
    return '{"messages": ' + "[" * depth + "]" * depth + "}"


@pytest.mark.parametrize(
    ("content", "status", "needle"),
    [
        ('{"messages": [{"role": "user", "content": "a\\ud800b"}]}', 400, "lone surrogate U+D800"),
        ('{"messages": [{"role": "user", "content": "hi"}], "seed": 1180591620717411303424}', 400, "seed"),
        ('{"messages": [{"role": "user", "content": "hi"}], "seed": -5}', 400, "seed"),
        (_nested(100_000), 400, "request body"),
        ('{"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"}', 404, "'gpt-4o'"),
        ('{"messages": [{"role": "user", "content": "hi"}], "model": "x\\udc00"}', 404, "models are"),
        ("[1, 2, 3]", 400, "request body"),
        ('{"messages": "hi"}', 400, "messages"),
    ],
)
def test_bad_requests_get_openai_shaped_4xx(echo_server, content, status, needle):
    err = _error(_post(echo_server.url, content), status)
    assert needle in err["message"], err
    assert httpx.get(f"{echo_server.url}/v1/health", timeout=10).status_code == 200


def test_unknown_model_lists_the_models_and_seed_minus_one_means_random(echo_server):
    err = _error(
        _post(echo_server.url, json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]})),
        404,
    )
    assert err["code"] == "model_not_found" and "['ojousama']" in err["message"]
    res = chat(echo_server.url, [{"role": "user", "content": "hi"}], seed=-1, max_tokens=32)
    assert res["choices"][0]["message"]["content"] == "hi"


def test_body_over_the_limit_is_413_declared_or_chunked(echo_server):
    from ui.api import MAX_BODY_BYTES

    big = json.dumps({"messages": [{"role": "user", "content": "あ" * (MAX_BODY_BYTES // 2)}]})
    assert "too_large" in _error(_post(echo_server.url, big), 413)["code"]

    def chunks():  # no Content-Length: the limit must hold for a streamed upload too
        for _ in range(40):
            yield b" " * 65536

    r = httpx.post(
        f"{echo_server.url}/v1/chat/completions",
        content=chunks(),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    _error(r, 413)
    assert chat(echo_server.url, [{"role": "user", "content": "still here"}], max_tokens=64)["choices"]


def test_wrong_method_is_405_and_unknown_path_404_under_v1(echo_server):
    err = _error(httpx.get(f"{echo_server.url}/v1/chat/completions", timeout=10), 405)
    assert "POST" in err["message"]
    _error(httpx.delete(f"{echo_server.url}/v1/models", timeout=10), 405)
    err = _error(httpx.get(f"{echo_server.url}/v1/completions", timeout=10), 404)
    assert "/v1/chat/completions" in err["message"]


def test_an_unexpected_exception_is_a_500_with_an_id_that_is_in_the_log(echo_server, caplog, monkeypatch):
    def broken():
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(echo_server.engine, "info", broken)
    with caplog.at_level(logging.ERROR, logger="rag_persona.api"):
        err = _error(httpx.get(f"{echo_server.url}/v1/health", timeout=10), 500)
    assert err["type"] == "server_error" and "disk on fire" not in err["message"]
    error_id = err["message"].split("(id ")[1].split(";")[0]
    assert any(error_id in r.getMessage() and "disk on fire" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    assert httpx.get(f"{echo_server.url}/v1/health", timeout=10).status_code == 200


def test_a_stream_that_fails_sends_an_error_id_that_is_in_the_log(echo_server, caplog, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("gpu melted")

    monkeypatch.setattr(echo_server.lm, "generate", broken)
    payload = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    with caplog.at_level(logging.ERROR, logger="rag_persona.api"):
        r = httpx.post(f"{echo_server.url}/v1/chat/completions", json=payload, timeout=30)
    events = [line.removeprefix("data: ") for line in r.text.splitlines() if line]
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["type"] == "server_error" and "gpu melted" not in err["message"]
    error_id = err["message"].split("(id ")[1].split(";")[0]
    assert any(error_id in r.getMessage() and "gpu melted" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    assert chat(echo_server.url, [{"role": "user", "content": "still here"}], max_tokens=64)["choices"]


def test_a_non_streaming_client_that_leaves_frees_the_model(echo_server):
    engine, lm = echo_server.engine, echo_server.lm
    lm.delay = 0.05  # ~60 tokens → ~3 s if it ran to the end
    try:
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{echo_server.url}/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "c98 leave me " * 4}], "max_tokens": 512},
                timeout=httpx.Timeout(30, read=0.5),
            )
        deadline = time.monotonic() + 10
        while engine.info()["queue"]["busy"]:
            assert time.monotonic() < deadline, "generation kept running for a client that left"
            time.sleep(0.05)
        assert time.monotonic() - started < 2.5
    finally:
        lm.delay = 0.001
    assert (
        chat(echo_server.url, [{"role": "user", "content": "after"}], max_tokens=64)["choices"][0]["message"][
            "content"
        ]
        == "after"
    )


def test_openapi_and_docs_are_behind_the_credentials(persona_store, persona):
    with Server(echo_engine(persona_store, persona), auth=("aya", "s3cret")) as srv:
        for path in ("/v1/openapi.json", "/v1/docs", "/openapi.json", "/docs"):
            r = httpx.get(f"{srv.url}{path}", timeout=10)
            assert r.status_code in (401, 403, 404), (path, r.status_code)
        r = httpx.get(f"{srv.url}/v1/openapi.json", timeout=10, auth=("aya", "s3cret"))
        assert r.status_code == 200 and "/v1/chat/completions" in r.json()["paths"]
        assert "swagger" in httpx.get(f"{srv.url}/v1/docs", timeout=10, auth=("aya", "s3cret")).text.lower()


def test_fuzzed_requests_never_get_a_500_or_hang(echo_server):
    """hypothesis over the request schema: right and wrong types, bounds, nesting, odd Unicode."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    text = st.text(max_size=40)  # includes lone surrogates
    scalar = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | text
    anything = st.recursive(
        scalar,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
        max_leaves=8,
    )
    content = (
        text
        | st.lists(
            st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": text}), max_size=2
        )
        | anything
    )
    message = st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant", "system", "tool", "robot"]) | anything,
            "content": content,
        }
    )
    body = st.fixed_dictionaries(
        {"messages": st.lists(message, min_size=0, max_size=4) | anything},
        optional={
            "model": st.sampled_from(["ojousama", "", "other"]) | anything,
            "stream": st.booleans() | anything,
            "max_tokens": st.integers(-5, 600) | anything,
            "temperature": st.floats(-1, 3, allow_nan=False) | anything,
            "top_p": st.floats(-1, 2, allow_nan=False) | anything,
            "seed": st.integers(-(2**40), 2**40) | anything,
            "n": st.integers(0, 3),
            "stop": anything,
            "stream_options": anything,
            "rag_persona": st.fixed_dictionaries(
                {},
                optional={
                    "mode": st.sampled_from(["dense", "hybrid", "sparse"]) | anything,
                    "threshold": st.floats(-1, 2, allow_nan=False) | anything,
                    "k": st.integers(-1, 60) | anything,
                    "context_mode": st.sampled_from(["prompt", "xattn"]) | anything,
                },
            )
            | anything,
        },
    )

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body)
    def one(payload):
        raw = json.dumps(payload, ensure_ascii=True)  # ASCII escapes carry lone surrogates through
        r = httpx.post(
            f"{echo_server.url}/v1/chat/completions",
            content=raw,
            headers={"content-type": "application/json"},
            timeout=httpx.Timeout(20),
        )
        assert r.status_code < 500 or r.status_code == 503, (r.status_code, raw[:300], r.text[:300])
        if r.status_code >= 400:
            _error(r, r.status_code)
        elif payload.get("stream") is True:
            assert r.text.rstrip().endswith("data: [DONE]"), r.text[-200:]

    one()
    deadline = time.monotonic() + 10
    while echo_server.engine.info()["queue"]["busy"]:  # nothing left running after the last client
        assert time.monotonic() < deadline, echo_server.engine.info()["queue"]
        time.sleep(0.05)
