"""The shipped role-play adapter: the default for every persona without its own, and it moves a card's register."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rag_persona.evaluation.evaluate import (
    ADAPTER_MANIFEST,
    ADAPTERS_ROOT,
    ANY_PERSONA,
    default_adapter,
    run_evaluation,
)
from rag_persona.knowledge.cards import card_to_persona, load_card
from rag_persona.utils.io import file_sha256

ROLEPLAY = ADAPTERS_ROOT / "roleplay-qwen2.5-coder-0.5b"
CARDS = Path(__file__).parent / "data" / "cards"
# A card in a register no training persona speaks (オネエ言葉); each question's answer holds the snippet.
ONEE_QUESTIONS = json.loads((CARDS / "questions.json").read_text(encoding="utf-8"))["onee_bar"]


def test_the_roleplay_adapter_serves_personas_without_their_own(tmp_path, monkeypatch):
    monkeypatch.delenv("RAG_PERSONA_CHAT_ADAPTER", raising=False)
    info = json.loads((ROLEPLAY / ADAPTER_MANIFEST).read_text(encoding="utf-8"))
    assert info["persona"] == ANY_PERSONA and info["default"] and info["base_model"] == "qwen2.5-coder-0.5b"
    assert info["adapter_sha256"] == file_sha256(ROLEPLAY / "adapter_model.safetensors")
    assert (ROLEPLAY / info["gguf_lora"]).is_file()  # llama.cpp applies it without a conversion
    card = tmp_path / "onee"
    card_to_persona(load_card(CARDS / "onee_bar.json"), card)
    assert default_adapter(None, str(card)) == str(ROLEPLAY)
    assert default_adapter(None, "kansai") == str(ROLEPLAY)
    assert default_adapter(None, "ojousama") == str(ADAPTERS_ROOT / "ojousama-qwen2.5-coder-0.5b-v2op")


@pytest.mark.slow
def test_an_unseen_register_is_spoken_with_the_roleplay_adapter_and_not_without(tmp_path):
    card = tmp_path / "onee"
    card_to_persona(load_card(CARDS / "onee_bar.json"), card)
    facts = [json.loads(x) for x in (card / "facts.jsonl").read_text(encoding="utf-8").splitlines()]
    rows = [
        {"query": q, "golden_ids": [f["id"] for f in facts if snippet in f["text"]], "kind": "fact"}
        for q, snippet in ONEE_QUESTIONS
    ]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    styles = {}
    for adapter in ("none", str(ROLEPLAY)):
        report = run_evaluation(prompts, adapter=adapter, persona=str(card), engine="llama.cpp")
        styles[adapter] = report["summary"]["style_rate"]
        assert report["summary"]["foreign_register_rate"] == 0.0
        if adapter != "none":
            # EOS is the shipped adapter's bar. The bare base model ran on past max tokens in 1 of 6 replies
            # on an AVX2-only CPU (llama.cpp's kernels differ by CPU), and ended all 6 on an AMX one.
            assert report["summary"]["eos_rate"] == 1.0
    # measured: 0/6 replies in the card's register on the base model, 4/6 with the adapter (first pass: 5/6)
    assert styles[str(ROLEPLAY)] >= styles["none"] + 0.5, styles
