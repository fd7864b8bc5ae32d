"""RL rewards in trl's reward-function form: length, EOS, お嬢様 style, and the reward model's score.

Each reward is a callable `f(prompts, completions, completion_ids, **kwargs) -> list[float]`, named by its
`__name__` (trl logs `rewards/<name>/mean`). GRPO sums them with the recipe's weights and subtracts the
mean of each prompt's group of completions: the group mean is the baseline, so only how a completion
compares with its siblings moves the policy, and constant offsets in a reward do not matter.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from rag_persona.evaluation.metrics import char_length, is_ojousama, leaked_special_text
from training.data.labels import encode_prompt

from .reward import score_ids


def completion_text(completion) -> str:
    """The text of a completion: a string, or (conversational prompts) a list of assistant messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(m.get("content") or "" for m in completion if isinstance(m, dict))
    return str(completion)


def length_score(text: str, target: int = 30, tolerance: int = 15) -> float:
    """1 at `target` characters, 0 at target ± tolerance (15 and 45 by default), down to -1 further out."""
    return max(-1.0, 1.0 - abs(char_length(text) - target) / tolerance)


def eos_score(completion_ids: Sequence[int] | None, eos_ids: Iterable[int], text: str = "") -> float:
    """+1 when the completion's last token is an EOS id and no special-token text was printed, else -1.

    trl cuts each completion after its first EOS, so the last id is the EOS exactly when the model stopped
    by itself; a completion that ran into max_completion_length ends in an ordinary token.
    """
    stopped = bool(completion_ids) and int(completion_ids[-1]) in set(eos_ids)
    return 1.0 if stopped and not leaked_special_text(text) else -1.0


def style_score(text: str) -> float:
    """1 when the reply uses the お嬢様 register (rag_persona.evaluation.metrics markers), else 0."""
    return 1.0 if is_ojousama(text) else 0.0


class _Reward:
    """Base for the reward callables: a stable name for trl's logs."""

    name = "reward"

    def __init__(self) -> None:
        self.__name__ = self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LengthReward(_Reward):
    name = "length"

    def __init__(self, target: int = 30, tolerance: int = 15) -> None:
        super().__init__()
        self.target, self.tolerance = target, tolerance

    def __call__(self, prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        return [length_score(completion_text(c), self.target, self.tolerance) for c in completions]


class EosReward(_Reward):
    name = "eos"

    def __init__(self, eos_ids: Iterable[int]) -> None:
        super().__init__()
        self.eos_ids = {int(i) for i in eos_ids}

    def __call__(self, prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        if completion_ids is None:
            raise ValueError("eos reward: trl passed no completion_ids")
        return [
            eos_score(ids, self.eos_ids, completion_text(c))
            for c, ids in zip(completions, completion_ids, strict=True)
        ]


class StyleReward(_Reward):
    name = "style"

    def __call__(self, prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        return [style_score(completion_text(c)) for c in completions]


class RewardModelReward(_Reward):
    """The trained reward model's score of prompt ids + completion ids, built as in its training pairs.

    trl's own path for a model reward re-renders prompt and completion through the chat template, which
    always closes the turn (and adds a newline after it); scoring the generated ids themselves keeps the
    sequence token-identical to what the reward model saw and lets it see whether the reply stopped.
    """

    name = "reward_model"

    def __init__(self, reward_model, policy_tokenizer, batch_size: int = 8) -> None:
        super().__init__()
        self.rm = reward_model
        self.tokenizer = policy_tokenizer
        self.batch_size = batch_size
        self._prompt_ids: dict[str, list[int]] = {}

    def _encode(self, prompt) -> list[int]:
        key = json.dumps(prompt, ensure_ascii=False, sort_keys=True)
        if key not in self._prompt_ids:
            self._prompt_ids[key] = encode_prompt(self.tokenizer, prompt, "RL prompt")
        return self._prompt_ids[key]

    def __call__(self, prompts, completions, completion_ids=None, **kwargs) -> list[float]:

        if completion_ids is None:
            raise ValueError("reward model: trl passed no completion_ids")
        seqs = [
            self._encode(p) + [int(i) for i in ids] for p, ids in zip(prompts, completion_ids, strict=True)
        ]
        return score_ids(self.rm.model, seqs, self.rm.pad_id, self.batch_size)


def build_rewards(
    weights: dict[str, float],
    *,
    eos_ids: Iterable[int],
    length_target: int = 30,
    length_tolerance: int = 15,
    reward_model=None,
    tokenizer=None,
) -> tuple[list, list[float]]:
    """The reward callables with a non-zero weight, in a fixed order, and their weights."""
    makers = {
        "reward_model": lambda: RewardModelReward(reward_model, tokenizer),
        "length": lambda: LengthReward(length_target, length_tolerance),
        "eos": lambda: EosReward(eos_ids),
        "style": lambda: StyleReward(),
    }
    funcs, used = [], []
    for name, make in makers.items():
        w = float(weights.get(name, 0.0))
        if w == 0:
            continue
        if name == "reward_model" and reward_model is None:
            raise ValueError("reward_model weight given without a reward model")
        funcs.append(make())
        used.append(w)
    return funcs, used
