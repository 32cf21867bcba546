"""Score fusion: reciprocal-rank fusion of candidate lists, and the final cross-encoder + first-stage blend.

* ``rrf``: documents from several ranked lists (vector, full text) get sum(1 / (k + rank)); the standard
  way to merge scores that live on different scales (Cormack et al., 2009).
* ``blend``: final = w * z(cross-encoder) + (1 - w) * z(first stage), z standardising each query's scores,
  so one weight works for every query whatever the scales.
* ``fit_weight``: the w that maximises nDCG@10 on held-out *training* queries (callers pass training
  judgments only; the eval job refuses to measure a model on queries it was fitted on).

Example::

    rrf([["d1", "d2"], ["d2", "d3"]], k=60)        # [("d2", 0.0325...), ("d1", 0.0164...), ("d3", 0.0161...)]
    blend([2.0, 1.0], [0.1, 0.9], 0.5)              # array([0., 0.])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

GRID = tuple(round(x, 2) for x in np.linspace(0.0, 1.0, 21))


def rrf(ranked: Sequence[Sequence[str]], k: int = 60, limit: int | None = None) -> list[tuple[str, float]]:
    """Fuse ranked id lists (best first) by reciprocal rank; ties keep the order of first appearance."""
    acc: dict[str, float] = {}
    for ids in ranked:
        for rank, doc in enumerate(ids, 1):
            acc[doc] = acc.get(doc, 0.0) + 1.0 / (k + rank)
    fused = sorted(acc.items(), key=lambda item: -item[1])  # stable: first appearance wins ties
    return fused[:limit] if limit is not None else fused


def zscore(scores) -> np.ndarray:
    """Standardise one query's scores (mean 0, std 1); constant scores become zeros."""
    x = np.asarray(scores, dtype=np.float64)
    if x.size == 0:
        return x
    std = x.std()
    return (x - x.mean()) / std if std > 1e-12 else np.zeros_like(x)


def blend(cross_encoder, first_stage, weight: float) -> np.ndarray:
    """w * z(cross-encoder) + (1 - w) * z(first stage), for one query's candidates."""
    if weight >= 1.0:
        return np.asarray(cross_encoder, dtype=np.float64)
    return weight * zscore(cross_encoder) + (1.0 - weight) * zscore(first_stage)


def fit_weight(candidates: Mapping[str, tuple[Sequence[str], Sequence[float], Sequence[float]]],
               judgments, grid: Sequence[float] = GRID, measure: str = "ndcg@10") -> tuple[float, dict[float, float]]:
    """The weight in ``grid`` with the best mean ``measure`` over ``candidates``
    ({query id: (doc ids, cross-encoder scores, first-stage scores)}); ties go to the smaller weight
    (closer to the first stage, which generalises). Returns (weight, {weight: measure})."""
    from pipelines.quality.metrics import evaluate

    judged = [j for j in judgments if j[0] in candidates]
    if not judged:
        raise ValueError("no judged query among the candidates; cannot fit a fusion weight")
    curve = {}
    for w in grid:
        run = {q: dict(zip(ids, blend(ce, fs, w).tolist())) for q, (ids, ce, fs) in candidates.items()}
        curve[float(w)] = evaluate(run, judged, [measure])[measure]
    best = max(curve.values())
    return min(w for w, v in curve.items() if v >= best - 1e-12), curve


def resolve_weight(rerank_cfg) -> tuple[float | None, str]:
    """The cross-encoder weight ``rerank.fusion`` asks for, and where it came from.

    ``none`` → (None, "none"): the cross-encoder's score alone. ``{cross_encoder: w}`` → (w, "config").
    ``auto`` → the weight fitted on held-out training judgments and saved with the reranker by
    ``batchrank train-reranker`` (``batchrank-train.json``), else (None, ...) naming why.
    """
    import json
    import os

    fusion = rerank_cfg.fusion
    if fusion == "none":
        return None, "none"
    if not isinstance(fusion, str):
        return float(fusion.cross_encoder), "config"
    meta = os.path.join(rerank_cfg.model, "batchrank-train.json")
    if not os.path.isfile(meta):
        return None, "auto: the reranker has no fitted weight (not trained by batchrank), cross-encoder alone"
    with open(meta, encoding="utf-8") as fh:
        fitted = (json.load(fh).get("fusion") or {}).get("cross_encoder")
    if fitted is None:
        return None, "auto: no weight was fitted (training had no validation split), cross-encoder alone"
    origin = f"auto: fitted on held-out training judgments ({meta})"
    if float(fitted) == 0.0:  # the fit says the cross-encoder only hurts: rankings follow the first stage
        origin += "; weight 0: the cross-encoder changes nothing, retrain it or rerank without it"
    return float(fitted), origin
