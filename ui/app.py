"""The server app: the Gradio page (chat, knowledge, tuning tabs from ui.tabs) and the /v1 API on one FastAPI app.

`create_app(engine)` returns one FastAPI app: the OpenAI-compatible `/v1/...` routes (ui.api) and the Gradio
Blocks mounted at `/`. One engine (model + queue) serves both; each browser session keeps its own
conversation in a `gr.State`, so sessions never see each other's turns.
"""

from __future__ import annotations

import gradio as gr
from fastapi import FastAPI

from .api import add_api_routes
from .engine import CONTEXT_MODES, Engine
from .tabs import chat, knowledge, tuning
from .tabs.common import Page
from .tabs.tuning import tune

CSS = """
#context-panel table, #preview-panel table, .fact-table {width: 100%; border-collapse: collapse; font-size: 0.92em}
.fact-table td, .fact-table th {padding: 4px 6px; border-bottom: 1px solid var(--border-color-primary); text-align: left}
.fact-table td.score {font-variant-numeric: tabular-nums; white-space: nowrap; width: 4.5em}
.fact-table td.fid {color: var(--body-text-color-subdued); white-space: nowrap; font-size: 0.85em}
.ctx-caption {font-size: 0.88em; color: var(--body-text-color-subdued); margin: 2px 0 6px 0}
.ctx-empty {padding: 8px; border: 1px dashed var(--border-color-primary); border-radius: 6px}
#status {min-height: 1.6em}
"""


def build_blocks(engine: Engine, *, default_queries: str | None = None) -> gr.Blocks:
    """The page: a header over the Chat, Knowledge and Threshold tuning tabs."""
    page = Page(engine)
    with gr.Blocks(title=f"{engine.persona.name} — rag-persona", fill_width=True) as demo:
        page.header = gr.Markdown(page.header_md(), elem_id="header")
        turns = gr.State([])
        with gr.Tabs():
            chat_tab = chat.build(page, turns)
            knowledge.build(page)
            tuning.build(page, chat_tab, default_queries)
    return demo


def create_app(engine: Engine, *, auth: tuple[str, str] | None = None, default_queries: str | None = None):
    """FastAPI app: /v1 (OpenAI-compatible) + the Gradio page at /, sharing one engine."""
    app = FastAPI(title="rag-persona", docs_url="/v1/docs", openapi_url="/v1/openapi.json")
    add_api_routes(app, engine, auth=auth)
    demo = build_blocks(engine, default_queries=default_queries)
    demo.queue(default_concurrency_limit=4, max_size=128)
    return gr.mount_gradio_app(
        app,
        demo,
        path="/",
        auth=auth,
        auth_message="rag-persona: sign in with the --auth credentials",
        theme=gr.themes.Soft(),
        css=CSS,
        footer_links=["api"],
        ssr_mode=False,
        show_error=True,
    )


__all__ = ["CONTEXT_MODES", "build_blocks", "create_app", "tune"]
