"""Which engine runs a chat model (`--engine auto|llama.cpp|transformers|URL`), and opening it as a ChatBackend."""

from __future__ import annotations

from pathlib import Path

from rag_persona.errors import RagPersonaError
from rag_persona.generation.models import BUNDLED
from rag_persona.settings import get_settings

LLAMA_CPP, TRANSFORMERS, REMOTE, AUTO = "llama.cpp", "transformers", "remote", "auto"
ENGINE_HELP = "auto (llama.cpp for GGUF chat on CPU, transformers for xattn and CUDA), llama.cpp, transformers, or an http(s) URL of an OpenAI-compatible server"


def runs_on_llamacpp(model: str | None) -> bool:
    """llama.cpp runs GGUF files: the bundled aliases and local *.gguf paths."""
    name = model or get_settings().chat_model
    return name in BUNDLED or Path(name).suffix == ".gguf"


def choose_engine(engine: str | None = AUTO, model: str | None = None, *, xattn: bool = False) -> str:
    """The engine `auto` picks: llama.cpp for prompt mode on CPU with a GGUF model, else transformers."""
    engine = (engine or AUTO).strip()
    if engine.startswith(("http://", "https://")):
        if xattn:
            raise RagPersonaError("--engine URL: the cross-attention mode needs the transformers engine")
        return REMOTE
    if engine == AUTO:
        from rag_persona.generation.llm import cuda_available

        if xattn or cuda_available() or not runs_on_llamacpp(model):
            return TRANSFORMERS
        return LLAMA_CPP
    if engine == LLAMA_CPP and xattn:
        raise RagPersonaError("--engine llama.cpp: the cross-attention mode needs the transformers engine")
    if engine not in (LLAMA_CPP, TRANSFORMERS):
        raise RagPersonaError(f"--engine {engine!r}: expected {ENGINE_HELP}")
    return engine


def tokenizer_for(model: str | None = None, progress=lambda msg: None):
    """The HF tokenizer our prompt builder encodes with for this model (no weights loaded)."""
    from transformers import AutoTokenizer

    from rag_persona.generation.llamacpp import TOKENIZER_DIR, prepare_gguf

    name = model or get_settings().chat_model
    if name in BUNDLED:
        return AutoTokenizer.from_pretrained(str(prepare_gguf(name, progress=progress) / TOKENIZER_DIR))
    path = Path(name)
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(name, trust_remote_code=False)


def open_engine(
    engine: str | None = AUTO,
    model: str | None = None,
    *,
    adapter: str | None = None,
    remote_model: str | None = None,
    progress=lambda msg: None,
):
    """A ChatBackend for prompt-mode chat: the model (alias, path or id) with its adapter on the chosen engine."""
    kind = choose_engine(engine, model)
    if kind == LLAMA_CPP:
        from rag_persona.generation.llamacpp import load_llamacpp

        return load_llamacpp(model, adapter=adapter, progress=progress)
    if kind == REMOTE:
        from rag_persona.generation.remote import RemoteBackend

        if adapter:
            progress(
                f"remote engine: adapter {adapter} is the server's business (load it there); not applied here"
            )
        return RemoteBackend(url=engine, tokenizer=tokenizer_for(model, progress), model=remote_model)
    from rag_persona.generation.hf_engine import TransformersBackend
    from rag_persona.generation.llm import load_causal_lm

    return TransformersBackend(load_causal_lm(model, adapter=adapter, progress=progress))
