"""nDCG@10, MRR@10 and recall@100 through ir-measures, against numbers computed by hand. No Ray, no models."""

from __future__ import annotations

import math

import pytest

from pipelines.quality.metrics import evaluate, measure, per_query

LOG2_3 = math.log2(3)


def ranked(*ids: str) -> dict[str, float]:
    """A run for one query, best first (scores from ranks)."""
    return {d: float(len(ids) - i) for i, d in enumerate(ids)}


def test_binary_relevance():
    # relevant: d2 (rank 2) and d4 (not retrieved)
    run = {"q1": ranked("d1", "d2", "d3")}
    qrels = [("q1", "d2", 1), ("q1", "d4", 1), ("q1", "d3", 0)]  # a judged non-relevant doc gains nothing
    got = evaluate(run, qrels)
    dcg, ideal = 1 / LOG2_3, 1 + 1 / LOG2_3
    assert got["ndcg@10"] == pytest.approx(dcg / ideal)  # 0.38685
    assert got["mrr@10"] == pytest.approx(0.5)
    assert got["recall@100"] == pytest.approx(0.5)


def test_graded_relevance_uses_the_grades_as_gains():
    # grades: d5 = 1 at rank 1, d7 = 2 at rank 3; trec_eval's nDCG gain is the grade itself
    run = {"q2": ranked("d5", "d6", "d7")}
    qrels = [("q2", "d5", 1), ("q2", "d7", 2)]
    got = evaluate(run, qrels)
    dcg = 1 / math.log2(2) + 2 / math.log2(4)  # 2.0
    ideal = 2 / math.log2(2) + 1 / math.log2(3)  # 2.6309
    assert got["ndcg@10"] == pytest.approx(dcg / ideal)  # 0.76018
    assert got["mrr@10"] == pytest.approx(1.0)
    assert got["recall@100"] == pytest.approx(1.0)


def test_a_judged_query_missing_from_the_run_counts_zero():
    run = {"q1": ranked("d1", "d2")}
    qrels = [("q1", "d1", 1), ("q2", "d9", 1)]
    got = evaluate(run, qrels)
    assert got == pytest.approx({"ndcg@10": 0.5, "mrr@10": 0.5, "recall@100": 0.5})
    per = per_query(run, qrels, ["ndcg@10"])["ndcg@10"]
    assert per["q1"] == pytest.approx(1.0) and per.get("q2", 0.0) == 0.0


def test_cutoffs():
    docs = [f"d{i}" for i in range(1, 102)]
    run = {"q1": ranked(*docs)}
    at11 = evaluate(run, [("q1", "d11", 1)])  # just past the top 10
    assert at11["mrr@10"] == 0 and at11["ndcg@10"] == 0 and at11["recall@100"] == 1
    at101 = evaluate(run, [("q1", "d101", 1), ("q1", "d3", 1)])  # one inside the top 100, one just past it
    assert at101["recall@100"] == pytest.approx(0.5)
    assert at101["mrr@10"] == pytest.approx(1 / 3)


def test_mean_over_queries():
    run = {"a": ranked("x", "y"), "b": ranked("y", "x")}
    qrels = [("a", "x", 1), ("b", "x", 1)]
    assert evaluate(run, qrels)["mrr@10"] == pytest.approx((1 + 0.5) / 2)


def test_measure_names():
    assert str(measure("nDCG@10")) == "nDCG@10" and str(measure("mrr@10")) == "RR@10"
    with pytest.raises(ValueError, match="unknown measure"):
        measure("bleu@4")
