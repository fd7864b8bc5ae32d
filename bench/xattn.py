"""Cross-attention context injection vs context in the prompt: fact accuracy, latency, prefill, memory choice.

One process, one base model (the bundled 0.5B unless --model), with the trained cross-attention blocks
attached (adapters/xattn unless --weights). With no memory set the blocks do nothing, so "no context" and
"prompt" run on exactly the base model; every mode uses the same prompt builder and greedy decoding.

1. Fact accuracy on held-out questions with a golden fact (knowledge/<persona>/queries/test.jsonl; none of
   them is in the training dialogues): (a) no context, (b) context in the prompt, (c) context by
   cross-attention. Each question gets the same context in (b) and (c): its golden fact(s) plus two
   distractors (seeded; scores drawn so that order tells nothing, as in the RAFT training data). Fact
   accuracy, style, EOS and length are the shared persona metrics (rag_persona.evaluation.metrics).
2. Per-turn latency and prefill tokens for 1, 3, 10 and 30 facts, prompt vs cross-attention, the same
   question and a fixed number of new tokens. The system instruction is identical in both modes; rows
   marked "cached" reuse its KV cache (prompt mode can cache it as well: it precedes the context block).
3. Memory choice (--ablation NAME=WEIGHTS ...): held-out completion loss of the SFT eval rows whose golden
   fact is in memory, for each weights file (e.g. the frozen model's own hidden states vs a pooled e5
   vector per fact, trained with the same pilot recipe), with cache size and encoding time per fact.

    python bench/xattn.py                          # all sections, writes bench/results/xattn.md and .json
    python bench/xattn.py --limit 20 --skip-latency
    python bench/xattn.py --ablation hidden=runs/xattn-pilot-hidden e5=runs/xattn-pilot-e5
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _log(msg: str) -> None:
    print(f"[bench/xattn] {msg}", file=sys.stderr, flush=True)


class FixedLength:
    """Greedy settings that generate exactly n tokens (latency rows compare like with like).

    EOS is suppressed until n tokens follow the full prompt; `min_new_tokens` is not used because with a
    prefix KV cache `generate` counts it from the uncached part of the prompt only.
    """

    def __init__(self, n: int, prompt_len: int, eos_ids: list[int]):
        from rag_persona.generation import GenerationSettings

        self.inner = GenerationSettings(max_new_tokens=n, repetition_penalty=1.0)
        self.n, self.prompt_len, self.eos_ids = n, prompt_len, list(eos_ids)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def to_generate_kwargs(self) -> dict:
        from transformers import LogitsProcessor, LogitsProcessorList

        end, eos = self.prompt_len + self.n, self.eos_ids

        class NoEosBefore(LogitsProcessor):
            def __call__(self, input_ids, scores):
                if input_ids.shape[1] < end:
                    scores[:, eos] = float("-inf")
                return scores

        return {**self.inner.to_generate_kwargs(), "logits_processor": LogitsProcessorList([NoEosBefore()])}


MODES = ("no context", "prompt", "xattn")


def context_for(golden: list[str], facts: dict[str, str], rng: random.Random, distractors: int):
    from rag_persona.prompts import ContextFact

    pool = sorted(f for f in facts if f not in golden)
    ids = list(golden) + rng.sample(pool, distractors)
    return [ContextFact(i, facts[i], round(rng.uniform(0.80, 0.92), 4)) for i in ids]


# -- 1. fact accuracy ---------------------------------------------------------------------------------------
def fact_accuracy(env, queries, distractors: int, max_new_tokens: int, modes: Sequence[str] = MODES) -> dict:
    from rag_persona.evaluation.evaluate import persona_words
    from rag_persona.evaluation.metrics import PromptResult, judge, summarize
    from rag_persona.generation import GenerationSettings, ReplyStream
    from rag_persona.prompts import build_messages
    from rag_persona.xattn import XattnReplyStream

    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    rng = random.Random(0)
    words = persona_words(env.persona)
    results = {m: [] for m in modes}
    started = time.perf_counter()
    for n, q in enumerate(queries, 1):
        ctx = context_for(q.relevant, env.facts, rng, distractors)
        for mode in results:
            if mode == "xattn":
                messages = build_messages(env.persona, ctx, [], q.query, include_context=False)
                memory = env.memory(ctx)
                stream = XattnReplyStream(
                    env.loaded, messages, settings, xmodel=env.x, memory=memory, prefix=env.prefix
                )
            else:
                facts = ctx if mode == "prompt" else []
                stream = ReplyStream(env.loaded, build_messages(env.persona, facts, [], q.query), settings)
            for _ in stream:
                pass
            r = PromptResult(
                query=q.query,
                reply=stream.reply.text,
                ended_by_eos=stream.reply.ended_by_eos,
                context_ids=[c.id for c in ctx] if mode != "no context" else [],
                golden_ids=list(q.relevant),
                new_tokens=stream.reply.new_tokens,
                seconds=round(stream.reply.seconds, 2),
            )
            results[mode].append(judge(r, env.facts, persona_words=words))
        eta = (time.perf_counter() - started) / n * (len(queries) - n)
        _log(
            f"[{n}/{len(queries)}] {q.query[:20]!r}: "
            + " | ".join(
                f"{m}: {'✓' if rs[-1].fact_correct else '✗'} {rs[-1].reply[:24]!r}"
                for m, rs in results.items()
            )
            + f" (eta {eta:.0f}s)"
        )
    out = {}
    for mode, rs in results.items():
        s = summarize(rs)
        s["seconds_per_reply"] = round(statistics.mean(r.seconds for r in rs), 2)
        out[mode] = {"summary": s, "replies": [r.to_dict() for r in rs]}
    return out


# -- 2. latency and prefill -----------------------------------------------------------------------------------
def latency(env, sizes: list[int], new_tokens: int, repeats: int) -> list[dict]:
    from rag_persona.generation import ReplyStream, encode_messages, eos_token_ids
    from rag_persona.prompts import build_messages
    from rag_persona.xattn import PrefixCache, XattnReplyStream

    question = "お誕生日はいつですの？"
    golden = ["profile-birthday"] if "profile-birthday" in env.facts else [next(iter(env.facts))]
    eos = eos_token_ids(env.loaded.model, env.loaded.tokenizer)
    rows = []
    cfg = env.loaded.model.config
    kv_per_token = (
        cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2
    )
    x_kv_per_token = (
        len(env.x.config.layers)
        * 2
        * cfg.num_key_value_heads
        * (cfg.hidden_size // cfg.num_attention_heads)
        * 2
    )
    for n in sizes:
        ctx = context_for(golden, env.facts, random.Random(n), min(n - 1, len(env.facts) - 1))
        prompt_msgs = build_messages(env.persona, ctx, [], question)
        x_msgs = build_messages(env.persona, ctx, [], question, include_context=False)
        p_ids = encode_messages(env.loaded.tokenizer, prompt_msgs)[0].tolist()
        x_ids = encode_messages(env.loaded.tokenizer, x_msgs)[0].tolist()
        common = 0
        while common < min(len(p_ids), len(x_ids)) - 1 and p_ids[common] == x_ids[common]:
            common += 1
        with env.x.using(None):
            p_prefix = PrefixCache(env.loaded.model, p_ids[:common])  # the instruction, before the context
        memory = env.memory(ctx)
        p_set, x_set = FixedLength(new_tokens, len(p_ids), eos), FixedLength(new_tokens, len(x_ids), eos)
        variants = {
            "prompt": lambda m=prompt_msgs, st=p_set: ReplyStream(env.loaded, m, st),
            "prompt, cached instruction": lambda m=prompt_msgs, p=p_prefix, st=p_set: XattnReplyStream(
                env.loaded, m, st, xmodel=env.x, memory=None, prefix=p
            ),
            "xattn": lambda m=x_msgs, mem=memory, st=x_set: XattnReplyStream(
                env.loaded, m, st, xmodel=env.x, memory=mem
            ),
            "xattn, cached system turn": lambda m=x_msgs, mem=memory, st=x_set: XattnReplyStream(
                env.loaded, m, st, xmodel=env.x, memory=mem, prefix=env.prefix
            ),
        }
        for name, make in variants.items():
            times, firsts, prefill = [], [], None
            for _ in range(repeats):
                stream = make()
                for _ in stream:
                    pass
                assert stream.reply.new_tokens == new_tokens, stream.reply.new_tokens
                times.append(stream.reply.seconds)
                firsts.append(stream.reply.first_token_seconds or float("nan"))
                prefill = getattr(stream, "prefilled_tokens", None) or stream.reply.prompt_tokens
            ctx_tokens = len(p_ids) - len(x_ids)
            row = {
                "facts": n,
                "variant": name,
                "prompt_tokens": len(p_ids) if name.startswith("prompt") else len(x_ids),
                "prefill_tokens": prefill,
                "memory_tokens": memory.tokens if name.startswith("xattn") else 0,
                "context_kv_bytes": ctx_tokens * kv_per_token
                if name.startswith("prompt")
                else memory.tokens * x_kv_per_token,
                "seconds": round(statistics.median(times), 3),
                "first_token_seconds": round(statistics.median(firsts), 3),
                "repeats": repeats,
            }
            rows.append(row)
            _log(
                f"{n:>2} facts, {name:<26} prefill {prefill:>4}  {row['seconds']:.2f}s (first token {row['first_token_seconds']:.2f}s)"
            )
    return rows


# -- 3. memory choice -------------------------------------------------------------------------------------------
def ablation(env, specs: list[str], data: Path, max_eval: int) -> list[dict]:
    import torch

    from rag_persona.xattn import PrefixCache, XattnModel, load_or_build_encodings, system_prefix_ids
    from training.stages.xattn import completion_loss, encode_example, load_examples, other_facts
    from training.stages.xattn import label_eos_id as _eos_id

    rows_out = []
    examples = load_examples(data / "sft_d1_eval.jsonl", env.persona, env.facts)
    examples = [e for e in examples if e.golden_ids and set(e.golden_ids) <= set(e.fact_ids)][:max_eval]
    tok = env.loaded.tokenizer
    eos = _eos_id(tok, env.loaded.model)
    encoded = [encode_example(tok, e.messages, e.completion, eos) for e in examples]
    head = system_prefix_ids(tok, examples[0].messages)
    env.x.remove_hooks()  # each variant attaches its own blocks to the same base
    with torch.no_grad():
        prefix = PrefixCache(env.loaded.model, head)
    variants = [("no memory (base model)", None)] + [tuple(s.split("=", 1)) for s in specs]
    for name, path in variants:
        x = XattnModel.load(env.loaded.model, path) if path else XattnModel(env.loaded.model)
        started = time.perf_counter()
        encs = load_or_build_encodings(x, tok, env.kb.facts, None)
        enc_ms = (time.perf_counter() - started) * 1000 / len(env.kb.facts)
        losses = {}
        # "own": each example's retrieved facts; "shuffled": another example's facts (none of its golden
        # ones). The gap is what the fact content contributes beyond the style the blocks learned.
        for which in ("own", "shuffled") if path else ("own",):
            total = count = 0.0
            with torch.no_grad():
                for k, ((ids, labels), ex) in enumerate(zip(encoded, examples, strict=True)):
                    fids = ex.fact_ids if which == "own" else other_facts(examples, k)
                    memory = x.memory_for([[encs.by_id[f] for f in fids]], start=len(head)) if path else None
                    loss, n = completion_loss(x, torch.tensor([ids]), torch.tensor([labels]), memory, prefix)
                    total += float(loss) * n
                    count += n
            losses[which] = total / count
        trained = x.config.trained if path else {}
        rows_out.append(
            {
                "variant": name,
                "weights": path,
                "memory": x.config.memory if path else "-",
                "heldout_loss": round(losses["own"], 4),
                "heldout_loss_shuffled_memory": round(losses["shuffled"], 4)
                if "shuffled" in losses
                else None,
                "examples": len(examples),
                "train_steps": trained.get("steps"),
                "train_examples_seen": trained.get("examples_seen"),
                "cache_kib_per_fact": round(encs.nbytes / len(env.kb.facts) / 1024, 1) if path else None,
                "encode_ms_per_fact": round(enc_ms, 1) if path else None,
                "parameters": sum(p.numel() for p in x.parameters()) if path else None,
            }
        )
        _log(f"ablation {name}: held-out loss {rows_out[-1]['heldout_loss']}")
        x.remove_hooks()
    return rows_out


# -- setup and report ---------------------------------------------------------------------------------------------
class Env:
    def __init__(self, model: str | None, weights: str | None, index: str | None):
        import torch

        from rag_persona.chat import default_persona
        from rag_persona.generation import load_causal_lm
        from rag_persona.knowledge.facts import load_knowledge
        from rag_persona.prompts import build_messages
        from rag_persona.retrieval.store import default_index_dir, is_index
        from rag_persona.settings import get_settings
        from rag_persona.xattn import (
            DEFAULT_ADAPTER_DIR,
            PrefixCache,
            XattnModel,
            load_or_build_encodings,
            system_prefix_ids,
        )

        self.persona = default_persona()
        self.kb = load_knowledge(get_settings().persona_dir())
        self.facts = {f.id: f.text for f in self.kb.facts}
        self.loaded = load_causal_lm(model, progress=_log)
        self.weights = weights or str(DEFAULT_ADAPTER_DIR)
        self.x = XattnModel.load(self.loaded.model, self.weights)
        index_dir = index or (default_index_dir() if is_index(default_index_dir()) else None)
        started = time.perf_counter()
        self.encodings = load_or_build_encodings(
            self.x, self.loaded.tokenizer, self.kb.facts, index_dir, progress=_log
        )
        self.encode_seconds = time.perf_counter() - started
        head = system_prefix_ids(self.loaded.tokenizer, build_messages(self.persona, [], [], "ごきげんよう"))
        with torch.no_grad():
            self.prefix = PrefixCache(self.loaded.model, head)
        self.threads = torch.get_num_threads()

    def memory(self, ctx):
        from rag_persona.xattn import encodings_for

        encs = encodings_for(self.x, self.loaded.tokenizer, ctx, self.encodings)
        return self.x.memory_for([encs], [[c.id for c in ctx]], start=len(self.prefix))


def _num(value, fmt: str = "{:.4f}") -> str:
    return "–" if value is None else fmt.format(value)


def markdown(report: dict) -> str:
    out = ["# Cross-attention context injection vs context in the prompt", ""]
    s = report["setup"]
    out += [
        f"Model `{s['model']}` (bf16, {s['threads']} CPU threads, {s['machine']}), cross-attention weights "
        f"`{s['weights']}` (layers {s['layers']}, gates {s['gates']}). Generated {s['date']}.",
        "",
    ]
    if "fact_accuracy" in report:
        fa = report["fact_accuracy"]
        n = next(iter(fa.values()))["summary"]["n"]
        out += [
            f"## Fact accuracy ({n} held-out questions with a golden fact; context = golden + "
            f"{s['distractors']} distractors)",
            "",
            "| mode | fact accuracy | お嬢様 style | EOS | median chars | s/reply |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for mode, r in fa.items():
            m = r["summary"]
            out.append(
                f"| {mode} | {m['fact_accuracy']:.2f} | {m['style_rate']:.2f} | {m['eos_rate']:.2f} | "
                f"{m['median_chars']:.0f} | {m['seconds_per_reply']:.1f} |"
            )
        out.append("")
    if "latency" in report:
        out += [
            f"## Per-turn latency ({s['latency_new_tokens']} new tokens, median of {s['latency_repeats']})",
            "",
            "| facts | variant | prompt tokens | prefill tokens | memory tokens | context cache KiB | turn s | first token s |",
            "|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in report["latency"]:
            out.append(
                f"| {r['facts']} | {r['variant']} | {r['prompt_tokens']} | {r['prefill_tokens']} | {r['memory_tokens']} | "
                f"{r['context_kv_bytes'] / 1024:.0f} | {r['seconds']:.2f} | {r['first_token_seconds']:.2f} |"
            )
        out.append("")
    if "ablation" in report:
        out += [
            "## Memory choice (held-out completion loss, SFT eval rows whose golden fact is in memory)",
            "",
            "| variant | memory | held-out loss | with another example's facts | train steps | examples seen "
            "| cache KiB/fact | encode ms/fact | parameters |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in report["ablation"]:
            out.append(
                f"| {r['variant']} | {r['memory']} | {r['heldout_loss']:.4f} | "
                f"{_num(r['heldout_loss_shuffled_memory'])} | {r['train_steps'] or '–'} | "
                f"{r['train_examples_seen'] or '–'} | {r['cache_kib_per_fact'] or '–'} | "
                f"{r['encode_ms_per_fact'] or '–'} | {_num(r['parameters'], '{:,}')} |"
            )
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--weights", default=None, help="cross-attention weights (default adapters/xattn)")
    ap.add_argument("--index", default=None)
    ap.add_argument(
        "--queries", default=None, help="labelled queries (default the persona's queries/test.jsonl)"
    )
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--distractors", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--sizes", default="1,3,10,30")
    ap.add_argument("--latency-new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ablation", nargs="*", default=[], metavar="NAME=WEIGHTS")
    ap.add_argument("--data", default=str(ROOT / "runs" / "data"), help="build-data folder (ablation)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument(
        "--modes", default=",".join(MODES), help=f"fact-accuracy modes, comma-separated ({', '.join(MODES)})"
    )
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument(
        "--out", default=str(ROOT / "bench" / "results" / "xattn"), help="writes OUT.md and OUT.json"
    )
    args = ap.parse_args(argv)

    import torch

    from rag_persona.knowledge.facts import load_queries
    from rag_persona.settings import get_settings

    if args.threads:
        torch.set_num_threads(args.threads)
    env = Env(args.model, args.weights, args.index)
    report: dict = {
        "setup": {
            "model": env.loaded.source,
            "weights": env.weights,
            "layers": env.x.config.layers,
            "gates": {k: round(v, 3) for k, v in env.x.gates().items()},
            "threads": env.threads,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "distractors": args.distractors,
            "latency_new_tokens": args.latency_new_tokens,
            "latency_repeats": args.repeats,
            "fact_encodings": {
                "facts": len(env.kb.facts),
                "seconds": round(env.encode_seconds, 2),
                "computed_now": env.encodings.computed,
                "kib": round(env.encodings.nbytes / 1024),
            },
        }
    }
    out = Path(args.out)

    def save() -> str:
        md = markdown(report)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(md + "\n", encoding="utf-8")
        out.with_suffix(".json").write_text(
            json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
        )
        return md

    if not args.skip_accuracy:
        path = Path(args.queries) if args.queries else get_settings().persona_dir() / "queries" / "test.jsonl"
        queries = [q for q in load_queries(path, env.facts) if q.relevant][: args.limit]
        report["setup"]["queries"] = str(path)
        modes = [m.strip() for m in args.modes.split(",")]
        if unknown := [m for m in modes if m not in MODES]:
            ap.error(f"--modes: unknown mode {unknown[0]!r}")
        report["fact_accuracy"] = fact_accuracy(env, queries, args.distractors, args.max_new_tokens, modes)
        save()
    if not args.skip_latency:
        sizes = [int(s) for s in args.sizes.split(",")]
        report["latency"] = latency(env, sizes, args.latency_new_tokens, args.repeats)
        save()
    if args.ablation:
        report["ablation"] = ablation(env, args.ablation, Path(args.data), max_eval=24)
    md = save()
    print(md)
    _log(f"wrote {out.with_suffix('.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
