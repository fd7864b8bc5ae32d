"""Loading causal LMs (local folder, bundled alias) and streamed generation that reports how it ended."""

from __future__ import annotations

import pytest
import torch

from rag_persona.errors import RagPersonaError
from rag_persona.generation import (
    GenerationSettings,
    ReplyStream,
    compute_dtype,
    encode_messages,
    generate_reply,
    load_causal_lm,
)
from rag_persona.utils.hardware import cpu_dtype, cpuinfo_has_bf16, native_bf16


def test_local_folder_loads_in_the_cpus_dtype(tiny_model_dir):
    loaded = load_causal_lm(str(tiny_model_dir), progress=lambda m: None)
    assert loaded.device == "cpu" and not loaded.quantized
    assert next(loaded.model.parameters()).dtype == compute_dtype("cpu")
    assert loaded.dtype == str(compute_dtype("cpu")).removeprefix("torch.")
    messages = [{"role": "user", "content": "ごきげんよう"}]
    reply = generate_reply(loaded, messages, GenerationSettings(max_new_tokens=3))
    # The tiny random model never says its EOS in 3 greedy tokens: the token limit ends the reply.
    assert reply.new_tokens == 3 and not reply.ended_by_eos and reply.prompt_tokens > 0
    # Declare its first greedy token an EOS of the model: the reply now stops there, ended by EOS.
    ids = encode_messages(loaded.tokenizer, messages)
    first_id = int(
        loaded.model.generate(ids, **GenerationSettings(max_new_tokens=1).to_generate_kwargs())[0, -1]
    )
    loaded.model.generation_config.eos_token_id = [loaded.tokenizer.eos_token_id, first_id]
    stopped = generate_reply(loaded, messages, GenerationSettings(max_new_tokens=3))
    assert stopped.new_tokens == 1 and stopped.ended_by_eos


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
    with pytest.raises(RagPersonaError, match="not a peft adapter folder"):
        load_causal_lm(str(tiny_model_dir), adapter=str(tmp_path), progress=lambda m: None)
    # a folder with a config but a tokenizer file that is not one: transformers raises ValueError
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer_config.json"):
        (broken / name).write_text((tiny_model_dir / name).read_text())
    (broken / "tokenizer.json").write_text("{}")
    with pytest.raises(RagPersonaError, match=r"broken: cannot load") as err:
        load_causal_lm(str(broken), progress=lambda m: None)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_bundled_model_answers_and_stops_at_eos(bundled_lm):
    reply = generate_reply(bundled_lm, [{"role": "user", "content": "Say hello in one short sentence."}])
    assert reply.ended_by_eos, reply
    assert reply.text and "<|im_end|>" not in reply.text
    assert next(bundled_lm.model.parameters()).dtype == compute_dtype("cpu")


def test_cpu_dtype_follows_the_cpus_bf16_instructions(monkeypatch, tiny_model_dir):
    # Emulated bf16 matmuls are ~36x slower than fp32 on an AVX2-only CPU: auto picks bf16 only with native support.
    assert cpuinfo_has_bf16("flags : fpu avx2 avx512f avx512_bf16", "x86_64")
    assert cpuinfo_has_bf16("flags : avx512f amx_bf16 amx_tile", "x86_64")
    assert not cpuinfo_has_bf16("flags : fpu sse4_2 avx2 fma avx512f", "x86_64")
    assert cpuinfo_has_bf16("Features : fp asimd sve bf16 i8mm", "aarch64")
    assert not cpuinfo_has_bf16("Features : fp asimd sve i8mm", "aarch64")
    assert compute_dtype("cuda") == torch.bfloat16
    monkeypatch.delenv("RAG_PERSONA_DTYPE", raising=False)
    assert compute_dtype("cpu") == (torch.bfloat16 if native_bf16() else torch.float32)  # auto by default
    monkeypatch.setenv("RAG_PERSONA_DTYPE", "auto")
    assert cpu_dtype() == (torch.bfloat16 if native_bf16() else torch.float32) == compute_dtype("cpu")
    monkeypatch.setenv("RAG_PERSONA_DTYPE", "float32")
    assert cpu_dtype() == torch.float32 and compute_dtype("cpu") == torch.float32
    loaded = load_causal_lm(str(tiny_model_dir), progress=lambda m: None)
    assert next(loaded.model.parameters()).dtype == torch.float32 and loaded.dtype == "float32"
    monkeypatch.setenv("RAG_PERSONA_DTYPE", "bfloat16")
    loaded = load_causal_lm(str(tiny_model_dir), progress=lambda m: None)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16 and loaded.dtype == "bfloat16"
    monkeypatch.setenv("RAG_PERSONA_DTYPE", "fp8")
    with pytest.raises(RagPersonaError, match="RAG_PERSONA_DTYPE='fp8': expected float32, bfloat16 or auto"):
        load_causal_lm(str(tiny_model_dir), progress=lambda m: None)


def _generate_exactly(model, ids, settings: GenerationSettings, n: int) -> list[int]:
    """The n new ids `generate` makes with these settings (EOS held off until n, as `min_new_tokens` does)."""
    kwargs = settings.to_generate_kwargs()
    kwargs["generation_config"].min_new_tokens = n
    return model.generate(ids, **kwargs)[0, ids.shape[1] :].tolist()


def test_reply_no_repeat_ngram_bans_only_the_replys_own_ngrams(tiny_model_dir):
    from rag_persona.generation import ReplyNoRepeatNGram

    proc = ReplyNoRepeatNGram(3)
    prompt = [5, 6, 9, 5, 6]  # the prompt's own "5 6 -> 9" must stay allowed
    assert torch.isfinite(proc(torch.tensor([prompt]), torch.zeros(1, 12))).all()  # first call: prompt only
    out = proc(torch.tensor([prompt + [5, 6, 7, 5, 6]]), torch.zeros(1, 12))
    assert out[0, 7] == float("-inf") and torch.isfinite(out[0, [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11]]).all()
    # a real greedy generation of the tiny model never repeats one of its own 3-grams
    loaded = load_causal_lm(str(tiny_model_dir), progress=lambda m: None)
    ids = loaded.tokenizer("ごきげんよう", return_tensors="pt")["input_ids"]
    settings = GenerationSettings(max_new_tokens=40, repetition_penalty=1.0, reply_no_repeat_ngram=3)
    new = _generate_exactly(loaded.model, ids, settings, 40)
    grams = [tuple(new[i : i + 3]) for i in range(len(new) - 2)]
    assert len(new) == 40 and len(grams) == len(set(grams))
    plain_new = _generate_exactly(
        loaded.model, ids, GenerationSettings(max_new_tokens=40, repetition_penalty=1.0), 40
    )
    plain_grams = [tuple(plain_new[i : i + 3]) for i in range(len(plain_new) - 2)]
    assert len(plain_grams) > len(set(plain_grams))  # without it the random model does loop


def _banned_by_definition(reply: list[int], n: int) -> set[int]:
    """The rule spelled out: every token that follows an earlier occurrence of the reply's last n-1 tokens."""
    if len(reply) < n:
        return set()
    tail = reply[len(reply) - n + 1 :]
    return {reply[i + n - 1] for i in range(len(reply) - n + 1) if reply[i : i + n - 1] == tail}


@pytest.mark.parametrize("n", [2, 3, 4])
def test_reply_no_repeat_ngram_matches_its_definition_for_every_row(n):
    from rag_persona.generation import ReplyNoRepeatNGram

    gen = torch.Generator().manual_seed(n)
    batch, vocab, prompt_len = 3, 6, 4
    ids = torch.randint(0, vocab, (batch, prompt_len + 25), generator=gen)
    proc = ReplyNoRepeatNGram(n)
    for t in range(prompt_len, ids.shape[1] + 1):
        scores = torch.randn(batch, vocab, generator=gen)
        out = proc(ids[:, :t], scores.clone())
        for row in range(batch):
            banned = _banned_by_definition(ids[row, prompt_len:t].tolist(), n)
            assert {i for i in range(vocab) if out[row, i] == float("-inf")} == banned
            kept = [i for i in range(vocab) if i not in banned]
            assert torch.equal(out[row, kept], scores[row, kept])
    with pytest.raises(RagPersonaError, match="at least 2"):
        ReplyNoRepeatNGram(1)


def test_settings_are_one_generation_config():
    greedy = GenerationSettings(max_new_tokens=7, repetition_penalty=1.2)
    config = greedy.generation_config(eos_token_id=[3, 4])
    assert (config.max_new_tokens, config.repetition_penalty, config.do_sample) == (7, 1.2, False)
    assert config.eos_token_id == [3, 4] and config.temperature is None  # greedy never reads sampling fields
    sampled = GenerationSettings(do_sample=True, temperature=0.5, top_p=0.8).generation_config()
    assert (sampled.do_sample, sampled.temperature, sampled.top_p) == (True, 0.5, 0.8)
    assert GenerationSettings().to_dict() == {
        "max_new_tokens": 96,
        "do_sample": False,
        "temperature": 0.7,
        "top_p": 0.9,
        "repetition_penalty": 1.05,
        "reply_no_repeat_ngram": 4,
        "seed": None,
    }
    kwargs = GenerationSettings(reply_no_repeat_ngram=0).to_generate_kwargs()
    assert kwargs["generation_config"].max_new_tokens == 96 and len(kwargs["logits_processor"]) == 0
