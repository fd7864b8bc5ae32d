"""Reward model: a one-logit sequence classifier on the DPO pairs (trl RewardTrainer), LoRA + a trained score head."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rag_persona.errors import RagPersonaError
from training.data.labels import Tokenized, resolve_eos_id, stop_ids
from training.recipes import Recipe

from .common import (
    RunOptions,
    audit_summary,
    build_trainer,
    common_args,
    kbit_ready,
    read_recipe_data,
    require_adapter,
    save_adapter,
    saved_generation_eos_ids,
    start_run,
    tokenized_examples,
    train_and_evaluate,
)
from .lora import lora_config
from .records import clean, data_manifest

REWARD_HINT = "train one with `rag-persona train reward`"

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
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    from rag_persona.generation import from_pretrained_kwargs, resolve_model_path

    source = resolve_model_path(base, progress=progress)
    kwargs = from_pretrained_kwargs(quantized, device) | {"num_labels": 1}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        with suppress_seqcls_warning():  # the score head is new; the base's lm_head is not used
            model = AutoModelForSequenceClassification.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise RagPersonaError(f"model {source}: cannot load ({str(exc).splitlines()[0]})") from exc
    if not quantized:
        model.to(device)
    gen = saved_generation_eos_ids(source)
    eos_id = resolve_eos_id(tokenizer, gen)
    tokenizer.pad_token = reward_pad_token(tokenizer, eos_id)
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    if adapter is not None:
        from peft import PeftModel

        adapter = require_adapter(adapter, REWARD_HINT, "a reward adapter folder")
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    eos_ids = stop_ids(tokenizer, gen) | {eos_id}
    return RewardModel(model, tokenizer, source, int(tokenizer.pad_token_id), eos_id, eos_ids)


def load_trained_reward_model(
    folder: str | Path, *, device: str = "cpu", quantized: bool = False, progress=print
) -> RewardModel:
    """A `train reward` output folder: its base model (from metrics.json) with its adapter."""
    folder = require_adapter(folder, REWARD_HINT, "a reward adapter folder")
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


@functools.cache
def reward_trainer_class():
    """trl's RewardTrainer, refusing anything but the `chosen_ids` + `rejected_ids` built by our labels."""
    from trl import RewardTrainer

    class EosSafeRewardTrainer(RewardTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            cols = set(dataset.column_names or [])
            if not {"chosen_ids", "rejected_ids"} <= cols:
                raise RagPersonaError(
                    f"reward {dataset_name} data: pre-tokenised chosen_ids + rejected_ids required "
                    "(training.data.labels); raw text would take trl's string-EOS path"
                )
            return dataset

    return EosSafeRewardTrainer


def pair_evaluation(trainer, columns: dict, pad_id: int, batch_size: int, progress) -> Callable[[str], dict]:
    """Held-out pair accuracy (heldout_before/after) and trainer loss (eval_before/after) around training."""

    def heldout(when: str) -> dict:
        accuracy = pairwise_accuracy(trainer.model, columns, pad_id, batch_size)
        progress(f"held-out pair accuracy {when} training: {accuracy['accuracy']}")
        return {f"heldout_{when}": accuracy}

    def evaluate(when: str) -> dict:
        # After training the model is still in train mode (LoRA dropout on) until evaluate() switches it
        # off, so the loss comes first there; before, the model is still as loaded, in eval mode.
        if when == "before":
            return heldout(when) | {"eval_before": clean(trainer.evaluate())}
        return {"eval_after": clean(trainer.evaluate())} | heldout(when)

    return evaluate


def train_reward(recipe: Recipe, out: Path, options: RunOptions) -> dict:
    """Train the reward model on DPO pairs; metrics hold held-out pair accuracy before and after."""
    from datasets import Dataset
    from peft import get_peft_model
    from trl import RewardConfig

    run = start_run(recipe, out, options)
    progress = run.progress
    data = read_recipe_data(recipe)
    rm = load_reward_model(
        recipe.base_model, device=run.mode.device, quantized=run.mode.quantized, progress=progress
    )
    tokenizer = rm.tokenizer
    progress(
        f"EOS appended as token id {rm.eos_id} ({tokenizer.convert_ids_to_tokens(rm.eos_id)!r}); batches padded "
        f"with {tokenizer.pad_token!r} (id {rm.pad_id}); the score is read at the last real token"
    )
    ex = tokenized_examples(run, tokenizer, data, rm.eos_id, rm.eos_ids, kind="dpo", unit="pair")
    progress(
        f"{len(ex.train.examples)} training pairs; labels audited: every completion ends in EOS id {rm.eos_id}"
    )
    model = kbit_ready(run, rm.model)
    # The score head is new (random): it is trained whole, next to the LoRA on the decoder.
    model = get_peft_model(
        model, lora_config(recipe, model, task_type="SEQ_CLS", modules_to_save=[SCORE_HEAD])
    )
    fp32_score_head(model)
    eval_cols = pair_columns(ex.eval) if ex.eval and ex.eval.examples else None
    with run.folder() as work:
        trainer = build_trainer(
            reward_trainer_class(),
            run,
            model=model,
            args=RewardConfig(**common_args(run, work), max_length=None),
            train_dataset=Dataset.from_dict(pair_columns(ex.train)),
            eval_dataset=Dataset.from_dict(eval_cols) if eval_cols else None,
            processing_class=tokenizer,
        )
        evaluate = None
        if eval_cols:
            evaluate = pair_evaluation(
                trainer, eval_cols, rm.pad_id, recipe.per_device_train_batch_size, progress
            )
        metrics = train_and_evaluate(trainer, progress, evaluate=evaluate, note=" (LoRA + score head)")
        history = list(trainer.state.log_history)
        save_adapter(trainer.model, work)
        manifest = data_manifest(data.train_path, data.eval_path, ex.train, ex.eval, data.totals())
        metrics.update(
            run.info(rm.source, tokenizer, rm.eos_id)
            | {
                "train_examples": len(ex.train.examples),
                "eval_examples": len(ex.eval.examples) if ex.eval else 0,
                "label_audit": audit_summary(ex.audit),
                "pad_token": tokenizer.pad_token,
                "pad_id": rm.pad_id,
                "init_adapter": None,
                "lineage": None,
            }
        )
        run.finish(work, metrics, history, manifest, second=("accuracy", "pair accuracy (train batch)"))
    metrics = run.done(
        metrics, "reward adapter (LoRA + score head), recipe, data manifest and metrics", trainer.model
    )
    if run.keep_model:
        metrics["pad_id"] = rm.pad_id
    return metrics
