"""Token-level labels for SFT and DPO: the EOS is appended as a token id, never as text, and audited.

The users' failure (../shared/REFERENCE.md, 1): training text ended with the literal string `</s>`; on some
tokenizers that string splits into ordinary pieces, so the model learned to *print* `</s>` and never stop.
trl still appends `eos_token` as a string before tokenising (non-conversational data), and for chat data
its last trained label is whatever the template puts after the turn end (Qwen: "\\n").

Here a prompt is tokenised exactly as inference tokenises it (chat template + generation prompt, the same
call `rag_persona.generation.decoding.encode_messages` makes), the completion is tokenised as plain text with
special-token text kept literal, and `eos_id` is appended as a token. Every label outside the completion
and its EOS is -100. `audit_example` checks the result for any tokenizer.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rag_persona.errors import RagPersonaError
from rag_persona.evaluation.metrics import special_token_texts
from rag_persona.utils.io import read_jsonl

IGNORE = -100
TAIL = 8


class LabelError(RagPersonaError):
    """A row that cannot be turned into safe labels (names the row and the field)."""


# -- tokenizer facts ------------------------------------------------------------------------------------


def added_token_ids(tokenizer) -> set[int]:
    """Ids of every added token (special or not): these are never 'ordinary pieces'."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(int(i) for i in decoder)
    return ids


def tokenizer_special_texts(tokenizer) -> list[str]:
    """The literal texts of the tokenizer's special and added control tokens, plus well-known ones."""
    texts = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        content = getattr(tok, "content", str(tok))
        if content.startswith("<") or getattr(tok, "special", False):
            texts.add(content)
    for name in ("eos_token", "bos_token", "pad_token", "unk_token"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, str) and value:
            texts.add(value)
    texts.update(special_token_texts())
    return sorted((t for t in texts if t and t.strip()), key=lambda t: (-len(t), t))


def find_special_text(text: str, specials: Sequence[str]) -> str | None:
    for s in specials:
        if s in text:
            return s
    return None


def _chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
    )
    ids = out["input_ids"]
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(i) for i in ids]


def turn_end_id(tokenizer) -> int | None:
    """The special token the chat template puts right after an assistant message, if any."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    probe = "PROBE-turn-end"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}], tokenize=False
        )
    except Exception:  # a template may refuse this probe (e.g. demand a system turn): no turn end known
        return None
    at = text.rfind(probe)
    if at < 0:
        return None
    suffix = text[at + len(probe) :]
    if not suffix:
        return None
    ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if ids and int(ids[0]) in added_token_ids(tokenizer) else None


def resolve_eos_id(tokenizer, generation_eos_ids: Iterable[int] | None = None) -> int:
    """The id to append after a completion: the token that ends generation.

    `tokenizer.eos_token_id`, unless the chat template ends an assistant turn with another special token
    that generation also stops on (Qwen base tokenizers: eos <|endoftext|>, turn end <|im_end|>;
    Llama-3: <|eot_id|>). Then the model learns to end a turn exactly as its template does.
    """
    eos = tokenizer.eos_token_id
    stops = {int(i) for i in (generation_eos_ids or [])}
    end = turn_end_id(tokenizer)
    if end is not None and end != eos and end in stops:
        return end
    if eos is None:
        if end is not None and end in stops:
            return end
        raise LabelError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r}: no eos_token_id; cannot end labels"
        )
    return int(eos)


def stop_ids(tokenizer, generation_eos_ids: Iterable[int] | None = None) -> set[int]:
    """Ids that end generation: the audit accepts any of them as the last trained label."""
    ids = {int(i) for i in (generation_eos_ids or [])}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


# -- building -------------------------------------------------------------------------------------------


def _text_of(value, where: str, name: str) -> str:
    """A completion given as a string or as [one assistant message] → its text."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        msg = value[0]
        if msg.get("role") != "assistant":
            raise LabelError(f"{where}: field '{name}': the message must have role 'assistant'")
        text = msg.get("content")
        if not isinstance(text, str):
            raise LabelError(f"{where}: field '{name}': the message has no text content")
    else:
        raise LabelError(f"{where}: field '{name}': expected a string or a list with one assistant message")
    if not text.strip():
        raise LabelError(f"{where}: field '{name}': empty")
    return text


def encode_prompt(tokenizer, prompt, where: str = "row") -> list[int]:
    """Prompt ids exactly as inference builds them (chat template with the generation prompt)."""
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(m, dict) and "role" in m for m in prompt):
            raise LabelError(f"{where}: field 'prompt': expected a non-empty list of chat messages")
        if not getattr(tokenizer, "chat_template", None):
            raise LabelError(
                f"{where}: field 'prompt': chat messages given but the tokenizer has no chat template"
            )
        return _chat_ids(tokenizer, prompt, add_generation_prompt=True)
    if isinstance(prompt, str) and prompt:
        return [int(i) for i in tokenizer(prompt, add_special_tokens=True)["input_ids"]]
    raise LabelError(f"{where}: field 'prompt': expected chat messages or a non-empty string")


def encode_completion(
    tokenizer, completion, eos_id: int, *, where: str = "row", name: str = "completion", strict: bool = True
) -> list[int]:
    """Completion text as ordinary pieces followed by the EOS *id*.

    Special-token text inside the completion is never turned into a control token: strict mode refuses
    it (the data is wrong), non-strict mode keeps it as ordinary pieces so an audit can show it.
    """
    text = _text_of(completion, where, name)
    if strict:
        found = find_special_text(text, tokenizer_special_texts(tokenizer))
        if found:
            raise LabelError(
                f"{where}: field '{name}': contains special-token text {found!r}; the EOS is appended as a "
                "token id, remove the text from the data"
            )
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return [int(i) for i in ids] + [int(eos_id)]


@dataclass
class SFTExample:
    input_ids: list[int]
    labels: list[int]

    def to_dict(self) -> dict:
        return {"input_ids": self.input_ids, "labels": self.labels}


@dataclass
class DPOExample:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    def to_dict(self) -> dict:
        return asdict(self)

    def __len__(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


def build_sft_example(tokenizer, prompt, completion, eos_id: int, *, where: str = "row", strict: bool = True):
    prompt_ids = encode_prompt(tokenizer, prompt, where)
    completion_ids = encode_completion(tokenizer, completion, eos_id, where=where, strict=strict)
    return SFTExample(prompt_ids + completion_ids, [IGNORE] * len(prompt_ids) + completion_ids)


def build_dpo_example(
    tokenizer, prompt, chosen, rejected, eos_id: int, *, where: str = "row", strict: bool = True
):
    prompt_ids = encode_prompt(tokenizer, prompt, where)
    return DPOExample(
        prompt_ids,
        encode_completion(tokenizer, chosen, eos_id, where=where, name="chosen", strict=strict),
        encode_completion(tokenizer, rejected, eos_id, where=where, name="rejected", strict=strict),
    )


def read_rows(path: str | Path) -> list[tuple[str, dict]]:
    """The rows of a JSONL data file, each tagged 'file:line'; one line on bad JSON or an empty file."""
    rows = [(f"{path}:{lineno}", obj) for lineno, obj in read_jsonl(path, missing="data file not found")]
    if not rows:
        raise RagPersonaError(f"{path}: no rows")
    return rows


def row_kind(row: dict) -> str:
    if "input_ids" in row and "labels" in row:
        return "tokenized-sft"
    if {"prompt_ids", "chosen_ids", "rejected_ids"} <= row.keys():
        return "tokenized-dpo"
    if {"prompt", "chosen", "rejected"} <= row.keys():
        return "dpo"
    if {"prompt", "completion"} <= row.keys():
        return "sft"
    if "text" in row:
        return "text"
    if "messages" in row:
        return "messages"
    return "unknown"


@dataclass
class Tokenized:
    """Pre-tokenised examples ready for the trainers, with what was dropped and why."""

    kind: str  # "sft" | "dpo"
    examples: list
    sources: list[str]
    dropped_too_long: list[str] = field(default_factory=list)

    def columns(self) -> dict[str, list]:
        rows = [e.to_dict() for e in self.examples]
        return {k: [r[k] for r in rows] for k in (rows[0] if rows else {})}


def tokenize_rows(
    tokenizer,
    rows: Sequence[tuple[str, dict]],
    eos_id: int,
    *,
    kind: str,
    max_length: int | None = None,
    strict: bool = True,
) -> Tokenized:
    """SFT rows (prompt, completion) or DPO rows (prompt, chosen, rejected) → token-level examples.

    Examples longer than max_length are dropped, never truncated: truncation would cut the EOS.
    """
    out = Tokenized(kind=kind, examples=[], sources=[])
    for where, row in rows:
        got = row_kind(row)
        if got != kind:
            raise LabelError(f"{where}: expected a {kind} row ({_FIELDS[kind]}), found {got} fields")
        if kind == "sft":
            ex = build_sft_example(
                tokenizer, row["prompt"], row["completion"], eos_id, where=where, strict=strict
            )
            n = len(ex.input_ids)
        else:
            ex = build_dpo_example(
                tokenizer, row["prompt"], row["chosen"], row["rejected"], eos_id, where=where, strict=strict
            )
            n = len(ex)
        if max_length is not None and n > max_length:
            out.dropped_too_long.append(where)
            continue
        out.examples.append(ex)
        out.sources.append(where)
    return out


_FIELDS = {"sft": "prompt, completion", "dpo": "prompt, chosen, rejected"}


def _pick_share(n: int, share: float, seed: int, what: str) -> list[int]:
    """A seeded random share (at least one) of n row indices, in their original order."""
    if not 0 < share <= 1:
        raise LabelError(f"{what}: share {share} must be in (0, 1]")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[: max(1, round(share * n))])


def parrot_pairs(
    tokenizer,
    rows: Sequence[tuple[str, dict]],
    eos_id: int,
    share: float,
    seed: int,
    *,
    max_length: int | None = None,
) -> Tokenized:
    """DPO pairs against parroting: the chosen answer over the user's own last message said back as the
    reply — how small models answer chit-chat they have no reply for, and the way into a loop."""
    out = Tokenized(kind="dpo", examples=[], sources=[])
    for i in _pick_share(len(rows), share, seed + 1, "parrot_contrast"):
        where, row = rows[i]
        users = [m for m in row["prompt"] if isinstance(m, dict) and m.get("role") == "user"]
        if not users or not str(users[-1].get("content", "")).strip():
            raise LabelError(f"{where}: field 'prompt': no user message to contrast against")
        echo = [{"role": "assistant", "content": users[-1]["content"]}]
        ex = build_dpo_example(tokenizer, row["prompt"], row["chosen"], echo, eos_id, where=where)
        if max_length is not None and len(ex) > max_length:
            continue
        out.examples.append(ex)
        out.sources.append(f"{where} (parrot contrast)")
    return out


def eos_contrast_pairs(
    data: Tokenized, eos_id: int, share: float, seed: int, repeat_tokens: int = 8
) -> Tokenized:
    """DPO pairs that differ only where the answer ends: the chosen answer stopping at its EOS over the same
    answer running on (EOS dropped, its first tokens said again) — the looping that DPO drifts into.

    The two sides share every token up to the EOS position, so the preference gradient lands on the EOS
    decision itself. The rejected side deliberately does not end in EOS; build these after the label audit.
    """
    out = Tokenized(kind="dpo", examples=[], sources=[])
    for i in _pick_share(len(data.examples), share, seed, "eos_contrast"):
        ex = data.examples[i]
        answer = ex.chosen_ids[:-1] if ex.chosen_ids[-1:] == [eos_id] else None
        if not answer:
            raise LabelError(f"{data.sources[i]}: chosen answer does not end in EOS id {eos_id}")
        rejected = answer + answer[: min(repeat_tokens, len(answer))]
        out.examples.append(DPOExample(list(ex.prompt_ids), list(ex.chosen_ids), rejected))
        out.sources.append(f"{data.sources[i]} (EOS contrast)")
    return out


# -- trl's own path, for comparison ---------------------------------------------------------------------


def trl_sft_labels(tokenizer, rows: Sequence[dict]) -> list[SFTExample]:
    """Labels exactly as trl's SFTTrainer prepares them (its string-EOS path), for audits and tests."""
    import tempfile
    from types import SimpleNamespace

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_list([{k: r[k] for k in ("prompt", "completion", "text") if k in r} for r in rows])
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(output_dir=tmp, max_length=None, report_to=[], bf16=False, use_cpu=True)
    stub = SimpleNamespace(
        _tokenizer=tokenizer,
        completion_only_loss="prompt" in data.column_names,
        chat_template=None,
    )
    import datasets

    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        prepared = SFTTrainer._prepare_dataset(stub, data, tokenizer, args, False, None, "audit")
    finally:
        if shown:
            datasets.enable_progress_bars()
    return [SFTExample(list(r["input_ids"]), list(r["labels"])) for r in prepared]


# -- audit ----------------------------------------------------------------------------------------------


@dataclass
class AuditRow:
    source: str
    part: str  # "completion" | "chosen" | "rejected" | "text" | "labels"
    ok: bool
    problems: list[str]
    last_label: int | None
    last_token: str | None
    tail_ids: list[int]
    tail_tokens: list[str]
    tail_text: str
    trained_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def audit_labels(
    tokenizer, labels: Sequence[int], eos_ids: set[int], *, source: str = "", part: str = "labels"
):
    """Check one trained span: it ends with an EOS id, and no special-token text hides in ordinary pieces."""
    trained = [int(i) for i in labels if int(i) != IGNORE]
    problems = []
    added = added_token_ids(tokenizer)
    specials = tokenizer_special_texts(tokenizer)
    if not trained:
        problems.append("no trained labels")
    else:
        if trained[-1] not in eos_ids:
            tok = tokenizer.convert_ids_to_tokens(trained[-1])
            problems.append(
                f"last trained label is {trained[-1]} ({tok!r}), not the EOS id {sorted(eos_ids)}"
            )
        inner = [i for i in trained[:-1] if i in added]
        if inner:
            problems.append(
                f"control token id {inner[0]} ({tokenizer.convert_ids_to_tokens(inner[0])!r}) inside the trained span"
            )
        run: list[int] = []
        for i in [*trained, None]:
            if i is not None and i not in added:
                run.append(i)
                continue
            if run:
                found = find_special_text(tokenizer.decode(run, skip_special_tokens=False), specials)
                if found:
                    pieces = [tokenizer.convert_ids_to_tokens(j) for j in run[-TAIL:]]
                    problems.append(f"special-token text {found!r} trained as ordinary pieces (… {pieces})")
                    break
                run = []
    tail = trained[-TAIL:]
    return AuditRow(
        source=source,
        part=part,
        ok=not problems,
        problems=problems,
        last_label=trained[-1] if trained else None,
        last_token=tokenizer.convert_ids_to_tokens(trained[-1]) if trained else None,
        tail_ids=tail,
        tail_tokens=[tokenizer.decode([t], skip_special_tokens=False) for t in tail],
        tail_text=tokenizer.decode(tail, skip_special_tokens=False),
        trained_tokens=len(trained),
    )


def audit_tokenized(tokenizer, data: Tokenized, eos_ids: set[int]) -> list[AuditRow]:
    rows = []
    for src, ex in zip(data.sources, data.examples, strict=True):
        if isinstance(ex, SFTExample):
            rows.append(audit_labels(tokenizer, ex.labels, eos_ids, source=src, part="completion"))
        else:
            rows.append(audit_labels(tokenizer, ex.chosen_ids, eos_ids, source=src, part="chosen"))
            rows.append(audit_labels(tokenizer, ex.rejected_ids, eos_ids, source=src, part="rejected"))
    return rows


def require_clean(rows: Sequence[AuditRow], what: str) -> None:
    """Refuse to train on labels that fail the audit (one line, the first failing row)."""
    bad = [r for r in rows if not r.ok]
    if bad:
        first = bad[0]
        raise LabelError(
            f"{first.source}: {what} labels fail the audit ({len(bad)} of {len(rows)}): {first.problems[0]}"
        )


def audit_file(
    tokenizer,
    path: str | Path,
    *,
    generation_eos_ids: Iterable[int] | None = None,
    builder: str = "ours",
    limit: int | None = None,
) -> dict:
    """Audit the labels a data file turns into.

    Rows may be SFT (prompt, completion), DPO (prompt, chosen, rejected), plain `text` (trained whole, as the
    users did), or pre-tokenised (`input_ids` + `labels`, or `prompt_ids` + `chosen_ids` + `rejected_ids`).
    builder="ours" uses this module; builder="trl" uses trl's own SFT preparation (string EOS).
    """
    rows = read_rows(path)
    if limit is not None:
        rows = rows[:limit]
    eos_id = resolve_eos_id(tokenizer, generation_eos_ids)
    eos_ids = stop_ids(tokenizer, generation_eos_ids) | {eos_id}
    kinds = {row_kind(r) for _, r in rows}
    if len(kinds) != 1:
        raise RagPersonaError(f"{path}: rows of mixed kinds {sorted(kinds)}; audit one kind per file")
    kind = kinds.pop()
    if builder == "trl":
        if kind not in ("sft", "text"):
            raise RagPersonaError(
                f"{path}: --builder trl audits SFT rows (prompt/completion or text), not {kind}"
            )
        audited = [
            audit_labels(tokenizer, ex.labels, eos_ids, source=where, part="completion")
            for (where, _), ex in zip(rows, trl_sft_labels(tokenizer, [r for _, r in rows]), strict=True)
        ]
    elif builder != "ours":
        raise RagPersonaError(f"audit: unknown builder {builder!r} (ours, trl)")
    else:
        audited = _audit_ours(tokenizer, rows, kind, eos_id, eos_ids)
    failed = [r for r in audited if not r.ok]
    return {
        "file": str(path),
        "builder": builder,
        "kind": kind,
        "eos_id": eos_id,
        "eos_token": tokenizer.convert_ids_to_tokens(eos_id),
        "accepted_stop_ids": sorted(eos_ids),
        "checked": len(audited),
        "failed": len(failed),
        "ok": not failed,
        "rows": [r.to_dict() for r in audited],
    }


def _audit_ours(tokenizer, rows, kind: str, eos_id: int, eos_ids: set[int]) -> list[AuditRow]:
    """Audit rows of one kind as this module labels them (pre-tokenised rows: their own labels)."""
    audited: list[AuditRow] = []
    for where, row in rows:
        if kind in ("sft", "dpo"):
            try:
                data = tokenize_rows(tokenizer, [(where, row)], eos_id, kind=kind, strict=False)
                audited += audit_tokenized(tokenizer, data, eos_ids)
            except LabelError as exc:
                audited.append(_failed(where, str(exc)))
        elif kind == "text":
            ids = tokenizer(row["text"], add_special_tokens=True)["input_ids"]
            audited.append(audit_labels(tokenizer, ids, eos_ids, source=where, part="text"))
        elif kind == "tokenized-sft":
            audited.append(audit_labels(tokenizer, row["labels"], eos_ids, source=where, part="labels"))
        elif kind == "tokenized-dpo":
            for part in ("chosen", "rejected"):
                audited.append(audit_labels(tokenizer, row[f"{part}_ids"], eos_ids, source=where, part=part))
        else:
            raise RagPersonaError(f"{rows[0][0]}: cannot tell the row kind (fields {sorted(rows[0][1])})")
    return audited


def _failed(where: str, message: str) -> AuditRow:
    return AuditRow(where, "row", False, [message], None, None, [], [], "", 0)
