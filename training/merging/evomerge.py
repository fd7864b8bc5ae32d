"""Evolutionary LoRA merge: CMA-ES over per-adapter weights (and density) on one loaded base, scored by a function.

Each candidate is built with peft's `add_weighted_adapter` on the one base that stays loaded (the input
adapters sit beside it), scored, and deleted again, so memory stays at one base plus the adapters. The
search vector is the adapters' weights, plus the density for methods that prune (ties, dare_*,
magnitude_prune), each inside its bounds; CMA-ES (`cmaes.CMA`) minimises, so it is told −score.

Evaluation 0 is the starting point itself (the mean: equal weights 1/n unless given, the initial density), so
the log shows what the search gained over it. Every evaluation is appended to a JSONL log as it finishes:
`{"eval", "generation", "params": {"weights", "density"}, "metrics", "score", "seconds", "best_score"}`.
The best candidate is rebuilt (same DARE seed) and exported as an adapter folder with `merge_manifest.json`
and a copy of the log.

The default score (`persona_score`) is the persona evaluation of `rag_persona.evaluation.evaluate` on a held-out
prompt file: the mean of style_rate, eos_rate, length_in_range_rate and fact_accuracy from
`persona_metrics.summarize` (a rate that is None — e.g. no prompt with golden facts — is left out of the
mean). Any other callable `score_fn(loaded, adapter_name, params) -> float | (float, dict)` can replace it.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rag_persona.errors import RagPersonaError
from rag_persona.utils.io import check_output_file
from training.provenance import versions

from .folders import default_adapter_base, input_record, resolve_base
from .merge import (
    LORA_METHODS,
    add_merged_adapter,
    attach_adapters,
    check_adapters,
    check_inputs,
    check_output,
    check_svd_rank,
    export_adapter,
    merge_folder,
    needs_density,
    write_manifest,
)

PERSONA_SCORE_KEYS = ("style_rate", "eos_rate", "length_in_range_rate", "fact_accuracy")
LOG_COPY = "evo_log.jsonl"
# CMA-ES minimises finite numbers; a failed or NaN score counts as this.
WORST_SCORE = -1e9

ScoreFn = Callable[[object, str, dict], "float | tuple[float, dict]"]


@dataclass
class EvoConfig:
    """Search settings: merge method, evaluation budget, CMA-ES step size and population, bounds, seed."""

    method: str = "dare_ties"
    budget: int = 12
    seed: int = 0
    sigma: float = 0.2
    population_size: int | None = None
    weight_bounds: tuple[float, float] = (0.0, 1.5)
    density_bounds: tuple[float, float] = (0.1, 1.0)
    init_weights: list[float] | None = None
    init_density: float = 0.5
    svd_rank: int | None = None

    def validate(self, n: int) -> EvoConfig:
        if self.method not in LORA_METHODS:
            raise RagPersonaError(
                f"--method: {self.method!r} is not an adapter merge ({', '.join(LORA_METHODS)})"
            )
        if self.budget < 1:
            raise RagPersonaError(f"--budget: {self.budget} must be at least 1 evaluation")
        if self.population_size is not None and self.population_size < 4:
            # Below 4, cmaes' recombination weights divide by zero.
            raise RagPersonaError(f"--population: {self.population_size} is below CMA-ES's minimum of 4")
        # cmaes' own seed range, checked here rather than after the base load and the first evaluation
        if not 0 <= self.seed < 2**32:
            raise RagPersonaError(f"--seed: {self.seed} is outside 0 … 2**32-1")
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise RagPersonaError(f"--sigma: {self.sigma} must be a positive number")
        check_svd_rank(self.svd_rank)
        starts = [*(self.init_weights or []), self.init_density]
        if not all(math.isfinite(v) for v in starts):
            raise RagPersonaError(f"--init-weights/--init-density: {starts} has a non-finite value")
        for what, (lo, hi) in (("weight", self.weight_bounds), ("density", self.density_bounds)):
            if not lo < hi:
                raise RagPersonaError(f"{what} bounds: {lo} is not below {hi}")
        if not (0.0 < self.density_bounds[0] and self.density_bounds[1] <= 1.0):
            raise RagPersonaError(f"density bounds: {self.density_bounds} must lie inside (0, 1]")
        if self.init_weights is not None and len(self.init_weights) != n:
            raise RagPersonaError(f"--init-weights: {len(self.init_weights)} weights given for {n} adapters")
        return self

    @property
    def searches_density(self) -> bool:
        return needs_density(self.method)

    def start(self, n: int):
        import numpy as np

        weights = list(self.init_weights) if self.init_weights is not None else [1.0 / n] * n
        x = weights + ([self.init_density] if self.searches_density else [])
        bounds = [self.weight_bounds] * n + ([self.density_bounds] if self.searches_density else [])
        lo, hi = np.array(bounds, dtype=float).T
        mean = np.array(x, dtype=float)
        if np.any(mean < lo) or np.any(mean > hi):
            raise RagPersonaError(f"evo-merge: start {x} lies outside the bounds {bounds}")
        return mean, np.array(bounds, dtype=float)

    def params(self, x, n: int) -> dict:
        weights = [round(float(v), 6) for v in x[:n]]
        density = round(float(x[n]), 6) if self.searches_density else None
        return {"weights": weights, "density": density}


@dataclass
class EvoResult:
    out: Path
    best: dict
    evaluations: list[dict] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "out": str(self.out),
            "best": self.best,
            "evaluations": len(self.evaluations),
            **self.manifest,
        }


# -- the default score: persona metrics on held-out prompts -------------------------------------------------


def persona_score(summary: dict) -> float:
    """Mean of style_rate, eos_rate, length_in_range_rate and fact_accuracy (None values left out)."""
    values = [summary.get(k) for k in PERSONA_SCORE_KEYS]
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else 0.0


def persona_score_fn(
    prompts: str | Path,
    *,
    index: str | Path | None = None,
    persona: str | None = None,
    limit: int | None = None,
    max_new_tokens: int = 96,
    progress: Callable[[str], None] | None = None,
) -> ScoreFn:
    """A score function running the persona evaluation (retrieval + prompt builder + greedy generation)."""
    from rag_persona.chat import PersonaChat, default_persona
    from rag_persona.evaluation.evaluate import evaluate_chat, load_prompts, open_retriever
    from rag_persona.generation import GenerationSettings

    # Everything but the model is prepared now, so a bad prompt file fails before the base is loaded.
    items = load_prompts(prompts)
    items = items[:limit] if limit else items
    the_persona = default_persona(persona)
    store, retriever = open_retriever(index, persona, log=progress or (lambda m: None))
    facts = {f.id: f.text for f in store.facts}

    def score(loaded, adapter_name: str, params: dict) -> tuple[float, dict]:
        chat = PersonaChat(the_persona, retriever, loaded, GenerationSettings(max_new_tokens=max_new_tokens))
        summary = evaluate_chat(chat, items, facts)["summary"]
        return persona_score(summary), summary

    score.__qualname__ = "persona_score"
    return score


# -- the search -------------------------------------------------------------------------------------------


def _call_score(score_fn: ScoreFn, loaded, name: str, params: dict) -> tuple[float, dict]:
    result = score_fn(loaded, name, params)
    score, metrics = result if isinstance(result, tuple) else (result, {})
    score = float(score)
    if not math.isfinite(score):
        return WORST_SCORE, {**metrics, "non_finite_score": True}
    return score, dict(metrics)


def cma_search(evaluate, mean, bounds, config: EvoConfig, evaluations: list) -> int:
    """Ask CMA-ES for candidates and tell it their (negated) scores until the budget is spent; the
    number of generations run. `evaluations` grows with every evaluate(x, generation) call."""
    from cmaes import CMA

    optimizer = CMA(
        mean=mean,
        sigma=config.sigma,
        bounds=bounds,
        seed=config.seed,
        population_size=config.population_size,
    )
    generation = 0
    while len(evaluations) < config.budget:
        generation += 1
        told = []
        for _ in range(optimizer.population_size):
            if len(evaluations) >= config.budget:
                break
            x = optimizer.ask()
            told.append((x, -evaluate(x, generation)))
        # cmaes accepts only whole generations; a budget cut mid-generation just ends the search.
        if len(told) == optimizer.population_size:
            optimizer.tell(told)
    return generation


def check_log(path: Path, inputs: Sequence[Path], out: Path) -> Path:
    """The evaluation log is rewritten from empty: only a file that is an earlier evo-merge log (or
    empty) may be there, so a mistyped --log never truncates the user's prompts or weights."""
    if out.resolve() in path.resolve().parents:  # the output folder must be empty or ours when it is written
        raise RagPersonaError(f"--log {path}: lies inside --out {out}; put the log beside it")
    path = check_output_file(path, "--log", inputs)
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as fh:
            first = fh.readline(1 << 16)
        try:
            row = json.loads(first)
        except ValueError:
            row = None
        if not (isinstance(row, dict) and {"eval", "params", "score"} <= row.keys()):
            raise RagPersonaError(
                f"--log {path}: exists and is not an evo-merge log; refusing to overwrite it"
            )
    return path


def evo_merge(
    adapters: Sequence[str | Path],
    out: str | Path,
    *,
    score_fn: ScoreFn,
    config: EvoConfig | None = None,
    base: str | None = None,
    log_path: str | Path | None = None,
    progress: Callable[[str], None] = lambda m: None,
) -> EvoResult:
    """CMA-ES over merge weights (and density); the best candidate is written as an adapter folder."""
    from rag_persona.generation import load_causal_lm

    started = time.time()
    adapters = check_inputs(adapters)
    out = check_output(out, adapters)
    config = (config or EvoConfig()).validate(len(adapters))
    check_adapters(adapters, config.method)
    n = len(adapters)
    mean, bounds = config.start(n)
    log_path = check_log(
        Path(log_path) if log_path else out.with_name(f"{out.name}.evo.jsonl"), adapters, out
    )
    base_label, base_path = resolve_base(default_adapter_base(adapters, base), progress)
    log_path.write_text("", encoding="utf-8")

    loaded = load_causal_lm(str(base_path), progress=progress)
    peft_model, names = attach_adapters(loaded.model, adapters)
    loaded.model = peft_model
    loaded.source = base_label

    def build(i: int, params: dict) -> str:
        name = f"evo{i}"
        add_merged_adapter(
            peft_model,
            names,
            params["weights"],
            name,
            config.method,
            params["density"],
            config.seed + i,
            config.svd_rank,
        )
        return name

    evaluations: list[dict] = []
    best: dict | None = None

    def evaluate(x, generation: int) -> float:
        nonlocal best
        i = len(evaluations)
        params = config.params(x, n)
        t0 = time.perf_counter()
        name = build(i, params)
        peft_model.set_adapter(name)
        loaded.adapter = name
        try:
            score, metrics = _call_score(score_fn, loaded, name, params)
        finally:
            # Only the input adapters stay loaded between candidates.
            peft_model.set_adapter(names[0])
            peft_model.delete_adapter(name)
        row = {
            "eval": i,
            "generation": generation,
            "params": params,
            "metrics": metrics,
            "score": score,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        if best is None or score > best["score"]:
            best = row
        row["best_score"] = best["score"]
        evaluations.append(row)
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        progress(f"eval {i} (gen {generation}) {params} → score {score:.4f} (best {best['score']:.4f})")
        return score

    evaluate(mean, 0)
    generation = cma_search(evaluate, mean, bounds, config, evaluations)

    assert best is not None
    name = build(best["eval"], best["params"])
    manifest = {
        "kind": "evo-merge",
        "output": "adapter",
        "method": config.method,
        "weights": best["params"]["weights"],
        "density": best["params"]["density"],
        "seed": config.seed + best["eval"],
        "svd_rank": config.svd_rank,
        "base": input_record(base_path, "base", base_label),
        "inputs": [input_record(a, "adapter") for a in adapters],
        "evo": {
            **{k: v for k, v in asdict(config).items() if k not in ("method",)},
            "score_fn": getattr(score_fn, "__qualname__", type(score_fn).__name__),
            "evaluations": len(evaluations),
            "generations": generation,
            "best_eval": best["eval"],
            "best_score": best["score"],
            "first_score": evaluations[0]["score"],
            "best_metrics": best["metrics"],
            "log": str(log_path),
        },
        "versions": versions("safetensors"),
    }
    with merge_folder(out) as work:
        export_adapter(peft_model, name, work, base_label)
        shutil.copy2(log_path, work / LOG_COPY)
        manifest["seconds"] = round(time.time() - started, 1)
        write_manifest(work, manifest)
    peft_model.delete_adapter(name)
    progress(f"best eval {best['eval']}: score {best['score']:.4f} {best['params']}; wrote {out}")
    return EvoResult(out=out, best=best, evaluations=evaluations, manifest=manifest)
