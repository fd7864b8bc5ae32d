"""Train the cross-attention blocks of `rag_persona.xattn` on the SFT data, the context moved into memory.

Each SFT row from `rag-persona build-data` carries a prompt whose system message ends with the context
block. Here the prompt is rebuilt by the one prompt builder with ``include_context=False`` (checked to be
the row's prompt minus exactly that block) and the facts of ``context_ids`` become the memory. Labels are
token-level: the completion's ids plus ``eos_token_id`` as a token, the prompt masked (-100), and the last
label of every example is checked to be EOS. The base model stays frozen; only the blocks train.

Loss is computed on the completion positions only (the LM head never sees the prompt positions), which
saves a quarter of the compute of a 0.5B model on CPU. Runs stop at ``max_steps`` or ``xattn.max_minutes``,
whichever comes first, and always save: the output folder receives `train_log.jsonl` as the run goes and
the weights at every evaluation, so a killed run keeps its last checkpoint.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rag_persona.errors import RagPersonaError
from rag_persona.prompts import ContextFact, Persona, build_messages, context_block, system_prompt
from rag_persona.utils.io import read_jsonl
from training.data.fact_answers import say_fact, self_names
from training.data.labels import build_sft_example
from training.provenance import file_sha256
from training.recipes import Recipe

from .common import Progress, RunOptions, eos_ids, seed_and_threads


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
    """`count` copy rows cycling over the facts that have questions (recipe field xattn.copy_rows)."""
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

    Uses the project's label builder (training.data.labels: EOS appended as an id, never as text,
    special-token text in a completion refused); the last label of every example is checked to be that EOS id.
    """
    ex = build_sft_example(tokenizer, messages, completion, eos_id, where=where)
    ids, labels = list(ex.input_ids), list(ex.labels)
    if not labels or labels[-1] != eos_id:
        raise RagPersonaError(
            f"{where}: labels: the last label is {labels[-1] if labels else None}, not EOS ({eos_id})"
        )
    return ids, labels


def label_eos_id(tokenizer, model) -> int:
    """The EOS id appended to the labels (training.data.labels.resolve_eos_id over the model's stop ids)."""
    return eos_ids(model, tokenizer)[0]


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


def lr_factor(step: int, total: int, warmup: int, time_share: float = 0.0) -> float:
    """Linear warmup, then cosine to 10% over whichever budget (steps or minutes) is used up first.

    On a shared CPU the step rate varies; following the time budget too means the schedule still ends
    by max_minutes instead of being cut off at full learning rate.
    """
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = max((step - warmup) / max(1, total - warmup), time_share)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# -- the run ----------------------------------------------------------------------------------------------


def xattn_examples(recipe: Recipe, progress: Progress):
    """(knowledge base, training examples with the copy rows, held-out examples whose golden facts are in
    memory): the held-out loss is measured where the memory can help."""
    from rag_persona.knowledge.facts import load_knowledge
    from rag_persona.settings import get_settings

    x = recipe.xattn
    persona_dir = get_settings().persona_dir(recipe.persona)
    persona = Persona.load(persona_dir)
    kb = load_knowledge(persona_dir)
    facts = {f.id: f.text for f in kb.facts}
    data = Path(recipe.data_dir)
    train = load_examples(data / recipe.train_file, persona, facts, x.add_missed_golden)
    if x.copy_rows:
        copies = copy_examples(kb.facts, persona, x.copy_rows, x.copy_distractors, random.Random(recipe.seed))
        progress(
            f"copy task: {len(copies)} rows (a fact's own question, the fact said back), e.g. {copies[0].completion!r}"
        )
        train += copies
    eval_path = data / recipe.eval_file if recipe.eval_file else None
    evals = load_examples(eval_path, persona, facts) if eval_path and eval_path.is_file() else []
    evals = [e for e in evals if e.golden_ids and set(e.golden_ids) <= set(e.fact_ids)]
    return kb, train, evals[: recipe.max_eval_examples]


def xattn_model(recipe: Recipe, base, progress: Progress):
    """Fresh cross-attention blocks on the base, or the recipe's init_adapter weights (same shape) continued."""
    from rag_persona.settings import get_settings
    from rag_persona.xattn import XattnConfig, XattnModel

    x = recipe.xattn
    base_name = recipe.base_model or get_settings().chat_model
    wanted = XattnConfig(layers=list(x.layers), rank=x.rank, alpha=x.alpha, memory=x.memory)
    if not recipe.init_adapter:
        return XattnModel(base, wanted, base_name=base_name)
    xmodel = XattnModel.load(base, recipe.init_adapter, base_name=base_name)
    got = (xmodel.config.layers, xmodel.config.rank, xmodel.config.alpha, xmodel.config.memory)
    if got != (wanted.layers, wanted.rank, wanted.alpha, wanted.memory):
        raise RagPersonaError(
            f"{recipe.init_adapter}: weights have layers/rank/alpha/memory {got}, the recipe asks for "
            f"{(wanted.layers, wanted.rank, wanted.alpha, wanted.memory)}"
        )
    progress(f"continuing from {recipe.init_adapter} (gates {xmodel.gates()})")
    return xmodel


class XattnTrainer:
    """Tokenised rows, batches with their packed memory, held-out losses and the optimisation loop."""

    def __init__(self, recipe: Recipe, loaded, xmodel, encodings, progress: Progress):
        self.recipe, self.xmodel, self.encs, self.progress = recipe, xmodel, encodings, progress
        self.base, self.tokenizer = loaded.model, loaded.tokenizer
        self.eos_id = label_eos_id(loaded.tokenizer, loaded.model)
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        self.log_file = None

    def tokenize(self, examples: list[XattnExample]) -> list[tuple]:
        """(input ids, labels, memory fact ids, example) of the examples that fit max_length."""
        rows = []
        for ex in examples:
            ids, labels = encode_example(self.tokenizer, ex.messages, ex.completion, self.eos_id, where=ex.id)
            if len(ids) <= self.recipe.max_length:
                rows.append((ids, labels, ex.fact_ids, ex))
        if len(rows) < len(examples):
            self.progress(
                f"skipped {len(examples) - len(rows)} examples longer than {self.recipe.max_length} tokens"
            )
        return rows

    def prepare(self, train: list[XattnExample], evals: list[XattnExample]) -> None:
        """Tokenise both splits, order an epoch (fact-carrying rows fact_focus times), cache the system turn."""
        from rag_persona.xattn import PrefixCache, system_prefix_ids

        focus_times = self.recipe.xattn.fact_focus
        self.train_rows, self.eval_rows = self.tokenize(train), self.tokenize(evals)
        self.epoch = list(range(len(self.train_rows)))
        if focus_times > 1:
            focus = [
                i
                for i, row in enumerate(self.train_rows)
                if row[3].golden_ids and set(row[3].golden_ids) <= set(row[2])
            ]
            self.epoch += focus * (focus_times - 1)
            self.progress(
                f"fact focus: {len(focus)} rows with their golden facts in memory seen {focus_times}x per epoch"
            )
        # The system turn is the same in every example and the memory starts after it: compute it once.
        head = system_prefix_ids(self.tokenizer, train[0].messages)
        with self.xmodel.using(None):
            self.prefix = PrefixCache(self.base, head) if head else None
        self.start = len(head)
        cached = sum(1 for r in self.train_rows if self.prefix is not None and r[0][: self.start] == head)
        self.progress(
            f"system turn: {self.start} tokens computed once; {cached}/{len(self.train_rows)} examples reuse it"
        )
        if not self.train_rows:
            raise RagPersonaError(
                f"{Path(self.recipe.data_dir) / self.recipe.train_file}: no example fits max_length "
                f"{self.recipe.max_length}"
            )

    def batch(self, rows: list[tuple]):
        """Right-padded ids and labels plus the packed memory for a batch of examples."""
        import torch

        width = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (x, y, *_) in enumerate(rows):
            ids[i, : len(x)] = torch.tensor(x)
            labels[i, : len(y)] = torch.tensor(y)
        memory = self.xmodel.memory_for(
            [[self.encs.by_id[f] for f in r[2]] for r in rows], [r[2] for r in rows], start=self.start
        )
        return ids, labels, memory

    def evaluate(self, use_memory: bool = True, swapped: bool = False) -> float:
        """Held-out completion loss; swapped=True gives each example another example's facts instead
        (`other_facts`), so the gap to the real loss is what the memory's content is worth."""
        import torch

        if not self.eval_rows:
            return float("nan")
        rows = self.eval_rows
        if swapped:
            examples = [r[3] for r in rows]
            rows = [(x, y, other_facts(examples, i)) for i, (x, y, *_) in enumerate(rows)]
        total, count = 0.0, 0
        size = self.recipe.per_device_train_batch_size
        with torch.no_grad():
            for at in range(0, len(rows), size):
                ids, labels, memory = self.batch(rows[at : at + size])
                loss, n = completion_loss(
                    self.xmodel, ids, labels, memory if use_memory else None, self.prefix
                )
                total += float(loss) * n
                count += n
        return total / max(1, count)

    def record(self, obj: dict) -> None:
        self.log_file.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.log_file.flush()

    def optimizer(self):
        """AdamW with the gates at their own (higher) learning rate."""
        import torch

        named = list(self.xmodel.named_parameters())
        gates = [p for n, p in named if n.endswith(".gate")]
        rest = [p for n, p in named if not n.endswith(".gate")]
        return torch.optim.AdamW(
            [
                {"params": rest, "lr": self.recipe.learning_rate},
                {"params": gates, "lr": self.recipe.xattn.gate_lr},
            ],
            weight_decay=self.recipe.weight_decay,
        )

    def step(self, opt, order: list[int], rng: random.Random) -> tuple[float, int]:
        """One optimiser step over gradient_accumulation_steps batches; (mean loss, examples seen)."""
        import torch

        r = self.recipe
        accum = r.gradient_accumulation_steps
        opt.zero_grad(set_to_none=True)
        step_loss, seen = 0.0, 0
        for _ in range(accum):
            picked = []
            for _ in range(r.per_device_train_batch_size):
                if not order:
                    order.extend(self.epoch)
                    rng.shuffle(order)
                picked.append(self.train_rows[order.pop()])
            ids, labels, memory = self.batch(picked)
            loss, _ = completion_loss(self.xmodel, ids, labels, memory, self.prefix)
            if loss.requires_grad:  # an example without facts has no path into the blocks
                (loss / accum).backward()
            step_loss += loss.item() / accum
            seen += len(picked)
        torch.nn.utils.clip_grad_norm_(self.xmodel.parameters(), 1.0)
        opt.step()
        return step_loss, seen

    def run(self, out: Path) -> dict:
        """Train until max_steps or max_minutes, evaluating every eval_steps; always save. The summary."""
        r, x = self.recipe, self.recipe.xattn
        opt = self.optimizer()
        base_lrs = [g["lr"] for g in opt.param_groups]
        out.mkdir(parents=True, exist_ok=True)
        self.log_file = open(out / "train_log.jsonl", "w", encoding="utf-8")  # noqa: SIM115 - closed in finish
        started, cpu_started = time.perf_counter(), time.process_time()
        eval_base = self.evaluate(use_memory=False)
        self.record({"step": 0, "eval_loss": eval_base, "eval_loss_no_memory": eval_base})
        self.progress(f"step 0: held-out completion loss {eval_base:.4f} without memory (= the base model)")
        if r.init_adapter:
            own, other = self.evaluate(), self.evaluate(swapped=True)
            self.record({"step": 0, "eval_loss": own, "eval_loss_swapped_memory": other})
            self.progress(
                f"step 0: initial weights: held-out loss {own:.4f}, with another example's facts {other:.4f}"
            )
        order: list[int] = []
        rng = random.Random(r.seed)
        state = {"step": 0, "seen": 0, "stopped": "max_steps", "history": [], "best": (float("inf"), 0, None)}
        running: list[float] = []
        self.xmodel.train()
        try:
            while state["step"] < r.max_steps:
                minutes = (time.perf_counter() - started) / 60
                if minutes > x.max_minutes:
                    state["stopped"] = "max_minutes"
                    break
                for g, lr in zip(opt.param_groups, base_lrs, strict=True):
                    share = (time.perf_counter() - started) / 60 / x.max_minutes
                    g["lr"] = lr * lr_factor(state["step"], r.max_steps, int(r.warmup_steps), share)
                loss, seen = self.step(opt, order, rng)
                state["step"] += 1
                state["seen"] += seen
                running.append(loss)
                self.after_step(state, running, started, out)
        finally:
            summary = self.finish(state, out, eval_base, started, cpu_started)
        return summary

    def after_step(self, state: dict, running: list[float], started: float, out: Path) -> None:
        """Log the running loss every logging_steps; evaluate (and checkpoint) every xattn.eval_steps."""
        r, x, step = self.recipe, self.recipe.xattn, state["step"]
        if step % r.logging_steps == 0 or step == r.max_steps:
            mins = (time.perf_counter() - started) / 60
            avg = sum(running) / len(running)
            running.clear()
            gate_vals = self.xmodel.gates()
            self.record({"step": step, "loss": avg, "minutes": round(mins, 2), "gates": gate_vals})
            self.progress(
                f"step {step}/{r.max_steps}: loss {avg:.4f}, {mins:.1f} min, "
                f"gates {' '.join(f'{v:+.3f}' for v in gate_vals.values())}"
            )
        if x.eval_steps and step % x.eval_steps == 0 and step < r.max_steps:
            self.xmodel.eval()
            ev = self.evaluate()
            self.xmodel.train()
            state["history"].append({"step": step, "eval_loss": ev})
            self.record({"step": step, "eval_loss": ev})
            self.progress(f"step {step}: held-out completion loss {ev:.4f}")
            if x.keep_best and ev < state["best"][0]:
                state["best"] = (
                    ev,
                    step,
                    {k: v.detach().clone() for k, v in self.xmodel.state_dict().items()},
                )
            self.xmodel.save(out, extra={"partial": True, "step": step})

    def finish(self, state: dict, out: Path, eval_base: float, started: float, cpu_started: float) -> dict:
        """Final held-out losses (the best checkpoint restored if it was better), the summary, the weights."""
        import torch

        r = self.recipe
        self.xmodel.eval()
        final = self.evaluate()
        chosen = state["step"]
        best_loss, best_step, best_weights = state["best"]
        if r.xattn.keep_best and best_weights is not None and best_loss < final:
            self.xmodel.load_state_dict(best_weights)  # the held-out loss rose after this checkpoint
            final, chosen = best_loss, best_step
            self.progress(f"keeping the step-{chosen} weights (held-out loss {final:.4f})")
        swapped_loss = self.evaluate(swapped=True)
        self.progress(
            f"held-out loss with another example's facts in memory: {swapped_loss:.4f} (own facts {final:.4f})"
        )
        data = Path(r.data_dir)
        manifest = data / "manifest.json"
        summary = {
            "steps": state["step"],
            "weights_from_step": chosen,
            "init_weights": str(r.init_adapter) if r.init_adapter else None,
            "examples_seen": state["seen"],
            "stopped_by": state["stopped"],
            "minutes": round((time.perf_counter() - started) / 60, 2),
            # CPU time over threads: the wall time this run would take with its cores to itself.
            "cpu_minutes_per_thread": round(
                (time.process_time() - cpu_started) / 60 / torch.get_num_threads(), 2
            ),
            "threads": torch.get_num_threads(),
            "eval_loss_no_memory": eval_base,
            "eval_loss": final,
            "eval_loss_swapped_memory": swapped_loss,
            "eval_examples": len(self.eval_rows),
            "train_examples": len(self.train_rows),
            "eval_history": state["history"],
            "data": str(data),
            "data_manifest_sha": file_sha256(manifest) if manifest.is_file() else None,
            "recipe": json.loads(json.dumps(r.to_dict(), default=str)),
        }
        self.record({"step": state["step"], "eval_loss": final, "summary": True})
        self.log_file.close()
        self.xmodel.config.trained = {}  # drop the partial-checkpoint keys
        path = self.xmodel.save(out, extra=summary)
        self.progress(
            f"saved {path} ({path.stat().st_size / 1e6:.1f} MB): held-out loss {eval_base:.4f} → {final:.4f}"
        )
        return summary


def train_xattn(recipe: Recipe, out: Path, options: RunOptions) -> dict:
    """Run an xattn recipe; return its summary (also stored in the weights file's config).

    The base model goes wherever rag_persona.generation puts it (options.cuda is not consulted).
    """
    from rag_persona.generation import load_causal_lm
    from rag_persona.retrieval.store import default_index_dir, is_index
    from rag_persona.xattn import load_or_build_encodings

    progress = options.progress
    seed_and_threads(recipe, progress)
    kb, train, evals = xattn_examples(recipe, progress)
    loaded = load_causal_lm(recipe.base_model, progress=progress)
    xmodel = xattn_model(recipe, loaded.model, progress)
    index = recipe.xattn.index
    if index is None and is_index(default_index_dir(recipe.persona)):
        index = default_index_dir(recipe.persona)
    encs = load_or_build_encodings(
        xmodel, loaded.tokenizer, kb.facts, index, knowledge_hash=kb.hash, progress=progress
    )
    if recipe.xattn.add_missed_golden:
        progress(
            f"golden facts added to memory where retrieval missed them: {sum(1 for e in train if e.added_golden)} rows"
        )
    progress(
        f"xattn: layers {xmodel.config.layers}, {sum(p.numel() for p in xmodel.parameters()):,} trainable parameters, "
        f"{len(train)} train / {len(evals)} eval examples, memory {xmodel.config.memory} "
        f"({encs.nbytes / len(kb.facts) / 1024:.1f} KiB per fact, {encs.computed} encoded now)"
    )
    trainer = XattnTrainer(recipe, loaded, xmodel, encs, progress)
    trainer.prepare(train, evals)
    summary = trainer.run(out)
    return summary | {"output": str(out)} | ({"model": xmodel} if options.keep_model else {})
