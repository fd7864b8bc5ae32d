"""SFT: trl's SFTTrainer on pre-tokenised examples (prompt masked, EOS appended as an id), LoRA or QLoRA."""

from __future__ import annotations

import functools
import random
from pathlib import Path

from rag_persona.errors import RagPersonaError
from training.recipes import Recipe

from .common import Examples, Run, RunOptions, common_args, train_labelled
from .cpt import cpt_knowledge_dir, recipe_cpt_data


@functools.cache
def sft_trainer_class():
    """trl's SFTTrainer, refusing anything but the `input_ids` + `labels` built by training.data.labels."""
    from trl import SFTTrainer

    class EosSafeSFTTrainer(SFTTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
            cols = set(dataset.column_names or [])
            if not {"input_ids", "labels"} <= cols:
                raise RagPersonaError(
                    f"SFT {dataset_name} data: pre-tokenised input_ids + labels required (training.data.labels); "
                    "raw text would take trl's string-EOS path"
                )
            if args.max_length is not None:
                raise RagPersonaError(
                    "SFT: max_length must be None here; overlong examples are dropped upstream"
                )
            return super()._prepare_dataset(
                dataset, processing_class, args, packing, formatting_func, dataset_name
            )

    return EosSafeSFTTrainer


def sft_config(run: Run, work: Path):
    """trl's SFTConfig: no truncation (overlong examples are dropped upstream), our labels as they are."""
    from trl import SFTConfig

    return SFTConfig(
        **common_args(run, work), max_length=None, completion_only_loss=None, shuffle_dataset=False
    )


def replay_count(n_rows: int, share: float) -> int:
    """CPT blocks to add to n_rows chat examples so that they are `share` of the mix (at least one)."""
    return max(1, round(n_rows * share / (1 - share))) if share else 0


def _mix_in(ex: Examples, extra: list[tuple], rng: random.Random) -> int:
    """Append (example, source) pairs to the training split and shuffle the whole split with rng; its size."""
    mixed = list(zip(ex.train.examples, ex.train.sources, strict=True)) + extra
    rng.shuffle(mixed)
    ex.train.examples[:] = [m[0] for m in mixed]
    ex.train.sources[:] = [m[1] for m in mixed]
    return len(mixed)


def add_replay_blocks(run: Run, tokenizer, ex: Examples, eos_id: int, stops: set[int]) -> dict:
    """Mix recipe.replay's share of CPT blocks into the SFT examples at seeded positions; what was added.

    The blocks are the knowledge rendered as in `train cpt` with the recipe's `cpt` block and seed (the same
    documents a CPT run with that seed trained on), audited the same way; every token of a block is trained.
    """
    r, c = run.recipe, run.recipe.cpt
    if not r.replay:
        return {"replay_blocks": 0}
    knowledge_dir = cpt_knowledge_dir(r)
    want = replay_count(len(ex.train.examples), r.replay)
    data = recipe_cpt_data(r, tokenizer, eos_id, stops, knowledge_dir, eval_variants=0)
    blocks = data.train
    if want > len(blocks.examples):
        raise RagPersonaError(
            f"recipe {r.name}: field 'replay': {r.replay} of {len(ex.train.examples)} SFT examples needs "
            f"{want} CPT blocks, the knowledge gives {len(blocks.examples)}; raise cpt.variants"
        )
    rng = random.Random(f"{r.seed}|replay")
    picked = sorted(rng.sample(range(len(blocks.examples)), want))
    total = _mix_in(ex, [(blocks.examples[i], f"replay {blocks.sources[i]}") for i in picked], rng)
    run.progress(
        f"{want} CPT blocks of {c.block_size} tokens mixed in ({want / total:.0%} of {total} "
        f"training examples, from {len(blocks.examples)} blocks of {knowledge_dir})"
    )
    return {
        "replay_blocks": want,
        "replay_share": round(want / total, 4),
        "replay_data": {"knowledge_dir": str(knowledge_dir), **data.manifest()},
    }


def closed_book_rows(run: Run, rows: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """recipe.closed_book's share of the single-turn fact rows (none about a fact the persona's test
    queries ask), seeded, each re-rendered by the prompt builder with no retrieved facts."""
    from rag_persona.knowledge.facts import load_queries
    from rag_persona.prompts import Persona, build_messages

    r = run.recipe
    knowledge_dir = cpt_knowledge_dir(r)
    tested = {fid for q in load_queries(knowledge_dir / "queries" / "test.jsonl") for fid in q.relevant}
    eligible = [
        (where, row)
        for where, row in rows
        if row.get("kind") == "fact"
        and len(row["prompt"]) == 2
        and row.get("golden_ids")
        and not set(row["golden_ids"]) & tested
    ]
    if not eligible:
        raise RagPersonaError(
            f"recipe {r.name}: field 'closed_book': no single-turn fact row about an untested fact"
        )
    rng = random.Random(f"{r.seed}|closed_book")
    picked = rng.sample(eligible, max(1, round(len(eligible) * r.closed_book)))
    persona = Persona.load(knowledge_dir)
    return [
        (
            f"{where} (closed-book)",
            row
            | {
                "id": f"{row['id']}-closed",
                "prompt": build_messages(persona, [], [], row["prompt"][-1]["content"]),
            },
        )
        for where, row in picked
    ]


def add_sft_extras(run: Run, tokenizer, ex: Examples, eos_id: int, stops: set[int]) -> dict:
    """Replay blocks (recipe.replay) and closed-book copies (recipe.closed_book) mixed into the SFT examples."""
    from training.data.labels import audit_tokenized, require_clean, tokenize_rows

    added = add_replay_blocks(run, tokenizer, ex, eos_id, stops)
    if not run.recipe.closed_book:
        return added | {"closed_book_rows": 0}
    rows = closed_book_rows(run, ex.used_rows)
    extra = tokenize_rows(tokenizer, rows, eos_id, kind="sft", max_length=run.recipe.max_length)
    require_clean(audit_tokenized(tokenizer, extra, stops), "closed-book")
    rng = random.Random(f"{run.recipe.seed}|closed_book_mix")
    total = _mix_in(ex, list(zip(extra.examples, extra.sources, strict=True)), rng)
    run.progress(
        f"{len(extra.examples)} closed-book copies of fact rows added (no retrieved facts in their prompt; "
        f"{total} training examples)"
    )
    return added | {"closed_book_rows": len(extra.examples), "closed_book_ids": [r["id"] for _, r in rows]}


def train_sft(recipe: Recipe, out: Path, options: RunOptions) -> dict:
    """Supervised fine-tuning of a fresh LoRA (or of recipe.init_adapter); returns the run's metrics."""
    return train_labelled(
        recipe,
        out,
        options,
        trainer_class=sft_trainer_class,
        config=sft_config,
        extra_pairs=add_sft_extras,
    )
