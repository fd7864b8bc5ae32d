"""RL after SFT: trl GRPO on the SFT prompts, rewarded by the reward model and rule-based persona rewards.

GRPO samples `rl.num_generations` completions per prompt; a completion's advantage is its reward minus the
mean reward of its group (divided by the group's standard deviation unless `rl.scale_rewards: none`). That
group mean is the reward baseline the users found mattered with PPO, without a value model. A KL penalty
(`beta` > 0) keeps the policy near the reference: the frozen copy of the SFT adapter it starts from.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rag_persona.errors import RagPersonaError

from .labels import Tokenized, encode_prompt
from .rewards import build_rewards
from .trainers import (
    Recipe,
    _clean,
    _data_manifest,
    _ensure_parent,
    _lineage,
    _progress_callback,
    _start,
    _subset,
    common_args,
    eos_ids_of,
    finish_run,
    lora_config,
    quiet_printer,
    read_recipe_data,
    run_info,
    save_adapter,
)


def load_prompts(rows, tokenizer, max_prompt_tokens: int) -> tuple[list[dict], Tokenized]:
    """Prompt messages of SFT (or DPO) rows; prompts longer than max_prompt_tokens are dropped, not cut."""
    kept, info = [], Tokenized(kind="rl", examples=[], sources=[])
    for where, row in rows:
        prompt = row.get("prompt")
        if not isinstance(prompt, list) or not prompt:
            raise RagPersonaError(f"{where}: field 'prompt': expected a non-empty list of chat messages")
        ids = encode_prompt(tokenizer, prompt, where)
        if len(ids) > max_prompt_tokens:
            info.dropped_too_long.append(where)
            continue
        kept.append({"prompt": prompt})
        info.examples.append(ids)
        info.sources.append(where)
    return kept, info


def greedy_rewards(
    model, tokenizer, prompts: list[dict], funcs, weights, max_new_tokens: int, eos_ids
) -> dict:
    """Mean of each reward (and of the weighted sum) over greedy completions of held-out prompts."""
    import torch

    device = next(model.parameters()).device
    completions, ids_list = [], []
    for p in prompts:
        ids = torch.tensor([encode_prompt(tokenizer, p["prompt"], "RL eval prompt")], device=device)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=sorted(eos_ids),
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[0, ids.shape[1] :].tolist()
        stop = next((i for i, t in enumerate(new) if t in eos_ids), None)
        new = new if stop is None else new[: stop + 1]  # as trl hands completions to reward functions
        ids_list.append(new)
        completions.append(
            [{"role": "assistant", "content": tokenizer.decode(new, skip_special_tokens=True)}]
        )
    prompt_msgs = [p["prompt"] for p in prompts]
    result, total = {}, [0.0] * len(prompts)
    for f, w in zip(funcs, weights, strict=True):
        values = f(prompt_msgs, completions, completion_ids=ids_list)
        result[f.__name__] = round(sum(values) / len(values), 4)
        total = [t + w * v for t, v in zip(total, values, strict=True)]
    result["weighted_sum"] = round(sum(total) / len(total), 4)
    result["examples"] = [c[0]["content"] for c in completions[:4]]
    return result


def train_rl(
    recipe: Recipe,
    out: str | Path | None = None,
    *,
    progress: Callable[[str], None] = print,
    cuda: bool | None = None,
    keep_model: bool = False,
) -> dict:
    """GRPO from the SFT adapter (init_adapter) or a fresh LoRA; saves the adapter with provenance."""
    from datasets import Dataset
    from trl import GRPOConfig

    from rag_persona.generation import load_causal_lm

    from .reward_model import load_trained_reward_model

    started = time.time()
    out = Path(out or recipe.output_dir or f"runs/{recipe.name}")
    r = recipe.rl
    use_rm = float(r.reward_weights.get("reward_model", 0)) != 0
    if use_rm and not (Path(r.reward_adapter or "") / "adapter_config.json").is_file():
        raise RagPersonaError(
            f"{r.reward_adapter}: not a reward adapter folder (no adapter_config.json; recipe field "
            "'rl.reward_adapter'); train one with `rag-persona train reward`"
        )
    if recipe.init_adapter and not (Path(recipe.init_adapter) / "adapter_config.json").is_file():
        raise RagPersonaError(
            f"{recipe.init_adapter}: not an adapter folder (no adapter_config.json); train the SFT stage first"
        )
    mode, load = _start(recipe, cuda, progress)
    train_path, eval_path, train_rows, eval_rows = read_recipe_data(recipe)

    loaded = load_causal_lm(
        recipe.base_model, load_in_4bit=mode.quantized, device=mode.device, progress=progress
    )
    model, tokenizer = loaded.model, loaded.tokenizer
    eos_id, eos_ids = eos_ids_of(model, tokenizer)
    max_prompt = recipe.max_length - r.max_completion_length
    prompts, prompt_info = load_prompts(
        _subset(train_rows, recipe.max_train_examples, recipe.seed), tokenizer, max_prompt
    )
    if not prompts:
        raise RagPersonaError(f"{train_path}: no prompt fits max_length {recipe.max_length} - completion")
    eval_prompts = []
    if eval_rows:
        eval_prompts, _ = load_prompts(
            _subset(eval_rows, recipe.max_eval_examples, recipe.seed), tokenizer, max_prompt
        )

    reward_model = None
    if use_rm:
        reward_model = load_trained_reward_model(
            r.reward_adapter, device=mode.device, quantized=mode.quantized, progress=progress
        )
        if reward_model.tokenizer.get_vocab() != tokenizer.get_vocab():
            raise RagPersonaError(
                f"{r.reward_adapter}: its tokenizer ({reward_model.source}) differs from the policy's "
                f"({loaded.source}); the reward model scores the policy's token ids"
            )
        progress(f"reward model: {r.reward_adapter} on {reward_model.source}")
    funcs, weights = build_rewards(
        r.reward_weights,
        eos_ids=eos_ids,
        length_target=r.length_target,
        length_tolerance=r.length_tolerance,
        reward_model=reward_model,
        tokenizer=tokenizer,
    )
    progress("rewards: " + ", ".join(f"{f.__name__} x{w:g}" for f, w in zip(funcs, weights, strict=True)))

    peft_config, lineage = None, None
    if mode.quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    if recipe.init_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, recipe.init_adapter, is_trainable=True)
        lineage = _lineage(Path(recipe.init_adapter))
        progress(f"continuing adapter {recipe.init_adapter} (its frozen copy is the KL reference)")
    else:
        peft_config = lora_config(recipe, model)
        progress("fresh LoRA on the base (the base with adapters off is the KL reference)")

    metrics: dict = {}
    if eval_prompts:
        progress(f"greedy rewards on {len(eval_prompts)} held-out prompts before training")
        metrics["eval_before"] = greedy_rewards(
            model, tokenizer, eval_prompts, funcs, weights, r.max_completion_length, eos_ids
        )

    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=_ensure_parent(out)))
    try:
        args = GRPOConfig(
            **common_args(recipe, mode, work),
            beta=recipe.beta,
            num_generations=r.num_generations,
            max_completion_length=r.max_completion_length,
            temperature=r.temperature,
            top_p=r.top_p,
            scale_rewards=r.scale_rewards,
            loss_type=r.loss_type,
            reward_weights=weights,
            log_completions=False,
        )
        from trl import GRPOTrainer

        trainer = GRPOTrainer(
            model=model,
            reward_funcs=funcs,
            args=args,
            train_dataset=Dataset.from_list(prompts),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[_progress_callback(progress)],
        )
        quiet_printer(trainer)
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        progress(f"trainable parameters: {trainable:,}")
        metrics["trainable_parameters"] = trainable
        result = trainer.train()
        metrics["train"] = _clean(result.metrics)
        metrics["train_loss"] = result.training_loss
        metrics["steps"] = trainer.state.global_step
        history = list(trainer.state.log_history)
        policy = trainer.model
        if hasattr(policy, "peft_config") and "ref" in policy.peft_config:
            policy.set_adapter("default")
        if eval_prompts:
            progress("greedy rewards on the held-out prompts after training")
            metrics["eval_after"] = greedy_rewards(
                policy, tokenizer, eval_prompts, funcs, weights, r.max_completion_length, eos_ids
            )
        save_adapter(policy, work)
        logged = [h for h in history if "reward" in h]
        metrics["reward_first_step"] = logged[0]["reward"] if logged else None
        metrics["reward_last_step"] = logged[-1]["reward"] if logged else None
        totals = {"train": len(train_rows), "eval": len(eval_rows) if eval_rows else 0}
        manifest = _data_manifest(recipe, train_path, None, prompt_info, None, totals)
        manifest["eval_prompts"] = len(eval_prompts)
        metrics.update(
            run_info(recipe, mode, loaded.source, tokenizer, eos_id, started, load)
            | {
                "train_examples": len(prompts),
                "eval_examples": len(eval_prompts),
                "rewards": {f.__name__: w for f, w in zip(funcs, weights, strict=True)},
                "baseline": f"group mean of {r.num_generations} completions per prompt (scale: {r.scale_rewards})",
                "reward_adapter": r.reward_adapter if use_rm else None,
                "init_adapter": recipe.init_adapter,
                "lineage": lineage,
            }
        )
        metrics["seconds"] = round(time.time() - started, 1)
        finish_run(
            work, out, recipe, metrics, history, manifest, second=("reward", "mean reward (weighted sum)")
        )
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    progress(f"saved RL adapter, recipe, data manifest, metrics and reward curve to {out}")
    metrics["output"] = str(out)
    if keep_model:
        metrics["model"] = policy
    return metrics
