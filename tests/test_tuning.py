"""Metrics, threshold sweeps, the robust choice, the plot, storing the threshold, the calibration fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rag_persona.errors import RagPersonaError
from rag_persona.knowledge import LabelledQuery, load_queries
from rag_persona.retrieval import build_index, load_index, retriever_for
from rag_persona.retrieval.tuning import (
    fit_calibration,
    fit_logistic,
    metrics_at,
    metrics_from_hits,
    plot_sweep,
    ranking_recall_at,
    sweep,
    tune_threshold,
)

DATA = Path(__file__).parent / "data"


def Q(query, *relevant):
    return LabelledQuery(query, list(relevant))


def test_metrics_by_hand():
    queries = [Q("a", "x"), Q("b", "y", "z"), Q("c"), Q("d")]
    hits = [["x", "w"], ["w", "y"], [], ["x"]]
    m = metrics_from_hits(queries, hits)
    # 2 relevant hits of 5 hits; 2 of 3 relevant facts found
    assert m.precision == pytest.approx(2 / 5) and m.recall == pytest.approx(2 / 3)
    assert m.f1 == pytest.approx(2 * 0.4 * (2 / 3) / (0.4 + 2 / 3))
    assert m.top1_hit_rate == 0.5  # "a" yes, "b" no (its first hit is w)
    assert m.offtopic_rejection == 0.5  # "c" rejected, "d" got a hit
    assert (m.on_topic, m.off_topic, m.hits) == (2, 2, 5)


def test_threshold_and_cap_apply_to_rankings():
    queries = [Q("a", "x"), Q("b")]
    rankings = [[("x", 0.9), ("y", 0.5), ("z", 0.4)], [("y", 0.3)]]
    assert metrics_at(queries, rankings, 0.45, k=5).hits == 2
    assert metrics_at(queries, rankings, 0.2, k=1).hits == 2
    assert metrics_at(queries, rankings, 0.95, k=5).hits == 0
    assert ranking_recall_at(queries, rankings, 1) == 1.0


def test_sweep_chooses_the_middle_of_the_best_plateau(tmp_path):
    # relevant scores 0.7-0.9, off-topic best scores 0.2-0.4: any threshold in (0.4, 0.7] is perfect
    queries = [Q(f"on{i}", f"f{i}") for i in range(3)] + [Q(f"off{i}") for i in range(3)]
    rankings = [[(f"f{i}", 0.7 + 0.1 * i), ("noise", 0.1)] for i in range(3)]
    rankings += [[("f0", 0.2 + 0.1 * i)] for i in range(3)]
    result = sweep(queries, rankings, k=3, thresholds=np.linspace(0, 1, 101))
    assert result.chosen_metrics.f1 == 1.0
    assert 0.5 <= result.chosen <= 0.6
    assert result.plateau()[0] > 0.4 and result.plateau()[1] <= 0.7
    png = plot_sweep(result, tmp_path / "sweep.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    (tmp_path / "folder").mkdir()
    with pytest.raises(RagPersonaError, match="folder: is a folder; name the file to write"):
        plot_sweep(result, tmp_path / "folder")
    with pytest.raises(RagPersonaError, match="sweep.png or a folder above it is a file"):
        plot_sweep(result, png / "p.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "sweep.png"]  # no temporary file left


def test_fit_logistic_recovers_a_known_rule():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(4000, 2))
    y = (rng.random(4000) < 1 / (1 + np.exp(-(0.5 + 2.0 * X[:, 0] - 1.0 * X[:, 1])))).astype(float)
    w = fit_logistic(X, y, l2=0.0)
    assert np.allclose(w, [0.5, 2.0, -1.0], atol=0.2)


def test_tune_threshold_stores_choice_in_manifest(tmp_path):
    index = tmp_path / "index"
    store = build_index(DATA / "mini_kb.jsonl", index)
    queries = load_queries(DATA / "mini_queries.jsonl")
    result = tune_threshold(store, queries, plot=tmp_path / "plot.png", source="mini")
    again = load_index(index)
    assert again.threshold == result.chosen == again.tuned_threshold("hybrid")
    assert again.manifest["tuning"]["hybrid"]["queries"] == "mini"
    assert retriever_for(again).threshold_source == "tuned"
    assert (tmp_path / "plot.png").is_file()
    assert result.chosen_metrics.f1 == max(result.f1)
    # the dense threshold is kept separately
    tune_threshold(again, queries, mode="dense")
    assert set(load_index(index).manifest["thresholds"]) == {"hybrid", "dense"}
    # calibration fitting runs on an index and gives a positive weight to the evidence
    cal = fit_calibration(again, queries)
    assert cal[("hybrid", "text")].w_z > 0 and cal[("dense", "text")].w_lex == 0.0
