"""The users' task-vector experiment, small: SFT on D0 vs D1 at two seeds and two learning rates, norms, a merge.

On the bundled 0.5B on CPU (REFERENCE.md, failure 5: at lr 1e-4 the D0↔D1 distance moved with the seed, at
1e-5 it did not). Each run is the shipped SFT recipe (r 8, alpha 128, all linear layers of the top 12
decoder layers) cut to a few steps on a seeded subset; only the data file, the seed and the learning rate
differ. Then, in one process:

1. L1/L2 of every adapter's task vector (its ΔW = B·A·scaling, all modules) and of SFT_D0 − SFT_D1 for each
   (seed, lr), overall and over the top 20% magnitudes (TIES trimming);
2. a merge of SFT_D0 and SFT_D1 (peft add_weighted_adapter) and the persona metrics of D0, D1 and the merge
   on held-out prompts.

    python bench/task_vectors.py                     # train what is missing, analyse, write bench/results/task_vectors.md
    python bench/task_vectors.py --steps 16 --threads 1 --limit 20
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DATASETS = {"D0": "sft_d0_train.jsonl", "D1": "sft_d1_train.jsonl"}
SEEDS = (42, 100)
LRS = (1e-4, 1e-5)


def _log(msg: str) -> None:
    print(f"[bench/task_vectors] {msg}", file=sys.stderr, flush=True)


def run_name(data: str, seed: int, lr: float) -> str:
    return f"sft-{data.lower()}-s{seed}-lr{lr:.0e}"


def train_runs(args) -> dict[str, Path]:
    from training.recipes import load_recipe
    from training.stages import train

    runs = {}
    for data, seed, lr in itertools.product(DATASETS, SEEDS, LRS):
        out = Path(args.runs) / run_name(data, seed, lr)
        runs[run_name(data, seed, lr)] = out
        if (out / "adapter_model.safetensors").is_file():
            _log(f"{out.name}: present, not retrained")
            continue
        recipe = load_recipe(
            args.recipe,
            name=out.name,
            data_dir=args.data,
            train_file=DATASETS[data],
            learning_rate=lr,
            seed=seed,
            max_steps=args.steps,
            max_train_examples=args.steps * 2,
            warmup_steps=0,
            cpu_threads=args.threads,
            logging_steps=4,
        )
        recipe.eval_file = None  # the runs are compared by their weights; held-out loss costs CPU time
        started = time.perf_counter()
        train(recipe, out, progress=_log)
        _log(f"{out.name}: trained in {time.perf_counter() - started:.0f} s")
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "training/recipes/sft-0.5b-cpu.yaml"))
    ap.add_argument("--data", default=str(ROOT / "runs/data"))
    ap.add_argument("--runs", default=str(ROOT / "runs/taskvec"))
    ap.add_argument("--steps", type=int, default=16, help="optimizer steps per run (batch 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a busy machine)")
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--limit", type=int, default=None, help="held-out prompts for the persona metrics")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--top-percent", type=float, default=20.0, help="TIES-style trimmed norms")
    ap.add_argument("--merge-seed", type=int, default=42)
    ap.add_argument("--merge-lr", type=float, default=1e-4)
    ap.add_argument("--analyse-only", action="store_true", help="use the runs already trained")
    ap.add_argument("--out", default=str(ROOT / "bench/results/task_vectors.md"))
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.analyse_only:
        runs = {run_name(*k): Path(args.runs) / run_name(*k) for k in itertools.product(DATASETS, SEEDS, LRS)}
    else:
        runs = train_runs(args)
    if args.train_only:
        return 0
    return analyse(args, runs)


def _norm_rows(runs: dict[str, Path], top_percent: float) -> list[dict]:
    from training.merging.task_vectors import task_vectors

    rows = []
    for seed, lr in itertools.product(SEEDS, LRS):
        d0, d1 = runs[run_name("D0", seed, lr)], runs[run_name("D1", seed, lr)]
        report = task_vectors([d0, d1], pairs=True, top_percent=top_percent)
        a, b, pair = report.scopes  # "D0 - base", "D1 - base", "D0 - D1"
        rows.append(
            {
                "seed": seed,
                "lr": lr,
                "top_percent": top_percent,
                "D0 L1": report.overall(a)["l1"],
                "D0 L2": report.overall(a)["l2"],
                "D1 L1": report.overall(b)["l1"],
                "D1 L2": report.overall(b)["l2"],
                "D0-D1 L1": report.overall(pair)["l1"],
                "D0-D1 L2": report.overall(pair)["l2"],
            }
        )
    return rows


def _seed_rows(runs: dict[str, Path]) -> list[dict]:
    """Same data, seed 42 vs seed 100: how far apart the seed alone puts two runs."""
    from training.merging.task_vectors import task_vectors

    rows = []
    for lr, data in itertools.product(LRS, DATASETS):
        a, b = (runs[run_name(data, seed, lr)] for seed in SEEDS)
        report = task_vectors([a, b], pairs=True)
        pair = report.overall(report.scopes[2])
        own = report.overall(report.scopes[0])
        rows.append({"data": data, "lr": lr, "l1": pair["l1"], "l2": pair["l2"], "own_l2": own["l2"]})
    return rows


def seed_table(rows: list[dict]) -> list[str]:
    out = [
        "",
        f"Same data, seed {SEEDS[0]} vs seed {SEEDS[1]} (‖SFT_s{SEEDS[0]} − SFT_s{SEEDS[1]}‖; √2·‖SFT_s{SEEDS[0]}−base‖₂ "
        "is what two orthogonal task vectors of that size would give):",
        "",
        "| data | lr | L1 | L2 | √2·‖SFT−base‖₂ |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['data']} | {r['lr']:.0e} | {r['l1']:.2f} | {r['l2']:.4f} | {2**0.5 * r['own_l2']:.4f} |"
        )
    return out


def _persona_metrics(args, variants: dict[str, Path | None]) -> dict[str, dict]:
    """Every variant on the same held-out prompts, one base model, adapters attached and switched."""
    from peft import PeftModel

    from rag_persona.chat import PersonaChat, default_persona
    from rag_persona.evaluation.evaluate import evaluate_chat, load_prompts, open_retriever
    from rag_persona.generation import GenerationSettings, load_causal_lm

    prompts = load_prompts(Path(args.data) / "eval_prompts.jsonl")[: args.limit]
    persona = default_persona()
    store, retriever = open_retriever()
    facts = {f.id: f.text for f in store.facts}
    loaded = load_causal_lm(None, adapter=None, progress=_log)
    base_model = loaded.model
    out = {}
    for name, path in variants.items():
        started = time.perf_counter()
        if path is None:
            loaded.model = base_model
        else:
            loaded.model = PeftModel.from_pretrained(base_model, str(path), adapter_name="v").eval()
        chat = PersonaChat(persona, retriever, loaded, GenerationSettings(max_new_tokens=args.max_new_tokens))
        report = evaluate_chat(chat, prompts, facts, progress=_log)
        summary = report["summary"]
        summary["seconds_per_reply"] = (time.perf_counter() - started) / len(prompts)
        out[name] = summary
        if path is not None:
            base_model = loaded.model.unload()  # back to the plain base for the next variant
    return out


def analyse(args, runs: dict[str, Path]) -> int:
    from training.merging.merge import merge_adapters

    started = time.perf_counter()
    norms = _norm_rows(runs, 100.0) + _norm_rows(runs, args.top_percent)
    seeds = _seed_rows(runs)
    merges = {}
    variants: dict[str, Path | None] = {"base": None}
    for seed, lr in ((args.merge_seed, args.merge_lr),):
        d0, d1 = runs[run_name("D0", seed, lr)], runs[run_name("D1", seed, lr)]
        variants[f"SFT_D0 (seed {seed}, lr {lr:.0e})"] = d0
        variants[f"SFT_D1 (seed {seed}, lr {lr:.0e})"] = d1
        for method, density in (("cat", None), ("dare_ties", 0.5)):
            out = Path(args.runs) / f"merge-{method}-s{seed}-lr{lr:.0e}"
            if not (out / "adapter_model.safetensors").is_file():
                merge_adapters([d0, d1], out, method=method, weights=[0.5, 0.5], density=density, seed=0)
            label = f"merge {method} 0.5/0.5" + (f" density {density}" if density else "")
            merges[label] = str(out)
            variants[label] = out
    persona = _persona_metrics(args, variants)
    lines = [
        "# Task vectors: SFT on D0 vs D1, two seeds, two learning rates (bundled 0.5B, CPU)",
        "",
        f"Reproduce: `python bench/task_vectors.py --steps {args.steps}`. Each run: the shipped SFT recipe "
        f"(r 8, alpha 128, all linear layers of the top 12 layers) for {args.steps} steps of batch 2 on a "
        "seeded subset of D0 (plain answers) or D1 (お嬢様 answers). Norms are over the adapters' ΔW = B·A·"
        "scaling (peft's delta), all modules.",
        "",
        "| seed | lr | top % | ‖SFT_D0−base‖₁ | ‖SFT_D0−base‖₂ | ‖SFT_D1−base‖₁ | ‖SFT_D1−base‖₂ "
        "| ‖SFT_D0−SFT_D1‖₁ | ‖SFT_D0−SFT_D1‖₂ |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in norms:
        lines.append(
            f"| {r['seed']} | {r['lr']:.0e} | {r['top_percent']:g} | {r['D0 L1']:.2f} | {r['D0 L2']:.4f} | "
            f"{r['D1 L1']:.2f} | {r['D1 L2']:.4f} | {r['D0-D1 L1']:.2f} | {r['D0-D1 L2']:.4f} |"
        )
    lines += seed_table(seeds)
    cols = [
        ("style_rate", "お嬢様 style"),
        ("eos_rate", "EOS"),
        ("median_chars", "median chars"),
        ("length_in_range_rate", "15–45 chars"),
        ("fact_accuracy", "fact accuracy"),
        ("offtopic_handling", "off-topic handled"),
    ]
    lines += [
        "",
        f"## Persona metrics ({args.limit or 'all'} held-out prompts of runs/data/eval_prompts.jsonl, greedy)",
        "",
        "| variant | " + " | ".join(c[1] for c in cols) + " | s/reply |",
        "|---|" + "---:|" * (len(cols) + 1),
    ]
    for name, s in persona.items():
        cells = ["–" if s.get(k) is None else f"{s[k]:.2f}" for k, _ in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {s['seconds_per_reply']:.1f} |")
    lines += [
        "",
        f"Machine: {platform.machine()}, {__import__('os').cpu_count()} CPUs; analysis "
        f"{time.perf_counter() - started:.0f} s; {time.strftime('%Y-%m-%d %H:%M')}.",
    ]
    md = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md, encoding="utf-8")
    out.with_suffix(".json").write_text(
        json.dumps(
            {"norms": norms, "seed_pairs": seeds, "merges": merges, "persona": persona},
            ensure_ascii=False,
            indent=1,
        ),
        encoding="utf-8",
    )
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
