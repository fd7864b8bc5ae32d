"""The training stages: one function per stage (sft, dpo, cpt, reward, rl, xattn), picked by the recipe."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from training.recipes import Recipe

from .common import RunOptions
from .cpt import train_cpt
from .dpo import train_dpo
from .reward import train_reward
from .rl import train_rl
from .sft import train_sft
from .xattn import train_xattn

STAGES: dict[str, Callable[..., dict]] = {
    "sft": train_sft,
    "dpo": train_dpo,
    "cpt": train_cpt,
    "reward": train_reward,
    "rl": train_rl,
    "xattn": train_xattn,
}


def train(
    recipe: Recipe,
    out: str | Path | None = None,
    *,
    progress: Callable[[str], None] = print,
    cuda: bool | None = None,
    keep_model: bool = False,
) -> dict:
    """Run the recipe's stage into `out` (else the recipe's output_dir, else runs/<name>); return its metrics.

    The output folder appears only when training finished (xattn: it fills as the run goes).
    cuda=None detects CUDA; keep_model=True adds the trained model under "model".
    """
    options = RunOptions(progress=progress, cuda=cuda, keep_model=keep_model)
    return STAGES[recipe.stage](recipe, recipe.output_path(out), options)


__all__ = ["STAGES", "train"]
