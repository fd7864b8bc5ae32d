"""Persona quality: base vs SFT vs SFT+DPO on held-out prompts, side by side in one process.

Every variant answers the same prompts through the same chat path (the default persona index, the one
prompt builder, greedy decoding, the same token limit), so the retrieved context is identical and only the
adapter differs. One base model is loaded; the adapters are attached to it and switched per variant.

    python bench/persona.py                                   # runs/data/eval_prompts.jsonl, default adapters
    python bench/persona.py --prompts FILE --sft runs/sft-0.5b-cpu --dpo adapters/ojousama-qwen2.5-coder-0.5b
    python bench/persona.py --limit 10 --json out.json

Prints a markdown table and writes it (with the setup and every reply) to bench/results/persona.md/.json.
Targets (the issue): style ≥ 0.90, EOS-terminated 1.00, leaked special text 0, median length 15–45
characters, fact accuracy not below the base model's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

COLUMNS = [
    ("style_rate", "お嬢様 style", "{:.2f}"),
    ("eos_rate", "EOS-terminated", "{:.2f}"),
    ("leak_rate", "leaked special text", "{:.2f}"),
    ("median_chars", "median chars", "{:.0f}"),
    ("length_in_range_rate", "15–45 chars", "{:.2f}"),
    ("one_sentence_rate", "one sentence", "{:.2f}"),
    ("fact_accuracy", "fact accuracy", "{:.2f}"),
    ("offtopic_handling", "off-topic handled", "{:.2f}"),
    ("mean_new_tokens", "mean new tokens", "{:.1f}"),
]


def _fmt(fmt: str, value) -> str:
    return "–" if value is None else fmt.format(value)


def table(rows: list[tuple[str, dict]]) -> str:
    head = "| variant | " + " | ".join(c[1] for c in COLUMNS) + " | s/reply |"
    sep = "|---|" + "---:|" * (len(COLUMNS) + 1)
    lines = [head, sep]
    for name, s in rows:
        cells = [_fmt(fmt, s.get(key)) for key, _, fmt in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {s.get('seconds_per_reply', 0):.1f} |")
    return "\n".join(lines)


def checks(rows: list[tuple[str, dict]]) -> list[str]:
    """The issue's targets, checked on the last variant (SFT+DPO) against the base."""
    base = dict(rows)["base"]
    name, s = rows[-1]
    med = s.get("median_chars") or 0
    out = [
        f"- style rate ≥ 0.90: {s['style_rate']:.2f} ({'pass' if s['style_rate'] >= 0.90 else 'FAIL'})",
        f"- EOS-terminated 1.00: {s['eos_rate']:.2f} ({'pass' if s['eos_rate'] == 1.0 else 'FAIL'})",
        f"- leaked special-token text 0: {s['leak_rate']:.2f} ({'pass' if s['leak_rate'] == 0 else 'FAIL'})",
        f"- median length 15–45: {med:.0f} ({'pass' if 15 <= med <= 45 else 'FAIL'})",
    ]
    if s.get("fact_accuracy") is not None and base.get("fact_accuracy") is not None:
        ok = s["fact_accuracy"] >= base["fact_accuracy"]
        out.append(
            f"- fact accuracy not below base: {s['fact_accuracy']:.2f} vs base {base['fact_accuracy']:.2f} "
            f"({'pass' if ok else 'FAIL'})"
        )
    return [f"{name}:"] + out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", default=str(ROOT / "runs/data/eval_prompts.jsonl"))
    ap.add_argument("--model", default=None, help="base model (default: the chat default)")
    ap.add_argument("--sft", default=str(ROOT / "runs/sft-0.5b-cpu"), help="SFT adapter folder")
    ap.add_argument(
        "--dpo", default=None, help="SFT+DPO adapter folder (default: the shipped default adapter)"
    )
    ap.add_argument("--index", default=None)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--out", default=str(ROOT / "bench/results/persona.md"))
    ap.add_argument("--json", default=None, help="also write the full report here (default: next to --out)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a busy machine)")
    ap.add_argument(
        "--reply-no-repeat-ngram", type=int, default=None, help="override the chat default (0: off)"
    )
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from peft import PeftModel

    from rag_persona.chat import PersonaChat, default_persona
    from rag_persona.evaluation.evaluate import default_adapter, evaluate_chat, load_prompts, open_retriever
    from rag_persona.generation import GenerationSettings, load_causal_lm

    log = lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    dpo = args.dpo or default_adapter(args.model)
    if not dpo:
        raise SystemExit("no SFT+DPO adapter: pass --dpo or ship a default adapter")
    prompts = load_prompts(args.prompts)[: args.limit] if args.limit else load_prompts(args.prompts)
    persona = default_persona()
    store, retriever = open_retriever(args.index, log=log)
    facts = {f.id: f.text for f in store.facts}
    loaded = load_causal_lm(args.model, progress=log)
    model = PeftModel.from_pretrained(loaded.model, args.sft, adapter_name="sft")
    model.load_adapter(dpo, adapter_name="dpo")
    model.eval()
    loaded.model = model
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    if args.reply_no_repeat_ngram is not None:
        settings.reply_no_repeat_ngram = args.reply_no_repeat_ngram

    variants = [("base", None), ("SFT", "sft"), ("SFT+DPO", "dpo")]
    rows, reports = [], {}
    for name, adapter in variants:
        log(f"{name}: {len(prompts)} prompts")
        started = time.perf_counter()
        if adapter:
            model.set_adapter(adapter)
        ctx = model.disable_adapter() if adapter is None else contextlib.nullcontext()
        with ctx:
            chat = PersonaChat(persona, retriever, loaded, settings)
            report = evaluate_chat(chat, prompts, facts, progress=log)
        summary = report["summary"]
        summary["seconds_per_reply"] = (time.perf_counter() - started) / len(prompts)
        rows.append((name, summary))
        reports[name] = report

    md = table(rows)
    print(md)
    print("\n".join(checks(rows)))
    setup = {
        "prompts": str(args.prompts),
        "n_prompts": len(prompts),
        "base_model": loaded.source,
        "sft_adapter": str(args.sft),
        "dpo_adapter": str(dpo),
        "index": str(getattr(store, "path", args.index)),
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "decoding": f"greedy, repetition_penalty {settings.repetition_penalty}, "
        f"reply_no_repeat_ngram {settings.reply_no_repeat_ngram or 'off'}",
        "machine": f"{platform.machine()} {platform.processor() or ''} {__import__('os').cpu_count()} cpus".strip(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    context_same = all(
        [r["context_ids"] for r in reports[n]["replies"]]
        == [r["context_ids"] for r in reports["base"]["replies"]]
        for n in reports
    )
    text = [
        "# Persona benchmark: base vs SFT vs SFT+DPO",
        "",
        "Reproduce: `python bench/persona.py` (after `rag-persona build-data --out runs/data` and training).",
        "",
        "```",
        json.dumps(setup, ensure_ascii=False, indent=1),
        "```",
        "",
        md,
        "",
        f"Same retrieved context for every variant: {context_same}.",
        "",
        *checks(rows),
        "",
        "Metric definitions: rag_persona/evaluation/metrics.py (marker list, fact key, off-topic rule).",
        "",
        "## Sample replies (first 12 prompts)",
        "",
        "| query | base | SFT | SFT+DPO |",
        "|---|---|---|---|",
    ]
    for i, p in enumerate(prompts[:12]):
        cells = [
            reports[n]["replies"][i]["reply"].replace("\n", " ").replace("|", "\\|")[:80] for n, _ in variants
        ]
        text.append(f"| {p.query} | " + " | ".join(cells) + " |")
    out.write_text("\n".join(text) + "\n", encoding="utf-8")
    json_path = Path(args.json) if args.json else out.with_suffix(".json")
    json_path.write_text(
        json.dumps({"setup": setup, "summary": dict(rows), "reports": reports}, ensure_ascii=False, indent=1),
        encoding="utf-8",
    )
    log(f"wrote {out} and {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
