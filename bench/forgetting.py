"""Knowledge injection study (issue 22): how much SFT forgets of what CPT taught, and what prevents it.

The users inject knowledge by continued pre-training (CPT, a LoRA merged into the base) and then teach the
chat register by SFT. On the bundled 0.5B (CPU or a lent GPU; LoRA on a bf16 base, or float32 on CPUs
without native bf16, the "ran on" column says which), this runs:

- one CPT model per CPT lora_alpha (128, 32): recipe cpt-0.5b-cpu-3ep (3 epochs, LoRA r 8 on the top 12
  layers + embed_tokens) with only lora_alpha changed;
- SFT cells on each merged CPT model: recipe sft-after-cpt-0.5b-cpu (384 お嬢様 rows, 1 epoch, lr 3e-4, top
  12 layers) with SFT lora_alpha 8 or 32 x target modules attention+MLP or attention only (the users' grid);
- mitigations on the alpha-128 CPT model, each a change to one grid cell (SFT alpha 32, attention+MLP by
  default, `--mitigation-base`): replay (CPT blocks are 10% / 30% of the SFT examples, recipe field
  `replay`), SFT on the layers CPT did not touch (0-11, recipe field `lora.layers`; every grid cell already
  trains the layers CPT trained, the top 12), a third of the SFT learning rate (1e-4), and closed-book
  copies of the SFT fact rows about facts no recall question asks (recipe field `closed_book`);
- references: closed-book recall of the plain base model, and SFT on the base without CPT.

Recipes are built in code from the two bundled recipes plus each cell's overrides (no file per cell); the
run folder of each training run saves the full recipe.yaml and each result JSON repeats it. Every cell is
seeded (42); `--seeds 43` adds the chosen SFT cells again with seed 43 (the CPT model stays the seed-42 one).

Per cell: closed-book fact recall (persona prompt, no retrieved context, greedy; training.recall) on
held-out wordings (knowledge/ojousama/queries/test.jsonl questions about one fact: never in the CPT text,
never in the SFT data) and on the facts' own questions (40 facts as `fact-recall --n 40`; CPT's qa documents
contain these wordings), after CPT and after SFT; the persona evaluation with retrieval on held-out prompts
(runs/data/eval_prompts.jsonl: style, EOS, median length, fact accuracy = RAG); the L2 of the SFT adapter's
ΔW (= ‖CPT→SFT model − CPT model‖₂, training.merging.task_vectors); wall time.

Resumable: a cell whose bench/results/forgetting/<cell>/result.json exists is skipped; a trained adapter
under runs/forgetting/<cell>/ is evaluated without retraining; the CPT adapters are kept (adapter + recipe,
metrics, data manifest) in bench/results/forgetting/cpt-alpha<N>/ and re-merged into the base when the
merged model under runs/forgetting/ is missing. Training checkpoints every 25 steps (Recipe.save_steps), so
a run killed mid-training resumes; an evaluation starts again. The table and plot are rewritten after every
finished cell.

Knowledge probe (per model, `--probe` adds it to finished cells): the mean NLL per token of the persona's
fact texts as plain text (no chat template; training.recall.text_nll) and of a control set (the other
personas' facts, never injected). NLL kept = (base − model) / (base − CPT model) on the fact texts: what
the weights still hold of the injected text, apart from whether the chat-tuned model says it.

    python bench/forgetting.py --list                        # the plan, estimated minutes, what is done
    python bench/forgetting.py --budget-minutes 100          # run what is missing; start nothing after 100 min
    python bench/forgetting.py --cells cpt128-sft32-attn_mlp-s42 --seeds 43   # that cell with seed 43 too
    python bench/forgetting.py --table                       # only rewrite the table and plot
    python bench/forgetting.py --probe                       # add the knowledge probe to finished cells
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rag_persona.errors import RagPersonaError  # noqa: E402

CPT_RECIPE = "cpt-0.5b-cpu-3ep"
SFT_RECIPE = "sft-after-cpt-0.5b-cpu"
PERSONA = "ojousama"
SEED = 42
CPT_ALPHAS = (128, 32)
SFT_ALPHAS = (8, 32)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MODULES = {"attn_mlp": [*ATTENTION, "gate_proj", "up_proj", "down_proj"], "attn": ATTENTION}
MODULE_LABELS = {"attn_mlp": "attention+MLP", "attn": "attention"}
# Each mitigation: recipe overrides laid over its base cell's SFT recipe (blocks merged key by key).
MITIGATIONS: dict[str, dict] = {
    "replay10": {"replay": 0.1},
    "replay30": {"replay": 0.3},
    "layers0-11": {"lora": {"top_layers": None, "layers": list(range(12))}},
    "lr1e-4": {"learning_rate": 1e-4},
    # The knowledge probe shows SFT keeps most of what CPT stored but stops the chat answers from using it;
    # these rows show the chat format answering with no retrieved facts, on facts recall never asks.
    "closedbook": {"closed_book": 1.0},
}
MITIGATION_CPT = 128
MITIGATION_BASE = "sft32-attn_mlp"
RESULTS = ROOT / "bench/results/forgetting"
RUNS = ROOT / "runs/forgetting"
TABLE = ROOT / "bench/results/forgetting.md"
GOAL = {"kept": 0.8, "style": 0.9, "eos": 1.0}
# Estimates before any cell of the kind finished (1 torch thread on 2 busy cores); measured ones replace them.
DEFAULT_SECONDS = {"cpt_step": 9.0, "sft_step": 5.0, "low_layers_factor": 1.7, "reply": 4.0, "sft_reply": 2.5}


def _log(msg: str) -> None:
    print(f"[bench/forgetting {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- cells ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One measured unit: a recall-only model (sft None: a CPT model or the base) or an SFT run on one."""

    cpt: int | None  # CPT lora_alpha; None: the bundled base without CPT
    sft: int | None = None  # SFT lora_alpha; None: no SFT (closed-book recall of the model itself)
    modules: str = ""
    mitigation: str = ""
    seed: int = SEED

    @property
    def kind(self) -> str:
        return "sft" if self.sft else ("cpt" if self.cpt else "base")

    @property
    def name(self) -> str:
        if self.sft is None:
            return f"cpt-alpha{self.cpt}" if self.cpt else "base"
        parts = [f"cpt{self.cpt}" if self.cpt else "base", f"sft{self.sft}", self.modules]
        return "-".join([*parts, *([self.mitigation] if self.mitigation else []), f"s{self.seed}"])

    @property
    def parent(self) -> Cell | None:
        """The recall-only cell of the model this SFT cell trains on."""
        return Cell(self.cpt) if self.sft else None


_SFT_NAME = re.compile(
    r"^(?:cpt(?P<cpt>\d+)|base)-sft(?P<sft>\d+)-(?P<modules>attn_mlp|attn)(?:-(?P<mit>[\w.-]+?))?-s(?P<seed>\d+)$"
)


def parse_cell(name: str) -> Cell:
    """The cell a name stands for; one line naming the name and the known forms when it is none."""
    if name == "base":
        return Cell(None)
    m = re.fullmatch(r"cpt-alpha(\d+)", name)
    if m:
        return Cell(int(m.group(1)))
    m = _SFT_NAME.match(name)
    if m and (m["mit"] or "") in ("", *MITIGATIONS) and int(m["sft"]) > 0:
        cpt = int(m["cpt"]) if m["cpt"] else None
        return Cell(cpt, int(m["sft"]), m["modules"], m["mit"] or "", int(m["seed"]))
    raise RagPersonaError(
        f"--cells: {name!r} is not a cell name (forms: base, cpt-alpha128, cpt128-sft8-attn_mlp-s42, "
        f"cpt128-sft32-attn-<mitigation>-s42 with mitigation one of {', '.join(MITIGATIONS)})"
    )


def default_plan(mitigation_base: str = MITIGATION_BASE) -> list[Cell]:
    """CPT alpha 128, its grid and the mitigations; CPT alpha 32 and its grid; then the references."""
    m = re.fullmatch(r"sft(\d+)-(attn_mlp|attn)", mitigation_base)
    if not m:
        raise RagPersonaError(f"--mitigation-base: {mitigation_base!r} is not like sft32-attn_mlp")
    base_alpha, base_modules = int(m.group(1)), m.group(2)
    cells: list[Cell] = []
    for cpt in CPT_ALPHAS:
        cells.append(Cell(cpt))
        cells += [Cell(cpt, a, mod) for a in SFT_ALPHAS for mod in MODULES]
        if cpt == MITIGATION_CPT:
            cells += [Cell(cpt, base_alpha, base_modules, mit) for mit in MITIGATIONS]
    return [*cells, Cell(None), Cell(None, base_alpha, base_modules)]


def plan(names: list[str] | None = None, seeds: list[int] | None = None, mitigation_base=MITIGATION_BASE):
    """The cells to run in order: the chosen ones (default: the whole plan), each SFT cell again per extra
    seed, and every SFT cell's model cell before it."""
    chosen = [parse_cell(n) for n in names] if names else default_plan(mitigation_base)
    out: list[Cell] = []
    for cell in chosen:
        variants = [cell] + [
            dataclasses.replace(cell, seed=s) for s in seeds or [] if cell.sft and s != cell.seed
        ]
        for c in variants:
            if c.parent and c.parent not in out:
                out.append(c.parent)
            if c not in out:
                out.append(c)
    return out


# -- recipes ----------------------------------------------------------------------------------------------


def _recipe_data(name: str) -> dict:
    from training.recipes import find_recipe, read_recipe_file

    return read_recipe_file(find_recipe(name))


def _overlay(data: dict, overrides: dict) -> dict:
    """`overrides` laid over a recipe mapping; a block (a mapping) merged key by key, None kept as None."""
    out = copy.deepcopy(data)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = copy.deepcopy(value)
    return out


def cpt_recipe(alpha: int, threads: int | None = None):
    """cpt-0.5b-cpu-3ep with this CPT lora_alpha, bf16 LoRA on any device."""
    from training.recipes import recipe_from_dict

    data = _overlay(
        _recipe_data(CPT_RECIPE),
        {"name": f"cpt-alpha{alpha}", "lora": {"lora_alpha": alpha}, "seed": SEED, "quantization": "none"},
    )
    data["cpu_threads"] = threads
    return recipe_from_dict(data, f"{CPT_RECIPE} (cell cpt-alpha{alpha})")


def sft_recipe(cell: Cell, base_model: str | Path, data_dir: str | Path, threads: int | None = None):
    """sft-after-cpt-0.5b-cpu on `base_model` with the cell's SFT alpha, modules, seed and mitigation."""
    from training.recipes import recipe_from_dict

    overrides = {
        "name": cell.name,
        "base_model": str(base_model),
        "data_dir": str(data_dir),
        "seed": cell.seed,
        "quantization": "none",
        "cpu_threads": threads,
        "lora": {"lora_alpha": cell.sft, "target_modules": MODULES[cell.modules]},
    }
    data = _overlay(_overlay(_recipe_data(SFT_RECIPE), overrides), MITIGATIONS.get(cell.mitigation, {}))
    if data.get("replay"):
        data["cpt"] = _recipe_data(CPT_RECIPE)["cpt"]  # replay the documents the CPT model was trained on
    return recipe_from_dict(data, f"{SFT_RECIPE} (cell {cell.name})")


# -- the CPT model: trained, or re-merged from the kept adapter ---------------------------------------------

KEPT_FILES = ("recipe.yaml", "metrics.json", "data_manifest.json")


def keep_adapter(run: Path, kept: Path) -> None:
    """Copy a CPT run's adapter and its records (no merged weights) to a folder that can be committed."""
    from rag_persona.utils.io import atomic_folder

    with atomic_folder(kept, marker="recipe.yaml", what="a kept CPT adapter") as work:
        shutil.copytree(run / "adapter", work / "adapter")
        for name in KEPT_FILES:
            shutil.copy2(run / name, work / name)
        if (kept / "result.json").is_file():
            shutil.copy2(kept / "result.json", work / "result.json")


def remerge(kept: Path, out: Path, progress=_log) -> Path:
    """The CPT model again: the kept adapter merged into its recorded base, as `train cpt` merges it."""
    import yaml
    from peft import PeftModel

    from rag_persona.generation import load_causal_lm
    from rag_persona.utils.io import atomic_folder
    from training.stages.cpt import save_merged, untie_embeddings

    recipe = yaml.safe_load((kept / "recipe.yaml").read_text(encoding="utf-8"))
    metrics = json.loads((kept / "metrics.json").read_text(encoding="utf-8"))
    loaded = load_causal_lm(recipe["base_model"], device="cpu", progress=progress)
    if metrics.get("untied_embeddings"):
        untie_embeddings(loaded.model)
    merged = PeftModel.from_pretrained(loaded.model, str(kept / "adapter")).merge_and_unload()
    with atomic_folder(out, marker="recipe.yaml", what="a CPT model folder") as work:
        save_merged(merged, work)
        loaded.tokenizer.save_pretrained(str(work))
        shutil.copytree(kept / "adapter", work / "adapter")
        for name in KEPT_FILES:
            shutil.copy2(kept / name, work / name)
        (work / "remerged_from.json").write_text(json.dumps({"adapter": str(kept / "adapter")}), "utf-8")
    progress(f"re-merged {kept / 'adapter'} into {recipe['base_model']}: {out}")
    return out


def ensure_cpt_model(alpha: int, runs: Path, results: Path, threads: int | None = None) -> Path:
    """runs/forgetting/cpt-alpha<N>: present, re-merged from the kept adapter, or trained (and kept)."""
    out, kept = runs / f"cpt-alpha{alpha}", results / f"cpt-alpha{alpha}"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        if not (kept / "adapter" / "adapter_model.safetensors").is_file():
            keep_adapter(out, kept)
        return out
    if (kept / "adapter" / "adapter_model.safetensors").is_file():
        return remerge(kept, out)
    from training.stages import train

    _log(f"training the CPT model cpt-alpha{alpha} into {out}")
    train(cpt_recipe(alpha, threads), out, progress=_log)
    keep_adapter(out, kept)
    return out


# -- measurements -----------------------------------------------------------------------------------------


def heldout_facts(knowledge: Path, n: int | None = None, seed: int = 0) -> list:
    """Facts whose questions are the retrieval test queries about that one fact (wordings never trained on)."""
    from rag_persona.knowledge.facts import load_knowledge
    from rag_persona.utils.io import read_jsonl
    from training.recall import pick_facts

    facts = {f.id: f for f in load_knowledge(knowledge).facts}
    asked: dict[str, list[str]] = {}
    for _, row in read_jsonl(knowledge / "queries" / "test.jsonl"):
        if len(row.get("relevant", [])) == 1 and row["relevant"][0] in facts:
            asked.setdefault(row["relevant"][0], []).append(row["query"])
    chosen = [dataclasses.replace(f, questions=asked[f.id]) for f in facts.values() if f.id in asked]
    return pick_facts(chosen, n, seed)


def _compact(report: dict) -> dict:
    keep = ("fact_id", "question", "correct", "ended_by_eos", "reply")
    return {"summary": report["summary"], "questions": [{k: q[k] for k in keep} for q in report["questions"]]}


def closed_book(loaded, args) -> dict:
    """Recall without retrieval on held-out wordings and on the facts' own (CPT-seen) wordings."""
    from rag_persona.knowledge.facts import load_knowledge
    from rag_persona.prompts import Persona
    from training.recall import fact_recall, pick_facts

    knowledge = ROOT / "knowledge" / PERSONA
    persona = Persona.load(knowledge)
    sets = {
        "heldout": heldout_facts(knowledge, args.heldout_facts),
        "seen": pick_facts(load_knowledge(knowledge).facts, args.seen_facts, 0),
    }
    out = {}
    for name, facts in sets.items():
        started = time.perf_counter()
        report = fact_recall(loaded, facts, persona, max_new_tokens=64, progress=_every(20))
        out[name] = _compact(report) | {"seconds": round(time.perf_counter() - started, 1)}
        _log(f"closed-book recall ({name} wordings): {report['summary']['accuracy']}")
    return out


def probe_texts() -> dict[str, list[str]]:
    """The injected fact texts (the persona CPT was trained on) and a control set of the same kind of text
    that no run saw (the shipped kansai persona and a seeded sample of the synthetic personas' facts)."""
    import random

    from rag_persona.knowledge.facts import load_knowledge

    injected = [f.text for f in load_knowledge(ROOT / "knowledge" / PERSONA).facts]
    control = [f.text for f in load_knowledge(ROOT / "knowledge" / "kansai").facts]
    synthetic = sorted(p.parent for p in (ROOT / "knowledge" / "_synthetic").glob("*/facts.jsonl"))
    others = [f.text for folder in synthetic for f in load_knowledge(folder).facts]
    control += random.Random(0).sample(others, max(0, min(len(others), len(injected) - len(control))))
    return {"injected": injected, "control": control}


def knowledge_probe(loaded) -> dict:
    """text_nll of the injected facts and of the control set (see the module docstring)."""
    from training.recall import text_nll

    started = time.perf_counter()
    out = {name: text_nll(loaded, texts) for name, texts in probe_texts().items()}
    _log(
        f"knowledge probe: fact-text NLL {out['injected']['nll']:.3f}, control {out['control']['nll']:.3f} "
        f"({time.perf_counter() - started:.0f}s)"
    )
    return out


def _every(n: int):
    count = [0]

    def progress(msg: str) -> None:
        count[0] += 1
        if count[0] % n == 0:
            _log(msg)

    return progress


_RETRIEVER: dict = {}


def persona_eval(loaded, args) -> dict:
    """The persona evaluation with retrieval (the chat path) on the first N held-out prompts."""
    from rag_persona.chat import PersonaChat, default_persona
    from rag_persona.evaluation.evaluate import evaluate_chat, load_prompts, open_retriever
    from rag_persona.generation import GenerationSettings

    if not _RETRIEVER:
        _RETRIEVER["store"], _RETRIEVER["retriever"] = open_retriever(None, PERSONA, log=_log)
    store = _RETRIEVER["store"]
    prompts = load_prompts(Path(args.data) / "eval_prompts.jsonl")[: args.eval_prompts]
    chat = PersonaChat(default_persona(PERSONA), _RETRIEVER["retriever"], loaded, GenerationSettings())
    started = time.perf_counter()
    report = evaluate_chat(chat, prompts, {f.id: f.text for f in store.facts}, progress=_every(20))
    s = report["summary"]
    _log(
        f"persona: style {s['style_rate']} EOS {s['eos_rate']} median {s['median_chars']} facts {s['fact_accuracy']}"
    )
    keep = ("query", "reply", "fact_correct", "ended_by_eos", "context_ids", "golden_ids", "kind")
    replies = [{k: r.get(k) for k in keep} for r in report["replies"]]
    seconds = round(time.perf_counter() - started, 1)
    return {"summary": s, "replies": replies, "seconds": seconds, "judge": JUDGE}


# Which fact judge scored a cell's RAG fact accuracy: "reference" keys each golden fact on what the prompt's
# reference reply takes from it (rag_persona.evaluation.metrics.fact_key); cells scored before it (no
# "judge") are re-scored from their stored replies by `--rejudge`.
JUDGE = "reference"


def rejudge_cells(cells, args) -> None:
    """Fact accuracy of finished SFT cells scored again from their stored replies by today's judge (the
    other persona columns do not depend on it); the old value is kept as fact_accuracy_before."""
    from rag_persona.chat import default_persona
    from rag_persona.evaluation.evaluate import judge_prompt, load_prompts
    from rag_persona.evaluation.metrics import PromptResult
    from rag_persona.knowledge.facts import load_knowledge

    persona = default_persona(PERSONA)
    facts = {f.id: f.text for f in load_knowledge(persona.folder).facts}
    prompts = load_prompts(Path(args.data) / "eval_prompts.jsonl")
    for cell in cells:
        path = result_path(Path(args.results), cell)
        record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        ev = record.get("persona")
        if not ev or ev.get("judge") == JUDGE:
            continue
        verdicts = []
        for stored, p in zip(ev["replies"], prompts, strict=False):
            if stored["query"] != p.query:
                raise SystemExit(f"{path}: reply to {stored['query']!r} stands where {p.query!r} is asked")
            if not p.golden_ids:
                continue
            result = PromptResult(
                p.query, stored["reply"], bool(stored["ended_by_eos"]), [], list(p.golden_ids)
            )
            verdict = judge_prompt(result, p, persona, facts).fact_correct
            stored["fact_correct"] = verdict
            verdicts.append(bool(verdict))
        before = ev["summary"].get("fact_accuracy")
        ev["summary"]["fact_accuracy_before"] = before
        ev["summary"]["fact_accuracy"] = round(sum(verdicts) / len(verdicts), 4) if verdicts else None
        ev["judge"] = JUDGE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, ensure_ascii=False, indent=1), encoding="utf-8")
        tmp.replace(path)
        _log(f"cell {cell.name}: RAG fact accuracy {before} → {ev['summary']['fact_accuracy']} (re-judged)")


def adapter_l2(folder: Path) -> float:
    """‖ΔW‖₂ of a LoRA adapter over every module: the distance its merge moves the model it trained on."""
    from training.merging.task_vectors import task_vectors

    report = task_vectors([folder])
    return report.overall(report.scopes[0])["l2"]


# -- running a cell ---------------------------------------------------------------------------------------


def _git() -> dict:
    def run(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    return {"commit": run("rev-parse", "HEAD"), "dirty": bool(run("status", "--porcelain"))}


def _train_record(metrics: dict) -> dict:
    steps = metrics.get("steps") or 0
    resumed = metrics.get("resumed_from_step") or 0
    train_s = (metrics.get("train") or {}).get("train_runtime")
    run_steps = steps - resumed  # the Trainer's runtime covers only the steps after a resume
    per_step = round(train_s / run_steps, 2) if train_s and run_steps > 0 else None
    seconds = metrics.get("seconds")
    if resumed and per_step and seconds:  # the whole run at the resumed part's rate, so wall times compare
        seconds = round(seconds + per_step * resumed, 1)
    return {
        "steps": steps,
        "resumed_from_step": resumed,
        "seconds": seconds,
        "train_runtime": train_s,
        "seconds_per_step": per_step,
        "train_loss": metrics.get("train_loss"),
        "eval_loss_before": (metrics.get("eval_before") or {}).get("eval_loss"),
        "eval_loss_after": (metrics.get("eval_after") or {}).get("eval_loss"),
        "train_examples": metrics.get("train_examples"),
        "replay_blocks": metrics.get("replay_blocks", 0),
        "device": (metrics.get("mode") or {}).get("device"),
        "base_dtype": (metrics.get("mode") or {}).get("dtype"),
        "threads": metrics.get("threads"),
    }


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def model_cell(cell: Cell, args) -> dict:
    """A CPT model (trained or re-merged as needed) or the base: closed-book recall, ‖ΔW_CPT‖₂."""
    from rag_persona.generation import load_causal_lm, resolve_model_path

    if cell.cpt:
        model = ensure_cpt_model(cell.cpt, Path(args.runs), Path(args.results), args.threads)
        import yaml

        metrics = _read_json(model / "metrics.json")
        recipe = yaml.safe_load((model / "recipe.yaml").read_text(encoding="utf-8"))
        record = {"train": _train_record(metrics), "recipe": recipe}
        record["l2"] = adapter_l2(model / "adapter")
    else:
        model, record = Path(resolve_model_path(None, progress=_log)), {"train": None, "l2": 0.0}
    started = time.perf_counter()
    loaded = load_causal_lm(str(model), progress=_log)
    record["recall"] = closed_book(loaded, args)
    record["probe"] = knowledge_probe(loaded)
    record["eval_seconds"] = round(time.perf_counter() - started, 1)
    record["model"] = str(model.relative_to(ROOT)) if model.is_relative_to(ROOT) else str(model)
    return record


def sft_cell(cell: Cell, args) -> dict:
    """SFT on the cell's model (trained unless its adapter is there), recall, persona metrics, ‖ΔW_SFT‖₂."""
    from rag_persona.generation import load_causal_lm, resolve_model_path
    from training.stages import train

    if cell.cpt:
        model = ensure_cpt_model(cell.cpt, Path(args.runs), Path(args.results), args.threads)
    else:
        model = Path(resolve_model_path(None, progress=_log))
    recipe = sft_recipe(cell, model, args.data, args.threads)
    out = Path(args.runs) / cell.name
    if not (out / "adapter_model.safetensors").is_file():
        _log(f"training {cell.name} into {out}")
        train(recipe, out, progress=_log)
    record = {"train": _train_record(_read_json(out / "metrics.json")), "recipe": recipe.to_dict()}
    record["l2"] = adapter_l2(out)
    started = time.perf_counter()
    loaded = load_causal_lm(str(model), adapter=str(out), progress=_log)
    record["recall"] = closed_book(loaded, args)
    record["probe"] = knowledge_probe(loaded)
    record["persona"] = persona_eval(loaded, args)
    record["eval_seconds"] = round(time.perf_counter() - started, 1)
    record["recipe"]["base_model"] = (
        str(model.relative_to(ROOT)) if model.is_relative_to(ROOT) else str(model)
    )
    return record


BASE_PROBE = "probe-base.json"


def add_probes(cells: list[Cell], args) -> None:
    """The knowledge probe for the base model (results/probe-base.json) and every finished cell without one."""
    from rag_persona.generation import load_causal_lm, resolve_model_path
    from rag_persona.utils.io import atomic_write_text

    results_dir = Path(args.results)
    base_file = results_dir / BASE_PROBE
    if not base_file.is_file():
        loaded = load_causal_lm(resolve_model_path(None, progress=_log), progress=_log)
        atomic_write_text(base_file, json.dumps(knowledge_probe(loaded), indent=1) + "\n")
    for name, result in load_results(results_dir).items():
        if "probe" in result:
            continue
        cell = parse_cell(name)
        if cell.cpt:
            model = ensure_cpt_model(cell.cpt, Path(args.runs), results_dir, args.threads)
        else:
            model = Path(resolve_model_path(None, progress=_log))
        adapter = Path(args.runs) / name if cell.sft else None
        if adapter is not None and not (adapter / "adapter_model.safetensors").is_file():
            _log(f"cell {name}: its adapter {adapter} is gone; no probe")
            continue
        _log(f"cell {name}: knowledge probe")
        loaded = load_causal_lm(str(model), adapter=str(adapter) if adapter else None, progress=_log)
        result["probe"] = knowledge_probe(loaded)
        atomic_write_text(
            result_path(results_dir, cell), json.dumps(result, ensure_ascii=False, indent=1) + "\n"
        )


def result_path(results: Path, cell: Cell) -> Path:
    return results / cell.name / "result.json"


def run_cell(cell: Cell, args) -> dict:
    """Measure one cell and write its result JSON (atomically); the result."""
    from rag_persona.utils.io import atomic_write_text

    _log(f"cell {cell.name}: starting")
    started = time.perf_counter()
    record = sft_cell(cell, args) if cell.sft else model_cell(cell, args)
    train_s = (record.get("train") or {}).get("seconds") or 0
    result = {
        "cell": cell.name,
        **dataclasses.asdict(cell),
        "kind": cell.kind,
        **record,
        "wall_seconds": round(train_s + record["eval_seconds"], 1),
        "session_seconds": round(time.perf_counter() - started, 1),
        "settings": {k: getattr(args, k) for k in ("heldout_facts", "seen_facts", "eval_prompts", "threads")},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load": os.getloadavg()[0]},
        "git": _git(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    path = result_path(Path(args.results), cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, ensure_ascii=False, indent=1) + "\n")
    _log(f"cell {cell.name}: done in {result['session_seconds'] / 60:.1f} min → {path}")
    return result


# -- the plan's time ----------------------------------------------------------------------------------------


def load_results(results: Path) -> dict[str, dict]:
    """Every finished cell's result, by cell name."""
    out = {}
    for path in sorted(results.glob("*/result.json")):
        data = _read_json(path)
        out[data["cell"]] = data
    return out


def _measured(results: dict[str, dict]) -> dict[str, float]:
    """DEFAULT_SECONDS with the medians of what finished cells measured."""
    rates = dict(DEFAULT_SECONDS)
    steps = {"cpt_step": [], "sft_step": []}
    replies = {"reply": [], "sft_reply": []}
    for r in results.values():
        per_step = (r.get("train") or {}).get("seconds_per_step")
        if per_step and not r.get("mitigation", "").startswith("layers"):
            steps["sft_step" if r["kind"] == "sft" else "cpt_step"].append(per_step)
        n = sum(len(v["questions"]) for v in r.get("recall", {}).values()) + len(
            (r.get("persona") or {}).get("replies", [])
        )
        if n:
            replies["sft_reply" if r["kind"] == "sft" else "reply"].append(r["eval_seconds"] / n)
    for key, values in {**steps, **replies}.items():
        if values:
            rates[key] = statistics.median(values)
    return rates


def estimate_minutes(cell: Cell, args, rates: dict[str, float]) -> float:
    """Training steps x seconds per step + replies x seconds per reply, plus two minutes of loading."""
    from training.stages.sft import replay_count

    heldout = heldout_facts(ROOT / "knowledge" / PERSONA, args.heldout_facts)
    n_questions = sum(len(f.questions) for f in heldout) + 2 * args.seen_facts  # ~2 own questions a fact
    seconds = 120.0
    if cell.kind == "cpt":
        seconds += math.ceil(192 / 2) * 3 * rates["cpt_step"] + n_questions * rates["reply"]
    elif cell.kind == "base":
        seconds += n_questions * rates["reply"]
    else:
        rows = 384 + replay_count(384, MITIGATIONS.get(cell.mitigation, {}).get("replay", 0.0))
        per_step = rates["sft_step"] * (
            rates["low_layers_factor"] if cell.mitigation.startswith("layers") else 1
        )
        seconds += math.ceil(rows / 2) * per_step + (n_questions + args.eval_prompts) * rates["sft_reply"]
    return seconds / 60


# -- the table and the plot --------------------------------------------------------------------------------


def _acc(result: dict | None, which: str = "heldout") -> float | None:
    if not result:
        return None
    return result["recall"][which]["summary"]["accuracy"]


def _nll(probe: dict | None, which: str) -> float | None:
    return probe[which]["nll"] if probe else None


def probe_columns(cell: Cell, result: dict, parent: dict | None, base_probe: dict | None) -> dict:
    """Fact-text NLL, NLL kept (SFT cells: (base − cell) / (base − CPT model)), control NLL − base's."""
    probe = result.get("probe")
    cpt_probe = (parent or {}).get("probe") if cell.sft else probe
    b, x, c = _nll(base_probe, "injected"), _nll(probe, "injected"), _nll(cpt_probe, "injected")
    bc, xc, cc = _nll(base_probe, "control"), _nll(probe, "control"), _nll(cpt_probe, "control")
    kept = corrected = None
    if cell.sft and cell.cpt and None not in (b, x, c, bc, xc, cc) and b - c > 0:
        kept = round((b - x) / (b - c), 3)
        # the fact texts' gain beyond the general drift the control set shows (CPT also moves other text)
        specific = (b - c) - (bc - cc)
        corrected = round(((b - x) - (bc - xc)) / specific, 3) if specific > 0 else None
    return {
        "fact_nll": x,
        "nll_kept": kept,
        "nll_kept_corrected": corrected,
        "control_drift": round(xc - bc, 4) if None not in (xc, bc) else None,
    }


def row_of(cell: Cell, result: dict | None, parent: dict | None, base_probe: dict | None = None) -> dict:
    """One table row: the cell's settings and, once measured, its numbers (None where not applicable)."""
    row = {
        "cell": cell.name,
        "cpt_alpha": cell.cpt,
        "sft_alpha": cell.sft,
        "modules": MODULE_LABELS.get(cell.modules, ""),
        "mitigation": cell.mitigation,
        "seed": cell.seed if cell.sft else None,
        "status": "done" if result else "pending",
    }
    if not result:
        return row
    persona = (result.get("persona") or {}).get("summary") or {}
    before = _acc(parent) if cell.sft else _acc(result)
    after = _acc(result) if cell.sft else None
    # Drop and kept compare with the CPT model; the base without CPT has next to nothing to keep.
    paired = cell.cpt is not None and before is not None and after is not None
    row |= {
        "recall_after_cpt": before,
        "recall_after_sft": after,
        "drop": round(before - after, 4) if paired else None,
        "kept": round(after / before, 3) if paired and before else None,
        "seen_after_cpt": _acc(parent, "seen") if cell.sft else _acc(result, "seen"),
        "seen_after_sft": _acc(result, "seen") if cell.sft else None,
        "style": persona.get("style_rate"),
        "eos": persona.get("eos_rate"),
        "median_chars": persona.get("median_chars"),
        "rag_fact_accuracy": persona.get("fact_accuracy"),
        **probe_columns(cell, result, parent, base_probe),
        "l2": result.get("l2"),
        "wall_minutes": round(result["wall_seconds"] / 60, 1),
        "device": _ran_on(result.get("train") or {}),
    }
    return row


def _ran_on(train: dict) -> str:
    """Device and base dtype: cells trained before the CPU dtype rule (all on bf16 bases) carry no dtype."""
    if not train.get("device"):
        return ""
    dtype = train.get("base_dtype") or "bfloat16"
    return f"{train['device']} {'bf16' if dtype == 'bfloat16' else dtype}"


def _fmt(value, digits: int = 2) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


COLUMNS = [
    ("cell", "cell", None),
    ("cpt_alpha", "CPT α", None),
    ("sft_alpha", "SFT α", None),
    ("modules", "SFT modules", None),
    ("mitigation", "mitigation", None),
    ("seed", "seed", None),
    ("recall_after_cpt", "recall after CPT", 2),
    ("recall_after_sft", "recall after SFT", 2),
    ("drop", "drop", 2),
    ("kept", "kept", 2),
    ("seen_after_cpt", "CPT-wording recall after CPT", 2),
    ("seen_after_sft", "… after SFT", 2),
    ("style", "style", 2),
    ("eos", "EOS", 2),
    ("median_chars", "median chars", 0),
    ("rag_fact_accuracy", "RAG fact accuracy", 2),
    ("fact_nll", "fact-text NLL", 3),
    ("nll_kept", "NLL kept", 2),
    ("nll_kept_corrected", "… drift-corrected", 2),
    ("control_drift", "control ΔNLL", 3),
    ("l2", "‖ΔW‖₂", 3),
    ("wall_minutes", "wall min", 1),
    ("device", "ran on", None),
]


def goal_lines(rows: list[dict]) -> list[str]:
    """Which measured SFT cells meet the issue's goal (kept ≥ 80% of recall after CPT, style ≥ 0.90, EOS 1)."""
    sft = [r for r in rows if r["status"] == "done" and r["sft_alpha"] and r["cpt_alpha"]]
    if not sft:
        return ["No SFT cell measured yet."]
    meets = [
        r["cell"]
        for r in sft
        if (r["kept"] or 0) >= GOAL["kept"]
        and (r["style"] or 0) >= GOAL["style"]
        and (r["eos"] or 0) >= GOAL["eos"]
    ]
    probed = [r for r in sft if r.get("nll_kept") is not None and r["kept"] is not None]
    best = max(sft, key=lambda r: (r["recall_after_sft"] or 0, r["style"] or 0))
    lines = [
        f"Goal (kept ≥ {GOAL['kept']:.0%} of recall after CPT, style ≥ {GOAL['style']:.2f}, EOS {GOAL['eos']:.2f}): "
        + (", ".join(meets) if meets else f"no cell of the {len(sft)} measured meets it yet")
        + ".",
        f"Highest recall after SFT: {best['cell']} ({_fmt(best['recall_after_sft'])}, kept "
        f"{_fmt(best['kept'])}, style {_fmt(best['style'])}, EOS {_fmt(best['eos'])}).",
    ]
    if probed:
        pairs = ", ".join(
            f"{r['cell']} {r['nll_kept']:.2f} vs {r['kept']:.2f}"
            for r in sorted(probed, key=lambda r: r["cell"])
        )
        lines.append(
            f"Knowledge probe, NLL kept (the injected fact texts, raw) vs recall kept, per SFT cell: {pairs}"
            + (
                ". In every cell the weights keep far more of the injected text than the chat answers use: SFT "
                "mostly cuts the chat format off from what CPT stored rather than erasing it."
                if all(r["nll_kept"] >= 1.5 * r["kept"] for r in probed)
                else "."
            )
        )
    return lines


def render_table(cells: list[Cell], results: dict[str, dict], args=None) -> tuple[str, dict]:
    """The markdown table (one row per cell, planned ones without a result as pending) and its JSON."""
    extra = [parse_cell(n) for n in results if n not in {c.name for c in cells}]
    rows = []
    base_file = Path(args.results) / BASE_PROBE if args else None
    base_probe = (
        json.loads(base_file.read_text(encoding="utf-8")) if base_file and base_file.is_file() else None
    )
    for cell in [*cells, *extra]:
        parent = results.get(cell.parent.name) if cell.parent else None
        rows.append(row_of(cell, results.get(cell.name), parent, base_probe))
    done = sum(r["status"] == "done" for r in rows)
    lines = [
        "# Knowledge injection: CPT → SFT forgetting on the bundled 0.5B (issue 22)",
        "",
        "Reproduce / continue: `python bench/forgetting.py` (skips finished cells; `--list` for the plan). "
        "CPT: cpt-0.5b-cpu-3ep with the row's CPT α; SFT: sft-after-cpt-0.5b-cpu on the merged CPT model with "
        "the row's SFT α, modules and mitigation (LoRA on a bf16 base, float32 where 'ran on' says so; top 12 "
        "layers unless `layers0-11`).",
        "",
        "Recall = closed-book accuracy (persona prompt, no retrieved context, greedy) on held-out wordings: the "
        "retrieval test queries about one fact, never in the CPT text nor the SFT data. CPT-wording recall asks "
        "40 facts' own questions, which CPT's qa documents contain. kept = recall after SFT / after CPT. Style, "
        "EOS, median chars and RAG fact accuracy: the persona evaluation with retrieval on held-out prompts "
        "(runs/data/eval_prompts.jsonl), facts judged on what each prompt's reference reply takes from them "
        "(cells measured before that judge re-scored from their stored replies: `--rejudge`). ‖ΔW‖₂: the adapter's delta (for SFT rows the L2 between the CPT model "
        "and the CPT→SFT model; for CPT rows the CPT LoRA's own). Wall min: training + evaluation (a run resumed from a checkpoint counts its earlier steps at the rate of the resumed part). "
        "Fact-text NLL: mean NLL per token of the persona's fact texts as plain text (no chat template); NLL "
        "kept = (base − cell) / (base − CPT model) on them, what the weights still hold of the injected text "
        "whether or not the chat answers say it; drift-corrected: each gain minus the control set's gain; "
        "control ΔNLL: the cell's NLL on facts no run saw minus the base's (general drift). In the closedbook "
        "cell, 2 of the 40 CPT-wording facts are among its closed-book rows (held-out recall is clean).",
        "",
        "| " + " | ".join(c[1] for c in COLUMNS) + " |",
        "|" + "|".join("---" if d is None else "---:" for _, _, d in COLUMNS) + "|",
    ]
    for r in rows:
        cells_md = [_fmt(r.get(k), d or 0) if d is not None else _fmt(r.get(k)) for k, _, d in COLUMNS]
        if r["status"] == "pending":
            cells_md = cells_md[:6] + ["pending"] + ["" for _ in COLUMNS[7:]]
        lines.append("| " + " | ".join(cells_md) + " |")
    lines += ["", f"{done} of {len(rows)} cells measured.", "", *goal_lines(rows), ""]
    if args is not None:
        lines.append(
            f"Settings: {args.eval_prompts} persona prompts, held-out facts {args.heldout_facts or 'all'}, "
            f"CPT-wording facts {args.seen_facts}, torch threads {args.threads}; {time.strftime('%Y-%m-%d %H:%M')}."
        )
    return "\n".join(lines) + "\n", {"rows": rows, "goal": GOAL}


def plot(rows: list[dict], path: Path) -> Path | None:
    """Recall after SFT vs style, one point per measured SFT cell; dashed: 80% of each CPT model's recall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rag_persona.utils.io import write_file_atomic

    done = [r for r in rows if r["status"] == "done" and r["sft_alpha"]]
    if not done:
        return None
    fig, ax = plt.subplots(figsize=(8, 5.5))
    colours = {128: "tab:red", 32: "tab:blue", None: "tab:gray"}
    for r in done:
        marker = "s" if r["mitigation"] else ("o" if r["modules"] == "attention+MLP" else "^")
        ax.scatter(
            r["style"] or 0,
            r["recall_after_sft"] or 0,
            c=colours.get(r["cpt_alpha"], "tab:green"),
            marker=marker,
        )
        label = r["cell"].removesuffix(f"-s{SEED}")
        ax.annotate(
            label,
            (r["style"] or 0, r["recall_after_sft"] or 0),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    for alpha in sorted({r["cpt_alpha"] for r in done if r["cpt_alpha"]}):
        before = next((r["recall_after_cpt"] for r in done if r["cpt_alpha"] == alpha), None)
        if before:
            ax.axhline(
                GOAL["kept"] * before,
                ls="--",
                lw=0.8,
                c=colours.get(alpha, "tab:green"),
                label=f"80% of recall after CPT α{alpha} ({before:.2f})",
            )
    ax.axvline(GOAL["style"], ls=":", lw=0.8, c="k", label="style 0.90")
    ax.set_xlabel("style rate after SFT (ojousama register; persona evaluation with retrieval)")
    ax.set_ylabel("closed-book recall after SFT (held-out wordings)")
    ax.set_title(
        "CPT → SFT: knowledge kept vs register learnt (circle attn+MLP, triangle attn, square mitigation)",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    try:
        return write_file_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)


def write_outputs(cells: list[Cell], results: dict[str, dict], table: Path, args=None) -> None:
    """bench/results/forgetting.md, .json and .png from every result so far."""
    from rag_persona.utils.io import atomic_write_text

    # The whole plan always: a run of a few `--cells` must not drop the other rows from the table.
    full = default_plan(getattr(args, "mitigation_base", MITIGATION_BASE))
    md, data = render_table([*full, *(c for c in cells if c not in full)], results, args)
    table.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(table, md)
    atomic_write_text(table.with_suffix(".json"), json.dumps(data, ensure_ascii=False, indent=1) + "\n")
    plot(data["rows"], table.with_suffix(".png"))


# -- main -------------------------------------------------------------------------------------------------


def ensure_data(data_dir: Path) -> None:
    """runs/data as `rag-persona build-data --out runs/data` builds it (seeded), when it is missing."""
    if (data_dir / "manifest.json").is_file():
        return
    from training.data.build import DataConfig, build_datasets

    _log(f"building the SFT data into {data_dir}")
    build_datasets(DataConfig(out=data_dir))


def print_plan(cells: list[Cell], results: dict[str, dict], args) -> None:
    rates = _measured(results)
    total = 0.0
    for cell in cells:
        done = cell.name in results
        minutes = results[cell.name]["wall_seconds"] / 60 if done else estimate_minutes(cell, args, rates)
        total += 0 if done else minutes
        status = "done" if done else ("trained, not evaluated" if _trained(cell, args) else "pending")
        print(f"{cell.name:<40} {'' if done else '~'}{minutes:6.0f} min  {status}")
    print(f"{len(cells)} cells, {sum(c.name in results for c in cells)} done; about {total:.0f} min left")


def _trained(cell: Cell, args) -> bool:
    name = cell.name
    return (Path(args.runs) / name / ("adapter_model.safetensors" if cell.sft else "config.json")).is_file()


def parse_args(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", nargs="+", help="cell names to run (default: the whole plan, in its order)")
    ap.add_argument(
        "--seeds", type=int, nargs="+", default=[], help="also run the chosen SFT cells with these seeds"
    )
    ap.add_argument("--mitigation-base", default=MITIGATION_BASE, help="the grid cell the mitigations modify")
    ap.add_argument("--list", action="store_true", help="print the plan with estimated minutes and stop")
    ap.add_argument("--table", action="store_true", help="only rewrite the table and plot")
    ap.add_argument(
        "--rejudge", action="store_true", help="score finished cells' stored replies by today's fact judge"
    )
    ap.add_argument(
        "--probe",
        action="store_true",
        help="add the knowledge probe to finished cells (and the base), then stop",
    )
    ap.add_argument("--budget-minutes", type=float, default=None, help="start no new cell after this long")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: faster on busy cores)")
    ap.add_argument("--eval-prompts", type=int, default=61, help="held-out persona prompts per SFT cell")
    ap.add_argument("--heldout-facts", type=int, default=None, help="a seeded sample of held-out facts")
    ap.add_argument("--seen-facts", type=int, default=40, help="facts asked in their own wordings")
    ap.add_argument("--data", default=str(ROOT / "runs/data"))
    ap.add_argument("--runs", default=str(RUNS))
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--out", default=str(TABLE))
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    args = parse_args(argv)
    cells = plan(args.cells, args.seeds, args.mitigation_base)
    results_dir = Path(args.results)
    if args.list:
        print_plan(cells, load_results(results_dir), args)
        return 0
    if args.rejudge:
        rejudge_cells(cells, args)
    write_outputs(cells, load_results(results_dir), Path(args.out), args)
    if args.table or args.rejudge:
        return 0
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.probe:
        add_probes(cells, args)
        write_outputs(cells, load_results(results_dir), Path(args.out), args)
        return 0
    data_ready = False
    for cell in cells:
        if result_path(results_dir, cell).is_file():
            _log(f"cell {cell.name}: done, skipped")
            continue
        if args.budget_minutes is not None and time.time() - started > args.budget_minutes * 60:
            left = [c.name for c in cells if not result_path(results_dir, c).is_file()]
            _log(f"budget of {args.budget_minutes:g} min reached; not started: {', '.join(left)}")
            break
        if not data_ready:
            ensure_data(Path(args.data))
            data_ready = True
        run_cell(cell, args)
        write_outputs(cells, load_results(results_dir), Path(args.out), args)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except RagPersonaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
