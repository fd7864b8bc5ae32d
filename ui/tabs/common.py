"""What the tabs share: the page state (personas, header, per-mode defaults), HTML renderers, named outputs."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from rag_persona.generation.backend import timing_line

from ..access import Access
from ..engine import RETRIEVAL_MODES, Engine, Personas

CONTEXT_LABELS = {"prompt": "prompt", "xattn": "cross-attention"}


# -- callbacks by name -------------------------------------------------------------------------------------
class Named:
    """Components by name, so callbacks speak in names while Gradio gets and gives positional lists.

    `components` is the inputs/outputs list; `values(**named)` is a callback's return value in that order
    (a name left out is left unchanged: `gr.update()`); `read(args)` turns the positional inputs back
    into a name → value dict; `updates(**named)` is the component → value dict Gradio also takes.
    """

    def __init__(self, **components):
        self.names = list(components)
        self.components = list(components.values())

    @classmethod
    def of(cls, owner, *names: str) -> Named:
        """The components that `owner` (a tab) holds under these attribute names, by the same names."""
        return cls(**{n: getattr(owner, n) for n in names})

    def values(self, **named) -> tuple:
        unknown = set(named) - set(self.names)
        if unknown:
            raise TypeError(f"not among the outputs: {', '.join(sorted(unknown))}")
        return tuple(named[n] if n in named else gr.update() for n in self.names)

    def read(self, args) -> dict:
        return dict(zip(self.names, args, strict=True))

    def updates(self, **named) -> dict:
        """A callback's return value as component → value, for outputs given as a set (the rest unchanged)."""
        unknown = set(named) - set(self.names)
        if unknown:
            raise TypeError(f"not among the outputs: {', '.join(sorted(unknown))}")
        return {self.components[self.names.index(n)]: v for n, v in named.items()}


# -- the page ------------------------------------------------------------------------------------------------
@dataclass
class Page:
    """The personas behind the page, the header every tab refreshes, the retrieval defaults per persona and
    mode, and who may administer (the admin controls registered here are shown to administrators only, on
    page load).

    Each browser session's persona is the id in `selected` (a gr.State, the default persona until the
    session picks another); callbacks take it as an input and use `engine_for(pid)`, so one session's
    choice never reaches another's.
    """

    personas: Personas
    access: Access = field(default_factory=Access)
    mode_defaults: dict = field(default_factory=dict)  # persona id → mode → defaults
    header: Any = None  # the gr.Markdown, created inside the Blocks
    selected: Any = None  # the gr.State holding the session's persona id
    role_controls: list = field(default_factory=list)  # (component, "hide" | "lock" | "notice")

    def __post_init__(self) -> None:
        self.personas = Personas.of(self.personas)
        self.initial = {pid: e.defaults() for pid, e in self.personas.engines.items()}
        self.refresh_defaults()

    @property
    def engine(self) -> Engine:
        """The default persona's engine: what a new session sees."""
        return self.personas.default

    @property
    def persona(self):
        return self.engine.persona

    def engine_for(self, pid: str | None) -> Engine:
        """The engine of the session's persona (None: the default)."""
        return self.personas.get(pid)

    def _pid(self, pid: str | None) -> str:
        return self.engine_for(pid).persona.id

    def default_mode(self, pid: str | None = None) -> str:
        mode = self.initial[self._pid(pid)].get("mode")
        return mode if mode in RETRIEVAL_MODES else "dense"

    def default_k(self, pid: str | None = None) -> int:
        return int(self.initial[self._pid(pid)].get("k") or 5)

    def refresh_defaults(self, mode: str | None = None, pid: str | None = None) -> None:
        """Re-read the indexes' defaults (every persona and mode, or one mode after its threshold was saved)."""
        engines = self.personas.engines if pid is None else {self._pid(pid): self.engine_for(pid)}
        for key, engine in engines.items():
            defaults = self.mode_defaults.setdefault(key, {})
            for m in RETRIEVAL_MODES if mode is None else (mode,):
                defaults[m] = engine.defaults(m)

    def threshold_for(self, mode: str, pid: str | None = None) -> float:
        return round(float(self.mode_defaults[self._pid(pid)][mode]["threshold"]), 4)

    def threshold_info(self, mode: str, pid: str | None = None) -> str:
        d = self.mode_defaults[self._pid(pid)][mode]
        source = {"tuned": "tuned on this index", "default": "library default, not tuned here"}.get(
            d.get("threshold_source"), d.get("threshold_source") or "index"
        )
        return (
            f"Facts scoring below it are not given to the model. For {mode}: {d['threshold']:.3f} ({source})."
        )

    # -- administration ---------------------------------------------------------------------------------------
    def refusal(self, request: gr.Request | None) -> str | None:
        """None when the caller may administer, else the message it gets (the callback then changes nothing)."""
        return self.access.refusal(getattr(request, "username", None))

    def warned_refusal(self, request: gr.Request | None) -> str | None:
        """`refusal`, and when there is one, the caller also gets it as a Gradio warning."""
        refused = self.refusal(request)
        if refused:
            gr.Warning(refused)
        return refused

    def admin_only(self, make, *args, how: str = "hide", **kwargs):
        """An admin control: hidden ("hide") or read-only ("lock") for others. Until the page's load event
        says who signed in, it is shown only when everyone administers (--admin)."""
        kwargs["visible" if how == "hide" else "interactive"] = self.access.local_admin
        component = make(*args, **kwargs)
        self.role_controls.append((component, how))
        return component

    def admin_notice(self, **kwargs):
        """A line saying why the admin controls next to it are hidden, shown to non-administrators."""
        text = self.access.refusal(None) or ""
        notice = gr.Markdown(f"🔒 {text}", visible=bool(text), **kwargs)
        self.role_controls.append((notice, "notice"))
        return notice

    def role_updates(self, request: gr.Request) -> list:
        """On page load: the admin controls shown/enabled for administrators, hidden/locked for others."""
        refused = self.refusal(request)
        updates = []
        for _, how in self.role_controls:
            if how == "notice":
                updates.append(gr.update(visible=bool(refused), value=f"🔒 {refused}" if refused else ""))
            else:
                updates.append(gr.update(**{"visible" if how == "hide" else "interactive": not refused}))
        return updates

    def header_md(self, pid: str | None = None) -> str:
        engine = self.engine_for(pid)
        persona, info = engine.persona, engine.info()
        adapter = f" + adapter `{Path(info['adapter']).name}`" if info.get("adapter") else ""
        # A broken source knowledge file: the page says so above everything (served from the last good index).
        banner = "".join(f"> ⚠️ {w}\n\n" for w in info.get("warnings", []))
        return banner + (
            f"## {persona.name}（{persona.reading}）とおしゃべり\n"
            f"model `{engine.model_label()}`{adapter} on {info.get('device')} · "
            f"{info['facts']} facts · queue: {info['queue']['waiting']} waiting"
        )


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


def reply_info(reply) -> str:
    """The small line under a reply: length, time, how it ended, and the engine's timings."""
    end = "EOS" if reply.ended_by_eos else "token limit"
    line = f"{reply.new_tokens} tokens in {reply.seconds:.1f}s, ended by {end}"
    return f"{line} · {timing_line(reply.timings)}" if reply.timings else line
