"""`rag-persona index|search|eval-retrieval|tune-threshold`: build an index, query it, measure and tune it."""

from __future__ import annotations

from typing import Annotated

import typer

from rag_persona.cli.common import JsonOpt, PersonaOpt, _progress, app, echo_json, friendly, open_index
from rag_persona.errors import RagPersonaError

IndexOpt = Annotated[
    str | None,
    typer.Option(
        "--index", help="Index folder (default: the default persona's, built when missing or stale)."
    ),
]
ModeOpt = Annotated[
    str | None, typer.Option("--mode", help="dense | lexical | hybrid | rerank (default: the index's).")
]
KOpt = Annotated[int | None, typer.Option("--k")]
ConversationOpt = Annotated[
    str | None,
    typer.Option(
        "--conversation",
        help="How a turn is read with its history: last | carry | concat (default) | concat_reply.",
    ),
]


@app.command("index")
@friendly
def index_cmd(
    kb: Annotated[
        str | None,
        typer.Option("--kb", help="Knowledge base: a JSONL file or a folder (default: the persona's)."),
    ] = None,
    out: Annotated[
        str | None,
        typer.Option(
            "--out", help="Index folder to write, replaced atomically (default: the persona's index)."
        ),
    ] = None,
    persona: PersonaOpt = None,
    embedder: Annotated[
        str | None, typer.Option("--embedder", help="e5-small (default), a sentence-transformers id or path.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Embed a knowledge base into a FAISS index folder with a manifest (by default the persona's own:
    the index every other command opens for --persona)."""
    from rag_persona.retrieval.store import build_index, default_index_dir, is_index, load_index
    from rag_persona.settings import get_settings

    kb = kb or str(get_settings().persona_dir(persona))
    out = out or str(default_index_dir(persona))
    old = None
    if is_index(out):
        try:  # only for its tuned threshold: a broken earlier index is what `index` is run to replace
            old = load_index(out, check=False)
        except RagPersonaError as exc:
            _progress(f"earlier index unreadable, its tuned threshold not kept: {exc}")
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
    persona: PersonaOpt = None,
    threshold: Annotated[float | None, typer.Option("--threshold", help="Minimum score (0-1).")] = None,
    k: Annotated[int | None, typer.Option("--k", help="At most this many facts.")] = None,
    mode: ModeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Facts for a query, above the threshold, at most k: [{"id","text","score"}]."""
    from rag_persona.retrieval.retriever import retriever_for

    retriever = retriever_for(open_index(index, persona), mode=mode, threshold=threshold, k=k)
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


def _index_and_queries(index: str | None, queries: str, persona: str | None = None):
    """The index and labelled queries that eval-retrieval and tune-threshold work on."""
    from rag_persona.knowledge.facts import load_queries

    return open_index(index, persona), load_queries(queries)


@app.command("eval-retrieval")
@friendly
def eval_retrieval(
    queries: Annotated[str, typer.Option("--queries", help="Labelled queries JSONL.")],
    index: IndexOpt = None,
    persona: PersonaOpt = None,
    threshold: Annotated[float | None, typer.Option("--threshold")] = None,
    k: KOpt = None,
    mode: ModeOpt = None,
    conversation: ConversationOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Precision, recall, F1, top-1 hit rate and off-topic rejection on labelled queries (multi-turn
    sets: each query read with its "history")."""
    from rag_persona.retrieval.retriever import retriever_for
    from rag_persona.retrieval.tuning import check_labels, evaluate_retriever

    store, labelled = _index_and_queries(index, queries, persona)
    check_labels(store, labelled)
    retriever = retriever_for(store, mode=mode, threshold=threshold, k=k, conversation=conversation)
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
    persona: PersonaOpt = None,
    plot: Annotated[
        str | None, typer.Option("--plot", help="Write precision/recall/F1 vs threshold here.")
    ] = None,
    k: KOpt = None,
    mode: ModeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Sweep thresholds on labelled queries, store the F1-best one with the index, print it."""
    from rag_persona.retrieval.tuning import tune_threshold

    store, labelled = _index_and_queries(index, queries, persona)
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
