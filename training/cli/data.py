"""`rag-persona build-data` and `audit-labels`: the training data and the labels it turns into."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rag_persona.cli import echo_json, friendly
from rag_persona.cli.common import AdapterOpt, EngineOpt, JsonOpt, ModelOpt, PersonaOpt


def build_data(
    out: Annotated[Path, typer.Option("--out", help="Output folder for the JSONL files and manifest.")],
    index: Annotated[
        Path | None, typer.Option("--index", help="Index folder (default persona index).")
    ] = None,
    persona: Annotated[
        list[str] | None,
        typer.Option(
            "--persona",
            help="Persona id or folder; repeat it (or name a folder of persona folders) for one mixed set.",
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    distractor_rate: Annotated[
        float, typer.Option(help="Share of examples given extra distractor facts.")
    ] = 0.3,
    drop_golden_rate: Annotated[
        float, typer.Option(help="Share of examples whose golden facts are removed.")
    ] = 0.1,
    eval_share: Annotated[float, typer.Option(help="Share of conversations held out for evaluation.")] = 0.1,
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
    dialogues: Annotated[
        str,
        typer.Option(
            "--dialogues",
            help="Comma-separated dialogue files in the persona folder (v2 data: dialogues.jsonl,dialogues_v2.jsonl).",
        ),
    ] = "dialogues.jsonl",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Regenerate SFT and DPO data (D0 plain, D1 the persona's register, D2 both) from the knowledge base;
    several personas: each built under OUT/personas/<id>, their rows mixed into OUT."""
    from training.data.build import DataConfig, build_datasets
    from training.data.mix import build_mixed, expand_personas

    personas = expand_personas(persona or [])
    config = DataConfig(
        out=out,
        index=index,
        persona=personas[0] if len(personas) == 1 else None,
        seed=seed,
        distractor_rate=distractor_rate,
        drop_golden_rate=drop_golden_rate,
        eval_share=eval_share,
        augment_paraphrases=augment_paraphrases,
        teacher=teacher,
        fact_questions=fact_questions,
        dialogues=[d.strip() for d in dialogues.split(",") if d.strip()],
    )
    manifest = build_mixed(config, personas) if len(personas) > 1 else build_datasets(config)
    if as_json:
        echo_json(manifest)
    else:
        for name, count in manifest["counts"].items():
            typer.echo(f"{name:<28} {count:>6}")
        typer.echo(f"written to {out}")


def audit_labels_cmd(
    data: Annotated[Path, typer.Option("--data", help="JSONL: SFT, DPO, text or pre-tokenised rows.")],
    model: Annotated[str | None, typer.Option("--model", help="Whose tokenizer builds the labels.")] = None,
    n: Annotated[int, typer.Option("--n", min=0, help="Examples to audit and show (0: all).")] = 10,
    builder: Annotated[str, typer.Option(help="ours (EOS id) or trl (trl's string EOS).")] = "ours",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show the trained tail of each example; exit 1 unless every one ends in the EOS id with no
    special-token text trained as ordinary pieces."""
    from training.data.labels import audit_file
    from training.stages.common import load_tokenizer

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


def onpolicy_pairs_cmd(
    data: Annotated[Path, typer.Option("--data", help="A build-data folder (its DPO train/eval files).")],
    out: Annotated[
        Path, typer.Option("--out", help="Output folder for the pairs (dpo_op_train/eval.jsonl).")
    ],
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    engine: EngineOpt = "auto",
    persona: PersonaOpt = None,
    per_kind: Annotated[
        str, typer.Option(help="Grounded prompts answered per conversation kind: N or N,KIND=N,…")
    ] = "150",
    mix: Annotated[int, typer.Option(min=0, help="Rows of the source DPO file kept beside the pairs.")] = 32,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    samples: Annotated[
        str,
        typer.Option(
            help="Replies tried per prompt (N or N,KIND=N,…): greedy, then sampled ones until one fails."
        ),
    ] = "1",
    as_json: JsonOpt = False,
) -> None:
    """DPO pairs from the model's own failing replies (judged as evaluate judges) to training prompts,
    the reference reply chosen; resumable (replies are kept beside OUT until the folder is written)."""
    from training.data.onpolicy import build_onpolicy

    manifest = build_onpolicy(
        data,
        out,
        model=model,
        adapter=adapter,
        engine=engine,
        persona_id=persona,
        per_kind=per_kind,
        mix=mix,
        seed=seed,
        samples=samples,
        progress=lambda msg: typer.echo(msg, err=True),
    )
    if as_json:
        echo_json(manifest)
    else:
        c = manifest["counts"]
        typer.echo(
            f"{c['pairs']} pairs from {c['rows']} replies + {manifest['mixed_source_rows']} source rows → {out}"
        )


def register(app: typer.Typer) -> None:
    """Add these commands to the `rag-persona` app."""
    app.command("build-data")(friendly(build_data))
    app.command("audit-labels")(friendly(audit_labels_cmd))
    app.command("onpolicy-pairs")(friendly(onpolicy_pairs_cmd))
