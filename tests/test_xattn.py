"""Cross-attention context injection: mechanics on tiny random Qwen2 and Llama models."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_qwen2, make_tokenizer

from rag_persona.errors import RagPersonaError
from rag_persona.prompts import ContextFact
from rag_persona.xattn import (
    WEIGHTS_FILE,
    XattnConfig,
    XattnModel,
    XattnReplyStream,
    encodings_for,
    load_or_build_encodings,
    read_weights,
)
from rag_persona.xattn.memory import cache_path
from rag_persona.xattn.model import model_fingerprint

FACTS = [
    ContextFact("profile-name", "名前は小野寺絢音（おのでら あやね）。"),
    ContextFact("likes-tea", "好きな飲み物はダージリンの紅茶。"),
    ContextFact("hobby", "趣味はピアノと乗馬。"),
]
PROMPT = [
    {"role": "system", "content": "お嬢様らしく話してください。"},
    {"role": "user", "content": "お名前は？"},
]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(params=["qwen2", "llama"])
def base(request, tok):
    model = make_tiny_qwen2(tok) if request.param == "qwen2" else make_tiny_llama(tok)
    return model.eval()


def prompt_ids(tok):
    return tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]


def wrap(base, **cfg) -> XattnModel:
    n = base.config.num_hidden_layers
    return XattnModel(base, XattnConfig(layers=cfg.pop("layers", list(range(n))), rank=4, **cfg))


def activate(x: XattnModel, seed: int = 1) -> None:
    """Make the blocks do something, as training would: open the gates, give the deltas weight."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in x.named_parameters():
            if name.endswith(".gate"):
                p.fill_(0.8)
            elif name.endswith(".b"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def memory_of(x, tok, facts=FACTS):
    encs = x.encode_facts(tok, [f.text for f in facts])
    return x.memory_for([encs], [[f.id for f in facts]])


def test_init_logits_equal_base(base, tok):
    ids = prompt_ids(tok)
    with torch.no_grad():
        expected = base(input_ids=ids).logits.clone()
    x = wrap(base)
    memory = memory_of(x, tok)
    assert memory.tokens > 10
    with torch.no_grad():
        got = x(input_ids=ids, memory=memory).logits
    assert torch.equal(got, expected)
    # The memory does reach the blocks: open the gates and the logits move.
    activate(x)
    with torch.no_grad():
        moved = x(input_ids=ids, memory=memory).logits
        without = x(input_ids=ids, memory=None).logits
    assert (moved - expected).abs().max() > 1e-3
    assert torch.equal(without, expected)  # no memory: the base model exactly


def test_gradients_only_in_cross_attention(base, tok):
    x = wrap(base)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    memory = memory_of(x, tok)
    ids = prompt_ids(tok)
    labels = ids.clone()
    labels[:, :-4] = -100
    opt = torch.optim.AdamW(x.parameters(), lr=1e-2)
    x.train()
    for _ in range(3):  # gate first, then B (needs tanh(gate) != 0), then A (needs B != 0)
        opt.zero_grad(set_to_none=True)
        loss = x(input_ids=ids, labels=labels, memory=memory).loss
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    x(input_ids=ids, labels=labels, memory=memory).loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in base.parameters())
    named = dict(x.named_parameters())
    assert named and all(p.grad is not None and p.grad.abs().sum() > 0 for p in named.values()), [
        n for n, p in named.items() if p.grad is None or p.grad.abs().sum() == 0
    ]
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert any(abs(g) > 0 for g in x.gates().values())
    # Trainable parameters are exactly the blocks' (the base is held, not registered).
    assert set(x.state_dict()) == set(named)
    assert all(k.startswith("blocks.") for k in named)


@pytest.mark.parametrize("after_system_turn", [False, True])
def test_generate_same_tokens_with_and_without_kv_cache(base, tok, after_system_turn):
    from rag_persona.xattn import system_prefix_ids

    x = wrap(base)
    activate(x)
    start = len(system_prefix_ids(tok, PROMPT)) if after_system_turn else 0
    memory = x.memory_for([x.encode_facts(tok, [f.text for f in FACTS])], start=start)
    ids = prompt_ids(tok)
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.inference_mode():
        mask = torch.ones_like(ids)
        cached = x.generate(input_ids=ids, attention_mask=mask, memory=memory, use_cache=True, **kwargs)
        fresh = x.generate(input_ids=ids, attention_mask=mask, memory=memory, use_cache=False, **kwargs)
        plain = base.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert cached.shape[1] == ids.shape[1] + 12
    assert torch.equal(cached, fresh)
    assert not torch.equal(cached, plain)  # the memory changed what was generated
    assert x._memory is None  # memory is released after generate


def test_cached_and_fresh_encodings_give_same_logits(base, tok, tmp_path):
    x = wrap(base)
    activate(x)
    index = tmp_path / "index"
    first = load_or_build_encodings(x, tok, FACTS, index, knowledge_hash="k1")
    assert first.computed == len(FACTS) and first.path.is_file()
    assert first.path.parent == index / "xattn"
    again = load_or_build_encodings(x, tok, FACTS, index, knowledge_hash="k1")
    assert again.computed == 0
    fresh = x.encode_facts(tok, [f.text for f in FACTS])
    cached = encodings_for(x, tok, FACTS, again)
    for a, b in zip(fresh, cached, strict=True):
        assert torch.equal(a, b)
    ids = prompt_ids(tok)
    with torch.no_grad():
        lf = x(input_ids=ids, memory=x.memory_for([fresh])).logits
        lc = x(input_ids=ids, memory=x.memory_for([cached])).logits
    assert torch.equal(lf, lc)
    # An edited fact is re-encoded; the others come from the cache.
    edited = [FACTS[0], ContextFact("likes-tea", "好きな飲み物はアッサムのミルクティー。"), FACTS[2]]
    third = load_or_build_encodings(x, tok, edited, index)
    assert third.computed == 1
    assert not torch.equal(third.by_id["likes-tea"], first.by_id["likes-tea"])


def test_cache_refuses_another_model(tok, tmp_path):
    index = tmp_path / "index"
    x1 = wrap(make_tiny_qwen2(tok, seed=0))
    x2 = wrap(make_tiny_qwen2(tok, seed=1))
    a = load_or_build_encodings(x1, tok, FACTS, index)
    b = load_or_build_encodings(x2, tok, FACTS, index)
    assert a.path != b.path and b.computed == len(FACTS)
    a.path.write_bytes(b"not safetensors")  # a damaged cache is recomputed, never trusted
    assert load_or_build_encodings(x1, tok, FACTS, index).computed == len(FACTS)


def test_fingerprint_is_the_weights_not_the_dtype_they_are_held_in(tok, tmp_path):
    # A bf16 base loads as float32 on CPUs without native bf16: a shipped adapter must still accept it.
    bf16 = make_tiny_qwen2(tok, seed=0).to(torch.bfloat16)
    fp32 = make_tiny_qwen2(tok, seed=0).to(torch.bfloat16).float()
    fp32.config.dtype = torch.float32
    assert model_fingerprint(bf16) == model_fingerprint(fp32)
    other = make_tiny_qwen2(tok, seed=0).to(torch.bfloat16).float()
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.view(-1)[0] += 1.0
    assert model_fingerprint(other) != model_fingerprint(fp32)
    # ...but its fact encodings are cached apart: the two dtypes compute different values.
    assert cache_path(tmp_path, wrap(bf16)) != cache_path(tmp_path, wrap(fp32))


def test_batched_memory_matches_single_items(tok):
    base = make_tiny_qwen2(tok).eval()
    x = wrap(base)
    activate(x)
    encs = x.encode_facts(tok, [f.text for f in FACTS])
    ids = prompt_ids(tok)
    batch = x.memory_for([encs[:1], encs, []])
    with torch.no_grad():
        together = x(input_ids=ids.repeat(3, 1), memory=batch).logits
        one = x(input_ids=ids, memory=x.memory_for([encs[:1]])).logits
        three = x(input_ids=ids, memory=x.memory_for([encs])).logits
        none = base(input_ids=ids).logits
    torch.testing.assert_close(together[0:1], one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together[1:2], three, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together[2:3], none, rtol=1e-5, atol=1e-5)
    # Memory order does not matter: cross-attention has no positions.
    with torch.no_grad():
        shuffled = x(input_ids=ids, memory=x.memory_for([encs[::-1]])).logits
    torch.testing.assert_close(shuffled, three, rtol=1e-5, atol=1e-5)


def test_save_load_roundtrip_is_one_small_file(tok, tmp_path):
    base = make_tiny_qwen2(tok).eval()
    x = wrap(base, layers=[1])
    activate(x)
    memory = memory_of(x, tok)
    ids = prompt_ids(tok)
    with torch.no_grad():
        expected = x(input_ids=ids, memory=memory).logits
    path = x.save(tmp_path / "w", extra={"steps": 3})
    assert path.name == WEIGHTS_FILE and [p.name for p in path.parent.iterdir()] == [WEIGHTS_FILE]
    config, tensors = read_weights(path.parent)
    assert config.layers == [1] and config.trained == {"steps": 3}
    assert set(tensors) == set(x.state_dict())
    x.remove_hooks()
    y = XattnModel.load(base, path.parent)
    with torch.no_grad():
        got = y(input_ids=ids, memory=y.memory_for([y.encode_facts(tok, [f.text for f in FACTS])])).logits
    assert torch.equal(got, expected)
    y.remove_hooks()
    with pytest.raises(RagPersonaError, match="another base model"):
        XattnModel.load(make_tiny_qwen2(tok, seed=5), path.parent)
    with pytest.raises(RagPersonaError, match="no cross-attention weights"):
        read_weights(tmp_path / "nowhere")


def test_reply_stream_holds_memory_only_while_generating(tok):
    from rag_persona.generation import GenerationSettings, ReplyStream
    from rag_persona.xattn import system_prefix_ids

    base = make_tiny_qwen2(tok).eval()
    x = wrap(base)
    activate(x)
    memory = memory_of(x, tok)
    assert memory.start is None  # "after the system turn", resolved from the prompt by the stream
    loaded = SimpleNamespace(model=base, tokenizer=tok)
    settings = GenerationSettings(max_new_tokens=8, repetition_penalty=1.0, reply_no_repeat_ngram=0)
    stream = XattnReplyStream(loaded, PROMPT, settings, xmodel=x, memory=memory)
    text = "".join(stream)
    head = system_prefix_ids(tok, PROMPT)
    assert stream.memory.start == len(head) > 0
    assert x._memory is None and stream.reply is not None
    plain = ReplyStream(loaded, PROMPT, settings)
    plain_text = "".join(plain)
    with torch.inference_mode():
        ids = prompt_ids(tok)
        direct = x.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            memory=x.memory_for([x.encode_facts(tok, [f.text for f in FACTS])], start=len(head)),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    assert text == tok.decode(direct[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert text != plain_text


def test_peft_wrapped_base_runs_with_its_adapter_off(tok, tmp_path):
    """The chat shares one model that may carry the SFT LoRA: xattn uses the base weights underneath."""
    from peft import LoraConfig, get_peft_model

    base = make_tiny_qwen2(tok).eval()
    x = wrap(base)
    activate(x)
    ids = prompt_ids(tok)
    memory = memory_of(x, tok)
    with torch.no_grad():
        expected = x(input_ids=ids, memory=memory).logits
    x.save(tmp_path / "w")
    fingerprint = x.fingerprint
    x.remove_hooks()
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # a trained adapter: it changes the model's output
        with_adapter = peft_model(input_ids=ids).logits
    y = XattnModel.load(peft_model, tmp_path / "w")
    assert y.fingerprint == fingerprint
    with torch.no_grad():
        got = y(input_ids=ids, memory=memory).logits
        after = peft_model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (with_adapter - expected).abs().max() > 1e-3
    assert torch.equal(after, with_adapter)  # the adapter is back on outside this mode


def test_rejects_models_without_llama_layers(tok):
    with pytest.raises(RagPersonaError, match="model.layers"):
        XattnModel(torch.nn.Linear(2, 2))
    with pytest.raises(RagPersonaError, match="layer 7 does not exist"):
        XattnModel(make_tiny_qwen2(tok), XattnConfig(layers=[7]))


def _sft_row(persona, facts, user, answer, golden, history=()):
    from rag_persona.prompts import build_messages

    ctx = [ContextFact(i, facts[i], s) for i, s in golden]
    return {
        "id": user,
        "prompt": build_messages(persona, ctx, list(history), user),
        "completion": [{"role": "assistant", "content": answer}],
        "context_ids": [c.id for c in ctx],
        "context_scores": [c.score for c in ctx],
        "golden_ids": [golden[0][0]] if golden else [],
    }


def test_training_rows_move_the_context_into_memory():
    from rag_persona.chat import default_persona
    from rag_persona.knowledge.facts import load_knowledge
    from rag_persona.prompts import build_messages
    from rag_persona.settings import get_settings
    from training.stages.xattn import strip_context

    persona = default_persona()
    facts = {f.id: f.text for f in load_knowledge(get_settings().persona_dir()).facts}
    history = [
        {"role": "user", "content": "ごきげんよう"},
        {"role": "assistant", "content": "ごきげんようですわ。"},
    ]
    row = _sft_row(
        persona,
        facts,
        "お名前は？",
        "小野寺絢音ですわ。",
        [("profile-age", 0.7), ("profile-name", 0.9)],
        history,
    )
    ex = strip_context(row, persona, facts, "row")
    assert ex.messages == build_messages(persona, [], history, "お名前は？", include_context=False)
    assert ex.messages[1:] == row["prompt"][1:] and facts["profile-name"] in row["prompt"][0]["content"]
    assert all(facts[i] not in ex.messages[0]["content"] for i in ex.fact_ids)
    assert ex.fact_ids == ["profile-age", "profile-name"] and ex.completion == "小野寺絢音ですわ。"
    row["prompt"][0]["content"] += "x"
    with pytest.raises(RagPersonaError, match="rebuild the data"):
        strip_context(row, persona, facts, "row")


def test_copy_rows_say_the_fact_back_with_it_in_memory():
    import random

    from rag_persona.chat import default_persona
    from rag_persona.knowledge.facts import Fact
    from rag_persona.prompts import build_messages
    from training.stages.xattn import copy_examples

    persona = default_persona()
    facts = [
        Fact("a", "好きな花はすずらん。", ["好きな花は？"]),
        Fact("b", "愛馬はブランシュ。", ["馬の名前は？", "愛馬は？"]),
        Fact("c", "身長は158センチ。"),  # no question: never asked, only a distractor
    ]
    rows = copy_examples(facts, persona, 4, 1, random.Random(0))
    assert [r.golden_ids for r in rows] == [["a"], ["b"], ["a"], ["b"]]
    for r in rows:
        fact = next(f for f in facts if f.id == r.golden_ids[0])
        assert r.messages == build_messages(persona, [], [], r.messages[-1]["content"], include_context=False)
        assert r.messages[-1]["content"] in fact.questions
        assert fact.text.rstrip("。") in r.completion and r.completion.endswith("ですわ。")
        assert len(r.fact_ids) == 2 and fact.id in r.fact_ids


def test_train_xattn_tiny_run_saves_only_cross_attention(tiny_model_dir, tmp_path):
    import json

    from rag_persona.chat import default_persona
    from rag_persona.knowledge.facts import load_knowledge
    from rag_persona.settings import get_settings
    from training.recipes import load_recipe
    from training.stages import train

    persona = default_persona()
    facts = {f.id: f.text for f in load_knowledge(get_settings().persona_dir()).facts}
    rows = [
        _sft_row(persona, facts, "お名前は？", "小野寺絢音ですわ。", [("profile-name", 0.9)]),
        _sft_row(persona, facts, "おいくつ？", "17歳ですわ。", [("profile-age", 0.8), ("profile-name", 0.5)]),
        _sft_row(persona, facts, "ごきげんよう", "ごきげんよう、お会いできて嬉しいですわ。", []),
    ]
    data = tmp_path / "data"
    data.mkdir()
    for name in ("sft_d1_train.jsonl", "sft_d1_eval.jsonl"):
        (data / name).write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
        )
    tiny = {
        "data_dir": str(data),
        "base_model": str(tiny_model_dir),
        "max_length": 4096,
        "max_steps": 3,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "warmup_steps": 1,
        "logging_steps": 1,
    }
    block = {"layers": [1], "rank": 4, "index": str(tmp_path / "index"), "eval_steps": 0}
    summary = train(load_recipe("xattn_cpu", **tiny, xattn=block), tmp_path / "out", progress=lambda m: None)
    assert summary["steps"] == 3 and summary["examples_seen"] == 6 and summary["eval_examples"] == 2
    config, tensors = read_weights(tmp_path / "out")
    assert config.layers == [1] and config.trained["steps"] == 3
    assert tensors and all(k.startswith("blocks.1.") for k in tensors)
    assert (tmp_path / "index" / "xattn").is_dir()  # fact encodings cached in the index folder
    assert summary["eval_loss_swapped_memory"] > 0

    # Continue those weights with copy rows, fact-carrying rows seen 3x per epoch.
    logs: list[str] = []
    again = {**tiny, "init_adapter": str(tmp_path / "out"), "max_steps": 1}
    copies = {**block, "fact_focus": 3, "copy_rows": 2, "copy_distractors": 1}
    summary = train(load_recipe("xattn_cpu", **again, xattn=copies), tmp_path / "out2", progress=logs.append)
    # 2 copy rows join the 3 data rows; with the 2 fact-carrying data rows, 4 rows get 3x.
    assert any("copy task: 2 rows" in m for m in logs) and summary["train_examples"] == 5
    assert any("fact focus: 4 rows" in m for m in logs)
    assert any("initial weights: held-out loss" in m for m in logs)
    config2, tensors2 = read_weights(tmp_path / "out2")
    assert config2.trained["init_weights"] == str(tmp_path / "out") and config2.trained["steps"] == 1
    assert any(not torch.equal(tensors[k], tensors2[k]) for k in tensors)
    with pytest.raises(RagPersonaError, match="rank"):
        bigger = {**copies, "rank": 8}
        train(load_recipe("xattn_cpu", **again, xattn=bigger), tmp_path / "out3", progress=lambda m: None)


def test_memory_starts_after_the_system_turn_and_its_cache_is_reused(tok):
    from rag_persona.generation import GenerationSettings
    from rag_persona.xattn import PrefixCache, system_prefix_ids
    from training.stages.xattn import completion_loss

    base = make_tiny_qwen2(tok).eval()
    x = wrap(base)
    activate(x)
    head = system_prefix_ids(tok, PROMPT)
    ids = prompt_ids(tok)
    assert 0 < len(head) < ids.shape[1] and ids[0, : len(head)].tolist() == head
    encs = x.encode_facts(tok, [f.text for f in FACTS])
    memory = x.memory_for([encs], start=len(head))
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        got = x(input_ids=ids, memory=memory).logits
    assert torch.equal(got[:, : len(head)], plain[:, : len(head)])  # the system turn never sees the memory
    assert (got[:, len(head) :] - plain[:, len(head) :]).abs().max() > 1e-3
    # Training through the cached system turn gives the loss of the full sequence.
    prefix = PrefixCache(base, head)
    labels = ids.clone()
    labels[:, : ids.shape[1] - 3] = -100
    with torch.no_grad():
        full, n_full = completion_loss(x, ids, labels, memory)
        cached, n_cached = completion_loss(x, ids, labels, memory, prefix)
    assert n_full == n_cached == 3
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)
    # A right-padded batch through the cached system turn: the token-weighted mean of its rows.
    short = ids[:, :-2]
    short_labels = labels[:, :-2].clone()
    short_labels[:, -1] = short[0, -1]
    batch_ids = torch.cat([ids, torch.cat([short, torch.zeros(1, 2, dtype=torch.long)], 1)])
    batch_labels = torch.cat([labels, torch.cat([short_labels, torch.full((1, 2), -100)], 1)])
    two = x.memory_for([encs, encs[:1]], start=len(head))
    with torch.no_grad():
        batched, n_b = completion_loss(x, batch_ids, batch_labels, two, prefix)
        other, n_o = completion_loss(
            x, short, short_labels, x.memory_for([encs[:1]], start=len(head)), prefix
        )
    assert n_b == n_full + n_o
    torch.testing.assert_close(batched, (full * n_full + other * n_o) / n_b, rtol=1e-4, atol=1e-4)
    # Chat: the same reply with the system turn from the cache, and fewer tokens prefilled.
    loaded = SimpleNamespace(model=base, tokenizer=tok)
    settings = GenerationSettings(max_new_tokens=8, repetition_penalty=1.0, reply_no_repeat_ngram=0)
    a = XattnReplyStream(loaded, PROMPT, settings, xmodel=x, memory=memory)
    b = XattnReplyStream(loaded, PROMPT, settings, xmodel=x, memory=memory, prefix=prefix)
    assert "".join(a) == "".join(b) and a.reply.new_tokens == b.reply.new_tokens == 8
    assert a.prefilled_tokens == ids.shape[1] and b.prefilled_tokens == ids.shape[1] - len(head)
    assert prefix.cache.get_seq_length() == len(head)  # the shared cache itself is never extended


def test_e5_memory_variant_one_vector_per_fact(tok):
    """The small-encoder alternative (kept for the memory-choice measurement): one pooled e5 vector a fact."""
    base = make_tiny_qwen2(tok).eval()
    x = XattnModel(base, XattnConfig(layers=[1], rank=4, memory="e5"))
    encs = x.encode_facts(tok, [f.text for f in FACTS])
    assert [tuple(e.shape) for e in encs] == [(1, 1, 384)] * len(FACTS)
    memory = x.memory_for([encs])
    ids = prompt_ids(tok)
    with torch.no_grad():
        assert torch.equal(x(input_ids=ids, memory=memory).logits, base(input_ids=ids).logits)
        activate(x)
        assert (x(input_ids=ids, memory=memory).logits - base(input_ids=ids).logits).abs().max() > 1e-4
    assert x.config.encoder_key() == {"memory": "e5", "embedder": "e5-small"}


def test_missed_golden_facts_join_memory_but_not_for_raft_drops(tmp_path):
    import json

    from rag_persona.chat import default_persona
    from rag_persona.knowledge.facts import load_knowledge
    from rag_persona.settings import get_settings
    from training.stages.xattn import load_examples

    persona = default_persona()
    facts = {f.id: f.text for f in load_knowledge(get_settings().persona_dir()).facts}
    missed = _sft_row(persona, facts, "おいくつ？", "17歳ですわ。", [("profile-name", 0.8)])
    missed["golden_ids"] = ["profile-age"]
    dropped = {**missed, "raft": "drop_golden"}
    path = tmp_path / "rows.jsonl"
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in (missed, dropped)), encoding="utf-8"
    )
    as_given = load_examples(path, persona, facts)
    assert [e.fact_ids for e in as_given] == [["profile-name"], ["profile-name"]]
    fixed = load_examples(path, persona, facts, add_missed_golden=True)
    assert fixed[0].fact_ids == ["profile-name", "profile-age"] and fixed[0].added_golden == ["profile-age"]
    assert fixed[1].fact_ids == ["profile-name"]  # RAFT removed it on purpose
    assert all(facts["profile-age"] not in e.messages[0]["content"] for e in fixed)  # memory, not prompt
