"""SFT: trl's SFTTrainer on pre-tokenised examples (prompt masked, EOS appended as an id), LoRA or QLoRA."""

from __future__ import annotations

import functools
from pathlib import Path

from rag_persona.errors import RagPersonaError
from training.recipes import Recipe

from .common import Run, RunOptions, common_args, train_labelled


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


def train_sft(recipe: Recipe, out: Path, options: RunOptions) -> dict:
    """Supervised fine-tuning of a fresh LoRA (or of recipe.init_adapter); returns the run's metrics."""
    return train_labelled(recipe, out, options, trainer_class=sft_trainer_class, config=sft_config)
