"""The Threshold tuning tab: sweep thresholds over labelled queries, then use or save the F1-best one."""

from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr

from rag_persona.errors import RagPersonaError
from rag_persona.knowledge.facts import load_queries
from rag_persona.retrieval.tuning import plot_sweep, sweep
from rag_persona.settings import get_settings

from ..engine import RETRIEVAL_MODES, Engine
from .chat import ChatTab
from .common import Named, Page

INTRO = (
    "Sweep the threshold over a labelled query file "
    '(JSONL: `{"query": "...", "relevant": ["fact-id", ...]}`, `[]` = nothing should be retrieved) '
    "and pick the F1-best one."
)


def tune(engine: Engine, queries_path: str | Path, mode: str, k: int, *, candidates: int = 50, progress=None):
    """Sweep thresholds on labelled queries with the chat's own retriever; (Sweep, plot path)."""
    queries = load_queries(queries_path, known_ids=engine.store.ids)
    if progress is not None:
        progress(0.1, desc=f"retrieving for {len(queries)} queries")
    rankings = engine.rankings([q.query for q in queries], mode, depth=candidates)
    result = sweep(queries, rankings, k=k)
    out = Path(tempfile.mkdtemp(prefix="rag-persona-tune-")) / f"threshold-{mode}.png"
    plot_sweep(result, out, title=f"{engine.persona.id}: {Path(queries_path).name}, {mode}, k={k}")
    return result, out


def default_queries_path(page: Page) -> str:
    """The persona's dev queries when they exist, else empty."""
    candidate = get_settings().persona_dir(page.persona.id) / "queries" / "dev.jsonl"
    return str(candidate) if candidate.exists() else ""


def result_markdown(result, mode: str, src) -> str:
    m = result.chosen_metrics
    lo, hi = result.plateau()
    return (
        f"### Chosen threshold: **{result.chosen:.4f}** ({mode}, k {result.k})\n"
        f"F1 {m.f1:.3f} · precision {m.precision:.3f} · recall {m.recall:.3f} · "
        f"top-1 hit rate {m.top1_hit_rate:.3f} · off-topic rejection {m.offtopic_rejection:.3f} · "
        f"{m.queries} queries ({m.off_topic} off-topic) · near-best plateau {lo:.3f}–{hi:.3f}\n\n"
        f"Source: `{Path(src).name}`"
    )


def build(page: Page, chat: ChatTab, default_queries: str | None = None) -> None:
    """The tab and its events; "Use in this chat" sets the chat tab's mode and threshold."""
    if default_queries is None:
        default_queries = default_queries_path(page)
    with gr.Tab("Threshold tuning", id="tuning-tab"):
        gr.Markdown(INTRO)
        with gr.Row():
            path = gr.Textbox(default_queries, label="Labelled queries (path)", scale=3, elem_id="tune-path")
            upload = gr.File(label="…or upload a JSONL", file_types=[".jsonl"], scale=2)
        with gr.Row():
            mode = gr.Radio(list(RETRIEVAL_MODES), value=page.default_mode, label="Retrieval mode")
            k = gr.Slider(1, 20, value=page.default_k, step=1, label="k")
            run = gr.Button("Run tuning", variant="primary", elem_id="tune-run")
        result = gr.Markdown("", elem_id="tune-result")
        plot = gr.Image(
            label="precision / recall / F1 against threshold", type="filepath", elem_id="tune-plot"
        )
        state = gr.State(None)
        with gr.Row():
            use = gr.Button("Use in this chat")
            save = gr.Button("Save to the index (default for everyone)")
    callbacks = TuningCallbacks(page, Named(result=result, plot=plot, state=state))
    run.click(
        callbacks.run_tuning,
        [path, upload, mode, k],
        callbacks.out.components,
        concurrency_limit=1,
        concurrency_id="tune",
    )
    use.click(callbacks.use_tuned, state, [chat.mode, chat.threshold])
    save.click(callbacks.save_tuned, state, result)


class TuningCallbacks:
    """Run a sweep; its choice ({mode, threshold, info}) waits in a gr.State until used or saved."""

    def __init__(self, page: Page, out: Named):
        self.page, self.engine, self.out = page, page.engine, out

    def run_tuning(self, path, upload, mode, k, progress=gr.Progress()):
        src = upload if upload else (path or "").strip()
        try:
            if not src:
                raise RagPersonaError("tuning: give a labelled query file (path or upload)")
            result, plot = tune(self.engine, src, mode, int(k), progress=progress)
        except RagPersonaError as exc:
            gr.Warning(str(exc))
            return self.out.values(result=f"⚠️ {exc}", plot=None, state=None)
        chosen = {"mode": mode, "threshold": result.chosen, "info": {**result.to_dict(), "queries": str(src)}}
        return self.out.values(result=result_markdown(result, mode, src), plot=str(plot), state=chosen)

    def use_tuned(self, state):
        if not state:
            gr.Warning("Run the tuning first.")
            return gr.update(), gr.update()
        return gr.update(value=state["mode"]), gr.update(value=state["threshold"])

    def save_tuned(self, state):
        if not state:
            gr.Warning("Run the tuning first.")
            return gr.update()
        try:
            self.engine.set_threshold(state["mode"], state["threshold"], state["info"])
            self.page.refresh_defaults(state["mode"])
        except RagPersonaError as exc:
            gr.Warning(str(exc))
            return f"⚠️ {exc}"
        return f"Saved threshold {state['threshold']:.4f} for {state['mode']} retrieval to `{self.engine.store.path}`."
