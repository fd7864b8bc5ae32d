"""Reward model: a one-logit sequence classifier on the DPO pairs (trl RewardTrainer), LoRA + a trained score head."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rag_persona.errors import RagPersonaError

from .labels import Tokenized, audit_tokenized, require_clean, tokenize_rows
from .trainers import (
    Recipe,
    _clean,
    _data_manifest,
    _ensure_parent,
    _progress_callback,
    _start,
    _subset,
    common_args,
    finish_run,
    lora_config,
    quiet_printer,
    read_recipe_data,
    run_info,
    save_adapter,
)

SCORE_HEAD = "score"


@dataclass
class RewardModel:
    """A loaded reward model and the ids it needs to read a right-padded batch."""

    model: object
    tokenizer: object
    source: str
    pad_id: int
    eos_id: int
    eos_ids: set[int]


def reward_pad_token(tokenizer, eos_id: int) -> str:
    """A padding token that is not the appended EOS.

    The classifier reads its score at the rightmost token that is not the pad id. If the pad were the EOS
    id, that would be the token *before* the EOS, and a reply that stopped could not be told from one that
    ran into the token limit. Qwen2 tokenizers already pad with <|endoftext|> and end turns with <|im_end|>.
    """
    pad = tokenizer.pad_token
    if pad is not None and tokenizer.pad_token_id != eos_id:
        return pad
    for candidate in (
        "<|endoftext|>",
        tokenizer.unk_token,
        tokenizer.bos_token,
        *tokenizer.all_special_tokens,
    ):
        if (
            candidate
            and candidate in tokenizer.get_vocab()
            and tokenizer.convert_tokens_to_ids(candidate) != eos_id
        ):
            return candidate
    raise RagPersonaError(
        f"tokenizer {tokenizer.name_or_path!r}: no special token other than the EOS to pad reward batches with"
    )


def load_reward_model(
    base: str,
    *,
    adapter: str | Path | None = None,
    device: str = "cpu",
    quantized: bool = False,
    progress: Callable[[str], None] = print,
) -> RewardModel:
    """The base as AutoModelForSequenceClassification (num_labels=1, safetensors, no remote code) + adapter."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    from rag_persona.generation import from_pretrained_kwargs, resolve_model_path

    from .labels import resolve_eos_id, stop_ids

    source = resolve_model_path(base, progress=progress)
    kwargs = from_pretrained_kwargs(quantized) | {"num_labels": 1}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        with suppress_seqcls_warning():  # the score head is new; the base's lm_head is not used
            model = AutoModelForSequenceClassification.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise RagPersonaError(f"model {source}: cannot load ({str(exc).splitlines()[0]})") from exc
    if not quantized:
        model.to(device)
    try:
        gen = GenerationConfig.from_pretrained(source).eos_token_id
    except OSError:
        gen = None
    gen = list(gen) if isinstance(gen, list | tuple) else ([gen] if gen is not None else [])
    eos_id = resolve_eos_id(tokenizer, gen)
    tokenizer.pad_token = reward_pad_token(tokenizer, eos_id)
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    if adapter is not None:
        from peft import PeftModel

        adapter = Path(adapter)
        if not (adapter / "adapter_config.json").is_file():
            raise RagPersonaError(
                f"{adapter}: not a reward adapter folder (no adapter_config.json); train one with "
                "`rag-persona train reward`"
            )
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    eos_ids = stop_ids(tokenizer, gen) | {eos_id}
    return RewardModel(model, tokenizer, source, int(tokenizer.pad_token_id), eos_id, eos_ids)


def load_trained_reward_model(
    folder: str | Path, *, device: str = "cpu", quantized: bool = False, progress=print
) -> RewardModel:
    """A `train reward` output folder: its base model (from metrics.json) with its adapter."""
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise RagPersonaError(
            f"{folder}: not a reward adapter folder (no adapter_config.json); train one with "
            "`rag-persona train reward`"
        )
    metrics_path = folder / "metrics.json"
    base = None
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        if metrics.get("stage") not in (None, "reward"):
            raise RagPersonaError(f"{folder}: a {metrics.get('stage')} run, not a reward model")
        base = metrics.get("base_model")
    if base is None:
        base = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get(
            "base_model_name_or_path"
        )
    return load_reward_model(base, adapter=folder, device=device, quantized=quantized, progress=progress)


def score_ids(model, sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int = 8) -> list[float]:
    """The reward of each token sequence (prompt ids + completion ids, EOS included when it stopped)."""
    import torch

    device = next(model.parameters()).device
    scores: list[float] = []
    for i in range(0, len(sequences), batch_size):
        batch = [list(s) for s in sequences[i : i + batch_size]]
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        scores += logits[:, 0].float().cpu().tolist()
    return scores


def pair_columns(data: Tokenized) -> dict[str, list[list[int]]]:
    """DPO examples → RewardTrainer columns: prompt ids + each completion (which ends in the EOS id)."""
    return {
        "chosen_ids": [ex.prompt_ids + ex.chosen_ids for ex in data.examples],
        "rejected_ids": [ex.prompt_ids + ex.rejected_ids for ex in data.examples],
    }


def pairwise_accuracy(model, columns: dict, pad_id: int, batch_size: int = 8) -> dict:
    """Share of pairs whose chosen sequence scores above its rejected one, and the mean margin."""
    chosen = score_ids(model, columns["chosen_ids"], pad_id, batch_size)
    rejected = score_ids(model, columns["rejected_ids"], pad_id, batch_size)
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    n = len(margins)
    return {
        "pairs": n,
        "accuracy": round(sum(m > 0 for m in margins) / n, 4) if n else None,
        "mean_margin": round(sum(margins) / n, 4) if n else None,
    }


def fp32_score_head(peft_model) -> None:
    """Keep the trained copy of the score head in float32 on a bf16 base.

    One bf16 weight near 0.02 moves in steps of about 1e-4, so Adam updates at ordinary learning rates
    would round away; the head's input is cast up to match (a hook), its output is a float32 reward.
    """
    for name, module in peft_model.named_modules():
        if name.endswith(f"{SCORE_HEAD}.modules_to_save.default"):
            module.float()
            module.register_forward_pre_hook(lambda mod, args: (args[0].to(mod.weight.dtype), *args[1:]))


def _trainer_class():
    from trl import RewardTrainer

    class EosSafeRewardTrainer(RewardTrainer):
        """RewardTrainer that only accepts `chosen_ids` + `rejected_ids` built by training.labels."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            cols = set(dataset.column_names or [])
            if not {"chosen_ids", "rejected_ids"} <= cols:
                raise RagPersonaError(
                    f"reward {dataset_name} data: pre-tokenised chosen_ids + rejected_ids required "
                    "(training.labels); raw text would take trl's string-EOS path"
                )
            return dataset

    return EosSafeRewardTrainer


def train_reward(
    recipe: Recipe,
    out: str | Path | None = None,
    *,
    progress: Callable[[str], None] = print,
    cuda: bool | None = None,
    keep_model: bool = False,
) -> dict:
    """Train the reward model on DPO pairs; metrics hold held-out pair accuracy before and after."""
    from datasets import Dataset

    started = time.time()
    out = Path(out or recipe.output_dir or f"runs/{recipe.name}")
    mode, load = _start(recipe, cuda, progress)
    train_path, eval_path, train_rows, eval_rows = read_recipe_data(recipe)

    rm = load_reward_model(recipe.base_model, device=mode.device, quantized=mode.quantized, progress=progress)
    model, tokenizer = rm.model, rm.tokenizer
    eos_id, eos_ids = rm.eos_id, rm.eos_ids
    progress(
        f"EOS appended as token id {eos_id} ({tokenizer.convert_ids_to_tokens(eos_id)!r}); batches padded with "
        f"{tokenizer.pad_token!r} (id {rm.pad_id}); the score is read at the last real token"
    )
    train_data = tokenize_rows(
        tokenizer,
        _subset(train_rows, recipe.max_train_examples, recipe.seed),
        eos_id,
        kind="dpo",
        max_length=recipe.max_length,
    )
    if not train_data.examples:
        raise RagPersonaError(f"{train_path}: no pair fits max_length {recipe.max_length}")
    eval_data = None
    if eval_rows:
        eval_data = tokenize_rows(
            tokenizer,
            _subset(eval_rows, recipe.max_eval_examples, recipe.seed),
            eos_id,
            kind="dpo",
            max_length=recipe.max_length,
        )
    audit = audit_tokenized(tokenizer, train_data, eos_ids)
    require_clean(audit, "training")
    if eval_data:
        require_clean(audit_tokenized(tokenizer, eval_data, eos_ids), "eval")
    progress(
        f"{len(train_data.examples)} training pairs; labels audited: every completion ends in EOS id {eos_id}"
    )

    if mode.quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    # The score head is new (random): it is trained whole, next to the LoRA on the decoder.
    from peft import get_peft_model

    model = get_peft_model(
        model, lora_config(recipe, model, task_type="SEQ_CLS", modules_to_save=[SCORE_HEAD])
    )
    fp32_score_head(model)

    from trl import RewardConfig

    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=_ensure_parent(out)))
    try:
        args = RewardConfig(**common_args(recipe, mode, work), max_length=None)
        train_cols = pair_columns(train_data)
        eval_cols = pair_columns(eval_data) if eval_data and eval_data.examples else None
        trainer = _trainer_class()(
            model=model,
            args=args,
            train_dataset=Dataset.from_dict(train_cols),
            eval_dataset=Dataset.from_dict(eval_cols) if eval_cols else None,
            processing_class=tokenizer,
            callbacks=[_progress_callback(progress)],
        )
        quiet_printer(trainer)
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        progress(f"trainable parameters: {trainable:,} (LoRA + score head)")
        metrics: dict = {"trainable_parameters": trainable}
        if eval_cols:
            metrics["heldout_before"] = pairwise_accuracy(
                trainer.model, eval_cols, rm.pad_id, recipe.batch_size
            )
            metrics["eval_before"] = _clean(trainer.evaluate())
            progress(f"held-out pair accuracy before training: {metrics['heldout_before']['accuracy']}")
        result = trainer.train()
        metrics["train"] = _clean(result.metrics)
        metrics["train_loss"] = result.training_loss
        metrics["steps"] = trainer.state.global_step
        if eval_cols:
            metrics["eval_after"] = _clean(trainer.evaluate())
            metrics["heldout_after"] = pairwise_accuracy(
                trainer.model, eval_cols, rm.pad_id, recipe.batch_size
            )
            progress(f"held-out pair accuracy after training: {metrics['heldout_after']['accuracy']}")
        history = list(trainer.state.log_history)
        save_adapter(trainer.model, work)
        totals = {"train": len(train_rows), "eval": len(eval_rows) if eval_rows else 0}
        manifest = _data_manifest(recipe, train_path, eval_path, train_data, eval_data, totals)
        metrics.update(
            run_info(recipe, mode, rm.source, tokenizer, eos_id, started, load)
            | {
                "train_examples": len(train_data.examples),
                "eval_examples": len(eval_data.examples) if eval_data else 0,
                "label_audit": {"checked": len(audit), "failed": sum(not r.ok for r in audit)},
                "pad_token": tokenizer.pad_token,
                "pad_id": rm.pad_id,
                "init_adapter": None,
                "lineage": None,
            }
        )
        metrics["seconds"] = round(time.time() - started, 1)
        finish_run(
            work, out, recipe, metrics, history, manifest, second=("accuracy", "pair accuracy (train batch)")
        )
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    progress(f"saved reward adapter (LoRA + score head), recipe, data manifest and metrics to {out}")
    metrics["output"] = str(out)
    if keep_model:
        metrics["model"] = trainer.model
        metrics["pad_id"] = rm.pad_id
    return metrics
