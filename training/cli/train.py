"""`rag-persona train` (every stage, from a recipe) and `ship-adapter`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from rag_persona.cli import _progress, echo_json, friendly
from rag_persona.errors import RagPersonaError


def summary_line(metrics: dict) -> str:
    """One line about a finished run: steps and losses, plus what the stage measures."""
    if "eval_loss_no_memory" in metrics:  # xattn: no train loss; the held-out loss is what it measures
        return (
            f"{metrics['output']}: {metrics['steps']} steps, held-out loss "
            f"{metrics['eval_loss_no_memory']:.4f} → {metrics['eval_loss']:.4f}"
        )
    line = f"{metrics['output']}: {metrics['steps']} steps, train loss {metrics['train_loss']:.4f}"
    if metrics.get("heldout_after"):
        before = (metrics.get("heldout_before") or {}).get("accuracy")
        line += f", held-out pair accuracy {before} → {metrics['heldout_after']['accuracy']}"
    if metrics.get("reward_last_step") is not None:
        line += f", mean reward {metrics['reward_first_step']:.3f} → {metrics['reward_last_step']:.3f}"
    if metrics.get("merged"):
        line += " (merged standalone model)"
    return line


def train_cmd(
    stage: Annotated[
        str,
        typer.Argument(
            help="sft, dpo, cpt (continued pre-training, merged), reward (reward model), rl (GRPO) "
            "or xattn (cross-attention blocks; recipe e.g. xattn_cpu)"
        ),
    ],
    recipe: Annotated[str, typer.Option("--recipe", help="Recipe YAML file or bundled recipe name.")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Output folder (default runs/<recipe name>).")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Folder of build-data files.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Override the recipe's base model.")] = None,
    init_adapter: Annotated[
        Path | None,
        typer.Option("--init-adapter", help="DPO / RL: the SFT adapter; xattn: weights to continue."),
    ] = None,
    reward_adapter: Annotated[
        Path | None,
        typer.Option("--reward-adapter", help="RL: the reward model (a `train reward` folder)."),
    ] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps")] = None,
    max_train_examples: Annotated[int | None, typer.Option("--max-train-examples")] = None,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", help="CPU threads (1 on a busy machine).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """LoRA (CPU) or QLoRA (CUDA, 4-bit) training from a recipe, picked automatically and reported:
    SFT, DPO, continued pre-training (cpt), reward model (reward), GRPO (rl); or the cross-attention
    blocks (xattn)."""
    from rag_persona.errors import RagPersonaError
    from training.recipes import load_recipe
    from training.stages import train

    r = load_recipe(
        recipe,
        data_dir=str(data_dir) if data_dir else None,
        base_model=model,
        init_adapter=str(init_adapter) if init_adapter else None,
        max_steps=max_steps,
        max_train_examples=max_train_examples,
        seed=seed,
        cpu_threads=threads,
        rl={"reward_adapter": str(reward_adapter)} if reward_adapter else None,
    )
    if r.stage != stage:
        raise RagPersonaError(
            f"recipe {recipe}: field 'stage' is {r.stage!r}, but the command says {stage!r}"
        )
    metrics = train(r, out, progress=_progress)
    if as_json:
        echo_json({k: v for k, v in metrics.items() if k != "lineage"})
    else:
        typer.echo(summary_line(metrics))


def ship_adapter_cmd(
    run: Annotated[Path, typer.Argument(help="A trained adapter folder (runs/...).")],
    name: Annotated[str, typer.Option("--name", help="Folder name under adapters/.")],
    default: Annotated[
        bool, typer.Option("--default/--not-default", help="Make it the chat default.")
    ] = True,
) -> None:
    """Copy an adapter into the repo's adapters/ (bf16 weights + provenance) for the chat to use."""
    from rag_persona.evaluation.evaluate import ADAPTERS_ROOT
    from training.shipping import ship_adapter

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", name):  # one folder under adapters/, never a path
        raise RagPersonaError(f"--name {name!r}: must be a plain folder name (letters, digits, _ . -)")
    typer.echo(str(ship_adapter(run, ADAPTERS_ROOT / name, default=default)))


def register(app: typer.Typer) -> None:
    """Add these commands to the `rag-persona` app."""
    app.command("train")(friendly(train_cmd))
    app.command("ship-adapter")(friendly(ship_adapter_cmd))
