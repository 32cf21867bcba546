"""Search over ``passages``: vector (ANN or exact), full-text, many query vectors at once; the ANN settings.

Reads top to bottom::

    search(vector, k)              → top-k of one query vector, with ``_distance``
    search_text(text, k)           → BM25 top-k over the full-text indexes, with ``_score``
    search_batch(vectors, k)       → top-k of many query vectors in one call, with ``query_index``
    has_fts_index, has_vector_index, dataset → what an opened table offers for search
    distance_to_score(d, metric)   → LanceDB's distance as a similarity (higher is better)
    ann_config(...)                → the LanceDB index config ``ensure_indexes`` builds

Each search takes an opened ``passages`` (``table=``) to skip opening it again; ``Store`` exposes them as its
methods (``store.search(...)``). ``CandidateSearch`` (``pipelines/rerank/retrieve.py``) builds on them.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from pipelines import schema as S
from pipelines.store.names import StoreError


def search(store, vector, *, k: int = 10, index_cfg=None, exact: bool = False, columns: list[str] | None = None,
           version: int | str | None = None, table=None) -> pa.Table:
    """Top-k passages for one query vector (ANN or exact), best first, with ``_distance``; pass ``table``
    (an opened ``passages``) to skip opening it again. Full-text and hybrid candidates: ``CandidateSearch``."""
    table = table if table is not None else store.passages(version)
    cols = columns or [S.ID, S.TITLE, S.TEXT]
    query = _vector_query(table, vector, index_cfg, exact)
    return query.select([*cols, "_distance"]).limit(k).to_arrow()


def search_text(store, text: str, *, k: int, fts_columns: list[str], columns: list[str], table=None) -> pa.Table:
    """BM25 top-k over the full-text index of ``fts_columns`` (all matched), best first, with ``_score``."""
    table = table if table is not None else store.passages()
    cols = fts_columns if len(fts_columns) > 1 else fts_columns[0]
    return table.search(text, query_type="fts", fts_columns=cols).select([*columns, "_score"]).limit(k).to_arrow()


def search_batch(store, vectors, *, k: int, index_cfg=None, exact: bool = False,
                 columns: list[str] | None = None, table=None) -> pa.Table:
    """Top-k for many query vectors in one call (much faster than one call per query).

    Rows carry ``query_index`` (the position in ``vectors``), the columns and ``_distance``,
    best first within each query.
    """
    table = table if table is not None else store.passages()
    cols = columns or [S.ID]
    if len(vectors) == 0:
        return pa.table({"query_index": pa.array([], pa.int32()), **{c: pa.array([], pa.string()) for c in cols},
                         "_distance": pa.array([], pa.float32())})
    query = _vector_query(table, [v for v in vectors], index_cfg, exact)
    hits = query.select([*cols, "_distance"]).limit(k).to_arrow()
    if "query_index" not in hits.column_names:  # LanceDB leaves it out for a single query vector
        hits = hits.add_column(0, "query_index", pa.array([0] * hits.num_rows, pa.int32()))
    return hits


def has_fts_index(store, columns, version: int | None = None, table=None) -> bool:
    """Whether every one of ``columns`` has a full-text index (in ``table``, or passages at ``version``)."""
    table = table if table is not None else store.passages(version)
    indexed = {c for ix in table.list_indices() if ix.index_type == "FTS" for c in ix.columns}
    return set([columns] if isinstance(columns, str) else columns) <= indexed


def has_vector_index(table) -> bool:
    """Whether an opened table (at its checked-out version) has a vector index on ``vector``."""
    return any(S.VECTOR in ix.columns for ix in table.list_indices())


def dataset(table):
    """The Lance dataset of an opened table, at its checked-out version, for reads LanceDB's queries do not offer
    (whole columns streamed into memory, rows taken by position); a Lance dataset passes through as it is."""
    return table.to_lance() if hasattr(table, "to_lance") else table


def distance_to_score(distance, metric: str):
    """Similarity from a LanceDB distance: higher is better (cosine similarity for ``cosine``)."""
    return 1.0 - distance if metric == "cosine" else -distance


def _vector_query(table, vector, index_cfg, exact: bool):
    metric = index_cfg.metric if index_cfg else "cosine"
    query = table.search(vector, vector_column_name=S.VECTOR).distance_type(metric)
    if exact:
        return query.bypass_vector_index()
    if index_cfg is not None:
        ann = index_cfg.ann
        query = query.nprobes(ann.nprobes)
        if ann.refine_factor:
            query = query.refine_factor(ann.refine_factor)
        if ann.ef:
            query = query.ef(ann.ef)
    return query


def ann_config(kind: str, metric: str, ann, n: int, dim: int):
    """(LanceDB index config, the parameters it was given) of an ANN index of ``kind`` over ``n`` vectors."""
    from lancedb.index import HnswPq, HnswSq, IvfFlat, IvfPq

    partitions = ann.num_partitions or max(1, min(4096, round(n**0.5 / 2)))
    params: dict[str, Any] = {"metric": metric, "num_partitions": partitions, "sample_rate": ann.sample_rate,
                              "train_sample_rows": min(n, partitions * ann.sample_rate)}
    if kind in ("ivf_pq", "ivf_hnsw_pq"):
        sub = ann.num_sub_vectors or next(d for d in (dim // 8, dim // 16, dim // 4, 1) if d and dim % d == 0)
        if dim % sub:
            raise StoreError(f"index.ann.num_sub_vectors={sub} must divide the vector dimension {dim}")
        params.update(num_sub_vectors=sub, num_bits=ann.num_bits)
    if kind.startswith("ivf_hnsw"):
        params.update(m=ann.m, ef_construction=ann.ef_construction)
    cls = {"ivf_flat": IvfFlat, "ivf_pq": IvfPq, "ivf_hnsw_sq": HnswSq, "ivf_hnsw_pq": HnswPq}[kind]
    args = {k: v for k, v in params.items() if k not in ("metric", "train_sample_rows")}
    return cls(distance_type=metric, **args), params
