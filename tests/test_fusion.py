"""Score fusion: reciprocal rank, the standardised blend, the fitted weight and where a weight comes from. No Ray."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.config import parse_config
from pipelines.rerank.fusion import blend, convex, fit_weight, minmax, resolve_weight, rrf, zscore


def test_reciprocal_rank_fusion_by_hand():
    fused = rrf([["a", "b", "c"], ["c", "d"]], k=1)
    # a: 1/2; b: 1/3; c: 1/4 + 1/2 = 0.75; d: 1/3 (b first: it appeared first)
    assert fused == [("c", 0.75), ("a", 0.5), ("b", pytest.approx(1 / 3)), ("d", pytest.approx(1 / 3))]
    assert [d for d, _ in rrf([["a", "b", "c"], ["c", "d"]], k=1, limit=2)] == ["c", "a"]
    assert rrf([[], []]) == []


def test_convex_fusion_by_hand():
    assert minmax([3.0, 1.0, 2.0]).tolist() == [1.0, 0.0, 0.5] and minmax([2.0, 2.0]).tolist() == [1.0, 1.0]
    vector, bm25 = (["a", "b", "c"], [0.9, 0.7, 0.5]), (["c", "d"], [12.0, 4.0])
    # a: 0.8 x 1; b: 0.8 x 0.5; c: 0.8 x 0 + 0.2 x 1; d: 0.2 x 0
    fused = convex([vector, bm25], [0.8, 0.2])
    assert [d for d, _ in fused] == ["a", "b", "c", "d"]
    assert [s for _, s in fused] == pytest.approx([0.8, 0.4, 0.2, 0.0])
    assert convex([vector, bm25], [0.8, 0.2], limit=2) == fused[:2] and convex([([], []), ([], [])], [0.5, 0.5]) == []
    assert [d for d, _ in convex([vector, bm25], [0.0, 1.0])][:2] == ["c", "a"]  # BM25 alone decides, ties stable
    with pytest.raises(ValueError, match="2 lists but 1 weights"):
        convex([vector, bm25], [1.0])


def test_convex_fusion_groups_passages_into_documents():
    """Each list scores a document by its best passage; every passage comes back under its document's score,
    the document's best passage (by its own fused score) first."""
    groups = {"x#0": "x", "x#1": "x", "y#0": "y", "z#0": "z"}
    vector = (["x#1", "y#0", "x#0", "z#0"], [1.0, 0.8, 0.4, 0.0])  # scaled: x#1 1, y#0 0.8, x#0 0.4, z#0 0
    bm25 = (["x#0", "z#0"], [10.0, 0.0])                           # scaled: x#0 1, z#0 0
    fused = convex([vector, bm25], [0.5, 0.5], groups=groups)
    # x: 0.5 x 1 (x#1) + 0.5 x 1 (x#0) = 1.0; y: 0.4; z: 0; x#0's own (0.2 + 0.5) beats x#1's (0.5)
    assert fused == [("x#0", 1.0), ("x#1", 1.0), ("y#0", pytest.approx(0.4)), ("z#0", 0.0)]


def test_blend_standardises_each_side():
    assert zscore([5.0, 5.0]).tolist() == [0.0, 0.0]  # constant scores carry no order
    ce, first = np.array([10.0, 0.0, 5.0]), np.array([0.1, 0.3, 0.2])
    assert np.argsort(-blend(ce, first, 1.0)).tolist() == [0, 2, 1]
    assert np.argsort(-blend(ce, first, 0.0)).tolist() == [1, 2, 0]
    mixed = blend(ce, first, 0.5)
    assert mixed == pytest.approx(0.5 * (ce - 5) / ce.std() + 0.5 * (first - 0.2) / first.std())


def test_fit_weight_picks_the_best_and_prefers_the_first_stage_on_ties():
    # q1: the cross-encoder is right, the first stage wrong; q2: both agree
    candidates = {"q1": (["a", "b"], [2.0, 1.0], [0.1, 0.9]), "q2": (["c", "d"], [2.0, 1.0], [0.9, 0.1])}
    judgments = [("q1", "a", 1), ("q2", "c", 1)]
    w, curve = fit_weight(candidates, judgments)
    assert w == 0.55 and curve[0.0] < curve[0.55] == curve[1.0] == 1.0  # from 0.55 the cross-encoder wins q1
    with pytest.raises(ValueError, match="no judged query"):
        fit_weight(candidates, [("q9", "a", 1)])


def test_the_weight_comes_from_config_or_the_trained_model(tmp_path):
    def rerank(fusion):
        return parse_config({"rerank": {"model": str(tmp_path), "fusion": fusion}}).rerank

    assert resolve_weight(rerank("none")) == (None, "none")
    assert resolve_weight(rerank({"cross_encoder": 0.3})) == (0.3, "config")
    weight, origin = resolve_weight(rerank("auto"))
    assert weight is None and "not trained by batchrank" in origin
    (tmp_path / "batchrank-train.json").write_text(json.dumps({"fusion": {"cross_encoder": 0.4}}))
    weight, origin = resolve_weight(rerank("auto"))
    assert weight == 0.4 and "fitted on held-out training judgments" in origin
    (tmp_path / "batchrank-train.json").write_text(json.dumps({"job": "train"}))
    assert resolve_weight(rerank("auto"))[0] is None
