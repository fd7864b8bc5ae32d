"""Loading causal LMs (local folder, bundled alias) and streamed generation that reports how it ended."""

from __future__ import annotations

import pytest
import torch

from rag_persona.errors import RagPersonaError
from rag_persona.generation import GenerationSettings, ReplyStream, generate_reply
from rag_persona.llm import load_causal_lm


def test_local_folder_loads_as_bf16_safetensors(tiny_model_dir):
    loaded = load_causal_lm(str(tiny_model_dir), progress=lambda m: None)
    assert loaded.device == "cpu" and not loaded.quantized
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    reply = generate_reply(
        loaded, [{"role": "user", "content": "ごきげんよう"}], GenerationSettings(max_new_tokens=3)
    )
    assert reply.new_tokens <= 3 and reply.prompt_tokens > 0
    if reply.new_tokens == 3:
        assert not reply.ended_by_eos


def test_stream_yields_the_same_text_as_the_reply(tiny_model_dir):
    loaded = load_causal_lm(str(tiny_model_dir), progress=lambda m: None)
    stream = ReplyStream(loaded, [{"role": "user", "content": "hello"}], GenerationSettings(max_new_tokens=8))
    pieces = list(stream)
    assert "".join(pieces).strip() == stream.reply.text


def test_4bit_without_cuda_is_a_clear_error(tiny_model_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal is for CPU-only machines")
    with pytest.raises(RagPersonaError, match="4-bit loading needs CUDA"):
        load_causal_lm(str(tiny_model_dir), load_in_4bit=True, progress=lambda m: None)


def test_bad_model_name_is_one_line(tmp_path, tiny_model_dir):
    with pytest.raises(RagPersonaError) as err:
        load_causal_lm("not-a-model", progress=lambda m: None)
    assert "not a bundled alias" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(RagPersonaError, match="no such folder"):
        load_causal_lm(str(tiny_model_dir), adapter=str(tmp_path / "missing"), progress=lambda m: None)


@pytest.mark.slow
def test_bundled_model_answers_and_stops_at_eos(bundled_lm):
    reply = generate_reply(bundled_lm, [{"role": "user", "content": "Say hello in one short sentence."}])
    assert reply.ended_by_eos, reply
    assert reply.text and "<|im_end|>" not in reply.text
    assert next(bundled_lm.model.parameters()).dtype == torch.bfloat16
