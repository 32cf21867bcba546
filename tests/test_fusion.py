"""Score fusion: reciprocal rank, the standardised blend, the fitted weight and where a weight comes from. No Ray."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.config import parse_config
from pipelines.rerank.fusion import blend, fit_weight, resolve_weight, rrf, zscore


def test_reciprocal_rank_fusion_by_hand():
    fused = rrf([["a", "b", "c"], ["c", "d"]], k=1)
    # a: 1/2; b: 1/3; c: 1/4 + 1/2 = 0.75; d: 1/3 (b first: it appeared first)
    assert fused == [("c", 0.75), ("a", 0.5), ("b", pytest.approx(1 / 3)), ("d", pytest.approx(1 / 3))]
    assert [d for d, _ in rrf([["a", "b", "c"], ["c", "d"]], k=1, limit=2)] == ["c", "a"]
    assert rrf([[], []]) == []


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
