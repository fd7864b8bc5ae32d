"""The real page in headless Chromium, served by `rag-persona serve` on 127.0.0.1 and a free port.

The model is the tiny random-weight Qwen2 (the reply's wording does not matter here); retrieval is real
(the persona's knowledge indexed with the bundled e5), so changing the threshold changes the context.
Chromium comes from Debian (`apt-get install chromium`, as .ci/run does); without it this test fails
with that instruction rather than skipping.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
QUESTION = "あなたの名前はなんですか?"


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the browser test needs Debian's chromium "
            "(apt-get install -y chromium; .ci/run does this)"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the python package 'playwright' is missing: pip install -e '.[dev]'")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, persona_index):
    """`rag-persona serve --model <tiny> --index <persona index> --port <free>` as a real process."""
    from conftest import make_tiny_qwen2, make_tokenizer, stop_process

    base = tmp_path_factory.mktemp("serve")
    model_dir = base / "tiny-qwen2"
    tok = make_tokenizer()
    make_tiny_qwen2(tok).save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "RAG_PERSONA_HOME": str(base / "home"),
        "RAG_PERSONA_CHAT_ADAPTER": "none",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    log = open(base / "serve.log", "w")
    script = Path(sys.executable).parent / "rag-persona"  # the installed entry point, as a user runs it
    assert script.exists(), f"{script} missing: pip install -e '.[dev]'"
    cmd = [str(script), "serve", "--model", str(model_dir), "--index", str(persona_index), "--admin"]
    proc = subprocess.Popen([*cmd, "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"rag-persona serve exited with {proc.returncode}:\n{(base / 'serve.log').read_text()}"
                )
            try:
                if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"rag-persona serve did not answer in 180s:\n{(base / 'serve.log').read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        stop_process(proc, log)


def context_rows(page, panel: str) -> list[tuple[str, float]]:
    rows = page.locator(f"#{panel} tr[data-fact-id]")
    return [
        (rows.nth(i).get_attribute("data-fact-id"), float(rows.nth(i).locator("td.score").inner_text()))
        for i in range(rows.count())
    ]


def wait_reply_done(page, timeout_ms: int = 90_000) -> None:
    page.wait_for_function(
        "() => (document.querySelector('#status')?.innerText || '').includes('ended by')", timeout=timeout_ms
    )


def set_slider(page, elem_id: str, value: float) -> None:
    box = page.locator(f"#{elem_id} input[data-testid='number-input']")
    box.fill(str(value))
    box.press("Enter")


def test_chat_shows_reply_and_context_and_threshold_changes_it(server, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1200})
    try:
        page.goto(server)
        page.wait_for_selector("#msg textarea", timeout=60_000)
        page.get_by_label("dense").check()  # a known score scale: cosine

        page.fill("#msg textarea", QUESTION)
        page.click("#send")
        page.wait_for_selector("#context-panel tr[data-fact-id]", timeout=60_000)
        wait_reply_done(page)

        bots = page.locator('#chatbot [data-testid="bot"]')
        users = page.locator('#chatbot [data-testid="user"]')
        assert users.count() == 1 and QUESTION in users.first.inner_text()
        assert bots.count() == 2  # the greeting + the reply
        assert bots.last.inner_text().strip(), "the reply is empty"
        first = context_rows(page, "context-panel")
        assert first, "no context retrieved"
        assert first[0][0] == "profile-name", first
        assert "in the prompt" in page.inner_text("#context-panel")
        page.get_by_text("Prompt as the model saw it").click()
        assert "名前は小野寺絢音" in page.inner_text("#prompt-code")  # the top fact is in the prompt

        # raise the threshold above all but the best fact (above every fact if only one was found):
        # the preview changes at once ...
        scores = [s for _, s in first]
        lower = next((s for s in scores[1:] if scores[0] - s >= 0.004), None)
        new_threshold = (
            round((scores[0] + lower) / 2, 3) if lower is not None else round(min(scores[0] + 0.002, 1.0), 3)
        )
        expected = [fid for fid, s in first if s >= new_threshold]
        assert len(expected) < len(first)
        set_slider(page, "threshold", new_threshold)
        page.wait_for_function(
            "n => document.querySelectorAll('#preview-panel tr[data-fact-id]').length === n",
            arg=len(expected),
            timeout=30_000,
        )
        assert [fid for fid, _ in context_rows(page, "preview-panel")] == expected

        # ... and regenerating answers again with the new context
        page.click("#regenerate")
        page.wait_for_function(
            "t => (document.querySelector('#context-panel .ctx-caption')?.innerText || '').includes(t)",
            arg=f"threshold {new_threshold:.3f}",
            timeout=60_000,
        )
        wait_reply_done(page)
        assert [fid for fid, _ in context_rows(page, "context-panel")] == expected
        assert page.locator('#chatbot [data-testid="user"]').count() == 1  # regenerated, not appended
        assert page.locator('#chatbot [data-testid="bot"]').count() == 2

        # an oversized message is refused with the limit named, and nothing is sent
        page.fill("#msg textarea", "あ" * 1001)
        page.click("#send")
        page.wait_for_function(
            "() => (document.querySelector('#status')?.innerText || '').includes('the limit is 1000')",
            timeout=30_000,
        )
        assert page.locator('#chatbot [data-testid="user"]').count() == 1

        page.click("#clear")
        page.wait_for_function(
            "() => document.querySelectorAll('#chatbot [data-testid=\"user\"]').length === 0", timeout=30_000
        )
    finally:
        page.close()


def test_knowledge_tab_searches_and_refuses_a_bad_edit(server, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1200})
    try:
        page.goto(server)
        page.get_by_role("tab", name="Knowledge").click()
        page.fill("#kb-query textarea", "ピアノ")
        page.press("#kb-query textarea", "Enter")
        page.wait_for_function(
            "() => { const t = document.querySelector('#kb-table'); return t && t.innerText.includes('ピアノ') "
            "&& !t.innerText.includes('profile-name'); }",
            timeout=30_000,
        )
        page.fill("#kb-id textarea", "profile-name")
        page.fill("#kb-text textarea", "重複したid")
        page.click("#kb-add")
        page.wait_for_function(
            "() => (document.querySelector('#kb-status')?.innerText || '').includes(\"duplicate id 'profile-name'\")",
            timeout=30_000,
        )
        assert "Refused" in page.inner_text("#kb-status")
    finally:
        page.close()
