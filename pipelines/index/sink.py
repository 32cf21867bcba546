"""The index job's sink: the driver-side end of the stream, where every input row is counted once.

Reads top to bottom::

    stage           drain the (embedded) stream through the sink; its good rows → the staging table every
                    FLUSH_ROWS rows or FLUSH_SECONDS (durable, invisible until the commit)
    Sink.plan       first pass of an incremental run: {id: content hash} of the new and changed rows
    Sink.split      single pass (a new table, or a rebuild): embedded good rows kept, bad rows quarantined
    Sink.embedded   second pass of an incremental run: the planned rows, now with vectors
    (plan and split quarantine a later row of an id already seen as a duplicate, naming where the first was;
    resume counts the rows a killed run staged as written by this one)
    take_pending    the rows to append to the staging table;  quarantine_table  the bad rows with their reasons
                    (appended to the quarantine log every QUARANTINE_FLUSH_ROWS as they come, the rest at the end)

Example::

    sink = Sink(run_id, cfg.embed.identity)
    good, bad = sink.split(embedded_batch)   # good rows also wait in take_pending() for the staging table
    sink.rows_read, sink.rows_written, sink.rows_quarantined
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines import schema as S
from pipelines.cluster.runtime import count_nodes
from pipelines.faults import maybe_fail
from pipelines.index.ids import CHANGED, NONE, UNCHANGED, LocalIds, id_hash
from pipelines.report import Progress, utcnow

FLUSH_ROWS = 4096  # rows buffered on the driver before a staging append ...
FLUSH_SECONDS = 2.0  # ... or this long: what a killed driver loses (and a rerun embeds again) stays small
QUARANTINE_FLUSH_ROWS = 8192  # bad rows held on the driver before they are appended to the quarantine log
CHECK_ROWS = 4096  # rows per sink call (the id state's round trip), gathered from the stream's small blocks


def coalesce(batches, rows: int | None = None, seconds: float = FLUSH_SECONDS):
    """The stream's batches joined up to ``rows`` rows (or what ``seconds`` gathered): the sink's per-batch work (the
    id state's round trip, Arrow calls) is paid per few thousand rows, not per small block (7,800 blocks of 128 rows
    at 1M documents)."""
    rows = rows or CHECK_ROWS
    held: list[pa.Table] = []
    n, since = 0, time.monotonic()
    for batch in batches:
        if not held:
            since = time.monotonic()
        held.append(batch)
        n += batch.num_rows
        if n >= rows or time.monotonic() - since >= seconds:
            yield held[0] if len(held) == 1 else pa.concat_tables(held, promote_options="default")
            held, n = [], 0
    if held:
        yield held[0] if len(held) == 1 else pa.concat_tables(held, promote_options="default")


def stage(cfg, state, batches, store, staged=None, *, embedder=None, planned: dict[str, str] | None = None):
    """Drain the embedded stream through the run's sink (``state.sink``) into the (resumable) staging table; return
    it (None when no row was staged). ``embedder``: embed here, on the driver; ``planned``: the second pass of an
    incremental run, the plan's {id: content hash}. Rows are appended every ``FLUSH_ROWS`` rows or
    ``FLUSH_SECONDS``, so a killed driver loses little."""
    sink, timer = state.sink, state.timer
    flushed = time.monotonic()
    state.run.mark("pipeline_started")
    with timer("pipeline"), Progress("index", unit="docs") as progress:
        # the actors' blocks gathered into sink calls (coalesce); blocks embedded here are taken one by one
        for batch in (coalesce(_arrivals(batches, state.run)) if embedder is None else batches):
            if embedder is not None:
                with timer("embed_on_driver"):
                    batch = embedder(batch)
                state.run.mark("first_embedded_row")
            if planned is None:
                good, bad = sink.split(batch)
            else:
                good, bad = sink.embedded(batch, planned), batch.slice(0, 0)
            if staged is None and good.num_rows:
                dim = good.schema.field(S.VECTOR).type.value_type.list_size  # a list of passage vectors
                staged = store.stage(cfg.storage.passages_table, state.run_id,
                                     S.passages_schema(dict(cfg.corpus.metadata_fields), dim), resumable=True)
            if sink.pending_rows >= FLUSH_ROWS or (sink.pending_rows and
                                                   time.monotonic() - flushed >= FLUSH_SECONDS):
                with timer("stage_writes"):
                    staged.add(sink.take_pending())
                flushed = time.monotonic()
            progress.update(good.num_rows, quarantined=bad.num_rows)
        if staged is not None and sink.pending_rows:
            with timer("stage_writes"):
                staged.add(sink.take_pending())
        maybe_fail("after_staging")  # a run killed with its rows staged, before it settles what it resumed
    return staged


def _arrivals(batches, run):
    """The embedded stream, its first batch's arrival marked (``first_embedded_row``), before the sink gathers
    blocks."""
    for batch in batches:
        if batch.num_rows:
            run.mark("first_embedded_row")
        yield batch


class Sink:
    """Driver-side end of the stream: splits good from bad rows, catches duplicate ids, counts. The per-document
    state (first place of each id, what passages holds, what the input holds) is ``ids``'s (ids.py): Ray actors
    for a large corpus, so that nothing here grows with the corpus; the sink keeps what the run changes."""

    def __init__(self, run_id: str, model: str, passage_settings: str | None = None):
        self.run_id, self.model, self.passage_settings = run_id, model, passage_settings
        # where bad rows go once QUARANTINE_FLUSH_ROWS wait (the index job sets ``Store.append_quarantine``): the
        # driver never holds a run's bad rows; None keeps them until ``quarantine_table`` (tests, no store)
        self.quarantine = None
        self.ids = LocalIds()  # the per-document state (the index job sets the run's: id_state)
        self.compare = True  # plan: compare with what passages holds (a rebuild embeds every document again)
        self.sources: list[str] = []  # input files, by index (a row's place is source index << 41 | row)
        self._source_index: dict[str, int] = {}
        self.keep_written = True  # keep written_ids (an incremental run's planned documents: the delta's size)
        self.delete_markers: set[str] = set()  # a change feed's deleted ids (the delta's size)
        self.written_ids: set[str] = set()
        self.changed: set[str] = set()  # planned documents that passages holds with other content
        self.rows_read = self.rows_written = self.rows_unchanged = self.rows_quarantined = 0
        self.rows_delete_markers = self.rows_deleted = 0
        self.passages_written = 0  # passage rows staged by this run (a document is one or more passages)
        self.empty_ids: set[str] = set()  # planned documents quarantined by the embedding (nothing to embed)
        self.embed_seconds = 0.0
        self.nodes: dict[str, int] = {}  # rows embedded per Ray node
        self.reasons: dict[str, int] = {}
        self.unidentified = 0  # bad rows without an id (a torn line, an unreadable file): they prove no absence
        self.unidentified_reasons: dict[str, int] = {}
        self._pending: list[pa.Table] = []
        self.pending_rows = 0
        self._bad: list[pa.Table] = []
        self._bad_rows = 0  # rows in _bad
        self.quarantine_flushed = 0  # bad rows already appended to the quarantine log during the run
        # (id, content hash) pairs staged by killed runs: two killed runs may have staged two versions of one id
        self.done: set[tuple[str, str]] = set()
        self.resumed: dict[str, str] = {}  # {id: content hash} taken over from the staging table
        self.rows_resumed = 0

    def resume(self, ids: list[str], hashes: list[str]) -> None:
        """Count rows a killed run staged as written by this run."""
        self.rows_resumed += len(ids)
        self.rows_written += len(ids)
        self.resumed.update(zip(ids, hashes))
        self._written(ids)

    def _take_in(self, batch: pa.Table, compare: bool = False) -> tuple[pa.Table, pa.Table, pa.Table, np.ndarray]:
        """Count a batch of input rows; return (good rows, delete markers, bad rows, each good row's NEW / CHANGED /
        UNCHANGED against passages when ``compare``), bad ones quarantined."""
        self.rows_read += batch.num_rows
        batch, status = self._check_ids(batch, compare)
        is_bad = pc.is_valid(batch[S.REASON_CODE])
        marker = pc.and_(pc.invert(is_bad), pc.fill_null(batch[S.DELETED], False))
        markers = batch.filter(marker)
        if markers.num_rows:
            self.rows_delete_markers += markers.num_rows
            self.delete_markers.update(markers[S.ID].to_pylist())
        bad = batch.filter(is_bad)
        if bad.num_rows:
            self._hold_bad(bad)
            self.rows_quarantined += bad.num_rows
            for doc_id, code in zip(bad[S.ID].to_pylist(), bad[S.REASON_CODE].to_pylist()):
                self.reasons[code] = self.reasons.get(code, 0) + 1
                if doc_id is None:
                    self.unidentified += 1
                    self.unidentified_reasons[code] = self.unidentified_reasons.get(code, 0) + 1
        is_good = pc.and_(pc.invert(is_bad), pc.invert(marker))
        return batch.filter(is_good), markers, bad, status[_mask(is_good)]

    def plan(self, batch: pa.Table) -> dict[str, str]:
        """First pass: {id: content hash} of the good rows that are new or changed (all of them when not
        ``compare``: a rebuild); the rest is counted."""
        good, _, _, status = self._take_in(batch, compare=self.compare)
        if self.compare:
            self.changed.update(good[S.ID].filter(pa.array(status == CHANGED)).to_pylist())
            unchanged = status == UNCHANGED
            self.rows_unchanged += int(unchanged.sum())
            good = good.filter(pa.array(~unchanged))
        return dict(zip(good[S.ID].to_pylist(), good[S.CONTENT_HASH].to_pylist()))

    def split(self, batch: pa.Table) -> tuple[pa.Table, pa.Table]:
        """Single pass (a new table, or a rebuild): every good row was embedded."""
        self._count_embedded(batch)
        good, _, bad, _ = self._take_in(batch)
        if self.done:
            mine = [(i, h) in self.done and i not in self.resumed
                    for i, h in zip(good[S.ID].to_pylist(), good[S.CONTENT_HASH].to_pylist())]
            if any(mine):
                mask = pa.array(mine, pa.bool_())
                taken = good.filter(mask)
                self.resume(taken[S.ID].to_pylist(), taken[S.CONTENT_HASH].to_pylist())
                good = good.filter(pc.invert(mask))
        return self._keep(good), bad

    def embedded(self, batch: pa.Table, planned: dict[str, str]) -> pa.Table:
        """Second pass of an incremental run: rows the plan chose, now with vectors (already counted as read).
        A later copy of an id already taken (a duplicate, quarantined by the plan) is dropped; a document the
        embedding found nothing to embed in is quarantined."""
        self._count_embedded(batch)
        batch = batch.filter(pa.array([i in planned for i in batch[S.ID].to_pylist()], pa.bool_()))
        bad = pc.is_valid(batch[S.REASON_CODE])  # planned, then found to hold nothing to embed
        if pc.any(bad).as_py():
            rejected = batch.filter(bad)
            self._hold_bad(rejected)
            self.rows_quarantined += rejected.num_rows
            for code in rejected[S.REASON_CODE].to_pylist():
                self.reasons[code] = self.reasons.get(code, 0) + 1
            self.empty_ids.update(rejected[S.ID].to_pylist())
            batch = batch.filter(pc.invert(bad))
        in_batch: set[str] = set()
        keep = []
        for i in batch[S.ID].to_pylist():
            keep.append(i in planned and i not in self.written_ids and i not in in_batch)
            in_batch.add(i)
        return self._keep(batch.filter(pa.array(keep, pa.bool_())))

    def _count_embedded(self, batch: pa.Table) -> None:
        self.embed_seconds += pc.sum(batch[S.SECONDS]).as_py() or 0.0
        embedded = batch.filter(pc.is_valid(batch[S.VECTOR]))
        if embedded.num_rows:
            count_nodes(self.nodes, embedded[S.NODE])

    def _keep(self, good: pa.Table) -> pa.Table:
        """Good documents → their passage rows, pending for the staging table (all of a document's passages in
        one append). Returns the documents."""
        if good.num_rows:
            passages = to_passages(good)
            n = passages.num_rows
            passages = (passages.append_column(S.MODEL, pa.array([self.model] * n, pa.string()))
                        .append_column(S.PASSAGE_SETTINGS, pa.array([self.passage_settings] * n, pa.string()))
                        .append_column(S.EMBEDDED_AT, pa.array([utcnow()] * n, S.TIMESTAMP))
                        .append_column(S.RUN_ID, pa.array([self.run_id] * n, pa.string())))
            self._pending.append(passages)
            self.pending_rows += n
            self.passages_written += n
            self.rows_written += good.num_rows
            self._written(good[S.ID].to_pylist(), good[S.ID_KEY].to_numpy(zero_copy_only=False))
        return good

    def _written(self, ids: list[str], keys: np.ndarray | None = None) -> None:
        if self.keep_written:
            self.written_ids.update(ids)
        if self.ids.track_written:
            self.ids.mark_written(keys if keys is not None else [id_hash(i) for i in ids])

    def _check_ids(self, batch: pa.Table, compare: bool) -> tuple[pa.Table, np.ndarray]:
        """Mark the batch's duplicate ids (a later row of an id already seen) and, when ``compare``, each row's
        NEW / CHANGED / UNCHANGED (``NONE`` otherwise) against passages: one call on the id state, with the keys
        the readers hashed (``_id_key``, ``_content_key``); no per-row Python here but for the duplicates."""
        n = batch.num_rows
        start = self.rows_read - n  # position of the batch's first row in the input (already counted)
        keyed = np.flatnonzero(_mask(pc.is_valid(batch[S.ID_KEY])))  # rows with an id, good or bad
        if not len(keyed):
            return batch, np.full(n, NONE, np.int8)
        rows = batch.take(pa.array(keyed, pa.int64())).select([S.ID_KEY, S.CONTENT_KEY, S.REASON_CODE, S.SOURCE,
                                                                 S.ROW, S.DELETED])
        good = _mask(pc.is_null(rows[S.REASON_CODE]))
        # a row's place: its source's index << 41 | its row number; a row without a number (Parquet) gets a unique
        # stand-in: flag bit 40, its position in the input
        number = pc.fill_null(rows[S.ROW], -1).to_numpy(zero_copy_only=False)
        number = np.where(number >= 0, number, 1 << 40 | (start + keyed))
        wheres = np.where(good, self._source_numbers(rows[S.SOURCE]) << 41 | number, NONE)
        contents = None
        if compare:  # a delete marker has no content: compared as 0, its status unused (markers are not planned)
            contents = pc.fill_null(rows[S.CONTENT_KEY], 0).to_numpy(zero_copy_only=False)
        firsts, compared = self.ids.take(rows[S.ID_KEY].to_numpy(zero_copy_only=False), wheres, contents)
        status = np.full(n, NONE, np.int8)
        status[keyed] = compared
        dup = np.flatnonzero((wheres != NONE) & (firsts != wheres))
        if len(dup):
            codes, reasons, raws = (batch[c].to_pylist() for c in (S.REASON_CODE, S.REASON, S.RAW))
            ids = batch[S.ID].take(pa.array(keyed[dup], pa.int64())).to_pylist()
            for k, doc_id, first in zip(keyed[dup].tolist(), ids, firsts[dup].tolist()):
                at = self.sources[first >> 41] + ("" if first >> 40 & 1 else f":{first & ((1 << 40) - 1)}")
                codes[k], reasons[k] = "duplicate_id", f"duplicate id '{doc_id}' (first seen at {at})"
                raws[k] = _row_json(batch, k)
            for name, values in ((S.REASON_CODE, codes), (S.REASON, reasons), (S.RAW, raws)):
                batch = batch.set_column(batch.schema.get_field_index(name), name, pa.array(values, pa.string()))
        return batch, status

    def _source_numbers(self, sources: pa.ChunkedArray) -> np.ndarray:
        """Each row's input file as its index in ``sources`` (numbered as first seen)."""
        encoded = pc.dictionary_encode(sources.combine_chunks())
        numbers = []
        for name in encoded.dictionary.to_pylist():
            if name not in self._source_index:
                self._source_index[name] = len(self.sources)
                self.sources.append(name)
            numbers.append(self._source_index[name])
        return np.array(numbers, np.int64)[encoded.indices.to_numpy(zero_copy_only=False)]

    def take_pending(self) -> pa.Table:
        out = pa.concat_tables(self._pending)
        self._pending, self.pending_rows = [], 0
        return out

    def _hold_bad(self, bad: pa.Table) -> None:
        self._bad.append(bad.select([S.SOURCE, S.ROW, S.ID, S.REASON_CODE, S.REASON, S.RAW]))
        self._bad_rows += bad.num_rows
        if self.quarantine is not None and self._bad_rows >= QUARANTINE_FLUSH_ROWS:
            rows = self.quarantine_table()
            self.quarantine(rows)
            self.quarantine_flushed += rows.num_rows

    def quarantine_table(self) -> pa.Table:
        """The bad rows held since the last flush, as the quarantine table stores them (and no longer held)."""
        rows = S.quarantine_rows(pa.concat_tables(self._bad) if self._bad else None, self.run_id, "index")
        self._bad, self._bad_rows = [], 0
        return rows


def to_passages(docs: pa.Table) -> pa.Table:
    """Embedded documents (one row each, ``vector`` a list with one vector per passage, ``_spans_start`` /
    ``_spans_end`` their offsets) → one row per passage: ``passage_id`` = ``<id>#<n>``, ``passage`` = n, the offsets,
    ``text`` the passage's own text; the other columns repeat the document's."""
    vectors = docs[S.VECTOR].combine_chunks()
    parents = pc.list_parent_indices(vectors).to_numpy(zero_copy_only=False)
    lengths = pc.list_value_length(vectors).to_numpy(zero_copy_only=False)
    firsts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    numbers = np.arange(len(parents)) - firsts[parents]
    starts = pc.list_flatten(docs[S.SPANS_START]).to_numpy(zero_copy_only=False)
    ends = pc.list_flatten(docs[S.SPANS_END]).to_numpy(zero_copy_only=False)
    rows = docs.drop_columns([S.VECTOR, S.SPANS_START, S.SPANS_END]).take(pa.array(parents, pa.int64()))
    ids, texts = rows[S.ID].to_pylist(), rows[S.TEXT].to_pylist()
    rows = rows.set_column(rows.schema.get_field_index(S.TEXT), S.TEXT,
                           pa.array([(t or "")[a:b] for t, a, b in zip(texts, starts, ends)], pa.string()))
    at = rows.schema.get_field_index(S.ID) + 1
    for name, values in ((S.PASSAGE_END, pa.array(ends, pa.int64())), (S.PASSAGE_START, pa.array(starts, pa.int64())),
                         (S.PASSAGE, pa.array(numbers, pa.int32())),
                         (S.PASSAGE_ID, pa.array([f"{i}#{n}" for i, n in zip(ids, numbers)], pa.string()))):
        rows = rows.add_column(at, name, values)
    return rows.append_column(S.VECTOR, pc.list_flatten(vectors))


def _mask(values) -> np.ndarray:
    """A boolean Arrow column or array as a numpy mask."""
    return values.to_numpy(zero_copy_only=False).astype(bool, copy=False)


def _row_json(batch: pa.Table, i: int) -> str:
    """The input fields of one row, as the raw text of a quarantined duplicate."""
    import json

    row = batch.slice(i, 1).to_pylist()[0]
    inputs = {k: v for k, v in row.items() if k not in _NOT_INPUT and not k.startswith("_")}
    return json.dumps(inputs, ensure_ascii=False)[:4096]


_NOT_INPUT = {S.VECTOR, S.CONTENT_HASH, S.SOURCE, S.ROW, S.REASON_CODE, S.REASON, S.RAW}
