"""Retrieve stage: embed a batch of queries with the bi-encoder, fetch each one's top-k candidates.

Loaded once per actor: the bi-encoder and the ``passages`` table pinned at one version (every
query of a run sees the same corpus). Candidates come from ``CandidateSearch``: vector, full
text (BM25) or hybrid (both, fused by reciprocal rank). Output rows keep the query columns and
add the candidates, best retrieval first: ids, the text the cross-encoder reads, retrieval scores.

Example (no Ray needed)::

    stage = Retriever(cfg.storage, cfg.index, passages_version=3, model="all-MiniLM-L6-v2", k=100, source="hybrid")
    stage = Retriever.from_config(cfg, passages_version=3, device="cpu")  # or: every setting from the config
    out = stage(pa.table({"query_id": [...], "query": ["vitamin d and bone density"], ...}))
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines import schema as S
from pipelines.faults import maybe_fail, record

SEARCH_CHUNK = 32  # query vectors per multi-query LanceDB call

log = logging.getLogger(__name__)


def document_text(title: str | None, text: str | None, fields, separator: str = " ") -> str:
    """What the cross-encoder reads for a document: the chosen fields, empty ones skipped, joined by ``separator``.
    Shared by the rerank job and the reranker's training, so that both see the same text."""
    parts = {"title": title, "text": text}
    return separator.join(parts[f] for f in fields if parts[f])


def search_settings(rt) -> dict[str, Any]:
    """``CandidateSearch``'s (and ``Retriever``'s) search keywords from ``rt``, the ``retrieve`` config section."""
    return {"k": rt.k, "source": rt.source, "rrf_k": rt.rrf_k, "exact": rt.exact, "exact_max_rows": rt.exact_max_rows,
            "exact_max_bytes": rt.exact_max_bytes, "threads": rt.search_threads}


class CandidateSearch:
    """Top-k candidates per query from one source, best first, each with a ``score`` (higher is better):

    * ``vector``: the bi-encoder's nearest passages: exact, as chunked matrix products over the vectors held in
      memory (``pipelines.rerank.exact_search``), or a few multi-query LanceDB calls in threads (ANN, or LanceDB's flat
      scan); which one is decided once here from ``exact`` (``auto``, true, false, ``lance_flat``: see
      ``exact_search.choose_method``) and kept in ``method``;
    * ``fts``: BM25 over the full-text index (``index.fts.columns``), one query per call, in threads;
    * ``hybrid``: both lists fused by reciprocal rank (``rrf_k``); the score is the fused one.

    Shared by the rerank job, the eval job and hard-negative mining, so that all three see the same candidates.
    """

    def __init__(self, store, table, index_cfg, *, k: int, source: str = "vector", rrf_k: int = 60,
                 exact: bool | str = "auto", columns: tuple[str, ...] = (S.ID,), threads: int = 4,
                 exact_max_rows: int | None = None, exact_max_bytes: int | None = None, exact_device: str = "auto",
                 exact_chunk_bytes: int | None = None):
        if source not in ("vector", "fts", "hybrid"):
            raise ValueError(f"unknown candidate source {source!r}; use vector, fts or hybrid")
        if source != "vector" and not store.has_fts_index(index_cfg.fts.columns, table=table):
            raise ValueError(f"candidate source {source!r} needs the full-text index on passages "
                             f"({', '.join(index_cfg.fts.columns)}); set index.fts.enabled: true and rerun "
                             "`batchrank index`")
        self.store, self.table, self.index_cfg = store, table, index_cfg
        self.k, self.source, self.rrf_k, self.exact = k, source, rrf_k, exact
        self.columns = list(dict.fromkeys([S.ID, *columns]))
        self.method, self.method_reason, self.matrix = None, "full-text search only", None
        if source != "fts":
            from pipelines.rerank.exact_search import CHUNK_BYTES, ExactSearch, resolve_method

            self.method, self.method_reason = resolve_method(table, exact, max_rows=exact_max_rows,
                                                             max_bytes=exact_max_bytes)
            if self.method == "matmul":  # loaded once; lives as long as this object (one per retrieve actor)
                self.matrix = ExactSearch(table, index_cfg.metric, columns=self.columns, device=exact_device,
                                          chunk_bytes=exact_chunk_bytes or CHUNK_BYTES)
            log.info("vector candidates: %s (%s)", self.method, self.method_reason)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="search")

    @classmethod
    def from_config(cls, store, table, cfg, **overrides: Any) -> CandidateSearch:
        """Candidates as ``cfg.retrieve`` and ``cfg.index`` set them; ``overrides`` (e.g. ``k``, ``source``,
        ``exact``, ``columns``, ``threads``) replace the config's."""
        return cls(store, table, cfg.index, **{**search_settings(cfg.retrieve), **overrides})

    def __enter__(self) -> CandidateSearch:
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown()  # one-off users (eval, training, the search command) free the search threads

    def __call__(self, vectors: np.ndarray | None, texts: list[str]) -> list[pa.Table]:
        if self.source == "vector":
            return self.vector(vectors)
        if self.source == "fts":
            return self.fts(texts)
        return [self._fuse(v, f) for v, f in zip(self.vector(vectors), self.fts(texts))]

    def vector(self, vectors: np.ndarray) -> list[pa.Table]:
        from pipelines.store import distance_to_score

        if self.matrix is not None:
            return self.matrix.tables(vectors, self.k)

        def chunk(start: int) -> pa.Table:
            return self.store.search_batch(vectors[start:start + SEARCH_CHUNK], k=self.k, index_cfg=self.index_cfg,
                                           exact=self.method == "lance_flat", columns=self.columns, table=self.table)

        metric = self.index_cfg.metric
        per_query: list[pa.Table] = []
        for start, hits in zip(range(0, len(vectors), SEARCH_CHUNK),
                               self.pool.map(chunk, range(0, len(vectors), SEARCH_CHUNK))):
            qi = hits["query_index"].to_numpy()
            order = np.argsort(qi, kind="stable")  # keep best-first order within each query
            hits, qi = hits.take(pa.array(order)), qi[order]
            score = distance_to_score(hits["_distance"].to_numpy().astype(np.float32), metric)
            hits = hits.select(self.columns).append_column("score", pa.array(score, pa.float32()))
            bounds = np.searchsorted(qi, np.arange(min(SEARCH_CHUNK, len(vectors) - start) + 1))
            per_query.extend(hits.slice(bounds[i], bounds[i + 1] - bounds[i]) for i in range(len(bounds) - 1))
        return per_query

    def fts(self, texts: list[str]) -> list[pa.Table]:
        def one(text: str) -> pa.Table:
            hits = self.store.search_text(text, k=self.k, fts_columns=self.index_cfg.fts.columns,
                                          columns=self.columns, table=self.table)
            return hits.select(self.columns).append_column("score", hits["_score"].cast(pa.float32()))

        return list(self.pool.map(one, texts))

    def _fuse(self, vec: pa.Table, fts: pa.Table) -> pa.Table:
        from pipelines.rerank.fusion import rrf

        fused = rrf([vec[S.ID].to_pylist(), fts[S.ID].to_pylist()], k=self.rrf_k, limit=self.k)
        both = pa.concat_tables([vec.select(self.columns), fts.select(self.columns)])
        first = {}
        for i, doc in enumerate(both[S.ID].to_pylist()):
            first.setdefault(doc, i)
        rows = both.take(pa.array([first[d] for d, _ in fused], pa.int64()))
        return rows.append_column("score", pa.array([s for _, s in fused], pa.float32()))


class Retriever:
    """Stateful Ray Data stage: ``map_batches(Retriever, compute=ActorPoolStrategy(size=n), ...)``."""

    def __init__(self, storage_cfg, index_cfg, *, passages_version: int, model: str, k: int = 100,
                 source: str = "vector", rrf_k: int = 60, exact: bool | str = "auto",
                 exact_max_rows: int | None = None, exact_max_bytes: int | None = None,
                 doc_fields: tuple[str, ...] = ("title", "text"),
                 separator: str = " ", threads: int = 4, device: str = "auto", dtype: str = "auto",
                 max_seq_length: int | None = None, normalize: bool = True, trust_remote_code: bool = False,
                 num_threads: float | None = None, encode_batch_size: int = 64, backend: str = "torch",
                 batch_tokens: int | None = 0):
        from pipelines.cluster.runtime import node_label
        from pipelines.models import configure_threads, load_bi_encoder
        from pipelines.store import Store

        if backend == "torch":
            import torch  # noqa: F401 - so that configure_threads sizes its pool

        configure_threads(num_threads)
        self.node = node_label()
        self.encoder = None if source == "fts" else load_bi_encoder(  # BM25 alone needs no query vectors
            model, device=device, dtype=dtype, max_seq_length=max_seq_length, trust_remote_code=trust_remote_code,
            backend=backend, threads=num_threads, batch_tokens=batch_tokens)
        store = Store(storage_cfg)
        self.doc_fields, self.separator = tuple(doc_fields), separator
        self.normalize, self.encode_batch_size = normalize, encode_batch_size
        columns = tuple(f for f in (S.TITLE, S.TEXT) if f in self.doc_fields)
        self.search = CandidateSearch(store, store.passages(passages_version), index_cfg, k=k, source=source,
                                      rrf_k=rrf_k, exact=exact, exact_max_rows=exact_max_rows,
                                      exact_max_bytes=exact_max_bytes, columns=columns, threads=threads)

    @staticmethod
    def config_kwargs(cfg, *, passages_version: int, **overrides: Any) -> dict[str, Any]:
        """The constructor's keywords from the config (``retrieve``: the search and CPUs per actor; ``embed``: the
        bi-encoder; ``rerank``: the document fields the cross-encoder reads): what ``map_batches(Retriever,
        fn_constructor_kwargs=...)`` takes. ``overrides`` replace the config's (``device`` as resolved for the
        actor)."""
        rt, e, rr = cfg.retrieve, cfg.embed, cfg.rerank
        documents = {} if rr is None else {"doc_fields": tuple(rr.input_fields), "separator": rr.separator}
        return {"storage_cfg": cfg.storage, "index_cfg": cfg.index, "passages_version": passages_version,
                "model": e.model, **search_settings(rt), **documents, "device": e.device, "dtype": e.dtype,
                "max_seq_length": e.max_seq_length, "normalize": e.normalize, "trust_remote_code": e.trust_remote_code,
                "num_threads": rt.cpus_per_actor, "backend": e.backend, "batch_tokens": e.batch_tokens, **overrides}

    @classmethod
    def from_config(cls, cfg, *, passages_version: int, **overrides: Any) -> Retriever:
        """A retriever set up from the config (``overrides``: as for ``config_kwargs``)."""
        return cls(**cls.config_kwargs(cfg, passages_version=passages_version, **overrides))

    def _doc_texts(self, hits: pa.Table) -> list[str]:
        titles = hits[S.TITLE].to_pylist() if S.TITLE in self.doc_fields else [None] * hits.num_rows
        texts = hits[S.TEXT].to_pylist() if S.TEXT in self.doc_fields else [None] * hits.num_rows
        return [document_text(a, b, self.doc_fields, self.separator) for a, b in zip(titles, texts)]

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        queries = batch[S.QUERY].to_pylist()
        vectors = None
        if self.encoder is not None:
            vectors = self.encoder.encode(queries, batch_size=self.encode_batch_size, convert_to_numpy=True,
                                          normalize_embeddings=self.normalize, show_progress_bar=False)
            vectors = np.asarray(vectors, dtype=np.float32)
        per_query = self.search(vectors, queries)
        maybe_fail("retrieve_call")
        record("retrieve", len(queries))  # BATCHRANK_WORK_LOG: which process retrieved (chaos tests)
        ids = [h[S.ID].to_pylist() for h in per_query]
        texts = [self._doc_texts(h) for h in per_query]
        scores = [h["score"].to_pylist() for h in per_query]
        seconds = (time.perf_counter() - start) / max(len(batch), 1)
        return (batch.append_column(S.CAND_IDS, pa.array(ids, pa.list_(pa.string())))
                .append_column(S.CAND_TEXTS, pa.array(texts, pa.list_(pa.string())))
                .append_column(S.CAND_SCORES, pa.array(scores, pa.list_(pa.float32())))
                .append_column(S.RETRIEVE_SECONDS, pa.array([seconds] * len(batch), pa.float64()))
                .append_column(S.RETRIEVE_NODE, pa.array([self.node] * len(batch), pa.string())))
