"""Retrieve stage: embed a batch of queries with the bi-encoder, fetch each one's top-k candidates.

Loaded once per actor: the bi-encoder and the ``passages`` table pinned at one version (every
query of a run sees the same corpus). Queries are embedded with the query prompt (``embed.query_prompt``). Candidates come from ``CandidateSearch``: vector, full
text (BM25) or hybrid (both, fused by reciprocal rank). Output rows keep the query columns and
add the candidates, best retrieval first: document ids, the text the cross-encoder reads (the document's best
passage at document level), retrieval scores, and the passage ids and offsets.

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
    return {"k": rt.k, "source": rt.source, "fusion": rt.hybrid_fusion, "vector_weight": rt.vector_weight,
            "rrf_k": rt.rrf_k, "exact": rt.exact, "exact_max_rows": rt.exact_max_rows,
            "exact_max_bytes": rt.exact_max_bytes, "threads": rt.search_threads, "level": rt.level,
            "passage_hits": rt.passage_hits}


def best_per_document(hits: pa.Table, k: int) -> pa.Table:
    """Passage hits (best first) → the first k documents, each as its best passage's row: a document's score is
    the max over its passages. Exact for the max: a document absent from the hits scores at most the last hit."""
    first: dict[str, int] = {}
    for i, doc in enumerate(hits[S.ID].to_pylist()):
        if doc not in first:
            first[doc] = i
            if len(first) == k:
                break
    return hits.take(pa.array(list(first.values()), pa.int64()))


def deepen(per_query: list[pa.Table], fetched: int, k: int, total: int, fetch) -> list[pa.Table]:
    """Document level: queries whose ``fetched`` passage hits hold fewer than ``k`` documents (while the table has
    more passages, ``total``) are searched again four times deeper (``fetch(indices, depth)``); then each query's
    hits become its best ``k`` documents."""
    out = [best_per_document(h, k) for h in per_query]
    depth = fetched
    short = [i for i, (h, d) in enumerate(zip(per_query, out)) if d.num_rows < k and h.num_rows >= depth]
    while short and depth < total:
        depth = min(depth * 4, total)
        again = fetch(short, depth)
        for i, hits in zip(short, again):
            out[i] = best_per_document(hits, k)
        short = [i for i, hits in zip(short, again) if out[i].num_rows < k and hits.num_rows >= depth]
    return out


class CandidateSearch:
    """Top-k candidates per query from one source, best first, each with a ``score`` (higher is better):

    * ``vector``: the bi-encoder's nearest passages: exact, as chunked matrix products over the vectors held in
      memory (``pipelines.rerank.exact_search``), or a few multi-query LanceDB calls in threads (ANN, or LanceDB's flat
      scan); which one is decided once here from ``exact`` (``auto``, true, false, ``lance_flat``: see
      ``exact_search.choose_method``) and kept in ``method``;
    * ``fts``: BM25 over the full-text index (``index.fts.columns``), one query per call, in threads;
    * ``hybrid``: both lists fused (``fusion``): ``convex`` (default), vector_weight x min-max scaled cosine +
      (1 - vector_weight) x min-max scaled BM25, or ``rrf``, reciprocal rank (``rrf_k``); the score is the fused one.

    ``level`` ``document`` (on a table of passages): candidates are documents, each the row of its best passage (a
    document scores the max over its passages); ``k x passage_hits`` passages are fetched, deeper for a query whose
    hits hold fewer than k documents (``deepen``). Hybrid: convex scores each document by its best passage in each
    list and fuses those (a document's row is its passage with the best fused score of its own); rrf fuses the
    two passage lists by rank, then takes each document's best fused passage. Measured in
    ``benchmarks/passages_scifact.py`` (SciFact and its long variant, chosen on the train claims). ``passage``:
    candidates are passages. The ``id`` column is always the document's id; ``passage_id`` and its offsets name
    the passage.

    Shared by the rerank job, the eval job and hard-negative mining, so that all three see the same candidates.
    """

    def __init__(self, store, table, index_cfg, *, k: int, source: str = "vector", fusion: str = "convex",
                 vector_weight: float = 0.5, rrf_k: int = 60,
                 exact: bool | str = "auto", columns: tuple[str, ...] = (S.ID,), threads: int = 4,
                 exact_max_rows: int | None = None, exact_max_bytes: int | None = None, exact_device: str = "auto",
                 exact_chunk_bytes: int | None = None, level: str = "document", passage_hits: int = 4):
        if source not in ("vector", "fts", "hybrid"):
            raise ValueError(f"unknown candidate source {source!r}; use vector, fts or hybrid")
        if fusion not in ("convex", "rrf"):
            raise ValueError(f"unknown hybrid fusion {fusion!r}; use convex or rrf")
        if source != "vector" and not store.has_fts_index(index_cfg.fts.columns, table=table):
            raise ValueError(f"candidate source {source!r} needs the full-text index on passages "
                             f"({', '.join(index_cfg.fts.columns)}); set index.fts.enabled: true and rerun "
                             "`batchrank index`")
        self.store, self.table, self.index_cfg = store, table, index_cfg
        self.k, self.source, self.rrf_k, self.exact = k, source, rrf_k, exact
        self.fusion, self.vector_weight = fusion, vector_weight
        self.has_passages = S.PASSAGE_ID in table.schema.names  # False: a table built before passages
        passage_columns = (S.PASSAGE_ID, S.PASSAGE_START, S.PASSAGE_END) if self.has_passages else ()
        self.columns = list(dict.fromkeys([S.ID, *columns, *passage_columns]))
        self.by_doc = level == "document" and self.has_passages
        self.fetch = k * passage_hits if self.by_doc else k
        self.key = S.PASSAGE_ID if self.has_passages else S.ID  # what hybrid fusion ranks: passages
        self.total = table.count_rows() if self.by_doc else 0
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
        if not self.by_doc:
            return [self._fuse(v, f, self.k) for v, f in zip(self._vector(vectors, self.k), self._fts(texts, self.k))]

        def fused(rows, depth: int) -> list[pa.Table]:  # passages fused, each document's best first
            v, f = self._vector(vectors[rows], depth), self._fts([texts[i] for i in rows], depth)
            return [self._fuse(a, b, None) for a, b in zip(v, f)]

        return deepen(fused(np.arange(len(texts)), self.fetch), self.fetch, self.k, self.total, fused)

    def vector(self, vectors: np.ndarray) -> list[pa.Table]:
        hits = self._vector(vectors, self.fetch)
        if not self.by_doc:
            return hits
        return deepen(hits, self.fetch, self.k, self.total, lambda rows, depth: self._vector(vectors[rows], depth))

    def _vector(self, vectors: np.ndarray, k: int) -> list[pa.Table]:
        from pipelines.store import distance_to_score

        if self.matrix is not None:
            return self.matrix.tables(vectors, k)

        def chunk(start: int) -> pa.Table:
            return self.store.search_batch(vectors[start:start + SEARCH_CHUNK], k=k, index_cfg=self.index_cfg,
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
        hits = self._fts(texts, self.fetch)
        if not self.by_doc:
            return hits
        return deepen(hits, self.fetch, self.k, self.total,
                      lambda rows, depth: self._fts([texts[i] for i in rows], depth))

    def _fts(self, texts: list[str], k: int) -> list[pa.Table]:
        def one(text: str) -> pa.Table:
            hits = self.store.search_text(text, k=k, fts_columns=self.index_cfg.fts.columns,
                                          columns=self.columns, table=self.table)
            return hits.select(self.columns).append_column("score", hits["_score"].cast(pa.float32()))

        return list(self.pool.map(one, texts))

    def _fuse(self, vec: pa.Table, fts: pa.Table, limit: int | None) -> pa.Table:
        from pipelines.rerank.fusion import convex, rrf

        keys = [vec[self.key].to_pylist(), fts[self.key].to_pylist()]
        if self.fusion == "rrf":
            fused = rrf(keys, k=self.rrf_k, limit=limit)
        else:
            groups = None
            if self.by_doc:  # passages -> documents: each list scores a document by its best passage
                groups = dict(zip(keys[0], vec[S.ID].to_pylist())) | dict(zip(keys[1], fts[S.ID].to_pylist()))
            fused = convex([(keys[0], vec["score"].to_numpy()), (keys[1], fts["score"].to_numpy())],
                           [self.vector_weight, 1.0 - self.vector_weight], groups=groups, limit=limit)
        both = pa.concat_tables([vec.select(self.columns), fts.select(self.columns)])
        first = {}
        for i, doc in enumerate(both[self.key].to_pylist()):
            first.setdefault(doc, i)
        rows = both.take(pa.array([first[d] for d, _ in fused], pa.int64()))
        return rows.append_column("score", pa.array([s for _, s in fused], pa.float32()))


class Retriever:
    """Stateful Ray Data stage: ``map_batches(Retriever, compute=ActorPoolStrategy(size=n), ...)``."""

    def __init__(self, storage_cfg, index_cfg, *, passages_version: int, model: str, k: int = 100,
                 source: str = "vector", fusion: str = "convex", vector_weight: float = 0.5, rrf_k: int = 60,
                 exact: bool | str = "auto",
                 exact_max_rows: int | None = None, exact_max_bytes: int | None = None,
                 doc_fields: tuple[str, ...] = ("title", "text"),
                 separator: str = " ", threads: int = 4, device: str = "auto", dtype: str = "auto",
                 max_seq_length: int | None = None, normalize: bool = True, trust_remote_code: bool = False,
                 num_threads: float | None = None, encode_batch_size: int = 64, backend: str = "torch",
                 batch_tokens: int | None = 0, query_prompt: str | None = "auto", level: str = "document",
                 passage_hits: int = 4):
        from pipelines.cluster.runtime import node_label
        from pipelines.models import configure_threads, load_bi_encoder
        from pipelines.models.prompts import resolve_prompt
        from pipelines.store import Store

        if backend == "torch":
            import torch  # noqa: F401 - so that configure_threads sizes its pool

        configure_threads(num_threads)
        self.node = node_label()
        self.encoder = None if source == "fts" else load_bi_encoder(  # BM25 alone needs no query vectors
            model, device=device, dtype=dtype, max_seq_length=max_seq_length, trust_remote_code=trust_remote_code,
            backend=backend, threads=num_threads, batch_tokens=batch_tokens)
        self.prompt = "" if self.encoder is None else resolve_prompt(query_prompt, self.encoder, "query",
                                                                     key="embed.query_prompt", name=model)
        store = Store(storage_cfg)
        self.doc_fields, self.separator = tuple(doc_fields), separator
        self.normalize, self.encode_batch_size = normalize, encode_batch_size
        columns = tuple(f for f in (S.TITLE, S.TEXT) if f in self.doc_fields)
        self.search = CandidateSearch(store, store.passages(passages_version), index_cfg, k=k, source=source,
                                      fusion=fusion, vector_weight=vector_weight, rrf_k=rrf_k, exact=exact,
                                      exact_max_rows=exact_max_rows,
                                      exact_max_bytes=exact_max_bytes, columns=columns, threads=threads,
                                      level=level, passage_hits=passage_hits,
                                      exact_device=device)  # an actor given no GPU keeps its matrix off them

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
                "num_threads": rt.cpus_per_actor, "backend": e.backend, "batch_tokens": e.batch_tokens,
                "query_prompt": e.query_prompt, **overrides}

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
                                          prompt=self.prompt, normalize_embeddings=self.normalize,
                                          show_progress_bar=False)
            vectors = np.asarray(vectors, dtype=np.float32)
        per_query = self.search(vectors, queries)
        maybe_fail("retrieve_call")
        record("retrieve", len(queries))  # BATCHRANK_WORK_LOG: which process retrieved (chaos tests)
        ids = [h[S.ID].to_pylist() for h in per_query]
        texts = [self._doc_texts(h) for h in per_query]
        scores = [h["score"].to_pylist() for h in per_query]
        passages = self.search.has_passages
        pids = [h[S.PASSAGE_ID].to_pylist() if passages else h[S.ID].to_pylist() for h in per_query]
        starts = [h[S.PASSAGE_START].to_pylist() if passages else [None] * h.num_rows for h in per_query]
        ends = [h[S.PASSAGE_END].to_pylist() if passages else [None] * h.num_rows for h in per_query]
        seconds = (time.perf_counter() - start) / max(len(batch), 1)
        return (batch.append_column(S.CAND_IDS, pa.array(ids, pa.list_(pa.string())))
                .append_column(S.CAND_TEXTS, pa.array(texts, pa.list_(pa.string())))
                .append_column(S.CAND_SCORES, pa.array(scores, pa.list_(pa.float32())))
                .append_column(S.CAND_PASSAGES, pa.array(pids, pa.list_(pa.string())))
                .append_column(S.CAND_STARTS, pa.array(starts, pa.list_(pa.int64())))
                .append_column(S.CAND_ENDS, pa.array(ends, pa.list_(pa.int64())))
                .append_column(S.RETRIEVE_SECONDS, pa.array([seconds] * len(batch), pa.float64()))
                .append_column(S.RETRIEVE_NODE, pa.array([self.node] * len(batch), pa.string())))
