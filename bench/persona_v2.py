"""Persona model v2: base vs v1 vs v2 SFT vs v2 SFT+DPO on the v2 held-out prompts, on the llama.cpp engine.

Each variant answers every held-out prompt of `rag-persona build-data --dialogues
dialogues.jsonl,dialogues_v2.jsonl` (eval_prompts.jsonl: conversations no training run saw) through the chat
path users get: the persona index with conversation-aware retrieval, the one prompt builder, the default
decoding, llama.cpp with the adapter as a GGUF LoRA. Metrics: rag_persona/evaluation (style, EOS, identity,
single-turn and follow-up fact accuracy, invented specifics, malformed Japanese, off-topic handling, length)
and the median seconds per reply.

    python bench/persona_v2.py [--prompts runs/data-v2/eval_prompts.jsonl] [--variants base,v1,v2-sft,v2-dpo,1.5b-base,1.5b-v2-sft]
    python bench/persona_v2.py --variants 1.5b-v2-sft --with bench/results/persona_v2_dpo.json --out F.md

`--with` puts the rows of earlier runs (their .json) first in the table, marked *, so that a slow variant
can be measured in another session without re-running the others (greedy decoding: the replies are the
same; their seconds are those of their own run). `--rejudge` scores those stored replies again by the
current rules of rag_persona/evaluation (no generation), e.g. after a change to the fact judge:

    python bench/persona_v2.py --variants "" --with A.json,B.json --rejudge --out F.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "base": ("qwen2.5-coder-0.5b", "none"),
    "v1": ("qwen2.5-coder-0.5b", str(ROOT / "adapters" / "ojousama-qwen2.5-coder-0.5b")),
    "v2-sft": ("qwen2.5-coder-0.5b", str(ROOT / "adapters" / "ojousama-qwen2.5-coder-0.5b-v2")),
    "v2-dpo": ("qwen2.5-coder-0.5b", str(ROOT / "adapters" / "ojousama-qwen2.5-coder-0.5b-v2-dpo")),
    "1.5b-base": ("qwen2.5-coder-1.5b", "none"),
    "1.5b-v2-sft": ("qwen2.5-coder-1.5b", str(ROOT / "adapters" / "ojousama-qwen2.5-coder-1.5b-v2")),
    "1.5b-v2-dpo": ("qwen2.5-coder-1.5b", str(ROOT / "runs" / "dpo-v2-1.5b-cpu")),
    "v2-op": ("qwen2.5-coder-0.5b", str(ROOT / "adapters" / "ojousama-qwen2.5-coder-0.5b-v2op")),
    "v2-op2": ("qwen2.5-coder-0.5b", str(ROOT / "runs" / "dpo-v2op2-0.5b-cpu")),
}
LABELS = {
    "base": "0.5B base",
    "v1": "0.5B v1 SFT+DPO",
    "v2-sft": "0.5B v2 SFT",
    "v2-dpo": "0.5B v2 SFT+DPO",
    "1.5b-base": "1.5B base",
    "1.5b-v2-sft": "1.5B v2 SFT",
    "1.5b-v2-dpo": "1.5B v2 SFT+DPO",
    "v2-op": "0.5B v2 SFT+DPO+on-policy DPO (default)",
    "v2-op2": "0.5B v2 SFT+DPO+2 on-policy DPO rounds",
}
IDENTITY_SET = ROOT / "knowledge" / "ojousama" / "queries" / "test_identity.jsonl"
# (key, header, format, goal text)
COLUMNS = [
    ("style_rate", "style", "{:.2f}", "≥ 0.95"),
    ("eos_rate", "EOS", "{:.2f}", "1.00"),
    ("identity_accuracy", "identity", "{:.2f}", "1.00"),
    ("identity_new_accuracy", "identity (30 new wordings)", "{:.2f}", "1.00"),
    ("single_fact_accuracy", "fact (single turn)", "{:.2f}", "≥ 0.90"),
    ("followup_fact_accuracy", "fact (follow-up)", "{:.2f}", "≥ 0.85"),
    ("invented_rate", "invented specifics", "{:.2f}", "≤ 0.05"),
    ("malformed_rate", "malformed", "{:.2f}", "≤ 0.02"),
    ("offtopic_handling", "off-topic handled", "{:.2f}", "≥ 0.90"),
    ("median_chars", "median chars", "{:.0f}", "15–45"),
    ("median_seconds", "median s/reply", "{:.2f}", "≤ 2 (API)"),
]


def split_facts(prompts: list[dict], replies: list[dict]) -> dict:
    """Fact accuracy on single-turn prompts and on follow-ups (prompts with a conversation before them)."""
    single, follow = [], []
    for p, r in zip(prompts, replies, strict=True):
        if r.get("fact_correct") is None:
            continue
        (follow if p.get("history") else single).append(bool(r["fact_correct"]))
    rate = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
    return {
        "single_fact_accuracy": rate(single),
        "n_single_fact": len(single),
        "followup_fact_accuracy": rate(follow),
        "n_followup_fact": len(follow),
    }


def table(rows: list[tuple[str, dict]]) -> str:
    head = "| variant | " + " | ".join(c[1] for c in COLUMNS) + " |"
    goal = "| goal | " + " | ".join(c[3] for c in COLUMNS) + " |"
    sep = "|---|" + "---:|" * len(COLUMNS)
    lines = [head, sep, goal]
    for name, s in rows:
        cells = ["–" if s.get(k) is None else fmt.format(s[k]) for k, _, fmt, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(args, prompts, rows, reports, earlier) -> None:
    """The table (.md) and every reply (.json), rewritten after each variant."""
    n = len(prompts)
    kinds: dict[str, int] = {}
    for p in prompts:
        kinds[p.get("kind", "?")] = kinds.get(p.get("kind", "?"), 0) + 1
    text = [
        "# Persona model v2 (issue 19): base vs v1 vs v2, llama.cpp engine",
        "",
        f"`python bench/persona_v2.py` — {n} held-out prompts ({args.prompts}; kinds: "
        + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
        + "), default persona index and decoding, Q4_K_M GGUF + GGUF LoRA, 2 CPU cores, "
        + time.strftime("%Y-%m-%d %H:%M"),
        "",
        table(rows),
        "",
        "Counts: "
        + "; ".join(
            f"{name}: identity {s.get('n_identity')}, single-turn fact {s.get('n_single_fact')}, "
            f"follow-up fact {s.get('n_followup_fact')}, off-topic {s.get('n_offtopic')}"
            for name, s in rows[:1]
        ),
        "",
        "identity (30 new wordings): each variant also answers the single-turn identity questions of "
        "knowledge/ojousama/queries/test_identity.jsonl, written after every training run and excluded from "
        "build-data (the 5 identity prompts above are too few to tell variants apart); the wordings missed "
        "are in the .json (`identity_new_missed`).",
        "",
        *(["Rows marked * come from earlier runs: " + ", ".join(earlier), ""] if earlier else []),
        "## Replies (first 16 prompts)",
        "",
        "| query | " + " | ".join(LABELS[k] for k in reports) + " |",
        "|---|" + "---|" * len(reports),
    ]
    for i, p in enumerate(prompts[:16]):
        cells = [
            reports[k]["replies"][i]["reply"].replace("\n", " ").replace("|", "\\|")[:70] for k in reports
        ]
        text.append(f"| {p['query']} | " + " | ".join(cells) + " |")
    out = Path(args.out)
    out.write_text("\n".join(text) + "\n", encoding="utf-8")
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "prompts": args.prompts,
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "summary": {name.removesuffix(" *"): summary for name, summary in rows},
                "reports": reports,
            },
            ensure_ascii=False,
            indent=1,
        ),
        encoding="utf-8",
    )


def identity_new(args, key: str, log) -> dict:
    """The variant's identity accuracy on the held-out identity wordings (single turns, never trained on)."""
    from rag_persona.evaluation.evaluate import run_evaluation

    model, adapter = VARIANTS[key]
    log(f"{key}: identity set {args.identity_set}")
    report = run_evaluation(args.identity_set, model=model, adapter=adapter, engine="llama.cpp", progress=log)
    missed = [r["query"] for r in report["replies"] if not r.get("identity_ok")]
    return {
        "identity_new_accuracy": report["summary"].get("identity_accuracy"),
        "n_identity_new": len(report["replies"]),
        "identity_new_missed": missed,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", default=str(ROOT / "runs" / "data-v2" / "eval_prompts.jsonl"))
    ap.add_argument("--variants", default="v1,v2-sft,v2-dpo,v2-op,1.5b-v2-sft")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "persona_v2_all.md"))
    ap.add_argument("--with", dest="earlier", default="", help="Comma-separated .json files of earlier runs.")
    ap.add_argument("--rejudge", action="store_true", help="Judge the --with replies again by today's rules.")
    ap.add_argument(
        "--identity-set",
        default=str(IDENTITY_SET),
        help="Held-out identity wordings each measured variant also answers ('' to skip).",
    )
    ap.add_argument(
        "--identity-earlier",
        default="",
        help="Comma-separated --with variants that answer the identity set in this run (their other columns stay).",
    )
    args = ap.parse_args(argv)

    from rag_persona.chat import default_persona
    from rag_persona.evaluation.evaluate import load_prompts, rejudge, run_evaluation
    from rag_persona.knowledge.facts import load_knowledge
    from rag_persona.utils.io import read_jsonl

    persona = default_persona()
    facts = {f.id: f.text for f in load_knowledge(persona.folder).facts}

    log = lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    prompts = [p for _, p in read_jsonl(args.prompts)]
    prompts = prompts[: args.limit] if args.limit else prompts
    rows, reports, earlier = [], {}, []
    for path in filter(None, args.earlier.split(",")):
        old = json.loads(Path(path).read_text(encoding="utf-8"))
        if old.get("prompts", args.prompts) != args.prompts:
            raise SystemExit(f"--with {path}: measured on {old['prompts']}, not {args.prompts}")
        # summaries are keyed by label, reports by variant, both in table order (labels may have changed since)
        for (key, report), summary in zip(old["reports"].items(), old["summary"].values(), strict=True):
            if len(report["replies"]) != len(prompts):
                raise SystemExit(
                    f"--with {path}: {key} has {len(report['replies'])} replies, not {len(prompts)}"
                )
            if args.rejudge:
                report = {**report, **rejudge(report["replies"], load_prompts(args.prompts), persona, facts)}
                summary = {**summary, **report["summary"], **split_facts(prompts, report["replies"])}
            if args.identity_set and key in args.identity_earlier.split(","):
                summary = {**summary, **identity_new(args, key, log)}
            rows.append((LABELS.get(key, key) + " *", summary))
            reports[key] = report
        earlier.append(
            f"{path} ({old.get('date', 'date not recorded')}{', re-judged' if args.rejudge else ''})"
        )
    for key in filter(None, args.variants.split(",")):
        model, adapter = VARIANTS[key]
        log(f"{key}: {model} + {adapter}")
        started = time.perf_counter()
        report = run_evaluation(
            args.prompts, model=model, adapter=adapter, engine="llama.cpp", limit=args.limit, progress=log
        )
        summary = {**report["summary"], **split_facts(prompts, report["replies"])}
        summary["median_seconds"] = statistics.median(r["seconds"] for r in report["replies"])
        summary["wall_s"] = round(time.perf_counter() - started, 1)
        if args.identity_set:
            summary.update(identity_new(args, key, log))
        rows.append((LABELS[key], summary))
        reports[key] = report
        print(table(rows), flush=True)
        write(
            args, prompts, rows, reports, earlier
        )  # after each variant: a run cut short keeps what it measured
    write(args, prompts, rows, reports, earlier)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
