"""Facts + a FAISS inner-product index over unit vectors + a manifest, saved atomically on disk.

Each fact contributes one key row for its text (embedded as a passage) and one per question in its
``questions`` (embedded as a query: question-to-question matching is symmetric). ``key_fact[row]`` maps
a row back to its fact. An index folder holds::

    manifest.json   embedder name+dim, knowledge hash, source, threshold (None until tuned), defaults, counts
    facts.jsonl     the facts as indexed (hits are served from here)
    index.faiss     IndexFlatIP over the key vectors

Saves go to a hidden work folder that is synced and swapped in for the target
(`rag_persona.utils.io.atomic_folder`), so a failed build or edit leaves the previous index untouched.
An index whose knowledge or embedder changed is *stale*: `load_index` refuses it with a message that
says how to rebuild, `ensure_index` rebuilds it. Key rows, their vectors and the FAISS index: `keys.py`.
"""

from __future__ import annotations

import copy
import fcntl
import json
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from rag_persona.errors import RagPersonaError
from rag_persona.knowledge.facts import (
    FACTS_FILE,
    Fact,
    KnowledgeBase,
    edit_knowledge,
    facts_to_jsonl,
    knowledge_hash,
    load_knowledge,
    parse_fact,
)
from rag_persona.retrieval.embedders import _E5_ALIASES, DEFAULT_EMBEDDER, Embedder, load_embedder
from rag_persona.retrieval.keys import embed_keys, fact_keys, flat_index
from rag_persona.settings import get_settings
from rag_persona.utils.io import atomic_folder, check_replaceable, read_json, read_jsonl, recover_folder

INDEX_FORMAT = 1
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"


class StaleIndexError(RagPersonaError):
    """The index no longer matches its knowledge base or the requested embedder."""


def canonical_embedder_name(name: str | None) -> str:
    name = name or DEFAULT_EMBEDDER
    return "e5-small" if name in _E5_ALIASES else name


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class FactStore:
    """An in-memory index: facts, key rows, their unit vectors in FAISS, and the manifest."""

    facts: list[Fact]
    key_fact: np.ndarray
    key_kind: np.ndarray
    index: object
    manifest: dict
    path: Path | None = None
    # Set when this index is served although its source knowledge could not be read (see ensure_index).
    warning: str | None = None
    _embedder: Embedder | None = field(default=None, repr=False)
    _by_id: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_id = {f.id: i for i, f in enumerate(self.facts)}

    def copy(self) -> FactStore:
        """A copy that an edit may change while searches keep using this one (edits replace arrays, never
        mutate them; only the manifest is changed in place, so it alone is copied deeply)."""
        return replace(self, manifest=copy.deepcopy(self.manifest), _embedder=self._embedder)

    # -- basic accessors -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.facts)

    @property
    def ids(self) -> list[str]:
        return [f.id for f in self.facts]

    @property
    def n_keys(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def embedder_name(self) -> str:
        return self.manifest["embedder"]["name"]

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = load_embedder(self.embedder_name)
            if int(self._embedder.dim) != self.dim:
                raise RagPersonaError(
                    f"index {self.path}: embedder {self.embedder_name!r} gives {self._embedder.dim}-d "
                    f"vectors, the index holds {self.dim}-d ones; rebuild the index"
                )
        return self._embedder

    @property
    def vectors(self) -> np.ndarray:
        """A read-only (n_keys, dim) view of the vectors inside the FAISS index."""
        import faiss

        if self.n_keys == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        view = faiss.rev_swig_ptr(self.index.get_xb(), self.n_keys * self.dim).reshape(self.n_keys, self.dim)
        view.flags.writeable = False
        return view

    @property
    def threshold(self) -> float | None:
        """The tuned threshold stored with the index (None until `tune-threshold` ran)."""
        return self.manifest.get("threshold")

    def tuned_threshold(self, mode: str) -> float | None:
        return (self.manifest.get("thresholds") or {}).get(mode)

    @property
    def knowledge_hash(self) -> str:
        return self.manifest["knowledge_hash"]

    @property
    def source(self) -> Path | None:
        src = self.manifest.get("source")
        return Path(src) if src else None

    def fact(self, fact_id: str) -> Fact:
        try:
            return self.facts[self._by_id[fact_id]]
        except KeyError:
            raise RagPersonaError(f"index {self.path}: no fact with id {fact_id!r}") from None

    def __contains__(self, fact_id: str) -> bool:
        return fact_id in self._by_id

    # -- persistence -----------------------------------------------------------------------------
    def save(self, path: str | Path | None = None) -> Path:
        """Write the index folder atomically (work folder, fsync, swap); the old one survives failures."""
        target = Path(path or self.path or "")
        if not str(target):
            raise RagPersonaError("index: no folder to save to")
        with atomic_folder(target, marker=INDEX_FILE, what="an index") as work:
            _write_store_files(self, work)
        self.path = target
        return target

    def set_threshold(self, mode: str, value: float | None, info: dict | None = None) -> None:
        """Record a tuned threshold for a retrieval mode (and as *the* threshold for the default mode)."""
        thresholds = dict(self.manifest.get("thresholds") or {})
        if value is None:
            thresholds.pop(mode, None)
        else:
            thresholds[mode] = float(value)
        self.manifest["thresholds"] = thresholds
        self.manifest["retrieval"] = {**self.manifest.get("retrieval", {}), "mode": mode}
        self.manifest["threshold"] = thresholds.get(mode)
        self.manifest["threshold_mode"] = mode
        if info is not None:
            self.manifest.setdefault("tuning", {})[mode] = info
        self.manifest["updated"] = _now()

    # -- staleness -------------------------------------------------------------------------------
    def stale_reason(
        self, kb: KnowledgeBase | str | Path | None = None, embedder: str | None = None
    ) -> str | None:
        """Why this index no longer matches its knowledge (or the given one) or embedder; None if current."""
        if embedder is not None and canonical_embedder_name(embedder) != canonical_embedder_name(
            self.embedder_name
        ):
            return f"it was built with embedder {self.embedder_name!r}, not {embedder!r}"
        if kb is None:
            kb = self.source
            if kb is None or not Path(kb).exists():
                return None
        if not isinstance(kb, KnowledgeBase):
            kb = load_knowledge(kb)
        if kb.hash != self.knowledge_hash:
            return (
                f"the knowledge at {kb.path} changed since it was built "
                f"(hash {kb.hash[:12]} != {self.knowledge_hash[:12]})"
            )
        return None

    # -- editing ---------------------------------------------------------------------------------
    def add_facts(
        self, facts: Iterable[Fact | dict], *, persist: bool = True, progress: bool = False
    ) -> None:
        """Add new facts (ids must be new); write them to the knowledge JSONL and the index."""
        new = [_as_fact(f, "add") for f in facts]
        seen = set(self._by_id)
        for f in new:
            if f.id in seen:
                raise RagPersonaError(f"add: field 'id': duplicate id {f.id!r} (already in the index)")
            seen.add(f.id)
        if persist:
            self._persist_knowledge(add=new)
        self._rebuild([*self.facts, *new], progress=progress)

    def update_fact(self, fact: Fact | dict, *, persist: bool = True, progress: bool = False) -> None:
        """Replace the fact with the same id (text, questions, tags, extra)."""
        fact = _as_fact(fact, "update")
        if fact.id not in self._by_id:
            raise RagPersonaError(f"update: field 'id': no fact with id {fact.id!r}")
        old = self.fact(fact.id)
        fact = replace(fact, source=old.source, line=old.line)
        if persist:
            self._persist_knowledge(update={fact.id: fact})
        self._rebuild([fact if f.id == fact.id else f for f in self.facts], progress=progress)

    def delete_facts(self, ids: Iterable[str], *, persist: bool = True) -> None:
        """Remove facts by id from the knowledge JSONL and the index."""
        ids = list(dict.fromkeys(ids))
        missing = [i for i in ids if i not in self._by_id]
        if missing:
            raise RagPersonaError(f"delete: field 'id': no fact with id {missing[0]!r}")
        if len(ids) >= len(self.facts):
            raise RagPersonaError("delete: refusing to delete every fact (an index needs at least one)")
        if persist:
            self._persist_knowledge(delete=set(ids))
        drop = set(ids)
        self._rebuild([f for f in self.facts if f.id not in drop])

    def _persist_knowledge(self, **edits) -> None:
        """Apply an edit (`edit_knowledge` keywords) to the knowledge files this index was built from."""
        src = self.source
        if src is None or not src.exists():
            return  # an index without its knowledge files: edits live in the index only
        kb = load_knowledge(src)
        if kb.hash != self.knowledge_hash:
            raise StaleIndexError(
                f"index {self.path}: the knowledge at {src} changed since the index was built; "
                f"rebuild it (rag-persona index --kb {src} --out {self.path}) before editing"
            )
        edit_knowledge(kb, **edits)

    def _rebuild(self, facts: list[Fact], *, progress: bool = False) -> None:
        """Re-index after an edit, embedding only keys that are new, and save when the store has a folder."""
        texts, owner, kinds = fact_keys(facts)
        old_rows: dict[tuple[int, str], int] = {}
        vecs = self.vectors
        old_texts, _, old_kinds = fact_keys(self.facts)
        for row, (text, kind) in enumerate(zip(old_texts, old_kinds, strict=True)):
            old_rows.setdefault((kind, text), row)
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        todo = []
        for row, (text, kind) in enumerate(zip(texts, kinds, strict=True)):
            hit = old_rows.get((kind, text))
            if hit is None:
                todo.append(row)
            else:
                vectors[row] = vecs[hit]
        if todo:
            vectors[todo] = embed_keys(
                self.embedder, [texts[i] for i in todo], [kinds[i] for i in todo], progress=progress
            )
        self.facts = facts
        self._by_id = {f.id: i for i, f in enumerate(facts)}
        self.key_fact = np.asarray(owner, dtype=np.int64)
        self.key_kind = np.asarray(kinds, dtype=np.int8)
        self.index = flat_index(vectors)
        self.manifest["knowledge_hash"] = knowledge_hash(facts)
        self.manifest["counts"] = {"facts": len(facts), "keys": len(texts)}
        self.manifest["updated"] = _now()
        if self.path is not None:
            self.save()


def _as_fact(obj: Fact | dict, where: str) -> Fact:
    if isinstance(obj, Fact):
        obj = obj.to_dict()
    if not isinstance(obj, dict):
        raise RagPersonaError(f"{where}: expected a fact object, got {type(obj).__name__}")
    return parse_fact(Path(where), 1, obj)


# -- building, saving, loading -------------------------------------------------------------------
def build_store(
    kb: KnowledgeBase | str | Path,
    embedder: Embedder | str | None = None,
    *,
    progress: bool = False,
    batch_size: int = 256,
) -> FactStore:
    """Embed a knowledge base into an in-memory `FactStore` (not saved)."""
    if not isinstance(kb, KnowledgeBase):
        kb = load_knowledge(kb)
    if embedder is None or isinstance(embedder, str):
        embedder = load_embedder(embedder or get_settings().embedder)
    texts, owner, kinds = fact_keys(kb.facts)
    started = time.perf_counter()
    vectors = embed_keys(embedder, texts, kinds, batch_size=batch_size, progress=progress, desc="indexing")
    manifest = {
        "format": INDEX_FORMAT,
        "embedder": {"name": embedder.name, "dim": int(embedder.dim)},
        "knowledge_hash": kb.hash,
        "source": str(kb.path.resolve()),
        "threshold": None,
        "threshold_mode": None,
        "thresholds": {},
        "retrieval": {},
        "created": _now(),
        "updated": _now(),
        "counts": {"facts": len(kb.facts), "keys": len(texts)},
        "build_seconds": round(time.perf_counter() - started, 3),
    }
    store = FactStore(
        facts=list(kb.facts),
        key_fact=np.asarray(owner, dtype=np.int64),
        key_kind=np.asarray(kinds, dtype=np.int8),
        index=flat_index(vectors),
        manifest=manifest,
        _embedder=embedder,
    )
    return store


def build_index(
    kb: KnowledgeBase | str | Path,
    out_dir: str | Path,
    embedder: Embedder | str | None = None,
    *,
    progress: bool = False,
    keep_threshold_from: FactStore | None = None,
) -> FactStore:
    """Build and save an index folder atomically; an existing index there is replaced only on success."""
    out_dir = Path(out_dir)
    check_replaceable(out_dir, INDEX_FILE, "an index")  # before the embedding work, not only at the save
    store = build_store(kb, embedder, progress=progress)
    if keep_threshold_from is not None:
        old = keep_threshold_from.manifest
        if canonical_embedder_name(old["embedder"]["name"]) == canonical_embedder_name(store.embedder_name):
            for key in ("threshold", "threshold_mode", "thresholds", "retrieval", "tuning"):
                if key in old:
                    store.manifest[key] = old[key]
    store.save(out_dir)
    return store


def _write_store_files(store: FactStore, folder: Path) -> None:
    """The three files of an index folder, into a (work) folder."""
    import faiss

    (folder / FACTS_FILE).write_text(facts_to_jsonl(store.facts), encoding="utf-8")
    faiss.write_index(store.index, str(folder / INDEX_FILE))
    manifest = dict(store.manifest)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, ensure_ascii=False, indent=2), encoding="utf-8")


def is_index(path: str | Path) -> bool:
    path = Path(path)
    if not path.exists() and path.parent.is_dir():
        recover_folder(path.absolute(), clean=False)  # see load_index
    return (path / MANIFEST_FILE).is_file()


def load_index(
    path: str | Path,
    *,
    check: bool = True,
    kb: KnowledgeBase | str | Path | None = None,
    embedder: str | None = None,
) -> FactStore:
    """Load an index folder; with check, refuse a stale one (knowledge or embedder changed)."""
    import faiss

    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not path.exists():
        recover_folder(
            path.absolute(), clean=False
        )  # a crash between the two renames of a swap left only `.old-`
    if not path.exists():
        raise RagPersonaError(
            f"{path}: no such index folder (build one with: rag-persona index --kb KB --out {path})"
        )
    if not manifest_path.is_file():
        raise RagPersonaError(f"{path}: not an index (no {MANIFEST_FILE}); build one with rag-persona index")
    manifest = read_json(manifest_path)
    for key in ("format", "embedder", "knowledge_hash", "counts"):
        if key not in manifest:
            raise RagPersonaError(f"{manifest_path}: field '{key}': missing")
    embedder_info = manifest["embedder"]
    if not (
        isinstance(embedder_info, dict)
        and isinstance(embedder_info.get("name"), str)
        and isinstance(embedder_info.get("dim"), int)
    ):
        raise RagPersonaError(
            f"{manifest_path}: field 'embedder': expected {{name, dim, ...}}; rebuild the index"
        )
    if manifest["format"] != INDEX_FORMAT:
        raise RagPersonaError(
            f"{manifest_path}: field 'format': index format {manifest['format']} is not {INDEX_FORMAT}; rebuild it"
        )
    facts_path = path / FACTS_FILE
    facts = [parse_fact(facts_path, line, obj) for line, obj in read_jsonl(facts_path)]
    index_path = path / INDEX_FILE
    if not index_path.is_file():
        raise RagPersonaError(f"{index_path}: missing; remove {path} and rebuild the index")
    try:
        index = faiss.read_index(str(index_path))
    except RuntimeError as exc:  # FAISS's C++ errors: a cut or foreign file
        reason = str(exc).strip().splitlines()[-1][:160]
        raise RagPersonaError(
            f"{index_path}: not a readable FAISS index ({reason}); rebuild the index"
        ) from None
    _, owner, kinds = fact_keys(facts)
    if index.ntotal != len(owner) or index.d != manifest["embedder"]["dim"]:
        raise RagPersonaError(
            f"{index_path}: holds {index.ntotal} {index.d}-d rows, expected {len(owner)} "
            f"{manifest['embedder']['dim']}-d (facts.jsonl and index disagree); rebuild the index"
        )
    store = FactStore(
        facts=facts,
        key_fact=np.asarray(owner, dtype=np.int64),
        key_kind=np.asarray(kinds, dtype=np.int8),
        index=index,
        manifest=manifest,
        path=path,
    )
    if knowledge_hash(facts) != manifest["knowledge_hash"]:
        raise RagPersonaError(
            f"{facts_path}: does not match the manifest's knowledge hash; rebuild the index"
        )
    if check:
        reason = store.stale_reason(kb, embedder)
        if reason:
            src = kb if kb is not None and not isinstance(kb, KnowledgeBase) else (store.source or "KB")
            if isinstance(kb, KnowledgeBase):
                src = kb.path
            emb = f" --embedder {embedder}" if embedder else ""
            raise StaleIndexError(
                f"index {path} is stale: {reason}; rebuild it with: rag-persona index --kb {src} --out {path}{emb}"
            )
    return store


def ensure_index(
    kb: KnowledgeBase | str | Path,
    out_dir: str | Path,
    embedder: str | None = None,
    *,
    progress: bool = False,
    log: Callable[[str], None] = lambda msg: None,
) -> FactStore:
    """Load the index at out_dir, (re)building it when missing or stale; a tuned threshold is kept."""
    out_dir = Path(out_dir)
    if not isinstance(kb, KnowledgeBase):
        try:
            kb = load_knowledge(kb)
        except RagPersonaError as exc:
            return _last_good_index(out_dir, exc, log)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = None
        if is_index(out_dir):
            try:
                old = load_index(out_dir, check=False)
            except RagPersonaError as exc:
                log(f"rebuilding {out_dir}: {exc}")
            else:
                reason = old.stale_reason(kb, embedder)
                if reason is None:
                    return old
                log(f"rebuilding {out_dir}: {reason}")
        else:
            log(f"building the index {out_dir} from {kb.path}")
        return build_index(
            kb,
            out_dir,
            embedder or (old.embedder_name if old else None),
            progress=progress,
            keep_threshold_from=old,
        )


def _last_good_index(out_dir: Path, problem: RagPersonaError, log: Callable[[str], None]) -> FactStore:
    """The index already at out_dir, served with a warning, when its source knowledge cannot be read.

    A typo in facts.jsonl must not take chat and search down while the last good index is intact:
    the store keeps the problem as `warning` (shown by /v1/health, the page and the CLI) until fixed.
    """
    if not is_index(out_dir):
        raise problem
    try:
        store = load_index(out_dir, check=False)
    except RagPersonaError:
        raise problem from None
    store.warning = (
        f"{problem}; serving the last good index ({out_dir}, {len(store)} facts, "
        f"updated {store.manifest.get('updated', '?')}) until the file is fixed"
    )
    print(f"warning: {store.warning}", file=sys.stderr)
    log(f"warning: {store.warning}")
    return store


def default_index_dir(persona: str | None = None) -> Path:
    settings = get_settings()
    return settings.indexes_dir / settings.persona_key(persona)


def default_store(persona: str | None = None, *, progress: bool = False, log=lambda msg: None) -> FactStore:
    """The default persona's index under the settings' indexes folder, built lazily from knowledge/<persona>/."""
    settings = get_settings()
    kb_dir = settings.persona_dir(persona)
    if not kb_dir.exists():
        raise RagPersonaError(
            f"{kb_dir}: no such persona folder (--persona takes an id under knowledge/ or a folder path)"
        )
    return ensure_index(kb_dir, default_index_dir(persona), settings.embedder, progress=progress, log=log)


def open_store(
    index: str | Path | None = None,
    persona: str | None = None,
    *,
    progress: bool = False,
    log=lambda msg: None,
) -> FactStore:
    """The store every command opens: the named index folder, else the persona's (default persona's) index."""
    return load_index(index) if index else default_store(persona, progress=progress, log=log)
