"""Load and fault bench for a real `rag-persona serve`: concurrent streaming and non-streaming clients with drops.

One run, bounded in requests and wall time, against a server started on a free localhost port:
1. single client: every question once, one after another, non-streaming and greedy — the baseline replies
   and the single-client latency (the median reply seconds a user of the API sees on this machine);
2. load: `--clients` concurrent clients, each sending its `--requests` questions alternately streaming and
   non-streaming; a seeded share (`--drop`) of requests is abandoned by the client (a stream closed after its
   first text chunk, a non-streaming request whose client times out) — the server must cancel those;
3. after the last client: the queue must be empty and the worker idle within `--idle-timeout` seconds.

Cross-talk check: every question is different and decoding is greedy, so each reply completed under load
should equal that question's single-client reply. One that differs counts as cross-talk when it is closer to
another question's reply than to its own; otherwise it is counted apart, as a greedy tie flipped by the
prefix cache (llama.cpp prefills a prompt in a different split under load, and the last bits of the logits
move). Every response id must be unique (one id per stream). Failures are anything but 200 (503 only when more clients wait
than the queue holds), a wrong reply, or a broken stream. RSS of the server process before and after the load.

    python bench/load.py [--clients 8] [--requests 3] [--drop 0.25] [--max-tokens 48] [--engine auto]
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from chat import cpu_name, free_port, percentile, server_process  # noqa: E402 - bench scripts share helpers

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def questions(count: int) -> list[str]:
    """`count` different user questions from the persona's labelled dev queries (the ones users ask)."""
    path = ROOT / "knowledge" / "ojousama" / "queries" / "dev.jsonl"
    rows = [
        json.loads(line)["query"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    unique = list(dict.fromkeys(rows))
    if count > len(unique):
        raise SystemExit(
            f"--clients x --requests = {count}: only {len(unique)} different questions in {path}"
        )
    return unique[:count]


def body(question: str, max_tokens: int, stream: bool) -> dict:
    return {
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "stream": stream,
        "temperature": 0,
    }


async def send(client, url: str, question: str, args, *, stream: bool, drop_after_s: float | None) -> dict:
    """One request; `drop_after_s` abandons it (the stream after its first text chunk, else a client timeout)."""
    import httpx

    row = {"question": question, "stream": stream, "dropped": drop_after_s is not None, "ids": set()}
    started = time.perf_counter()
    try:
        if stream:
            text = await _stream(
                client, url, body(question, args.max_tokens, True), row, drop_after_s is not None
            )
        else:
            timeout = drop_after_s if drop_after_s is not None else args.request_timeout
            res = await client.post(url, json=body(question, args.max_tokens, False), timeout=timeout)
            row["status"] = res.status_code
            data = res.json()
            row["ids"].add(data.get("id"))
            text = data["choices"][0]["message"]["content"] if res.status_code == 200 else None
            row["error"] = None if res.status_code == 200 else data.get("error", {}).get("message")
    except httpx.TimeoutException:
        text, row["status"], row["error"] = None, "dropped" if row["dropped"] else "timeout", None
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, IndexError) as exc:
        text, row["status"], row["error"] = None, "broken", f"{type(exc).__name__}: {exc}"
    row["latency_s"] = time.perf_counter() - started
    row["text"] = text
    return row


async def _stream(client, url: str, payload: dict, row: dict, drop: bool) -> str | None:
    pieces: list[str] = []
    async with client.stream("POST", url, json=payload, timeout=600) as res:
        row["status"], row["error"] = res.status_code, None
        if res.status_code != 200:
            row["error"] = json.loads(await res.aread()).get("error", {}).get("message")
            return None
        async for line in res.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                row["status"], row["error"] = "broken", chunk["error"].get("message")
                return None
            row["ids"].add(chunk.get("id"))
            for choice in chunk.get("choices", []):
                pieces.append(choice.get("delta", {}).get("content") or "")
            if drop and any(pieces):
                row["status"] = "dropped"
                return None  # leaving the block closes the connection mid-stream
    return "".join(pieces)


async def run_clients(url: str, plan: list[list[tuple[str, bool, float | None]]], args) -> list[dict]:
    import httpx

    async def client_loop(requests) -> list[dict]:
        async with httpx.AsyncClient(timeout=args.request_timeout) as client:
            return [await send(client, url, q, args, stream=s, drop_after_s=d) for q, s, d in requests]

    results = await asyncio.gather(*(client_loop(r) for r in plan))
    return [row for rows in results for row in rows]


def load_plan(qs: list[str], args) -> list[list[tuple[str, bool, float | None]]]:
    """Per client: (question, stream?, drop after seconds or None), seeded."""
    rng = random.Random(args.seed)
    total = args.clients * args.requests
    # exactly round(drop × total) abandoned requests, at seeded positions (a per-request coin can draw none)
    dropped = set(rng.sample(range(total), round(args.drop * total)))
    plan = []
    for c in range(args.clients):
        mine = qs[c * args.requests : (c + 1) * args.requests]
        plan.append(
            [
                (q, (c + i) % 2 == 0, rng.uniform(0.3, 1.5) if c * args.requests + i in dropped else None)
                for i, q in enumerate(mine)
            ]
        )
    return plan


def health(base: str) -> dict:
    import httpx

    return httpx.get(f"{base}/v1/health", timeout=10).json()


def wait_idle(base: str, timeout: float) -> float | None:
    """Seconds until the queue is empty and the worker idle, or None when it is still busy after `timeout`."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        queue = health(base).get("queue", {})
        if not queue.get("busy") and not queue.get("waiting"):
            return time.perf_counter() - started
        time.sleep(0.1)
    return None


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def cross_talk(row: dict, baseline: dict[str, str]) -> bool:
    """A reply that differs from its own single-client reply is cross-talk when it is closer to another
    question's reply than to its own; otherwise it is a greedy tie flipped by llama.cpp's prefix cache
    (a prompt prefilled in a different split gives logits that differ in the last bits)."""
    own = difflib.SequenceMatcher(None, row["text"], baseline.get(row["question"]) or "").ratio()
    others = [
        difflib.SequenceMatcher(None, row["text"], text).ratio()
        for q, text in baseline.items()
        if q != row["question"] and text
    ]
    return bool(others) and max(others) > own


def judge(rows: list[dict], baseline: dict[str, str]) -> dict:
    done = [r for r in rows if r["status"] == 200 and r["text"] is not None]
    differ = [r for r in done if r["text"] != baseline.get(r["question"])]
    wrong = [r for r in differ if cross_talk(r, baseline)]
    ids = [i for r in rows for i in r["ids"] if i]
    return {
        "requests": len(rows),
        "completed": len(done),
        "dropped": sum(r["status"] == "dropped" for r in rows),
        "busy_503": sum(r["status"] == 503 for r in rows),
        "failures": [r for r in rows if r["status"] not in (200, "dropped", 503)] + wrong,
        "wrong_replies": len(wrong),
        "differ_from_single": len(differ),
        "differing": [
            {"question": r["question"], "load": r["text"], "single": baseline.get(r["question"])}
            for r in differ
        ],
        "streams_with_mixed_ids": sum(len(r["ids"]) > 1 for r in rows),
        "duplicate_ids": len(ids) - len(set(ids)),
        "latency_p50_s": percentile([r["latency_s"] for r in done], 0.5),
        "latency_p95_s": percentile([r["latency_s"] for r in done], 0.95),
    }


def serve_cmd(port: int, args) -> list[str]:
    cli = Path(sys.executable).with_name("rag-persona")
    cmd = [str(cli), "serve", "--port", str(port), "--engine", args.engine]
    return cmd + (["--model", args.model] if args.model else [])


def run(args) -> dict:
    qs = questions(args.clients * args.requests)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    url = f"{base}/v1/chat/completions"
    log = Path(tempfile.mkdtemp(prefix="bench-load-")) / "serve.log"
    with server_process(serve_cmd(port, args), f"{base}/v1/health", log) as (proc, ready_s):
        info = health(base)
        asyncio.run(run_clients(url, [[(qs[0], False, None)]], args))  # warm-up: first kernels, prefix cache
        started = time.perf_counter()
        single = asyncio.run(run_clients(url, [[(q, False, None) for q in qs]], args))
        single_s = time.perf_counter() - started
        baseline = {r["question"]: r["text"] for r in single if r["status"] == 200}
        rss_before = rss_mb(proc.pid)
        started = time.perf_counter()
        rows = asyncio.run(asyncio.wait_for(run_clients(url, load_plan(qs, args), args), args.time_limit))
        load_s = time.perf_counter() - started
        idle_s = wait_idle(base, args.idle_timeout)
        rss_after = rss_mb(proc.pid)
        served = health(base).get("queue", {}).get("served")
    return {
        "args": vars(args),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count()},
        "server": {
            "ready_s": ready_s,
            "engine": info.get("engine"),
            "model": info.get("model"),
            "adapter": info.get("adapter"),
        },
        "single": {
            **judge(single, baseline),
            "wall_s": single_s,
            "median_chars": percentile([len(t) for t in baseline.values()], 0.5),
        },
        "load": {**judge(rows, baseline), "wall_s": load_s},
        "idle_after_s": idle_s,
        "served": served,
        "rss_mb": {"before": rss_before, "after": rss_after},
        "rows": [{**r, "ids": sorted(i for i in r["ids"] if i)} for r in rows],
    }


def fmt(value, spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)


def report(result: dict) -> str:
    a, s, ld = result["args"], result["single"], result["load"]
    srv = result["server"]
    lines = [
        "# Load and fault bench: a real `rag-persona serve` on localhost",
        "",
        f"`python bench/load.py --clients {a['clients']} --requests {a['requests']} --drop {a['drop']} "
        f"--max-tokens {a['max_tokens']} --engine {a['engine']}` — {result['machine']['cpu']}, "
        f"{result['machine']['cores']} cores; server: {srv['engine']} · {srv['model']} · adapter {srv['adapter']}, "
        f"ready in {srv['ready_s']:.1f} s.",
        "",
        "| phase | clients | requests | completed | dropped by client | 503 | failures | wrong replies "
        "| p50 s | p95 s | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| single client | 1 | {s['requests']} | {s['completed']} | 0 | {s['busy_503']} | {len(s['failures'])} | — "
        f"| {fmt(s['latency_p50_s'])} | {fmt(s['latency_p95_s'])} | {s['wall_s']:.1f} |",
        f"| load (stream + non-stream, drops) | {a['clients']} | {ld['requests']} | {ld['completed']} "
        f"| {ld['dropped']} | {ld['busy_503']} | {len(ld['failures'])} | {ld['wrong_replies']} "
        f"| {fmt(ld['latency_p50_s'])} | {fmt(ld['latency_p95_s'])} | {ld['wall_s']:.1f} |",
        "",
        f"- Worker idle {fmt(result['idle_after_s'])} s after the last client (None = still busy after "
        f"{a['idle_timeout']} s); turns served in all: {result['served']}.",
        f"- Cross-talk: {ld['wrong_replies']} replies closer to another conversation's reply than to their own; "
        f"{ld['differ_from_single']} differ from their single-client reply at all (prefix-cache greedy ties); "
        f"{ld['streams_with_mixed_ids']} streams mixed ids; {ld['duplicate_ids']} duplicate response ids.",
        f"- Server RSS: {result['rss_mb']['before']:.0f} MiB before the load, {result['rss_mb']['after']:.0f} MiB "
        f"after ({result['rss_mb']['after'] - result['rss_mb']['before']:+.0f} MiB).",
        f"- Single-client median reply: {fmt(s['latency_p50_s'])} s for a median of "
        f"{fmt(s['median_chars'], '.0f')} characters (non-streaming, whole reply).",
    ]
    for d in ld["differing"][:5]:
        lines.append(f"- differs: {d['question']!r}: single {d['single']!r} / under load {d['load']!r}")
    for f in ld["failures"][:5]:
        lines.append(
            f"- failure: {f['question']!r} stream={f['stream']} status={f['status']} {f.get('error')}"
        )
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=3, help="per client")
    p.add_argument("--drop", type=float, default=0.25, help="share of requests the client abandons")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--engine", default="auto")
    p.add_argument("--model", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--time-limit", type=float, default=900.0, help="seconds for the whole load phase")
    p.add_argument("--idle-timeout", type=float, default=10.0)
    p.add_argument("--out", type=Path, default=RESULTS / "load.md")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    result = run(args)
    text = report(result)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    args.out.with_suffix(".json").write_text(
        json.dumps(result, ensure_ascii=False, indent=1, default=str), encoding="utf-8"
    )
    failed = (
        len(result["load"]["failures"]) + len(result["single"]["failures"]) or result["idle_after_s"] is None
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
