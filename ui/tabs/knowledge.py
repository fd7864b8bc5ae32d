"""The Knowledge tab: search the session persona's facts (text match or retrieval); add, update, delete them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from rag_persona.errors import RagPersonaError

from ..engine import Engine
from .common import Named, Page

BUTTONS = (  # action, label, variant, elem_id
    ("add", "Add", "primary", "kb-add"),
    ("update", "Update", "secondary", "kb-update"),
    ("delete", "Delete", "stop", "kb-delete"),
)


@dataclass
class KnowledgeTab:
    query: Any
    how: Any
    search: Any
    table: Any
    form: Named  # id, text, questions, tags
    buttons: dict  # action → button
    status: Any
    callbacks: Any = None  # the KnowledgeCallbacks wired to it

    def form_fields(self) -> dict:
        return dict(zip(self.form.names, self.form.components, strict=True))


def fact_rows(engine: Engine, query: str, how: str) -> list[list]:
    """The table's rows: every fact containing the query (text match), or the retrieval's top 30 with scores."""
    query = (query or "").strip()
    store = engine.store
    if query and how == "retrieval":
        hits = engine.search(query, None, -1e9, 30)
        return [
            [
                h.fact_id,
                h.text,
                " / ".join(store.fact(h.fact_id).questions),
                ", ".join(store.fact(h.fact_id).tags),
                round(float(h.score), 4),
            ]
            for h in hits
        ]
    q = query.lower()
    rows = []
    for f in list(store.facts):
        hay = " ".join([f.id, f.text, *f.questions, *f.tags]).lower()
        if not q or q in hay:
            rows.append([f.id, f.text, " / ".join(f.questions), ", ".join(f.tags), ""])
    return rows


def fact_from_form(fid: str, text, questions, tags) -> dict:
    return {
        "id": fid,
        "text": text or "",
        "questions": [q.strip() for q in (questions or "").splitlines() if q.strip()],
        "tags": [t.strip() for t in (tags or "").split(",") if t.strip()],
    }


def build(page: Page) -> KnowledgeTab:
    engine = page.engine
    with gr.Tab("Knowledge", id="knowledge-tab"):
        with gr.Row():
            query = gr.Textbox(
                label="Search facts", placeholder="text, id or tag", scale=4, elem_id="kb-query"
            )
            how = gr.Radio(["text match", "retrieval"], value="text match", label="How", scale=2)
            search = gr.Button("Search", scale=1)
        table = gr.Dataframe(
            fact_rows(engine, "", "text match"),
            headers=["id", "text", "questions", "tags", "score"],
            interactive=False,
            wrap=True,
            max_height=380,
            elem_id="kb-table",
        )
        gr.Markdown(
            "Select a row to edit it. Edits are saved atomically to the knowledge file and the index."
        )
        with gr.Row():
            f_id = gr.Textbox(label="id", scale=1, elem_id="kb-id")
            f_text = gr.Textbox(label="text", lines=2, scale=3, elem_id="kb-text")
        with gr.Row():
            f_questions = gr.Textbox(label="questions (one a line)", lines=3, elem_id="kb-questions")
            f_tags = gr.Textbox(label="tags (comma-separated)", elem_id="kb-tags")
        page.admin_notice(elem_id="kb-admin-off")
        with gr.Row():
            buttons = {
                action: page.admin_only(gr.Button, label, variant=variant, elem_id=elem_id)
                for action, label, variant, elem_id in BUTTONS
            }
        status = gr.Markdown("", elem_id="kb-status")
    form = Named(id=f_id, text=f_text, questions=f_questions, tags=f_tags)
    tab = KnowledgeTab(
        query=query, how=how, search=search, table=table, form=form, buttons=buttons, status=status
    )
    tab.callbacks = KnowledgeCallbacks(page, tab)
    tab.callbacks.wire()
    return tab


class KnowledgeCallbacks:
    """Search, select-to-edit and the three edits; every edit refreshes the table and the page header."""

    def __init__(self, page: Page, tab: KnowledgeTab):
        self.page, self.tab = page, tab
        self.edited = Named(status=tab.status, table=tab.table, header=page.header)
        # what a persona switch sets: that persona's facts, an empty search and form
        self.persona_view = Named(query=tab.query, table=tab.table, status=tab.status, **tab.form_fields())

    # the method names are the page's Gradio API names (kept as they were)
    def kb_search_fn(self, query, how, pid):
        return fact_rows(self.page.engine_for(pid), query, how)

    def kb_select(self, table, pid, evt: gr.SelectData):
        row = evt.index[0] if isinstance(evt.index, list | tuple) else evt.index
        try:
            fid = table.iloc[int(row)]["id"] if hasattr(table, "iloc") else table[int(row)][0]
            fact = self.page.engine_for(pid).store.fact(fid)
        except (RagPersonaError, IndexError, KeyError, ValueError):
            return self.tab.form.values()
        return self.tab.form.values(
            id=fact.id, text=fact.text, questions="\n".join(fact.questions), tags=", ".join(fact.tags)
        )

    def kb_edit(self, action, fid, text, questions, tags, query, how, pid, request: gr.Request | None = None):
        page = self.page
        engine = page.engine_for(pid)
        refused = page.warned_refusal(request)
        if refused:  # checked here, not only by hiding the buttons: any client can call the event
            return self.edited.values(status=f"⚠️ {refused}")
        fid = (fid or "").strip()
        try:
            if not fid:
                raise RagPersonaError(f"{action}: field 'id': empty; type or select a fact id")
            if action == "delete":
                engine.edit_store("delete", [fid])
                done = f"Deleted `{fid}`."
            else:
                fact = fact_from_form(fid, text, questions, tags)
                if action == "update" and fid in engine.store:
                    fact = {**engine.store.fact(fid).extra, **fact}
                engine.edit_store(action, fact)
                done = f"{'Added' if action == 'add' else 'Updated'} `{fid}`; the index has {len(engine.store)} facts."
        except RagPersonaError as exc:
            gr.Warning(str(exc))
            return self.edited.values(status=f"⚠️ Refused: {exc}", header=page.header_md(pid))
        return self.edited.values(
            status=f"✅ {done}", table=fact_rows(engine, query, how), header=page.header_md(pid)
        )

    def for_persona(self, pid: str) -> dict:
        """The tab for persona `pid`: all its facts, the search and the edit form emptied."""
        blank = dict.fromkeys(self.tab.form.names, "")
        rows = fact_rows(self.page.engine_for(pid), "", "text match")
        return self.persona_view.updates(query="", table=rows, status="", **blank)

    def wire(self) -> None:
        tab, pid = self.tab, self.page.selected
        search = self.kb_search_fn  # one object: both events share its concurrency group, as before
        tab.search.click(search, [tab.query, tab.how, pid], tab.table)
        tab.query.submit(search, [tab.query, tab.how, pid], tab.table)
        tab.table.select(self.kb_select, [tab.table, pid], tab.form.components)
        inputs = [*tab.form.components, tab.query, tab.how, pid]
        for action, button in tab.buttons.items():
            button.click(
                self.edit_for(action),
                inputs,
                self.edited.components,
                concurrency_limit=1,
                concurrency_id="kb",
            )

    def edit_for(self, action: str):
        """The click handler of one edit button (Gradio hands the signed-in user in as gr.Request)."""

        def edit(fid, text, questions, tags, query, how, pid, request: gr.Request):
            return self.kb_edit(action, fid, text, questions, tags, query, how, pid, request)

        edit.__name__ = edit.__qualname__ = f"kb_{action}"  # the page's API name: /kb_add, /kb_update, ...
        return edit
