"""Two roles on the server: chat users chat, administrators change what is served; hostile calls change nothing.

Servers are real (uvicorn on 127.0.0.1, and `rag-persona serve` as a process), the model is the tiny
random-weight Qwen2, retrieval is a 3-fact index built with the bundled e5. The page's events are called
with gradio_client the way any visitor could, whatever the page shows.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import make_tiny_qwen2, make_tokenizer, stop_process

from rag_persona.errors import RagPersonaError
from rag_persona.prompts import Persona
from rag_persona.settings import KNOWLEDGE_ROOT
from ui.access import (
    ADMIN_OFF,
    NOT_ADMIN,
    Access,
    access_from_options,
    load_credentials,
    parse_credentials,
)
from ui.tabs.tuning import queries_under, scrubbed

FACTS = [
    {"id": "name", "text": "名前は小野寺絢音。", "questions": ["名前は何ですか"]},
    {"id": "tea", "text": "好きな紅茶はダージリン。"},
    {"id": "dog", "text": "飼い犬はマルチーズのロッテ。"},
]
QUERIES = [
    {"query": "あなたの名前は？", "relevant": ["name"]},
    {"query": "好きな紅茶は？", "relevant": ["tea"]},
    {"query": "犬を飼っていますか", "relevant": ["dog"]},
    {"query": "今日の天気は？", "relevant": []},
]
SCRIPT = Path(sys.executable).parent / "rag-persona"


# -- Access: parsing and the rules ------------------------------------------------------------------------
def test_credentials_parse_and_refuse_with_one_line():
    assert parse_credentials("aya:s3:cret", "--auth") == ("aya", "s3:cret")  # ':' allowed in the password
    for bad in ("aya", ":pw", "aya:", "", "  "):
        with pytest.raises(RagPersonaError, match=r"^--auth: expected USER:PASS \(both non-empty\)$"):
            parse_credentials(bad, "--auth")


def test_credentials_come_from_option_file_or_environment(tmp_path):
    env = {"RAG_PERSONA_AUTH": "env:envpw"}
    kw = {"option": "--auth", "env_name": "RAG_PERSONA_AUTH"}
    good = tmp_path / "auth"
    good.write_text("\nfile:filepw\n\n", encoding="utf-8")
    assert load_credentials("opt:optpw", None, env=env, **kw) == ("opt", "optpw")
    assert load_credentials(None, good, env=env, **kw) == ("file", "filepw")
    assert load_credentials(None, None, env=env, **kw) == ("env", "envpw")
    assert load_credentials(None, None, env={}, **kw) is None
    with pytest.raises(RagPersonaError, match="give one of them"):
        load_credentials("opt:optpw", good, env={}, **kw)
    with pytest.raises(RagPersonaError, match=r"--auth-file .*nope: no such file$"):
        load_credentials(None, tmp_path / "nope", env={}, **kw)
    with pytest.raises(RagPersonaError, match="^RAG_PERSONA_AUTH: expected USER:PASS"):
        load_credentials(None, None, env={"RAG_PERSONA_AUTH": "no-colon"}, **kw)
    # a malformed file is named, never echoed: it may hold a password
    for text in ("just-a-secret-password\n", "a:b\nc:d\n"):
        bad = tmp_path / "bad"
        bad.write_text(text, encoding="utf-8")
        with pytest.raises(RagPersonaError) as err:
            load_credentials(None, bad, env={}, **kw)
        assert str(bad) in str(err.value) and "secret" not in str(err.value) and "a:b" not in str(err.value)


def test_access_rules():
    off = Access()
    assert not off.admin_enabled and not off.signed_in and off.gradio_auth() is None
    assert not off.is_admin(None) and off.refusal(None) == ADMIN_OFF
    local = Access(local_admin=True)
    assert local.is_admin(None) and local.refusal("anyone") is None
    both = Access(chat=("aya", "c"), admin=("root", "a"))
    assert both.gradio_auth() == [("aya", "c"), ("root", "a")] and both.api_auth() == ("aya", "c")
    assert both.is_admin("root") and not both.is_admin("aya") and not both.is_admin(None)
    assert both.refusal("aya") == NOT_ADMIN
    # the API is never open when the page is not
    assert Access(admin=("root", "a")).api_auth() == ("root", "a")
    with pytest.raises(RagPersonaError, match="also the --auth user"):
        Access(chat=("aya", "c"), admin=("aya", "a"))


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"admin": True, "host": "0.0.0.0"}, "--admin: only on a localhost-only server"),
        ({"share": True}, "--share true: a public link needs a sign-in"),
        ({"admin": True, "share": True, "auth": "a:b"}, "--admin: not with --share true"),
    ],
)
def test_access_options_refused(options, needle):
    with pytest.raises(RagPersonaError, match=needle):
        access_from_options(env={}, **options)


def test_access_options_accepted():
    assert access_from_options(admin=True, host="::1", env={}) == Access(local_admin=True)
    env = {"RAG_PERSONA_AUTH": "aya:c", "RAG_PERSONA_ADMIN_AUTH": "root:a"}
    shared = access_from_options(share=True, host="0.0.0.0", env=env)
    assert shared == Access(chat=("aya", "c"), admin=("root", "a"))


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--share", "true"], "error: --share true: a public link needs a sign-in"),
        (["--admin", "--host", "0.0.0.0"], "error: --admin: only on a localhost-only server"),
        (["--auth-file", "/nonexistent/auth"], "error: --auth-file /nonexistent/auth: no such file"),
    ],
)
def test_cli_refuses_with_one_line(args, needle):
    env = {k: v for k, v in os.environ.items() if k not in ("RAG_PERSONA_AUTH", "RAG_PERSONA_ADMIN_AUTH")}
    proc = subprocess.run([str(SCRIPT), "serve", *args], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(needle)


# -- query files: under the persona's folder only, and never echoed ------------------------------------------
def test_query_paths_stay_in_the_persona_folder(tmp_path):
    folder = tmp_path / "persona"
    (folder / "queries").mkdir(parents=True)
    good = folder / "queries" / "dev.jsonl"
    good.write_text("{}\n", encoding="utf-8")
    (folder / "queries" / "evil.jsonl").symlink_to("/etc/passwd")
    (folder / "queries" / "out").symlink_to(tmp_path)
    (tmp_path / "outside.jsonl").write_text("{}\n", encoding="utf-8")
    assert queries_under("queries/dev.jsonl", folder) == good.resolve()
    assert queries_under(str(good), folder) == good.resolve()
    for path, needle in [
        ("/etc/passwd", "is not under knowledge/persona/"),
        ("/proc/self/environ", "is not under"),
        ("queries/evil.jsonl", "is not under"),  # a symlink out of the folder
        ("queries/out/outside.jsonl", "is not under"),
        ("../outside.jsonl", "'..' is not allowed"),
        ("queries/../queries/dev.jsonl", "'..' is not allowed"),
        ("queries/missing.jsonl", "no such file"),
        ("persona.json", "expected a .jsonl query file"),
    ]:
        with pytest.raises(RagPersonaError, match=needle):
            queries_under(path, folder)


def test_errors_about_a_query_file_never_show_its_values(tmp_path):
    path = tmp_path / "q.jsonl"
    message = f"{path}:3: field 'relevant[0]': unknown fact id 'SECRET-TOKEN'"
    assert scrubbed(message, path, "q.jsonl") == (
        "tuning: q.jsonl:3: field 'relevant[0]': unknown fact id (value not shown)"
    )
    assert scrubbed(f"{path}:1: malformed JSON (x at column 2)", path, "q.jsonl") == (
        "tuning: q.jsonl:1: malformed JSON (x at column 2)"
    )


# -- servers ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("access") / "tiny-qwen2"
    tok = make_tokenizer()
    make_tiny_qwen2(tok).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def kb_index(tmp_path) -> tuple[Path, Path]:
    """(facts.jsonl, index folder): a private 3-fact knowledge base, so edits never reach the repo."""
    from rag_persona.retrieval.store import build_index

    kb = tmp_path / "kb"
    kb.mkdir()
    (kb / "facts.jsonl").write_text(
        "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in FACTS), encoding="utf-8"
    )
    build_index(kb, tmp_path / "index", "e5-small")
    return kb / "facts.jsonl", tmp_path / "index"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """create_app(engine, access=...) served by uvicorn on 127.0.0.1:<free port> in a thread."""

    def __init__(self, tiny_dir: Path, index: Path, access: Access):
        import uvicorn

        from rag_persona.retrieval.store import load_index
        from ui.app import create_app
        from ui.engine import Engine

        persona = Persona.load(KNOWLEDGE_ROOT / "ojousama")
        self.engine = Engine(
            str(tiny_dir), "none", store=load_index(index), persona=persona, progress=lambda m: None
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(self.engine, access=access)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def client(url: str, auth: tuple[str, str] | None = None):
    from gradio_client import Client

    return Client(url, auth=auth, verbose=False)


def folder_bytes(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def page_roles(url: str, auth: tuple[str, str] | None = None) -> dict:
    """What the page's load event shows this sign-in: {"controls": [shown/enabled...], "notices": [...]}."""
    with httpx.Client(base_url=url, timeout=30) as http:
        if auth:
            http.post("/login", data={"username": auth[0], "password": auth[1]}).raise_for_status()
        deps = http.get("/config").json()["dependencies"]
        load = next(d for d in deps if any(t[1] == "load" for t in d["targets"]))
        session = os.urandom(8).hex()
        body = {"data": [], "fn_index": load["id"], "session_hash": session}
        http.post("/gradio_api/queue/join", json=body).raise_for_status()
        with http.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}) as r:
            done = next(json.loads(line[6:]) for line in r.iter_lines() if "process_completed" in line)
    updates = done["output"]["data"]
    notices = [u for u in updates if "value" in u]
    controls = [u.get("visible", u.get("interactive")) for u in updates if "value" not in u]
    return {"controls": controls, "notices": [u["value"] if u["visible"] else None for u in notices]}


def hostile_calls(c) -> list[str]:
    """Every administrative event called as a visitor would; the first output of each, as text."""
    out = [
        c.predict("new", "新しい事実。", "", "", "", "text match", api_name="/kb_add")[0],
        c.predict("tea", "紅茶は嫌い。", "", "", "", "text match", api_name="/kb_update")[0],
        c.predict("tea", "", "", "", "", "text match", api_name="/kb_delete")[0],
        c.predict("qwen2.5-coder-0.5b", "none", api_name="/load_model")[0],
        c.predict("/etc/passwd", None, "dense", 3, api_name="/run_tuning")[0],
        c.predict("../../../../etc/passwd", None, "dense", 3, api_name="/run_tuning")[0],
        c.predict("queries/dev.jsonl", None, "dense", 3, api_name="/run_tuning")[0],
        c.predict(api_name="/save_tuned"),
    ]
    return [str(o) for o in out]


def test_administration_is_off_by_default_and_calls_change_nothing(tiny_dir, kb_index):
    kb, index = kb_index
    before_kb, before_index = kb.read_bytes(), folder_bytes(index)
    with Server(tiny_dir, index, Access()) as s:
        loaded, label = s.engine.loaded, s.engine.model_label()
        outputs = hostile_calls(client(s.url))
        for text in outputs:
            assert ADMIN_OFF in text, outputs
            assert "root:" not in text
        assert s.engine.store.ids == ["name", "tea", "dog"]
        assert s.engine.loaded is loaded and s.engine.model_label() == label
        roles = page_roles(s.url)  # the page hides (or locks) every admin control and says why
        assert len(roles["controls"]) == 11 and not any(roles["controls"])
        assert roles["notices"] == [f"🔒 {ADMIN_OFF}"] * 3
    assert kb.read_bytes() == before_kb and folder_bytes(index) == before_index


def test_admin_sign_in_administers_and_chat_sign_in_cannot(tiny_dir, kb_index, tmp_path):
    """`rag-persona serve` with the chat sign-in from the environment and the admin's from a file."""
    kb, index = kb_index
    admin_file = tmp_path / "admin-auth"
    admin_file.write_text("root:adm1n-pw\n", encoding="utf-8")
    port = free_port()
    env = {
        **os.environ,
        "RAG_PERSONA_AUTH": "aya:chat-pw",
        "RAG_PERSONA_CHAT_ADAPTER": "none",
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    env.pop("RAG_PERSONA_ADMIN_AUTH", None)
    cmd = [str(SCRIPT), "serve", "--model", str(tiny_dir), "--index", str(index), "--port", str(port)]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [*cmd, "--admin-auth-file", str(admin_file)], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{url}/v1/health", headers={"Authorization": "Bearer aya:chat-pw"}).is_success:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.3)
        assert "administration: on for the admin sign-in 'root'" in (tmp_path / "serve.log").read_text()
        assert httpx.get(f"{url}/config").status_code in (401, 403)  # the page wants a sign-in

        before = kb.read_bytes()
        outputs = hostile_calls(client(url, ("aya", "chat-pw")))
        assert all(NOT_ADMIN in text and "root:" not in text for text in outputs), outputs
        assert kb.read_bytes() == before
        roles = page_roles(url, ("aya", "chat-pw"))
        assert not any(roles["controls"]) and roles["notices"] == [f"🔒 {NOT_ADMIN}"] * 3
        roles = page_roles(url, ("root", "adm1n-pw"))
        assert all(roles["controls"]) and roles["notices"] == [None] * 3

        admin = client(url, ("root", "adm1n-pw"))
        status = admin.predict(
            "horse", "乗馬クラブに通う。", "", "乗馬", "", "text match", api_name="/kb_add"
        )[0]
        assert "Added `horse`" in status
        assert [json.loads(line)["id"] for line in kb.read_text(encoding="utf-8").splitlines()][-1] == "horse"
    finally:
        stop_process(proc, log)


def test_local_admin_administers_within_limits(tiny_dir, kb_index, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    from rag_persona.retrieval.store import load_index

    kb, index = kb_index
    with Server(tiny_dir, index, Access(local_admin=True)) as s:
        c = client(s.url)
        status = c.predict("horse", "乗馬クラブに通う。", "", "", "", "text match", api_name="/kb_add")[0]
        assert "Added `horse`" in status and "horse" in s.engine.store.ids
        assert "horse" in kb.read_text(encoding="utf-8")

        # query paths: outside the persona's folder, with '..', or values from the file: refused, not echoed
        dev = KNOWLEDGE_ROOT / "ojousama" / "queries" / "dev.jsonl"
        first_id = json.loads(dev.read_text(encoding="utf-8").splitlines()[0])["relevant"][0]
        for path, needle in [
            ("/etc/passwd", "is not under knowledge/ojousama/"),
            ("/proc/self/environ", "is not under knowledge/ojousama/"),
            ("../../../../etc/passwd", "'..' is not allowed"),
            ("queries/../../../etc/passwd", "'..' is not allowed"),
            (
                "queries/dev.jsonl",
                "queries/dev.jsonl:1: field 'relevant[0]': unknown fact id (value not shown)",
            ),
        ]:
            text = c.predict(path, None, "dense", 3, api_name="/run_tuning")[0]
            assert needle in text and "root:" not in text and first_id not in text, text
        leaky = tmp_path / "leaky.jsonl"
        leaky.write_text('{"query": "x", "relevant": ["TOP-SECRET-VALUE"]}\n', encoding="utf-8")
        text = c.predict("", handle_file(str(leaky)), "dense", 3, api_name="/run_tuning")[0]
        assert "leaky.jsonl:1" in text and "TOP-SECRET" not in text, text

        # a file input naming a server path that nobody uploaded is refused by Gradio itself
        secret = tmp_path / "server-only.jsonl"
        secret.write_text('{"query": "x", "relevant": []}\n', encoding="utf-8")
        file_data = {"path": str(secret), "meta": {"_type": "gradio.FileData"}}
        r = httpx.post(f"{s.url}/gradio_api/call/run_tuning", json={"data": ["", file_data, "dense", 3]})
        events = httpx.get(f"{s.url}/gradio_api/call/run_tuning/{r.json()['event_id']}", timeout=60).text
        assert "event: error" in events and "not uploaded by a user" in events, events

        # an uploaded query file tunes, and its threshold is saved for everyone
        good = tmp_path / "labelled.jsonl"
        good.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in QUERIES), encoding="utf-8")
        text = c.predict("", handle_file(str(good)), "dense", 2, api_name="/run_tuning")[0]
        assert "Chosen threshold" in text and "labelled.jsonl" in text, text
        assert "Saved threshold" in c.predict(api_name="/save_tuned")
        assert load_index(index).tuned_threshold("dense") is not None

        # the model switch: what the server started with, yes; a path or hub id, no
        loaded = s.engine.loaded
        text = c.predict(str(tiny_dir), "none", api_name="/load_model")[0]
        assert text.startswith("Loaded:") and s.engine.loaded is not loaded
        loaded = s.engine.loaded
        for model, adapter in [
            ("/tmp/evil-model", "none"),
            ("someone/model", "default"),
            (str(tiny_dir), "/tmp/x"),
        ]:
            with pytest.raises(AppError, match="not in the list of choices"):
                c.predict(model, adapter, api_name="/load_model")
            with pytest.raises(RagPersonaError, match="not offered here"):
                s.engine.switch_model(model, None if adapter == "default" else adapter)
        assert s.engine.loaded is loaded
