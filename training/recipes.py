"""Training recipes: one YAML format for every stage, validated on load (unknown keys, types, ranges).

A recipe names the stage (sft, dpo, cpt, reward, rl, xattn) and everything the run depends on. Fields that
are settings of transformers' TrainingArguments, trl's configs or peft's LoraConfig carry exactly their
names (learning_rate, num_train_epochs, per_device_train_batch_size, gradient_accumulation_steps,
lr_scheduler_type, warmup_steps, seed, beta, max_length, loss_type, lora_alpha, ...); stage-specific
settings sit in a block named after the stage (`lora`, `cpt`, `rl`, `xattn`).

The same rules hold for every stage: the run is seeded with `seed` (default 42), it reads its data from
`data_dir` (default runs/data) and writes to `--out`, else `output_dir`, else runs/<name>; relative paths
are relative to the current folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from rag_persona.errors import RagPersonaError

STAGES = ("sft", "dpo", "cpt", "reward", "rl", "xattn")
CPT_FORMATS = ("prose", "qa")
RULE_REWARDS = ("length", "eos", "style")
REWARD_SOURCES = ("reward_model", *RULE_REWARDS)
QUANTIZATION = ("auto", "4bit", "none")
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
RUNS_ROOT = Path("runs")


@dataclass
class LoraRecipe:
    """peft LoraConfig settings (same names), plus where in the model the adapter goes."""

    r: int = 8
    lora_alpha: int = 128
    lora_dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    # LoRA on the last N decoder layers only (None: all). On CPU the backward pass then stops there.
    # Modules outside the decoder layers (embed_tokens, lm_head) named in target_modules keep their LoRA.
    top_layers: int | None = None
    # LoRA on these decoder layers only (indices from 0), instead of top_layers: e.g. the layers another
    # stage's LoRA left alone. The same rule for modules outside the decoder layers.
    layers: list[int] | None = None


@dataclass
class CptRecipe:
    """Continued pre-training data: the persona's knowledge rendered as prose (training.data.cpt_data)."""

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
    """GRPO settings (training.stages.rl), trl's GRPOConfig names. Rewards are summed with these weights."""

    num_generations: int = 2
    max_completion_length: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    # trl: advantage = (reward - mean of the prompt's group) / scale; "group" divides by the group's std,
    # "none" keeps the plain group-mean baseline (Dr. GRPO).
    scale_rewards: str = "group"
    loss_type: str = "dapo"
    reward_adapter: str | None = None  # a `train reward` output folder
    # By reward name (0 switches one off), where trl takes a list in reward order.
    reward_weights: dict[str, float] = field(
        default_factory=lambda: {"reward_model": 1.0, "length": 0.5, "eos": 1.0, "style": 0.5}
    )
    length_target: int = 30
    length_tolerance: int = 15


@dataclass
class XattnRecipe:
    """Cross-attention blocks (training.stages.xattn): their shape, the memory, and what the rows stress."""

    layers: list[int] = field(default_factory=list)
    rank: int = 16
    alpha: float = 32.0
    memory: str = "hidden"
    index: str | None = None  # index folder caching the fact encodings (default: the persona's, if built)
    # Rows whose golden fact the retriever missed (not RAFT's deliberate drop_golden rows) get it added to
    # memory: otherwise their answers teach stating facts that were never given.
    add_missed_golden: bool = False
    # Rows whose golden facts are in memory appear this many times per epoch: they are the rows whose
    # answers can only be predicted by reading the memory (the rest mostly teach style, which the gates
    # learn in a few steps anyway).
    fact_focus: int = 1
    # Auxiliary rows per epoch that teach reading the memory outright: a fact's own question, that fact
    # among `copy_distractors` others in memory, and the fact said back verbatim in the persona's
    # register (training.data.fact_answers.say_fact). The SFT answers paraphrase their facts, so they
    # reward the topic more than the names and numbers; these rows reward copying them.
    copy_rows: int = 0
    copy_distractors: int = 2
    gate_lr: float = 1e-2
    max_minutes: float = 30.0  # the run stops at max_steps or here, whichever comes first
    eval_steps: int = 50  # held-out loss every N steps (0: only before and after)
    keep_best: bool = False  # keep the evaluated checkpoint with the lowest held-out loss


@dataclass
class Recipe:
    """Everything a training run depends on; saved next to the adapter it produced."""

    name: str
    stage: str
    base_model: str | None = "qwen2.5-coder-0.5b"  # None: the settings' chat model
    persona: str | None = "ojousama"  # None: the settings' persona
    # DPO/RL after SFT: continue this adapter (the reference is its frozen copy); xattn: these weights.
    init_adapter: str | None = None
    data_dir: str = str(RUNS_ROOT / "data")
    train_file: str = "sft_d1_train.jsonl"
    eval_file: str | None = None
    max_train_examples: int | None = None
    max_eval_examples: int | None = 64
    max_length: int = 1024  # longer examples are dropped, never cut (a cut would lose the EOS)
    lora: LoraRecipe = field(default_factory=LoraRecipe)
    learning_rate: float = 1e-5
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0  # a float below 1 is a share of the steps (transformers' rule)
    weight_decay: float = 0.0
    num_train_epochs: float = 3
    max_steps: int = -1
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 1
    beta: float = 0.3
    # DPO losses (trl loss_type) and their weights; ["sigmoid", "sft"] is RPO: DPO plus the NLL of the
    # chosen answer, which keeps the chosen answers (and their EOS) likely while preferences move.
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    loss_weights: list[float] | None = None
    # DPO: add this share of pairs again as EOS contrasts (training.data.labels.eos_contrast_pairs): the
    # same chosen answer preferred, stopping at EOS, over itself running on without it.
    eos_contrast: float = 0.0
    # DPO: add this share of pairs again with the user's own message, echoed, as the rejected reply.
    parrot_contrast: float = 0.0
    # SFT: this share of the training examples is continued-pre-training blocks of the persona's knowledge
    # (rendered with the `cpt` block's settings, every token trained), mixed into the chat rows ("replay").
    replay: float = 0.0
    # SFT: this share of the single-turn fact rows is added again with an empty context (the prompt builder
    # with no retrieved facts), so the chat format also learns to answer from what the weights know.
    # Rows about a fact that the persona's test queries ask are never used: closed-book recall on held-out
    # wordings then still measures what CPT stored, not what these rows taught.
    closed_book: float = 0.0
    seed: int = 42
    quantization: str = "auto"
    gradient_checkpointing: bool | None = None  # default: on for QLoRA, off for CPU LoRA
    cpu_threads: int | None = None  # torch threads on CPU (None: all cores; 1 is faster on a busy machine)
    logging_steps: int = 1
    # A checkpoint every N optimiser steps, beside the output folder (.<name>.checkpoints, the last one
    # kept): the same command run again after an interruption resumes from it. 0: none.
    save_steps: int = 25
    output_dir: str | None = None
    notes: str = ""
    cpt: CptRecipe = field(default_factory=CptRecipe)
    rl: RlRecipe = field(default_factory=RlRecipe)
    xattn: XattnRecipe = field(default_factory=XattnRecipe)

    def output_path(self, out: str | Path | None = None) -> Path:
        """The one output rule of every stage: --out, else the recipe's output_dir, else runs/<name>."""
        return Path(out or self.output_dir or RUNS_ROOT / self.name)

    def validate(self, where: str = "recipe") -> Recipe:
        """Check values and their combinations; one line naming `where` and the field on the first problem."""
        if self.stage not in STAGES:
            _fail(where, "stage", f"{self.stage!r} is not one of {', '.join(STAGES)}")
        if self.quantization not in QUANTIZATION:
            _fail(where, "quantization", f"{self.quantization!r} not in {QUANTIZATION}")
        for name in (
            "learning_rate",
            "num_train_epochs",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "max_length",
        ):
            if not getattr(self, name) > 0:  # NaN is not positive either
                _fail(where, name, "must be positive")
        if self.save_steps < 0:
            _fail(where, "save_steps", "a number of steps, 0 for no checkpoints")
        if self.warmup_steps < 0 or (self.warmup_steps >= 1 and self.warmup_steps != int(self.warmup_steps)):
            _fail(where, "warmup_steps", "a whole number of steps, or a share of the steps below 1")
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        _validate_counts(self, where)
        if self.stage in ("cpt", "reward") and self.init_adapter:
            _fail(where, "init_adapter", f"the {self.stage} stage starts from the base model")
        if self.stage != "xattn":
            _validate_lora(self.lora, where)
        {"dpo": _validate_dpo, "cpt": _validate_cpt, "rl": _validate_rl, "xattn": _validate_xattn}.get(
            self.stage, _validate_contrasts
        )(self, where)
        if not 0 <= self.replay < 1 or (self.replay and self.stage != "sft"):
            _fail(where, "replay", "a share in [0, 1), for the sft stage only")
        if self.replay:
            _validate_cpt_block(self.cpt, where)
        if not 0 <= self.closed_book <= 1 or (self.closed_book and self.stage != "sft"):
            _fail(where, "closed_book", "a share in [0, 1], for the sft stage only")
        return self

    def to_dict(self) -> dict:
        """The recipe as a plain mapping; the stage blocks only where they apply."""
        out = asdict(self)
        for key in ("cpt", "rl", "xattn"):
            if self.stage != key and not (key == "cpt" and (self.replay or self.closed_book)):
                out.pop(key)
        if self.stage == "xattn":
            out.pop("lora")
        return out


# trl's DPOConfig.loss_type values (trl 1.x docs); an unknown one would fail only at the first step.
DPO_LOSSES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
MAX_SEED = 2**32 - 1  # numpy's seed range, which transformers' set_seed uses


def _validate_counts(recipe: Recipe, where: str) -> None:
    """Values every stage reads: finite, in range, and a scheduler transformers knows; refused here, before
    a model is loaded, not at the first step."""
    from transformers.trainer_utils import SchedulerType

    for name in ("learning_rate", "num_train_epochs", "weight_decay", "beta"):
        if not math.isfinite(getattr(recipe, name)):
            _fail(where, name, f"not a finite number ({getattr(recipe, name)})")
    if recipe.weight_decay < 0:
        _fail(where, "weight_decay", "must not be negative")
    schedulers = [s.value for s in SchedulerType]
    if recipe.lr_scheduler_type not in schedulers:
        _fail(
            where, "lr_scheduler_type", f"{recipe.lr_scheduler_type!r} is not one of {', '.join(schedulers)}"
        )
    if recipe.max_steps == 0 or recipe.max_steps < -1:
        _fail(where, "max_steps", "a number of steps, or -1 for num_train_epochs")
    if recipe.logging_steps < 1:
        _fail(where, "logging_steps", "at least 1")
    lowest = {"max_train_examples": 1, "max_eval_examples": 0, "cpu_threads": 0}  # 0 threads: every core
    for name, low in lowest.items():
        if getattr(recipe, name) is not None and getattr(recipe, name) < low:
            _fail(where, name, f"at least {low}, or null" + (" for no limit" if "examples" in name else ""))
    if not 0 <= recipe.seed <= MAX_SEED:
        _fail(where, "seed", f"in [0, {MAX_SEED}]")


def _fail(where: str, name: str, problem: str):
    raise RagPersonaError(f"{where}: field '{name}': {problem}")


def _validate_lora(lora: LoraRecipe, where: str) -> None:
    if not (lora.r > 0 and lora.lora_alpha > 0 and 0 <= lora.lora_dropout < 1):
        _fail(where, "lora", "r and lora_alpha must be positive, lora_dropout in [0, 1)")
    if lora.top_layers is not None and lora.top_layers < 0:
        _fail(where, "lora.top_layers", "a number of layers from the top (0 or null: every layer)")
    if lora.layers is not None:
        if lora.top_layers:
            _fail(where, "lora.layers", "give either lora.layers or lora.top_layers, not both")
        if not lora.layers or min(lora.layers) < 0 or len(set(lora.layers)) != len(lora.layers):
            _fail(where, "lora.layers", "a non-empty list of distinct layer indices from 0")


def _validate_contrasts(recipe: Recipe, where: str) -> None:
    for name in ("eos_contrast", "parrot_contrast"):
        share = getattr(recipe, name)
        if not 0 <= share <= 1 or (share and recipe.stage != "dpo"):
            _fail(where, name, "a share in [0, 1], for the dpo stage only")


def _validate_dpo(recipe: Recipe, where: str) -> None:
    if recipe.beta <= 0:
        _fail(where, "beta", "must be positive")
    unknown = [t for t in recipe.loss_type if t not in DPO_LOSSES]
    if unknown or not recipe.loss_type:
        _fail(where, "loss_type", f"{unknown or recipe.loss_type} not in trl's {', '.join(DPO_LOSSES)}")
    _validate_contrasts(recipe, where)
    if recipe.loss_weights is not None and len(recipe.loss_weights) != len(recipe.loss_type):
        _fail(where, "loss_weights", "needs one weight per loss_type entry")


def _validate_cpt(recipe: Recipe, where: str) -> None:
    _validate_contrasts(recipe, where)
    _validate_cpt_block(recipe.cpt, where)


def _validate_cpt_block(c: CptRecipe, where: str) -> None:
    if isinstance(c.formats, str):
        c.formats = [c.formats]
    unknown = [f for f in c.formats if f not in CPT_FORMATS]
    if unknown or not c.formats:
        _fail(where, "cpt.formats", f"{unknown or c.formats} not in {CPT_FORMATS}")
    for name in ("block_size", "variants", "facts_per_paragraph"):
        if getattr(c, name) <= 0:
            _fail(where, f"cpt.{name}", "must be positive")
    if c.eval_variants < 0:
        _fail(where, "cpt.eval_variants", "must be 0 or more")


def _validate_rl(recipe: Recipe, where: str) -> None:
    _validate_contrasts(recipe, where)
    r = recipe.rl
    if recipe.beta <= 0:
        _fail(where, "beta", "must be positive (the KL penalty to the reference)")
    if r.num_generations < 2:
        _fail(where, "rl.num_generations", "at least 2 (the group is the baseline)")
    if recipe.per_device_train_batch_size % r.num_generations:
        _fail(
            where,
            "per_device_train_batch_size",
            f"{recipe.per_device_train_batch_size} completions per step must be a multiple of "
            f"rl.num_generations {r.num_generations}",
        )
    if r.max_completion_length <= 0 or r.length_tolerance <= 0:
        _fail(where, "rl", "max_completion_length and length_tolerance must be positive")
    if r.scale_rewards not in ("group", "batch", "none"):
        _fail(where, "rl.scale_rewards", f"{r.scale_rewards!r} not in group, batch, none")
    unknown = sorted(set(r.reward_weights) - set(REWARD_SOURCES))
    if unknown:
        _fail(
            where, "rl.reward_weights", f"unknown reward {unknown[0]!r} (known: {', '.join(REWARD_SOURCES)})"
        )
    if not any(float(w) != 0 for w in r.reward_weights.values()):
        _fail(where, "rl.reward_weights", "every weight is 0; nothing to learn from")
    if float(r.reward_weights.get("reward_model", 0)) != 0 and not r.reward_adapter:
        _fail(
            where,
            "rl.reward_adapter",
            "missing, but rl.reward_weights.reward_model is not 0 "
            "(train one with `rag-persona train reward`, or set its weight to 0)",
        )


def _validate_xattn(recipe: Recipe, where: str) -> None:
    _validate_contrasts(recipe, where)
    x = recipe.xattn
    if recipe.max_steps <= 0:
        _fail(where, "max_steps", "must be positive (the xattn stage counts steps, not epochs)")
    if recipe.warmup_steps != int(recipe.warmup_steps):
        _fail(where, "warmup_steps", "the xattn stage takes a whole number of steps")
    if recipe.max_train_examples is not None:
        _fail(where, "max_train_examples", "the xattn stage trains on every row that fits max_length")
    for name in ("rank", "alpha", "gate_lr", "max_minutes", "fact_focus"):
        if getattr(x, name) <= 0:
            _fail(where, f"xattn.{name}", "must be positive")
    for name in ("copy_rows", "copy_distractors", "eval_steps"):
        if getattr(x, name) < 0:
            _fail(where, f"xattn.{name}", "must be 0 or more")


# -- loading ----------------------------------------------------------------------------------------------

_BLOCKS = {"lora": LoraRecipe, "cpt": CptRecipe, "rl": RlRecipe, "xattn": XattnRecipe}


def _type_name(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    if typing.get_origin(hint) is dict:
        return f"a mapping to {_type_name(typing.get_args(hint)[1])}"
    return {int: "a whole number", float: "a number", bool: "true or false", str: "text"}.get(hint, str(hint))


def _fits(value, hint) -> bool:
    """Whether a YAML value has the field's type (an int is a float; a bool is not a number)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_fits(v, typing.get_args(hint)[0]) for v in value)
    if origin is dict:
        value_hint = typing.get_args(hint)[1]
        return isinstance(value, dict) and all(
            isinstance(k, str) and _fits(v, value_hint) for k, v in value.items()
        )
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _yaml_number(value) -> float | None:
    """A number PyYAML left as text (1e-4, 5E-6), else None."""
    if not isinstance(value, str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and value.strip().lower() not in ("nan", "inf", "-inf") else None


def _unknown(where: str, key: str, known) -> RagPersonaError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(known), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return RagPersonaError(f"{where}: field '{key}': unknown ({hint}known: {', '.join(known)})")


def _from_dict(cls, data: dict, where: str, prefix: str = ""):
    """Build a recipe dataclass from a mapping; the first unknown key or wrong type is one error line."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in hints:
            raise _unknown(where, f"{prefix}{key}", names)
    kwargs = {}
    for key, value in data.items():
        if key in _BLOCKS and cls is Recipe:
            if value is None:
                continue
            if not isinstance(value, dict):
                _fail(where, key, "expected a mapping")
            kwargs[key] = _from_dict(_BLOCKS[key], value, where, f"{key}.")
        elif not _fits(value, hints[key]):
            number = _yaml_number(value)  # PyYAML (YAML 1.1) reads 1e-4 as text: "1.0e-4" is its number
            if number is None or not _fits(number, hints[key]):
                _fail(where, f"{prefix}{key}", f"expected {_type_name(hints[key])}, got {value!r}")
            kwargs[key] = number
        else:
            kwargs[key] = value
    if cls is Recipe:
        for required in ("name", "stage"):
            if required not in kwargs:
                _fail(where, required, "missing")
    return cls(**kwargs)


def recipe_from_dict(data: dict, where: str = "recipe") -> Recipe:
    """A validated recipe from a mapping (a parsed YAML file)."""
    if not isinstance(data, dict):
        raise RagPersonaError(f"{where}: expected a mapping of recipe fields")
    return _from_dict(Recipe, data, where).validate(where)


def bundled_recipes() -> list[Path]:
    """Every recipe shipped in training/recipes/."""
    return sorted(RECIPES_DIR.glob("*.yaml"))


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file path, or the name of a bundled one (training/recipes/NAME.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = RECIPES_DIR / f"{path.stem if path.suffix == '.yaml' else name_or_path}.yaml"
    if bundled.is_file():
        return bundled
    known = ", ".join(p.stem for p in bundled_recipes())
    raise RagPersonaError(f"{path}: recipe not found (bundled recipes: {known})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping: PyYAML keeps the last silently, so
    a recipe edited by appending `learning_rate: ...` would train with whichever came last unnoticed."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` is merged by the parent class
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                repeated = key in seen
            except TypeError:  # an unhashable key: the parent class names it in one line
                continue
            if repeated:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_recipe_file(path: Path) -> dict:
    """The parsed YAML mapping of a recipe file; one line naming the file (and line) when it is not one."""
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except UnicodeDecodeError as exc:
        raise RagPersonaError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise RagPersonaError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise RagPersonaError(f"{path}: expected a mapping of recipe fields")
    return data


def apply_overrides(data: dict, overrides: dict) -> dict:
    """The recipe mapping with command-line overrides laid over it (None: not given).

    A block's override is a mapping merged into the recipe's block: `rl={"reward_adapter": path}`.
    """
    out = dict(data)
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in typing.get_type_hints(Recipe):
            raise _unknown("recipe override", key, [f.name for f in dataclasses.fields(Recipe)])
        if key in _BLOCKS and isinstance(value, dict):
            value = {**(out.get(key) or {}), **{k: v for k, v in value.items() if v is not None}}
        out[key] = value
    return out


def load_recipe(name_or_path: str | Path, **overrides) -> Recipe:
    """Load, override and validate a recipe file or bundled recipe name."""
    path = find_recipe(name_or_path)
    return recipe_from_dict(apply_overrides(read_recipe_file(path), overrides), str(path))
