"""Score stage: a sentence-transformers ``CrossEncoder`` reads every (query, candidate) pair.

Loaded once per actor. Each call takes a few queries with their candidates, scores all their
pairs in one ``predict`` (which sorts pairs by length, so batches carry little padding), then
re-orders each query's candidates by the final score (ties keep retrieval order) and keeps the
top ``top_n``: document ids, final scores, cross-encoder scores, retrieval scores and ranks.
The final score is the cross-encoder's, or with ``fusion_weight`` w its blend with the first
stage: w * z(cross-encoder) + (1 - w) * z(retrieval), z standardising each query's scores.

With the pair cache (``cache_storage``), pairs scored by an earlier run are looked up instead,
identical pairs of one call are scored once, and the model only loads when a pair misses (a
night with nothing new never loads it). The pairs the model did score leave with each query
(``pipelines.rerank.pair_cache.NEW_*`` columns) for the driver to add to the cache. Cached scores are
the model's float32 scores, so rankings are the same with or without the cache.

Example (no Ray needed)::

    stage = Scorer("path/to/cross-encoder", top_n=10)  # or Scorer.from_config(cfg.rerank, device="cpu")
    ranked = stage(retrieved_batch)
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines import schema as S
from pipelines.faults import maybe_fail, record
from pipelines.rerank import pair_cache as P
from pipelines.rerank.fusion import blend

log = logging.getLogger("batchrank.rerank")


class Scorer:
    """Stateful Ray Data stage: ``map_batches(Scorer, compute=ActorPoolStrategy(size=n), num_gpus=...)``.

    ``model`` is a CrossEncoder name or path, or any object with ``predict(pairs, batch_size=...)``.
    ``cache_storage`` (a ``StorageConfig``) turns the pair cache on, read at ``cache_version`` (None: no
    cache table yet, every pair misses) under ``cross_encoder_id`` (``pipelines.rerank.pair_cache.cross_encoder_id``).
    """

    def __init__(self, model: Any, *, top_n: int = 20, batch_size: int = 32, max_length: int | None = None,
                 device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
                 num_threads: float | None = None, fusion_weight: float | None = None, cache_storage=None,
                 cache_version: int | None = None, cross_encoder_id: str | None = None, preload: bool = False,
                 backend: str = "torch", batch_tokens: int | None = 0, precision: str | None = None):
        from pipelines.cluster.runtime import node_label
        from pipelines.models import configure_threads

        configure_threads(num_threads)
        self.node = node_label()
        self.top_n, self.batch_size, self.fusion_weight = top_n, batch_size, fusion_weight
        self.duplicates = 0  # pairs that repeated another pair of the same call: scored once
        self._model = model if hasattr(model, "predict") else None
        self._lock = threading.Lock()
        self._load_args = {"name": model, "device": device, "dtype": dtype, "max_length": max_length,
                           "trust_remote_code": trust_remote_code, "backend": backend, "threads": num_threads,
                           "batch_tokens": batch_tokens}
        self.cache, self.cross_encoder_id = None, cross_encoder_id
        if cache_storage is not None:
            if not cross_encoder_id:
                raise ValueError("the pair cache needs cross_encoder_id (pipelines.rerank.pair_cache.cross_encoder_id of "
                                 "the model), or pass cache_storage=None to score every pair")
            self.cache = P.PairCache.open(cache_storage, cache_version)
            if precision is not None and not hasattr(model, "predict"):
                self.cross_encoder_id = self._scored_as(cross_encoder_id, model, max_length, precision, backend,
                                                        dtype, device)
            if preload and self._model is None:  # load while the first candidates are being retrieved
                threading.Thread(target=self.load, name="batchrank-load-cross-encoder", daemon=True).start()
        else:
            self.load()  # every pair needs the model: load it with the actor, not inside the first call

    @staticmethod
    def _scored_as(given: str, model: str, max_length: int | None, expected: str, backend: str, dtype: str,
                   device: str) -> str:
        """The pair cache's key for the precision this process runs the model at: ``given`` when that is
        ``expected`` (what the driver took it to be, and keyed ``given`` with). They differ where the driver cannot
        tell: a GPU the driver lacks (bf16 or fp16), another CPU's bf16 support."""
        from pipelines.models import pick_device
        from pipelines.rerank.carry_over import precision_of

        actual = precision_of(backend, dtype, pick_device(device))
        if actual == expected:
            return given
        log.warning("the cross-encoder runs here as %s, not %s as the driver took it: its cached pairs are keyed "
                    "as %s", actual, expected, actual)
        return P.cross_encoder_id(model, max_length, precision=actual)

    @staticmethod
    def config_kwargs(rr, **run_settings: Any) -> dict[str, Any]:
        """The constructor's keywords from ``rr`` (the ``rerank`` config section): what
        ``map_batches(Scorer, fn_constructor_kwargs=...)`` takes. ``run_settings`` add what a run decides and
        override the config's: ``device`` as resolved for the actor, ``num_threads``, ``fusion_weight``, the
        pair cache (``cache_storage``, ``cache_version``, ``cross_encoder_id``), ``preload``."""
        return {"model": rr.model, "top_n": rr.top_n, "batch_size": rr.batch_size, "max_length": rr.max_length,
                "device": rr.device, "dtype": rr.dtype, "trust_remote_code": rr.trust_remote_code,
                "backend": rr.backend, "batch_tokens": rr.batch_tokens, **run_settings}

    @classmethod
    def from_config(cls, rr, **run_settings: Any) -> Scorer:
        """A scorer set up from the ``rerank`` config section (``run_settings``: as for ``config_kwargs``)."""
        return cls(**cls.config_kwargs(rr, **run_settings))

    def load(self):
        """The cross-encoder, loaded once: on first use, or by the preload thread (waited for)."""
        with self._lock:
            if self._model is None:
                from pipelines.models import load_cross_encoder

                self._model = load_cross_encoder(**self._load_args)
        return self._model

    @property
    def model(self):
        return self.load()

    def predict(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        """Scores of ``pairs``; each distinct pair is scored once (a query's candidates often repeat a text: one
        document under several ids, or the same query logged under two spellings that normalise alike)."""
        if not pairs:
            return np.zeros(0, dtype=np.float32)
        distinct = list(dict.fromkeys(pairs))
        maybe_fail("score_call")
        record("score", len(distinct))
        scores = self.model.predict(distinct, batch_size=self.batch_size, show_progress_bar=False,
                                    convert_to_numpy=True)
        scores = np.asarray(scores, dtype=np.float32).reshape(-1)
        self.duplicates += len(pairs) - len(distinct)
        if len(distinct) == len(pairs):
            return scores
        where = {pair: i for i, pair in enumerate(distinct)}
        return scores[[where[p] for p in pairs]]

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        queries = batch[S.QUERY].to_pylist()
        cand_ids, cand_texts = batch[S.CAND_IDS].to_pylist(), batch[S.CAND_TEXTS].to_pylist()
        cand_scores = batch[S.CAND_SCORES].to_pylist()
        passages = [batch[c].to_pylist() for c in (S.CAND_PASSAGES, S.CAND_STARTS, S.CAND_ENDS)] \
            if S.CAND_PASSAGES in batch.column_names else [[[None] * len(ids) for ids in cand_ids]] * 3
        if self.cache is None:
            flat = self.predict([(q, t) for q, texts in zip(queries, cand_texts) for t in texts])
            fresh: list[list[tuple[str, str, str, float]]] = [[] for _ in queries]
            scored = [len(ids) for ids in cand_ids]
        else:
            flat, fresh = self._cached_scores(queries, cand_ids, cand_texts)
            scored = [len(f) for f in fresh]
        doc_ids, scores, ce_scores, r_scores, r_ranks = [], [], [], [], []
        kept_passages: list[list[list]] = [[], [], []]  # passage ids, starts, ends of the kept documents
        offset = 0
        for q, (ids, retrieval) in enumerate(zip(cand_ids, cand_scores)):
            ce = flat[offset:offset + len(ids)]
            offset += len(ids)
            final = ce if self.fusion_weight is None else blend(ce, retrieval, self.fusion_weight).astype(np.float32)
            keep = np.argsort(-final, kind="stable")[: self.top_n]  # stable: equal scores keep retrieval order
            doc_ids.append([ids[i] for i in keep])
            scores.append(final[keep].tolist())
            ce_scores.append(ce[keep].tolist())
            r_scores.append([retrieval[i] for i in keep])
            r_ranks.append((keep + 1).tolist())
            for out_list, values in zip(kept_passages, passages):
                out_list.append([values[q][i] for i in keep])
        seconds = (time.perf_counter() - start) / max(len(batch), 1)
        out = batch.drop_columns([c for c in (S.CAND_IDS, S.CAND_TEXTS, S.CAND_SCORES, S.CAND_PASSAGES, S.CAND_STARTS,
                                              S.CAND_ENDS) if c in batch.column_names])
        strings = pa.list_(pa.string())
        columns = {
            S.DOC_IDS: pa.array(doc_ids, strings),
            S.SCORES: pa.array(scores, pa.list_(pa.float32())),
            S.RETRIEVAL_SCORES: pa.array(r_scores, pa.list_(pa.float32())),
            S.RETRIEVAL_RANKS: pa.array(r_ranks, pa.list_(pa.int32())),
            S.CROSS_ENCODER_SCORES: pa.array(ce_scores, pa.list_(pa.float32())),
            S.PASSAGE_IDS: pa.array(kept_passages[0], strings),
            S.PASSAGE_STARTS: pa.array(kept_passages[1], pa.list_(pa.int64())),
            S.PASSAGE_ENDS: pa.array(kept_passages[2], pa.list_(pa.int64())),
            S.FUSION_WEIGHT: pa.array([self.fusion_weight] * len(batch), pa.float32()),
            S.CANDIDATES: pa.array([len(ids) for ids in cand_ids], pa.int32()),
            S.SCORE_SECONDS: pa.array([seconds] * len(batch), pa.float64()),
            S.SCORE_NODE: pa.array([self.node] * len(batch), pa.string()),
            P.PAIRS_SCORED: pa.array(scored, pa.int32()),
            P.PAIRS_CACHED: pa.array([len(ids) - n for ids, n in zip(cand_ids, scored)], pa.int32()),
            P.NEW_KEYS: pa.array([[f[0] for f in row] for row in fresh], strings),
            P.NEW_DOC_IDS: pa.array([[f[1] for f in row] for row in fresh], strings),
            P.NEW_DOC_HASHES: pa.array([[f[2] for f in row] for row in fresh], strings),
            P.NEW_SCORES: pa.array([[f[3] for f in row] for row in fresh], pa.list_(pa.float32())),
            P.SCORED_AS: pa.array([self.cross_encoder_id] * len(batch), pa.string()),
        }
        for name, values in columns.items():
            out = out.append_column(name, values)
        return out

    def _cached_scores(self, queries: list[str], cand_ids: list[list[str]], cand_texts: list[list[str]]):
        """Scores of every pair (flat, in candidate order) from the cache or, for misses, the model; and per
        query the (key, doc id, doc hash, score) of the pairs the model scored (each distinct pair once)."""
        keys = [[P.pair_key(self.cross_encoder_id, q, t) for t in texts] for q, texts in zip(queries, cand_texts)]
        known = self.cache.lookup(list({k for row in keys for k in row}))
        todo: dict[str, tuple[int, str, str]] = {}  # missing key → (row, doc id, doc text), first occurrence
        for row, (ids, texts, ks) in enumerate(zip(cand_ids, cand_texts, keys)):
            for doc, text, key in zip(ids, texts, ks):
                if key not in known and key not in todo:
                    todo[key] = (row, doc, text)
        predicted = self.predict([(queries[row], text) for row, _, text in todo.values()]).tolist()
        fresh: list[list[tuple[str, str, str, float]]] = [[] for _ in queries]
        for (key, (row, doc, text)), score in zip(todo.items(), predicted):
            known[key] = score
            fresh[row].append((key, doc, P.doc_hash(text), score))
        flat = np.array([known[k] for row in keys for k in row], dtype=np.float32)
        return flat, fresh


# The constructor's keywords from the rerank section, at module level: it stays put when a test swaps the class.
scorer_settings = Scorer.config_kwargs
