"""The OpenAI-compatible API and the shared engine behind it, against a real server on 127.0.0.1.

Mechanics run on tiny models: an *echo* model (replies with every user message of its prompt, token by
token, so any mix-up between conversations shows in the text) and the tiny random-weight Qwen2 from
conftest (real `generate`). Retrieval is real: the persona's knowledge indexed with the bundled e5.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
from conftest import make_tokenizer

from rag_persona.errors import RagPersonaError
from rag_persona.generation import LoadedModel
from rag_persona.prompts import MAX_USER_CHARS
from rag_persona.settings import KNOWLEDGE_ROOT
from ui.api_requests import MAX_MESSAGES

TOPICS = [
    "あなたの名前はなんですか?",
    "趣味は何ですか",
    "誕生日はいつ？",
    "犬を飼っていますか",
    "お父様はどんな方？",
    "どこの学校に通っているの？",
    "好きな音楽は？",
    "苦手なものはある？",
    "将来の夢を教えて",
    "好きな紅茶は？",
]


# -- fixtures and helpers ------------------------------------------------------------------------------------
class EchoLM:
    """A stand-in model: replies with every user message in its prompt joined by ' | ', a token at a time."""

    def __init__(self, tokenizer, delay: float = 0.001):
        import torch

        self.tokenizer = tokenizer
        self.delay = delay
        self.device = torch.device("cpu")
        self.generation_config = SimpleNamespace(eos_token_id=tokenizer.eos_token_id)
        self.calls = 0

    def generate(self, input_ids, streamer=None, stopping_criteria=None, max_new_tokens=96, **kwargs):
        import torch

        self.calls += 1
        prompt = self.tokenizer.decode(input_ids[0], skip_special_tokens=False)
        text = self.reply_text(prompt)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: max_new_tokens - 1]
        ids.append(self.tokenizer.eos_token_id)
        out = input_ids
        streamer.put(input_ids.cpu())  # the prompt, skipped by the streamer (as generate does)
        for t in ids:
            time.sleep(self.delay)
            tok = torch.tensor([[t]])
            out = torch.cat([out, tok], dim=1)
            streamer.put(tok)
            if stopping_criteria is not None and any(bool(c(out, None).all()) for c in stopping_criteria):
                break
        streamer.end()
        return out

    def reply_text(self, prompt: str) -> str:
        """What the model says for a rendered prompt: every user message, joined by ' | '."""
        return " | ".join(re.findall(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", prompt, re.S))


def echo_loader(model_holder: dict):
    def load(name=None, adapter=None, progress=print):
        tok = make_tokenizer()
        lm = EchoLM(tok)
        model_holder["lm"] = lm
        return LoadedModel(
            model=lm, tokenizer=tok, source=name or "echo", device="cpu", dtype="none", adapter=adapter
        )

    return load


def echo_engine(store, persona, name: str = "echo", holder: dict | None = None):
    """An engine over `store` whose model is the echo model (put in holder["lm"] when a holder is given)."""
    from ui.engine import Engine

    loader = echo_loader({} if holder is None else holder)
    return Engine(name, store=store, persona=persona, loader=loader, progress=lambda m: None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn serving create_app(engine) on 127.0.0.1:<free port> in a thread."""

    def __init__(self, engine, auth=None):
        import uvicorn

        from ui.app import create_app

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(engine, auth=auth)
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive(), "server thread died while starting"
            assert time.monotonic() < deadline, "server did not start in 60s"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def chat(url: str, messages: list[dict], *, stream: bool = False, timeout: float = 120, **body) -> dict:
    """One completion; a streamed one is reassembled into the non-streamed shape (+ 'chunks')."""
    payload = {"model": "ojousama", "messages": messages, "stream": stream, **body}
    if not stream:
        r = httpx.post(f"{url}/v1/chat/completions", json=payload, timeout=timeout)
        assert r.status_code == 200, r.text
        return r.json()
    text, chunks, extra, finish = "", [], None, None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=payload, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            data = line[len("data: ") :]
            chunks.append(data)
            if data == "[DONE]":
                break
            obj = json.loads(data)
            assert "error" not in obj, obj
            if obj.get("rag_persona"):
                extra = obj["rag_persona"]
            for choice in obj["choices"]:
                text += choice["delta"].get("content") or ""
                finish = choice["finish_reason"] or finish
    assert chunks[-1] == "[DONE]"
    return {
        "choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "rag_persona": extra,
        "chunks": chunks,
    }


# -- the API ---------------------------------------------------------------------------------------------------
def test_concurrent_conversations_stay_isolated(echo_server, persona_store):
    """10 conversations × 3 turns at once, half streamed: each reply holds exactly its own history."""
    url, engine = echo_server.url, echo_server.engine
    served_before = engine.info()["queue"]["served"]

    def conversation(i: int) -> list[tuple[list[str], dict]]:
        messages, out = [], []
        for t in range(3):
            user = f"c{i}t{t} {TOPICS[(i + t) % len(TOPICS)]}"
            messages.append({"role": "user", "content": user})
            res = chat(url, messages, stream=(i + t) % 2 == 0, max_tokens=512)
            reply = res["choices"][0]["message"]["content"]
            out.append(([m["content"] for m in messages if m["role"] == "user"], res))
            messages.append({"role": "assistant", "content": reply})
        return out

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(conversation, range(10)))

    for i, turns in enumerate(results):
        for users, res in turns:
            reply = res["choices"][0]["message"]["content"]
            assert reply == " | ".join(users), f"conversation {i}: {reply!r}"
            others = re.findall(r"c(\d+)t\d", reply)
            assert set(others) == {str(i)}, f"conversation {i} got another conversation's text: {reply!r}"
            assert res["choices"][0]["finish_reason"] == "stop"
            # the context is the retrieval for this conversation's own last message
            want = [h.fact_id for h in engine.search(users[-1])]
            assert [f["id"] for f in res["rag_persona"]["context"]] == want
    health = httpx.get(f"{url}/v1/health", timeout=10).json()
    assert health["status"] == "ok"
    assert health["queue"]["served"] - served_before == 30
    assert health["queue"]["busy"] is False and health["queue"]["waiting"] == 0


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("{not json", "not valid JSON"),
        ({}, "messages: missing"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]},
            "last message",
        ),
        ({"messages": [{"role": "user", "content": "  "}]}, "messages[0].content: empty"),
        (
            {"messages": [{"role": "user", "content": "あ" * (MAX_USER_CHARS + 1)}]},
            f"the limit is {MAX_USER_CHARS}",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "only text parts",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n:"),
        ({"messages": [{"role": "user", "content": "hi"}], "stop": ["。"]}, "stop sequences"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "rag_persona": {"mode": "sparse"}},
            "rag_persona.mode",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "rag_persona": {"k": 0}}, "rag_persona.k"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "rag_persona": {"context_mode": "xattn"}},
            "cross-attention",
        ),
        ({"messages": [{"role": "user", "content": "hi"}] * (MAX_MESSAGES + 1)}, "messages"),
        ({"messages": [{"role": "system", "content": "be nice"}]}, "no user message"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content: Input should be"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text"),
        ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, "tool calls"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}},
            "only text replies",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, "log-probabilities"),
        ('{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature: "),
    ],
)
def test_malformed_requests_get_4xx_with_a_message(echo_server, body, needle):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(
        f"{echo_server.url}/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert needle in err["message"], err
    assert ".str" not in err["message"] and "more problems" not in err["message"], err  # no union branches
    assert httpx.get(f"{echo_server.url}/v1/health", timeout=10).status_code == 200


def test_a_sillytavern_shaped_request_is_answered_from_the_kept_history(echo_server):
    """Only what reaches the model is checked: a long system prompt, an opening greeting over the length
    limit before the kept exchanges and a post-history system message do not refuse the chat; nulls for
    optional fields are their defaults; text parts are joined as vLLM joins them."""
    messages = [
        {"role": "system", "content": "キャラクター設定。" * 4000},
        {"role": "assistant", "content": "ごきげんよう。" * 300},
    ]
    for t in range(9):
        messages += [{"role": "user", "content": f"u{t}"}, {"role": "assistant", "content": f"a{t}"}]
    messages += [
        {"role": "user", "content": [{"type": "text", "text": "la"}, {"type": "text", "text": "st"}]},
        {"role": "system", "content": "[Write the next reply in character.]"},
    ]
    res = chat(echo_server.url, messages, max_tokens=512, n=None, stream=None, tool_choice="auto")
    # the builder keeps the last 8 exchanges (16 messages): the greeting, u0 and a0 are dropped
    assert res["choices"][0]["message"]["content"] == " | ".join([f"u{t}" for t in range(1, 9)] + ["la\nst"])
    extra = res["rag_persona"]
    assert (extra["history_trimmed_exchanges"], extra["history_trimmed_messages"]) == (1, 3)
    assert res["model"] == "ojousama"
    messages[-7]["content"] = "あ" * (MAX_USER_CHARS + 1)  # a kept message over the limit is still refused
    r = httpx.post(f"{echo_server.url}/v1/chat/completions", json={"messages": messages}, timeout=30)
    assert r.status_code == 400 and f"messages[{len(messages) - 7}].content" in r.json()["error"]["message"]


def test_a_form_body_is_told_to_send_json_and_models_are_retrieved_by_id(echo_server):
    r = httpx.post(f"{echo_server.url}/v1/chat/completions", content=b'{"messages": []}', timeout=30)
    assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"]["message"], r.text
    model = httpx.get(f"{echo_server.url}/v1/models/ojousama", timeout=10)
    assert model.status_code == 200 and model.json()["id"] == "ojousama"
    missing = httpx.get(f"{echo_server.url}/v1/models/nobody", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_models_list_and_history_limit_reported(echo_server):
    models = httpx.get(f"{echo_server.url}/v1/models", timeout=10).json()
    assert models["data"][0]["id"] == "ojousama"
    messages = []
    for t in range(10):
        messages += [{"role": "user", "content": f"u{t}"}, {"role": "assistant", "content": f"a{t}"}]
    messages.append({"role": "user", "content": "last"})
    res = chat(echo_server.url, messages, max_tokens=512)
    # the builder keeps the last 8 exchanges: u2..u9 + the new message reach the model
    assert res["choices"][0]["message"]["content"] == " | ".join([f"u{t}" for t in range(2, 10)] + ["last"])
    assert res["rag_persona"]["history_trimmed_exchanges"] == 2
    assert res["rag_persona"]["history_trimmed_messages"] == 4


def test_client_going_away_frees_the_model(echo_server):
    url, engine, lm = echo_server.url, echo_server.engine, echo_server.lm
    lm.delay = 0.05  # ~60 tokens → ~3 s if it ran to the end
    try:
        started = time.monotonic()
        with httpx.stream(
            "POST",
            f"{url}/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "c99 stop me " * 4}],
                "stream": True,
                "max_tokens": 512,
            },
            timeout=30,
        ) as r:
            for line in r.iter_lines():
                if '"content": "' in line and '"role"' not in line:
                    break  # first text piece, then hang up
        deadline = time.monotonic() + 10
        while engine.info()["queue"]["busy"]:
            assert time.monotonic() < deadline, "generation kept running for a client that left"
            time.sleep(0.05)
        assert time.monotonic() - started < 2.5
        assert (
            chat(url, [{"role": "user", "content": "after"}], max_tokens=512)["choices"][0]["message"][
                "content"
            ]
            == "after"
        )
    finally:
        lm.delay = 0.001


def test_full_queue_answers_503_and_recovers(echo_server):
    url, engine, lm = echo_server.url, echo_server.engine, echo_server.lm
    lm.delay, engine.max_waiting = 0.02, 2
    try:

        def one(i):
            return httpx.post(
                f"{url}/v1/chat/completions",
                json={"messages": [{"role": "user", "content": f"q{i} 紅茶"}], "max_tokens": 512},
                timeout=60,
            )

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(one, range(8)))
        codes = sorted(r.status_code for r in responses)
        assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
        busy = next(r for r in responses if r.status_code == 503)
        assert "busy" in busy.json()["error"]["message"] and busy.headers["retry-after"]
        for i, r in enumerate(responses):
            if r.status_code == 200:
                assert r.json()["choices"][0]["message"]["content"] == f"q{i} 紅茶"
    finally:
        lm.delay, engine.max_waiting = 0.001, 32
    assert (
        chat(url, [{"role": "user", "content": "ok"}], max_tokens=512)["choices"][0]["message"]["content"]
        == "ok"
    )


def test_auth_is_required_when_configured(persona_store, persona):
    engine = echo_engine(persona_store, persona)
    with Server(engine, auth=("aya", "s3cret")) as server:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 512}
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 401 and "Bearer" in r.json()["error"]["message"]
        r = httpx.post(
            f"{server.url}/v1/chat/completions",
            json=body,
            headers={"Authorization": "Bearer aya:wrong"},
            timeout=30,
        )
        assert r.status_code == 401
        r = httpx.post(
            f"{server.url}/v1/chat/completions",
            json=body,
            headers={"Authorization": "Bearer aya:s3cret"},
            timeout=30,
        )
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "hi"
        assert httpx.get(f"{server.url}/config", timeout=10).status_code in (
            401,
            403,
        )  # the page wants a login


def test_real_generation_eight_concurrent_conversations(tiny_model_dir, persona_store, persona):
    """The tiny random Qwen2 through the real generate loop: 8 at once, streamed and not, all answered."""
    from ui.engine import Engine

    engine = Engine(
        str(tiny_model_dir), "none", store=persona_store, persona=persona, progress=lambda m: None
    )
    with Server(engine) as server:

        def one(i):
            user = TOPICS[i]
            return user, chat(
                server.url, [{"role": "user", "content": user}], stream=i % 2 == 1, max_tokens=8
            )

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(8)))
        for user, res in results:
            choice = res["choices"][0]
            assert choice["finish_reason"] in ("stop", "length")
            assert isinstance(choice["message"]["content"], str)
            assert [f["id"] for f in res["rag_persona"]["context"]] == [
                h.fact_id for h in engine.search(user)
            ]
            if "usage" in res:
                assert 1 <= res["usage"]["completion_tokens"] <= 8
        assert httpx.get(f"{server.url}/v1/health", timeout=10).json()["queue"]["served"] == 8


def test_cross_attention_mode_runs_when_weights_exist(tiny_model_dir, persona_index, persona, tmp_path):
    """With (untrained) cross-attention weights for the loaded base, the xattn context mode answers and the
    facts go in as memory: the prompt carries no context block, the response still lists the facts."""
    from rag_persona.generation import load_causal_lm
    from rag_persona.retrieval.store import load_index
    from rag_persona.xattn import XattnModel
    from ui.engine import Engine, TurnOptions

    base = load_causal_lm(str(tiny_model_dir), progress=lambda m: None)
    weights = XattnModel(base.model, base_name=str(tiny_model_dir)).save(tmp_path / "xattn")
    index = tmp_path / "index"
    shutil.copytree(persona_index, index)  # the fact-encoding cache is written next to the index
    engine = Engine(
        str(tiny_model_dir),
        "none",
        store=load_index(index),
        persona=persona,
        xattn_weights=weights.parent,
        progress=lambda m: None,
    )
    assert engine.xattn_available, engine.xattn_reason
    plan = engine.plan([], TOPICS[0], TurnOptions(context_mode="xattn"))
    assert plan.context and "【" not in plan.messages[0]["content"]
    assert "【" in engine.plan([], TOPICS[0], TurnOptions()).messages[0]["content"]
    with Server(engine) as server:
        for stream in (False, True):
            res = chat(
                server.url,
                [{"role": "user", "content": TOPICS[0]}],
                stream=stream,
                max_tokens=6,
                rag_persona={"context_mode": "xattn"},
            )
            assert [f["id"] for f in res["rag_persona"]["context"]] == [f.id for f in plan.context]
            assert res["choices"][0]["finish_reason"] in ("stop", "length")
        res = chat(
            server.url, [{"role": "user", "content": TOPICS[0]}], max_tokens=6
        )  # prompt mode still works
        assert res["choices"][0]["finish_reason"] in ("stop", "length")


def test_switching_the_model_waits_for_the_running_reply(persona_store, persona):
    holder: dict = {}
    engine = echo_engine(persona_store, persona, "echo-1", holder)
    holder["lm"].delay = 0.02
    job = engine.submit([], "c1 slow reply " * 3, None)
    info = engine.switch_model("echo-2", "none", offered_only=False)  # queued behind the running job
    assert job.done.is_set() and job.error is None and job.result.text == ("c1 slow reply " * 3).strip()
    assert info["model"] == "echo-2" and engine.model_label() == "echo-2"
    _, reply = engine.respond([], "after the switch")
    assert reply.text == "after the switch"


# -- engine: knowledge edits and tuning ------------------------------------------------------------------------
@pytest.fixture
def small_engine(tmp_path, persona):
    """An echo engine over a 4-fact knowledge file in tmp (edits are persisted there, not in the repo)."""
    from rag_persona.retrieval.store import build_index

    kb = tmp_path / "kb" / "facts.jsonl"
    kb.parent.mkdir()
    facts = [
        {"id": "name", "text": "名前は小野寺絢音。", "questions": ["名前は何ですか"]},
        {"id": "tea", "text": "好きな紅茶はダージリン。"},
        {"id": "dog", "text": "飼い犬はマルチーズのロッテ。", "tags": ["family"]},
        {"id": "piano", "text": "ピアノを5歳から習っている。", "source_note": "kept on update"},
    ]
    kb.write_text("".join(json.dumps(f, ensure_ascii=False) + "\n" for f in facts), encoding="utf-8")
    store = build_index(kb.parent, tmp_path / "index", "e5-small")
    return echo_engine(store, persona), kb


def test_knowledge_edits_are_saved_indexed_and_bad_ones_refused(small_engine):
    from rag_persona.retrieval.store import load_index

    engine, kb = small_engine
    engine.edit_store("add", {"id": "horse", "text": "乗馬クラブで白馬のエトワールに乗る。"})
    assert engine.search("馬に乗りますか", "dense", 0.0, 1)[0].fact_id == "horse"
    engine.edit_store(
        "update", {**engine.store.fact("piano").to_dict(), "text": "ピアノを4歳から習っている。"}
    )
    assert engine.store.fact("piano").extra == {"source_note": "kept on update"}
    engine.edit_store("delete", ["dog"])
    on_disk = [json.loads(line) for line in kb.read_text(encoding="utf-8").splitlines()]
    assert [f["id"] for f in on_disk] == ["name", "tea", "piano", "horse"]
    assert on_disk[2]["text"] == "ピアノを4歳から習っている。"
    reloaded = load_index(engine.store.path, kb=kb.parent)  # the saved index matches the edited knowledge
    assert reloaded.ids == ["name", "tea", "piano", "horse"]

    before = kb.read_bytes()
    for action, payload, needle in [
        ("add", {"id": "tea", "text": "重複"}, "duplicate id 'tea'"),
        ("add", {"id": "x", "text": ""}, "text"),
        ("update", {"id": "ghost", "text": "いない"}, "no fact with id 'ghost'"),
        ("update", {"id": "tea", "text": "紅茶", "questions": ["ok", 3]}, "field 'questions[1]'"),
        ("delete", ["ghost"], "no fact with id 'ghost'"),
    ]:
        with pytest.raises(RagPersonaError, match=re.escape(needle)):
            engine.edit_store(action, payload)
    assert kb.read_bytes() == before
    assert engine.store.ids == ["name", "tea", "piano", "horse"]


def test_tuning_sweeps_plots_and_saves_the_threshold(persona_index, persona, tmp_path):
    from rag_persona.retrieval.store import load_index
    from ui.tabs.tuning import tune

    src = KNOWLEDGE_ROOT / "ojousama" / "queries" / "dev.jsonl"
    lines = src.read_text(encoding="utf-8").splitlines()
    subset = tmp_path / "queries.jsonl"
    subset.write_text("\n".join(lines[:30] + lines[-10:]) + "\n", encoding="utf-8")

    # a private copy of the index, so saving a threshold does not touch the shared one
    index = tmp_path / "index"
    shutil.copytree(persona_index, index)
    store = load_index(index)
    engine = echo_engine(store, persona)
    result, plot = tune(engine, subset, "dense", 3)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lo, hi = result.plateau()
    assert lo <= result.chosen <= hi
    assert result.chosen_metrics.f1 >= 0.5
    engine.set_threshold("dense", result.chosen, result.to_dict())
    assert load_index(index).tuned_threshold("dense") == pytest.approx(result.chosen)
    assert engine.defaults("dense")["threshold"] == pytest.approx(result.chosen)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "名前は", "relevant": ["no-such-fact"]}\n', encoding="utf-8")
    with pytest.raises(RagPersonaError, match=r"bad\.jsonl:1: field 'relevant\[0\]': unknown fact id"):
        tune(engine, bad, "dense", 3)
