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
import re
from datetime import UTC, datetime
from typing import Any

for _var in ("LANCE_LOG", "LANCEDB_LOG"):  # lance logs "no existing dataset" at WARN on every create
    os.environ.setdefault(_var, "error")

import pyarrow as pa

from pipelines import schema as S
from pipelines.objstore import lance_location, redact

log = logging.getLogger(__name__)


LEASE_PREFIX = "lease-"
_ANN_MERGED = "batchrank.ann_rows_merged"  # table config: rows added to the ANN index since it was trained
_RUN_TAG = re.compile(r"^(?:lease-)?[a-z][a-z_-]*-(\d{8}T\d{6}Z)-[0-9a-f]{6}$")
# a run id batchrank generated (``new_run_id``), by the jobs that stage: matched whole, never as a prefix
_RUN_ID = r"(?:index|rerank|nightly|eval)-\d{8}T\d{6}Z-[0-9a-f]{6}"


def run_tag_time(tag: str) -> datetime | None:
    """When batchrank made a run tag (``<job>-<UTC time>-<hex>`` or a lease on one); None for any other tag."""
    m = _RUN_TAG.match(tag)
    return datetime.strptime(m.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC) if m else None


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

    def resume(self) -> bool:
        """Take over this name's table left by a killed run, if its schema is this run's; else drop it.
        True when there was one to resume."""
        if self.name not in self.store.table_names():
            return False
        table = self.store.db.open_table(self.name)
        if table.schema != self.schema:
            log.warning("dropping %s: staged by a run with another schema (model, dimension or metadata)",
                        self.name)
            self.store.db.drop_table(self.name)
            return False
        self._table = table
        self.rows = table.count_rows()
        return True

    def columns(self, names: list[str]) -> pa.Table:
        if self._table is None:
            return self.schema.empty_table().select(names)
        return self._table.to_lance().to_table(columns=names)

    def delete_ids(self, ids: list[str], *, not_run: str, chunk: int = 500) -> None:
        """Delete the rows of ``ids`` staged by runs other than ``not_run`` (a killed run's, superseded)."""
        if self._table is None or not ids:
            return
        for at in range(0, len(ids), chunk):
            self._table.delete(f"{S.RUN_ID} != {sql_strings([not_run])} AND "
                               f"{S.ID} IN ({sql_strings(ids[at:at + chunk])})")
        self.rows = self._table.count_rows()

    def keep_only(self, keep: dict[str, tuple[str, str]], chunk: int = 200) -> None:
        """For each id of ``keep``, delete its staged rows except the one with ``(content hash, run id)``."""
        if self._table is None or not keep:
            return
        ids = sorted(keep)
        for at in range(0, len(ids), chunk):
            part = ids[at:at + chunk]
            mine = " OR ".join(f"({S.ID} = {sql_strings([i])} AND {S.CONTENT_HASH} = {sql_strings([keep[i][0]])} "
                               f"AND {S.RUN_ID} = {sql_strings([keep[i][1]])})" for i in part)
            self._table.delete(f"{S.ID} IN ({sql_strings(part)}) AND NOT ({mine})")
        self.rows = self._table.count_rows()

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

            uri, options = lance_location(self.cfg.uri, self.cfg.storage_options)
            self._db = lancedb.connect(uri, storage_options=options)
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
            raise StoreError(f"no '{self.cfg.passages_table}' table in {redact(self.cfg.uri)}; run `batchrank index` first")
        return table

    def rows_by_id(self, table, ids, columns: list[str], *, key: str = S.ID, chunk: int = 500) -> pa.Table:
        """Rows of ``table`` whose ``key`` is in ``ids`` (any order; absent ids are simply not there)."""
        ids = sorted(set(ids))
        parts: list[pa.Table] = []
        for i in range(0, len(ids), chunk):
            parts.append(table.search().where(f"{key} IN ({sql_strings(ids[i:i + chunk])})").select(columns).limit(None).to_arrow())
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

    def retag(self, name: str, tag: str) -> None:
        """Move ``tag`` to the table's latest version (after upkeep: the same data, its indexes up to date)."""
        table = self.open(name)
        if tag in table.tags.list():
            table.tags.update(tag, table.version)
        else:
            table.tags.create(tag, table.version)

    # -- read leases ----------------------------------------------------------------------
    def lease(self, table_name: str, version: int, run_id: str) -> str | None:
        """Pin ``version`` of a table for a run that reads it: a tag ``lease-<run id>`` that version cleanup
        respects (like any tag). Released by ``release``; a lease older than ``maintenance.lease_hours``
        (a killed run's) is dropped by the next upkeep. Returns the tag name (None if the table is missing)."""
        table = self.open(table_name)
        if table is None:
            return None
        name = f"{LEASE_PREFIX}{run_id}"
        if name not in table.tags.list():
            table.tags.create(name, version)
        return name

    def release(self, table_name: str, lease: str | None) -> None:
        if lease is None:
            return
        try:
            table = self.open(table_name)
            if table is not None and lease in table.tags.list():
                table.tags.delete(lease)
        except Exception as exc:  # an unreleased lease expires anyway; never fail a finished run for it
            log.warning("could not release %s on %s: %s", lease, table_name, exc)

    # -- writing --------------------------------------------------------------------------
    def stage(self, table: str, run_id: str, schema: pa.Schema, *, resumable: bool = False) -> StagedTable:
        """A private table for a run's rows. ``resumable``: one fixed name per target table (the run lock keeps
        it to one writer), so that the next run finds what a killed one staged (``StagedTable.resume``)."""
        # '.' parts the table from the run id: table names cannot hold one, so a name belongs to exactly one table
        return StagedTable(self, f"_staging-{table}" if resumable else f"_staging-{table}.{run_id}", schema)

    def drop_dead_staging(self, table: str) -> list[str]:
        """Drop the per-run staging tables of ``table`` left by killed runs. Only call it holding the table's
        run lock: then no live run owns one. Names are matched exactly: ``_staging-passages-v2`` (the resumable
        staging of table ``passages-v2``) is never taken for one of ``passages``'."""
        old = re.compile(rf"^_staging-{re.escape(table)}-{_RUN_ID}$")  # older releases: '-' before a standard run id
        dead = [n for n in self.table_names() if n.startswith(f"_staging-{table}.") or old.match(n)]
        for name in dead:
            self.db.drop_table(name)
        return dead

    def commit_passages(self, staged: StagedTable | None, run_id: str, *, deletes: list[str] = (),
                        replace: bool = False) -> int:
        """Publish a run's changes to ``passages`` in one commit; return the new version (tagged ``run_id``).

        Staged rows are upserted by id and ``deletes`` removed in the same ``merge_insert``; with ``replace``
        (a model change) the staged rows become the whole table, in one overwrite commit, so readers see the
        old model's vectors or the new one's, never a mix, and older versions stay readable."""
        name = self.cfg.passages_table
        table = self.open(name)
        source = staged.reader() if staged is not None else None
        if table is None:
            table = self.db.create_table(name, data=source, schema=staged.schema)
        elif replace:
            table.add(source, mode="overwrite")
        else:
            if staged is not None:
                self._check_compatible(table.schema, staged.schema)
            else:  # deletions only: an empty source with the table's own schema
                source = pa.RecordBatchReader.from_batches(table.schema, iter(()))
            merge = (table.merge_insert(S.ID)
                     .when_matched_update_all(where=f"target.{S.CONTENT_HASH} != source.{S.CONTENT_HASH} "
                                                    f"OR target.{S.CONTENT_HASH} IS NULL")
                     .when_not_matched_insert_all())
            if deletes:
                merge = merge.when_not_matched_by_source_delete(f"{S.ID} IN ({sql_strings(deletes)})")
            merge.execute(source)
        version = table.version
        table.tags.create(run_id, version)
        return version

    def rankings(self, version: int | str | None = None):
        table = self.open(self.cfg.rankings_table, version)
        if table is None:
            raise StoreError(f"no '{self.cfg.rankings_table}' table in {redact(self.cfg.uri)}; run `batchrank rerank` first")
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
            query = query.where(f"{S.RUN_ID} = {sql_strings([run_id])}")
        return query.limit(None).to_arrow()

    # -- upkeep -----------------------------------------------------------------------------
    def upkeep(self, name: str, *, maint, index_cfg=None, tag: str | None = None,
               now: datetime | None = None) -> dict[str, Any]:
        """After a commit: compact small files, bring indexes up to date (passages: ``index_cfg``), move the
        run's ``tag`` to the result (the same data, indexes current: what readers get), drop expired run tags
        and leases, clean up old versions. Returns what was done."""
        table = self.open(name)
        if table is None:
            return {}
        done: dict[str, Any] = {"compaction": self._compact(table, maint.max_fragments)}
        if index_cfg is not None:
            done["indexes"] = self.ensure_indexes(index_cfg)
            table = self.open(name)  # at the version the index updates made: cleanup keeps the latest
        if tag is not None:
            self.retag(name, tag)
        done["tags_expired"] = self.expire_tags(table, maint, now)
        done["cleanup"] = self.cleanup(table, maint.version_retention_days)
        return done

    @staticmethod
    def _compact(table, max_fragments: int) -> dict[str, Any]:
        """Merge small data files once a table has more than ``max_fragments`` of them (each commit adds some)."""
        before = table.stats()["fragment_stats"]["num_fragments"]
        if before <= max_fragments:
            return {"compacted": False, "fragments": before}
        metrics = table.compact_files()
        return {"compacted": True, "fragments_before": before,
                "fragments": table.stats()["fragment_stats"]["num_fragments"],
                "files_removed": getattr(metrics, "files_removed", None)}

    @staticmethod
    def expire_tags(table, maint, now: datetime | None = None) -> list[str]:
        """Drop batchrank's own run tags older than ``run_tag_retention_days`` and read leases older than
        ``lease_hours`` (a killed run's). Tags that do not look like a batchrank run id are never touched."""
        now = now or datetime.now(UTC)
        dropped = []
        for tag in sorted(table.tags.list()):
            made = run_tag_time(tag)
            if made is None:
                continue
            age_h = (now - made).total_seconds() / 3600
            limit = maint.lease_hours if tag.startswith(LEASE_PREFIX) else (
                None if maint.run_tag_retention_days is None else maint.run_tag_retention_days * 24)
            if limit is not None and age_h > limit:
                table.tags.delete(tag)
                dropped.append(tag)
        return dropped

    @staticmethod
    def cleanup(table, retention_days: float) -> dict[str, Any]:
        """Delete versions older than ``retention_days``, except the latest and every tagged one (run tags,
        leases of runs in progress, your own tags)."""
        from datetime import timedelta

        stats = table.to_lance().cleanup_old_versions(older_than=timedelta(days=retention_days),
                                                      error_if_tagged_old_versions=False)
        return {"versions_removed": stats.old_versions, "bytes_removed": stats.bytes_removed}

    # -- indexes --------------------------------------------------------------------------
    def ensure_indexes(self, index_cfg) -> dict[str, Any]:
        """Bring passages' indexes up to date, the cheap way when possible.

        ANN: built once the table reaches ``ann.min_rows``; after that, new and changed rows are added to the
        trained index (its partitions stay), until the rows added or changed since training pass
        ``ann.retrain_fraction`` of the table: then it is trained again. Full-text and id indexes take new
        rows incrementally. Returns what was done."""
        table = self.passages()
        n = table.count_rows()
        existing = {ix.name: ix for ix in table.list_indices()}
        done: dict[str, Any] = {"rows": n}
        ann = index_cfg.ann
        kind = ann.type if ann.type != "auto" else "ivf_hnsw_sq"
        vec_ix = existing.get(f"{S.VECTOR}_idx")
        increments: list[str] = []
        if ann.type == "none" or n < max(ann.min_rows, 256):
            why = ("index.ann.type=none" if ann.type == "none"
                   else f"{n} rows < {max(ann.min_rows, 256)} (index.ann.min_rows, and an index needs 256 rows)")
            done["ann"] = {"type": "exact", "reason": why}
            if vec_ix is not None:
                table.drop_index(vec_ix.name)
        else:
            stats = table.index_stats(vec_ix.name) if vec_ix is not None else None
            merged = int(table.to_lance().config().get(_ANN_MERGED, 0)) if stats is not None else 0
            changed = merged + (stats.num_unindexed_rows if stats is not None else n)
            if stats is None or not self._same_index(stats, kind, index_cfg.metric) \
                    or changed > ann.retrain_fraction * n:
                reason = ("no index yet" if stats is None else
                          "index type or metric changed" if not self._same_index(stats, kind, index_cfg.metric) else
                          f"{changed:,} of {n:,} rows added or changed since training > ann.retrain_fraction "
                          f"{ann.retrain_fraction}")
                config, params = _ann_config(kind, index_cfg.metric, ann, n, table.schema.field(S.VECTOR).type.list_size)
                table.create_index(S.VECTOR, config=config, replace=True)
                table.to_lance().update_config({_ANN_MERGED: "0"})
                done["ann"] = {"type": kind, "built": True, "reason": reason, **params}
            elif stats.num_unindexed_rows:
                increments.append(vec_ix.name)
                done["ann"] = {"type": kind, "built": False, "rows_added_to_index": stats.num_unindexed_rows,
                               "changed_since_training": changed}
                table.to_lance().update_config({_ANN_MERGED: str(changed)})
            else:
                done["ann"] = {"type": kind, "built": False, "reason": "up to date"}
        id_ix = existing.get(f"{S.ID}_idx")
        if id_ix is None:  # lookups join documents by id
            from lancedb.index import BTree

            table.create_index(S.ID, config=BTree(), replace=True)
        elif self._unindexed(table, id_ix.name):
            increments.append(id_ix.name)
        if index_cfg.fts.enabled:
            from lancedb.index import FTS

            done["fts"] = {}
            for col in index_cfg.fts.columns:  # one BM25 index per field; queries match them all
                fts_ix = existing.get(f"{col}_idx")
                if fts_ix is None:
                    table.create_index(col, config=FTS(), replace=True)
                    done["fts"][col] = {"built": True}
                elif self._unindexed(table, fts_ix.name):
                    increments.append(fts_ix.name)
                    done["fts"][col] = {"built": False, "rows_added_to_index": True}
                else:
                    done["fts"][col] = {"built": False, "reason": "up to date"}
        if increments:  # one pass adds the new rows to every stale index
            table.to_lance().optimize.optimize_indices(index_names=increments)
            table.checkout_latest()
        done["version"] = table.version
        return done

    def has_fts_index(self, columns, version: int | None = None, table=None) -> bool:
        """Whether every one of ``columns`` has a full-text index (in ``table``, or passages at ``version``)."""
        table = table if table is not None else self.passages(version)
        indexed = {c for ix in table.list_indices() if ix.index_type == "FTS" for c in ix.columns}
        return set([columns] if isinstance(columns, str) else columns) <= indexed

    @staticmethod
    def _same_index(stats, kind: str, metric: str) -> bool:
        same_kind = stats.index_type.replace("_", "").lower() == kind.replace("_", "").lower()
        return same_kind and str(stats.distance_type).lower() == metric

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


def sql_strings(values) -> str:
    """SQL string literals for a filter (``id IN (...)``): every value a user or a corpus supplies goes through
    here, so that quotes, backslashes and NUL stay data (LanceDB filters are DataFusion SQL: '' escapes ')."""
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)




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
