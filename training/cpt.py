"""Continued pre-training: LoRA next-token training on the knowledge, merged into a standalone base model."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from rag_persona.errors import RagPersonaError

from .cpt_data import build_cpt_data
from .trainers import (
    Recipe,
    _ensure_parent,
    _progress_callback,
    _start,
    common_args,
    eos_ids_of,
    finish_run,
    lora_config,
    quiet_printer,
    run_info,
    save_adapter,
    train_and_evaluate,
)

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


def merge_into_base(peft_model, recipe: Recipe, mode, adapter_dir: Path, untied: bool, progress):
    """The base model with the trained LoRA added into its weights.

    A bf16 base is merged in place. A 4-bit base cannot hold the sum, so the base is loaded again in bf16
    on the CPU (GPU memory still holds the 4-bit one; 7B in bf16 is ~16 GB) and the saved adapter applied.
    """
    if not mode.quantized:
        return peft_model.merge_and_unload()
    from peft import PeftModel

    from rag_persona.generation import load_causal_lm

    progress("reloading the base in bf16 on the CPU to merge the adapter (a 4-bit base cannot hold the sum)")
    base = load_causal_lm(recipe.base_model, device="cpu", progress=progress).model
    if untied:
        untie_embeddings(base)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def _run_cpt_trainer(recipe: Recipe, mode, model, peft_config, data, work: Path, progress) -> dict:
    """Plain next-token training with transformers' Trainer: the model's own loss over every label.

    trl's SFTTrainer computes log-probabilities from lm_head.weight directly (a fused head) and refuses a
    LoRA on lm_head, which the users' CPT recipe trains; blocks of equal length need nothing else of trl.
    """
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments, default_data_collator

    model = get_peft_model(model, peft_config)
    args = TrainingArguments(**common_args(recipe, mode, work), label_names=["labels"])
    train_ds = Dataset.from_dict(data.train.columns())
    eval_ds = Dataset.from_dict(data.eval.columns()) if data.eval else None
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=default_data_collator,
        callbacks=[_progress_callback(progress)],
    )
    quiet_printer(trainer)
    metrics = train_and_evaluate(trainer, eval_ds is not None, progress, what="blocks")
    metrics["_model"] = trainer.model
    metrics["_history"] = list(trainer.state.log_history)
    return metrics


def train_cpt(
    recipe: Recipe,
    out: str | Path | None = None,
    *,
    progress: Callable[[str], None] = print,
    cuda: bool | None = None,
    keep_model: bool = False,
) -> dict:
    """Train a LoRA on the knowledge blocks, then save base + adapter merged as a model folder.

    The folder holds the merged model (safetensors, config, generation config, tokenizer), the adapter
    under adapter/, and the usual recipe.yaml, data_manifest.json, metrics.json, log_history.json and
    loss.png. `train sft --model <folder>` trains a new, differently shaped LoRA on top of it.
    """
    from rag_persona.generation import load_causal_lm
    from rag_persona.settings import KNOWLEDGE_ROOT

    started = time.time()
    out = Path(out or recipe.output_dir or f"runs/{recipe.name}")
    mode, load = _start(recipe, cuda, progress)
    knowledge_dir = Path(recipe.cpt.knowledge_dir or KNOWLEDGE_ROOT / recipe.persona)
    if not knowledge_dir.is_dir():
        raise RagPersonaError(
            f"{knowledge_dir}: knowledge folder not found (recipe field 'cpt.knowledge_dir')"
        )

    loaded = load_causal_lm(
        recipe.base_model, load_in_4bit=mode.quantized, device=mode.device, progress=progress
    )
    model, tokenizer = loaded.model, loaded.tokenizer
    eos_id, eos_ids = eos_ids_of(model, tokenizer)
    c = recipe.cpt
    data = build_cpt_data(
        tokenizer,
        eos_id,
        eos_ids,
        knowledge_dir=knowledge_dir,
        block_size=c.block_size,
        variants=c.variants,
        eval_variants=c.eval_variants,
        formats=c.formats,
        facts_per_paragraph=c.facts_per_paragraph,
        seed=recipe.seed,
        max_train_blocks=recipe.max_train_examples,
        max_eval_blocks=recipe.max_eval_examples,
    )
    progress(
        f"{data.documents} documents, {data.tokens} tokens → {len(data.train.examples)} blocks of "
        f"{c.block_size} (EOS id {eos_id} after each document, every label trained; "
        f"{len(data.eval.examples) if data.eval else 0} held-out blocks)"
    )

    untied = False
    if _targets(recipe) & set(EMBEDDING_MODULES):
        untied = untie_embeddings(model)
        if untied:
            progress("untied lm_head from embed_tokens so that the merged model equals the trained one")
    if mode.quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    peft_config = lora_config(recipe, model)

    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=_ensure_parent(out)))
    try:
        metrics = _run_cpt_trainer(recipe, mode, model, peft_config, data, work, progress)
        peft_model = metrics.pop("_model")
        history = metrics.pop("_history")
        # The vocabulary is unchanged, so the adapter needs only the LoRA factors, not copies of the
        # (vocab x hidden) embedding and head that peft saves by default once they are LoRA targets.
        save_adapter(peft_model, work / ADAPTER_SUBDIR, save_embedding_layers=False)
        if c.merge:
            merged = merge_into_base(peft_model, recipe, mode, work / ADAPTER_SUBDIR, untied, progress)
            merged.save_pretrained(str(work), safe_serialization=True)
            tokenizer.save_pretrained(str(work))
            progress("merged the adapter into the base: the folder is a standalone model")
        else:
            merged = peft_model
        manifest = {"knowledge_dir": str(knowledge_dir), "cpt": asdict(c), **data.manifest()}
        metrics.update(
            run_info(recipe, mode, loaded.source, tokenizer, eos_id, started, load)
            | {
                "train_examples": len(data.train.examples),
                "eval_examples": len(data.eval.examples) if data.eval else 0,
                "label_audit": {"checked": data.audit_checked, "failed": 0},
                "untied_embeddings": untied,
                "merged": bool(c.merge),
                "adapter": ADAPTER_SUBDIR,
                "init_adapter": None,
                "lineage": None,
            }
        )
        metrics["seconds"] = round(time.time() - started, 1)
        finish_run(work, out, recipe, metrics, history, json.loads(json.dumps(manifest, default=str)))
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    progress(
        f"saved {'merged model, ' if c.merge else ''}adapter, recipe, data manifest and metrics to {out}"
    )
    metrics["output"] = str(out)
    if keep_model:
        metrics["model"] = merged
    return metrics
