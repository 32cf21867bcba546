"""Score fusion: hybrid candidate lists (convex combination or reciprocal rank), and the final cross-encoder +
first-stage blend.

* ``convex``: documents from several scored lists (vector, full text) get sum(w_i * minmax_i(score)), each list's
  scores scaled to [0, 1] over the query's hits; a document missing from a list scores 0 there. Better than RRF
  in Bruch, Gai and Ingber, "An Analysis of Fusion Functions for Hybrid Retrieval" (ACM TOIS 2023), and here:
  on SciFact's *train* claims 0.7289 against 0.7128 nDCG@10 (passages; the default, chosen on train judgments).
* ``rrf``: documents from several ranked lists get sum(1 / (k + rank)) (Cormack et al., 2009).
* ``blend``: final = w * z(cross-encoder) + (1 - w) * z(first stage), z standardising each query's scores,
  so one weight works for every query whatever the scales.
* ``fit_weight``: the w that maximises nDCG@10 on held-out *training* queries (callers pass training
  judgments only; the eval job refuses to measure a model on queries it was fitted on).

Example::

    rrf([["d1", "d2"], ["d2", "d3"]], k=60)        # [("d2", 0.0325...), ("d1", 0.0164...), ("d3", 0.0161...)]
    convex([(["d1", "d2"], [0.9, 0.5]), (["d2", "d3"], [12.0, 3.0])], [0.5, 0.5])  # d2 (0.5), d1 (0.5), d3 (0)
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


def minmax(scores) -> np.ndarray:
    """One list's scores scaled to [0, 1] (best 1, worst 0); equal scores all become 1."""
    x = np.asarray(scores, dtype=np.float64)
    if x.size == 0:
        return x
    lo, span = x.min(), x.max() - x.min()
    return (x - lo) / span if span > 1e-12 else np.ones_like(x)


def convex(scored: Sequence[tuple[Sequence[str], Sequence[float]]], weights: Sequence[float],
           groups: Mapping[str, str] | None = None, limit: int | None = None) -> list[tuple[str, float]]:
    """Fuse scored lists (ids best first, their scores) by a convex combination of min-max scaled scores: an id
    scores sum(w_i * minmax_i), 0 in a list it is missing from; best first, ties in order of first appearance.

    ``groups`` (id -> group, e.g. passage -> document): each list scores a group by its best id (max over the
    group's passages), the groups are fused, and every id comes back under its group's fused score: groups best
    first, and within a group its ids by their own fused score, so a group's first id is the one that earned it.
    """
    if len(scored) != len(weights):
        raise ValueError(f"{len(scored)} lists but {len(weights)} weights")
    own: dict[str, float] = {}
    group_of = groups or {}
    per_group: dict[str, float] = {}
    for (ids, scores), w in zip(scored, weights):
        best: dict[str, float] = {}
        for item, x in zip(ids, minmax(scores).tolist()):
            own[item] = own.get(item, 0.0) + w * x
            g = group_of.get(item, item)
            if x > best.get(g, -1.0):
                best[g] = x
        for g, x in best.items():
            per_group[g] = per_group.get(g, 0.0) + w * x
    for item in own:  # groups only ever seen through ids: keep insertion order for ties
        per_group.setdefault(group_of.get(item, item), 0.0)
    order = {g: i for i, g in enumerate(per_group)}
    fused = sorted(own, key=lambda i: (-per_group[group_of.get(i, i)], order[group_of.get(i, i)], -own[i]))
    out = [(i, per_group[group_of.get(i, i)]) for i in fused]
    return out[:limit] if limit is not None else out


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
