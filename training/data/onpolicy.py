"""On-policy preference pairs: the model's own failing replies to training prompts become DPO's rejected answers.

The D1 pairs teach the register (お嬢様 chosen over plain). They say nothing about the failures the persona
metrics count: not naming herself, missing the retrieved fact, answering an off-topic request, inventing
specifics. Here the model to improve answers each training prompt as the chat would (same messages, greedy);
the evaluation judge scores the reply against the turn's reference; a reply that fails becomes the rejected
answer beside the reference as the chosen one. Only grounded turns are used: the golden facts are in the
prompt's context (or the turn needs none), so the chosen answer never teaches stating what the context lacks.
"""

from __future__ import annotations

import json
import random
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from rag_persona.errors import RagPersonaError
from rag_persona.evaluation.evaluate import EvalPrompt, judge_prompt
from rag_persona.evaluation.metrics import PromptResult
from rag_persona.prompts import Persona
from rag_persona.utils.io import atomic_folder, check_replaceable, read_jsonl, write_jsonl

MARKER = "onpolicy_manifest.json"
TRAIN_FILE = "dpo_op_train.jsonl"
EVAL_FILE = "dpo_op_eval.jsonl"
REPLIES_FILE = "replies.jsonl"


@dataclass
class Sampled:
    """One generated reply to a training row's prompt."""

    text: str
    ended_by_eos: bool
    new_tokens: int = 0


def failures(result: PromptResult) -> list[str]:
    """Why a judged reply is worse than its reference, in the persona metrics' terms (empty: it passes)."""
    reasons = []
    if result.identity_ok is False:
        reasons.append("identity")
    if result.fact_correct is False:
        reasons.append("fact")
    if result.offtopic_ok is False:
        reasons.append("offtopic")
    if result.invented:
        reasons.append("invented")
    if result.malformed:
        reasons.append("malformed")
    if not result.ended_by_eos:
        reasons.append("eos")
    if result.metrics is not None and result.metrics.style is False:
        reasons.append("style")
    return reasons


def grounded(row: dict) -> bool:
    """The chosen answer uses only what the prompt gives: its golden facts are all in the context, or the
    turn asks who the persona is (the system prompt always gives her name and summary)."""
    if row.get("raft") == "drop_golden":
        return False
    golden, context = set(row.get("golden_ids") or ()), set(row.get("context_ids") or ())
    return row.get("kind") == "identity" or golden <= context


def per_kind_counts(spec: str, what: str) -> dict[str, int]:
    """ "32,identity=64" → {"": 32, "identity": 64}: a default count and counts for named kinds."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        kind, _, value = part.rpartition("=")
        try:
            out[kind.strip()] = int(value)
        except ValueError:
            raise RagPersonaError(f"{what} {spec!r}: {part!r} is not N or KIND=N") from None
    if "" not in out or any(v < 0 for v in out.values()):
        raise RagPersonaError(f"{what} {spec!r}: needs a default N (counts ≥ 0), e.g. 32,identity=64")
    return out


def pick_rows(rows: Sequence[dict], per_kind: int | dict[str, int], seed: int) -> list[dict]:
    """Grounded rows, at most `per_kind` of each conversation kind (a seeded sample), in file order;
    `per_kind` may name counts per kind ({"": default, kind: n})."""
    caps = per_kind if isinstance(per_kind, dict) else {"": per_kind}
    by_kind: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        if grounded(row):
            by_kind.setdefault(str(row.get("kind", "")), []).append(i)
    rng = random.Random(f"{seed}-onpolicy")
    keep = set()
    for kind, idx in by_kind.items():
        cap = caps.get(kind, caps[""])
        keep.update(idx if len(idx) <= cap else rng.sample(idx, cap))
    return [rows[i] for i in sorted(keep)]


def as_eval_prompt(row: dict) -> EvalPrompt:
    """A DPO row's prompt as the evaluation sees a held-out one: query, history, golden ids, reference."""
    messages = row["prompt"]
    return EvalPrompt(
        query=messages[-1]["content"],
        history=[m for m in messages[1:-1]],
        golden_ids=list(row.get("golden_ids") or ()),
        kind=str(row.get("kind", "")),
        reference=row["chosen"][-1]["content"],
        id=str(row.get("id", "")),
    )


def judge_sample(row: dict, sample: Sampled, persona: Persona, facts: dict[str, str]) -> PromptResult:
    p = as_eval_prompt(row)
    result = PromptResult(
        query=p.query,
        reply=sample.text,
        ended_by_eos=sample.ended_by_eos,
        context_ids=list(row.get("context_ids") or ()),
        golden_ids=p.golden_ids,
        kind=p.kind,
        new_tokens=sample.new_tokens,
    )
    return judge_prompt(result, p, persona, facts)


def onpolicy_pairs(
    rows: Iterable[dict],
    sample: Callable[[dict, int], Sampled],
    persona: Persona,
    facts: dict[str, str],
    progress: Callable[[str], None] = lambda msg: None,
    attempts: Callable[[dict], int] = lambda row: 1,
) -> tuple[list[dict], Counter]:
    """(pairs, counts): each row answered by `sample(row, k)` for k < attempts(row) (0: greedy, then
    sampled) until a reply fails; the failing reply → the row with it as `rejected`."""
    pairs, counts = [], Counter()
    rows = list(rows)
    for i, row in enumerate(rows, 1):
        chosen = row["chosen"][-1]["content"]
        # What the reference itself fails (a general question's 1000 that no fact holds) is no fault here.
        excused = set(failures(judge_sample(row, Sampled(chosen, True), persona, facts)))
        counts["rows"] += 1
        for k in range(attempts(row)):
            got = sample(row, k)
            why = [w for w in failures(judge_sample(row, got, persona, facts)) if w not in excused]
            if why and got.text.strip() != chosen.strip():
                counts.update(f"fail:{w}" for w in why)
                counts["greedy" if k == 0 else "sampled"] += 1
                rejected = [{"role": "assistant", "content": got.text}]
                pairs.append({**row, "rejected": rejected, "onpolicy": why, "onpolicy_attempt": k})
                break
        if i % 25 == 0 or i == len(rows):
            progress(f"[{i}/{len(rows)}] {len(pairs)} failing replies so far")
    counts["pairs"] = len(pairs)
    return pairs, counts


def write_pairs(
    out: str | Path,
    pairs: Sequence[dict],
    mix: Sequence[dict],
    eval_rows: Sequence[dict],
    manifest: dict,
    replies: Sequence[dict] = (),
) -> Path:
    """The pairs plus `mix` (rows of the source DPO file kept for the register) as one DPO data folder."""
    train = sorted([*pairs, *mix], key=lambda r: r["id"])
    with atomic_folder(out, marker=MARKER, what="on-policy pairs output") as work:
        write_jsonl(work / TRAIN_FILE, train)
        write_jsonl(work / EVAL_FILE, eval_rows)
        write_jsonl(work / REPLIES_FILE, replies)  # every reply judged, failing or not
        manifest = {
            **manifest,
            "counts": {**manifest.get("counts", {}), "train": len(train), "eval": len(eval_rows)},
        }
        (work / MARKER).write_text(
            json.dumps(manifest, ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
        )
    return Path(out)


def read_rows(path: Path) -> list[dict]:
    """A DPO data file's rows, each with the fields the pairs are built from (checked before generating)."""
    rows, seen = [], set()
    for n, obj in read_jsonl(path, missing="DPO data file not found"):
        for name, kind in (("id", str), ("prompt", list), ("chosen", list)):
            if not isinstance(obj.get(name), kind) or not obj[name]:
                raise RagPersonaError(
                    f"{path}:{n}: field {name!r}: missing or not a non-empty {kind.__name__}"
                )
        if not (isinstance(obj["chosen"][-1], dict) and isinstance(obj["chosen"][-1].get("content"), str)):
            raise RagPersonaError(f"{path}:{n}: field 'chosen': the last message has no text content")
        if obj["id"] in seen:  # replies are cached by id: two rows of one id would share one reply
            raise RagPersonaError(
                f"{path}:{n}: field 'id': {obj['id']!r} repeats an earlier row's "
                "(a several-persona build-data from before ids named their persona: build it again)"
            )
        seen.add(obj["id"])
        rows.append(obj)
    return rows


def reply_source(model: str | None, adapter: str | Path | None, engine: str) -> dict:
    """Who wrote a cached reply: a resumed run reuses only replies from the same model, adapter and engine."""
    from rag_persona.generation.gguf_lora import weights_sha256

    # A path is compared whole (a relative one means another file from another folder); a name as given.
    where = [
        None if x is None else str(Path(x).absolute()) if Path(x).exists() else str(x)
        for x in (model, adapter)
    ]
    # An adapter retrained in place is another model: its weights' hash tells.
    weights = Path(adapter) / "adapter_model.safetensors" if adapter is not None else None
    digest = weights_sha256(adapter) if weights is not None and weights.is_file() else None
    return {"model": where[0], "adapter": where[1], "adapter_sha256": digest, "engine": engine}


def load_cache(path: Path, source: dict) -> tuple[dict[str, dict], int]:
    """(replies by key, how many were ignored): replies another model or adapter wrote are not this one's."""
    if not path.is_file():
        return {}, 0
    entries = [o for _, o in read_jsonl(path)]
    mine = {o["id"]: o for o in entries if o.get("by") == source}
    return mine, len(entries) - len(mine)


def build_onpolicy(
    data: str | Path,
    out: str | Path,
    *,
    model: str | None = None,
    adapter: str | None = None,
    engine: str = "auto",
    persona_id: str | None = None,
    source: str = "dpo_d1_train.jsonl",
    eval_source: str = "dpo_d1_eval.jsonl",
    per_kind: str = "150",
    mix: int = 32,
    seed: int = 0,
    samples: str = "1",
    progress: Callable[[str], None] = print,
) -> dict:
    """Answer a sample of DATA/SOURCE's prompts with the model (+ adapter), write the failing ones as pairs.

    `per_kind` ("32,identity=64"): grounded prompts answered per kind. A row whose greedy reply passes gets
    up to `samples` - 1 sampled replies ("1,identity=4": per kind; temperature 0.7, top-p 0.9, seeded per
    row) until one fails. Replies are appended to OUT.replies.jsonl as they come, so a killed run resumes
    where it stopped; the folder is written whole at the end, with every reply in its replies.jsonl.
    Returns the manifest.
    """
    from rag_persona.chat import default_persona
    from rag_persona.evaluation.evaluate import resolve_adapter
    from rag_persona.generation import GenerationSettings, ReplyStream
    from rag_persona.generation.engines import open_engine
    from rag_persona.knowledge.facts import load_knowledge
    from rag_persona.utils.io import file_sha256

    data, out = Path(data), Path(out)
    check_replaceable(out.absolute(), MARKER, "on-policy pairs output")  # before an hour of generation
    if mix < 0:
        raise RagPersonaError(f"--mix: {mix} must be 0 or more")
    rows = read_rows(data / source)
    eval_rows = read_rows(data / eval_source)  # read now, not after an hour of generation
    caps, tries = per_kind_counts(per_kind, "--per-kind"), per_kind_counts(samples, "--samples")
    picked = pick_rows(rows, caps, seed)
    persona = default_persona(persona_id)
    facts = {f.id: f.text for f in load_knowledge(persona.folder).facts}
    adapter = resolve_adapter(model, adapter, persona.id)
    cache_path = out.with_name(out.name + ".replies.jsonl")
    source_of = reply_source(model, adapter, engine)
    cache, foreign = load_cache(cache_path, source_of)
    progress(
        f"{len(picked)} grounded prompts of {len(rows)} ({len(cache)} answered before"
        + (f"; {foreign} cached replies by another model/adapter/engine ignored" if foreign else "")
        + f"); adapter {adapter}"
    )
    backend = open_engine(engine, model, adapter=adapter, progress=progress)
    settings = GenerationSettings()

    def sample(row: dict, k: int) -> Sampled:
        key = row["id"] if k == 0 else f"{row['id']}#{k}"
        if key not in cache:
            decode = settings if k == 0 else replace(settings, do_sample=True, seed=zlib.crc32(key.encode()))
            stream = ReplyStream(backend, row["prompt"], decode)
            for _ in stream:
                pass
            r = stream.reply
            cache[key] = {
                "id": key,
                "text": r.text,
                "ended_by_eos": r.ended_by_eos,
                "new_tokens": r.new_tokens,
                "by": source_of,
            }
            with cache_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(cache[key], ensure_ascii=False) + "\n")
        c = cache[key]
        return Sampled(c["text"], bool(c["ended_by_eos"]), int(c.get("new_tokens", 0)))

    def attempts(row: dict) -> int:
        return max(1, tries.get(str(row.get("kind", "")), tries[""]))

    pairs, counts = onpolicy_pairs(picked, sample, persona, facts, progress, attempts)
    chosen_ids = {r["id"] for r in picked}
    rest = [r for r in rows if r["id"] not in chosen_ids]
    kept = random.Random(f"{seed}-mix").sample(rest, min(mix, len(rest)))
    manifest = {
        "source": str(data / source),
        "source_sha256": file_sha256(data / source),
        "model": model,
        "adapter": adapter,
        "engine": engine,
        "per_kind": per_kind,
        "seed": seed,
        "samples": samples,
        "mixed_source_rows": len(kept),
        "counts": dict(counts),
        "pairs_by_kind": dict(Counter(p["kind"] for p in pairs)),
    }
    write_pairs(out, pairs, kept, eval_rows, manifest, replies=list(cache.values()))
    cache_path.unlink(missing_ok=True)
    return manifest
