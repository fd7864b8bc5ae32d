"""One server, several personas: `rag-persona serve --persona ojousama --persona kansai` against real servers.

The model is a *prompt echo* (like test_api's echo model, but the reply starts with the system prompt's first
sentence, so the persona the prompt was built for shows in the text); retrieval is real: knowledge/ojousama
and knowledge/kansai indexed with the bundled e5 into a temporary RAG_PERSONA_HOME, by the same
`open_store(None, persona)` the server uses. Both personas have facts with the same ids (`profile-name`, …)
and different texts, so a mix-up shows as the wrong text under the right id.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import make_tiny_qwen2, make_tokenizer, stop_process
from test_api import EchoLM, Server, chat, free_port

from rag_persona.generation import LoadedModel
from rag_persona.prompts import Persona, system_prompt
from rag_persona.settings import KNOWLEDGE_ROOT
from ui.engine import Personas, serve_personas

SCRIPT = Path(sys.executable).parent / "rag-persona"
NAMES = {"ojousama": "小野寺絢音", "kansai": "今宮陽菜"}
NAME_QUESTION = "あなたの名前はなんですか?"


def facts_of(persona: str) -> dict[str, str]:
    """id → text of a persona's facts, read from knowledge/<persona>/facts.jsonl."""
    lines = (KNOWLEDGE_ROOT / persona / "facts.jsonl").read_text(encoding="utf-8").splitlines()
    return {f["id"]: f["text"] for f in map(json.loads, lines)}


class PromptEchoLM(EchoLM):
    """Replies '<first 10 characters of the system prompt> | <every user message joined by ' | '>'."""

    def reply_text(self, prompt: str) -> str:
        system = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", prompt, re.S)
        return " | ".join([(system.group(1) if system else "")[:10], super().reply_text(prompt)])


class CountingLoader:
    """A loader giving the prompt-echo model; `calls` records every (model, adapter) it was asked to load."""

    def __init__(self):
        self.calls: list[tuple] = []

    def __call__(self, name=None, adapter=None, progress=print):
        self.calls.append((name, adapter))
        tok = make_tokenizer()
        return LoadedModel(
            model=PromptEchoLM(tok),
            tokenizer=tok,
            source=name or "echo",
            device="cpu",
            dtype="none",
            adapter=adapter,
        )


def head(persona: str) -> str:
    """What the echo model says first for a persona: its system prompt's first 10 characters."""
    return system_prompt(Persona.load(KNOWLEDGE_ROOT / persona))[:10]


def reply_of(res: dict) -> str:
    return res["choices"][0]["message"]["content"]


def pairs(res: dict) -> list[tuple[str, str]]:
    return [(f["id"], f["text"]) for f in res["rag_persona"]["context"]]


# -- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A private RAG_PERSONA_HOME (the personas' indexes are built there) and the settings' defaults."""
    folder = tmp_path_factory.mktemp("multi-persona-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAG_PERSONA_HOME", str(folder))
        for name in ("RAG_PERSONA_CHAT_ADAPTER", "RAG_PERSONA_PERSONA", "RAG_PERSONA_CHAT_MODEL"):
            mp.delenv(name, raising=False)
        yield folder


@pytest.fixture(scope="module")
def served(home):
    loader = CountingLoader()
    personas = serve_personas(["ojousama", "kansai"], "echo", loader=loader, progress=lambda m: None)
    personas.loader = loader
    yield personas
    personas.close()


@pytest.fixture(scope="module")
def api(served):
    with Server(served) as server:
        yield server


# -- the registry ------------------------------------------------------------------------------------------
def test_each_persona_has_its_own_persona_and_index(served, home):
    assert served.ids == ["ojousama", "kansai"] and served.default is served.get(None) is served.get("")
    for pid in served.ids:
        engine = served.get(pid)
        assert engine.persona.id == pid and engine.persona.name == NAMES[pid]
        assert Path(engine.store.path) == home / "indexes" / pid  # open_store(None, persona)
        assert dict((f.id, f.text) for f in engine.store.facts) == facts_of(pid)


def test_personas_with_the_same_model_and_adapter_share_one_load(served, home, tmp_path):
    # ojousama and kansai on the echo model: neither has an adapter for it, so one load serves both
    assert served.loader.calls == [("echo", None)]
    assert len(served.models()) == 1 and served.get("ojousama").jobs is served.get("kansai").jobs

    # a card with its own adapter gets a model of its own; the two without one still share
    card = tmp_path / "my-card"
    (card / "lora").mkdir(parents=True)
    (card / "persona.json").write_text(
        json.dumps({"id": "card", "name": "カード", "summary": "テスト用の人物。", "adapter": "lora"}),
        encoding="utf-8",
    )
    kansai_facts = (KNOWLEDGE_ROOT / "kansai" / "facts.jsonl").read_text(encoding="utf-8").splitlines()
    (card / "facts.jsonl").write_text("\n".join(kansai_facts[:5]) + "\n", encoding="utf-8")
    loader = CountingLoader()
    three = serve_personas(["ojousama", str(card), "kansai"], "echo", loader=loader, progress=lambda m: None)
    assert three.ids == ["ojousama", "card", "kansai"]
    assert loader.calls == [("echo", None), ("echo", str((card / "lora").resolve()))]
    assert three.get("ojousama").slot is three.get("kansai").slot is not three.get("card").slot
    assert len(three.get("card").store.facts) == 5

    # the default model: the shipped adapter for ojousama, the shipped role-play adapter for kansai
    loader = CountingLoader()
    default = serve_personas(["ojousama", "kansai"], None, loader=loader, progress=lambda m: None)
    shipped = str(KNOWLEDGE_ROOT.parent / "adapters" / "ojousama-qwen2.5-coder-0.5b-v2op")
    roleplay = str(KNOWLEDGE_ROOT.parent / "adapters" / "roleplay-qwen2.5-coder-0.5b")
    assert loader.calls == [(None, shipped), (None, roleplay)]
    assert len(default.models()) == 2
    for p in (three, default):
        p.close()


def test_bad_persona_lists_are_refused_before_anything_loads(home, tmp_path):
    from rag_persona.errors import RagPersonaError

    loader = CountingLoader()
    empty = tmp_path / "empty"
    empty.mkdir()
    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / "persona.json").write_bytes((KNOWLEDGE_ROOT / "kansai" / "persona.json").read_bytes())
    for personas, kwargs, needle in [
        (["ojousama", "./no-such-card"], {}, "--persona ./no-such-card: .*no-such-card: no such folder"),
        ([str(empty)], {}, "no persona.json in it"),
        (["kansai", "kansai"], {}, "the same persona as --persona kansai"),
        (["kansai", str(twin)], {}, "its id 'kansai' is already served by --persona kansai"),
        (["ojousama", "kansai"], {"index": tmp_path}, "--index: only with a single --persona"),
    ]:
        with pytest.raises(RagPersonaError, match=needle):
            serve_personas(personas, "echo", loader=loader, progress=lambda m: None, **kwargs)
    assert loader.calls == []


def test_the_registry_refuses_two_engines_for_one_id(served):
    from rag_persona.errors import RagPersonaError

    with pytest.raises(RagPersonaError, match="personas: two personas have the id 'kansai'"):
        Personas([served.get("kansai"), served.get("kansai")])
    with pytest.raises(
        RagPersonaError,
        match=r"persona 'tsundere': not served here; the personas are \['ojousama', 'kansai'\]",
    ):
        served.get("tsundere")


# -- the API -------------------------------------------------------------------------------------------------
def test_models_lists_every_persona_and_health_reports_each(api):
    models = httpx.get(f"{api.url}/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["ojousama", "kansai"]
    health = httpx.get(f"{api.url}/v1/health", timeout=10).json()
    assert health["status"] == "ok" and health["default_persona"] == "ojousama"
    assert health["persona_id"] == "ojousama" and health["models_loaded"] == 1
    assert [(p["id"], p["persona"], p["facts"]) for p in health["personas"]] == [
        ("ojousama", NAMES["ojousama"], len(facts_of("ojousama"))),
        ("kansai", NAMES["kansai"], len(facts_of("kansai"))),
    ]


@pytest.mark.parametrize(
    ("model", "persona"), [("kansai", "kansai"), ("ojousama", "ojousama"), ("", "ojousama")]
)
@pytest.mark.parametrize("stream", [False, True])
def test_the_model_picks_the_persona(api, served, model, persona, stream):
    """Same question, same fact id: the persona's own fact text and its own system prompt ("": the default)."""
    res = chat(
        api.url, [{"role": "user", "content": NAME_QUESTION}], stream=stream, max_tokens=512, model=model
    )
    context = pairs(res)
    own = facts_of(persona)
    assert context and all(own.get(fid) == text for fid, text in context), context
    assert ("profile-name", own["profile-name"]) in context
    engine = served.get(persona)
    assert [h.fact_id for h in engine.search(NAME_QUESTION)] == [fid for fid, _ in context]
    assert reply_of(res) == f"{head(persona)} | {NAME_QUESTION}" and NAMES[persona] in reply_of(res)
    assert res["rag_persona"]["timings"]["prompt_tokens"] > 0


def test_a_request_without_model_gets_the_default_persona(api):
    body = {"messages": [{"role": "user", "content": NAME_QUESTION}], "max_tokens": 512}
    res = httpx.post(f"{api.url}/v1/chat/completions", json=body, timeout=60).json()
    assert NAMES["ojousama"] in reply_of(res)
    assert ("profile-name", facts_of("ojousama")["profile-name"]) in pairs(res)


def test_unknown_model_is_404_listing_every_persona(api):
    body = {"model": "tsundere", "messages": [{"role": "user", "content": "x"}]}
    r = httpx.post(f"{api.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 404, r.text
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert "'tsundere'" in err["message"] and "['ojousama', 'kansai']" in err["message"]


def test_concurrent_conversations_with_both_personas_do_not_mix(api, served):
    """16 conversations × 2 turns at once, alternating personas, half streamed, on the one shared model."""
    served_before = served.default.info()["queue"]["served"]
    questions = ["趣味は何ですか", "誕生日はいつ？", NAME_QUESTION, "好きな食べ物は？"]

    def conversation(i: int) -> list[tuple[str, list[str], dict]]:
        persona = ("ojousama", "kansai")[i % 2]
        messages, out = [], []
        for t in range(2):
            messages.append({"role": "user", "content": f"c{i}t{t} {questions[(i + t) % len(questions)]}"})
            res = chat(api.url, messages, stream=(i + t) % 2 == 0, max_tokens=512, model=persona)
            out.append((persona, [m["content"] for m in messages if m["role"] == "user"], messages[:-1], res))
            messages.append({"role": "assistant", "content": reply_of(res)})
        return out

    with ThreadPoolExecutor(16) as pool:
        results = [turn for turns in pool.map(conversation, range(16)) for turn in turns]
    for persona, users, history, res in results:
        assert reply_of(res) == " | ".join([head(persona), *users]), (persona, res)
        own = facts_of(persona)
        assert all(own.get(fid) == text for fid, text in pairs(res)), (persona, pairs(res))
        # the persona's own retrieval, reading the turn with its conversation as every caller does
        expected = served.get(persona).plan(list(history), users[-1]).context
        assert [fid for fid, _ in pairs(res)] == [f.id for f in expected]
    health = httpx.get(f"{api.url}/v1/health", timeout=10).json()
    assert all(p["queue"]["served"] - served_before == 32 for p in health["personas"])  # one queue for both


# -- the page --------------------------------------------------------------------------------------------------
def run_turn(client, message: str, threshold: float) -> dict:
    """One chat turn through the page's own (streaming) event; each output's last set value, by name."""
    job = client.submit(
        message, "dense", threshold, 5, "prompt", 512, False, 0.7, 0.9, 1.05, 0, api_name="/run_turn"
    )
    job.result(timeout=120)
    names = ["chatbot", "msg", "context", "prompt", "preview", "status"]
    shown: dict = {}
    for step in job.outputs():  # a streamed step leaves unchanged outputs as {"__type__": "update"}
        for name, value in zip(names, step, strict=True):
            if not (isinstance(value, dict) and value.get("__type__") == "update"):
                shown[name] = value
    return shown


def context_ids(turn: dict) -> list[str]:
    return re.findall(r'data-fact-id="([^"]+)"', turn["context"])


def test_the_page_follows_each_sessions_persona(api, served):
    from gradio_client import Client

    threshold = 0.0  # the top 5 facts whatever their scores: both personas answer with their own
    a, b = Client(api.url, verbose=False), Client(api.url, verbose=False)
    first = run_turn(a, "old-message " + NAME_QUESTION, threshold)
    assert NAMES["ojousama"] in first["prompt"] and "old-message" in str(first["chatbot"])

    switched = a.predict("kansai", api_name="/select_persona")
    assert any(NAMES["kansai"] in str(v) for v in switched)  # the header names her
    turn = run_turn(a, NAME_QUESTION, threshold)
    want = [h.fact_id for h in served.get("kansai").search(NAME_QUESTION, "dense", threshold, 5)]
    assert context_ids(turn) == want
    assert facts_of("kansai")["profile-name"] in turn["context"]
    assert NAMES["kansai"] in turn["prompt"] and NAMES["ojousama"] not in turn["prompt"]
    assert "old-message" not in str(turn["chatbot"])  # switching started a new conversation
    assert "まいど" in str(turn["chatbot"])  # her greeting

    # another session still chats with the default persona, and a's choice survives b's turn
    other = run_turn(b, NAME_QUESTION, threshold)
    assert facts_of("ojousama")["profile-name"] in other["context"] and NAMES["kansai"] not in other["prompt"]
    again = run_turn(a, "もう一回 " + NAME_QUESTION, threshold)
    assert NAMES["kansai"] in again["prompt"]

    # the knowledge tab searches the session's persona
    rows = a.predict("たこ焼き", "text match", api_name="/kb_search_fn")["data"]
    kansai = facts_of("kansai")
    assert len(rows) >= 5 and all(kansai.get(row[0]) == row[1] for row in rows), rows
    other_rows = b.predict("たこ焼き", "text match", api_name="/kb_search_fn")["data"]
    ojousama = facts_of("ojousama")
    assert other_rows and all(ojousama.get(row[0]) == row[1] for row in other_rows), other_rows
    assert len(other_rows) < len(rows)


# -- the command line ---------------------------------------------------------------------------------------------
def _env(home: Path) -> dict:
    env = {**os.environ, "RAG_PERSONA_HOME": str(home), "GRADIO_ANALYTICS_ENABLED": "False"}
    for name in (
        "RAG_PERSONA_CHAT_ADAPTER",
        "RAG_PERSONA_PERSONA",
        "RAG_PERSONA_AUTH",
        "RAG_PERSONA_ADMIN_AUTH",
    ):
        env.pop(name, None)
    return env


def test_cli_takes_repeated_personas_and_refuses_bad_ones_with_one_line(home, tmp_path):
    env = _env(home)
    help_ = subprocess.run(
        [str(SCRIPT), "serve", "--persona", "ojousama", "--persona", "kansai", "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert help_.returncode == 0 and "--persona" in help_.stdout, help_.stderr
    for args, needle in [
        (["--persona", "ojousama", "--persona", "./no-such-card"], "error: --persona ./no-such-card: "),
        (["--persona", str(tmp_path)], f"error: --persona {tmp_path}: {tmp_path}: no persona.json in it"),
        (
            ["--persona", "ojousama", "--persona", "kansai", "--index", str(tmp_path)],
            "error: --index: only with a single --persona",
        ),
    ]:
        proc = subprocess.run(
            [str(SCRIPT), "serve", *args, "--port", str(free_port())],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(needle), proc.stderr


def test_cli_serves_two_personas_on_one_loaded_model(home, served, tmp_path):
    """`rag-persona serve --persona ojousama --persona kansai --model <tiny>` as a real process."""
    model = tmp_path / "tiny-qwen2"
    tok = make_tokenizer()
    make_tiny_qwen2(tok).save_pretrained(model, safe_serialization=True)
    tok.save_pretrained(model)
    port = free_port()
    cmd = [str(SCRIPT), "serve", "--persona", "ojousama", "--persona", "kansai", "--model", str(model)]
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [*cmd, "--port", str(port)], env=_env(home), stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{url}/v1/health", timeout=2).is_success:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.3)
        assert [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]] == [
            "ojousama",
            "kansai",
        ]
        assert httpx.get(f"{url}/v1/health", timeout=10).json()["models_loaded"] == 1
        res = chat(url, [{"role": "user", "content": NAME_QUESTION}], max_tokens=4, model="kansai")
        assert ("profile-name", facts_of("kansai")["profile-name"]) in pairs(res)
        text = log_path.read_text()
        assert "persona ojousama (default): 小野寺絢音" in text and "persona kansai: 今宮陽菜" in text
        assert "1 loaded model(s) for 2 personas" in text and "model 'ojousama', 'kansai'" in text
    finally:
        stop_process(proc)
