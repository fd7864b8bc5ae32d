"""Shared fixtures: tiny tokenizers and random-weight models built in the test, and the bundled model;
helpers that run the CLI in this process."""

from __future__ import annotations

import json
import os
import types
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


def tiny_training_folders(
    root: Path, facts: list[dict], persona: dict, *, kb: str = "knowledge", background: str = "", **model
) -> types.SimpleNamespace:
    """Under root: a tiny Qwen2 (`model`: config overrides) in tiny/, a persona folder in `kb` (facts.jsonl,
    persona.json, background.md when given) and test_train's SFT and DPO chat rows in data/."""
    from test_train import write_chat_data, write_jsonl

    tok = make_tokenizer()
    make_tiny_qwen2(tok, **model).save_pretrained(root / "tiny", safe_serialization=True)
    tok.save_pretrained(root / "tiny")
    knowledge = root / kb
    knowledge.mkdir(parents=True)
    write_jsonl(knowledge / "facts.jsonl", facts)
    (knowledge / "persona.json").write_text(json.dumps(persona, ensure_ascii=False), encoding="utf-8")
    if background:
        (knowledge / "background.md").write_text(background, encoding="utf-8")
    write_chat_data(root / "data")
    return types.SimpleNamespace(
        root=root, model=str(root / "tiny"), kb=knowledge, data=root / "data", tok=tok
    )


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


@pytest.fixture(scope="module")
def echo_server(persona_store, persona):
    """The API on a free port over the persona's index, answered by test_api's echo model (one per module)."""
    from test_api import Server, echo_engine

    holder: dict = {}
    engine = echo_engine(persona_store, persona, holder=holder)
    with Server(engine) as server:
        server.engine, server.lm = engine, holder["lm"]
        yield server


def tiny_model_args(model_dir: Path, max_new_tokens: int) -> list[str]:
    """CLI options for a chat on the tiny random model with no adapter, cut at a few tokens."""
    return ["--model", str(model_dir), "--adapter", "none", "--max-new-tokens", str(max_new_tokens)]


def run_cli(*args):
    """`rag-persona ARGS` in this process (typer's CliRunner); asserts it exited 0, returns its result."""
    from typer.testing import CliRunner

    from rag_persona.cli.app import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def cli_json(*args) -> dict:
    """The JSON object a `rag-persona ARGS --json` printed (from its first '{', after any library output)."""
    out = run_cli(*args).stdout
    return json.loads(out[out.index("{") :])


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
