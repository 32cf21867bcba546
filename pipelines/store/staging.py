"""Staged writes and their one commit: how a run's rows reach ``passages`` and ``rankings``.

Reads top to bottom::

    stage(table, run_id, schema)   → a StagedTable: batches appended durably to a private table, invisible to readers
    commit_passages(staged, ...)   → one commit: the changed and deleted documents' passages removed, the staged ones
                                     added (delete_and_append), or one overwrite on a model change; tagged with the
                                     run id
    commit_rankings(staged, ...)   → one overwrite of the ranking set, query_id indexed, tagged with the run id
    drop_dead_staging(table)       → the staging tables that killed runs left behind

A crash before the commit leaves the previous version untouched; a rerun plans again, so it never duplicates rows
(the passages of every document it writes again are removed in the same commit). ``Store`` exposes these functions as its methods
(``store.stage(...)``, ``store.commit_passages(...)``).
"""

from __future__ import annotations

import logging
import re

import pyarrow as pa

from pipelines import schema as S
from pipelines.store.names import RUN_ID_PATTERN, StoreError, sql_strings

log = logging.getLogger("pipelines.store")
READER_CACHE_BYTES = 4 << 20  # the staging reader's metadata cache


class StagedTable:
    """Batches appended durably to a private table, published later in one commit."""

    def __init__(self, store, name: str, schema: pa.Schema):
        self.store, self.name, self.schema = store, name, schema
        self.rows = 0
        self._table = None

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        table = table.select(self.schema.names).cast(self.schema)
        if self._table is None:
            self._table = self.store.staging_db.create_table(self.name, data=table, schema=self.schema,
                                                             mode="overwrite")
        else:
            self._table.add(table)
        self.rows += table.num_rows

    def resume(self) -> bool:
        """Take over this name's table left by a killed run, if its schema is this run's; else drop it.
        True when there was one to resume."""
        if self.name not in self.store.table_names():
            return False
        table = self.store.staging_db.open_table(self.name)
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
        # a bounded metadata cache: by default it kept ~0.11 MiB per staging fragment (27 MiB per million rows)
        ds = self._table.to_lance(metadata_cache_size_bytes=READER_CACHE_BYTES)
        return ds.scanner(batch_size=batch_rows).to_reader()

    def drop(self) -> None:
        if self._table is not None:
            self.store.db.drop_table(self.name)
            self._table = None


def stage(store, table: str, run_id: str, schema: pa.Schema, *, resumable: bool = False) -> StagedTable:
    """A private table for a run's rows. ``resumable``: one fixed name per target table (the run lock keeps
    it to one writer), so that the next run finds what a killed one staged (``StagedTable.resume``)."""
    # '.' parts the table from the run id: table names cannot hold one, so a name belongs to exactly one table
    return StagedTable(store, f"_staging-{table}" if resumable else f"_staging-{table}.{run_id}", schema)


def drop_dead_staging(store, table: str) -> list[str]:
    """Drop the per-run staging tables of ``table`` left by killed runs. Only call it holding the table's
    run lock: then no live run owns one. Names are matched exactly: ``_staging-passages-v2`` (the resumable
    staging of table ``passages-v2``) is never taken for one of ``passages``'."""
    old = re.compile(rf"^_staging-{re.escape(table)}-{RUN_ID_PATTERN}$")  # older releases: '-' before a run id
    dead = [n for n in store.table_names() if n.startswith(f"_staging-{table}.") or old.match(n)]
    for name in dead:
        store.db.drop_table(name)
    return dead


def commit_passages(store, staged: StagedTable | None, run_id: str, *, deletes: list[str] = (),
                    replace: bool = False) -> int:
    """Publish a run's changes to ``passages`` in one commit; return the new version (tagged ``run_id``).

    The staged passages are added, and every passage of the ``deletes`` documents and of the staged ones
    removed, in the same commit (``delete_and_append``): an upsert by document, so a rerun never
    duplicates a passage and a document that got shorter keeps no old passage;
    with ``replace`` (a model change) the staged rows become the whole table, in one overwrite commit, so readers
    see the old model's vectors or the new one's, never a mix, and older versions stay readable."""
    name = store.cfg.passages_table
    table = store.open(name)
    source = staged.reader() if staged is not None else None
    if table is None:
        table = store.db.create_table(name, data=source, schema=staged.schema)
    elif replace:
        table.add(source, mode="overwrite")
    else:
        rewritten: set[str] = set()
        if staged is not None:
            check_compatible(store, table.schema, staged.schema)
            rewritten = set(staged.columns([S.ID])[S.ID].to_pylist())  # the delta's size, not the table's
        delete_and_append(table, sorted({*deletes, *rewritten}), source)
    version = table.version
    table.tags.create(run_id, version)
    return version


def delete_and_append(table, gone: list[str], source: pa.RecordBatchReader | None) -> None:
    """One commit (a Lance ``Update``) that removes every passage of the ``gone`` documents and adds ``source``'s
    rows: the staged passages are written as new fragments, the gone documents' rows get deletion vectors in the
    fragments that hold them. Readers see the version before or after, never a mix.

    Why not ``merge_insert``: its ``when_not_matched_by_source_delete`` (the only way to delete in the same commit)
    joins the whole table, and its memory grew with the table (+267 MiB at 1M passages, +1.4 GiB at 4M:
    benchmarks/merge_insert_scale.py); this reads only the fragments holding a gone id (found through the id
    index) and writes only the new rows, so its memory follows the night's changes, not the table. Every staged
    document that ``passages`` holds must be in ``gone``, else its passages would be there twice (commit_passages
    puts them all in)."""
    import lance
    from lance.dataset import LanceOperation
    from lance.fragment import write_fragments

    ds = table.to_lance()
    updated, removed = [], []
    if gone:
        where = f"{S.ID} IN ({sql_strings(gone)})"
        hits = ds.to_table(columns=[], filter=where, with_row_address=True)["_rowaddr"].to_numpy()
        for fragment_id in sorted({int(a) >> 32 for a in hits}):
            kept = ds.get_fragment(fragment_id).delete(where)  # a new deletion file; nothing committed yet
            (updated if kept is not None else removed).append(kept if kept is not None else fragment_id)
    new = write_fragments(source, ds, schema=ds.schema) if source is not None else []
    if not (updated or removed or new):
        return
    lance.LanceDataset.commit(ds, LanceOperation.Update(removed_fragment_ids=removed, updated_fragments=updated,
                                                        new_fragments=new), read_version=ds.version)
    table.checkout_latest()


def commit_rankings(store, staged: StagedTable, run_id: str) -> int:
    """Publish a complete ranking set in one commit that replaces the previous set (kept as an older
    version); index ``query_id`` for lookups; tag the result ``run_id``; return its version."""
    from lancedb.index import BTree

    name = store.cfg.rankings_table
    table = store.open(name)
    if table is None:
        table = store.db.create_table(name, data=staged.reader(), schema=staged.schema)
    else:
        table.add(staged.reader(), mode="overwrite")  # one atomic commit: readers see old or new, never a mix
    table.create_index(S.QUERY_ID, config=BTree(), replace=True)  # an overwrite drops the old index
    version = table.version
    table.tags.create(run_id, version)
    return version


def check_compatible(store, have: pa.Schema, want: pa.Schema) -> None:
    """Refuse to merge staged rows into a passages table of another vector type or with fewer columns."""
    if have.field(S.VECTOR).type != want.field(S.VECTOR).type:
        raise StoreError(
            f"'{store.cfg.passages_table}' holds vectors of type {have.field(S.VECTOR).type}, this run makes "
            f"{want.field(S.VECTOR).type}; index into a new storage.passages_table"
        )
    missing = set(want.names) - set(have.names)
    if missing:
        raise StoreError(
            f"'{store.cfg.passages_table}' has no column(s) {sorted(missing)}; keep corpus.metadata_fields as the "
            "table was built, or index into a new storage.passages_table"
        )
