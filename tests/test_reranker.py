"""The cross-encoder reranker: training pairs, a tiny real training run, loading checks, rerank mode."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from rag_persona.errors import RagPersonaError
from rag_persona.retrieval import RetrievalConfig, Retriever, build_store
from rag_persona.retrieval.lexical import LexicalIndex, bigram_tokens
from rag_persona.retrieval.reranker import MANIFEST, WEIGHTS, Reranker
from rag_persona.settings import KNOWLEDGE_ROOT
from training.rerank.data import jaquad_pairs, persona_pairs, sentences, synthetic_personas
from training.rerank.train import RerankerRecipe, train_reranker

# JaQuAD/JSTS-format files written for these tests, so they do not depend on ../shared being present.
DATASETS = Path(__file__).parent / "data" / "rerank_datasets"


@pytest.fixture(autouse=True)
def _datasets(monkeypatch):
    monkeypatch.setenv("RAG_PERSONA_DATASETS", str(DATASETS))


def test_sentences_split_at_japanese_sentence_ends():
    assert sentences("名前は小野寺絢音です。趣味はピアノです！\n好きな花は薔薇？短い。") == [
        "名前は小野寺絢音です。",
        "趣味はピアノです！",
        "好きな花は薔薇？",
    ]


def test_jaquad_sentence_pairs_hold_the_answer_only_in_the_positive():
    pairs = jaquad_pairs(random.Random(0), 30, paragraph_share=0.0)
    assert pairs and {p.source for p in pairs} == {"jaquad-sentence"}
    questions = {p.query for p in pairs}
    assert len(questions) == 8  # every question of the file: each answer is inside one sentence
    answers = {
        json.loads(x)["query"]: json.loads(x)["answer"]
        for x in (DATASETS / "jaquad" / "train_questions.jsonl").read_text().splitlines()
    }
    for p in pairs:
        assert (answers[p.query] in p.passage) == (p.label == 1.0)
    for q in questions:
        mine = [p for p in pairs if p.query == q]
        assert sum(p.label for p in mine) == 1.0 and len(mine) >= 2


def test_persona_pairs_give_unanswerable_queries_only_negatives():
    folder = synthetic_personas()[0]
    pairs = persona_pairs([folder], "train", random.Random(0), negatives=3)
    lines = [
        json.loads(x) for x in (folder / "queries" / "train.jsonl").read_text().splitlines() if x.strip()
    ]
    none = next(x["query"] for x in lines if not x["relevant"])
    answerable = next(x for x in lines if x["relevant"])
    assert [p.label for p in pairs if p.query == none] == [0.0, 0.0, 0.0]
    labels = [p.label for p in pairs if p.query == answerable["query"]]
    assert labels.count(1.0) == len(answerable["relevant"]) and labels.count(0.0) == 3


def test_synthetic_set_has_the_promised_shape():
    folders = synthetic_personas()
    assert len(folders) >= 25
    for folder in folders:
        n_facts = sum(1 for line in (folder / "facts.jsonl").read_text().splitlines() if line.strip())
        assert n_facts >= 40, folder.name
        rows = [json.loads(x) for x in (folder / "queries" / "test.jsonl").read_text().splitlines() if x]
        assert sum(not r["relevant"] for r in rows) / len(rows) >= 0.25, folder.name


def test_bm25s_lexical_index_scores_coverage_for_words_and_bigrams():
    words = LexicalIndex(["名前は小野寺絢音。", "趣味はピアノと乗馬。"])
    assert words.scores("趣味は？")[1] == pytest.approx(1.0) and words.scores("趣味は？")[0] == 0.0
    grams = LexicalIndex(["名前は小野寺絢音。", "趣味はピアノと乗馬。"], tokens="bigrams")
    s = grams.scores("ピアノ")
    assert 0.9 < s[1] <= 1.0 and s[0] == 0.0  # both bigrams, once, in a key a little longer than average
    assert bigram_tokens("a b") == ["ab"]
    with pytest.raises(RagPersonaError, match="tokens"):
        LexicalIndex(["x"], tokens="trigrams")


@pytest.fixture(scope="module")
def tiny_reranker(tmp_path_factory) -> Path:
    """A real (very short) training run: two steps on a few dozen pairs, written like the shipped one."""
    out = tmp_path_factory.mktemp("rr") / "reranker"
    mp = pytest.MonkeyPatch()
    mp.setenv("RAG_PERSONA_DATASETS", str(DATASETS))
    recipe = RerankerRecipe(
        jaquad_questions=8, jsts_pairs=4, personas=1, max_steps=2, batch_size=8, threads=1
    )
    try:
        info = train_reranker(recipe, out, log=lambda msg: None)
    finally:
        mp.undo()
    assert info["steps"] == 2
    return out


def test_training_writes_only_the_trained_layers_and_a_manifest(tiny_reranker):
    from safetensors import safe_open

    manifest = json.loads((tiny_reranker / MANIFEST).read_text())
    assert manifest["first_trained_layer"] == 6 and len(manifest["base"]["sha256"]) == 64
    with safe_open(str(tiny_reranker / WEIGHTS), "pt") as f:
        keys = list(f.keys())
    layers = {int(k.split("encoder.layer.")[1].split(".")[0]) for k in keys if "encoder.layer." in k}
    assert layers == set(range(6, 12)) and any(k.startswith("classifier.") for k in keys)
    assert not any("embeddings" in k for k in keys)
    assert (tiny_reranker / WEIGHTS).stat().st_size < 30 * 2**20
    assert sorted(p.name for p in tiny_reranker.iterdir()) == [MANIFEST, WEIGHTS]


def test_rerank_mode_scores_are_the_rerankers_probabilities(tiny_reranker):
    store = build_store(KNOWLEDGE_ROOT / "kansai")
    config = RetrievalConfig(mode="rerank", threshold=0.0, k=3, rerank_depth=5, reranker=str(tiny_reranker))
    hits = Retriever(store, config).search("たこ焼き屋はどこにあるの？")
    assert len(hits) == 3
    probs = Reranker(tiny_reranker).probability("たこ焼き屋はどこにあるの？", [h.text for h in hits])
    np.testing.assert_allclose([h.score for h in hits], probs, rtol=1e-5)
    ranking = Retriever(store, config).rankings(["たこ焼き屋はどこにあるの？"], depth=50)[0]
    assert sum(score > 0 for _, score in ranking) <= 5  # only rerank_depth candidates are re-scored


def test_the_cli_passes_each_option_to_the_recipe_field_of_its_name(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import training.rerank.calibrate as calibrate_module
    import training.rerank.train as train_module
    from rag_persona.cli.app import app

    seen: dict = {}
    monkeypatch.setattr(train_module, "train_reranker", lambda recipe, out, log: seen.update(recipe=recipe))
    monkeypatch.setattr(calibrate_module, "calibrate", lambda out, log: seen.update(calibrated=out))
    out = tmp_path / "rr"
    options = ["--jaquad-questions", "11", "--jsts-pairs", "12", "--train-layers", "3", "--max-steps", "13"]
    options += ["--batch-size", "4", "--learning-rate", "1e-4", "--threads", "1", "--seed", "5"]
    res = CliRunner().invoke(app, ["train-reranker", "--out", str(out), *options])
    assert res.exit_code == 0, res.output
    assert seen == {
        "recipe": RerankerRecipe(
            jaquad_questions=11,
            jsts_pairs=12,
            train_layers=3,
            max_steps=13,
            batch_size=4,
            learning_rate=1e-4,
            threads=1,
            seed=5,
        ),
        "calibrated": out,
    }
    seen.clear()
    res = CliRunner().invoke(app, ["train-reranker", "--out", str(out), "--calibrate-only"])
    assert res.exit_code == 0, res.output
    assert seen == {"calibrated": out}


def test_training_refuses_to_replace_a_folder_that_is_not_a_reranker(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RagPersonaError, match="holds no reranker.json; refusing to replace it"):
        train_reranker(RerankerRecipe(max_steps=1), tmp_path, log=lambda msg: None)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_missing_training_data_is_one_error_line(monkeypatch, tmp_path):
    monkeypatch.setenv("RAG_PERSONA_DATASETS", str(tmp_path))
    with pytest.raises(RagPersonaError, match="no such file"):
        jaquad_pairs(random.Random(0), 3)


def test_a_reranker_for_another_e5_file_or_a_missing_one_is_one_error_line(tiny_reranker, tmp_path):
    with pytest.raises(RagPersonaError, match="no reranker here"):
        Reranker(tmp_path / "nothing")
    copy = tmp_path / "copy"
    shutil.copytree(tiny_reranker, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["base"]["sha256"] = "0" * 64
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(RagPersonaError, match="sha256 mismatch"):
        Reranker(copy)


def test_the_shipped_reranker_beats_the_hybrid_on_a_persona_it_was_not_fitted_on():
    """Quality of the shipped weights (bench/results/retrieval.md): kansai test at default thresholds,
    F1 0.689 hybrid vs 0.762 rerank when measured; off-topic rejection must not drop."""
    from rag_persona.knowledge.facts import load_queries
    from rag_persona.retrieval import evaluate_retriever, retriever_for
    from rag_persona.retrieval.reranker import shipped_reranker_available

    assert shipped_reranker_available(), "adapters/reranker-e5-small is part of the repository"
    store = build_store(KNOWLEDGE_ROOT / "kansai")
    test = load_queries(KNOWLEDGE_ROOT / "kansai" / "queries" / "test.jsonl")
    hybrid = evaluate_retriever(retriever_for(store, mode="hybrid"), test)
    rerank = evaluate_retriever(retriever_for(store, mode="rerank"), test)
    assert rerank.f1 >= hybrid.f1 + 0.03, (hybrid, rerank)
    assert rerank.offtopic_rejection >= hybrid.offtopic_rejection
