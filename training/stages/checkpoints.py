"""Resumable training: where a run's checkpoints live, when they may be resumed, and the newest complete one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from rag_persona.utils.io import atomic_write_text

# Recipe fields that do not change what is trained: a run resumed with other values continues the same run.
RESUME_IGNORES = ("cpu_threads", "logging_steps", "save_steps", "output_dir", "notes")


def fingerprint(run) -> dict:
    """What must match for a checkpoint to be resumed: the recipe, and every file the run reads as it is
    now (size and modification time): data rows, knowledge (CPT, replay, closed-book), a local base
    model folder, the init and reward adapters."""
    from .cpt import cpt_knowledge_dir  # here: cpt imports common, which imports this

    r = run.recipe
    files = [] if r.stage == "cpt" else [Path(r.data_dir) / f for f in (r.train_file, r.eval_file) if f]
    if r.stage == "cpt" or r.replay or r.closed_book:
        files += sorted(p for p in cpt_knowledge_dir(r).rglob("*") if p.is_file())
    folders = [r.init_adapter, r.rl.reward_adapter if r.stage == "rl" else None, r.base_model]
    for folder in filter(None, folders):
        if Path(folder).is_dir():
            files += sorted(Path(folder).glob("*.safetensors"))
    stats = {str(f): [f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()}
    recipe = {k: v for k, v in r.to_dict().items() if k not in RESUME_IGNORES}
    return {"recipe": recipe, "files": stats}


def checkpoint_folder(run) -> Path:
    """The checkpoint folder for this run, emptied first if it holds another run's checkpoints."""
    folder, stamp = run.checkpoints, run.checkpoints / "run.json"
    mine = json.loads(json.dumps(fingerprint(run)))
    if folder.is_dir():
        try:
            same = json.loads(stamp.read_text(encoding="utf-8")) == mine
        except (OSError, ValueError):
            same = False
        if not same:
            run.progress(f"{folder}: checkpoints of another recipe or data, discarded")
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stamp, json.dumps(mine, ensure_ascii=False))
    return folder


def last_checkpoint(trainer) -> str | None:
    """The newest checkpoint an interrupted run of the same recipe left in the trainer's output folder."""
    from transformers.trainer_utils import get_last_checkpoint

    args = trainer.args
    if args.save_strategy == "no" or not os.path.isdir(args.output_dir):
        return None
    # A process killed while saving leaves a checkpoint without its trainer_state.json (written last):
    # removed, so the newest complete one is found.
    for folder in Path(args.output_dir).glob("checkpoint-*"):
        try:
            json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            shutil.rmtree(folder, ignore_errors=True)
    return get_last_checkpoint(args.output_dir)


def evaluate_before(trainer, evaluate, progress, *, resuming: bool) -> dict:
    """The held-out metrics before training: measured once per run and read back when an interrupted run
    resumes (on a 1.5B DPO run that evaluation costs ~13 min of CPU, paid again on every resume otherwise)."""
    args = trainer.args
    kept = Path(args.output_dir) / "eval_before.json" if args.save_strategy != "no" else None
    if kept is not None and resuming:
        try:
            metrics = json.loads(kept.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
        else:
            progress(f"held-out metrics before training: read back from {kept}")
            return metrics
    metrics = evaluate("before")
    if kept is not None and kept.parent.is_dir():
        atomic_write_text(kept, json.dumps(metrics))
    return metrics
