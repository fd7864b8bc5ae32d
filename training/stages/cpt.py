"""Continued pre-training: LoRA next-token training on the knowledge, merged into a standalone base model."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from rag_persona.errors import RagPersonaError
from training.data.cpt_data import CptData, build_cpt_data
from training.recipes import Recipe

from .common import (
    Run,
    RunOptions,
    build_trainer,
    common_args,
    eos_ids,
    eval_loss,
    kbit_ready,
    load_model,
    save_adapter,
    start_run,
    train_and_evaluate,
)
from .lora import lora_config

EMBEDDING_MODULES = ("embed_tokens", "lm_head")
ADAPTER_SUBDIR = "adapter"


def _targets(recipe: Recipe) -> set[str]:
    t = recipe.lora.target_modules
    return {t} if isinstance(t, str) else set(t)


def untie_embeddings(model) -> bool:
    """Give lm_head its own copy of a tied input embedding; returns whether the model was tied.

    The 0.5B Qwen ties lm_head to embed_tokens. A LoRA on the embedding would then, once merged, also move
    the output head that training never changed; peft's own tied-adapter option (ensure_weight_tying) adds
    the shared delta twice on merge (measured with peft 0.21.2). Untied, each module has its own LoRA and
    the merged model computes exactly what was trained, at the cost of one vocab x hidden matrix on disk.
    """
    import torch

    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight is not emb.weight:
        return False
    head.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    model.config.tie_word_embeddings = False
    model.config.get_text_config().tie_word_embeddings = False
    return True


def merge_into_base(peft_model, run: Run, adapter_dir: Path, untied: bool):
    """The base model with the trained LoRA added into its weights.

    A bf16 base is merged in place. A 4-bit base cannot hold the sum, so the base is loaded again in bf16
    on the CPU (GPU memory still holds the 4-bit one; 7B in bf16 is ~16 GB) and the saved adapter applied.
    """
    if not run.mode.quantized:
        return peft_model.merge_and_unload()
    from peft import PeftModel

    from rag_persona.generation import load_causal_lm

    run.progress(
        "reloading the base in bf16 on the CPU to merge the adapter (a 4-bit base cannot hold the sum)"
    )
    base = load_causal_lm(run.recipe.base_model, device="cpu", progress=run.progress).model
    if untied:
        untie_embeddings(base)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def save_merged(model, folder: Path) -> None:
    """A merged model saved in bf16 like the prepared base, whatever dtype the merge ran in (float32 on CPUs
    without native bf16); the model in memory stays as it is for a caller that keeps it."""
    import torch

    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    model.save_pretrained(str(folder), safe_serialization=True, state_dict=state)


def cpt_trainer(run: Run, work: Path, model, data: CptData):
    """Plain next-token training with transformers' Trainer: the model's own loss over every label.

    trl's SFTTrainer computes log-probabilities from lm_head.weight directly (a fused head) and refuses a
    LoRA on lm_head, which the users' CPT recipe trains; blocks of equal length need nothing else of trl.
    """
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, default_data_collator

    return build_trainer(
        Trainer,
        run,
        model=model,
        args=TrainingArguments(**common_args(run, work), label_names=["labels"]),
        train_dataset=Dataset.from_dict(data.train.columns()),
        eval_dataset=Dataset.from_dict(data.eval.columns()) if data.eval else None,
        data_collator=default_data_collator,
    )


def cpt_knowledge_dir(recipe: Recipe) -> Path:
    """The persona folder the recipe's CPT blocks render: cpt.knowledge_dir, else the recipe's persona."""
    from rag_persona.settings import KNOWLEDGE_ROOT

    knowledge_dir = Path(recipe.cpt.knowledge_dir or KNOWLEDGE_ROOT / recipe.persona)
    if not knowledge_dir.is_dir():
        raise RagPersonaError(
            f"{knowledge_dir}: knowledge folder not found (recipe field 'cpt.knowledge_dir')"
        )
    return knowledge_dir


def recipe_cpt_data(
    recipe: Recipe,
    tokenizer,
    eos_id: int,
    stops: set[int],
    knowledge_dir: Path,
    *,
    eval_variants: int,
    max_train_blocks: int | None = None,
    max_eval_blocks: int | None = None,
) -> CptData:
    """The knowledge rendered and packed as the recipe's `cpt` block and seed say: the same documents for
    a CPT run and for an SFT run that replays it."""
    c = recipe.cpt
    return build_cpt_data(
        tokenizer,
        eos_id,
        stops,
        knowledge_dir=knowledge_dir,
        block_size=c.block_size,
        variants=c.variants,
        eval_variants=eval_variants,
        formats=c.formats,
        facts_per_paragraph=c.facts_per_paragraph,
        seed=recipe.seed,
        max_train_blocks=max_train_blocks,
        max_eval_blocks=max_eval_blocks,
    )


def cpt_data_for(run: Run, tokenizer, eos_id: int, stops: set[int], knowledge_dir: Path) -> CptData:
    """The recipe's renderings of the knowledge, packed into blocks, and one progress line about them."""
    r, c = run.recipe, run.recipe.cpt
    data = recipe_cpt_data(
        r,
        tokenizer,
        eos_id,
        stops,
        knowledge_dir,
        eval_variants=c.eval_variants,
        max_train_blocks=r.max_train_examples,
        max_eval_blocks=r.max_eval_examples,
    )
    run.progress(
        f"{data.documents} documents, {data.tokens} tokens → {len(data.train.examples)} blocks of "
        f"{c.block_size} (EOS id {eos_id} after each document, every label trained; "
        f"{len(data.eval.examples) if data.eval else 0} held-out blocks)"
    )
    return data


def train_cpt(recipe: Recipe, out: Path, options: RunOptions) -> dict:
    """Train a LoRA on the knowledge blocks, then save base + adapter merged as a model folder.

    The folder holds the merged model (safetensors, config, generation config, tokenizer), the adapter
    under adapter/, and the usual recipe.yaml, data_manifest.json, metrics.json, log_history.json and
    loss.png. `train sft --model <folder>` trains a new, differently shaped LoRA on top of it.
    """
    from peft import get_peft_model

    run = start_run(recipe, out, options)
    progress = run.progress
    knowledge_dir = cpt_knowledge_dir(recipe)
    loaded = load_model(run)
    model, tokenizer = loaded.model, loaded.tokenizer
    eos_id, stops = eos_ids(model, tokenizer)
    data = cpt_data_for(run, tokenizer, eos_id, stops, knowledge_dir)
    untied = False
    if _targets(recipe) & set(EMBEDDING_MODULES):
        untied = untie_embeddings(model)
        if untied:
            progress("untied lm_head from embed_tokens so that the merged model equals the trained one")
    model = kbit_ready(run, model)
    peft_model = get_peft_model(model, lora_config(recipe, model))
    merge = recipe.cpt.merge
    with run.folder() as work:
        trainer = cpt_trainer(run, work, peft_model, data)
        metrics = train_and_evaluate(trainer, progress, evaluate=eval_loss(trainer, progress, "blocks"))
        history = list(trainer.state.log_history)
        # The vocabulary is unchanged, so the adapter needs only the LoRA factors, not copies of the
        # (vocab x hidden) embedding and head that peft saves by default once they are LoRA targets.
        save_adapter(trainer.model, work / ADAPTER_SUBDIR, save_embedding_layers=False)
        merged = trainer.model
        if merge:
            merged = merge_into_base(trainer.model, run, work / ADAPTER_SUBDIR, untied)
            save_merged(merged, work)
            tokenizer.save_pretrained(str(work))
            progress("merged the adapter into the base: the folder is a standalone model")
        manifest = {"knowledge_dir": str(knowledge_dir), "cpt": asdict(recipe.cpt), **data.manifest()}
        metrics.update(
            run.info(loaded.source, tokenizer, eos_id)
            | {
                "train_examples": len(data.train.examples),
                "eval_examples": len(data.eval.examples) if data.eval else 0,
                "label_audit": {"checked": data.audit_checked, "failed": 0},
                "untied_embeddings": untied,
                "merged": bool(merge),
                "adapter": ADAPTER_SUBDIR,
                "init_adapter": None,
                "lineage": None,
            }
        )
        run.finish(work, metrics, history, json.loads(json.dumps(manifest, default=str)))
    saved = f"{'merged model, ' if merge else ''}adapter, recipe, data manifest and metrics"
    return run.done(metrics, saved, merged)
