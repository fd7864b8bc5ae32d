"""SFT and DPO with token-level EOS: recipes, LoRA (CPU) / QLoRA (CUDA), seeded, saved with provenance.

The same recipes drive continued pre-training (`training.cpt`), the reward model (`training.reward_model`)
and RL (`training.rl`); `train` dispatches those stages to their modules.

The data reaching trl is pre-tokenised by `training.labels` (EOS appended as an id, prompt masked), and
thin trainer subclasses refuse anything else, so trl's string-EOS path can never run. Every example's
labels are audited before the first step.

An adapter folder holds: the peft adapter, `recipe.yaml` (resolved), `data_manifest.json` (files, hashes,
counts, the build-data manifest), `metrics.json` (losses, timings, device, versions, lineage),
`log_history.json` and `loss.png`. It is written to a temporary folder and renamed when complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from rag_persona.errors import RagPersonaError

from .labels import (
    Tokenized,
    audit_tokenized,
    eos_contrast_pairs,
    parrot_pairs,
    read_jsonl,
    require_clean,
    resolve_eos_id,
    stop_ids,
    tokenize_rows,
)

STAGES = ("sft", "dpo", "cpt", "reward", "rl")
CPT_FORMATS = ("prose", "qa")
RULE_REWARDS = ("length", "eos", "style")
REWARD_SOURCES = ("reward_model", *RULE_REWARDS)
QUANTIZATION = ("auto", "4bit", "none")
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
ADAPTER_MANIFEST = "rag_persona_adapter.json"
PROVENANCE = ("recipe.yaml", "data_manifest.json", "metrics.json", "loss.png")


# -- recipes ----------------------------------------------------------------------------------------------


@dataclass
class LoraRecipe:
    r: int = 8
    alpha: int = 128
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    # LoRA on the last N decoder layers only (None: all). On CPU the backward pass then stops there.
    # Modules outside the decoder layers (embed_tokens, lm_head) named in target_modules keep their LoRA.
    top_layers: int | None = None


@dataclass
class CptRecipe:
    """Continued pre-training data: the persona's knowledge rendered as prose (training.cpt_data)."""

    knowledge_dir: str | None = None  # default: knowledge/<persona>
    block_size: int = 256
    # Renderings of the whole knowledge, each with its own fact order, grouping and headings: the same fact
    # seen in several contexts is what makes it recallable rather than memorised as one token sequence.
    variants: int = 8
    eval_variants: int = 1  # further renderings (unseen seeds) held out for the eval loss
    formats: list[str] = field(default_factory=lambda: ["prose", "qa"])
    facts_per_paragraph: int = 4
    merge: bool = True  # merge the adapter into the base and save a standalone model folder


@dataclass
class RlRecipe:
    """GRPO settings (training.rl). Rewards are summed with these weights; 0 switches one off."""

    num_generations: int = 2
    max_completion_length: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    # trl: advantage = (reward - mean of the prompt's group) / scale; "group" divides by the group's std,
    # "none" keeps the plain group-mean baseline (Dr. GRPO).
    scale_rewards: str = "group"
    loss_type: str = "dapo"
    reward_adapter: str | None = None  # a `train reward` output folder
    reward_weights: dict[str, float] = field(
        default_factory=lambda: {"reward_model": 1.0, "length": 0.5, "eos": 1.0, "style": 0.5}
    )
    length_target: int = 30
    length_tolerance: int = 15


@dataclass
class Recipe:
    """Everything a training run depends on; saved next to the adapter it produced."""

    name: str
    stage: str
    base_model: str = "qwen2.5-coder-0.5b"
    persona: str = "ojousama"
    init_adapter: str | None = None  # DPO after SFT: continue this adapter, the reference is its frozen copy
    data_dir: str = "runs/data"
    train_file: str = "sft_d1_train.jsonl"
    eval_file: str | None = None
    max_train_examples: int | None = None
    max_eval_examples: int | None = 64
    max_length: int = 1024
    lora: LoraRecipe = field(default_factory=LoraRecipe)
    learning_rate: float = 1e-5
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.0  # share of the steps, below 1
    weight_decay: float = 0.0
    epochs: float = 3
    max_steps: int = -1
    batch_size: int = 2
    grad_accum: int = 1
    beta: float = 0.3
    # DPO losses (trl loss_type) and their weights; ["sigmoid", "sft"] is RPO: DPO plus the NLL of the
    # chosen answer, which keeps the chosen answers (and their EOS) likely while preferences move.
    dpo_loss: list[str] = field(default_factory=lambda: ["sigmoid"])
    dpo_loss_weights: list[float] | None = None
    # DPO: add this share of pairs again as EOS contrasts (training.labels.eos_contrast_pairs): the same
    # chosen answer preferred, stopping at EOS, over itself running on without it.
    eos_contrast: float = 0.0
    # DPO: add this share of pairs again with the user's own message, echoed, as the rejected reply.
    parrot_contrast: float = 0.0
    seed: int = 42
    quantization: str = "auto"
    gradient_checkpointing: bool | None = None  # default: on for QLoRA, off for CPU LoRA
    cpu_threads: int | None = None  # torch threads on CPU (None: all cores; 1 is faster on a busy machine)
    logging_steps: int = 1
    output_dir: str | None = None
    notes: str = ""
    cpt: CptRecipe = field(default_factory=CptRecipe)
    rl: RlRecipe = field(default_factory=RlRecipe)

    def validate(self, where: str = "recipe") -> Recipe:
        if self.stage not in STAGES:
            raise RagPersonaError(f"{where}: field 'stage': {self.stage!r} is not one of {', '.join(STAGES)}")
        if self.quantization not in QUANTIZATION:
            raise RagPersonaError(
                f"{where}: field 'quantization': {self.quantization!r} not in {QUANTIZATION}"
            )
        for name in ("learning_rate", "epochs", "batch_size", "grad_accum", "max_length"):
            if not getattr(self, name) or getattr(self, name) <= 0:
                raise RagPersonaError(f"{where}: field '{name}': must be positive")
        if self.stage == "dpo" and self.beta <= 0:
            raise RagPersonaError(f"{where}: field 'beta': must be positive")
        if isinstance(self.dpo_loss, str):
            self.dpo_loss = [self.dpo_loss]
        for name in ("eos_contrast", "parrot_contrast"):
            share = getattr(self, name)
            if not 0 <= share <= 1 or (share and self.stage != "dpo"):
                raise RagPersonaError(f"{where}: field '{name}': a share in [0, 1], for the dpo stage only")
        if self.dpo_loss_weights is not None and len(self.dpo_loss_weights) != len(self.dpo_loss):
            raise RagPersonaError(f"{where}: field 'dpo_loss_weights': needs one weight per dpo_loss entry")
        if self.lora.r <= 0 or self.lora.alpha <= 0 or not 0 <= self.lora.dropout < 1:
            raise RagPersonaError(f"{where}: field 'lora': r and alpha must be positive, dropout in [0, 1)")
        if self.stage in ("cpt", "reward") and self.init_adapter:
            raise RagPersonaError(
                f"{where}: field 'init_adapter': the {self.stage} stage starts from the base model"
            )
        if self.stage == "cpt":
            self._validate_cpt(where)
        if self.stage == "rl":
            self._validate_rl(where)
        return self

    def _validate_cpt(self, where: str) -> None:
        c = self.cpt
        if isinstance(c.formats, str):
            c.formats = [c.formats]
        unknown = [f for f in c.formats if f not in CPT_FORMATS]
        if unknown or not c.formats:
            raise RagPersonaError(
                f"{where}: field 'cpt.formats': {unknown or c.formats} not in {CPT_FORMATS}"
            )
        for name in ("block_size", "variants", "facts_per_paragraph"):
            if getattr(c, name) <= 0:
                raise RagPersonaError(f"{where}: field 'cpt.{name}': must be positive")
        if c.eval_variants < 0:
            raise RagPersonaError(f"{where}: field 'cpt.eval_variants': must be 0 or more")

    def _validate_rl(self, where: str) -> None:
        r = self.rl
        if self.beta <= 0:
            raise RagPersonaError(
                f"{where}: field 'beta': must be positive (the KL penalty to the reference)"
            )
        if r.num_generations < 2:
            raise RagPersonaError(
                f"{where}: field 'rl.num_generations': at least 2 (the group is the baseline)"
            )
        if self.batch_size % r.num_generations:
            raise RagPersonaError(
                f"{where}: field 'batch_size': {self.batch_size} completions per step must be a multiple of "
                f"rl.num_generations {r.num_generations}"
            )
        if r.max_completion_length <= 0 or r.length_tolerance <= 0:
            raise RagPersonaError(
                f"{where}: field 'rl': max_completion_length and length_tolerance must be positive"
            )
        if r.scale_rewards not in ("group", "batch", "none"):
            raise RagPersonaError(
                f"{where}: field 'rl.scale_rewards': {r.scale_rewards!r} not in group, batch, none"
            )
        if not isinstance(r.reward_weights, dict):
            raise RagPersonaError(
                f"{where}: field 'rl.reward_weights': expected a mapping of reward to weight"
            )
        unknown = sorted(set(r.reward_weights) - set(REWARD_SOURCES))
        if unknown:
            raise RagPersonaError(
                f"{where}: field 'rl.reward_weights': unknown reward {unknown[0]!r} (known: {', '.join(REWARD_SOURCES)})"
            )
        if not any(float(w) != 0 for w in r.reward_weights.values()):
            raise RagPersonaError(
                f"{where}: field 'rl.reward_weights': every weight is 0; nothing to learn from"
            )
        if float(r.reward_weights.get("reward_model", 0)) != 0 and not r.reward_adapter:
            raise RagPersonaError(
                f"{where}: field 'rl.reward_adapter': missing, but rl.reward_weights.reward_model is not 0 "
                "(train one with `rag-persona train reward`, or set its weight to 0)"
            )

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("cpt", "rl"):  # stage-specific blocks only where they apply
            if self.stage != key:
                out.pop(key)
        return out


_NESTED = {"lora": LoraRecipe, "cpt": CptRecipe, "rl": RlRecipe}


def _from_dict(cls, data: dict, where: str):
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise RagPersonaError(f"{where}: field '{unknown[0]}': unknown (known: {', '.join(names)})")
    kwargs = dict(data)
    if cls is Recipe:
        for key, sub in _NESTED.items():
            if isinstance(kwargs.get(key), dict):
                kwargs[key] = _from_dict(sub, kwargs[key], f"{where}: {key}")
            elif key in kwargs and kwargs[key] is None:
                del kwargs[key]
            elif key in kwargs:
                raise RagPersonaError(f"{where}: field '{key}': expected a mapping")
    for req in ("name", "stage") if cls is Recipe else ():
        if req not in kwargs:
            raise RagPersonaError(f"{where}: field '{req}': missing")
    return cls(**kwargs)


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file path, or the name of a bundled one (training/recipes/NAME.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = RECIPES_DIR / f"{name_or_path}.yaml"
    if bundled.is_file():
        return bundled
    known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
    raise RagPersonaError(f"{path}: recipe not found (bundled recipes: {known})")


def load_recipe(name_or_path: str | Path, **overrides) -> Recipe:
    path = find_recipe(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise RagPersonaError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise RagPersonaError(f"{path}: expected a mapping of recipe fields")
    recipe = _from_dict(Recipe, data, str(path))
    for key, value in overrides.items():
        if value is None:
            continue
        if key.startswith("lora_"):
            setattr(recipe.lora, key[5:], value)
        elif key.startswith("rl_"):
            setattr(recipe.rl, key[3:], value)
        elif key.startswith("cpt_"):
            setattr(recipe.cpt, key[4:], value)
        elif hasattr(recipe, key):
            setattr(recipe, key, value)
        else:
            raise RagPersonaError(f"recipe override: unknown field {key!r}")
    return recipe.validate(str(path))


# -- device -----------------------------------------------------------------------------------------------


@dataclass
class Mode:
    device: str
    method: str
    quantized: bool
    reason: str

    def describe(self) -> str:
        return f"{self.method} on {self.device} ({self.reason})"


def pick_mode(recipe: Recipe, cuda: bool | None = None) -> Mode:
    """QLoRA (4-bit bitsandbytes base) on CUDA, plain LoRA on a bf16 base on CPU; recipe may force one."""
    if cuda is None:
        from rag_persona.generation import cuda_available

        cuda = cuda_available()
    if recipe.quantization == "4bit":
        if not cuda:
            raise RagPersonaError(
                f"recipe {recipe.name}: quantization 4bit needs CUDA (bitsandbytes); none is present"
            )
        return Mode("cuda", "QLoRA", True, "4-bit nf4 base, requested by the recipe")
    if recipe.quantization == "none":
        return Mode("cuda" if cuda else "cpu", "LoRA", False, "bf16 base, requested by the recipe")
    if cuda:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return Mode(
                "cuda", "LoRA", False, "CUDA found but bitsandbytes is missing (pip install '.[gpu]')"
            )
        return Mode("cuda", "QLoRA", True, "CUDA found: 4-bit nf4 base")
    return Mode("cpu", "LoRA", False, "no CUDA: bf16 base, fp32 adapter")


# -- trl subclasses: pre-tokenised data only ----------------------------------------------------------------


def _trainer_classes():
    from trl import DPOTrainer, SFTTrainer

    class EosSafeSFTTrainer(SFTTrainer):
        """SFTTrainer that only accepts `input_ids` + `labels` built by training.labels."""

        def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
            cols = set(dataset.column_names or [])
            if not {"input_ids", "labels"} <= cols:
                raise RagPersonaError(
                    f"SFT {dataset_name} data: pre-tokenised input_ids + labels required (training.labels); "
                    "raw text would take trl's string-EOS path"
                )
            if args.max_length is not None:
                raise RagPersonaError(
                    "SFT: max_length must be None here; overlong examples are dropped upstream"
                )
            return super()._prepare_dataset(
                dataset, processing_class, args, packing, formatting_func, dataset_name
            )

    class EosSafeDPOTrainer(DPOTrainer):
        """DPOTrainer that only accepts `prompt_ids` + `chosen_ids` + `rejected_ids` built by training.labels."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            cols = set(dataset.column_names or [])
            if not {"prompt_ids", "chosen_ids", "rejected_ids"} <= cols:
                raise RagPersonaError(
                    f"DPO {dataset_name} data: pre-tokenised prompt_ids + chosen_ids + rejected_ids required "
                    "(training.labels); raw text would take trl's string-EOS path"
                )
            return dataset

    return EosSafeSFTTrainer, EosSafeDPOTrainer


# -- helpers ----------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _versions() -> dict:
    import peft
    import torch
    import transformers
    import trl

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
        "python": sys.version.split()[0],
    }


def linear_module_names(model) -> list[str]:
    """Names (last component) of the linear layers inside the decoder blocks: 'all linear layers'."""
    import torch

    names = set()
    for full, module in model.named_modules():
        if ".layers." not in full and ".h." not in full:
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(full.rsplit(".", 1)[-1])
    return sorted(names)


def lora_config(recipe: Recipe, model, *, task_type: str = "CAUSAL_LM", modules_to_save=None):
    """The recipe's LoRA for this model.

    target_modules is "all-linear" or a list of module names, where the list may hold "all-linear" (the
    decoder's linear layers) next to modules outside the decoder layers such as embed_tokens and lm_head.
    """
    from peft import LoraConfig

    targets = recipe.lora.target_modules
    if isinstance(targets, list | tuple):
        targets = list(targets)
        if "all-linear" in targets:
            targets = sorted(set(linear_module_names(model)) | (set(targets) - {"all-linear"}))
    elif task_type != "CAUSAL_LM" and targets == "all-linear":
        # peft's "all-linear" keeps every Linear except the LM head; a classifier's score head is one of them,
        # and it is trained whole (modules_to_save) instead.
        targets = linear_module_names(model)
    layers = None
    if recipe.lora.top_layers:
        n = model.config.get_text_config().num_hidden_layers
        layers = list(range(max(0, n - recipe.lora.top_layers), n))
        if targets == "all-linear":
            targets = linear_module_names(model)
        outside = [t for t in targets if t not in set(linear_module_names(model))]
        if outside:
            # peft's layers_to_transform drops every module without a layer index (embed_tokens, lm_head),
            # so name each module in full instead: the chosen layers' ones and the outside ones.
            targets, layers = _full_target_names(model, targets, set(layers)), None
    return LoraConfig(
        r=recipe.lora.r,
        lora_alpha=recipe.lora.alpha,
        lora_dropout=recipe.lora.dropout,
        target_modules=targets,
        layers_to_transform=layers,
        bias="none",
        task_type=task_type,
        modules_to_save=modules_to_save,
    )


def _full_target_names(model, targets: list[str], layers: set[int]) -> list[str]:
    import re

    wanted = set(targets)
    names = []
    for full, _ in model.named_modules():
        last = full.rsplit(".", 1)[-1]
        if last not in wanted and full not in wanted:
            continue
        m = re.search(r"\.(?:layers|h)\.(\d+)\.", full)
        if m is None or int(m.group(1)) in layers:
            names.append(full)
    return names


def _subset(rows: list, n: int | None, seed: int) -> list:
    if n is None or n >= len(rows):
        return rows
    picked = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in picked]


def _progress_callback(progress: Callable[[str], None]):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.time()
            progress(f"training: {state.max_steps} steps")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or state.max_steps <= 0:
                return
            elapsed = time.time() - getattr(self, "started", time.time())
            step = max(state.global_step, 1)
            eta = elapsed / step * (state.max_steps - state.global_step)
            keys = (
                "loss",
                "eval_loss",
                "rewards/accuracies",
                "rewards/margins",
                "accuracy",
                "reward",
                "kl",
                "learning_rate",
            )
            shown = " ".join(f"{k}={logs[k]:.4g}" for k in keys if isinstance(logs.get(k), int | float))
            if not shown:
                return
            progress(
                f"step {state.global_step}/{state.max_steps} {shown} elapsed {elapsed:.0f}s eta {eta:.0f}s"
            )

    return Progress()


def plot_losses(
    history: list[dict],
    path: Path,
    title: str,
    eval_before: float | None = None,
    second: tuple[str, str] = ("rewards/margins", "reward margin (chosen − rejected)"),
) -> Path:
    """Train/eval loss, and a second panel with `second` = (log key, axis label) when the log has it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    if eval_before is not None:
        evals = [(0, eval_before), *evals]
    key, label = second
    margins = [(h["step"], h[key]) for h in history if key in h and "loss" in h]
    ncols = 2 if margins else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4), squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    if margins:
        ax2 = axes[0][1]
        ax2.plot(*zip(*margins, strict=True), lw=1, color="tab:green")
        ax2.set_xlabel("step")
        ax2.set_ylabel(label)
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _data_manifest(
    recipe: Recipe, train_path: Path, eval_path: Path | None, train: Tokenized, evald, totals
) -> dict:
    data_dir = train_path.parent
    build = None
    if (data_dir / "manifest.json").is_file():
        build = json.loads((data_dir / "manifest.json").read_text(encoding="utf-8"))
        build = {
            k: build.get(k)
            for k in (
                "format_version",
                "prompt_template_version",
                "seed",
                "knowledge_hash",
                "dialogues_sha256",
                "counts",
                "retrieval",
                "config",
            )
        }
    out = {
        "train": {
            "file": str(train_path),
            "sha256": _sha256(train_path),
            "rows": totals["train"],
            "used": len(train.examples),
            "dropped_too_long": len(train.dropped_too_long),
            "sources": train.sources,
        },
        "build_data_manifest": build,
    }
    if eval_path is not None and evald is not None:
        out["eval"] = {
            "file": str(eval_path),
            "sha256": _sha256(eval_path),
            "rows": totals["eval"],
            "used": len(evald.examples),
            "dropped_too_long": len(evald.dropped_too_long),
        }
    return out


def _resolve(path: str | None, base: Path) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    return p if p.is_absolute() else base / p


def _write_atomic(work: Path, out: Path) -> None:
    # mkdtemp folders are private (0700); the result is an ordinary readable folder.
    for path in [work, *work.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    backup = None
    if out.exists():
        backup = out.with_name(f".{out.name}.old")
        shutil.rmtree(backup, ignore_errors=True)
        out.rename(backup)
    work.rename(out)
    if backup:
        shutil.rmtree(backup, ignore_errors=True)


# -- training ---------------------------------------------------------------------------------------------


def train(
    recipe: Recipe,
    out: str | Path | None = None,
    *,
    progress: Callable[[str], None] = print,
    cuda: bool | None = None,
    keep_model: bool = False,
) -> dict:
    """Run one stage; return metrics. The output folder appears only when training finished.

    SFT and DPO run here; cpt, reward and rl run in training.cpt, training.reward_model and training.rl.
    keep_model=True adds the trained model under "model" (tests inspect its weights).
    """
    if recipe.stage in _OTHER_STAGES:
        import importlib

        module, func = _OTHER_STAGES[recipe.stage]
        run = getattr(importlib.import_module(module), func)
        return run(recipe, out, progress=progress, cuda=cuda, keep_model=keep_model)

    from rag_persona.generation import load_causal_lm

    started = time.time()
    out = Path(out or recipe.output_dir or f"runs/{recipe.name}")
    mode, load = _start(recipe, cuda, progress)

    train_path, eval_path, train_rows, eval_rows = read_recipe_data(recipe)

    loaded = load_causal_lm(
        recipe.base_model, load_in_4bit=mode.quantized, device=mode.device, progress=progress
    )
    model, tokenizer = loaded.model, loaded.tokenizer
    eos_id, eos_ids = eos_ids_of(model, tokenizer)
    progress(f"EOS appended as token id {eos_id} ({tokenizer.convert_ids_to_tokens(eos_id)!r})")

    used_rows = _subset(train_rows, recipe.max_train_examples, recipe.seed)
    train_data = tokenize_rows(tokenizer, used_rows, eos_id, kind=recipe.stage, max_length=recipe.max_length)
    eval_data = None
    if eval_rows:
        eval_data = tokenize_rows(
            tokenizer,
            _subset(eval_rows, recipe.max_eval_examples, recipe.seed),
            eos_id,
            kind=recipe.stage,
            max_length=recipe.max_length,
        )
    if not train_data.examples:
        raise RagPersonaError(f"{train_path}: no example fits max_length {recipe.max_length}")
    audit = audit_tokenized(tokenizer, train_data, eos_ids)
    require_clean(audit, "training")
    if eval_data:
        require_clean(audit_tokenized(tokenizer, eval_data, eos_ids), "eval")
    progress(
        f"{len(train_data.examples)} training examples ({len(train_data.dropped_too_long)} over "
        f"{recipe.max_length} tokens dropped); labels audited: all end in EOS id {eos_id}, no special-token text"
    )
    # Both sets come from the audited pairs only (built before either is appended).
    contrasts: dict[str, Tokenized] = {}
    if recipe.eos_contrast:  # the rejected side deliberately lacks EOS: not audited
        contrasts["eos_contrast"] = eos_contrast_pairs(train_data, eos_id, recipe.eos_contrast, recipe.seed)
    if recipe.parrot_contrast:
        parrot = parrot_pairs(
            tokenizer, used_rows, eos_id, recipe.parrot_contrast, recipe.seed, max_length=recipe.max_length
        )
        require_clean(audit_tokenized(tokenizer, parrot, eos_ids), "parrot-contrast")
        contrasts["parrot_contrast"] = parrot
    for name, extra in contrasts.items():
        train_data.examples += extra.examples
        train_data.sources += extra.sources
        progress(f"{len(extra.examples)} {name} pairs added ({_CONTRASTS[name]})")

    peft_config = None
    lineage = None
    if mode.quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    if recipe.init_adapter:
        from peft import PeftModel

        init = Path(recipe.init_adapter)
        if not (init / "adapter_config.json").is_file():
            raise RagPersonaError(
                f"{init}: not an adapter folder (no adapter_config.json); train the SFT stage first"
            )
        model = PeftModel.from_pretrained(model, str(init), is_trainable=True)
        lineage = _lineage(init)
        progress(f"continuing adapter {init} (its frozen copy is the DPO reference)")
    else:
        peft_config = lora_config(recipe, model)

    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=_ensure_parent(out)))
    try:
        metrics = _run_trainer(
            recipe, mode, model, tokenizer, peft_config, train_data, eval_data, work, progress
        )
        trainer_model = metrics.pop("_model")
        save_adapter(trainer_model, work)
        history = metrics.pop("_history")
        totals = {"train": len(train_rows), "eval": len(eval_rows) if eval_rows else 0}
        manifest = _data_manifest(recipe, train_path, eval_path, train_data, eval_data, totals)
        metrics.update(
            run_info(recipe, mode, loaded.source, tokenizer, eos_id, started, load)
            | {
                "train_examples": len(train_data.examples),
                "eval_examples": len(eval_data.examples) if eval_data else 0,
                "label_audit": {"checked": len(audit), "failed": sum(not r.ok for r in audit)},
                **{
                    f"{name}_pairs": len(contrasts[name].examples) if name in contrasts else 0
                    for name in _CONTRASTS
                },
                "init_adapter": recipe.init_adapter,
                "lineage": lineage,
            }
        )
        metrics["seconds"] = round(time.time() - started, 1)
        finish_run(work, out, recipe, metrics, history, manifest)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    progress(f"saved adapter, recipe, data manifest, metrics and loss curve to {out}")
    metrics["output"] = str(out)
    if keep_model:
        metrics["model"] = trainer_model
    return metrics


_OTHER_STAGES = {
    "cpt": ("training.cpt", "train_cpt"),
    "reward": ("training.reward_model", "train_reward"),
    "rl": ("training.rl", "train_rl"),
}


def _start(recipe: Recipe, cuda: bool | None, progress: Callable[[str], None]) -> tuple[Mode, list[float]]:
    """Pick the mode, seed everything, set CPU threads; report both. Returns (mode, load average)."""
    import torch
    from transformers import set_seed

    mode = pick_mode(recipe, cuda)
    progress(f"{recipe.stage.upper()} {recipe.name}: {mode.describe()}")
    set_seed(recipe.seed)
    if mode.device == "cpu" and recipe.cpu_threads:
        torch.set_num_threads(recipe.cpu_threads)
    load = [round(x, 2) for x in os.getloadavg()]
    progress(f"torch threads {torch.get_num_threads()}, load average {load[0]} on {os.cpu_count()} cores")
    return mode, load


def eos_ids_of(model, tokenizer) -> tuple[int, set[int]]:
    """(the EOS id appended to labels, every id that ends generation) for this model and tokenizer."""
    gen_eos = model.generation_config.eos_token_id
    gen_eos = (
        list(gen_eos) if isinstance(gen_eos, list | tuple) else ([gen_eos] if gen_eos is not None else [])
    )
    eos_id = resolve_eos_id(tokenizer, gen_eos)
    return eos_id, stop_ids(tokenizer, gen_eos) | {eos_id}


def save_adapter(model, folder: Path, **kwargs) -> None:
    """The trained "default" adapter only (a GRPO/DPO "ref" copy stays behind), without peft's model card."""
    model.save_pretrained(str(folder), selected_adapters=["default"], **kwargs)
    (folder / "README.md").unlink(missing_ok=True)


def run_info(recipe: Recipe, mode: Mode, source: str, tokenizer, eos_id: int, started: float, load) -> dict:
    """The metrics every stage records: what ran, on what, with which versions."""
    import torch

    return {
        "recipe": recipe.name,
        "stage": recipe.stage,
        "base_model": recipe.base_model,
        "base_source": source,
        "persona": recipe.persona,
        "mode": asdict(mode),
        "eos_id": eos_id,
        "eos_token": tokenizer.convert_ids_to_tokens(eos_id),
        "seconds": round(time.time() - started, 1),
        "threads": torch.get_num_threads(),
        "load_average_at_start": load,
        "versions": _versions(),
    }


def finish_run(
    work: Path,
    out: Path,
    recipe: Recipe,
    metrics: dict,
    history: list[dict],
    manifest: dict,
    *,
    second: tuple[str, str] | None = None,
) -> None:
    """Write the provenance files next to the trained weights in `work`, then move `work` to `out`."""
    (work / "log_history.json").write_text(json.dumps(history, indent=1), encoding="utf-8")
    before = (metrics.get("eval_before") or {}).get("eval_loss")
    extra = {"second": second} if second else {}
    plot_losses(history, work / "loss.png", f"{recipe.stage.upper()} {recipe.name}", before, **extra)
    (work / "recipe.yaml").write_text(
        yaml.safe_dump(recipe.to_dict(), allow_unicode=True, sort_keys=False), encoding="utf-8"
    )
    (work / "data_manifest.json").write_text(
        json.dumps(manifest, ensure_ascii=False, indent=1), encoding="utf-8"
    )
    (work / "metrics.json").write_text(json.dumps(metrics, ensure_ascii=False, indent=1), encoding="utf-8")
    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    _write_atomic(work, out)


_CONTRASTS = {
    "eos_contrast": "chosen stops at EOS, rejected runs on without it",
    "parrot_contrast": "rejected: the user's message said back",
}


def read_recipe_data(recipe: Recipe) -> tuple[Path, Path | None, list, list | None]:
    """The recipe's train and (optional) eval files under its data_dir, and their rows."""
    data_dir = Path(recipe.data_dir)
    train_path = _resolve(recipe.train_file, data_dir)
    eval_path = _resolve(recipe.eval_file, data_dir)
    return train_path, eval_path, read_jsonl(train_path), read_jsonl(eval_path) if eval_path else None


def train_and_evaluate(
    trainer, has_eval: bool, progress: Callable[[str], None], what: str = "examples"
) -> dict:
    """Held-out loss before, training, held-out loss after: the metrics every stage reports."""
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    progress(f"trainable parameters: {trainable:,}")
    metrics: dict = {"trainable_parameters": trainable}
    if has_eval:
        progress(f"evaluating on {len(trainer.eval_dataset)} held-out {what} before training")
        metrics["eval_before"] = _clean(trainer.evaluate())
    result = trainer.train()
    metrics["train"] = _clean(result.metrics)
    metrics["train_loss"] = result.training_loss
    metrics["steps"] = trainer.state.global_step
    if has_eval:
        progress("evaluating after training")
        metrics["eval_after"] = _clean(trainer.evaluate())
    return metrics


def _ensure_parent(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent


def _lineage(init: Path) -> dict:
    info = {"adapter": str(init)}
    for name in ("metrics.json", "data_manifest.json"):
        if (init / name).is_file():
            data = json.loads((init / name).read_text(encoding="utf-8"))
            if name == "data_manifest.json":
                data.get("train", {}).pop("sources", None)
            info[name.split(".")[0]] = data
    if (init / "recipe.yaml").is_file():
        info["recipe"] = yaml.safe_load((init / "recipe.yaml").read_text(encoding="utf-8"))
    return info


def common_args(recipe: Recipe, mode: Mode, work: Path) -> dict:
    """TrainingArguments shared by every trl config: batch, schedule, seeding, device, logging."""
    return dict(
        output_dir=str(work / "checkpoints"),
        per_device_train_batch_size=recipe.batch_size,
        per_device_eval_batch_size=recipe.batch_size,
        gradient_accumulation_steps=recipe.grad_accum,
        learning_rate=recipe.learning_rate,
        lr_scheduler_type=recipe.lr_scheduler,
        warmup_steps=recipe.warmup_ratio,  # a float below 1 is a share of the steps
        weight_decay=recipe.weight_decay,
        num_train_epochs=recipe.epochs,
        max_steps=recipe.max_steps,
        logging_steps=recipe.logging_steps,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=recipe.seed,
        data_seed=recipe.seed,
        bf16=mode.device == "cuda",
        use_cpu=mode.device == "cpu",
        gradient_checkpointing=(
            mode.quantized if recipe.gradient_checkpointing is None else recipe.gradient_checkpointing
        ),
        disable_tqdm=not sys.stderr.isatty(),
        dataloader_num_workers=0,
    )


def quiet_printer(trainer) -> None:
    """Our progress lines replace the Trainer's raw log dicts when stderr is a log file."""
    if not sys.stderr.isatty():
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)


def _run_trainer(recipe, mode, model, tokenizer, peft_config, train_data, eval_data, work, progress) -> dict:
    """SFT or DPO through trl."""
    from datasets import Dataset

    EosSafeSFTTrainer, EosSafeDPOTrainer = _trainer_classes()
    common = common_args(recipe, mode, work) | {"max_length": None}
    train_ds = Dataset.from_dict(train_data.columns())
    eval_ds = Dataset.from_dict(eval_data.columns()) if eval_data and eval_data.examples else None
    callbacks = [_progress_callback(progress)]
    if recipe.stage == "sft":
        from trl import SFTConfig

        args = SFTConfig(**common, completion_only_loss=None, shuffle_dataset=False)
        trainer = EosSafeSFTTrainer(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
        )
    else:
        from trl import DPOConfig

        args = DPOConfig(
            **common, beta=recipe.beta, loss_type=list(recipe.dpo_loss), loss_weights=recipe.dpo_loss_weights
        )
        trainer = EosSafeDPOTrainer(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
        )
    quiet_printer(trainer)
    metrics = train_and_evaluate(trainer, eval_ds is not None, progress)
    history = list(trainer.state.log_history)
    model = trainer.model
    if hasattr(model, "peft_config") and "ref" in model.peft_config:
        model.set_adapter("default")
    metrics["_model"] = model
    metrics["_history"] = history
    return metrics


def _clean(d: dict) -> dict:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in d.items()}


# -- shipping ---------------------------------------------------------------------------------------------


def ship_adapter(
    run: str | Path,
    dest: str | Path,
    *,
    default: bool = True,
    bf16: bool = True,
    extra: dict | None = None,
) -> Path:
    """Copy a trained adapter into the repo (bf16 weights, provenance, rag_persona_adapter.json).

    The chat picks up a shipped adapter marked default for its base model and persona
    (rag_persona.evaluation.evaluate.default_adapter).
    """
    import torch
    from safetensors.torch import load_file, save_file

    run, dest = Path(run), Path(dest)
    if not (run / "adapter_config.json").is_file():
        raise RagPersonaError(f"{run}: not an adapter folder (no adapter_config.json)")
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=_ensure_parent(dest)))
    try:
        for name in PROVENANCE:
            if (run / name).is_file():
                shutil.copy2(run / name, work / name)
        ancestor = metrics.get("init_adapter")
        while ancestor and (Path(ancestor) / "metrics.json").is_file():
            # Earlier stages (the SFT a DPO run continued) keep their own recipe, data manifest and curve.
            a_metrics = json.loads((Path(ancestor) / "metrics.json").read_text(encoding="utf-8"))
            folder = work / "lineage" / f"{a_metrics.get('stage')}-{a_metrics.get('recipe')}"
            folder.mkdir(parents=True)
            for name in PROVENANCE:
                if (Path(ancestor) / name).is_file():
                    shutil.copy2(Path(ancestor) / name, folder / name)
            ancestor = a_metrics.get("init_adapter")
        config = json.loads((run / "adapter_config.json").read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = metrics["base_model"]  # the alias, not this machine's cache path
        (work / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        tensors = load_file(str(run / "adapter_model.safetensors"))
        if bf16:
            tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}
        save_file(tensors, str(work / "adapter_model.safetensors"), metadata={"format": "pt"})
        info = {
            "name": dest.name,
            "base_model": metrics["base_model"],
            "persona": metrics.get("persona", "ojousama"),
            "default": default,
            "stages": [s for s in _stages(metrics)],
            "weights_dtype": "bfloat16" if bf16 else "as trained",
            "adapter_sha256": _sha256(work / "adapter_model.safetensors"),
            "trained_seconds": _total_seconds(metrics),
            **(extra or {}),
        }
        (work / ADAPTER_MANIFEST).write_text(
            json.dumps(info, ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
        )
        _write_atomic(work, dest)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return dest


def _stages(metrics: dict) -> list[str]:
    chain = []
    m = metrics
    while m:
        chain.append(f"{m.get('stage')}:{m.get('recipe')}")
        m = (m.get("lineage") or {}).get("metrics")
    return list(reversed(chain))


def _total_seconds(metrics: dict) -> float:
    total, m = 0.0, metrics
    while m:
        total += float(m.get("seconds", 0))
        m = (m.get("lineage") or {}).get("metrics")
    return round(total, 1)


def load_tokenizer(model: str | None = None):
    """Tokenizer (and generation stop ids) of a bundled alias, hub id or local folder, without weights."""
    from transformers import AutoTokenizer, GenerationConfig

    from rag_persona.generation import resolve_model_path

    source = resolve_model_path(model, progress=lambda m: None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except OSError as exc:
        raise RagPersonaError(
            f"model {source}: cannot load its tokenizer ({str(exc).splitlines()[0]})"
        ) from exc
    try:
        gen = GenerationConfig.from_pretrained(source).eos_token_id
    except OSError:
        gen = None
    gen = list(gen) if isinstance(gen, list | tuple) else ([gen] if gen is not None else [])
    return tokenizer, gen, source
