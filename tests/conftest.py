"""Shared fixtures: tiny tokenizers and random-weight models built in the test, and the bundled model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "ごきげんよう。わたくしは小野寺絢音ですわ。",
    "お会いできて嬉しいですわ。紅茶はいかがですの？",
    "名前は小野寺絢音。趣味はピアノと乗馬。",
    "hello world, this is a tiny tokenizer for tests.",
    "user assistant system </s> <s>",
]


def make_tokenizer(eos_token: str = "<|im_end|>", vocab_size: int = 300, split_eos_text: bool = False):
    """A small byte-level BPE tokenizer with a chat template; eos is a registered special token.

    With split_eos_text=True the eos keeps its own id but its literal text in a string is tokenised as
    ordinary pieces (as "</s>" on Llama-2/ELYZA tokenizers): make_tokenizer("</s>", split_eos_text=True).
    The chat markers stay single tokens so the chat template still works.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    if eos_token not in specials:
        specials.append(eos_token)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    if split_eos_text:
        markers = [s for s in specials if s not in (eos_token, "<|endoftext|>")]
        tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in markers])
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token=eos_token, pad_token="<|endoftext|>", split_special_tokens=True
        )
        fast.chat_template = CHAT_TEMPLATE
        return fast
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos_token,
        pad_token="<|endoftext|>",
        additional_special_tokens=[s for s in specials if s not in (eos_token, "<|endoftext|>")],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(tokenizer, **overrides) -> dict:
    """Config fields of the tiny random test models: 2 layers, hidden 32, grouped-query attention."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
        **overrides,
    }


def make_tiny_qwen2(tokenizer, seed: int = 0, **overrides):
    """A 2-layer Qwen2 causal LM with random weights sized to the tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**tiny_config(tokenizer, **overrides)))


def make_tiny_llama(tokenizer, seed: int = 0):
    """A 3-layer Llama causal LM with random weights and no BOS token (the other supported layer family)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**tiny_config(tokenizer, num_hidden_layers=3, bos_token_id=None)))


@pytest.fixture
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer) -> Path:
    model = make_tiny_qwen2(tiny_tokenizer)
    out = tmp_path / "tiny-qwen2"
    model.save_pretrained(out, safe_serialization=True)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def bundled_model_dir() -> Path:
    """The bundled 0.5B converted once per RAG_PERSONA_HOME (about a minute the first time)."""
    from rag_persona.generation import prepare

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return prepare("qwen2.5-coder-0.5b")


@pytest.fixture(scope="session")
def bundled_lm(bundled_model_dir):
    from rag_persona.generation import load_causal_lm

    return load_causal_lm(str(bundled_model_dir), progress=lambda m: None)


@pytest.fixture(scope="session")
def persona_index(tmp_path_factory) -> Path:
    """The persona's knowledge copied to tmp and indexed with e5 once per session (API and browser tests)."""
    import shutil

    from rag_persona.retrieval.store import ensure_index
    from rag_persona.settings import KNOWLEDGE_ROOT

    base = tmp_path_factory.getbasetemp()
    kb = base / "ui-persona-kb"
    if not kb.exists():
        shutil.copytree(KNOWLEDGE_ROOT / "ojousama", kb)
    ensure_index(kb, base / "ui-persona-index", "e5-small")
    return base / "ui-persona-index"


@pytest.fixture(scope="session")
def persona_store(persona_index):
    """The indexed persona knowledge, loaded once (API, fault and browser tests)."""
    from rag_persona.retrieval.store import load_index

    return load_index(persona_index)


@pytest.fixture(scope="session")
def persona():
    from rag_persona.prompts import Persona
    from rag_persona.settings import KNOWLEDGE_ROOT

    return Persona.load(KNOWLEDGE_ROOT / "ojousama")


def stop_process(proc, log=None, timeout: float = 15) -> None:
    """Stop a server started by a test: terminate, kill if it hangs, close its log file."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
    if log is not None:
        log.close()
