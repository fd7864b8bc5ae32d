"""Loading causal LMs (local folder, bundled alias) and streamed generation that reports how it ended."""

from __future__ import annotations

import pytest
import torch

from rag_persona.errors import RagPersonaError
from rag_persona.generation import GenerationSettings, ReplyStream, generate_reply
from rag_persona.generation import load_causal_lm


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


def test_reply_no_repeat_ngram_bans_only_the_replys_own_ngrams(tiny_model_dir):
    import torch

    from rag_persona.generation import GenerationSettings, ReplyNoRepeatNGram
    from rag_persona.generation import load_causal_lm

    proc = ReplyNoRepeatNGram(3)
    prompt = [5, 6, 9, 5, 6]  # the prompt's own "5 6 -> 9" must stay allowed
    assert torch.isfinite(proc(torch.tensor([prompt]), torch.zeros(1, 12))).all()  # first call: prompt only
    out = proc(torch.tensor([prompt + [5, 6, 7, 5, 6]]), torch.zeros(1, 12))
    assert out[0, 7] == float("-inf") and torch.isfinite(out[0, [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11]]).all()
    # a real greedy generation of the tiny model never repeats one of its own 3-grams
    loaded = load_causal_lm(str(tiny_model_dir), progress=lambda m: None)
    ids = loaded.tokenizer("ごきげんよう", return_tensors="pt")["input_ids"]
    settings = GenerationSettings(max_new_tokens=40, repetition_penalty=1.0, reply_no_repeat_ngram=3)
    kwargs = {**settings.to_generate_kwargs(), "min_new_tokens": 40}
    new = loaded.model.generate(ids, **kwargs)[0, ids.shape[1] :].tolist()
    grams = [tuple(new[i : i + 3]) for i in range(len(new) - 2)]
    assert len(new) == 40 and len(grams) == len(set(grams))
    plain = loaded.model.generate(
        ids,
        **{
            **GenerationSettings(max_new_tokens=40, repetition_penalty=1.0).to_generate_kwargs(),
            "min_new_tokens": 40,
        },
    )
    plain_new = plain[0, ids.shape[1] :].tolist()
    plain_grams = [tuple(plain_new[i : i + 3]) for i in range(len(plain_new) - 2)]
    assert len(plain_grams) > len(set(plain_grams))  # without it the random model does loop
