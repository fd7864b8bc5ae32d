"""Train the cross-attention blocks of `rag_persona.xattn.model` on the SFT data, the context moved into memory.

Each SFT row from `rag-persona build-data` carries a prompt whose system message ends with the context
block. Here the prompt is rebuilt by the one prompt builder with ``include_context=False`` (checked to be
the row's prompt minus exactly that block) and the facts of ``context_ids`` become the memory. Labels are
token-level: the completion's ids plus ``eos_token_id`` as a token, the prompt masked (-100), and the last
label of every example is checked to be EOS. The base model stays frozen; only the blocks train.

Loss is computed on the completion positions only (the LM head never sees the prompt positions), which
saves a quarter of the compute of a 0.5B model on CPU. Runs stop at ``max_steps`` or ``max_minutes``,
whichever comes first, and always save.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rag_persona.errors import RagPersonaError
from rag_persona.knowledge.facts import read_jsonl
from rag_persona.prompts import ContextFact, Persona, build_messages, context_block, system_prompt
from training.fact_answers import say_fact, self_names

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
DEFAULT_RECIPE = RECIPES_DIR / "xattn_cpu.json"


@dataclass
class XattnTrainConfig:
    """A training run; every field is recorded inside the saved weights."""

    data: Path | None = None
    out: Path | None = None
    model: str | None = None
    persona: str | None = None
    index: Path | None = None
    train_file: str = "sft_d1_train.jsonl"
    eval_file: str = "sft_d1_eval.jsonl"
    layers: list[int] = field(default_factory=list)
    rank: int = 16
    alpha: float = 32.0
    memory: str = "hidden"
    # Rows whose golden fact the retriever missed (not RAFT's deliberate drop_golden rows) get it added to
    # memory: otherwise their answers teach stating facts that were never given.
    add_missed_golden: bool = False
    # Rows whose golden facts are in memory appear this many times per epoch: they are the rows whose
    # answers can only be predicted by reading the memory (the rest mostly teach style, which the gates
    # learn in a few steps anyway).
    fact_focus: int = 1
    # Auxiliary rows per epoch that teach reading the memory outright: a fact's own question, that fact
    # among `copy_distractors` others in memory, and the fact said back verbatim in the persona's
    # register (`fact_answers.say_fact`). The SFT answers paraphrase their facts, so they reward the topic more than
    # the names and numbers; these rows reward copying them.
    copy_rows: int = 0
    copy_distractors: int = 2
    # Continue from saved cross-attention weights (same layers, rank and memory kind).
    init_weights: str | None = None
    lr: float = 1e-3
    gate_lr: float = 1e-2
    weight_decay: float = 0.0
    warmup_steps: int = 10
    batch_size: int = 4
    grad_accum: int = 1
    max_steps: int = 150
    max_minutes: float = 30.0
    max_seq_tokens: int = 512
    eval_every: int = 50
    keep_best: bool = False  # keep the evaluated checkpoint with the lowest held-out loss
    max_eval: int = 24
    seed: int = 0
    threads: int | None = None
    log_every: int = 5

    @classmethod
    def from_recipe(cls, path: str | Path | None = None, **overrides) -> XattnTrainConfig:
        path = Path(path) if path else DEFAULT_RECIPE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RagPersonaError(f"{path}: recipe not found") from None
        except json.JSONDecodeError as exc:
            raise RagPersonaError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        known = set(cls.__dataclass_fields__)
        unknown = [k for k in data if k not in known and not k.startswith("_")]
        if unknown:
            raise RagPersonaError(f"{path}: field '{unknown[0]}': not a training setting")
        data = {k: v for k, v in data.items() if k in known}
        data.update({k: v for k, v in overrides.items() if v is not None})
        for key in ("data", "out", "index"):
            if data.get(key) is not None:
                data[key] = Path(data[key])
        return cls(**data)


@dataclass
class XattnExample:
    id: str
    messages: list[dict]
    completion: str
    fact_ids: list[str]
    golden_ids: list[str]
    raft: str = "none"
    added_golden: list[str] = field(default_factory=list)


def strip_context(row: dict, persona: Persona, facts: dict[str, str], where: str) -> XattnExample:
    """An SFT row → the same prompt without its context block (via the prompt builder) + its fact ids."""
    prompt = row.get("prompt")
    if not isinstance(prompt, list) or len(prompt) < 2 or prompt[0].get("role") != "system":
        raise RagPersonaError(
            f"{where}: field 'prompt': expected chat messages starting with a system message"
        )
    if prompt[-1].get("role") != "user":
        raise RagPersonaError(f"{where}: field 'prompt': the last message must be the user's")
    ids = row.get("context_ids")
    if not isinstance(ids, list):
        raise RagPersonaError(f"{where}: field 'context_ids': missing")
    unknown = [i for i in ids if i not in facts]
    if unknown:
        raise RagPersonaError(
            f"{where}: field 'context_ids': unknown fact id {unknown[0]!r} (rebuild the data)"
        )
    scores = row.get("context_scores") or [1.0] * len(ids)
    context = [ContextFact(i, facts[i], float(s)) for i, s in zip(ids, scores, strict=True)]
    block = context_block(persona, context)
    expected = system_prompt(persona) + (f"\n\n{block}" if block else "")
    if prompt[0].get("content") != expected:
        raise RagPersonaError(
            f"{where}: field 'prompt': the system message is not the prompt builder's for these facts "
            "(template or knowledge changed since build-data; rebuild the data)"
        )
    messages = build_messages(persona, context, prompt[1:-1], prompt[-1]["content"], include_context=False)
    if messages[1:] != prompt[1:]:
        raise RagPersonaError(
            f"{where}: field 'prompt': history differs from the prompt builder's; rebuild the data"
        )
    completion = row.get("completion")
    if isinstance(completion, list):
        completion = "".join(m.get("content", "") for m in completion if m.get("role") == "assistant")
    if not isinstance(completion, str) or not completion.strip():
        raise RagPersonaError(f"{where}: field 'completion': missing or empty")
    golden = [g for g in row.get("golden_ids", []) if g in facts]
    raft = str(row.get("raft", "none"))
    return XattnExample(str(row.get("id", where)), messages, completion, list(ids), golden, raft)


def load_examples(
    path: Path, persona: Persona, facts: dict[str, str], add_missed_golden: bool = False
) -> list[XattnExample]:
    out = []
    missing = f"no such file (run: rag-persona build-data --out {path.parent})"
    for lineno, row in read_jsonl(path, missing=missing):
        ex = strip_context(row, persona, facts, f"{path}:{lineno}")
        if add_missed_golden and ex.raft != "drop_golden":
            ex.added_golden = [g for g in ex.golden_ids if g not in ex.fact_ids]
            ex.fact_ids = ex.fact_ids + ex.added_golden
        out.append(ex)
    if not out:
        raise RagPersonaError(f"{path}: no rows")
    return out


def other_facts(examples: Sequence[XattnExample], k: int) -> list[str]:
    """The facts of the next example whose facts share nothing with example k's (golden ones included)."""
    own = set(examples[k].golden_ids) | set(examples[k].fact_ids)
    for step in range(1, len(examples)):
        cand = examples[(k + step) % len(examples)].fact_ids
        if cand and not set(cand) & own:
            return list(cand)
    return []


def copy_examples(
    kb_facts: Sequence, persona: Persona, count: int, distractors: int, rng: random.Random
) -> list[XattnExample]:
    """`count` copy rows cycling over the facts that have questions (see XattnTrainConfig.copy_rows)."""
    askable = [f for f in kb_facts if f.questions]
    ids = [f.id for f in kb_facts]
    names = self_names(persona.name)
    out = []
    for n in range(count if askable else 0):
        fact = askable[n % len(askable)]
        question = rng.choice(fact.questions)
        memory = [fact.id] + rng.sample([i for i in ids if i != fact.id], min(distractors, len(ids) - 1))
        rng.shuffle(memory)
        messages = build_messages(persona, [], [], question, include_context=False)
        answer = say_fact(fact.text, "ojousama", names)
        out.append(XattnExample(f"copy-{n}-{fact.id}", messages, answer, memory, [fact.id], "copy"))
    return out


def encode_example(
    tokenizer, messages: list[dict], completion: str, eos_id: int, where: str = "row"
) -> tuple[list[int], list[int]]:
    """(input ids, labels): the prompt masked, the completion's ids, then eos_token_id as a token.

    Uses the project's label builder (training.labels: EOS appended as an id, never as text, special-token
    text in a completion refused); the last label of every example is checked to be that EOS id.
    """
    try:
        from training.labels import build_sft_example
    except ImportError:  # the same rule, locally, if the shared builder is unavailable
        prompt = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        answer = tokenizer(completion, add_special_tokens=False)["input_ids"] + [eos_id]
        ids, labels = list(prompt["input_ids"]) + answer, [-100] * len(prompt["input_ids"]) + answer
    else:
        ex = build_sft_example(tokenizer, messages, completion, eos_id, where=where)
        ids, labels = list(ex.input_ids), list(ex.labels)
    if not labels or labels[-1] != eos_id:
        raise RagPersonaError(
            f"{where}: labels: the last label is {labels[-1] if labels else None}, not EOS ({eos_id})"
        )
    return ids, labels


def completion_loss(xmodel, input_ids, labels, memory, prefix=None):
    """Mean cross-entropy over the labelled positions, and their count.

    Rows are right-padded (labels -100 there): causal attention keeps the real tokens exact.

    With a prefix cache (the system turn, which the memory never reaches) only the rest of the sequence
    runs through the model; the LM head runs on the labelled positions only.
    """
    import torch
    import torch.nn.functional as F

    base = xmodel.core
    start, kwargs = 0, {"use_cache": False}
    batch = input_ids.shape[0]
    if (
        prefix is not None
        and all(prefix.matches(input_ids[i : i + 1]) for i in range(batch))
        and bool((labels[:, : len(prefix) + 1] == -100).all())
    ):
        start = len(prefix)
        positions = torch.arange(start, input_ids.shape[1], device=input_ids.device)[None].expand(batch, -1)
        kwargs = {"use_cache": True, "past_key_values": prefix.copy(batch), "position_ids": positions}
    with xmodel.using(memory):
        hidden = base.model(input_ids=input_ids[:, start:], **kwargs).last_hidden_state
    shift = labels[:, start + 1 :]
    keep = shift != -100
    logits = base.lm_head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), shift[keep], reduction="mean"), int(keep.sum())


def _lr_factor(step: int, total: int, warmup: int, time_share: float = 0.0) -> float:
    """Linear warmup, then cosine to 10% over whichever budget (steps or minutes) is used up first.

    On a shared CPU the step rate varies; following the time budget too means the schedule still ends
    by max_minutes instead of being cut off at full learning rate.
    """
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = max((step - warmup) / max(1, total - warmup), time_share)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_xattn(config: XattnTrainConfig, log: Callable[[str], None] = print) -> dict:
    """Run the recipe; return a summary (also stored in the weights file's config)."""
    import torch

    from rag_persona.knowledge.facts import load_knowledge
    from rag_persona.generation import load_causal_lm
    from rag_persona.settings import get_settings
    from rag_persona.retrieval.store import default_index_dir, is_index
    from rag_persona.xattn import PrefixCache, XattnConfig, XattnModel, system_prefix_ids
    from rag_persona.xattn import load_or_build_encodings

    if config.data is None or config.out is None:
        raise RagPersonaError("train xattn: --data (a build-data folder) and --out are required")
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    settings = get_settings()
    persona_dir = settings.persona_dir(config.persona)
    persona = Persona.load(persona_dir)
    kb = load_knowledge(persona_dir)
    facts = {f.id: f.text for f in kb.facts}
    data = Path(config.data)
    train = load_examples(data / config.train_file, persona, facts, config.add_missed_golden)
    if config.copy_rows:
        copies = copy_examples(
            kb.facts, persona, config.copy_rows, config.copy_distractors, random.Random(config.seed)
        )
        log(
            f"copy task: {len(copies)} rows (a fact's own question, the fact said back), e.g. {copies[0].completion!r}"
        )
        train += copies
    evals = (
        load_examples(data / config.eval_file, persona, facts) if (data / config.eval_file).is_file() else []
    )
    # Held-out loss where memory can help: the golden facts are among the retrieved ones.
    evals = [e for e in evals if e.golden_ids and set(e.golden_ids) <= set(e.fact_ids)][: config.max_eval]

    loaded = load_causal_lm(config.model, progress=log)
    tok = loaded.tokenizer
    eos_id = _eos_id(tok, loaded.model)
    wanted = XattnConfig(
        layers=list(config.layers), rank=config.rank, alpha=config.alpha, memory=config.memory
    )
    if config.init_weights:
        xmodel = XattnModel.load(
            loaded.model, config.init_weights, base_name=config.model or settings.chat_model
        )
        got = (xmodel.config.layers, xmodel.config.rank, xmodel.config.alpha, xmodel.config.memory)
        if got != (wanted.layers, wanted.rank, wanted.alpha, wanted.memory):
            raise RagPersonaError(
                f"{config.init_weights}: weights have layers/rank/alpha/memory {got}, the recipe asks for "
                f"{(wanted.layers, wanted.rank, wanted.alpha, wanted.memory)}"
            )
        log(f"continuing from {config.init_weights} (gates {xmodel.gates()})")
    else:
        xmodel = XattnModel(loaded.model, wanted, base_name=config.model or settings.chat_model)
    index_dir = config.index or (
        default_index_dir(config.persona) if is_index(default_index_dir(config.persona)) else None
    )
    encs = load_or_build_encodings(xmodel, tok, kb.facts, index_dir, knowledge_hash=kb.hash, progress=log)
    if config.add_missed_golden:
        added = sum(1 for e in train if e.added_golden)
        log(f"golden facts added to memory where retrieval missed them: {added} rows")
    log(
        f"xattn: layers {xmodel.config.layers}, {sum(p.numel() for p in xmodel.parameters()):,} trainable parameters, "
        f"{len(train)} train / {len(evals)} eval examples, memory {xmodel.config.memory} "
        f"({encs.nbytes / len(facts) / 1024:.1f} KiB per fact, {encs.computed} encoded now)"
    )

    def tokenize(examples: list[XattnExample]) -> list[tuple]:
        rows = []
        for ex in examples:
            ids, labels = encode_example(tok, ex.messages, ex.completion, eos_id, where=ex.id)
            if len(ids) <= config.max_seq_tokens:
                rows.append((ids, labels, ex.fact_ids, ex))
        if len(rows) < len(examples):
            log(f"skipped {len(examples) - len(rows)} examples longer than {config.max_seq_tokens} tokens")
        return rows

    train_rows, eval_rows = tokenize(train), tokenize(evals)
    # Epoch order: indices into train_rows, the fact-carrying rows repeated fact_focus times.
    epoch = list(range(len(train_rows)))
    if config.fact_focus > 1:
        focus = [
            i
            for i, row in enumerate(train_rows)
            if row[3].golden_ids and set(row[3].golden_ids) <= set(row[2])
        ]
        epoch += focus * (config.fact_focus - 1)
        log(
            f"fact focus: {len(focus)} rows with their golden facts in memory seen {config.fact_focus}x per epoch"
        )
    # The system turn is the same in every example and the memory starts after it: compute it once.
    head = system_prefix_ids(tok, train[0].messages)
    with xmodel.using(None):
        prefix = PrefixCache(loaded.model, head) if head else None
    start = len(head)
    cached = sum(1 for r in train_rows if prefix is not None and r[0][:start] == head)
    log(f"system turn: {start} tokens computed once; {cached}/{len(train_rows)} examples reuse it")
    if not train_rows:
        raise RagPersonaError(
            f"{data / config.train_file}: no example fits max_seq_tokens {config.max_seq_tokens}"
        )

    pad = tok.pad_token_id if tok.pad_token_id is not None else eos_id

    def prepare(rows: list[tuple]):
        """Right-padded ids and labels plus the packed memory for a batch of examples."""
        width = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (x, y, *_) in enumerate(rows):
            ids[i, : len(x)] = torch.tensor(x)
            labels[i, : len(y)] = torch.tensor(y)
        memory = xmodel.memory_for(
            [[encs.by_id[f] for f in r[2]] for r in rows], [r[2] for r in rows], start=start
        )
        return ids, labels, memory

    def evaluate(use_memory: bool = True, swapped: bool = False) -> float:
        """Held-out completion loss; swapped=True gives each example another example's facts instead
        (`other_facts`), so the gap to the real loss is what the memory's content is worth."""
        if not eval_rows:
            return float("nan")
        rows = eval_rows
        if swapped:
            examples = [r[3] for r in eval_rows]
            rows = [(x, y, other_facts(examples, i)) for i, (x, y, *_) in enumerate(eval_rows)]
        total, count = 0.0, 0
        with torch.no_grad():
            for at in range(0, len(rows), config.batch_size):
                ids, labels, memory = prepare(rows[at : at + config.batch_size])
                loss, n = completion_loss(xmodel, ids, labels, memory if use_memory else None, prefix)
                total += float(loss) * n
                count += n
        return total / max(1, count)

    gates = [p for n, p in xmodel.named_parameters() if n.endswith(".gate")]
    rest = [p for n, p in xmodel.named_parameters() if not n.endswith(".gate")]
    opt = torch.optim.AdamW(
        [{"params": rest, "lr": config.lr}, {"params": gates, "lr": config.gate_lr}],
        weight_decay=config.weight_decay,
    )
    base_lrs = [g["lr"] for g in opt.param_groups]
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.jsonl"
    log_file = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in finally

    def record(obj: dict) -> None:
        log_file.write(json.dumps(obj, ensure_ascii=False) + "\n")
        log_file.flush()

    started, cpu_started = time.perf_counter(), time.process_time()
    eval_base = evaluate(use_memory=False)
    record({"step": 0, "eval_loss": eval_base, "eval_loss_no_memory": eval_base})
    log(f"step 0: held-out completion loss {eval_base:.4f} without memory (= the base model)")
    if config.init_weights:
        own, other = evaluate(), evaluate(swapped=True)
        record({"step": 0, "eval_loss": own, "eval_loss_swapped_memory": other})
        log(f"step 0: initial weights: held-out loss {own:.4f}, with another example's facts {other:.4f}")
    order: list[int] = []
    rng = random.Random(config.seed)
    step, seen, running, history = 0, 0, [], []
    best: tuple = (float("inf"), 0, None)
    xmodel.train()
    stopped = "max_steps"
    try:
        while step < config.max_steps:
            if (time.perf_counter() - started) / 60 > config.max_minutes:
                stopped = "max_minutes"
                break
            for g, lr in zip(opt.param_groups, base_lrs, strict=True):
                share = (time.perf_counter() - started) / 60 / config.max_minutes
                g["lr"] = lr * _lr_factor(step, config.max_steps, config.warmup_steps, share)
            opt.zero_grad(set_to_none=True)
            step_loss = 0.0
            for _ in range(config.grad_accum):
                picked = []
                for _ in range(config.batch_size):
                    if not order:
                        order = list(epoch)
                        rng.shuffle(order)
                    picked.append(train_rows[order.pop()])
                ids, labels, memory = prepare(picked)
                loss, _ = completion_loss(xmodel, ids, labels, memory, prefix)
                if loss.requires_grad:  # an example without facts has no path into the blocks
                    (loss / config.grad_accum).backward()
                step_loss += loss.item() / config.grad_accum
                seen += len(picked)
            torch.nn.utils.clip_grad_norm_(xmodel.parameters(), 1.0)
            opt.step()
            step += 1
            running.append(step_loss)
            if step % config.log_every == 0 or step == config.max_steps:
                mins = (time.perf_counter() - started) / 60
                avg = sum(running) / len(running)
                running = []
                gate_vals = xmodel.gates()
                record({"step": step, "loss": avg, "minutes": round(mins, 2), "gates": gate_vals})
                log(
                    f"step {step}/{config.max_steps}: loss {avg:.4f}, {mins:.1f} min, "
                    f"gates {' '.join(f'{v:+.3f}' for v in gate_vals.values())}"
                )
            if config.eval_every and step % config.eval_every == 0 and step < config.max_steps:
                xmodel.eval()
                ev = evaluate()
                xmodel.train()
                history.append({"step": step, "eval_loss": ev})
                record({"step": step, "eval_loss": ev})
                log(f"step {step}: held-out completion loss {ev:.4f}")
                if config.keep_best and ev < best[0]:
                    best = (ev, step, {k: v.detach().clone() for k, v in xmodel.state_dict().items()})
                xmodel.save(out, extra={"partial": True, "step": step})
    finally:
        xmodel.eval()
        final = evaluate()
        chosen = step
        if config.keep_best and best[2] is not None and best[0] < final:
            xmodel.load_state_dict(best[2])  # the held-out loss rose after this checkpoint
            final, chosen = best[0], best[1]
            log(f"keeping the step-{chosen} weights (held-out loss {final:.4f})")
        swapped_loss = evaluate(swapped=True)
        log(
            f"held-out loss with another example's facts in memory: {swapped_loss:.4f} (own facts {final:.4f})"
        )
        minutes = (time.perf_counter() - started) / 60
        summary = {
            "steps": step,
            "weights_from_step": chosen,
            "init_weights": str(config.init_weights) if config.init_weights else None,
            "examples_seen": seen,
            "stopped_by": stopped,
            "minutes": round(minutes, 2),
            # CPU time over threads: the wall time this run would take with its cores to itself.
            "cpu_minutes_per_thread": round(
                (time.process_time() - cpu_started) / 60 / torch.get_num_threads(), 2
            ),
            "threads": torch.get_num_threads(),
            "eval_loss_no_memory": eval_base,
            "eval_loss": final,
            "eval_loss_swapped_memory": swapped_loss,
            "eval_examples": len(eval_rows),
            "train_examples": len(train_rows),
            "eval_history": history,
            "data": str(data),
            "data_manifest_sha": _sha(data / "manifest.json"),
            "recipe": json.loads(json.dumps(asdict(config), default=str)),
        }
        record({"step": step, "eval_loss": final, "summary": True})
        log_file.close()
        xmodel.config.trained = {}  # drop the partial-checkpoint keys
        path = xmodel.save(out, extra=summary)
        log(f"saved {path} ({path.stat().st_size / 1e6:.1f} MB): held-out loss {eval_base:.4f} → {final:.4f}")
    return summary


def _eos_id(tokenizer, model) -> int:
    from rag_persona.utils.tokens import eos_token_ids

    try:
        from training.labels import resolve_eos_id
    except ImportError:
        return int(tokenizer.eos_token_id)
    return resolve_eos_id(tokenizer, eos_token_ids(model, tokenizer))


def _sha(path: Path) -> str | None:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def resolve_recipe(recipe: str | Path | None) -> Path:
    """A recipe file, or the name of one in training/recipes/ (xattn_cpu, xattn_pilot_hidden, ...)."""
    if recipe is None:
        return DEFAULT_RECIPE
    path = Path(recipe)
    if path.is_file():
        return path
    named = RECIPES_DIR / f"{Path(str(recipe)).stem}.json"
    if named.is_file():
        return named
    known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("xattn_*.json")))
    raise RagPersonaError(f"recipe {recipe}: no such file or bundled xattn recipe ({known})")


def run_from_cli(
    recipe: str | Path | None,
    *,
    out: Path | None = None,
    data_dir: Path | None = None,
    model: str | None = None,
    max_steps: int | None = None,
    seed: int | None = None,
    threads: int | None = None,
    progress: Callable[[str], None] = print,
) -> dict:
    """`rag-persona train xattn --recipe xattn_cpu [--data-dir runs/data] [--out runs/xattn_cpu]`."""
    from rag_persona.settings import REPO_ROOT

    path = resolve_recipe(recipe)
    data = data_dir or REPO_ROOT / "runs" / "data"
    if not (Path(data) / "manifest.json").is_file():
        raise RagPersonaError(f"{data}: no build-data output here (run: rag-persona build-data --out {data})")
    cfg = XattnTrainConfig.from_recipe(
        path,
        data=data,
        out=out or REPO_ROOT / "runs" / path.stem,
        model=model,
        max_steps=max_steps,
        seed=seed,
    )
    if threads:
        cfg.threads = threads
    return train_xattn(cfg, log=progress)


def main() -> None:  # pragma: no cover - `python -m training.xattn_train RECIPE` for nohup runs
    import sys

    cfg = XattnTrainConfig.from_recipe(sys.argv[1] if len(sys.argv) > 1 else None)
    if len(sys.argv) > 2:
        cfg.data = Path(sys.argv[2])
    if len(sys.argv) > 3:
        cfg.out = Path(sys.argv[3])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    train_xattn(cfg, log=lambda m: print(m, flush=True))


if __name__ == "__main__":  # pragma: no cover
    main()
