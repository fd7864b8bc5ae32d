"""The package's own API (`import rag_persona as rp`): cheap to import, and one persona turn through it."""

from __future__ import annotations

import subprocess
import sys

import pytest

import rag_persona as rp
from rag_persona.settings import KNOWLEDGE_ROOT


def test_import_is_cheap_and_names_load_on_first_use():
    code = (
        "import sys, rag_persona as rp\n"
        "heavy = {'numpy', 'torch', 'faiss', 'transformers', 'typer', 'sudachipy'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
        "rp.Retriever\n"
        "print('numpy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["[]", "True"]


def test_every_public_name_resolves():
    for name in rp.__all__:
        assert getattr(rp, name) is not None, name
    assert set(rp.__all__) <= set(dir(rp))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        rp.nope  # noqa: B018


def test_load_persona_by_name_or_path():
    by_name = rp.load_persona("ojousama")
    assert by_name == rp.load_persona() == rp.load_persona(KNOWLEDGE_ROOT / "ojousama")
    assert by_name.name == "小野寺絢音"
    with pytest.raises(rp.RagPersonaError, match="no-such-persona: no such persona folder"):
        rp.load_persona(KNOWLEDGE_ROOT / "no-such-persona")


def test_one_turn_through_the_public_api(persona_index, tiny_model_dir):
    persona = rp.load_persona()
    store = rp.open_store(persona_index)
    assert isinstance(store, rp.FactStore) and len(store) > 0
    retriever = rp.retriever_for(store, mode="hybrid")
    assert isinstance(retriever, rp.Retriever)
    hits = retriever.search("あなたの名前はなんですか?")
    assert hits and isinstance(hits[0], rp.Hit) and hits[0].fact_id == "profile-name"

    facts = rp.retrieve_context(retriever, "あなたの名前はなんですか?")
    assert [f.id for f in facts] == [h.fact_id for h in hits]
    messages = rp.build_messages(persona, facts, [], "あなたの名前はなんですか?")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert hits[0].text in messages[0]["content"]

    loaded = rp.load_causal_lm(str(tiny_model_dir), progress=lambda m: None)
    chat = rp.PersonaChat(persona, retriever, loaded, rp.GenerationSettings(max_new_tokens=4))
    turn = chat.respond([], "あなたの名前はなんですか?")
    assert turn.plan.messages == messages
    assert 0 < turn.reply.new_tokens <= 4
