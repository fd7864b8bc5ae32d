"""RL after SFT: trl GRPO on the SFT prompts, rewarded by the reward model and rule-based persona rewards.

GRPO samples `rl.num_generations` completions per prompt; a completion's advantage is its reward minus the
mean reward of its group (divided by the group's standard deviation unless `rl.scale_rewards: none`). That
group mean is the reward baseline the users found mattered with PPO, without a value model. A KL penalty
(`beta` > 0) keeps the policy near the reference: the frozen copy of the SFT adapter it starts from.
"""

from __future__ import annotations

from pathlib import Path

from rag_persona.errors import RagPersonaError
from training.data.labels import Tokenized, encode_prompt
from training.recipes import Recipe

from .common import (
    Run,
    RunOptions,
    adapter_for_training,
    begin,
    build_trainer,
    common_args,
    require_adapter,
    save_adapter,
    subset,
    train_and_evaluate,
    trained_model,
)
from .records import data_manifest
from .reward import REWARD_HINT, load_trained_reward_model
from .rewards import build_rewards


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


def rewards_for(run: Run, tokenizer, stops: set[int], policy_source: str) -> tuple[list, list[float]]:
    """The recipe's reward callables with a non-zero weight (the reward model loaded if it has one)."""
    r = run.recipe.rl
    reward_model = None
    if float(r.reward_weights.get("reward_model", 0)) != 0:
        reward_model = load_trained_reward_model(
            r.reward_adapter, device=run.mode.device, quantized=run.mode.quantized, progress=run.progress
        )
        if reward_model.tokenizer.get_vocab() != tokenizer.get_vocab():
            raise RagPersonaError(
                f"{r.reward_adapter}: its tokenizer ({reward_model.source}) differs from the policy's "
                f"({policy_source}); the reward model scores the policy's token ids"
            )
        run.progress(f"reward model: {r.reward_adapter} on {reward_model.source}")
    funcs, weights = build_rewards(
        r.reward_weights,
        eos_ids=stops,
        length_target=r.length_target,
        length_tolerance=r.length_tolerance,
        reward_model=reward_model,
        tokenizer=tokenizer,
    )
    run.progress("rewards: " + ", ".join(f"{f.__name__} x{w:g}" for f, w in zip(funcs, weights, strict=True)))
    return funcs, weights


def grpo_trainer(run: Run, work: Path, model, tokenizer, peft_config, prompts: list[dict], funcs, weights):
    """trl's GRPOTrainer with the recipe's rl settings (GRPOConfig names) and our reward callables."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    r = run.recipe
    args = GRPOConfig(
        **common_args(run, work),
        beta=r.beta,
        num_generations=r.rl.num_generations,
        max_completion_length=r.rl.max_completion_length,
        temperature=r.rl.temperature,
        top_p=r.rl.top_p,
        scale_rewards=r.rl.scale_rewards,
        loss_type=r.rl.loss_type,
        reward_weights=weights,
        log_completions=False,
    )
    return build_trainer(
        GRPOTrainer,
        run,
        model=model,
        args=args,
        train_dataset=Dataset.from_list(prompts),
        reward_funcs=funcs,
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def train_rl(recipe: Recipe, out: Path, options: RunOptions) -> dict:
    """GRPO from the SFT adapter (init_adapter) or a fresh LoRA; saves the adapter with provenance."""
    r = recipe.rl
    use_rm = float(r.reward_weights.get("reward_model", 0)) != 0
    if use_rm:
        require_adapter(
            r.reward_adapter or "",
            f"recipe field 'rl.reward_adapter'; {REWARD_HINT}",
            "a reward adapter folder",
        )
    if recipe.init_adapter:
        require_adapter(recipe.init_adapter, "train the SFT stage first")
    run, data, loaded, eos_id, stops = begin(recipe, out, options)
    progress = run.progress
    model, tokenizer = loaded.model, loaded.tokenizer
    max_prompt = recipe.max_length - r.max_completion_length
    prompts, prompt_info = load_prompts(
        subset(data.train_rows, recipe.max_train_examples, recipe.seed), tokenizer, max_prompt
    )
    if not prompts:
        raise RagPersonaError(
            f"{data.train_path}: no prompt fits max_length {recipe.max_length} - completion"
        )
    eval_prompts = []
    if data.eval_rows:
        eval_prompts, _ = load_prompts(
            subset(data.eval_rows, recipe.max_eval_examples, recipe.seed), tokenizer, max_prompt
        )
    funcs, weights = rewards_for(run, tokenizer, stops, loaded.source)
    model, peft_config, from_adapter = adapter_for_training(
        run,
        model,
        reference="KL reference",
        fresh="fresh LoRA on the base (the base with adapters off is the KL reference)",
    )

    def greedy(policy) -> dict:
        return greedy_rewards(policy, tokenizer, eval_prompts, funcs, weights, r.max_completion_length, stops)

    metrics: dict = {}
    if eval_prompts:
        progress(f"greedy rewards on {len(eval_prompts)} held-out prompts before training")
        metrics["eval_before"] = greedy(model)
    with run.folder() as work:
        trainer = grpo_trainer(run, work, model, tokenizer, peft_config, prompts, funcs, weights)
        metrics.update(train_and_evaluate(trainer, progress))
        history = list(trainer.state.log_history)
        policy = trained_model(trainer)
        if eval_prompts:
            progress("greedy rewards on the held-out prompts after training")
            metrics["eval_after"] = greedy(policy)
        save_adapter(policy, work)
        logged = [h for h in history if "reward" in h]
        metrics["reward_first_step"] = logged[0]["reward"] if logged else None
        metrics["reward_last_step"] = logged[-1]["reward"] if logged else None
        manifest = data_manifest(data.train_path, None, prompt_info, None, data.totals())
        manifest["eval_prompts"] = len(eval_prompts)
        metrics.update(
            run.info(loaded.source, tokenizer, eos_id)
            | {
                "train_examples": len(prompts),
                "eval_examples": len(eval_prompts),
                "rewards": {f.__name__: w for f, w in zip(funcs, weights, strict=True)},
                "baseline": f"group mean of {r.num_generations} completions per prompt (scale: {r.scale_rewards})",
                "reward_adapter": r.reward_adapter if use_rm else None,
                "init_adapter": recipe.init_adapter,
                "lineage": from_adapter,
            }
        )
        run.finish(work, metrics, history, manifest, second=("reward", "mean reward (weighted sum)"))
    return run.done(metrics, "RL adapter, recipe, data manifest, metrics and reward curve", policy)
