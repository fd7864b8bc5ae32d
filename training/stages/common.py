"""The skeleton every LoRA training stage shares: mode (LoRA/QLoRA), seeding, model, LoRA, trainer, run folder.

A stage (training.stages.sft, dpo, cpt, reward, rl) is a short function over these public steps:

    run, data, loaded, eos_id, stops = begin(recipe, out, options)  # mode picked, seeded, rows and base loaded
    model, peft_config, lineage = adapter_for_training(run, loaded.model)   # init_adapter or a fresh LoRA
    with run.folder() as work:                    # becomes the output folder only when the block succeeds
        trainer = build_trainer(<trl or transformers trainer>, run, args=<config>(**common_args(run, work)), ...)
        metrics = train_and_evaluate(trainer, run.progress, evaluate=eval_loss(trainer, run.progress))
        save_adapter(trained_model(trainer), work)
        run.finish(work, metrics | run.info(...), history, manifest)   # recipe, manifests, metrics, curve
    return run.done(metrics, "adapter, ...", model)

sft and dpo share all of it as `train_labelled`. An output folder holds the weights plus `recipe.yaml`,
`data_manifest.json`, `metrics.json`, `log_history.json` and `loss.png` (training.stages.records).
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rag_persona.errors import RagPersonaError
from rag_persona.utils.io import atomic_folder, check_replaceable
from rag_persona.utils.tokens import eos_token_ids, generation_eos_ids
from training.data.labels import (
    Tokenized,
    audit_tokenized,
    read_rows,
    require_clean,
    resolve_eos_id,
    tokenize_rows,
)
from training.provenance import versions
from training.recipes import Recipe

from .checkpoints import checkpoint_folder, evaluate_before, last_checkpoint
from .lora import lora_config
from .records import RUN_MARKER, clean, data_manifest, lineage, write_run_files

Progress = Callable[[str], None]


# -- device and mode --------------------------------------------------------------------------------------


@dataclass
class Mode:
    device: str
    method: str
    quantized: bool
    reason: str
    dtype: str = field(init=False)  # the base's: nf4, or the device's compute dtype (bfloat16 / float32)

    def __post_init__(self):
        from rag_persona.generation import compute_dtype
        from rag_persona.utils.hardware import dtype_name

        self.dtype = "nf4" if self.quantized else dtype_name(compute_dtype(self.device))

    def describe(self) -> str:
        return f"{self.method} on {self.device}, {self.dtype} base ({self.reason})"


def pick_mode(recipe: Recipe, cuda: bool | None = None) -> Mode:
    """QLoRA (4-bit bitsandbytes base) on CUDA, plain LoRA on the CPU's dtype (bf16 where native, else fp32)."""
    if cuda is None:
        from rag_persona.generation import cuda_available

        cuda = cuda_available()
    if recipe.quantization == "4bit":
        if not cuda:
            raise RagPersonaError(
                f"recipe {recipe.name}: quantization 4bit needs CUDA (bitsandbytes); none is present"
            )
        return Mode("cuda", "QLoRA", True, "4-bit, requested by the recipe")
    if recipe.quantization == "none":
        return Mode("cuda" if cuda else "cpu", "LoRA", False, "no quantization, requested by the recipe")
    if cuda:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:  # an optional dependency (the gpu extra)
            return Mode(
                "cuda", "LoRA", False, "CUDA found but bitsandbytes is missing (pip install '.[gpu]')"
            )
        return Mode("cuda", "QLoRA", True, "CUDA found: 4-bit")
    return Mode("cpu", "LoRA", False, "no CUDA: fp32 adapter")


def seed_and_threads(recipe: Recipe, progress: Progress, *, threads: bool = True) -> list[float]:
    """The one seed rule (recipe.seed seeds Python, NumPy and torch) and the CPU threads; returns the load."""
    import torch
    from transformers import set_seed

    set_seed(recipe.seed)
    if threads and recipe.cpu_threads:
        torch.set_num_threads(recipe.cpu_threads)
    load = [round(x, 2) for x in os.getloadavg()]
    progress(f"torch threads {torch.get_num_threads()}, load average {load[0]} on {os.cpu_count()} cores")
    return load


# -- the run ----------------------------------------------------------------------------------------------


@dataclass
class RunOptions:
    """How a stage runs besides its recipe: where progress lines go, CUDA (None: detect), keep the model."""

    progress: Progress = print
    cuda: bool | None = None
    keep_model: bool = False  # the trained model in the result, under "model" (tests inspect its weights)


@dataclass
class Run:
    """One training run under way: its recipe, output folder, device mode and start."""

    recipe: Recipe
    out: Path
    mode: Mode
    progress: Progress
    started: float = field(default_factory=time.time)
    load: list[float] = field(default_factory=list)
    keep_model: bool = False

    def info(self, source: str, tokenizer, eos_id: int) -> dict:
        """The metrics every stage records: what ran, on what, with which versions."""
        import torch

        r = self.recipe
        return {
            "recipe": r.name,
            "stage": r.stage,
            "base_model": r.base_model,
            "base_source": source,
            "persona": r.persona,
            "mode": asdict(self.mode),
            "eos_id": eos_id,
            "eos_token": tokenizer.convert_ids_to_tokens(eos_id),
            "seconds": round(time.time() - self.started, 1),
            "threads": torch.get_num_threads(),
            "load_average_at_start": self.load,
            "versions": versions("trl"),
        }

    @contextmanager
    def folder(self) -> Iterator[Path]:
        """A hidden work folder that becomes the output folder when the block ends without error; the
        run's checkpoints go with it then (until then they let a re-run resume)."""
        what = f"a {self.recipe.stage} run"
        with atomic_folder(self.out, marker=RUN_MARKER, what=what) as work:
            yield work
        shutil.rmtree(self.checkpoints, ignore_errors=True)

    @property
    def checkpoints(self) -> Path:
        """The trainer's checkpoints: beside the output folder, outside the work folder that an error removes."""
        return self.out.parent / f".{self.out.name}.checkpoints"

    def finish(self, work: Path, metrics: dict, history: list[dict], manifest: dict, **plot) -> None:
        """Stamp the run time and write the provenance files next to the weights in `work`."""
        metrics["seconds"] = round(time.time() - self.started, 1)
        write_run_files(work, self.recipe, metrics, history, manifest, **plot)

    def done(self, metrics: dict, saved: str, model) -> dict:
        """Report what was saved where; the metrics with the output path (and the model, if kept)."""
        self.progress(f"saved {saved} to {self.out}")
        metrics["output"] = str(self.out)
        if self.keep_model:
            metrics["model"] = model
        return metrics


def start_run(recipe: Recipe, out: Path, options: RunOptions) -> Run:
    """Pick and report the mode, seed everything, set CPU threads."""
    started, progress = time.time(), options.progress
    # Checked again when the folder is swapped in; here so a foreign folder is named before the model loads.
    check_replaceable(out.absolute(), RUN_MARKER, f"a {recipe.stage} run")
    mode = pick_mode(recipe, options.cuda)
    progress(f"{recipe.stage.upper()} {recipe.name}: {mode.describe()}")
    load = seed_and_threads(recipe, progress, threads=mode.device == "cpu")
    return Run(recipe, out, mode, progress, started, load, options.keep_model)


# -- model, tokenizer, data -------------------------------------------------------------------------------


def begin(recipe: Recipe, out: Path, options: RunOptions):
    """(run, its data, the loaded base, the EOS id for labels, every stop id): the start of a stage on rows."""
    run = start_run(recipe, out, options)
    data = read_recipe_data(recipe)
    loaded = load_model(run)
    eos_id, stops = eos_ids(loaded.model, loaded.tokenizer)
    return run, data, loaded, eos_id, stops


def load_model(run: Run):
    """The recipe's base causal LM in the run's mode (rag_persona.generation.load_causal_lm)."""
    from rag_persona.generation import load_causal_lm

    r = run.recipe
    return load_causal_lm(
        r.base_model, load_in_4bit=run.mode.quantized, device=run.mode.device, progress=run.progress
    )


def eos_ids(model, tokenizer) -> tuple[int, set[int]]:
    """(the EOS id appended to labels (training.data.labels.resolve_eos_id), every id that ends generation)."""
    stops = eos_token_ids(model, tokenizer)
    eos_id = resolve_eos_id(tokenizer, stops)
    return eos_id, set(stops) | {eos_id}


def saved_generation_eos_ids(source: str) -> list[int]:
    """The EOS ids of a model folder's generation config, without loading its weights ([] if it has none)."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(source)
    except OSError:
        return []
    return generation_eos_ids(SimpleNamespace(generation_config=config))


def load_tokenizer(model: str | None = None):
    """(tokenizer, generation EOS ids, source) of a bundled alias, hub id or local folder, without weights."""
    from transformers import AutoTokenizer

    from rag_persona.generation import resolve_model_path

    source = resolve_model_path(model, progress=lambda m: None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except OSError as exc:
        raise RagPersonaError(
            f"model {source}: cannot load its tokenizer ({str(exc).splitlines()[0]})"
        ) from exc
    return tokenizer, saved_generation_eos_ids(source), source


def require_adapter(path: str | Path, hint: str, what: str = "an adapter folder") -> Path:
    """The folder, if it holds a peft adapter; else one line saying what to train first."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise RagPersonaError(f"{path}: not {what} (no adapter_config.json); {hint}")
    return path


@dataclass
class RecipeData:
    """The recipe's train and (optional) eval files and their rows."""

    train_path: Path
    eval_path: Path | None
    train_rows: list
    eval_rows: list | None

    def totals(self) -> dict:
        return {"train": len(self.train_rows), "eval": len(self.eval_rows) if self.eval_rows else 0}


def _resolve(path: str | None, base: Path) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    return p if p.is_absolute() else base / p


def read_recipe_data(recipe: Recipe) -> RecipeData:
    """The recipe's train and (optional) eval files under its data_dir, and their rows."""
    data_dir = Path(recipe.data_dir)
    train_path = _resolve(recipe.train_file, data_dir)
    eval_path = _resolve(recipe.eval_file, data_dir)
    return RecipeData(
        train_path, eval_path, read_rows(train_path), read_rows(eval_path) if eval_path else None
    )


def subset(rows: list, n: int | None, seed: int) -> list:
    """A seeded sample of n rows in their file order (all rows when n is None or not smaller)."""
    if n is None or n >= len(rows):
        return rows
    picked = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in picked]


@dataclass
class Examples:
    """Tokenised, audited training and eval examples, and the rows they came from."""

    train: Tokenized
    eval: Tokenized | None
    audit: list
    used_rows: list


def tokenized_examples(
    run: Run, tokenizer, data: RecipeData, eos_id: int, stops: set[int], *, kind: str, unit: str = "example"
) -> Examples:
    """The recipe's subsets of rows as token-level examples (training.data.labels), their labels audited."""
    r = run.recipe
    used = subset(data.train_rows, r.max_train_examples, r.seed)
    train = tokenize_rows(tokenizer, used, eos_id, kind=kind, max_length=r.max_length)
    if not train.examples:
        raise RagPersonaError(f"{data.train_path}: no {unit} fits max_length {r.max_length}")
    evald = None
    if data.eval_rows:
        held = subset(data.eval_rows, r.max_eval_examples, r.seed)
        evald = tokenize_rows(tokenizer, held, eos_id, kind=kind, max_length=r.max_length)
    audit = audit_tokenized(tokenizer, train, stops)
    require_clean(audit, "training")
    if evald:
        require_clean(audit_tokenized(tokenizer, evald, stops), "eval")
    return Examples(train, evald, audit, used)


def audit_summary(audit: list) -> dict:
    return {"checked": len(audit), "failed": sum(not r.ok for r in audit)}


# -- LoRA -------------------------------------------------------------------------------------------------


def kbit_ready(run: Run, model):
    """A 4-bit base prepared for training (QLoRA); a bf16 / fp32 base as it is."""
    if not run.mode.quantized:
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)


def adapter_for_training(run: Run, model, *, reference: str = "", fresh: str = ""):
    """(model, peft_config, lineage): the recipe's init_adapter continued, or a fresh LoRA for the trainer.

    `reference` says what the continued adapter's frozen copy serves as, `fresh` what a fresh LoRA's does.
    """
    model = kbit_ready(run, model)
    init = run.recipe.init_adapter
    if not init:
        if fresh:
            run.progress(fresh)
        return model, lora_config(run.recipe, model), None
    from peft import PeftModel

    init = require_adapter(init, "train the SFT stage first")
    model = PeftModel.from_pretrained(model, str(init), is_trainable=True)
    run.progress(
        f"continuing adapter {init}" + (f" (its frozen copy is the {reference})" if reference else "")
    )
    return model, None, lineage(init)


def save_adapter(model, folder: Path, **kwargs) -> None:
    """The trained "default" adapter only (a GRPO/DPO "ref" copy stays behind), without peft's model card."""
    model.save_pretrained(str(folder), selected_adapters=["default"], **kwargs)
    (folder / "README.md").unlink(missing_ok=True)


# -- trainer ----------------------------------------------------------------------------------------------


def common_args(run: Run, work: Path) -> dict:
    """TrainingArguments shared by every trainer config: batch, schedule, seeding, device, logging."""
    r, mode = run.recipe, run.mode
    return dict(
        output_dir=str(checkpoint_folder(run) if r.save_steps else work / "checkpoints"),
        per_device_train_batch_size=r.per_device_train_batch_size,
        per_device_eval_batch_size=r.per_device_train_batch_size,
        gradient_accumulation_steps=r.gradient_accumulation_steps,
        learning_rate=r.learning_rate,
        lr_scheduler_type=r.lr_scheduler_type,
        warmup_steps=r.warmup_steps,
        weight_decay=r.weight_decay,
        num_train_epochs=r.num_train_epochs,
        max_steps=r.max_steps,
        logging_steps=r.logging_steps,
        save_strategy="steps" if r.save_steps else "no",
        save_steps=r.save_steps or 500,
        save_total_limit=1,
        eval_strategy="no",
        report_to=[],
        seed=r.seed,
        data_seed=r.seed,
        bf16=mode.device == "cuda",
        use_cpu=mode.device == "cpu",
        gradient_checkpointing=(
            mode.quantized if r.gradient_checkpointing is None else r.gradient_checkpointing
        ),
        disable_tqdm=not sys.stderr.isatty(),
        dataloader_num_workers=0,
    )


def progress_callback(progress: Progress):
    """A TrainerCallback printing one line per log: step, losses/rewards, elapsed time and ETA."""
    from transformers import TrainerCallback

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

    class Progress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            # A resumed run starts at its checkpoint's step: the ETA counts only the steps run here.
            self.started, self.first_step = time.time(), state.global_step
            progress(f"training: {state.max_steps} steps")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or state.max_steps <= 0:
                return
            elapsed = time.time() - getattr(self, "started", time.time())
            done = state.global_step - getattr(self, "first_step", 0)
            eta = elapsed / max(done, 1) * (state.max_steps - state.global_step)
            shown = " ".join(f"{k}={logs[k]:.4g}" for k in keys if isinstance(logs.get(k), int | float))
            if shown:
                progress(
                    f"step {state.global_step}/{state.max_steps} {shown} elapsed {elapsed:.0f}s eta {eta:.0f}s"
                )

    return Progress()


def quiet_printer(trainer):
    """Our progress lines replace the Trainer's raw log dicts when stderr is a log file."""
    if not sys.stderr.isatty():
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer


def build_trainer(trainer_class, run: Run, *, model, args, train_dataset, eval_dataset=None, **extra):
    """A library trainer with our progress lines (and without its raw log dicts on a non-terminal)."""
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        callbacks=[progress_callback(run.progress)],
        **extra,
    )
    return quiet_printer(trainer)


def eval_loss(trainer, progress: Progress, what: str = "examples") -> Callable[[str], dict] | None:
    """Held-out loss before and after training (eval_before, eval_after), if the trainer has eval data."""
    if trainer.eval_dataset is None:
        return None

    def evaluate(when: str) -> dict:
        if when == "before":
            progress(f"evaluating on {len(trainer.eval_dataset)} held-out {what} before training")
        else:
            progress("evaluating after training")
        return {f"eval_{when}": clean(trainer.evaluate())}

    return evaluate


def train_and_evaluate(
    trainer, progress: Progress, *, evaluate: Callable[[str], dict] | None = None, note: str = ""
) -> dict:
    """Held-out metrics before (evaluate("before")), training, held-out metrics after: every stage's core."""
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    progress(f"trainable parameters: {trainable:,}{note}")
    metrics: dict = {"trainable_parameters": trainable}
    resume = last_checkpoint(trainer)
    if evaluate:
        metrics.update(evaluate_before(trainer, evaluate, progress, resuming=bool(resume)))
    if resume:
        progress(f"resuming from {resume}")
    result = trainer.train(resume_from_checkpoint=resume)
    metrics["resumed_from_step"] = int(resume.rsplit("-", 1)[1]) if resume else 0
    metrics["train"] = clean(result.metrics)
    metrics["train_loss"] = result.training_loss
    if resume:  # the Trainer averages only the steps after the resume; the restored log has them all
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        metrics["train_loss"] = sum(losses) / len(losses) if losses else None
    metrics["steps"] = trainer.state.global_step
    if evaluate:
        metrics.update(evaluate("after"))
    return metrics


def trained_model(trainer):
    """The trainer's model with the trained "default" adapter active (not trl's frozen "ref" copy)."""
    model = trainer.model
    if hasattr(model, "peft_config") and "ref" in model.peft_config:
        model.set_adapter("default")
    return model


# -- the run of the stages that train on labelled token ids (sft, dpo) --------------------------------------


def train_labelled(
    recipe: Recipe,
    out: Path,
    options: RunOptions,
    *,
    trainer_class: Callable,
    config: Callable,
    extra_pairs: Callable | None = None,
    reference: str = "",
) -> dict:
    """Rows → audited token ids → `trainer_class()` with `config(run, work)` → adapter folder.

    `extra_pairs(run, tokenizer, examples, eos_id, stops)` may add training examples; it returns metrics.
    """
    from datasets import Dataset

    run, data, loaded, eos_id, stops = begin(recipe, out, options)
    progress = run.progress
    model, tokenizer = loaded.model, loaded.tokenizer
    progress(f"EOS appended as token id {eos_id} ({tokenizer.convert_ids_to_tokens(eos_id)!r})")
    ex = tokenized_examples(run, tokenizer, data, eos_id, stops, kind=recipe.stage)
    progress(
        f"{len(ex.train.examples)} training examples ({len(ex.train.dropped_too_long)} over "
        f"{recipe.max_length} tokens dropped); labels audited: all end in EOS id {eos_id}, no special-token text"
    )
    extra = extra_pairs(run, tokenizer, ex, eos_id, stops) if extra_pairs else {}
    model, peft_config, from_adapter = adapter_for_training(run, model, reference=reference)
    with run.folder() as work:
        trainer = build_trainer(
            trainer_class(),
            run,
            model=model,
            args=config(run, work),
            train_dataset=Dataset.from_dict(ex.train.columns()),
            eval_dataset=Dataset.from_dict(ex.eval.columns()) if ex.eval and ex.eval.examples else None,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
        metrics = train_and_evaluate(trainer, progress, evaluate=eval_loss(trainer, progress))
        history = list(trainer.state.log_history)
        model = trained_model(trainer)
        save_adapter(model, work)
        manifest = data_manifest(data.train_path, data.eval_path, ex.train, ex.eval, data.totals())
        metrics.update(
            run.info(loaded.source, tokenizer, eos_id)
            | {
                "train_examples": len(ex.train.examples),
                "eval_examples": len(ex.eval.examples) if ex.eval else 0,
                "label_audit": audit_summary(ex.audit),
                **extra,
                "init_adapter": recipe.init_adapter,
                "lineage": from_adapter,
            }
        )
        run.finish(work, metrics, history, manifest)
    return run.done(metrics, "adapter, recipe, data manifest, metrics and loss curve", model)
