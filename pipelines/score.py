"""Score stage: a sentence-transformers ``CrossEncoder`` reads every (query, candidate) pair.

Loaded once per actor. Each call takes a few queries with their candidates, scores all their
pairs in one ``predict`` (which sorts pairs by length, so batches carry little padding), then
re-orders each query's candidates by the final score (ties keep retrieval order) and keeps the
top ``top_n``: document ids, final scores, cross-encoder scores, retrieval scores and ranks.
The final score is the cross-encoder's, or with ``fusion_weight`` w its blend with the first
stage: w * z(cross-encoder) + (1 - w) * z(retrieval), z standardising each query's scores.

Example (no Ray needed)::

    stage = Scorer("path/to/cross-encoder", top_n=10)
    ranked = stage(retrieved_batch)
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines import schema as S
from pipelines.fusion import blend


class Scorer:
    """Stateful Ray Data stage: ``map_batches(Scorer, compute=ActorPoolStrategy(size=n), num_gpus=...)``.

    ``model`` is a CrossEncoder name or path, or any object with ``predict(pairs, batch_size=...)``.
    """

    def __init__(self, model: Any, *, top_n: int = 20, batch_size: int = 32, max_length: int | None = None,
                 device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
                 num_threads: float | None = None, fusion_weight: float | None = None):
        from pipelines.models import configure_threads, load_cross_encoder

        configure_threads(num_threads)
        self.model = model if hasattr(model, "predict") else load_cross_encoder(
            model, device=device, dtype=dtype, max_length=max_length, trust_remote_code=trust_remote_code)
        self.top_n, self.batch_size, self.fusion_weight = top_n, batch_size, fusion_weight

    def predict(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        if not pairs:
            return np.zeros(0, dtype=np.float32)
        scores = self.model.predict(pairs, batch_size=self.batch_size, show_progress_bar=False, convert_to_numpy=True)
        return np.asarray(scores, dtype=np.float32).reshape(-1)

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        queries = batch[S.QUERY].to_pylist()
        cand_ids, cand_texts = batch[S.CAND_IDS].to_pylist(), batch[S.CAND_TEXTS].to_pylist()
        cand_scores = batch[S.CAND_SCORES].to_pylist()
        pairs = [(q, t) for q, texts in zip(queries, cand_texts) for t in texts]
        flat = self.predict(pairs)
        doc_ids, scores, ce_scores, r_scores, r_ranks = [], [], [], [], []
        offset = 0
        for ids, retrieval in zip(cand_ids, cand_scores):
            ce = flat[offset:offset + len(ids)]
            offset += len(ids)
            final = ce if self.fusion_weight is None else blend(ce, retrieval, self.fusion_weight).astype(np.float32)
            keep = np.argsort(-final, kind="stable")[: self.top_n]  # stable: equal scores keep retrieval order
            doc_ids.append([ids[i] for i in keep])
            scores.append(final[keep].tolist())
            ce_scores.append(ce[keep].tolist())
            r_scores.append([retrieval[i] for i in keep])
            r_ranks.append((keep + 1).tolist())
        seconds = (time.perf_counter() - start) / max(len(batch), 1)
        out = batch.drop_columns([S.CAND_IDS, S.CAND_TEXTS, S.CAND_SCORES])
        columns = {
            S.DOC_IDS: pa.array(doc_ids, pa.list_(pa.string())),
            S.SCORES: pa.array(scores, pa.list_(pa.float32())),
            S.RETRIEVAL_SCORES: pa.array(r_scores, pa.list_(pa.float32())),
            S.RETRIEVAL_RANKS: pa.array(r_ranks, pa.list_(pa.int32())),
            S.CROSS_ENCODER_SCORES: pa.array(ce_scores, pa.list_(pa.float32())),
            S.FUSION_WEIGHT: pa.array([self.fusion_weight] * len(batch), pa.float32()),
            S.CANDIDATES: pa.array([len(ids) for ids in cand_ids], pa.int32()),
            S.SCORE_SECONDS: pa.array([seconds] * len(batch), pa.float64()),
        }
        for name, values in columns.items():
            out = out.append_column(name, values)
        return out
