"""The Threshold tuning tab: sweep thresholds over the session persona's labelled queries, then use or save the
F1-best one."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import gradio as gr

from rag_persona.errors import RagPersonaError
from rag_persona.knowledge.facts import load_queries
from rag_persona.prompts import Persona
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


def persona_folder(persona: Persona) -> Path:
    """The persona's folder (knowledge/<id>/ or the one it was served from): the only server folder whose
    query files the tab may read for it."""
    return Path(persona.folder) if persona.folder else get_settings().persona_dir(persona.id)


def default_queries_path(persona: Persona) -> str:
    """The persona's dev queries (relative to its folder) when they exist, else empty."""
    candidate = persona_folder(persona) / "queries" / "dev.jsonl"
    return "queries/dev.jsonl" if candidate.exists() else ""


def path_label(folder: Path) -> str:
    return f"Labelled queries (path under knowledge/{folder.name}/)"


def shown_path(path: str | Path, folder: Path) -> str:
    """A path as the box shows it: relative to the persona's folder when under it."""
    try:
        return str(Path(path).resolve().relative_to(folder.resolve()))
    except ValueError:
        return str(path)


def queries_under(text: str, folder: Path) -> Path:
    """A query file named in the box: under the persona's folder (symlinks resolved), never with '..'."""
    where = f"knowledge/{folder.name}/"
    given = Path(text)
    if ".." in given.parts:
        raise RagPersonaError(f"tuning: '..' is not allowed in a query path; give a file under {where}")
    base = folder.resolve()
    path = (given if given.is_absolute() else base / given).resolve()
    if not path.is_relative_to(base):
        raise RagPersonaError(f"tuning: {text!r} is not under {where}; give a file there or upload one")
    if path.suffix != ".jsonl":
        raise RagPersonaError(f"tuning: {text!r}: expected a .jsonl query file")
    if not path.is_file():
        raise RagPersonaError(f"tuning: {where}{path.relative_to(base)}: no such file")
    return path


def uploaded(value, upload_root: Path) -> Path:
    """An uploaded file, which Gradio keeps in its own upload folder (anything else is refused)."""
    path = Path(str(value)).resolve()
    if not path.is_relative_to(upload_root.resolve()) or not path.is_file():
        raise RagPersonaError("tuning: the upload is not a file uploaded to this page; upload it again")
    return path


def scrubbed(message: str, path: Path, shown: str) -> str:
    """An error about a query file without any of its contents: the path shown as named, quoted values cut."""
    head, rest = (shown, message[len(str(path)) :]) if message.startswith(str(path)) else ("", message)
    # a quoted value in a problem comes from the file (e.g. an unknown id); field names are the parser's
    masked = re.sub(r"field '[^'\"]*'", lambda m: "_" * len(m.group()), rest)
    cut = min((i for i in (masked.find("'"), masked.find('"')) if i >= 0), default=-1)
    if cut >= 0:
        rest = rest[:cut].rstrip(" :") + " (value not shown)"
    return f"tuning: {head}{rest}" if head else rest


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


def build(page: Page, chat: ChatTab, default_queries: str | None = None) -> TuningCallbacks:
    """The tab and its events; "Use in this chat" sets the chat tab's mode and threshold (administrators only).

    `default_queries` is the default persona's; any other persona's is its own queries/dev.jsonl.
    """
    folder = persona_folder(page.persona)
    default_queries = (
        default_queries_path(page.persona) if default_queries is None else shown_path(default_queries, folder)
    )
    with gr.Tab("Threshold tuning", id="tuning-tab"):
        gr.Markdown(INTRO)
        page.admin_notice(elem_id="tune-admin-off")
        with gr.Row():
            path = page.admin_only(
                gr.Textbox,
                default_queries,
                label=path_label(folder),
                scale=3,
                elem_id="tune-path",
            )
            upload = page.admin_only(gr.File, label="…or upload a JSONL", file_types=[".jsonl"], scale=2)
        with gr.Row():
            mode = gr.Radio(list(RETRIEVAL_MODES), value=page.default_mode(), label="Retrieval mode")
            k = gr.Slider(1, 20, value=page.default_k(), step=1, label="k")
            run = page.admin_only(gr.Button, "Run tuning", variant="primary", elem_id="tune-run")
        result = gr.Markdown("", elem_id="tune-result")
        plot = gr.Image(
            label="precision / recall / F1 against threshold", type="filepath", elem_id="tune-plot"
        )
        state = gr.State(None)
        with gr.Row():
            use = page.admin_only(gr.Button, "Use in this chat")
            save = page.admin_only(gr.Button, "Save to the index (default for everyone)", elem_id="tune-save")
    callbacks = TuningCallbacks(
        page,
        Named(result=result, plot=plot, state=state),
        Named(path=path, upload=upload, mode=mode, k=k, result=result, plot=plot, state=state),
    )
    run.click(
        callbacks.run_tuning,
        [path, upload, mode, k, page.selected],
        callbacks.out.components,
        concurrency_limit=1,
        concurrency_id="tune",
    )
    use.click(callbacks.use_tuned, state, [chat.mode, chat.threshold])
    save.click(callbacks.save_tuned, state, result)
    return callbacks


class TuningCallbacks:
    """Run a sweep; its choice ({mode, threshold, info, persona}) waits in a gr.State until used or saved.

    Running and saving are administration: refused (and nothing read or changed) for anyone else.
    """

    def __init__(self, page: Page, out: Named, persona_view: Named):
        self.page, self.out = page, out
        self.persona_view = persona_view  # what a persona switch sets

    def for_persona(self, pid: str) -> dict:
        """The tab for persona `pid`: its dev queries and retrieval defaults, no result."""
        persona = self.page.engine_for(pid).persona
        folder = persona_folder(persona)
        return self.persona_view.updates(
            path=gr.update(value=default_queries_path(persona), label=path_label(folder)),
            upload=None,
            mode=self.page.default_mode(pid),
            k=self.page.default_k(pid),
            result="",
            plot=None,
            state=None,
        )

    def query_file(self, path, upload, persona: Persona) -> tuple[Path, str]:
        """(file to read, its name in messages): an upload, else a path under the persona's folder."""
        if upload:
            file = uploaded(upload, Path(gr.utils.get_upload_folder()))
            return file, file.name  # Gradio keeps the uploaded file's own name
        text = (path or "").strip()
        if not text:
            raise RagPersonaError("tuning: give a labelled query file (path or upload)")
        folder = persona_folder(persona)
        file = queries_under(text, folder)
        return file, f"knowledge/{folder.name}/{file.relative_to(folder.resolve())}"

    def run_tuning(self, path, upload, mode, k, pid, request: gr.Request, progress=gr.Progress()):
        refused = self.page.refusal(request)
        if refused:
            gr.Warning(refused)
            return self.out.values(result=f"⚠️ {refused}", plot=None, state=None)
        file, shown = None, ""
        engine = self.page.engine_for(pid)
        try:
            file, shown = self.query_file(path, upload, engine.persona)
            result, plot = tune(engine, file, mode, int(k), progress=progress)
        except RagPersonaError as exc:
            message = scrubbed(str(exc), file, shown) if file is not None else str(exc)
            gr.Warning(message)
            return self.out.values(result=f"⚠️ {message}", plot=None, state=None)
        except Exception as exc:  # noqa: BLE001 - anything else: its type only, never the file's text
            message = f"tuning: {shown or 'the query file'}: could not be used ({type(exc).__name__})"
            gr.Warning(message)
            return self.out.values(result=f"⚠️ {message}", plot=None, state=None)
        chosen = {
            "mode": mode,
            "threshold": result.chosen,
            "info": {**result.to_dict(), "queries": shown},
            "persona": engine.persona.id,  # a save goes to the index it was tuned on
        }
        return self.out.values(result=result_markdown(result, mode, shown), plot=str(plot), state=chosen)

    def use_tuned(self, state):
        if not state:
            gr.Warning("Run the tuning first.")
            return gr.update(), gr.update()
        return gr.update(value=state["mode"]), gr.update(value=state["threshold"])

    def save_tuned(self, state, request: gr.Request):
        refused = self.page.refusal(request)
        if refused:
            gr.Warning(refused)
            return f"⚠️ {refused}"
        if not state:
            gr.Warning("Run the tuning first.")
            return gr.update()
        try:
            engine = self.page.engine_for(state.get("persona"))
            engine.set_threshold(state["mode"], state["threshold"], state["info"])
            self.page.refresh_defaults(state["mode"], engine.persona.id)
        except RagPersonaError as exc:
            gr.Warning(str(exc))
            return f"⚠️ {exc}"
        return f"Saved threshold {state['threshold']:.4f} for {state['mode']} retrieval to `{engine.store.path}`."
