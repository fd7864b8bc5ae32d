"""DPO (RPO with an NLL term, EOS and parrot contrasts): trl's DPOTrainer on pre-tokenised pairs."""

from __future__ import annotations

import functools
from pathlib import Path

from rag_persona.errors import RagPersonaError
from training.data.labels import audit_tokenized, eos_contrast_pairs, parrot_pairs, require_clean
from training.recipes import Recipe

from .common import Examples, Run, RunOptions, common_args, train_labelled

CONTRASTS = {
    "eos_contrast": "chosen stops at EOS, rejected runs on without it",
    "parrot_contrast": "rejected: the user's message said back",
}


@functools.cache
def dpo_trainer_class():
    """trl's DPOTrainer, refusing anything but the `prompt_ids` + `chosen_ids` + `rejected_ids` of our labels."""
    from trl import DPOTrainer

    class EosSafeDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            cols = set(dataset.column_names or [])
            if not {"prompt_ids", "chosen_ids", "rejected_ids"} <= cols:
                raise RagPersonaError(
                    f"DPO {dataset_name} data: pre-tokenised prompt_ids + chosen_ids + rejected_ids required "
                    "(training.data.labels); raw text would take trl's string-EOS path"
                )
            return dataset

    return EosSafeDPOTrainer


def dpo_config(run: Run, work: Path):
    """trl's DPOConfig with the recipe's beta and losses (["sigmoid", "sft"]: RPO)."""
    from trl import DPOConfig

    r = run.recipe
    return DPOConfig(
        **common_args(run, work),
        max_length=None,
        beta=r.beta,
        loss_type=list(r.loss_type),
        loss_weights=r.loss_weights,
    )


def add_contrast_pairs(run: Run, tokenizer, ex: Examples, eos_id: int, stops: set[int]) -> dict:
    """Append the recipe's shares of EOS and parrot contrasts to the training pairs; their counts."""
    r = run.recipe
    # Both sets come from the audited pairs only (built before either is appended).
    contrasts = {}
    if r.eos_contrast:  # the rejected side deliberately lacks EOS: not audited
        contrasts["eos_contrast"] = eos_contrast_pairs(ex.train, eos_id, r.eos_contrast, r.seed)
    if r.parrot_contrast:
        parrot = parrot_pairs(
            tokenizer, ex.used_rows, eos_id, r.parrot_contrast, r.seed, max_length=r.max_length
        )
        require_clean(audit_tokenized(tokenizer, parrot, stops), "parrot-contrast")
        contrasts["parrot_contrast"] = parrot
    for name, extra in contrasts.items():
        ex.train.examples += extra.examples
        ex.train.sources += extra.sources
        run.progress(f"{len(extra.examples)} {name} pairs added ({CONTRASTS[name]})")
    return {f"{name}_pairs": len(contrasts[name].examples) if name in contrasts else 0 for name in CONTRASTS}


def train_dpo(recipe: Recipe, out: Path, options: RunOptions) -> dict:
    """DPO from recipe.init_adapter (its frozen copy is the reference) or a fresh LoRA; returns metrics."""
    return train_labelled(
        recipe,
        out,
        options,
        trainer_class=dpo_trainer_class,
        config=dpo_config,
        extra_pairs=add_contrast_pairs,
        reference="DPO reference",
    )
