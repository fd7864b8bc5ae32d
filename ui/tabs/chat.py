"""The Chat tab: the conversation, the context each reply saw, retrieval/decoding settings, the model switch.

Every callback takes the session's persona id (`page.selected`) and works on that persona's engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import gradio as gr

from rag_persona.errors import RagPersonaError
from rag_persona.generation import BUNDLED, GenerationSettings
from rag_persona.prompts import MAX_HISTORY_TURNS, MAX_USER_CHARS, check_user_turn

from ..engine import RETRIEVAL_MODES, Engine, EngineBusy, Job, TurnOptions, options_from
from .common import (
    Named,
    Page,
    chat_messages,
    describe_settings,
    facts_html,
    history_of,
    rendered_prompt,
    reply_info,
    turn_context_html,
)

MAX_STORED_TURNS = 200  # a conversation longer than this must be cleared (the model only sees the last 8)
PREVIEW_CAPTION = "For the last message (or the text being typed)."


@dataclass
class Controls:
    """The settings row's values for one turn (field order = the inputs' order)."""

    mode: str
    threshold: float
    k: int
    context_mode: str
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    repetition_penalty: float
    seed: int | None

    def options(self) -> TurnOptions:
        return options_from(
            self.mode,
            float(self.threshold),
            int(self.k),
            self.context_mode,
            max_new_tokens=int(self.max_new_tokens),
            do_sample=bool(self.do_sample),
            temperature=float(self.temperature),
            top_p=float(self.top_p),
            repetition_penalty=float(self.repetition_penalty),
            seed=int(self.seed) if self.seed else None,
        )

    def shown(self) -> dict:
        """The retrieval settings a reply is labelled with."""
        return {
            "mode": self.mode,
            "threshold": float(self.threshold),
            "k": int(self.k),
            "context_mode": self.context_mode,
        }


@dataclass
class ChatTab:
    """The tab's components; the tuning tab writes `mode` and `threshold`, a model switch `context_mode`."""

    chatbot: Any
    turns: Any
    msg: Any
    send: Any
    regen: Any
    stop: Any
    clear: Any
    status: Any
    context: Any
    prompt: Any
    preview: Any
    mode: Any
    threshold: Any
    k: Any
    context_mode: Any
    max_new_tokens: Any
    repetition_penalty: Any
    do_sample: Any
    temperature: Any
    top_p: Any
    seed: Any
    model_box: Any
    adapter_box: Any
    load_btn: Any
    model_status: Any
    turn_events: list = field(
        default_factory=list
    )  # send, submit, regenerate: what Stop and a persona switch cancel

    def controls(self) -> Named:
        return Named.of(self, *(f.name for f in fields(Controls)))


# -- layout ----------------------------------------------------------------------------------------------
def _conversation(page: Page) -> dict:
    persona = page.persona
    c = {}
    c["chatbot"] = gr.Chatbot(
        value=[{"role": "assistant", "content": persona.greeting}] if persona.greeting else [],
        label=persona.name,
        show_label=False,  # the header names her; the label badge covered the greeting
        elem_id="chatbot",
        height=460,
        buttons=["copy"],
        feedback_options=None,
        placeholder="ごきげんよう。何でもお話しくださいませ。",
    )
    with gr.Row():
        c["msg"] = gr.Textbox(
            placeholder=f"メッセージ（{MAX_USER_CHARS}文字まで）",
            show_label=False,
            scale=5,
            elem_id="msg",
            autofocus=True,
        )
        c["send"] = gr.Button("Send", variant="primary", scale=1, elem_id="send")
    with gr.Row():
        c["regen"] = gr.Button("Regenerate", size="sm", elem_id="regenerate")
        c["stop"] = gr.Button("Stop", size="sm", elem_id="stop")
        c["clear"] = gr.Button("Clear", size="sm", elem_id="clear")
    c["status"] = gr.Markdown("", elem_id="status")
    return c


def _context_column() -> dict:
    c = {}
    gr.Markdown("### Context the model saw")
    c["context"] = gr.HTML(turn_context_html(None), elem_id="context-panel")
    gr.Markdown("<small>Click a reply to see its own context.</small>")
    with gr.Accordion("Prompt as the model saw it", open=False):
        c["prompt"] = gr.Code("", language=None, lines=12, elem_id="prompt-code", wrap_lines=True)
    gr.Markdown("### Retrieval preview at the current settings")
    c["preview"] = gr.HTML(facts_html([], PREVIEW_CAPTION, "Nothing yet."), elem_id="preview-panel")
    return c


def _xattn_info(engine) -> str:
    if engine.xattn_available:
        return "Cross-attention: " + engine.xattn_reason
    return f"Cross-attention is disabled: {engine.xattn_reason}"


def _settings(page: Page) -> dict:
    engine, mode, gen = page.engine, page.default_mode(), GenerationSettings()
    c = {}
    with gr.Row():
        c["mode"] = gr.Radio(list(RETRIEVAL_MODES), value=mode, label="Retrieval mode", elem_id="mode")
        c["threshold"] = gr.Slider(
            0.0,
            1.0,
            value=page.threshold_for(mode),
            step=0.001,
            label="Threshold",
            info=page.threshold_info(mode),
            elem_id="threshold",
        )
        c["k"] = gr.Slider(1, 20, value=page.default_k(), step=1, label="k (at most)", elem_id="k")
    with gr.Row():
        c["context_mode"] = gr.Radio(
            [("prompt", "prompt"), ("cross-attention", "xattn")],
            value="prompt",
            label="Context mode",
            info=_xattn_info(engine),
            interactive=engine.xattn_available,
            elem_id="context-mode",
        )
        c["max_new_tokens"] = gr.Slider(8, 512, value=gen.max_new_tokens, step=8, label="max new tokens")
        c["repetition_penalty"] = gr.Slider(
            1.0, 1.5, value=gen.repetition_penalty, step=0.01, label="repetition penalty"
        )
    with gr.Row():
        c["do_sample"] = gr.Checkbox(value=gen.do_sample, label="sample (otherwise greedy)")
        c["temperature"] = gr.Slider(0.05, 2.0, value=gen.temperature, step=0.05, label="temperature")
        c["top_p"] = gr.Slider(0.05, 1.0, value=gen.top_p, step=0.05, label="top-p")
        c["seed"] = gr.Number(value=0, precision=0, minimum=0, label="seed (0: none)")
    return c


def _model_row(page: Page) -> dict:
    """The model switch: only what the server offers (bundled, started with, shipped adapters); admins only."""
    engine = page.engine
    c = {}
    with gr.Row():
        offered = engine.slot.offered_models()
        current = engine.model_name or next(iter(BUNDLED))
        c["model_box"] = page.admin_only(
            gr.Dropdown,
            offered if current in offered else [*offered, current],
            value=current,
            how="lock",
            label="Model (bundled, or the one the server started with) — shared by everyone on it",
            scale=3,
            elem_id="model-box",
        )
        c["adapter_box"] = page.admin_only(
            gr.Dropdown,
            ["default", *engine.slot.offered_adapters()],
            value="default",
            how="lock",
            label="Adapter (default: the chat's default for this model)",
            scale=3,
            elem_id="adapter-box",
        )
        c["load_btn"] = page.admin_only(gr.Button, "Load model", scale=1, elem_id="load-model")
    c["model_status"] = gr.Markdown(f"Loaded: `{engine.model_label()}`", elem_id="model-status")
    page.admin_notice(elem_id="model-admin-off")
    return c


def build(page: Page, turns: Any) -> ChatTab:
    """The tab's layout and events; `turns` is the session's conversation (a gr.State)."""
    c: dict = {"turns": turns}
    with gr.Tab("Chat", id="chat-tab"):
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                c.update(_conversation(page))
            with gr.Column(scale=2):
                c.update(_context_column())
        with gr.Accordion("Settings", open=True):
            c.update(_settings(page))
            c.update(_model_row(page))
    tab = ChatTab(**c)
    tab.callbacks = ChatCallbacks(page, tab)
    tab.callbacks.wire()
    return tab


# -- callbacks -------------------------------------------------------------------------------------------
def _cleared_chat(greeting: str) -> list[dict]:
    return [{"role": "assistant", "content": greeting}] if greeting else []


class ChatCallbacks:
    """The chat's event handlers; each returns its outputs by name (see `Named`)."""

    def __init__(self, page: Page, tab: ChatTab):
        self.page, self.tab = page, tab
        self.controls = tab.controls()
        self.out = Named.of(tab, "chatbot", "turns", "msg", "context", "prompt", "preview", "status")
        self.cleared = Named.of(tab, *(n for n in self.out.names if n != "preview"))
        self.selected = Named.of(tab, "context", "prompt")
        self.switched = Named(
            model_status=tab.model_status, header=page.header, context_mode=tab.context_mode
        )
        # what a persona switch sets: the conversation cleared, that persona's defaults and model
        self.persona_view = Named.of(
            tab, *self.out.names, "mode", "threshold", "k", "context_mode", "model_box", "model_status"
        )

    def _submit(self, engine: Engine, message, turns: list[dict], controls: Controls) -> tuple[str, Job]:
        text = check_user_turn(message or "")
        if len(turns) >= MAX_STORED_TURNS:
            raise RagPersonaError(
                f"conversation: {len(turns)} exchanges, the limit is {MAX_STORED_TURNS}; press Clear"
            )
        return text, engine.submit(history_of(turns), text, controls.options())

    def run_turn(self, message, turns, pid, *ctl, unchanged=None) -> Iterator[tuple]:
        """Stream one turn. A refused turn leaves the conversation as it was (`unchanged`, for a regenerate)."""
        turns = list(turns or [])
        controls = Controls(**self.controls.read(ctl))
        try:
            engine = self.page.engine_for(pid)
            text, job = self._submit(engine, message, turns, controls)
        except (RagPersonaError, EngineBusy) as exc:
            gr.Warning(str(exc))
            yield self.out.values(turns=turns if unchanged is None else unchanged, status=f"⚠️ {exc}")
            return
        greeting = engine.persona.greeting
        turn = {
            "user": text,
            "assistant": "",
            "context": [{"id": f.id, "text": f.text, "score": float(f.score)} for f in job.plan.context],
            "messages": job.plan.messages,
            "settings": controls.shown(),
        }
        turns.append(turn)
        earlier = len(turns) - 1 - MAX_HISTORY_TURNS
        note = (
            f" The model sees the last {MAX_HISTORY_TURNS} exchanges; {earlier} earlier ones are not sent."
            if earlier > 0
            else ""
        )
        yield self.out.values(
            chatbot=chat_messages(turns, greeting),
            turns=turns,
            msg="",
            context=turn_context_html(turn, len(turns)),
            prompt=rendered_prompt(engine, job.plan.messages),
            status="…" + note,
        )
        yield from self._stream(job, turns, turn, note, greeting)

    def _stream(self, job: Job, turns: list[dict], turn: dict, note: str, greeting: str) -> Iterator[tuple]:
        for kind, value in job.events():
            if kind == "queued" and value:
                yield self.out.values(turns=turns, status=f"waiting for the model: {value} ahead…{note}")
            elif kind == "piece":
                turn["assistant"] += value
                yield self.out.values(chatbot=chat_messages(turns, greeting), turns=turns)
            elif kind == "error":
                turn["assistant"] = turn["assistant"] or "（応答を生成できませんでした）"
                turn["error"] = str(value)
                yield self.out.values(
                    chatbot=chat_messages(turns, greeting), turns=turns, status=f"⚠️ {value}"
                )
            elif kind == "done":
                turn["assistant"] = value.text
                turn["info"] = reply_info(value)
                yield self.out.values(
                    chatbot=chat_messages(turns, greeting), turns=turns, status=turn["info"] + note
                )

    def regenerate(self, turns, pid, *ctl) -> Iterator[tuple]:
        turns = list(turns or [])
        if not turns:
            gr.Warning("Nothing to regenerate yet.")
            yield self.out.values(turns=turns, status="Nothing to regenerate.")
            return
        yield from self.run_turn(turns[-1]["user"], turns[:-1], pid, *ctl, unchanged=turns)

    def clear_chat(self, pid) -> tuple:
        return self.cleared.values(
            chatbot=_cleared_chat(self.page.engine_for(pid).persona.greeting),
            turns=[],
            msg="",
            context=turn_context_html(None),
            prompt="",
            status="Cleared.",
        )

    def show_selected(self, turns, pid, evt: gr.SelectData):
        turns = turns or []
        engine = self.page.engine_for(pid)
        index = evt.index if isinstance(evt.index, int) else (evt.index[0] if evt.index else 0)
        offset = 1 if engine.persona.greeting else 0
        number = (int(index) - offset) // 2
        if not 0 <= number < len(turns):
            return self.selected.values()
        t = turns[number]
        return self.selected.values(
            context=turn_context_html(t, number + 1), prompt=rendered_prompt(engine, t["messages"])
        )

    def preview(self, message, turns, pid, mode, th, k, cmode) -> str:
        text = (message or "").strip() or (turns[-1]["user"] if turns else "")
        if not text:
            return facts_html([], PREVIEW_CAPTION, "Nothing yet.")
        try:
            hits = self.page.engine_for(pid).search(text, mode, float(th), int(k))
        except RagPersonaError as exc:
            return facts_html([], f"Preview failed: {exc}", "—")
        facts = [{"id": h.fact_id, "text": h.text, "score": float(h.score)} for h in hits]
        shown = {"mode": mode, "threshold": float(th), "k": int(k), "context_mode": cmode}
        caption = f"「{text[:40]}」 · {describe_settings(shown)}"
        return facts_html(facts, caption, "No fact scores above this threshold.", elem_class="ctx preview")

    def on_mode(self, mode, pid):
        return gr.update(value=self.page.threshold_for(mode, pid), info=self.page.threshold_info(mode, pid))

    def for_persona(self, pid: str) -> dict:
        """The tab as a new conversation with persona `pid`: its greeting, defaults, model and context mode."""
        page, engine = self.page, self.page.engine_for(pid)
        mode = page.default_mode(pid)
        return self.persona_view.updates(
            chatbot=_cleared_chat(engine.persona.greeting),
            turns=[],
            msg="",
            context=turn_context_html(None),
            prompt="",
            preview=facts_html([], PREVIEW_CAPTION, "Nothing yet."),
            status=f"Now chatting with {engine.persona.name}.",
            mode=mode,
            threshold=gr.update(value=page.threshold_for(mode, pid), info=page.threshold_info(mode, pid)),
            k=page.default_k(pid),
            context_mode=gr.update(
                interactive=engine.xattn_available, value="prompt", info=_xattn_info(engine)
            ),
            model_box=engine.model_name or next(iter(BUNDLED)),
            model_status=f"Loaded: `{engine.model_label()}`",
        )

    def load_model(self, name, adapter, pid, request: gr.Request | None = None):
        page = self.page
        engine = page.engine_for(pid)
        refused = page.warned_refusal(request)
        if refused:  # checked here, not only by hiding the button: any client can call the event
            return self.switched.values(model_status=f"⚠️ {refused} (still serving `{engine.model_label()}`)")
        name = (name or "").strip() or None
        adapter = None if adapter in (None, "", "default") else adapter
        try:
            gr.Info(f"Loading {name or 'the default model'}… everyone waits until it is ready.")
            engine.switch_model(name, adapter)
        except RagPersonaError as exc:
            gr.Warning(str(exc))
            return self.switched.values(
                model_status=f"⚠️ {exc} (still serving `{engine.model_label()}`)", header=page.header_md(pid)
            )
        return self.switched.values(
            model_status=f"Loaded: `{engine.model_label()}`",
            header=page.header_md(pid),
            context_mode=gr.update(
                interactive=engine.xattn_available, value="prompt", info=_xattn_info(engine)
            ),
        )

    # -- events ----------------------------------------------------------------------------------------------
    def wire(self) -> None:
        tab, out, pid = self.tab, self.out, self.page.selected
        # one bound method for every preview event: Gradio groups events by function identity into one
        # concurrency group (limit 4), as one closure did before
        preview = self.preview
        inputs = [tab.msg, tab.turns, pid, *self.controls.components]
        chat = {"concurrency_limit": 16, "concurrency_id": "chat"}
        ev_send = tab.send.click(self.run_turn, inputs, out.components, **chat)
        ev_submit = tab.msg.submit(self.run_turn, inputs, out.components, **chat)
        ev_regen = tab.regen.click(
            self.regenerate, [tab.turns, pid, *self.controls.components], out.components, **chat
        )
        tab.turn_events = [ev_send, ev_submit, ev_regen]
        preview_inputs = [tab.msg, tab.turns, pid, tab.mode, tab.threshold, tab.k, tab.context_mode]
        for ev in tab.turn_events:
            ev.then(preview, preview_inputs, tab.preview)
        tab.stop.click(None, None, None, cancels=tab.turn_events)
        tab.clear.click(self.clear_chat, pid, self.cleared.components, cancels=tab.turn_events)
        tab.chatbot.select(self.show_selected, [tab.turns, pid], self.selected.components)
        # a user's switch of mode resets the threshold to that mode's tuned one
        tab.mode.input(self.on_mode, [tab.mode, pid], tab.threshold)
        for ctl in (tab.threshold, tab.k, tab.mode):
            ctl.change(preview, preview_inputs, tab.preview, concurrency_limit=4, trigger_mode="always_last")
        tab.load_btn.click(
            self.load_model,
            [tab.model_box, tab.adapter_box, pid],
            self.switched.components,
            concurrency_limit=1,
        )
