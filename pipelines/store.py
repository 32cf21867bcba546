"""Storage: the only module that talks to LanceDB.

Writes are staged, then committed once: embedded batches are appended to a private
staging table as they arrive (durable, invisible to readers), and the run publishes them
to ``passages`` in a single ``merge_insert`` on ``id`` (one new table version, tagged with
the run id). A crash before that commit leaves the previous version untouched; a rerun
upserts, so it never duplicates rows, and rows whose content hash did not change are
left as they were.

Example::

    store = Store(cfg.storage)
    hits = store.search(vector, k=10)
"""

from __future__ import annotations

import logging
import os
from typing import Any

for _var in ("LANCE_LOG", "LANCEDB_LOG"):  # lance logs "no existing dataset" at WARN on every create
    os.environ.setdefault(_var, "error")

import pyarrow as pa

from pipelines import schema as S

log = logging.getLogger(__name__)


class StoreError(RuntimeError):
    """A storage state that the job must not write over; the message says what to do."""


class StagedTable:
    """Batches appended durably to a private table, published later in one commit."""

    def __init__(self, store: Store, name: str, schema: pa.Schema):
        self.store, self.name, self.schema = store, name, schema
        self.rows = 0
        self._table = None

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        table = table.select(self.schema.names).cast(self.schema)
        if self._table is None:
            self._table = self.store.db.create_table(self.name, data=table, schema=self.schema, mode="overwrite")
        else:
            self._table.add(table)
        self.rows += table.num_rows

    def reader(self, batch_rows: int = 8192) -> pa.RecordBatchReader:
        if self._table is None:
            return pa.RecordBatchReader.from_batches(self.schema, iter(()))
        return self._table.to_lance().scanner(batch_size=batch_rows).to_reader()

    def drop(self) -> None:
        if self._table is not None:
            self.store.db.drop_table(self.name)
            self._table = None


class Store:
    """A LanceDB database (``storage.uri``) and the batchrank tables in it."""

    def __init__(self, storage_cfg):
        self.cfg = storage_cfg
        self._db = None

    @property
    def db(self):
        if self._db is None:
            import lancedb

            self._db = lancedb.connect(self.cfg.uri, storage_options=self.cfg.storage_options or None)
        return self._db

    def table_names(self) -> list[str]:
        names, token = [], None
        while True:
            page = self.db.list_tables(page_token=token)
            names.extend(page.tables)
            token = page.page_token
            if not token:
                return names

    # -- reading --------------------------------------------------------------------------
    def open(self, name: str, version: int | str | None = None):
        """Open a table, optionally at a version number or tag; None if it does not exist."""
        if name not in self.table_names():
            return None
        table = self.db.open_table(name)
        if version is not None:
            table.checkout(version)
        return table

    def passages(self, version: int | str | None = None):
        table = self.open(self.cfg.passages_table, version)
        if table is None:
            raise StoreError(f"no '{self.cfg.passages_table}' table in {self.cfg.uri}; run `batchrank index` first")
        return table

    def rows_by_id(self, table, ids, columns: list[str], *, key: str = S.ID, chunk: int = 500) -> pa.Table:
        """Rows of ``table`` whose ``key`` is in ``ids`` (any order; absent ids are simply not there)."""
        ids = sorted(set(ids))
        parts: list[pa.Table] = []
        for i in range(0, len(ids), chunk):
            quoted = ", ".join("'" + x.replace("'", "''") + "'" for x in ids[i:i + chunk])
            parts.append(table.search().where(f"{key} IN ({quoted})").select(columns).limit(None).to_arrow())
        if not parts:
            return table.search().select(columns).limit(0).to_arrow()
        return pa.concat_tables(parts)

    @staticmethod
    def content_fingerprint(table) -> str:
        """A digest of a passages table's (id, content hash) pairs: equal exactly when the documents are equal,
        whatever the table version (a rerun that changed nothing makes a new version with the same content)."""
        return fingerprint_rows(table.search().select([S.ID, S.CONTENT_HASH]).limit(None).to_arrow())

    def passages_for_queries(self, model: str):
        """The opened passages table, for queries embedded by ``model``; refuses a missing or empty table, and one
        built with another bi-encoder (its vectors and the queries' would not be comparable)."""
        from pipelines.report import redact_uri

        built_with = self.passages_model()
        name = self.cfg.passages_table
        if built_with is None:
            raise StoreError(f"'{name}' is missing or empty in {redact_uri(self.cfg.uri)}; run `batchrank index` first")
        if built_with != model:
            raise StoreError(f"'{name}' was built with bi-encoder '{built_with}', but embed.model is '{model}'; "
                             "queries must be embedded by the same model: set embed.model to the table's model, "
                             "or reindex")
        return self.passages()

    def passages_model(self) -> str | None:
        """The bi-encoder the passages table was built with (None if the table is new or empty)."""
        table = self.open(self.cfg.passages_table)
        if table is None or table.count_rows() == 0:
            return None
        rows = table.search().select([S.MODEL]).limit(1).to_arrow()
        return rows[S.MODEL][0].as_py()

    def content_hashes(self) -> dict[str, str]:
        """{id: content hash} of every passage (empty when there is no table): what a rerun need not embed."""
        table = self.open(self.cfg.passages_table)
        if table is None:
            return {}
        rows = table.search().select([S.ID, S.CONTENT_HASH]).limit(None).to_arrow()
        return dict(zip(rows[S.ID].to_pylist(), rows[S.CONTENT_HASH].to_pylist()))

    # -- writing --------------------------------------------------------------------------
    def stage(self, table: str, run_id: str, schema: pa.Schema) -> StagedTable:
        return StagedTable(self, f"_staging-{table}-{run_id}", schema)

    def commit_passages(self, staged: StagedTable, run_id: str) -> int:
        """Publish staged rows to ``passages`` in one commit; return the new version (tagged ``run_id``)."""
        name = self.cfg.passages_table
        table = self.open(name)
        if table is None:
            table = self.db.create_table(name, data=staged.reader(), schema=staged.schema)
        else:
            self._check_compatible(table.schema, staged.schema)
            (
                table.merge_insert(S.ID)
                .when_matched_update_all(where=f"target.{S.CONTENT_HASH} != source.{S.CONTENT_HASH} "
                                        f"OR target.{S.CONTENT_HASH} IS NULL")
                .when_not_matched_insert_all()
                .execute(staged.reader())
            )
        version = table.version
        table.tags.create(run_id, version)
        return version

    def rankings(self, version: int | str | None = None):
        table = self.open(self.cfg.rankings_table, version)
        if table is None:
            raise StoreError(f"no '{self.cfg.rankings_table}' table in {self.cfg.uri}; run `batchrank rerank` first")
        return table

    def commit_rankings(self, staged: StagedTable, run_id: str) -> int:
        """Publish a complete ranking set in one commit that replaces the previous set (kept as an older
        version); index ``query_id`` for lookups; tag the result ``run_id``; return its version."""
        from lancedb.index import BTree

        name = self.cfg.rankings_table
        table = self.open(name)
        if table is None:
            table = self.db.create_table(name, data=staged.reader(), schema=staged.schema)
        else:
            table.add(staged.reader(), mode="overwrite")  # one atomic commit: readers see old or new, never a mix
        table.create_index(S.QUERY_ID, config=BTree(), replace=True)  # an overwrite drops the old index
        version = table.version
        table.tags.create(run_id, version)
        return version

    def _check_compatible(self, have: pa.Schema, want: pa.Schema) -> None:
        if have.field(S.VECTOR).type != want.field(S.VECTOR).type:
            raise StoreError(
                f"'{self.cfg.passages_table}' holds vectors of type {have.field(S.VECTOR).type}, this run makes "
                f"{want.field(S.VECTOR).type}; index into a new storage.passages_table"
            )
        missing = set(want.names) - set(have.names)
        if missing:
            raise StoreError(
                f"'{self.cfg.passages_table}' has no column(s) {sorted(missing)}; keep corpus.metadata_fields as the "
                "table was built, or index into a new storage.passages_table"
            )

    def append_quarantine(self, rows: pa.Table) -> None:
        if rows.num_rows == 0:
            return
        rows = rows.select(S.QUARANTINE_SCHEMA.names).cast(S.QUARANTINE_SCHEMA)
        table = self.open(self.cfg.quarantine_table)
        if table is None:
            self.db.create_table(self.cfg.quarantine_table, data=rows, schema=S.QUARANTINE_SCHEMA)
        else:
            table.add(rows)

    def quarantine(self, run_id: str | None = None) -> pa.Table:
        table = self.open(self.cfg.quarantine_table)
        if table is None:
            return S.QUARANTINE_SCHEMA.empty_table()
        query = table.search()
        if run_id:
            query = query.where(f"{S.RUN_ID} = '{run_id.replace(chr(39), chr(39) * 2)}'")
        return query.limit(None).to_arrow()

    # -- indexes --------------------------------------------------------------------------
    def ensure_indexes(self, index_cfg) -> dict[str, Any]:
        """Build the ANN index when the table is large enough, and the full-text index; return what was done."""
        table = self.passages()
        n = table.count_rows()
        existing = {ix.name: ix for ix in table.list_indices()}
        done: dict[str, Any] = {"rows": n}
        ann = index_cfg.ann
        kind = ann.type if ann.type != "auto" else "ivf_hnsw_sq"
        vec_ix = existing.get(f"{S.VECTOR}_idx")
        if ann.type == "none" or n < max(ann.min_rows, 256):
            why = ("index.ann.type=none" if ann.type == "none"
                   else f"{n} rows < {max(ann.min_rows, 256)} (index.ann.min_rows, and an index needs 256 rows)")
            done["ann"] = {"type": "exact", "reason": why}
            if vec_ix is not None:
                table.drop_index(vec_ix.name)
        elif vec_ix is None or self._stale(table, vec_ix.name, kind, index_cfg.metric):
            config, params = _ann_config(kind, index_cfg.metric, ann, n, table.schema.field(S.VECTOR).type.list_size)
            table.create_index(S.VECTOR, config=config, replace=True)
            done["ann"] = {"type": kind, "built": True, **params}
        else:
            done["ann"] = {"type": kind, "built": False, "reason": "up to date"}
        id_ix = existing.get(f"{S.ID}_idx")
        if id_ix is None or self._unindexed(table, id_ix.name):  # lookups join documents by id
            from lancedb.index import BTree

            table.create_index(S.ID, config=BTree(), replace=True)
        if index_cfg.fts.enabled:
            from lancedb.index import FTS

            done["fts"] = {}
            for col in index_cfg.fts.columns:  # one BM25 index per field; queries match them all
                fts_ix = existing.get(f"{col}_idx")
                if fts_ix is None or self._unindexed(table, fts_ix.name):
                    table.create_index(col, config=FTS(), replace=True)
                    done["fts"][col] = {"built": True}
                else:
                    done["fts"][col] = {"built": False, "reason": "up to date"}
        done["version"] = table.version
        return done

    def has_fts_index(self, columns, version: int | None = None, table=None) -> bool:
        """Whether every one of ``columns`` has a full-text index (in ``table``, or passages at ``version``)."""
        table = table if table is not None else self.passages(version)
        indexed = {c for ix in table.list_indices() if ix.index_type == "FTS" for c in ix.columns}
        return set([columns] if isinstance(columns, str) else columns) <= indexed

    @classmethod
    def _stale(cls, table, index_name: str, kind: str, metric: str) -> bool:
        """Rebuild when rows are unindexed, or when the configured index type or metric changed."""
        if cls._unindexed(table, index_name):
            return True
        stats = table.index_stats(index_name)
        same_kind = stats.index_type.replace("_", "").lower() == kind.replace("_", "").lower()
        return not same_kind or str(stats.distance_type).lower() != metric

    @staticmethod
    def _unindexed(table, index_name: str) -> bool:
        stats = table.index_stats(index_name)
        return stats is None or stats.num_unindexed_rows > 0

    # -- search ---------------------------------------------------------------------------
    def search(self, vector, *, k: int = 10, index_cfg=None, exact: bool = False, columns: list[str] | None = None,
               version: int | str | None = None, table=None) -> pa.Table:
        """Top-k passages for one query vector (ANN or exact), best first, with ``_distance``; pass ``table``
        (an opened ``passages``) to skip opening it again. Full-text and hybrid candidates: ``CandidateSearch``."""
        table = table if table is not None else self.passages(version)
        cols = columns or [S.ID, S.TITLE, S.TEXT]
        query = self._vector_query(table, vector, index_cfg, exact)
        return query.select([*cols, "_distance"]).limit(k).to_arrow()

    def search_text(self, text: str, *, k: int, fts_columns: list[str], columns: list[str], table=None) -> pa.Table:
        """BM25 top-k over the full-text index of ``fts_columns`` (all matched), best first, with ``_score``."""
        table = table if table is not None else self.passages()
        cols = fts_columns if len(fts_columns) > 1 else fts_columns[0]
        return table.search(text, query_type="fts", fts_columns=cols).select([*columns, "_score"]).limit(k).to_arrow()

    def search_batch(self, vectors, *, k: int, index_cfg=None, exact: bool = False,
                     columns: list[str] | None = None, table=None) -> pa.Table:
        """Top-k for many query vectors in one call (much faster than one call per query).

        Rows carry ``query_index`` (the position in ``vectors``), the columns and ``_distance``,
        best first within each query.
        """
        table = table if table is not None else self.passages()
        cols = columns or [S.ID]
        if len(vectors) == 0:
            return pa.table({"query_index": pa.array([], pa.int32()), **{c: pa.array([], pa.string()) for c in cols},
                             "_distance": pa.array([], pa.float32())})
        query = self._vector_query(table, [v for v in vectors], index_cfg, exact)
        hits = query.select([*cols, "_distance"]).limit(k).to_arrow()
        if "query_index" not in hits.column_names:  # LanceDB leaves it out for a single query vector
            hits = hits.add_column(0, "query_index", pa.array([0] * hits.num_rows, pa.int32()))
        return hits

    @staticmethod
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


def distance_to_score(distance, metric: str):
    """Similarity from a LanceDB distance: higher is better (cosine similarity for ``cosine``)."""
    return 1.0 - distance if metric == "cosine" else -distance


def _ann_config(kind: str, metric: str, ann, n: int, dim: int):
    from lancedb.index import HnswPq, HnswSq, IvfFlat, IvfPq

    partitions = ann.num_partitions or max(1, min(4096, round(n**0.5 / 2)))
    params: dict[str, Any] = {"metric": metric, "num_partitions": partitions}
    if kind in ("ivf_pq", "ivf_hnsw_pq"):
        sub = ann.num_sub_vectors or next(d for d in (dim // 8, dim // 16, dim // 4, 1) if d and dim % d == 0)
        if dim % sub:
            raise StoreError(f"index.ann.num_sub_vectors={sub} must divide the vector dimension {dim}")
        params.update(num_sub_vectors=sub, num_bits=ann.num_bits)
    if kind.startswith("ivf_hnsw"):
        params.update(m=ann.m, ef_construction=ann.ef_construction)
    cls = {"ivf_flat": IvfFlat, "ivf_pq": IvfPq, "ivf_hnsw_sq": HnswSq, "ivf_hnsw_pq": HnswPq}[kind]
    args = {k: v for k, v in params.items() if k != "metric"}
    return cls(distance_type=metric, **args), params


def fingerprint_rows(rows: pa.Table) -> str:
    """A digest of (id, content hash) rows in any order: equal exactly when the documents are equal."""
    import hashlib

    import pyarrow.compute as pc

    rows = rows.take(pc.sort_indices(rows, [(S.ID, "ascending")]))
    h = hashlib.blake2b(digest_size=16)
    for batch in rows.to_batches(65536):
        h.update("\x1e".join(f"{a}\x1f{b}" for a, b in zip(batch[S.ID].to_pylist(),
                                                        batch[S.CONTENT_HASH].to_pylist())).encode())
    return h.hexdigest()
