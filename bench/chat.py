"""Chat latency on CPU: the app's engine vs a plain transformers `generate`, same model, same prompts, one run.

For each persona question the engine answers a real turn (retrieval + the prompt builder + the queue +
`ReplyStream`, exactly what the app and the API run); then plain `model.generate` gets the very same
token ids and decoding settings (greedy), timed with a minimal streamer, once called from the main thread
and once from a background thread (where `ReplyStream` runs it), so the engine's own overhead and the
effect of the calling thread show separately. Reported per path:

- time to first token (TTFT): from the request to the first generated token. For the engine this includes
  retrieval and prompt building (their share is printed below); the first *text* the user sees can come a
  few tokens later (the detokenizer holds back partial characters), printed as its own figure;
- decode tokens/s: Σ(new tokens − 1) / Σ(time from the first to the last token) over all runs;
- whether all paths produced the same reply (they should: same greedy settings).

The paths rotate per prompt after a warm-up so background load hits them alike.

    python bench/chat.py [--model M] [--max-new-tokens 64] [--repeats 2] [--out bench/results/chat.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

PROMPTS = [
    "あなたの名前はなんですか?",
    "趣味を教えてください",
    "ごきげんよう",
    "どんな犬を飼っているの？",
    "将来の夢は何ですか",
]


class FirstTokenTimer:
    """A transformers streamer that only records when the first generated token arrives."""

    def __init__(self):
        self.prompt_seen = False
        self.first = None

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        if self.first is None:
            self.first = time.perf_counter()

    def end(self):
        pass


class TokenClock:
    """Wraps the engine's model so the bench sees when the first *token* is generated (not just the first
    text piece, which the detokenizing streamer may hold back for a few tokens); everything else delegates."""

    def __init__(self, model):
        self._model = model
        self.first = None

    def __getattr__(self, name):
        return getattr(self._model, name)

    def generate(self, *args, streamer=None, **kwargs):
        clock, inner = self, streamer

        class Relay:
            seen_prompt = False

            def put(self, value):
                if self.seen_prompt and clock.first is None:
                    clock.first = time.perf_counter()
                self.seen_prompt = True
                inner.put(value)

            def end(self):
                inner.end()

        return self._model.generate(*args, streamer=Relay(), **kwargs)


def run_engine(engine, clock: TokenClock, prompt: str, options) -> dict:
    clock.first = None
    t0 = time.perf_counter()
    job = engine.submit([], prompt, options)
    t_plan = time.perf_counter()
    first_text = None
    reply = None
    for kind, value in job.events():
        if kind == "piece" and first_text is None:
            first_text = time.perf_counter()
        elif kind == "error":
            raise value
        elif kind == "done":
            reply = value
    end = time.perf_counter()
    first = clock.first or end
    return {
        "plan": job.plan,
        "retrieval_s": t_plan - t0,
        "ttft_s": first - t0,
        "first_text_s": (first_text or end) - t0,
        "decode_s": end - first,
        "new_tokens": reply.new_tokens,
        "text": reply.text,
    }


def run_generate_in_thread(loaded, messages: list[dict], settings) -> dict:
    import threading

    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(run_generate(loaded, messages, settings)))
    thread.start()
    thread.join()
    return out


def run_generate(loaded, messages: list[dict], settings) -> dict:
    import torch

    from rag_persona.generation import encode_messages, eos_token_ids

    model, tok = loaded.model, loaded.tokenizer
    t0 = time.perf_counter()
    ids = encode_messages(tok, messages).to(model.device)
    timer = FirstTokenTimer()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            eos_token_id=eos_token_ids(model, tok),
            pad_token_id=tok.pad_token_id,
            streamer=timer,
            **settings.to_generate_kwargs(),
        )
    end = time.perf_counter()
    new = out[0, ids.shape[1] :].tolist()
    first = timer.first or end
    return {
        "ttft_s": first - t0,
        "decode_s": end - first,
        "new_tokens": len(new),
        "text": tok.decode(new, skip_special_tokens=True).strip(),
    }


def summarize(rows: list[dict]) -> dict:
    decode_s = sum(r["decode_s"] for r in rows)
    return {
        "ttft_s": statistics.median(r["ttft_s"] for r in rows),
        "decode_tok_s": sum(max(r["new_tokens"] - 1, 0) for r in rows) / decode_s if decode_s else 0.0,
        "new_tokens": sum(r["new_tokens"] for r in rows) / len(rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="bundled alias, hub id or folder (default: the bundled 0.5B)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="runs per prompt and path")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "chat.md")
    parser.add_argument("--json", type=Path, help="also write the raw rows here")
    args = parser.parse_args()

    import torch

    from rag_persona.generation import GenerationSettings
    from rag_persona.generation import load_causal_lm
    from ui.engine import Engine, TurnOptions

    started = time.perf_counter()
    loaded = load_causal_lm(args.model, progress=lambda m: print(f"[bench] {m}"))
    load_s = time.perf_counter() - started
    from dataclasses import replace

    clock = TokenClock(loaded.model)
    engine = Engine(
        args.model,
        "none",
        loader=lambda *a, **k: replace(loaded, model=clock),
        progress=lambda m: print(f"[bench] {m}"),
    )
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    options = TurnOptions(generation=settings)
    print(f"[bench] model {loaded.source} loaded in {load_s:.1f}s; torch threads {torch.get_num_threads()}")

    # warm-up both paths (first calls allocate, compile kernels, load the embedder)
    warm = run_engine(
        engine, clock, "ごきげんよう", TurnOptions(generation=GenerationSettings(max_new_tokens=4))
    )
    run_generate(loaded, warm["plan"].messages, GenerationSettings(max_new_tokens=4))

    paths = {
        "engine": lambda prompt, plan: run_engine(engine, clock, prompt, options),
        "generate": lambda prompt, plan: run_generate(loaded, plan.messages, settings),
        "generate_thread": lambda prompt, plan: run_generate_in_thread(loaded, plan.messages, settings),
    }
    rows: dict[str, list[dict]] = {name: [] for name in paths}
    same = 0
    load_start = os.getloadavg()[0]
    for rep in range(args.repeats):
        for i, prompt in enumerate(PROMPTS):
            names = list(paths)
            shift = (i + rep) % len(names)
            plan = engine.plan([], prompt, options)
            result = {name: paths[name](prompt, plan) for name in names[shift:] + names[:shift]}
            for name in paths:
                rows[name].append(result[name])
            same += len({r["text"] for r in result.values()}) == 1
            print(
                f"[bench] {prompt[:14]:<14} "
                + " | ".join(
                    f"{n} ttft {r['ttft_s']:.2f}s {r['new_tokens']} tok {r['decode_s']:.1f}s"
                    for n, r in result.items()
                )
                + f" | {result['engine']['text'][:30]!r}"
            )
    s_ = {name: summarize(r) for name, r in rows.items()}
    retrieval_ms = statistics.median(r["retrieval_s"] for r in rows["engine"]) * 1000
    first_text = statistics.median(r["first_text_s"] for r in rows["engine"])
    from rag_persona.generation import encode_messages

    prompt_tokens = statistics.median(
        encode_messages(loaded.tokenizer, r["plan"].messages).shape[1] for r in rows["engine"]
    )
    n = len(rows["engine"])
    load_end = os.getloadavg()[0]
    labels = {
        "engine": "engine: retrieval + prompt + queue + ReplyStream (generate in a worker thread)",
        "generate": "plain transformers `generate`, same ids, main thread",
        "generate_thread": "plain transformers `generate`, same ids, in a background thread",
    }
    lines = [
        "# Chat latency: engine vs plain `generate` (CPU)",
        "",
        f"Model `{loaded.source}` ({loaded.dtype}, {loaded.device}); {len(PROMPTS)} persona questions × {args.repeats}, "
        f"greedy, max {args.max_new_tokens} new tokens; median prompt {prompt_tokens:.0f} tokens (persona instruction + "
        f"retrieved facts). {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; 1-min load average {load_start:.1f} at the start, {load_end:.1f} at the end "
        "(a shared machine: other jobs were running).",
        "",
        "| path | TTFT median (s) | decode tok/s | new tokens (mean) |",
        "|---|---:|---:|---:|",
        *[
            f"| {labels[name]} | {v['ttft_s']:.2f} | {v['decode_tok_s']:.1f} | {v['new_tokens']:.1f} |"
            for name, v in s_.items()
        ],
        "",
        f"Engine TTFT includes retrieval and prompt building: median {retrieval_ms:.0f} ms; its first visible "
        f"text arrives at {first_text:.2f} s (median). "
        f"Same reply text on all paths: {same}/{n}.",
        "",
        "Regenerate: `.venv/bin/python bench/chat.py` (writes this file).",
    ]
    table = "\n".join(lines)
    print()
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n", encoding="utf-8")
    if args.json:
        args.json.write_text(
            json.dumps({**s_, "retrieval_ms": retrieval_ms, "same_text": same, "runs": n}, indent=2),
            encoding="utf-8",
        )
    engine.close()


if __name__ == "__main__":
    main()
