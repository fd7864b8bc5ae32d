"""`rag-persona` commands for training, registered into the library's CLI through an entry point."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    from rag_persona.cli import echo_json, friendly

    @app.command("build-data")
    @friendly
    def build_data(
        out: Annotated[Path, typer.Option("--out", help="Output folder for the JSONL files and manifest.")],
        index: Annotated[Path | None, typer.Option("--index", help="Index folder (default persona index).")] = None,
        persona: Annotated[str | None, typer.Option("--persona")] = None,
        seed: Annotated[int, typer.Option("--seed")] = 0,
        distractor_rate: Annotated[float, typer.Option(help="Share of examples given extra distractor facts.")] = 0.3,
        drop_golden_rate: Annotated[float, typer.Option(help="Share of examples whose golden facts are removed.")] = 0.1,
        eval_share: Annotated[float, typer.Option(help="Share of conversations held out for evaluation.")] = 0.1,
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
            )
        )
        if as_json:
            echo_json(manifest)
        else:
            for name, count in manifest["counts"].items():
                typer.echo(f"{name:<28} {count:>6}")
            typer.echo(f"written to {out}")
