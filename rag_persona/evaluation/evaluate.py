"""Persona evaluation: each prompt through retrieval + the prompt builder + generation, then persona metrics.

`rag-persona evaluate --prompts FILE --json` prints
`{"replies": [{"query", "reply", "ended_by_eos", "context_ids", ...}], "summary": {...}}`; the summary keys
are documented in `metrics.summarize`. Without --model/--adapter/--index it evaluates what the chat
uses: the default chat model, its default adapter and the default persona index.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rag_persona.chat import PersonaChat
from rag_persona.errors import RagPersonaError
from rag_persona.evaluation.metrics import PromptResult, judge, summarize
from rag_persona.generation import GenerationSettings
from rag_persona.prompts import PERSONA_FILE, Persona
from rag_persona.retrieval import open_store, retriever_for
from rag_persona.settings import REPO_ROOT, get_settings
from rag_persona.utils.io import means_local_path, read_json, read_jsonl

MODES = ("prompt", "xattn")
ADAPTERS_ROOT = REPO_ROOT / "adapters"
ADAPTER_MANIFEST = "rag_persona_adapter.json"
NO_ADAPTER = ("none", "base", "")
ANY_PERSONA = "*"  # a shipped adapter for every persona that names none of its own (the role-play adapter)


# -- the default adapter ---------------------------------------------------------------------------------


def shipped_adapters(root: Path | None = None) -> list[dict]:
    """Adapters shipped in the repo: folders under adapters/ with a rag_persona_adapter.json."""
    root = root or ADAPTERS_ROOT
    return [{**read_json(m), "path": str(m.parent)} for m in sorted(root.glob(f"*/{ADAPTER_MANIFEST}"))]


def default_adapter(
    model: str | None = None, persona: str | None = None, root: Path | None = None
) -> str | None:
    """The adapter the chat applies when none is named.

    RAG_PERSONA_CHAT_ADAPTER wins (a folder, or "none" for the plain base model); then the adapter the
    persona's persona.json names (`persona_adapter`); otherwise the shipped adapter whose manifest names
    this base model and persona as its default. Only the default chat model gets one unless a shipped
    adapter names the model given. A persona no adapter names gets the shipped role-play adapter (persona
    "*": trained on many characters to speak in whatever register the persona's prompt describes), else the
    plain base model.
    """
    env = os.environ.get("RAG_PERSONA_CHAT_ADAPTER")
    if env is not None:
        return None if env.strip().lower() in NO_ADAPTER else env
    settings = get_settings()
    model = model or settings.chat_model
    persona = persona or settings.persona
    card = settings.persona_dir(persona) / PERSONA_FILE
    named = persona_adapter(Persona.load(card), model, root) if card.is_file() else None
    if named:
        return named
    defaults = [a for a in shipped_adapters(root) if a.get("default") and a.get("base_model") == model]
    for wanted in (persona, ANY_PERSONA):
        for info in defaults:
            if info.get("persona") == wanted:
                return info["path"]
    return None


def persona_adapter(persona: Persona, model: str, root: Path | None = None) -> str | None:
    """The adapter persona.json's "adapter" names: a folder relative to the persona folder, else a shipped
    adapter's folder name under adapters/. None when it names none, or when its manifest names another
    base model (an adapter only fits the model it was trained on)."""
    if not persona.adapter:
        return None
    root = root or ADAPTERS_ROOT
    candidates = ([persona.folder / persona.adapter] if persona.folder else []) + [root / persona.adapter]
    folder = next((c for c in candidates if c.is_dir()), None)
    if folder is None:
        where = persona.folder / PERSONA_FILE if persona.folder else f"persona {persona.id}"
        looked = " or ".join(str(c.parent) for c in candidates)
        raise RagPersonaError(f"{where}: field 'adapter': no adapter folder {persona.adapter!r} in {looked}")
    manifest = folder / ADAPTER_MANIFEST
    base = read_json(manifest).get("base_model") if manifest.is_file() else None
    return str(folder.resolve()) if base in (None, model) else None


def resolve_adapter(model: str | None, adapter: str | None, persona: str | None = None) -> str | None:
    """An explicit --adapter (or 'none'), else the default adapter for this model and persona."""
    if adapter is not None:
        if adapter.strip().lower() in NO_ADAPTER:
            return None
        check_adapter_folder(adapter)
        return adapter
    return default_adapter(model, persona)


def check_adapter_folder(adapter: str) -> None:
    """A local adapter (a path, or a name whose first folder exists here) must be a peft adapter folder;
    checked before the model opens (a first open verifies and unpacks hundreds of MB). Anything else is
    left to the loader as a hub id."""
    if not means_local_path(adapter):
        return
    try:
        path = Path(adapter).expanduser()
    except RuntimeError:  # ~nosuchuser/...
        path = Path(adapter)
    if not path.is_dir():
        raise RagPersonaError(f"--adapter {adapter}: no such adapter folder")
    if not (path / "adapter_config.json").is_file():
        raise RagPersonaError(f"--adapter {adapter}: not a peft adapter folder (no adapter_config.json)")


# -- prompts ---------------------------------------------------------------------------------------------


@dataclass
class EvalPrompt:
    query: str
    history: list[dict] = field(default_factory=list)
    golden_ids: list[str] = field(default_factory=list)
    kind: str = ""
    reference: str = ""
    id: str = ""


def load_prompts(path: str | Path) -> list[EvalPrompt]:
    """JSONL with `query` (required), `history`, `golden_ids`, `kind`, `reference`, `id`; one-line errors."""
    path = Path(path)
    prompts = []
    for lineno, obj in read_jsonl(path, missing="prompts file not found"):
        where = f"{path}:{lineno}"
        query = obj.get("query")
        if not isinstance(query, str) or not query.strip():
            raise RagPersonaError(f"{where}: field 'query': missing or empty")
        history = obj.get("history", [])
        if not isinstance(history, list) or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in history
        ):
            raise RagPersonaError(f"{where}: field 'history': must be a list of {{role, content}} messages")
        golden = obj.get("golden_ids", obj.get("relevant", []))
        if not isinstance(golden, list) or not all(isinstance(g, str) for g in golden):
            raise RagPersonaError(f"{where}: field 'golden_ids': must be a list of fact ids")
        prompts.append(
            EvalPrompt(
                query=query,
                history=history,
                golden_ids=golden,
                kind=str(obj.get("kind", "")),
                reference=str(obj.get("reference", "")),
                id=str(obj.get("id", lineno)),
            )
        )
    if not prompts:
        raise RagPersonaError(f"{path}: no prompts")
    return prompts


# -- running ---------------------------------------------------------------------------------------------


def persona_words(persona: Persona) -> list[str]:
    """The persona's own name and its parts (a reply that says her name is not stating a fact by that)."""
    words = [persona.name, *persona.reading.split()]
    if len(persona.name) >= 4:
        words += [persona.name[:3], persona.name[3:], persona.name[:2], persona.name[2:]]
    return words


def persona_texts(persona: Persona) -> list[str]:
    """What the persona's prompt says about it (summary, greeting, examples): specifics a reply may use."""
    style = persona.style
    return [persona.summary, persona.greeting or "", *(style.examples if style else ())]


def judge_prompt(
    result: PromptResult, p: EvalPrompt, persona: Persona, facts: dict[str, str], extra=(), tokens=None
):
    """One reply to an evaluation prompt judged with everything the prompt and persona tell the judge."""
    return judge(
        result,
        facts,
        persona_words=persona_words(persona),
        extra_special=extra,
        tokens=tokens,
        markers=persona.markers,  # the persona's register; None (no style): the お嬢様 default
        identity=(persona.name, persona.reading),
        sources=[m["content"] for m in p.history] + persona_texts(persona),
        reference=p.reference,
    )


def rejudge(replies: Sequence[dict], prompts: Sequence[EvalPrompt], persona: Persona, facts: dict[str, str]):
    """Stored replies (an evaluation report's "replies") judged again by the current rules, without
    generating: {"replies", "summary"}. Special-token leaks stay as stored (they need the model's tokenizer)."""
    if len(replies) != len(prompts):
        raise RagPersonaError(f"rejudge: {len(replies)} replies for {len(prompts)} prompts")
    results = []
    for stored, p in zip(replies, prompts, strict=True):
        if stored["query"] != p.query:
            raise RagPersonaError(f"rejudge: reply to {stored['query']!r} stands where {p.query!r} is asked")
        fields = {
            k: stored[k] for k in ("query", "reply", "ended_by_eos", "context_ids", "golden_ids", "kind")
        }
        result = PromptResult(**fields, new_tokens=stored["new_tokens"], seconds=stored["seconds"])
        result = judge_prompt(result, p, persona, facts)
        result.metrics.leaked = list((stored.get("metrics") or {}).get("leaked", []))
        results.append(result)
    return {"replies": [r.to_dict() for r in results], "summary": summarize(results)}


def evaluate_chat(
    chat: PersonaChat,
    prompts: Sequence[EvalPrompt],
    facts: dict[str, str],
    *,
    progress: Callable[[str], None] | None = None,
    tokens=None,
) -> dict:
    """Run every prompt through the chat path (retrieval, prompt builder, generation) and score it."""
    tokenizer = getattr(chat.loaded, "tokenizer", None)
    extra = list(getattr(tokenizer, "all_special_tokens", []) or [])
    results = []
    started = time.perf_counter()
    for i, p in enumerate(prompts, 1):
        turn = chat.respond(p.history, p.query)
        result = PromptResult(
            query=p.query,
            reply=turn.reply.text,
            ended_by_eos=turn.reply.ended_by_eos,
            context_ids=[f.id for f in turn.plan.context],
            golden_ids=list(p.golden_ids),
            kind=p.kind,
            new_tokens=turn.reply.new_tokens,
            seconds=round(turn.reply.seconds, 2),
        )
        results.append(judge_prompt(result, p, chat.persona, facts, extra, tokens))
        if progress:
            elapsed = time.perf_counter() - started
            eta = elapsed / i * (len(prompts) - i)
            progress(f"[{i}/{len(prompts)}] {p.query[:24]!r} → {turn.reply.text[:40]!r} (eta {eta:.0f}s)")
    return {"replies": [r.to_dict() for r in results], "summary": summarize(results)}


def open_retriever(index: str | Path | None = None, persona: str | None = None, log=lambda msg: None):
    """The retriever the chat uses: the default persona index unless an index folder is named."""
    store = open_store(index, persona, log=log)
    return store, retriever_for(store)


def run_evaluation(
    prompts_path: str | Path,
    *,
    model: str | None = None,
    adapter: str | None = None,
    index: str | Path | None = None,
    persona: str | None = None,
    mode: str = "prompt",
    max_new_tokens: int = 96,
    limit: int | None = None,
    loaded=None,
    weights: str | Path | None = None,
    engine: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Load the model (+ default adapter), the persona and its index, and evaluate the prompts."""
    if mode not in MODES:
        raise RagPersonaError(f"evaluate: mode {mode!r} is not one of {', '.join(MODES)}")
    from rag_persona.chat import default_persona
    from rag_persona.generation.engines import open_engine

    prompts = load_prompts(prompts_path)[:limit] if limit else load_prompts(prompts_path)
    the_persona = default_persona(persona)
    store, retriever = open_retriever(index, persona, log=progress or (lambda m: None))
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    if mode == "xattn":
        # the base model with the trained cross-attention blocks; the context never enters the prompt
        from rag_persona.xattn import load_xattn_chat

        if adapter:
            raise RagPersonaError("evaluate: --adapter applies to prompt mode; xattn mode uses --weights")
        chat = load_xattn_chat(
            model,
            weights,
            persona=persona,
            settings=settings,
            retriever=retriever,
            store=store,  # already opened with the retriever
            progress=progress or (lambda m: None),
        )
        loaded = chat.loaded
        adapter = loaded.info.get("xattn", {}).get("weights")
    else:
        adapter = resolve_adapter(model, adapter, persona)
        if loaded is None:
            loaded = open_engine(engine, model, adapter=adapter, progress=progress or (lambda m: None))
        chat = PersonaChat(the_persona, retriever, loaded, settings)
    facts = {f.id: f.text for f in store.facts}
    out = evaluate_chat(chat, prompts, facts, progress=progress)
    out["setup"] = {
        "model": loaded.source,
        "adapter": getattr(loaded, "adapter", adapter),
        "index": str(getattr(store, "path", index)),
        "mode": mode,
        "prompts": str(prompts_path),
        "max_new_tokens": max_new_tokens,
        "persona": the_persona.id,
        "engine": getattr(loaded, "engine", "transformers"),
    }
    return out
