"""`rag-persona merge`, `task-vectors` and `evo-merge`: thin commands over training.merging."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rag_persona.cli import _progress, echo_json, friendly, keywords_for

InputsArg = Annotated[
    list[Path],
    typer.Argument(help="Adapter folders (adapter_config.json) and/or full model folders (safetensors)."),
]
BaseOpt = Annotated[
    str | None,
    typer.Option(
        "--base",
        "--model",
        help="Base model: bundled alias or local folder (default: the adapters' base, else the chat model).",
    ),
]


def merge_cmd(
    inputs: InputsArg,
    out: Annotated[Path, typer.Option("--out", help="Output folder (written atomically).")],
    method: Annotated[
        str,
        typer.Option(
            help="Adapters: linear, cat, svd, ties, dare_linear, dare_ties, magnitude_prune (+ _svd). "
            "Models: linear, task_arithmetic, ties, dare_linear, dare_ties, magnitude_prune."
        ),
    ] = "linear",
    weights: Annotated[
        str | None, typer.Option(help="Comma-separated, one per input (default: 1/n each).")
    ] = None,
    density: Annotated[
        float | None, typer.Option(help="Share of entries kept (ties, dare_*, magnitude_prune).")
    ] = None,
    base: BaseOpt = None,
    full: Annotated[
        bool, typer.Option("--full", help="Adapters: fold the merge into the base, save a model.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seeds DARE's random masks.")] = 0,
    svd_rank: Annotated[int | None, typer.Option(help="Adapters, *svd methods: output rank.")] = None,
    shard_mb: Annotated[int, typer.Option(help="Largest safetensors shard of a model output.")] = 2000,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Merge LoRA adapters (peft add_weighted_adapter) or full models against a base (streamed)."""
    from training.merging.merge import merge, parse_floats

    result = merge(
        inputs,
        out,
        method=method,
        weights=parse_floats(weights, "--weights"),
        density=density,
        base=base,
        full=full,
        seed=seed,
        svd_rank=svd_rank,
        shard_bytes=shard_mb * 1_000_000,
        progress=_progress,
    )
    if as_json:
        echo_json(result.to_dict())
    else:
        m = result.manifest
        density_txt = f", density {m['density']}" if m.get("density") is not None else ""
        typer.echo(f"{m['kind']} {m['method']} weights {m['weights']}{density_txt} → {result.out}")


def task_vectors_cmd(
    inputs: InputsArg,
    base: BaseOpt = None,
    pairs: Annotated[bool, typer.Option("--pairs", help="Also every pair's difference A − B.")] = False,
    top_percent: Annotated[
        float, typer.Option(help="Only the top n% magnitudes of each tensor's difference (TIES trim).")
    ] = 100.0,
    csv_path: Annotated[Path | None, typer.Option("--csv", help="CSV of all rows.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="PNG: per-layer L2 per scope.")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """L1/L2 norms of (model − base) and (A − B): overall, per layer, per module type."""
    from training.merging.task_vectors import task_vectors

    report = task_vectors(
        inputs,
        base=base,
        pairs=pairs,
        top_percent=top_percent,
        csv_path=csv_path,
        plot_path=plot,
        progress=_progress,
    )
    if as_json:
        echo_json(report.to_dict())
        return
    for scope in report.scopes:
        o = report.overall(scope)
        typer.echo(f"{scope:<48} L1 {o['l1']:12.6g}  L2 {o['l2']:10.6g}  entries {o['numel']}")
    for note in report.skipped:
        typer.echo(f"skipped: {note}")
    for label, path in (("csv", report.csv), ("plot", report.plot)):
        if path:
            typer.echo(f"{label}: {path}")


def evo_merge_cmd(
    inputs: Annotated[list[Path], typer.Argument(help="LoRA adapter folders to merge.")],
    prompts: Annotated[Path, typer.Option("--prompts", help="Held-out prompts JSONL (eval_prompts).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the best merged adapter.")],
    method: Annotated[str, typer.Option(help="add_weighted_adapter combination type.")] = "dare_ties",
    budget: Annotated[int, typer.Option(help="Evaluations in all (the start point included).")] = 12,
    log: Annotated[Path | None, typer.Option("--log", help="JSONL log (default: <out>.evo.jsonl).")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Only the first N prompts.")] = None,
    base: BaseOpt = None,
    index: Annotated[str | None, typer.Option("--index", help="Index folder (default: persona's).")] = None,
    persona: Annotated[str | None, typer.Option("--persona")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 96,
    seed: Annotated[int, typer.Option()] = 0,
    sigma: Annotated[float, typer.Option(help="CMA-ES initial step size.")] = 0.2,
    population_size: Annotated[
        int | None, typer.Option("--population", help="CMA-ES population size.")
    ] = None,
    init_weights: Annotated[
        str | None, typer.Option(help="Comma-separated start weights (default 1/n each).")
    ] = None,
    init_density: Annotated[float, typer.Option(help="Start density (pruning methods).")] = 0.5,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """CMA-ES over adapter weights (and density), scored by persona metrics on held-out prompts."""
    options = dict(locals())
    from training.merging.evomerge import EvoConfig, check_log, evo_merge, persona_score_fn
    from training.merging.merge import check_output, parse_floats

    init = parse_floats(init_weights, "--init-weights")
    config = EvoConfig(**keywords_for(EvoConfig, options, init_weights=init)).validate(len(inputs))
    # evo_merge checks these again; here they come before the score function opens the index and embedder.
    check_output(out, inputs)
    check_log(log or out.with_name(f"{out.name}.evo.jsonl"), inputs, out)
    score_fn = persona_score_fn(**keywords_for(persona_score_fn, options, progress=_progress))
    result = evo_merge(
        inputs, out, score_fn=score_fn, config=config, base=base, log_path=log, progress=_progress
    )
    if as_json:
        echo_json(result.to_dict())
    else:
        b = result.best
        typer.echo(
            f"best of {len(result.evaluations)}: eval {b['eval']} score {b['score']:.4f} "
            f"(start {result.evaluations[0]['score']:.4f}) {b['params']} → {result.out}"
        )


def register(app: typer.Typer) -> None:
    """Add these commands to the `rag-persona` app."""
    app.command("merge")(friendly(merge_cmd))
    app.command("task-vectors")(friendly(task_vectors_cmd))
    app.command("evo-merge")(friendly(evo_merge_cmd))
