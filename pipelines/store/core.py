"""``Store``: the LanceDB database at ``storage.uri`` and the verbs the rest of batchrank uses on its tables.

Reads top to bottom::

    connection    db, table_names
    reading       open (a table or None), passages, rankings, scan, rows_by_id, count, tags, versions,
                  passages_model, content_fingerprint, passages_for_queries, scan_batches
    writing       upsert (merge by key), delete_where, append_quarantine / quarantine
    leases, tags  retag, lease, release
    delegated     stage, commit_* (staging.py); upkeep, ensure_indexes (upkeep.py); search* (search.py)

What ``open`` returns is an opened table: pass it back to these verbs (``scan``, ``rows_by_id``, ``search``,
...) to read one pinned version; read its ``version`` freely, call nothing else on it outside this package.

Example::

    store = Store(cfg.storage)
    table = store.passages()                               # the latest version, pinned
    rows = store.rows_by_id(table, ["d1", "d2"], ["id", "text"])
    store.upsert("pair_scores", new_rows, "pair_key", schema=S.PAIR_SCORES_SCHEMA, update=False, index=True)
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import pyarrow as pa

from pipelines import schema as S
from pipelines.store import search as _search
from pipelines.store import staging as _staging
from pipelines.store import upkeep as _upkeep
from pipelines.store.names import LEASE_PREFIX, StoreError, sql_strings
from pipelines.store.objstore import lance_location, redact

log = logging.getLogger("pipelines.store")


class Upserted(NamedTuple):
    """What ``Store.upsert`` did: rows inserted (every row when it created the table), and whether it did."""
    inserted: int
    created: bool


STAGING_CACHE_BYTES = 8 << 20  # the staging connection's index and metadata caches

class Store:
    """A LanceDB database (``storage.uri``) and the batchrank tables in it."""

    def __init__(self, storage_cfg):
        self.cfg = storage_cfg
        self._db = self._staging_db = None

    @property
    def db(self):
        if self._db is None:
            import lancedb

            uri, options = lance_location(self.cfg.uri, self.cfg.storage_options)
            self._db = lancedb.connect(uri, storage_options=options)
        return self._db

    @property
    def staging_db(self):
        """A connection for staging tables, with small caches: a run appends to its staging table every few thousand
        rows, and the default session cached every version's metadata (in 900 appends of 4,096 rows a process grew
        224 MiB, quadratically; with 8 MiB caches, 25 MiB). Readers of published tables keep ``db``'s caches."""
        if self._staging_db is None:
            import lancedb

            uri, options = lance_location(self.cfg.uri, self.cfg.storage_options)
            session = lancedb.Session(index_cache_size_bytes=STAGING_CACHE_BYTES,
                                      metadata_cache_size_bytes=STAGING_CACHE_BYTES)
            self._staging_db = lancedb.connect(uri, storage_options=options, session=session)
        return self._staging_db

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

    def _table(self, table, version: int | str | None = None):
        """An opened table as it is, or the named one opened (None when missing)."""
        return self.open(table, version) if isinstance(table, str) else table

    def passages(self, version: int | str | None = None):
        return self._required(self.cfg.passages_table, version, "batchrank index")

    def rankings(self, version: int | str | None = None):
        return self._required(self.cfg.rankings_table, version, "batchrank rerank")

    def _required(self, name: str, version: int | str | None, job: str):
        """Table ``name`` opened (at ``version``), or a StoreError naming the job that writes it."""
        table = self.open(name, version)
        if table is None:
            raise StoreError(f"no '{name}' table in {redact(self.cfg.uri)}; run `{job}` first")
        return table

    def scan(self, table, columns: list[str] | None = None, *, where: str | None = None,
             version: int | str | None = None, limit: int | None = None) -> pa.Table | None:
        """Rows of ``table`` (opened, or a name, then at ``version``) matching ``where`` (a filter built with
        ``sql_strings``), ``columns`` only (default: all), at most ``limit``. None when a named table is missing."""
        table = self._table(table, version)
        if table is None:
            return None
        query = table.search()
        if where is not None:
            query = query.where(where)
        if columns is not None:
            query = query.select(columns)
        return query.limit(limit).to_arrow()

    def scan_batches(self, table, columns: list[str], *, batch_rows: int = 8192):
        """``columns`` of ``table`` (opened, or a name) in record batches of ``batch_rows``, streamed: the whole
        column is never in memory. Nothing when a named table is missing."""
        table = self._table(table)
        if table is None:
            return
        yield from table.to_lance().scanner(columns=columns, batch_size=batch_rows).to_batches()

    def rows_by_id(self, table, ids, columns: list[str], *, key: str = S.ID, chunk: int = 500) -> pa.Table:
        """Rows of ``table`` whose ``key`` is in ``ids`` (any order; absent ids are simply not there)."""
        ids = sorted(set(ids))
        parts: list[pa.Table] = []
        for i in range(0, len(ids), chunk):
            parts.append(table.search().where(f"{key} IN ({sql_strings(ids[i:i + chunk])})").select(columns)
                         .limit(None).to_arrow())
        if not parts:
            return table.search().select(columns).limit(0).to_arrow()
        return pa.concat_tables(parts)

    def count(self, table, version: int | str | None = None) -> int:
        """Rows of ``table`` (opened, or a name, then at ``version``); 0 when a named table is missing."""
        table = self._table(table, version)
        return 0 if table is None else table.count_rows()

    def tags(self, table) -> dict[str, int]:
        """``{tag: version}`` of ``table`` (opened, or a name; empty when missing)."""
        table = self._table(table)
        return {} if table is None else {tag: info["version"] for tag, info in table.tags.list().items()}

    def versions(self, table) -> list[int]:
        """The versions ``table`` (opened, or a name; empty when missing) still keeps, oldest first."""
        table = self._table(table)
        return [] if table is None else sorted(v["version"] for v in table.list_versions())

    @staticmethod
    def content_fingerprint(table) -> str:
        """A digest of a passages table's (id, content hash) pairs: equal exactly when the documents are equal,
        whatever the table version (a rerun that changed nothing makes a new version with the same content)."""
        return S.fingerprint_rows(table.search().select([S.ID, S.CONTENT_HASH]).limit(None).to_arrow())

    def passages_for_queries(self, model: str):
        """The opened passages table, for queries embedded by ``model``; refuses a missing or empty table, and one
        built with another bi-encoder (its vectors and the queries' would not be comparable)."""
        built_with = self.passages_model()
        name = self.cfg.passages_table
        if built_with is None:
            raise StoreError(f"'{name}' is missing or empty in {redact(self.cfg.uri)}; run `batchrank index` first")
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
        rows = self.scan(table, [S.MODEL], limit=1)
        return rows[S.MODEL][0].as_py()

    def passages_settings(self) -> str | None:
        """How the passages table's documents became passages (``passage_settings`` of its first row); None for a
        new or empty table, or one built before documents were split into passages."""
        table = self.open(self.cfg.passages_table)
        if table is None or S.PASSAGE_SETTINGS not in table.schema.names or table.count_rows() == 0:
            return None
        return self.scan(table, [S.PASSAGE_SETTINGS], limit=1)[S.PASSAGE_SETTINGS][0].as_py()

    # -- writing --------------------------------------------------------------------------
    def upsert(self, name: str, rows: pa.Table, key: str, *, schema: pa.Schema, update: bool = True,
               index: bool = False) -> Upserted:
        """Merge ``rows`` into table ``name`` by ``key`` (one ``merge_insert``): a row whose key is new is inserted;
        one whose key is there replaces the stored row (``update``) or is dropped (``update=False``: first write
        wins). Creates the table with ``schema`` on first use (another writer creating it meanwhile: merged
        into). ``index``: a B-tree index on ``key``, made with the table, takes each write's new rows, so that
        lookups by key stay index lookups."""
        table = self.open(name)
        if table is None:
            try:
                table = self.db.create_table(name, data=rows, schema=schema)
            except (OSError, ValueError, RuntimeError):  # created meanwhile: merge below
                table = self.open(name)
                if table is None:
                    raise
            else:
                if index:
                    from lancedb.index import BTree

                    table.create_index(key, config=BTree())
                return Upserted(rows.num_rows, True)
        merge = table.merge_insert(key)
        if update:
            merge = merge.when_matched_update_all()
        inserted = merge.when_not_matched_insert_all().execute(rows).num_inserted_rows
        if index and inserted:
            table.to_lance().optimize.optimize_indices(index_names=[f"{key}_idx"])
        return Upserted(inserted, False)

    def delete_where(self, name: str, where: str) -> int:
        """Delete the rows of table ``name`` matching ``where`` (a filter built with ``sql_strings``); return how
        many were deleted (0 when the table is missing)."""
        table = self.open(name)
        return 0 if table is None else table.delete(where).num_deleted_rows

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
        where = f"{S.RUN_ID} = {sql_strings([run_id])}" if run_id else None
        rows = self.scan(self.cfg.quarantine_table, where=where)
        return S.QUARANTINE_SCHEMA.empty_table() if rows is None else rows

    # -- tags and read leases ---------------------------------------------------------------
    def retag(self, name: str, tag: str) -> None:
        """Move ``tag`` to the table's latest version (after upkeep: the same data, its indexes up to date)."""
        table = self.open(name)
        if tag in table.tags.list():
            table.tags.update(tag, table.version)
        else:
            table.tags.create(tag, table.version)

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

    # -- staging and commits: staging.py --------------------------------------------------------
    stage = _staging.stage
    drop_dead_staging = _staging.drop_dead_staging
    commit_passages = _staging.commit_passages
    commit_rankings = _staging.commit_rankings

    # -- upkeep and indexes: upkeep.py ------------------------------------------------------------
    upkeep = _upkeep.upkeep
    ensure_indexes = _upkeep.ensure_indexes
    optimize = _upkeep.optimize
    expire_tags = staticmethod(_upkeep.expire_tags)
    cleanup = staticmethod(_upkeep.cleanup)

    # -- search: search.py ---------------------------------------------------------------------
    search = _search.search
    search_text = _search.search_text
    search_batch = _search.search_batch
    has_fts_index = _search.has_fts_index
