"""Knowledge bases and labelled queries: JSONL on disk to validated `Fact`s, with a stable content hash.

A knowledge base is a JSONL file (one fact a line, minimal form ``{"id": "...", "text": "..."}``) or a
folder. A folder with ``facts.jsonl`` uses only that file (a persona folder also holds ``persona.json``,
``dialogues.jsonl`` and ``queries/``); otherwise every ``*.jsonl`` directly in the folder is read, except
``dialogues.jsonl`` and ``queries*.jsonl``.

Every problem is raised as a `RagPersonaError` with one line: ``FILE:LINE: field 'x': problem``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rag_persona.errors import RagPersonaError
from rag_persona.settings import get_settings
from rag_persona.utils.io import atomic_write_text, jsonl_text, read_jsonl
from rag_persona.utils.text import unicode_problem

FACTS_FILE = "facts.jsonl"
_NOT_FACTS = {"dialogues.jsonl"}
_KNOWN = ("id", "text", "questions", "tags")


@dataclass
class Fact:
    """One retrievable fact. ``questions`` are extra retrieval keys; unknown fields survive in ``extra``."""

    id: str
    text: str
    questions: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    source: str | None = field(default=None, compare=False)
    line: int | None = field(default=None, compare=False)

    def to_dict(self) -> dict:
        """The JSONL form: id, text, then optional fields only when set, then the extra fields."""
        out: dict = {"id": self.id, "text": self.text}
        if self.questions:
            out["questions"] = list(self.questions)
        if self.tags:
            out["tags"] = list(self.tags)
        out.update(self.extra)
        return out

    def keys(self) -> list[str]:
        """The texts a query is matched against: the fact itself and its own questions."""
        return [self.text, *self.questions]


@dataclass
class KnowledgeBase:
    """Validated facts plus where they came from."""

    facts: list[Fact]
    path: Path
    files: list[Path]

    def __len__(self) -> int:
        return len(self.facts)

    def __iter__(self) -> Iterator[Fact]:
        return iter(self.facts)

    @property
    def ids(self) -> list[str]:
        return [f.id for f in self.facts]

    def by_id(self) -> dict[str, Fact]:
        return {f.id: f for f in self.facts}

    @property
    def hash(self) -> str:
        return knowledge_hash(self.facts)


@dataclass
class LabelledQuery:
    """A query with the ids of the facts that should be retrieved (empty: nothing should be)."""

    query: str
    relevant: list[str]
    source: str | None = None
    line: int | None = None
    extra: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # earlier {"role", "content"} turns (multi-turn sets)


def _where(path: Path, line: int | None) -> str:
    return f"{path}:{line}" if line is not None else str(path)


def _bad(path: Path, line: int | None, fld: str | None, problem: str) -> RagPersonaError:
    prefix = _where(path, line)
    return RagPersonaError(f"{prefix}: field '{fld}': {problem}" if fld else f"{prefix}: {problem}")


def _check_text(path: Path, line: int, name: str, value: str, max_chars: int) -> None:
    """Length (fits the prompt and embeds in bounded time) and encodability, checked once where facts enter."""
    if len(value) > max_chars:
        raise _bad(
            path,
            line,
            name,
            f"{len(value)} characters, the limit is {max_chars} (RAG_PERSONA_MAX_FACT_CHARS)",
        )
    problem = unicode_problem(value)
    if problem:
        raise _bad(path, line, name, problem)


def _string_list(path: Path, line: int, obj: dict, name: str) -> list[str]:
    value = obj.get(name)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise _bad(path, line, name, f"expected a list of strings, got {type(value).__name__}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _bad(path, line, f"{name}[{i}]", f"expected a string, got {type(item).__name__}")
        if not item.strip():
            raise _bad(path, line, f"{name}[{i}]", "empty string")
        out.append(item.strip())
    return out


def _text_field(path: Path, line: int, obj: dict, name: str, *, null_is_missing: bool = False) -> str:
    """A required, non-blank string field."""
    value = obj.get(name)
    if name not in obj or (null_is_missing and value is None):
        raise _bad(path, line, name, "missing")
    if not isinstance(value, str):
        raise _bad(path, line, name, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise _bad(path, line, name, "empty")
    return value


def parse_fact(path: Path, line: int, obj: dict, max_chars: int | None = None) -> Fact:
    """Validate one JSON object as a fact (text and questions at most max_chars, default from settings)."""
    if "id" not in obj:
        raise _bad(path, line, "id", "missing")
    fid = obj["id"]
    if isinstance(fid, bool) or not isinstance(fid, str | int):
        raise _bad(path, line, "id", f"expected a string, got {type(fid).__name__}")
    fid = str(fid).strip()
    if not fid:
        raise _bad(path, line, "id", "empty")
    text = _text_field(path, line, obj, "text")
    limit = get_settings().max_fact_chars if max_chars is None else max_chars
    _check_text(path, line, "text", text.strip(), limit)
    questions = _string_list(path, line, obj, "questions")
    for i, q in enumerate(questions):
        _check_text(path, line, f"questions[{i}]", q, limit)
    return Fact(
        id=fid,
        text=text.strip(),
        questions=questions,
        tags=_string_list(path, line, obj, "tags"),
        extra={k: v for k, v in obj.items() if k not in _KNOWN},
        source=str(path),
        line=line,
    )


def fact_files(path: str | Path) -> list[Path]:
    """The JSONL files holding a knowledge base's facts (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise RagPersonaError(f"{path}: no such file or folder (knowledge base)")
    if path.is_file():
        return [path]
    if (path / FACTS_FILE).is_file():
        return [path / FACTS_FILE]
    files = sorted(
        p
        for p in path.glob("*.jsonl")
        if p.is_file() and p.name not in _NOT_FACTS and not p.name.startswith("queries")
    )
    if not files:
        raise RagPersonaError(f"{path}: no {FACTS_FILE} or other *.jsonl fact files in this folder")
    return files


def load_knowledge(path: str | Path) -> KnowledgeBase:
    """Load and validate a knowledge base (file or folder); ids must be unique across its files."""
    path = Path(path)
    files = fact_files(path)
    facts: list[Fact] = []
    seen: dict[str, str] = {}
    limit = get_settings().max_fact_chars
    for file in files:
        for line, obj in read_jsonl(file):
            fact = parse_fact(file, line, obj, limit)
            if fact.id in seen:
                raise _bad(file, line, "id", f"duplicate id {fact.id!r} (first at {seen[fact.id]})")
            seen[fact.id] = _where(file, line)
            facts.append(fact)
    if not facts:
        raise RagPersonaError(f"{files[0]}: no facts (the knowledge base is empty)")
    return KnowledgeBase(facts=facts, path=path, files=files)


def _history(path: Path, line: int, obj: dict) -> list[dict]:
    """A labelled query's optional "history": earlier turns as [{"role": "user"|"assistant", "content"}]."""
    value = obj.get("history")
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad(path, line, "history", f"expected a list of messages, got {type(value).__name__}")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise _bad(path, line, f"history[{i}].role", "expected 'user' or 'assistant'")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise _bad(path, line, f"history[{i}].content", "missing or empty")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def load_queries(path: str | Path, known_ids: Iterable[str] | None = None) -> list[LabelledQuery]:
    """Load labelled queries ``{"query": ..., "relevant": [ids]}``; unknown ids are refused if known_ids given."""
    path = Path(path)
    known = set(known_ids) if known_ids is not None else None
    out: list[LabelledQuery] = []
    for line, obj in read_jsonl(path):
        query = _text_field(path, line, obj, "query", null_is_missing=True)
        if "relevant" not in obj:
            raise _bad(path, line, "relevant", "missing (use [] for a query that should retrieve nothing)")
        relevant = obj["relevant"]
        if not isinstance(relevant, list):
            raise _bad(path, line, "relevant", f"expected a list of ids, got {type(relevant).__name__}")
        ids = []
        for i, rid in enumerate(relevant):
            if isinstance(rid, bool) or not isinstance(rid, str | int):
                raise _bad(path, line, f"relevant[{i}]", f"expected an id string, got {type(rid).__name__}")
            rid = str(rid)
            if known is not None and rid not in known:
                raise _bad(path, line, f"relevant[{i}]", f"unknown fact id {rid!r}")
            ids.append(rid)
        extra = {k: v for k, v in obj.items() if k not in ("query", "relevant", "history")}
        out.append(LabelledQuery(query.strip(), ids, str(path), line, extra, _history(path, line, obj)))
    if not out:
        raise RagPersonaError(f"{path}: no queries")
    return out


def knowledge_hash(facts: Iterable[Fact]) -> str:
    """sha256 over the facts' canonical JSON, independent of file layout, line order and formatting."""
    rows = sorted(json.dumps(f.to_dict(), ensure_ascii=False, sort_keys=True) for f in facts)
    digest = hashlib.sha256()
    for row in rows:
        digest.update(row.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def facts_to_jsonl(facts: Iterable[Fact]) -> str:
    """Facts in their JSONL form, one a line."""
    return jsonl_text(f.to_dict() for f in facts)


def write_facts(path: str | Path, facts: Iterable[Fact]) -> None:
    """Write facts as JSONL atomically."""
    atomic_write_text(path, facts_to_jsonl(facts))


def edit_knowledge(
    kb: KnowledgeBase,
    *,
    add: Iterable[Fact] = (),
    update: dict[str, Fact] | None = None,
    delete: Iterable[str] = (),
) -> list[Path]:
    """Write added, replaced (same id) and deleted facts back to the knowledge base's own files.

    Only files that change are rewritten (atomically, in their order); new facts go to the folder's
    facts.jsonl, or the knowledge file itself, else the first fact file. Returns the files written.
    """
    update = update or {}
    delete = set(delete)
    add = list(add)
    by_file: dict[Path, list[Fact]] = {p: [] for p in kb.files}
    for f in kb.facts:
        by_file[Path(f.source)].append(f)
    changed: set[Path] = set()
    for file, rows in by_file.items():
        new_rows = []
        for f in rows:
            if f.id in delete:
                changed.add(file)
                continue
            if f.id in update:
                changed.add(file)
                new_rows.append(update[f.id])
            else:
                new_rows.append(f)
        by_file[file] = new_rows
    if add:
        target = kb.path / FACTS_FILE if kb.path.is_dir() else kb.path
        if target not in by_file:
            target = kb.files[0]
        by_file[target].extend(add)
        changed.add(target)
    for file in sorted(changed):
        write_facts(file, by_file[file])
    return sorted(changed)
