"""Retrieval quality through ir-measures (pytrec_eval underneath), never hand-written formulas.

A run is {query id: {doc id: score}} (higher is better); judgments are (query id, doc id, grade) triples.
Names are the ones users read in papers: ``ndcg@10``, ``mrr@10``, ``recall@100`` (any cutoff works).

Example::

    evaluate({"q1": {"d1": 2.0, "d2": 1.0}}, [("q1", "d2", 1)])   # {"ndcg@10": 0.63..., "mrr@10": 0.5, ...}
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

DEFAULT = ("ndcg@10", "mrr@10", "recall@100")
_NAMES = {"ndcg": "nDCG", "mrr": "RR", "recall": "R", "precision": "P", "map": "AP"}


def measure(name: str):
    """``ndcg@10`` → ir-measures' ``nDCG@10`` (mrr → RR, recall → R, precision → P, map → AP)."""
    import ir_measures

    m = re.fullmatch(r"(ndcg|mrr|recall|precision|map)@(\d+)", name.strip().lower())
    if not m:
        raise ValueError(f"unknown measure {name!r}; use ndcg@K, mrr@K, recall@K, precision@K or map@K")
    return ir_measures.parse_measure(f"{_NAMES[m[1]]}@{m[2]}")


def _qrels(judgments: Iterable[tuple[str, str, int]]):
    import ir_measures

    return [ir_measures.Qrel(str(q), str(d), int(s)) for q, d, s in judgments]


def _run(run: Mapping[str, Mapping[str, float]]):
    import ir_measures

    return [ir_measures.ScoredDoc(str(q), str(d), float(s)) for q, docs in run.items() for d, s in docs.items()]


def evaluate(run: Mapping[str, Mapping[str, float]], judgments: Iterable[tuple[str, str, int]],
             measures: Iterable[str] = DEFAULT) -> dict[str, float]:
    """Mean of each measure over the judged queries; a judged query missing from ``run`` counts as 0
    (a system that returns nothing for it gets no credit)."""
    names = list(measures)
    qrels = _qrels(judgments)
    judged = {q.query_id for q in qrels}
    per = per_query(run, qrels, names)
    return {n: (sum(per[n].get(q, 0.0) for q in judged) / len(judged) if judged else 0.0) for n in names}


def per_query(run: Mapping[str, Mapping[str, float]], judgments, measures: Iterable[str] = DEFAULT
              ) -> dict[str, dict[str, float]]:
    """{measure name: {query id: value}} for the judged queries that ``run`` has."""
    import ir_measures

    names, judgments = list(measures), list(judgments)
    by = {measure(n): n for n in names}
    qrels = judgments if judgments and isinstance(judgments[0], ir_measures.Qrel) else _qrels(judgments)
    out: dict[str, dict[str, float]] = {n: {} for n in names}
    for m in ir_measures.iter_calc(list(by), qrels, _run(run)):
        out[by[m.measure]][m.query_id] = float(m.value)
    return out
