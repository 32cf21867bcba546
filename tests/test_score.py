"""Score stage: candidates re-ordered by cross-encoder score, top-n kept; the real CrossEncoder loader. No Ray."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipelines import schema as S
from pipelines.rerank.score import Scorer


class OverlapScorer:
    """A hand-built cross-encoder: the score of a pair is how many query words the document contains."""

    def __init__(self):
        self.calls: list[list] = []

    def predict(self, pairs, batch_size=32, **_):
        self.calls.append(list(pairs))
        return np.array([sum(w in doc.split() for w in q.split()) for q, doc in pairs], dtype=np.float32)


def retrieved(rows: list[tuple[str, list[tuple[str, str]]]]) -> pa.Table:
    """A batch as the retrieve stage emits it: query columns + candidates in retrieval order."""
    return pa.table({
        S.QUERY_ID: [f"q{i}" for i in range(len(rows))],
        S.QUERY: [q for q, _ in rows],
        S.CAND_IDS: pa.array([[d for d, _ in c] for _, c in rows], pa.list_(pa.string())),
        S.CAND_TEXTS: pa.array([[t for _, t in c] for _, c in rows], pa.list_(pa.string())),
        S.CAND_SCORES: pa.array([[1.0 - 0.1 * i for i in range(len(c))] for _, c in rows], pa.list_(pa.float32())),
    })


def test_candidates_are_reordered_by_cross_encoder_score_and_cut_to_top_n():
    fake = OverlapScorer()
    stage = Scorer(fake, top_n=3)
    batch = retrieved([
        ("red apple pie", [("d1", "blue sky"), ("d2", "red apple"), ("d3", "apple"), ("d4", "red apple pie"),
                           ("d5", "pie")]),
        ("green", [("e1", "green"), ("e2", "grey")]),
        ("nothing found", []),
    ])
    out = stage(batch)
    assert len(fake.calls) == 1 and len(fake.calls[0]) == 7  # all pairs of the batch in one predict call
    rows = out.to_pylist()
    assert rows[0][S.DOC_IDS] == ["d4", "d2", "d3"]  # by score 3, 2, 1; d3 before d5 (tie → retrieval order)
    assert rows[0][S.SCORES] == [3.0, 2.0, 1.0]
    assert rows[0][S.RETRIEVAL_RANKS] == [4, 2, 3]
    assert rows[0][S.RETRIEVAL_SCORES] == pytest.approx([0.7, 0.9, 0.8])
    assert rows[0][S.CANDIDATES] == 5
    assert rows[1][S.DOC_IDS] == ["e1", "e2"] and rows[1][S.CANDIDATES] == 2  # fewer than top_n: all kept
    assert rows[2][S.DOC_IDS] == [] and rows[2][S.CANDIDATES] == 0
    assert S.CAND_TEXTS not in out.column_names and out[S.QUERY_ID].to_pylist() == ["q0", "q1", "q2"]


def test_ties_keep_retrieval_order():
    out = Scorer(OverlapScorer(), top_n=10)(retrieved([("zzz", [(f"d{i}", "no match") for i in range(6)])]))
    assert out[S.DOC_IDS][0].as_py() == [f"d{i}" for i in range(6)]


def test_real_cross_encoder_through_the_sentence_transformers_loader(tiny_cross_encoder):
    stage = Scorer(tiny_cross_encoder, top_n=2, batch_size=4, max_length=32, device="cpu")
    out = stage(retrieved([("cell protein", [("a", "cell protein data"), ("b", "brain"), ("c", "gene model")])]))
    row = out.to_pylist()[0]
    assert len(row[S.DOC_IDS]) == 2 and set(row[S.DOC_IDS]) <= {"a", "b", "c"}
    assert row[S.SCORES] == sorted(row[S.SCORES], reverse=True) and all(np.isfinite(row[S.SCORES]))
    assert stage.model.max_length == 32


def test_a_classifier_with_several_labels_is_refused(tiny_model, tmp_path):
    from pathlib import Path

    from sentence_transformers import CrossEncoder

    three = tmp_path / "three-labels"
    CrossEncoder(str(Path(tiny_model).parent / "raw"), num_labels=3).save(str(three))
    with pytest.raises(ValueError, match="num_labels=1"):
        Scorer(str(three))


def test_fusion_blends_standardised_cross_encoder_and_retrieval_scores():
    # cross-encoder: d4 3, d2 2, d3 1, d1 0, d5 1; retrieval: d1 1.0, d2 0.9, d3 0.8, d4 0.7, d5 0.6
    batch = retrieved([("red apple pie", [("d1", "blue sky"), ("d2", "red apple"), ("d3", "apple"),
                                          ("d4", "red apple pie"), ("d5", "pie")])])
    first_stage_only = Scorer(OverlapScorer(), top_n=5, fusion_weight=0.0)(batch).to_pylist()[0]
    assert first_stage_only[S.DOC_IDS] == ["d1", "d2", "d3", "d4", "d5"]
    assert first_stage_only[S.CROSS_ENCODER_SCORES] == [0.0, 2.0, 1.0, 3.0, 1.0]
    assert first_stage_only[S.FUSION_WEIGHT] == 0.0
    # w = 0.5: z(ce) = (ce - 1.4) / 1.0198, z(retrieval) = (r - 0.8) / 0.1414, both halved
    ce, ret = np.array([0, 2, 1, 3, 1.0]), np.array([1.0, 0.9, 0.8, 0.7, 0.6])
    want = 0.5 * (ce - ce.mean()) / ce.std() + 0.5 * (ret - ret.mean()) / ret.std()
    half = Scorer(OverlapScorer(), top_n=3, fusion_weight=0.5)(batch).to_pylist()[0]
    order = list(np.argsort(-want, kind="stable")[:3])
    assert half[S.DOC_IDS] == [f"d{i + 1}" for i in order] == ["d2", "d4", "d1"]
    assert half[S.SCORES] == pytest.approx(want[order].tolist(), abs=1e-6)
    alone = Scorer(OverlapScorer(), top_n=3)(batch).to_pylist()[0]
    assert alone[S.FUSION_WEIGHT] is None and alone[S.SCORES] == alone[S.CROSS_ENCODER_SCORES]


def test_a_bf16_cross_encoder_scores_in_float32(tiny_cross_encoder):
    """Cast to bf16 whole, a cross-encoder's logits carry 8 bits of mantissa: distinct pairs tie and top-10s
    reorder. The loader keeps the scoring head in float32 (``fp32_head``): the scores come out float32, and tie no
    more often than the float32 model's (bf16 weights on CPU here: the same casts as on a GPU)."""
    import torch
    from sentence_transformers import CrossEncoder

    from pipelines.models import fp32_head

    words = "cell protein gene cancer risk brain data model vitamin study sleep heart".split()
    rng = np.random.default_rng(0)
    pairs = [(" ".join(rng.choice(words, 3)), " ".join(rng.choice(words, 12))) for _ in range(300)]

    def logits(model):
        features = model.preprocess(pairs)
        with torch.inference_mode():
            return model(features)["scores"].reshape(-1)

    reference = logits(CrossEncoder(tiny_cross_encoder, device="cpu"))
    whole = logits(CrossEncoder(tiny_cross_encoder, device="cpu").to(torch.bfloat16))
    kept = CrossEncoder(tiny_cross_encoder, device="cpu").to(torch.bfloat16)
    assert fp32_head(kept, 1)
    headed = logits(kept)
    assert whole.dtype == torch.bfloat16 and headed.dtype == torch.float32
    assert next(kept.parameters()).dtype == torch.bfloat16  # the encoder stays in bf16
    distinct = len(set(reference.tolist()))
    assert len(set(whole.float().tolist())) < 0.9 * distinct  # the rounding this guards against
    assert len(set(headed.tolist())) >= distinct  # no tie the float32 model does not have
