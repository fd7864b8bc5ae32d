"""Both embedder backends give float32 unit vectors; the default ranks a paraphrase above noise."""

from __future__ import annotations

import numpy as np
import pytest

from rag_persona.retrieval import load_embedder


@pytest.mark.parametrize(("name", "dim"), [("e5-small", 384), ("all-minilm-l6-v2", 384)])
def test_backends_give_unit_vectors_of_stated_dim(name, dim):
    emb = load_embedder(name)
    assert emb.dim == dim
    q = emb.encode_queries(["What is your name?", "好きな食べ物は？"])
    p = emb.encode_passages(["My name is Ayane.", "好物はマカロン。", "The weather is fine."])
    for arr, rows in ((q, 2), (p, 3)):
        assert arr.dtype == np.float32 and arr.shape == (rows, dim)
        np.testing.assert_allclose(np.linalg.norm(arr, axis=1), 1.0, atol=1e-5)
    assert emb.encode_queries([]).shape == (0, dim)


def test_sentence_transformers_backend_ranks_english_paraphrase():
    emb = load_embedder("all-minilm-l6-v2")
    q = emb.encode_queries(["What is your name?"])[0]
    p = emb.encode_passages(["My name is Ayane Onodera.", "Bananas are rich in potassium."])
    assert p[0] @ q > p[1] @ q


def test_default_embedder_ranks_japanese_paraphrase_above_unrelated():
    emb = load_embedder()
    assert emb.name == "e5-small"
    q = emb.encode_queries(["あなたの名前はなんですか?"])[0]
    p = emb.encode_passages(
        ["名前は小野寺絢音。", "東京の明日の天気は雨の予報。", "好きな紅茶はダージリン。"]
    )
    scores = p @ q
    assert scores[0] > scores[1] and scores[0] > scores[2]
    q2 = emb.encode_queries(["休みの日は何をして過ごしますか"])[0]
    p2 = emb.encode_passages(
        ["休日はピアノを弾いたり乗馬をしたりして過ごす。", "光の速さは秒速約30万キロメートル。"]
    )
    assert p2[0] @ q2 > p2[1] @ q2
