"""The server app: the Gradio page (chat, knowledge, tuning tabs from ui.tabs) and the /v1 API on one FastAPI app.

`create_app(engine)` returns one FastAPI app: the OpenAI-compatible `/v1/...` routes (ui.api) and the Gradio
Blocks mounted at `/`. One engine (model + queue) serves both; each browser session keeps its own
conversation in a `gr.State`, so sessions never see each other's turns.

`create_app(personas)` serves several personas (ui.engine.Personas): the API picks one by the request's
`model`, the page by a persona selector at its top (shown with more than one persona). The selected persona
is a `gr.State` of the session, so one visitor's choice never changes another's; switching clears the
conversation and points the chat, knowledge and tuning tabs at that persona.
"""

from __future__ import annotations

import gradio as gr

from rag_persona.errors import RagPersonaError

from .access import Access
from .api import create_api
from .engine import CONTEXT_MODES, Engine, Personas
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


def build_blocks(
    engine: Engine | Personas, *, access: Access | None = None, default_queries: str | None = None
) -> gr.Blocks:
    """The page: the persona selector and a header over the Chat, Knowledge and Threshold tuning tabs;
    admin controls per sign-in."""
    page = Page(Personas.of(engine), access or Access())
    title = " / ".join(e.persona.name for e in page.personas)
    with gr.Blocks(title=f"{title} — rag-persona", fill_width=True) as demo:
        page.selected = gr.State(page.persona.id)
        selector = gr.Dropdown(
            [(f"{e.persona.display_name} · {pid}", pid) for pid, e in page.personas.engines.items()],
            value=page.persona.id,
            label="Persona (for this browser session; switching starts a new conversation)",
            visible=len(page.personas) > 1,
            elem_id="persona-select",
        )
        page.header = gr.Markdown(page.header_md(), elem_id="header")
        turns = gr.State([])
        with gr.Tabs():
            chat_tab = chat.build(page, turns)
            kb_tab = knowledge.build(page)
            tuning_tab = tuning.build(page, chat_tab, default_queries)
        # who signed in decides what is shown; every admin callback checks again on its own
        demo.load(page.role_updates, None, [c for c, _ in page.role_controls], api_visibility="private")
        views = [chat_tab.callbacks, kb_tab.callbacks, tuning_tab]
        outputs = [page.selected, page.header, *(c for v in views for c in v.persona_view.components)]

        def select_persona(pid):
            """This session's persona: every tab follows it, the conversation starts anew."""
            try:
                page.engine_for(pid)
            except RagPersonaError as exc:  # a client may send any string
                gr.Warning(str(exc))
                return {}
            updates = {page.selected: pid, page.header: page.header_md(pid)}
            for view in views:
                updates.update(view.for_persona(pid))
            return updates

        selector.input(
            select_persona, selector, outputs, cancels=chat_tab.turn_events, concurrency_limit=None
        )
    return demo


def create_app(
    engine: Engine | Personas,
    *,
    auth: tuple[str, str] | None = None,
    access: Access | None = None,
    default_queries: str | None = None,
):
    """FastAPI app: /v1 (OpenAI-compatible) + the Gradio page at /, sharing one engine (or the personas).

    `access` says who signs in and who administers; `auth` alone (chat credentials) means no administration.
    """
    access = access or Access(chat=auth)
    app = create_api(engine, auth=access.api_auth())
    demo = build_blocks(engine, access=access, default_queries=default_queries)
    demo.queue(default_concurrency_limit=4, max_size=128)
    # Gradio checks that a file input names a file a user uploaded only once the Blocks "has launched";
    # mounted on FastAPI they never launch, and any server path would be copied in (e.g. /etc/... into
    # the tuning upload). Mark them launched so uploads are the only files an input can name.
    demo.has_launched = True
    signed_in = " or ".join(
        name for name, c in (("--auth", access.chat), ("--admin-auth", access.admin)) if c
    )
    return gr.mount_gradio_app(
        app,
        demo,
        path="/",
        auth=access.gradio_auth(),
        auth_message=f"rag-persona: sign in with the {signed_in} credentials",
        theme=gr.themes.Soft(),
        css=CSS,
        footer_links=["api"],
        ssr_mode=False,
        show_error=True,
        # Gradio's own FastAPI schema would sit at /openapi.json outside any sign-in; ours is /v1/openapi.json.
        app_kwargs={"openapi_url": None},
    )


__all__ = ["CONTEXT_MODES", "Personas", "build_blocks", "create_app", "tune"]
