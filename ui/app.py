"""The Gradio page: chat with the persona (context shown beside each reply), knowledge editing, threshold tuning.

`create_app(engine)` returns one FastAPI app: the OpenAI-compatible `/v1/...` routes (ui.api) and the Gradio
Blocks mounted at `/`. One engine (model + queue) serves both; each browser session keeps its own
conversation in a `gr.State`, so sessions never see each other's turns.
"""

from __future__ import annotations

import html
import json
import tempfile
from pathlib import Path

import gradio as gr

from rag_persona.errors import RagPersonaError
from rag_persona.generation import GenerationSettings
from rag_persona.prompts import MAX_HISTORY_TURNS, MAX_USER_CHARS, check_user_turn

from .engine import CONTEXT_MODES, RETRIEVAL_MODES, Engine, EngineBusy, options_from

MAX_STORED_TURNS = 200  # a conversation longer than this must be cleared (the model only sees the last 8)
CONTEXT_LABELS = {"prompt": "prompt", "xattn": "cross-attention"}

CSS = """
#context-panel table, #preview-panel table, .fact-table {width: 100%; border-collapse: collapse; font-size: 0.92em}
.fact-table td, .fact-table th {padding: 4px 6px; border-bottom: 1px solid var(--border-color-primary); text-align: left}
.fact-table td.score {font-variant-numeric: tabular-nums; white-space: nowrap; width: 4.5em}
.fact-table td.fid {color: var(--body-text-color-subdued); white-space: nowrap; font-size: 0.85em}
.ctx-caption {font-size: 0.88em; color: var(--body-text-color-subdued); margin: 2px 0 6px 0}
.ctx-empty {padding: 8px; border: 1px dashed var(--border-color-primary); border-radius: 6px}
#status {min-height: 1.6em}
"""


# -- rendering ---------------------------------------------------------------------------------------------
def facts_html(facts: list[dict], caption: str, empty: str, elem_class: str = "ctx") -> str:
    cap = f'<div class="ctx-caption">{html.escape(caption)}</div>'
    if not facts:
        return f'<div class="{elem_class}" data-count="0">{cap}<div class="ctx-empty">{html.escape(empty)}</div></div>'
    rows = "".join(
        f'<tr data-fact-id="{html.escape(f["id"])}"><td class="score">{f["score"]:.3f}</td>'
        f'<td>{html.escape(f["text"])}</td><td class="fid">{html.escape(f["id"])}</td></tr>'
        for f in facts
    )
    return (
        f'<div class="{elem_class}" data-count="{len(facts)}">{cap}<table class="fact-table">'
        f"<tr><th>score</th><th>fact</th><th>id</th></tr>{rows}</table></div>"
    )


def describe_settings(s: dict) -> str:
    th = s.get("threshold")
    th = "tuned" if th is None else f"{th:.3f}"
    return f"{s.get('mode') or 'default'} retrieval, threshold {th}, k {s.get('k')}, context in the {CONTEXT_LABELS.get(s.get('context_mode'), 'prompt')}"


def turn_context_html(turn: dict | None, number: int | None = None) -> str:
    if not turn:
        return facts_html(
            [], "No reply yet.", "Send a message: the facts retrieved for each reply appear here."
        )
    where = (
        "as cross-attention memory" if turn["settings"].get("context_mode") == "xattn" else "in the prompt"
    )
    label = f"Reply {number}" if number else "This reply"
    caption = f"{label}: {len(turn['context'])} facts {where} · {describe_settings(turn['settings'])}"
    return facts_html(
        turn["context"], caption, "No fact scored above the threshold: the model got no context."
    )


def chat_messages(turns: list[dict], greeting: str = "") -> list[dict]:
    """What the chat shows: the persona's greeting (display only, never sent), then the turns."""
    out = [{"role": "assistant", "content": greeting}] if greeting else []
    for t in turns:
        out.append({"role": "user", "content": t["user"]})
        if t.get("assistant") is not None:
            out.append({"role": "assistant", "content": t["assistant"]})
    return out


def history_of(turns: list[dict]) -> list[dict]:
    """The history the model gets: exchanges that produced a reply (failed ones are left out)."""
    return [m for m in chat_messages([t for t in turns if not t.get("error")]) if m["content"]]


def rendered_prompt(engine: Engine, messages: list[dict]) -> str:
    tok = getattr(engine.loaded, "tokenizer", None)
    try:
        return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception:  # noqa: BLE001 - a tokenizer without a template: show the messages instead
        return json.dumps(messages, ensure_ascii=False, indent=2)


def _reply_info(reply) -> str:
    end = "EOS" if reply.ended_by_eos else "token limit"
    ttft = f", first token {reply.first_token_seconds:.2f}s" if reply.first_token_seconds else ""
    speed = reply.new_tokens / reply.seconds if reply.seconds else 0.0
    return f"{reply.new_tokens} tokens in {reply.seconds:.1f}s ({speed:.1f} tok/s{ttft}), ended by {end}"


# -- the Blocks -------------------------------------------------------------------------------------------
def build_blocks(engine: Engine, *, default_queries: str | None = None) -> gr.Blocks:
    persona = engine.persona
    initial = engine.defaults()
    default_mode = initial.get("mode") if initial.get("mode") in RETRIEVAL_MODES else "dense"
    mode_defaults = {m: engine.defaults(m) for m in RETRIEVAL_MODES}
    gen_defaults = GenerationSettings()
    if default_queries is None:
        from rag_persona.settings import get_settings

        candidate = get_settings().persona_dir(persona.id) / "queries" / "dev.jsonl"
        default_queries = str(candidate) if candidate.exists() else ""

    def threshold_for(mode: str) -> float:
        return round(float(mode_defaults[mode]["threshold"]), 4)

    def threshold_info(mode: str) -> str:
        d = mode_defaults[mode]
        source = {"tuned": "tuned on this index", "default": "library default, not tuned here"}.get(
            d.get("threshold_source"), d.get("threshold_source") or "index"
        )
        return (
            f"Facts scoring below it are not given to the model. For {mode}: {d['threshold']:.3f} ({source})."
        )

    def header_md() -> str:
        info = engine.info()
        adapter = f" + adapter `{Path(info['adapter']).name}`" if info.get("adapter") else ""
        return (
            f"## {persona.name}（{persona.reading}）とおしゃべり\n"
            f"model `{engine.model_label()}`{adapter} on {info.get('device')} · "
            f"{info['facts']} facts · queue: {info['queue']['waiting']} waiting"
        )

    with gr.Blocks(title=f"{persona.name} — rag-persona", fill_width=True) as demo:
        header = gr.Markdown(header_md(), elem_id="header")
        turns_state = gr.State([])
        with gr.Tabs():
            # ---------------------------------------------------------------- chat
            with gr.Tab("Chat", id="chat-tab"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=3):
                        chatbot = gr.Chatbot(
                            value=[{"role": "assistant", "content": persona.greeting}]
                            if persona.greeting
                            else [],
                            label=persona.name,
                            show_label=False,  # the header names her; the label badge covered the greeting
                            elem_id="chatbot",
                            height=460,
                            buttons=["copy"],
                            feedback_options=None,
                            placeholder="ごきげんよう。何でもお話しくださいませ。",
                        )
                        with gr.Row():
                            msg = gr.Textbox(
                                placeholder=f"メッセージ（{MAX_USER_CHARS}文字まで）",
                                show_label=False,
                                scale=5,
                                elem_id="msg",
                                autofocus=True,
                            )
                            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                        with gr.Row():
                            regen = gr.Button("Regenerate", size="sm", elem_id="regenerate")
                            stop = gr.Button("Stop", size="sm", elem_id="stop")
                            clear = gr.Button("Clear", size="sm", elem_id="clear")
                        status = gr.Markdown("", elem_id="status")
                    with gr.Column(scale=2):
                        gr.Markdown("### Context the model saw")
                        context_panel = gr.HTML(turn_context_html(None), elem_id="context-panel")
                        gr.Markdown("<small>Click a reply to see its own context.</small>")
                        with gr.Accordion("Prompt as the model saw it", open=False):
                            prompt_code = gr.Code(
                                "", language=None, lines=12, elem_id="prompt-code", wrap_lines=True
                            )
                        gr.Markdown("### Retrieval preview at the current settings")
                        preview_panel = gr.HTML(
                            facts_html([], "For the last message (or the text being typed).", "Nothing yet."),
                            elem_id="preview-panel",
                        )
                with gr.Accordion("Settings", open=True):
                    with gr.Row():
                        mode = gr.Radio(
                            list(RETRIEVAL_MODES), value=default_mode, label="Retrieval mode", elem_id="mode"
                        )
                        threshold = gr.Slider(
                            0.0,
                            1.0,
                            value=threshold_for(default_mode),
                            step=0.001,
                            label="Threshold",
                            info=threshold_info(default_mode),
                            elem_id="threshold",
                        )
                        k = gr.Slider(
                            1, 20, value=int(initial.get("k") or 5), step=1, label="k (at most)", elem_id="k"
                        )
                    with gr.Row():
                        xattn_ok = engine.xattn_available
                        context_mode = gr.Radio(
                            [("prompt", "prompt"), ("cross-attention", "xattn")],
                            value="prompt",
                            label="Context mode",
                            info=("Cross-attention: " + engine.xattn_reason)
                            if xattn_ok
                            else f"Cross-attention is disabled: {engine.xattn_reason}",
                            interactive=xattn_ok,
                            elem_id="context-mode",
                        )
                        max_new = gr.Slider(
                            8, 512, value=gen_defaults.max_new_tokens, step=8, label="max new tokens"
                        )
                        rep = gr.Slider(
                            1.0,
                            1.5,
                            value=gen_defaults.repetition_penalty,
                            step=0.01,
                            label="repetition penalty",
                        )
                    with gr.Row():
                        sample = gr.Checkbox(value=gen_defaults.do_sample, label="sample (otherwise greedy)")
                        temperature = gr.Slider(
                            0.05, 2.0, value=gen_defaults.temperature, step=0.05, label="temperature"
                        )
                        top_p = gr.Slider(0.05, 1.0, value=gen_defaults.top_p, step=0.05, label="top-p")
                        seed = gr.Number(value=0, precision=0, minimum=0, label="seed (0: none)")
                    with gr.Row():
                        from rag_persona.generation import BUNDLED

                        current = engine.model_name or next(iter(BUNDLED))
                        model_box = gr.Dropdown(
                            sorted({*BUNDLED, current}),
                            value=current,
                            allow_custom_value=True,
                            label="Model (bundled alias, hub id or folder) — shared by everyone",
                            scale=3,
                        )
                        adapters = ["default", "none", *_shipped_adapter_paths()]
                        adapter_box = gr.Dropdown(
                            adapters,
                            value="default",
                            allow_custom_value=True,
                            label="Adapter (default: the chat's default for this model)",
                            scale=3,
                        )
                        load_btn = gr.Button("Load model", scale=1)
                    model_status = gr.Markdown(f"Loaded: `{engine.model_label()}`")

            # ---------------------------------------------------------------- knowledge
            with gr.Tab("Knowledge", id="knowledge-tab"):
                with gr.Row():
                    kb_query = gr.Textbox(
                        label="Search facts", placeholder="text, id or tag", scale=4, elem_id="kb-query"
                    )
                    kb_how = gr.Radio(["text match", "retrieval"], value="text match", label="How", scale=2)
                    kb_search = gr.Button("Search", scale=1)
                kb_table = gr.Dataframe(
                    _fact_rows(engine, "", "text match"),
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
                with gr.Row():
                    kb_add = gr.Button("Add", variant="primary", elem_id="kb-add")
                    kb_update = gr.Button("Update", elem_id="kb-update")
                    kb_delete = gr.Button("Delete", variant="stop", elem_id="kb-delete")
                kb_status = gr.Markdown("", elem_id="kb-status")

            # ---------------------------------------------------------------- tuning
            with gr.Tab("Threshold tuning", id="tuning-tab"):
                gr.Markdown(
                    "Sweep the threshold over a labelled query file "
                    '(JSONL: `{"query": "...", "relevant": ["fact-id", ...]}`, `[]` = nothing should be retrieved) '
                    "and pick the F1-best one."
                )
                with gr.Row():
                    q_path = gr.Textbox(
                        default_queries, label="Labelled queries (path)", scale=3, elem_id="tune-path"
                    )
                    q_file = gr.File(label="…or upload a JSONL", file_types=[".jsonl"], scale=2)
                with gr.Row():
                    t_mode = gr.Radio(list(RETRIEVAL_MODES), value=default_mode, label="Retrieval mode")
                    t_k = gr.Slider(1, 20, value=int(initial.get("k") or 5), step=1, label="k")
                    t_run = gr.Button("Run tuning", variant="primary", elem_id="tune-run")
                t_result = gr.Markdown("", elem_id="tune-result")
                t_plot = gr.Image(
                    label="precision / recall / F1 against threshold", type="filepath", elem_id="tune-plot"
                )
                t_state = gr.State(None)
                with gr.Row():
                    t_use = gr.Button("Use in this chat")
                    t_save = gr.Button("Save to the index (default for everyone)")

        controls = [mode, threshold, k, context_mode, max_new, sample, temperature, top_p, rep, seed]

        # -- chat handlers ----------------------------------------------------------------------------
        def make_options(mode_, th, k_, cmode, max_new_, sample_, temp, top_p_, rep_, seed_):
            return options_from(
                mode_,
                float(th),
                int(k_),
                cmode,
                max_new_tokens=int(max_new_),
                do_sample=bool(sample_),
                temperature=float(temp),
                top_p=float(top_p_),
                repetition_penalty=float(rep_),
                seed=int(seed_) if seed_ else None,
            )

        def run_turn(message, turns, *ctl, unchanged=None):
            """Stream one turn; yields (chatbot, turns, msg, context, prompt, preview, status).

            A refused turn leaves the conversation as it was (`unchanged`, for a regenerate)."""
            turns = list(turns or [])
            keep = gr.update()
            try:
                text = check_user_turn(message or "")
                if len(turns) >= MAX_STORED_TURNS:
                    raise RagPersonaError(
                        f"conversation: {len(turns)} exchanges, the limit is {MAX_STORED_TURNS}; press Clear"
                    )
                options = make_options(*ctl)
                settings = {
                    "mode": ctl[0],
                    "threshold": float(ctl[1]),
                    "k": int(ctl[2]),
                    "context_mode": ctl[3],
                }
                job = engine.submit(history_of(turns), text, options)
            except (RagPersonaError, EngineBusy) as exc:
                gr.Warning(str(exc))
                yield keep, (turns if unchanged is None else unchanged), keep, keep, keep, keep, f"⚠️ {exc}"
                return
            turn = {
                "user": text,
                "assistant": "",
                "context": [{"id": f.id, "text": f.text, "score": float(f.score)} for f in job.plan.context],
                "messages": job.plan.messages,
                "settings": settings,
            }
            turns.append(turn)
            ctx = turn_context_html(turn, len(turns))
            prompt = rendered_prompt(engine, job.plan.messages)
            earlier = len(turns) - 1 - MAX_HISTORY_TURNS
            note = (
                f" The model sees the last {MAX_HISTORY_TURNS} exchanges; {earlier} earlier ones are not sent."
                if earlier > 0
                else ""
            )
            yield chat_messages(turns, persona.greeting), turns, "", ctx, prompt, keep, "…" + note
            for kind, value in job.events():
                if kind == "queued" and value:
                    yield keep, turns, keep, keep, keep, keep, f"waiting for the model: {value} ahead…{note}"
                elif kind == "piece":
                    turn["assistant"] += value
                    yield chat_messages(turns, persona.greeting), turns, keep, keep, keep, keep, keep
                elif kind == "error":
                    turn["assistant"] = turn["assistant"] or "（応答を生成できませんでした）"
                    turn["error"] = str(value)
                    yield chat_messages(turns, persona.greeting), turns, keep, keep, keep, keep, f"⚠️ {value}"
                elif kind == "done":
                    turn["assistant"] = value.text
                    turn["info"] = _reply_info(value)
                    yield (
                        chat_messages(turns, persona.greeting),
                        turns,
                        keep,
                        keep,
                        keep,
                        keep,
                        turn["info"] + note,
                    )

        def regenerate(turns, *ctl):
            turns = list(turns or [])
            if not turns:
                gr.Warning("Nothing to regenerate yet.")
                yield (
                    gr.update(),
                    turns,
                    gr.update(),
                    gr.update(),
                    gr.update(),
                    gr.update(),
                    "Nothing to regenerate.",
                )
                return
            yield from run_turn(turns[-1]["user"], turns[:-1], *ctl, unchanged=turns)

        def clear_chat():
            greeting = [{"role": "assistant", "content": persona.greeting}] if persona.greeting else []
            return greeting, [], "", turn_context_html(None), "", "Cleared."

        def show_selected(turns, evt: gr.SelectData):
            turns = turns or []
            index = evt.index if isinstance(evt.index, int) else (evt.index[0] if evt.index else 0)
            offset = 1 if persona.greeting else 0
            number = (int(index) - offset) // 2
            if not 0 <= number < len(turns):
                return gr.update(), gr.update()
            t = turns[number]
            return turn_context_html(t, number + 1), rendered_prompt(engine, t["messages"])

        def preview(message, turns, mode_, th, k_, cmode):
            text = (message or "").strip() or (turns[-1]["user"] if turns else "")
            if not text:
                return facts_html([], "For the last message (or the text being typed).", "Nothing yet.")
            try:
                hits = engine.search(text, mode_, float(th), int(k_))
            except RagPersonaError as exc:
                return facts_html([], f"Preview failed: {exc}", "—")
            facts = [{"id": h.fact_id, "text": h.text, "score": float(h.score)} for h in hits]
            caption = f"「{text[:40]}」 · {describe_settings({'mode': mode_, 'threshold': float(th), 'k': int(k_), 'context_mode': cmode})}"
            return facts_html(
                facts, caption, "No fact scores above this threshold.", elem_class="ctx preview"
            )

        def on_mode(mode_):
            return gr.update(value=threshold_for(mode_), info=threshold_info(mode_))

        outputs = [chatbot, turns_state, msg, context_panel, prompt_code, preview_panel, status]
        ev_send = send.click(
            run_turn, [msg, turns_state, *controls], outputs, concurrency_limit=16, concurrency_id="chat"
        )
        ev_submit = msg.submit(
            run_turn, [msg, turns_state, *controls], outputs, concurrency_limit=16, concurrency_id="chat"
        )
        ev_regen = regen.click(
            regenerate, [turns_state, *controls], outputs, concurrency_limit=16, concurrency_id="chat"
        )
        for ev in (ev_send, ev_submit, ev_regen):
            ev.then(preview, [msg, turns_state, mode, threshold, k, context_mode], preview_panel)
        stop.click(None, None, None, cancels=[ev_send, ev_submit, ev_regen])
        clear.click(
            clear_chat,
            None,
            [chatbot, turns_state, msg, context_panel, prompt_code, status],
            cancels=[ev_send, ev_submit, ev_regen],
        )
        chatbot.select(show_selected, [turns_state], [context_panel, prompt_code])
        mode.input(on_mode, mode, threshold)  # a user's switch resets to that mode's tuned threshold
        for ctl in (threshold, k, mode):
            ctl.change(
                preview,
                [msg, turns_state, mode, threshold, k, context_mode],
                preview_panel,
                concurrency_limit=4,
                trigger_mode="always_last",
            )

        def load_model(name, adapter):
            name = (name or "").strip() or None
            adapter = None if adapter in (None, "", "default") else adapter
            try:
                gr.Info(f"Loading {name or 'the default model'}… everyone waits until it is ready.")
                engine.switch_model(name, adapter)
            except RagPersonaError as exc:
                gr.Warning(str(exc))
                return f"⚠️ {exc} (still serving `{engine.model_label()}`)", header_md(), gr.update()
            reason = engine.xattn_reason
            cm = gr.update(
                interactive=engine.xattn_available,
                value="prompt",
                info=("Cross-attention: " if engine.xattn_available else "Cross-attention is disabled: ")
                + reason,
            )
            return f"Loaded: `{engine.model_label()}`", header_md(), cm

        load_btn.click(
            load_model, [model_box, adapter_box], [model_status, header, context_mode], concurrency_limit=1
        )

        # -- knowledge handlers ------------------------------------------------------------------------
        def kb_search_fn(query, how):
            return _fact_rows(engine, query, how)

        def kb_select(table, evt: gr.SelectData):
            row = evt.index[0] if isinstance(evt.index, list | tuple) else evt.index
            try:
                fid = table.iloc[int(row)]["id"] if hasattr(table, "iloc") else table[int(row)][0]
                fact = engine.store.fact(fid)
            except (RagPersonaError, IndexError, KeyError, ValueError):
                return gr.update(), gr.update(), gr.update(), gr.update()
            return fact.id, fact.text, "\n".join(fact.questions), ", ".join(fact.tags)

        def kb_edit(action, fid, text, questions, tags, query, how):
            fid = (fid or "").strip()
            try:
                if not fid:
                    raise RagPersonaError(f"{action}: field 'id': empty; type or select a fact id")
                if action == "delete":
                    engine.edit_store("delete", [fid])
                    done = f"Deleted `{fid}`."
                else:
                    fact = {
                        "id": fid,
                        "text": text or "",
                        "questions": [q.strip() for q in (questions or "").splitlines() if q.strip()],
                        "tags": [t.strip() for t in (tags or "").split(",") if t.strip()],
                    }
                    if action == "update" and fid in engine.store:
                        fact = {**engine.store.fact(fid).extra, **fact}
                    engine.edit_store(action, fact)
                    done = f"{'Added' if action == 'add' else 'Updated'} `{fid}`; the index has {len(engine.store)} facts."
            except RagPersonaError as exc:
                gr.Warning(str(exc))
                return f"⚠️ Refused: {exc}", gr.update(), header_md()
            return f"✅ {done}", _fact_rows(engine, query, how), header_md()

        kb_search.click(kb_search_fn, [kb_query, kb_how], kb_table)
        kb_query.submit(kb_search_fn, [kb_query, kb_how], kb_table)
        kb_table.select(kb_select, [kb_table], [f_id, f_text, f_questions, f_tags])
        form = [f_id, f_text, f_questions, f_tags, kb_query, kb_how]
        kb_add.click(
            lambda *a: kb_edit("add", *a),
            form,
            [kb_status, kb_table, header],
            concurrency_limit=1,
            concurrency_id="kb",
        )
        kb_update.click(
            lambda *a: kb_edit("update", *a),
            form,
            [kb_status, kb_table, header],
            concurrency_limit=1,
            concurrency_id="kb",
        )
        kb_delete.click(
            lambda *a: kb_edit("delete", *a),
            form,
            [kb_status, kb_table, header],
            concurrency_limit=1,
            concurrency_id="kb",
        )

        # -- tuning handlers ---------------------------------------------------------------------------
        def run_tuning(path, upload, mode_, k_, progress=gr.Progress()):
            src = upload if upload else (path or "").strip()
            try:
                if not src:
                    raise RagPersonaError("tuning: give a labelled query file (path or upload)")
                result, plot = tune(engine, src, mode_, int(k_), progress=progress)
            except RagPersonaError as exc:
                gr.Warning(str(exc))
                return f"⚠️ {exc}", None, None
            m = result.chosen_metrics
            lo, hi = result.plateau()
            md = (
                f"### Chosen threshold: **{result.chosen:.4f}** ({mode_}, k {result.k})\n"
                f"F1 {m.f1:.3f} · precision {m.precision:.3f} · recall {m.recall:.3f} · "
                f"top-1 hit rate {m.top1_hit_rate:.3f} · off-topic rejection {m.offtopic_rejection:.3f} · "
                f"{m.queries} queries ({m.off_topic} off-topic) · near-best plateau {lo:.3f}–{hi:.3f}\n\n"
                f"Source: `{Path(src).name}`"
            )
            state = {
                "mode": mode_,
                "threshold": result.chosen,
                "info": {**result.to_dict(), "queries": str(src)},
            }
            return md, str(plot), state

        def use_tuned(state):
            if not state:
                gr.Warning("Run the tuning first.")
                return gr.update(), gr.update()
            return gr.update(value=state["mode"]), gr.update(value=state["threshold"])

        def save_tuned(state):
            if not state:
                gr.Warning("Run the tuning first.")
                return gr.update()
            try:
                engine.set_threshold(state["mode"], state["threshold"], state["info"])
                mode_defaults[state["mode"]] = engine.defaults(state["mode"])
            except RagPersonaError as exc:
                gr.Warning(str(exc))
                return f"⚠️ {exc}"
            return f"Saved threshold {state['threshold']:.4f} for {state['mode']} retrieval to `{engine.store.path}`."

        t_run.click(
            run_tuning,
            [q_path, q_file, t_mode, t_k],
            [t_result, t_plot, t_state],
            concurrency_limit=1,
            concurrency_id="tune",
        )
        t_use.click(use_tuned, t_state, [mode, threshold])
        t_save.click(save_tuned, t_state, t_result)

    return demo


def _shipped_adapter_paths() -> list[str]:
    try:
        from rag_persona.evaluation.evaluate import shipped_adapters
    except ImportError:
        return []
    try:
        return [a["path"] for a in shipped_adapters()]
    except RagPersonaError:
        return []


def _fact_rows(engine: Engine, query: str, how: str) -> list[list]:
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


def tune(engine: Engine, queries_path: str | Path, mode: str, k: int, *, candidates: int = 50, progress=None):
    """Sweep thresholds on labelled queries with the chat's own retriever; (Sweep, plot path)."""
    from rag_persona.knowledge.facts import load_queries
    from rag_persona.retrieval.tuning import plot_sweep, sweep

    queries = load_queries(queries_path, known_ids=engine.store.ids)
    if progress is not None:
        progress(0.1, desc=f"retrieving for {len(queries)} queries")
    rankings = engine.rankings([q.query for q in queries], mode, depth=candidates)
    result = sweep(queries, rankings, k=k)
    out = Path(tempfile.mkdtemp(prefix="rag-persona-tune-")) / f"threshold-{mode}.png"
    plot_sweep(result, out, title=f"{engine.persona.id}: {Path(queries_path).name}, {mode}, k={k}")
    return result, out


# -- the server app --------------------------------------------------------------------------------------
def create_app(engine: Engine, *, auth: tuple[str, str] | None = None, default_queries: str | None = None):
    """FastAPI app: /v1 (OpenAI-compatible) + the Gradio page at /, sharing one engine."""
    from fastapi import FastAPI

    from .api import add_api_routes

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
