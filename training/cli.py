"""`rag-persona` commands for training, registered into the library's CLI through an entry point."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    from rag_persona.cli.app import echo_json, friendly

    @app.command("build-data")
    @friendly
    def build_data(
        out: Annotated[Path, typer.Option("--out", help="Output folder for the JSONL files and manifest.")],
        index: Annotated[
            Path | None, typer.Option("--index", help="Index folder (default persona index).")
        ] = None,
        persona: Annotated[str | None, typer.Option("--persona")] = None,
        seed: Annotated[int, typer.Option("--seed")] = 0,
        distractor_rate: Annotated[
            float, typer.Option(help="Share of examples given extra distractor facts.")
        ] = 0.3,
        drop_golden_rate: Annotated[
            float, typer.Option(help="Share of examples whose golden facts are removed.")
        ] = 0.1,
        eval_share: Annotated[
            float, typer.Option(help="Share of conversations held out for evaluation.")
        ] = 0.1,
        augment_paraphrases: Annotated[
            int, typer.Option(help="Teacher-paraphrased training turns to add (0 = off), marked generated.")
        ] = 0,
        teacher: Annotated[
            str | None, typer.Option(help="Teacher chat model for augmentation (default: bundled).")
        ] = None,
        fact_questions: Annotated[
            bool,
            typer.Option(
                "--fact-questions",
                help="Add train-only turns from the facts' own questions, answered with the fact itself.",
            ),
        ] = False,
        as_json: Annotated[bool, typer.Option("--json")] = False,
    ) -> None:
        """Regenerate SFT and DPO data (D0 plain, D1 お嬢様, D2 both) from the knowledge base."""
        from training.data import DataConfig, build_datasets

        manifest = build_datasets(
            DataConfig(
                out=out,
                index=index,
                persona=persona,
                seed=seed,
                distractor_rate=distractor_rate,
                drop_golden_rate=drop_golden_rate,
                eval_share=eval_share,
                augment_paraphrases=augment_paraphrases,
                teacher=teacher,
                fact_questions=fact_questions,
            )
        )
        if as_json:
            echo_json(manifest)
        else:
            for name, count in manifest["counts"].items():
                typer.echo(f"{name:<28} {count:>6}")
            typer.echo(f"written to {out}")

    @app.command("audit-labels")
    @friendly
    def audit_labels_cmd(
        data: Annotated[Path, typer.Option("--data", help="JSONL: SFT, DPO, text or pre-tokenised rows.")],
        model: Annotated[
            str | None, typer.Option("--model", help="Whose tokenizer builds the labels.")
        ] = None,
        n: Annotated[int, typer.Option("--n", help="Examples to audit and show (0: all).")] = 10,
        builder: Annotated[str, typer.Option(help="ours (EOS id) or trl (trl's string EOS).")] = "ours",
        as_json: Annotated[bool, typer.Option("--json")] = False,
    ) -> None:
        """Show the trained tail of each example; exit 1 unless every one ends in the EOS id with no
        special-token text trained as ordinary pieces."""
        from training.labels import audit_file
        from training.trainers import load_tokenizer

        tokenizer, gen_eos, source = load_tokenizer(model)
        report = audit_file(tokenizer, data, generation_eos_ids=gen_eos, builder=builder, limit=n or None)
        report["model"] = source
        if as_json:
            echo_json(report)
        else:
            rows = report["rows"] if n else [r for r in report["rows"] if not r["ok"]][:20]
            for r in rows:
                state = "ok  " if r["ok"] else "FAIL"
                typer.echo(f"{state} {r['source']} [{r['part']}] tail {r['tail_text']!r} ids {r['tail_ids']}")
                for problem in r["problems"]:
                    typer.echo(f"     - {problem}")
            typer.echo(
                f"{report['checked'] - report['failed']}/{report['checked']} ok; EOS id {report['eos_id']} "
                f"({report['eos_token']!r}); builder {builder}; tokenizer {source}"
            )
        if not report["ok"]:
            raise typer.Exit(1)

    @app.command("train")
    @friendly
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
            Path | None, typer.Option("--out", help="Adapter folder (default runs/<recipe name>).")
        ] = None,
        data_dir: Annotated[
            Path | None, typer.Option("--data-dir", help="Folder of build-data files.")
        ] = None,
        model: Annotated[
            str | None, typer.Option("--model", help="Override the recipe's base model.")
        ] = None,
        init_adapter: Annotated[
            Path | None, typer.Option("--init-adapter", help="DPO / RL: the SFT adapter.")
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
        SFT, DPO, continued pre-training (cpt), reward model (reward) or GRPO (rl)."""
        from rag_persona.cli.app import _progress
        from rag_persona.errors import RagPersonaError

        if stage == "xattn":  # cross-attention context injection (training/xattn_train.py)
            from training.xattn_train import run_from_cli

            summary = run_from_cli(
                recipe,
                out=out,
                data_dir=data_dir,
                model=model,
                max_steps=max_steps,
                seed=seed,
                threads=threads,
                progress=_progress,
            )
            if as_json:
                echo_json(summary)
            else:
                typer.echo(
                    f"{summary['steps']} steps, held-out loss {summary['eval_loss_no_memory']:.4f} → {summary['eval_loss']:.4f}"
                )
            return

        from training.trainers import load_recipe, train

        r = load_recipe(
            recipe,
            data_dir=str(data_dir) if data_dir else None,
            base_model=model,
            init_adapter=str(init_adapter) if init_adapter else None,
            max_steps=max_steps,
            max_train_examples=max_train_examples,
            seed=seed,
            cpu_threads=threads,
            rl_reward_adapter=str(reward_adapter) if reward_adapter else None,
        )
        if r.stage != stage:
            raise RagPersonaError(
                f"recipe {recipe}: field 'stage' is {r.stage!r}, but the command says {stage!r}"
            )
        metrics = train(r, out, progress=_progress)
        if as_json:
            echo_json({k: v for k, v in metrics.items() if k != "lineage"})
        else:
            line = f"{metrics['output']}: {metrics['steps']} steps, train loss {metrics['train_loss']:.4f}"
            if metrics.get("heldout_after"):
                before = (metrics.get("heldout_before") or {}).get("accuracy")
                line += f", held-out pair accuracy {before} → {metrics['heldout_after']['accuracy']}"
            if metrics.get("reward_last_step") is not None:
                line += (
                    f", mean reward {metrics['reward_first_step']:.3f} → {metrics['reward_last_step']:.3f}"
                )
            if metrics.get("merged"):
                line += " (merged standalone model)"
            typer.echo(line)

    @app.command("ship-adapter")
    @friendly
    def ship_adapter_cmd(
        run: Annotated[Path, typer.Argument(help="A trained adapter folder (runs/...).")],
        name: Annotated[str, typer.Option("--name", help="Folder name under adapters/.")],
        default: Annotated[
            bool, typer.Option("--default/--not-default", help="Make it the chat default.")
        ] = True,
    ) -> None:
        """Copy an adapter into the repo's adapters/ (bf16 weights + provenance) for the chat to use."""
        from rag_persona.evaluation.evaluate import ADAPTERS_ROOT
        from training.trainers import ship_adapter

        typer.echo(str(ship_adapter(run, ADAPTERS_ROOT / name, default=default)))

    from training.cli_rl import register as _register_rl

    _register_rl(app)

    from training.cli_merge import register as _register_merge

    _register_merge(app)
