"""Regenerate SFT and DPO datasets from the knowledge base, retrieving exactly as the chat does."""

from __future__ import annotations

import hashlib
import json
import random
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rag_persona.chat import retrieve_contexts
from rag_persona.errors import RagPersonaError
from rag_persona.knowledge.facts import load_queries
from rag_persona.prompts import PROMPT_TEMPLATE_VERSION, ContextFact, Persona, build_messages
from rag_persona.settings import get_settings
from rag_persona.utils.io import atomic_folder, check_replaceable, jsonl_text, write_json
from training.provenance import file_sha256

from .dialogues import STYLES, Conversation, Turn, load_dialogues

DATA_FORMAT_VERSION = "1"
MANIFEST = "manifest.json"
# What only a build-data output holds (an index folder has a manifest.json too): the overwrite guard's marker.
MARKER = "eval_prompts.jsonl"
VARIANTS = {"d0": ("plain",), "d1": ("ojousama",), "d2": ("plain", "ojousama")}
# DPO files are named for the style that is *chosen*; the other style is rejected.
DPO_VARIANTS = {"d1": ("ojousama", "plain"), "d0": ("plain", "ojousama")}


@dataclass
class DataConfig:
    """How a dataset is built; every field is recorded in the manifest."""

    out: Path
    index: Path | None = None
    persona: str | None = None
    seed: int = 0
    distractor_rate: float = 0.3
    distractors: int = 2
    drop_golden_rate: float = 0.1
    eval_share: float = 0.1
    threshold: float | None = None
    mode: str | None = None
    k: int | None = None
    exclude_queries: list[Path] = field(default_factory=list)
    augment_paraphrases: int = 0
    teacher: str | None = None
    # Train-only turns from the facts' own questions, each answered with its fact said back in the first
    # person (training.data.fact_answers.say_fact): the persona's basic facts (her name above all) are asked
    # far less often in the dialogues than users ask them.
    fact_questions: bool = False
    # Dialogue files in the persona folder, read in this order (ids must be unique across them):
    # "dialogues.jsonl" and, for the persona model v2, "dialogues_v2.jsonl" (identity, multi-turn,
    # unanswerable, small talk).
    dialogues: list[str] = field(default_factory=lambda: ["dialogues.jsonl"])

    def __post_init__(self) -> None:
        for name in ("distractor_rate", "drop_golden_rate", "eval_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise RagPersonaError(f"build-data: {name} must be between 0 and 1, got {value}")
        if self.distractor_rate + self.drop_golden_rate > 1.0:
            raise RagPersonaError("build-data: distractor_rate + drop_golden_rate must not exceed 1")


def normalise(text: str) -> str:
    """Compare user turns and queries ignoring width, case, spaces and punctuation."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in text if not unicodedata.category(ch).startswith(("P", "Z", "S")))


def _rng(seed: int, *parts: object) -> random.Random:
    # One generator per example, so a change to one conversation does not reshuffle the others.
    key = "|".join(str(p) for p in (seed, *parts)).encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))


def raft_context(
    retrieved: list[ContextFact],
    golden: tuple[str, ...],
    all_facts: list[ContextFact],
    config: DataConfig,
    rng: random.Random,
) -> tuple[list[ContextFact], str]:
    """RAFT: keep the retrieved context, add distractors, or remove the golden facts."""
    roll = rng.random()
    if golden and roll < config.drop_golden_rate:
        return [f for f in retrieved if f.id not in golden], "drop_golden"
    if roll < config.drop_golden_rate + config.distractor_rate and config.distractors > 0:
        present = {f.id for f in retrieved} | set(golden)
        pool = [f for f in all_facts if f.id not in present]
        picks = rng.sample(pool, min(config.distractors, len(pool)))
        low = min((f.score for f in retrieved), default=0.5)
        high = max((f.score for f in retrieved), default=0.9)
        # Distractors get scores inside the retrieved range so their position tells nothing.
        extra = [ContextFact(p.id, p.text, round(rng.uniform(low, high), 4)) for p in picks]
        return retrieved + extra, "distractors"
    return retrieved, "none"


def _open_retriever(config: DataConfig):
    from rag_persona.retrieval.retriever import retriever_for
    from rag_persona.retrieval.store import open_store

    store = open_store(config.index, config.persona)
    retriever = retriever_for(store, mode=config.mode, threshold=config.threshold, k=config.k)
    return store, retriever


def build_datasets(config: DataConfig, teacher=None) -> dict:
    """Write SFT/DPO JSONL files and a manifest into config.out atomically; return the manifest.

    With config.augment_paraphrases > 0, a teacher model (config.teacher, the bundled chat model by
    default, or the `teacher` callable) rephrases that many training user turns; such rows are
    marked "generated": true.
    """
    # Refuse someone else's folder before any work, not only at the final swap.
    check_replaceable(Path(config.out).absolute(), MARKER, "build-data output")
    persona_dir = get_settings().persona_dir(config.persona)
    persona = Persona.load(persona_dir)
    store, retriever = _open_retriever(config)
    dialogue_paths = [persona_dir / name for name in config.dialogues]
    conversations = _load_all_dialogues(dialogue_paths, set(store.ids))
    exclude_files = config.exclude_queries or sorted((persona_dir / "queries").glob("test*.jsonl"))
    held_out = {normalise(q.query) for f in exclude_files for q in load_queries(f)}

    def is_held_out(text: str) -> bool:
        return normalise(text) in held_out

    kept, excluded = [], []
    for conv in conversations:
        (excluded if any(is_held_out(t.user) for t in conv.turns) else kept).append(conv)
    ids = sorted(c.id for c in kept)
    _rng(config.seed, "split").shuffle(ids)
    eval_ids = set(ids[: round(len(ids) * config.eval_share)])
    generated: list[Conversation] = []
    if config.augment_paraphrases > 0:
        from .augment import paraphrase_conversations, teacher_from_model

        generated = paraphrase_conversations(
            [c for c in kept if c.id not in eval_ids],
            teacher or teacher_from_model(config.teacher),
            config.augment_paraphrases,
            _rng(config.seed, "augment"),
            is_held_out,
        )
        kept = kept + generated
    cache = _turn_contexts(retriever, kept)
    asked = []
    if config.fact_questions:
        # Retrieved in a batch of their own: the dialogue rows stay byte-identical to a build without them.
        asked = fact_question_conversations(store.facts, persona, is_held_out)
        cache.update(_turn_contexts(retriever, asked))
        kept = kept + asked
    all_facts = [ContextFact(f.id, f.text, 0.0) for f in store.facts]
    rows = _dataset_rows(config, persona, kept, eval_ids, cache, all_facts)
    retrieval = {
        "mode": retriever.mode,
        "threshold": retriever.threshold,
        "threshold_source": retriever.threshold_source,
        "k": retriever.k,
    }
    return _write(
        config, rows, store, retrieval, dialogue_paths, excluded, len(kept), len(generated), len(asked)
    )


def _load_all_dialogues(paths: list[Path], fact_ids: set[str]) -> list[Conversation]:
    """Conversations of every dialogue file, in order; an id used twice across files is one error line."""
    conversations, seen = [], {}
    for path in paths:
        for conv in load_dialogues(path, fact_ids):
            if conv.id in seen:
                raise RagPersonaError(f"{path}: conversation id {conv.id!r} also in {seen[conv.id]}")
            seen[conv.id] = path.name
            conversations.append(conv)
    return conversations


def _turn_contexts(retriever, conversations) -> dict[tuple[str, int], list[ContextFact]]:
    """Each turn's retrieved facts, keyed (conversation id, turn): retrieval reads a turn with the
    conversation before it, as the chat does (the persona's own answers in its history)."""
    turns = [(c, i) for c in sorted(conversations, key=lambda c: c.id) for i in range(len(c.turns))]
    contexts = retrieve_contexts(
        retriever,
        [c.turns[i].user for c, i in turns],
        [_history(c.turns[:i], "ojousama") for c, i in turns],
    )
    return {(c.id, i): ctx for (c, i), ctx in zip(turns, contexts, strict=True)}


def _history(turns, style: str) -> list[dict]:
    """The earlier turns of a conversation as chat messages, answered in one style."""
    history = []
    for prev in turns:
        history += [
            {"role": "user", "content": prev.user},
            {"role": "assistant", "content": prev.answer(style)},
        ]
    return history


def _dataset_rows(config: DataConfig, persona: Persona, kept, eval_ids, cache, all_facts) -> dict[str, list]:
    """Every file's rows: per turn, one SFT row per variant and style, one DPO row per variant, and the
    held-out prompts (eval_prompts)."""
    rows: dict[str, list[dict]] = {}
    eval_prompts: list[dict] = []
    for conv in sorted(kept, key=lambda c: c.id):
        split = "eval" if conv.id in eval_ids else "train"
        for i, turn in enumerate(conv.turns):
            if split == "train":
                context, raft = raft_context(
                    cache[conv.id, i], turn.facts, all_facts, config, _rng(config.seed, conv.id, i)
                )
            else:
                # Held-out prompts are exactly what inference sees: no RAFT changes.
                context, raft = cache[conv.id, i], "none"
            prompts = {
                s: build_messages(persona, context, _history(conv.turns[:i], s), turn.user) for s in STYLES
            }
            meta = {
                "conversation": conv.id,
                "turn": i,
                "kind": conv.kind,
                "golden_ids": list(turn.facts),
                "context_ids": [f.id for f in context],
                "context_scores": [f.score for f in context],
                "raft": raft,
                "generated": conv.generated,
                "template_version": PROMPT_TEMPLATE_VERSION,
            }
            for name, row in _turn_rows(f"{conv.id}-t{i}", turn, prompts, meta):
                rows.setdefault(f"{name}_{split}", []).append(row)
            if split == "eval":
                eval_prompts.append(
                    {
                        "id": f"{conv.id}-t{i}",
                        "query": turn.user,
                        "history": [m for m in prompts["ojousama"][1:-1]],
                        "golden_ids": list(turn.facts),
                        "kind": conv.kind,
                        "reference": turn.ojousama,
                        "reference_plain": turn.plain,
                    }
                )
    rows["eval_prompts"] = eval_prompts
    return rows


def _turn_rows(turn_id: str, turn: Turn, prompts: dict, meta: dict):
    """(file stem, row) for one turn: SFT rows of each variant and style, then DPO rows of each variant."""
    for variant, styles in VARIANTS.items():
        for style in styles:
            yield (
                f"sft_{variant}",
                {
                    "id": f"{turn_id}-{style}",
                    "prompt": prompts[style],
                    "completion": [{"role": "assistant", "content": turn.answer(style)}],
                    "style": style,
                    **meta,
                },
            )
    for variant, (chosen, rejected) in DPO_VARIANTS.items():
        yield (
            f"dpo_{variant}",
            {
                "id": f"{turn_id}-{chosen}",
                "prompt": prompts[chosen],
                "chosen": [{"role": "assistant", "content": turn.answer(chosen)}],
                "rejected": [{"role": "assistant", "content": turn.answer(rejected)}],
                **meta,
            },
        )


def fact_question_conversations(facts, persona: Persona, is_held_out) -> list[Conversation]:
    """One single-turn conversation per question of each fact (held-out queries skipped): the question,
    the fact said back in each style (training.data.fact_answers.say_fact), the fact as golden."""
    from .fact_answers import say_fact, self_names

    names = self_names(persona.name)
    out = []
    for fact in facts:
        for i, question in enumerate(fact.questions):
            if is_held_out(question):
                continue
            turn = Turn(
                user=question,
                ojousama=say_fact(fact.text, "ojousama", names),
                plain=say_fact(fact.text, "plain", names),
                facts=(fact.id,),
            )
            out.append(Conversation(f"q-{fact.id}-{i}", "fact-question", (turn,)))
    return out


def _write(
    config: DataConfig,
    rows: dict[str, list[dict]],
    store,
    retrieval: dict,
    dialogue_paths: list[Path],
    excluded,
    n_kept: int,
    n_generated: int,
    n_fact_questions: int = 0,
) -> dict:
    files = {}
    with atomic_folder(config.out, marker=MARKER, what="build-data output") as work:
        for name in sorted(rows):
            path = work / f"{name}.jsonl"
            path.write_text(jsonl_text(rows[name]), encoding="utf-8")
            files[path.name] = {"rows": len(rows[name]), "sha256": file_sha256(path)}
        settings = asdict(config)
        settings.pop("out")
        settings = json.loads(json.dumps(settings, default=str))
        manifest = {
            "format_version": DATA_FORMAT_VERSION,
            "prompt_template_version": PROMPT_TEMPLATE_VERSION,
            "seed": config.seed,
            "config": settings,
            "knowledge_hash": store.knowledge_hash,
            "index_manifest": store.manifest,
            "retrieval": retrieval,
            # one file: its sha256 (as before); several: {file name: sha256}
            "dialogues_sha256": file_sha256(dialogue_paths[0])
            if len(dialogue_paths) == 1
            else {p.name: file_sha256(p) for p in dialogue_paths},
            "conversations": n_kept,
            "excluded_conversations": sorted(c.id for c in excluded),
            "generated_conversations": n_generated,
            "fact_question_conversations": n_fact_questions,
            "counts": {name: meta["rows"] for name, meta in files.items()},
            "files": files,
        }
        write_json(work / MANIFEST, manifest)
    return manifest
