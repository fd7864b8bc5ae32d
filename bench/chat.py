"""Chat engines side by side on CPU: load time, time to first token (cold, cached prefix), decode speed, RSS.

Each row (model × engine) runs in its own child process, so its peak RSS (`ru_maxrss`) is its own. Every
engine gets the same prompt ids (`build_messages` + `encode_messages`) and greedy settings, timed by
`Generation.timings`. Load: opening the engine; one-time preparation (verifying and converting the bundled
parts, the adapter's GGUF LoRA) is done before and not counted. TTFT cold: the first turn of a new
conversation; llama.cpp would reuse the longest common prefix of its last prompt, so its context is reset
first (the remote server gets a one-token prompt with another first token). TTFT cached prefix: the next
question of that conversation (the previous exchange in the history, facts "retrieved" for the new
question), so what is reused is what the chat really reuses: the persona instruction up to the first fact
that differs. Decode tok/s: Σ(new tokens − 1) / Σ(first-to-last-token time) over the row's turns.
Prompts grow to a target size with more of the persona's facts (and, for long targets, earlier exchanges
from its dialogues); the instruction alone is ~220 tokens, so a smaller target gives the shortest real prompt.
Remote: a `llama_cpp.server` on 127.0.0.1 with the same GGUF and LoRA. Models get the chat's default adapter.
`--api`: concurrent clients against a real `rag-persona serve --engine E`.

    python bench/chat.py [--models A,B] [--engines E,F] [--sizes 150,600] [--repeats 3] [--api] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL, BIG_MODEL = "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"
ENGINES = ("transformers", "llama.cpp", "remote")
GOAL_SPEEDUP, GOAL_BIG_TOK_S, GOAL_TTFT_S = 3.0, 20.0, 1.0
MAX_FILLER_EXCHANGES = 4  # under MAX_HISTORY_TURNS, so the follow-up turn's history is never trimmed
READY_TIMEOUT_S = 900


# -- prompts -----------------------------------------------------------------------------------------------


@dataclass
class PromptMaterial:
    """The persona, its facts (the retrieved-looking context) and its dialogues (earlier exchanges)."""

    persona: object
    facts: list
    exchanges: list[tuple[str, str]]
    tokenizer: object

    @classmethod
    def load(cls, tokenizer) -> PromptMaterial:
        from rag_persona.chat import default_persona
        from rag_persona.knowledge.facts import load_knowledge
        from rag_persona.settings import get_settings
        from rag_persona.utils.io import read_jsonl

        folder = get_settings().persona_dir()
        exchanges = [
            (turn["user"], turn["ojousama"])
            for _, row in read_jsonl(folder / "dialogues.jsonl")
            for turn in row.get("turns", [])
            if turn.get("user") and turn.get("ojousama")
        ]
        facts = [f for f in load_knowledge(folder) if f.questions]
        return cls(default_persona(), facts, exchanges, tokenizer)

    def question(self, i: int) -> tuple[int, str]:
        """(fact index, question): spread over the persona's facts, a different one for each i."""
        index = (i * 37 + 5) % len(self.facts)
        return index, self.facts[index].questions[0]

    def encode(self, facts: list, history: list[dict], question: str) -> list[int]:
        from rag_persona.generation import encode_messages
        from rag_persona.prompts import build_messages

        messages = build_messages(self.persona, facts, history, question)
        return encode_messages(self.tokenizer, messages)[0].tolist()

    def prompt(self, fact: int, question: str, history: list[dict], target: int, seed: int) -> list[int]:
        """The question with its fact, grown with neighbouring facts (and, for a long target, earlier
        exchanges placed before `history`) until it has at least `target` tokens."""
        from rag_persona.prompts import ContextFact

        def context(k: int) -> ContextFact:
            f = self.facts[(fact + k) % len(self.facts)]
            return ContextFact(f.id, f.text, score=0.9 - 0.01 * k)  # the question's own fact ranks first

        facts, earlier = [context(0)], []
        ids = self.encode(facts, history, question)
        while len(ids) < target and len(facts) < len(self.facts):
            exchanges = len(earlier) // 2  # alternate: a fact, an exchange, a fact, ...
            if target >= 400 and exchanges < MAX_FILLER_EXCHANGES and exchanges < len(facts) - 1:
                user, reply = self.exchanges[(seed * 7 + len(earlier)) % len(self.exchanges)]
                earlier += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
            else:
                facts.append(context(len(facts)))
            ids = self.encode(facts, earlier + history, question)
        return ids

    def conversation(self, seed: int, target: int) -> tuple[list[int], Callable[[str], list[int]]]:
        """The first turn's ids, and a function giving the follow-up turn's ids once the reply is known."""
        fact1, q1 = self.question(2 * seed)
        fact2, q2 = self.question(2 * seed + 1)
        first = self.prompt(fact1, q1, [], target, seed)

        def follow_up(reply: str) -> list[int]:
            exchange = [{"role": "user", "content": q1}, {"role": "assistant", "content": reply or "…"}]
            return self.prompt(fact2, q2, exchange, target, seed)

        return first, follow_up


# -- measuring one engine ----------------------------------------------------------------------------------


def run_turn(backend, ids: list[int], settings) -> dict:
    gen = backend.generate(ids, settings)
    text = "".join(gen)
    t = gen.timings
    decode_s = (t.total_ms - (t.ttft_ms or t.total_ms)) / 1000  # first to last token
    return {**t.to_dict(), "decode_s": decode_s, "stop": gen.stop_reason, "text": text}


def forget_prefix(backend, settings) -> None:
    """Make the next turn cold: nothing of an earlier prompt may be reused."""
    if backend.engine == "llama.cpp":
        backend.llama.reset()
    elif backend.engine == "remote":
        # The server keeps its last prompt in its context; a prompt with another first token shares none of it.
        from dataclasses import replace

        list(backend.generate(backend.tokenizer.encode("flush"), replace(settings, max_new_tokens=1)))


def measure(backend, material: PromptMaterial, sizes: list[int], repeats: int, settings) -> list[dict]:
    """Per size and repeat: a new conversation (cold first turn) and its next question (cached prefix)."""
    turns = []
    for size in sizes:
        for rep in range(repeats):
            seed = rep + 100 * size
            first, follow_up = material.conversation(seed, size)
            forget_prefix(backend, settings)
            cold = run_turn(backend, first, settings)
            cached = run_turn(backend, follow_up(cold["text"]), settings)
            for kind, turn in (("cold", cold), ("cached", cached)):
                turns.append({"size": size, "kind": kind, **turn})
                say(
                    f"  {size}/{kind}: {turn['prompt_tokens']} tok (reused {turn['cached_tokens']}), TTFT "
                    f"{turn['ttft_ms'] or 0:.0f} ms, {turn['completion_tokens']} new in {turn['decode_s']:.2f}s"
                )
    return turns


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def prepare_files(model: str, engine: str, adapter: str | None) -> float:
    """One-time work before the timed load: verified GGUF / converted weights, the adapter as a GGUF LoRA."""
    from rag_persona.generation import BUNDLED, resolve_model_path
    from rag_persona.generation.llamacpp import gguf_lora_for, resolve_gguf

    started = time.perf_counter()
    if engine == "transformers":
        if model in BUNDLED:
            resolve_model_path(model, progress=say)
    else:
        gguf, _ = resolve_gguf(model, progress=say)
        if adapter:
            gguf_lora_for(adapter, gguf)
    return time.perf_counter() - started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = READY_TIMEOUT_S) -> float:
    """Seconds until `url` answers 200; the server's last log lines if it exits or never answers."""
    import httpx

    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if proc.poll() is not None:
            lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
            tail = [x for x in (re.sub(r"[│╭╰╮╯─]+", "", t).strip() for t in lines) if x][-3:]  # no box
            raise RuntimeError(f"server exited with {proc.returncode}: " + " / ".join(tail))
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"server not ready after {timeout:.0f}s ({url})")


@contextmanager
def server_process(cmd: list[str], ready_url: str, log: Path):
    """Start a server, yield (its process, its start-to-ready seconds), stop it; then its peak RSS is in
    RUSAGE_CHILDREN."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        yield proc, wait_ready(ready_url, proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def llama_server_cmd(model: str, adapter: str | None, port: int, threads: int) -> list[str]:
    from rag_persona.generation.llamacpp import gguf_lora_for, llama_server_command, resolve_gguf

    gguf, _ = resolve_gguf(model)
    cmd = llama_server_command(gguf, "--host", "127.0.0.1")
    cmd += ["--port", str(port), "--n_ctx", "4096", "--n_threads", str(threads)]
    # logits_all False as in our own llama.cpp engine: the server's default (True) projects every prompt
    # token onto the vocabulary, which doubles a 0.5B model's prefill time.
    cmd += ["--n_threads_batch", str(threads), "--logits_all", "False", "--verbose", "False"]
    if adapter:
        cmd += ["--lora_path", str(gguf_lora_for(adapter, gguf))]
    return cmd


def engine_threads(spec: dict) -> int:
    return spec.get("threads") or int(os.environ.get("RAG_PERSONA_THREADS", 0)) or os.cpu_count() or 1


def open_row_engine(spec: dict, stack) -> tuple[object, float]:
    """(backend, load seconds); a remote row's server is started inside `stack` and stopped with it."""
    from rag_persona.generation.engines import open_engine

    started = time.perf_counter()
    if spec["engine"] == "remote":
        port = free_port()
        log = Path(tempfile.mkdtemp(prefix="bench-chat-")) / "llama_server.log"
        cmd = llama_server_cmd(spec["model"], spec["adapter"], port, engine_threads(spec))
        stack.enter_context(server_process(cmd, f"http://127.0.0.1:{port}/v1/models", log))
        backend = open_engine(f"http://127.0.0.1:{port}", spec["model"], progress=say)
    else:
        backend = open_engine(spec["engine"], spec["model"], adapter=spec["adapter"], progress=say)
    return backend, time.perf_counter() - started


def run_engine_row(spec: dict) -> dict:
    from contextlib import ExitStack

    import psutil
    import torch
    import transformers  # noqa: F401 - imported before the baseline: every row needs it for the tokenizer

    from rag_persona.generation import GenerationSettings
    from rag_persona.generation.engines import tokenizer_for

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    prepare_s = prepare_files(spec["model"], spec["engine"], spec["adapter"])
    rss_before = psutil.Process().memory_info().rss
    settings = GenerationSettings(max_new_tokens=spec["max_new_tokens"])
    with ExitStack() as stack:
        backend, load_s = open_row_engine(spec, stack)
        print(f"[bench] {spec['model']} on {spec['engine']} loaded in {load_s:.1f}s", flush=True)
        material = PromptMaterial.load(tokenizer_for(spec["model"]))
        first, _ = material.conversation(seed=99, target=0)
        run_turn(backend, first, GenerationSettings(max_new_tokens=4))  # warm-up: allocations, first kernels
        turns = measure(backend, material, spec["sizes"], spec["repeats"], settings)
        threads = backend.info.get("threads") if spec["engine"] == "llama.cpp" else torch.get_num_threads()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    server_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # only a remote row has one
    if spec["engine"] == "remote":
        threads = engine_threads(spec)
    rss_mb = {"rss_before_mb": rss_before / 2**20, "peak_rss_mb": peak_mb, "server_peak_rss_mb": server_mb}
    return {**spec, "prepare_s": prepare_s, "load_s": load_s, **rss_mb, "threads": threads, "turns": turns}


# -- concurrent API clients --------------------------------------------------------------------------------


async def api_clients(url: str, questions: list[str], clients: int, max_tokens: int) -> list[dict]:
    """`clients` concurrent clients, each sending its share of `questions` one after another."""
    import asyncio

    import httpx

    async def one(client, question: str) -> dict:
        body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens}
        started = time.perf_counter()
        try:
            res = await client.post(url, json=body)
            data = res.json() if res.headers.get("content-type", "").startswith("application/json") else {}
            ok = res.status_code == 200 and bool(data.get("choices"))
            error = None if ok else f"HTTP {res.status_code}: {res.text[:160]}"
        except httpx.HTTPError as exc:
            data, ok, error = {}, False, f"{type(exc).__name__}: {exc}"
        timings = (data.get("rag_persona") or {}).get("timings")
        return {"latency_s": time.perf_counter() - started, "ok": ok, "error": error, "timings": timings}

    async def client_loop(share: list[str]) -> list[dict]:
        async with httpx.AsyncClient(timeout=600) as client:
            return [await one(client, q) for q in share]

    shares = [questions[c::clients] for c in range(clients)]
    return [r for rows in await asyncio.gather(*(client_loop(s) for s in shares)) for r in rows]


def run_api_row(spec: dict) -> dict:
    """`rag-persona serve --engine E` on a free port; one warm-up request, then the concurrent clients."""
    import asyncio

    from rag_persona.generation.engines import tokenizer_for

    cli = Path(sys.executable).with_name("rag-persona")
    port = free_port()
    cmd = [str(cli), "serve", "--port", str(port), "--engine", spec["engine"], "--model", spec["model"]]
    log = Path(tempfile.mkdtemp(prefix="bench-chat-")) / "serve.log"
    material = PromptMaterial.load(tokenizer_for(spec["model"]))
    questions = [material.question(i)[1] for i in range(spec["clients"] * spec["requests"] + 1)]
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    with server_process(cmd, f"http://127.0.0.1:{port}/v1/health", log) as (_, ready_s):
        warm = asyncio.run(api_clients(url, questions[-1:], 1, spec["max_new_tokens"]))[0]
        started = time.perf_counter()
        replies = asyncio.run(api_clients(url, questions[:-1], spec["clients"], spec["max_new_tokens"]))
        wall_s = time.perf_counter() - started
    server_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        **spec,
        "ready_s": ready_s,
        "warm_up": warm,
        "wall_s": wall_s,
        "replies": replies,
        "server_peak_rss_mb": server_mb,
    }


def row_main(spec: dict, out: Path) -> None:
    """The child process: run one row, write its result (or its error) as JSON."""
    try:
        result = run_api_row(spec) if spec["kind"] == "api" else run_engine_row(spec)
    except Exception as exc:  # noqa: BLE001 - reported in the table; the other rows still run
        out.write_text(json.dumps({**spec, "error": f"{type(exc).__name__}: {exc}"}), encoding="utf-8")
        raise
    out.write_text(json.dumps(result, ensure_ascii=False), encoding="utf-8")


def run_child(spec: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-chat-") as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, __file__, "--row", json.dumps(spec), "--row-out", str(out)]
        rc = subprocess.run(cmd, check=False).returncode
        if out.is_file():
            return json.loads(out.read_text(encoding="utf-8"))
        return {**spec, "error": f"child exited with {rc} and wrote no result"}


# -- report ------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between order statistics (numpy's default); None for no values."""
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return None
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def decode_rate(turns: list[dict]) -> float | None:
    seconds = sum(t["decode_s"] for t in turns)
    tokens = sum(max(t["completion_tokens"] - 1, 0) for t in turns)
    return tokens / seconds if seconds > 0 else None


def ttft(turns: list[dict], kind: str, q: float) -> float | None:
    value = percentile([t["ttft_ms"] for t in turns if t["kind"] == kind], q)
    return None if value is None else value / 1000


def fmt(value, spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)


def row_lines(row: dict) -> list[str]:
    name = f"| {row['model']} | {row['engine']} | {Path(row['adapter']).name if row['adapter'] else 'none'} |"
    if row.get("error"):
        return [f"{name} failed: {row['error'][:200]} |" + " |" * 7]
    rss = f"{row['rss_before_mb']:.0f} → {row['peak_rss_mb']:.0f}"
    if row["engine"] == "remote":
        rss += f" (server {row['server_peak_rss_mb']:.0f})"
    lines = []
    for size in row["sizes"]:
        turns = [t for t in row["turns"] if t["size"] == size]
        tokens = percentile([t["prompt_tokens"] for t in turns], 0.5)
        reused = percentile([t["cached_tokens"] for t in turns if t["kind"] == "cached"], 0.5)
        cells = [
            f"{row['load_s']:.1f}",
            rss,
            f"{size} ({tokens:.0f})",
            f"{fmt(ttft(turns, 'cold', 0.5))} / {fmt(ttft(turns, 'cold', 0.95))}",
            f"{fmt(ttft(turns, 'cached', 0.5))} / {fmt(ttft(turns, 'cached', 0.95))}",
            "?" if row["engine"] == "remote" else f"{reused:.0f}",
            fmt(decode_rate(turns), ".1f"),
            str(row["threads"]),
        ]
        lines.append(f"{name} {' | '.join(cells)} |")
    return lines


def find(rows: list[dict], model: str, engine: str) -> dict | None:
    return next(
        (r for r in rows if r["model"] == model and r["engine"] == engine and not r.get("error")), None
    )


def goal_lines(rows: list[dict], sizes: list[int]) -> tuple[list[str], list[dict]]:
    """The issue's goals as PASS/FAIL lines (and as data); a goal whose rows did not run says so."""

    def turns(model: str) -> list[dict]:
        return (find(rows, model, "llama.cpp") or {}).get("turns", [])

    goals = []  # {goal, value (None: not measured), unit, pass}

    def add(goal: str, value: float | None, unit: str, passes) -> None:
        goals.append(
            {"goal": goal, "value": value, "unit": unit, "pass": None if value is None else passes(value)}
        )

    for model in dict.fromkeys(r["model"] for r in rows):
        hf = decode_rate((find(rows, model, "transformers") or {}).get("turns", []))
        cpp = decode_rate(turns(model))
        goal = f"{model}: llama.cpp decode ≥ {GOAL_SPEEDUP:g}× transformers"
        add(goal, cpp / hf if hf and cpp else None, "×", lambda v: v >= GOAL_SPEEDUP)
    goal = f"{BIG_MODEL} llama.cpp decode ≥ {GOAL_BIG_TOK_S:g} tok/s"
    add(goal, decode_rate(turns(BIG_MODEL)), " tok/s", lambda v: v >= GOAL_BIG_TOK_S)
    for size in sizes:
        goal = f"{DEFAULT_MODEL} llama.cpp TTFT p50 with the cached prefix ≤ {GOAL_TTFT_S:g} s (size {size})"
        value = ttft([t for t in turns(DEFAULT_MODEL) if t["size"] == size], "cached", 0.5)
        add(goal, value, " s", lambda v: v <= GOAL_TTFT_S)
    verdict = {True: "PASS", False: "FAIL", None: "not measured"}
    lines = [f"- **{verdict[g['pass']]}** {g['goal']}: {fmt(g['value'])}{g['unit']}" for g in goals]
    return lines, goals


def api_lines(rows: list[dict]) -> list[str]:
    lines = [
        "## Concurrent API clients (`rag-persona serve`)",
        "",
        "| model | engine | clients × requests | ready s | latency p50 / p95 s | failures | req/s | "
        "server TTFT p50 ms | server peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        name = f"| {row['model']} | {row['engine']} | {row['clients']} × {row['requests']} |"
        if row.get("error"):
            lines.append(f"{name} failed: {row['error'][:300]} |" + " |" * 5)
            continue
        replies = row["replies"]
        latency = [r["latency_s"] for r in replies]
        failures = [r for r in replies if not r["ok"]]
        server_ttft = percentile([(r["timings"] or {}).get("ttft_ms") for r in replies], 0.5)
        cells = [
            f"{row['ready_s']:.1f}",
            f"{fmt(percentile(latency, 0.5))} / {fmt(percentile(latency, 0.95))}",
            f"{len(failures)}" + (f" ({failures[0]['error'][:80]})" if failures else ""),
            f"{len(replies) / row['wall_s']:.2f}",
            fmt(server_ttft, ".0f"),
            f"{row['server_peak_rss_mb']:.0f}",
        ]
        lines.append(f"{name} {' | '.join(cells)} |")
    return [*lines, ""]


def report(args, rows: list[dict], api_rows: list[dict], machine: dict) -> tuple[str, list[dict]]:
    goals_text, goals = goal_lines(rows, args.sizes)
    lines = [
        "# Chat engines on CPU: load, time to first token, decode speed, memory",
        "",
        f"{machine['cpu']}, {machine['cpus']} logical CPUs, Python {machine['python']}; 1-min load average "
        f"{machine['load_start']:.2f} at the start, {machine['load_end']:.2f} at the end; total "
        f"{machine['wall_s'] / 60:.1f} min. Greedy, max {args.max_new_tokens} new tokens, {args.repeats} "
        "conversation(s) per size (a cold first turn + a follow-up question with the cached prefix).",
        "",
        "| model | engine | adapter | load s | RSS MB before load → peak | prompt target (real) tok | "
        "TTFT cold p50 / p95 s | TTFT cached p50 / p95 s | reused tok | decode tok/s | threads |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[line for row in rows for line in row_lines(row)],
        "",
        "Reused tok: prompt tokens of the follow-up question found in llama.cpp's KV cache (the persona "
        "instruction up to the first differing fact); transformers reuses none; the remote server does not "
        "say. Remote: the bench process holds only the tokenizer, the server's own peak RSS is in brackets. "
        "TTFT includes the prefill; remote TTFT also the HTTP round trip.",
        "",
        "## Goals",
        "",
        *goals_text,
        "",
    ]
    if api_rows:
        lines += api_lines(api_rows)
    lines += ["Regenerate: `" + " ".join(["python", "bench/chat.py", *sys.argv[1:]]) + "`"]
    return "\n".join(lines) + "\n", goals


# -- main --------------------------------------------------------------------------------------------------


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    return next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), platform.machine())


def csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=csv, default=[DEFAULT_MODEL, BIG_MODEL], help="comma-separated")
    parser.add_argument("--engines", type=csv, default=list(ENGINES), help="of " + ",".join(ENGINES))
    parser.add_argument(
        "--remote-models", type=csv, default=[DEFAULT_MODEL], help="models also served by llama_cpp.server"
    )
    parser.add_argument("--sizes", type=lambda v: [int(x) for x in csv(v)], default=[150, 600])
    parser.add_argument("--repeats", type=int, default=3, help="conversations per size (cold + cached turn)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=0, help="for every engine (0: their default)")
    parser.add_argument("--no-adapter", action="store_true", help="no adapter (default: the chat's)")
    parser.add_argument("--api", action="store_true", help="also run concurrent clients against `serve`")
    parser.add_argument("--api-engines", type=csv, default=["llama.cpp", "transformers"])
    parser.add_argument("--api-model", default=DEFAULT_MODEL)
    parser.add_argument("--api-clients", type=int, default=4)
    parser.add_argument("--api-requests", type=int, default=3, help="requests per client")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "chat.md")
    parser.add_argument("--json", type=Path, help="also write every row and turn here")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: the child process running one row
    parser.add_argument("--row-out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def row_specs(args) -> list[dict]:
    from rag_persona.evaluation.evaluate import default_adapter

    base = {"kind": "engine", "sizes": args.sizes, "repeats": args.repeats, "threads": args.threads or None}
    base["max_new_tokens"] = args.max_new_tokens
    specs = []
    for model in args.models:
        adapter = None if args.no_adapter else default_adapter(model)
        for engine in args.engines:
            if engine != "remote" or model in args.remote_models:
                specs.append({**base, "model": model, "engine": engine, "adapter": adapter})
    return specs


def main() -> None:
    args = parse_args()
    if args.row:
        row_main(json.loads(args.row), args.row_out)
        return
    unknown = sorted(set(args.engines) - set(ENGINES))
    if unknown:
        raise SystemExit(f"--engines: unknown {', '.join(unknown)}; expected {', '.join(ENGINES)}")
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    rows = []
    for spec in row_specs(args):
        print(f"[bench] row: {spec['model']} on {spec['engine']} (adapter {spec['adapter']})", flush=True)
        rows.append(run_child(spec))
    api_rows = []
    if args.api:
        base = {"kind": "api", "model": args.api_model, "max_new_tokens": args.max_new_tokens}
        for engine in args.api_engines:
            print(f"[bench] API: {args.api_clients} clients against serve --engine {engine}", flush=True)
            spec = {**base, "engine": engine, "clients": args.api_clients, "requests": args.api_requests}
            api_rows.append(run_child(spec))
    machine = {"cpu": cpu_name(), "cpus": os.cpu_count(), "python": platform.python_version()}
    machine.update(load_start=load_start, load_end=os.getloadavg()[0], wall_s=time.perf_counter() - started)
    text, goals = report(args, rows, api_rows, machine)
    print()
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    if args.json:
        data = {"machine": machine, "goals": goals, "rows": rows, "api": api_rows}
        args.json.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
