"""The rerank job's sink: the driver-side end of the stream, between the Scorer actors and the staging table.

Reads top to bottom::

    add(batch)       count queries, pairs (scored / from cache), queries short of candidates, stage time and the
                     Ray node of each stage; add the run's columns (run id, models, passages version, normaliser,
                     settings digest); keep the pairs the model scored for the pair cache
    flush(...)       pending rows → the staging table, newly scored pairs → the pair cache
                     (``take_pending`` and ``write_pairs``, each timed on its own)
    drain(ds, ...)   the whole stream through add(), flushed at the first rows, then every FLUSH_ROWS rows or
                     FLUSH_SECONDS, and at the end (before the commit: whatever happens next, the scores are kept)

The run's identity (``passages_version``, ``cross_encoder_id``, ``settings``, ``normalizer``) is set on the sink
by the job as it learns it, before the first row arrives.

Example::

    sink = Sink(run_id, cfg)
    sink.drain(scored_batches, staged, store, timer)   # or sink.add(batch) ... sink.flush(staged, store, timer)
"""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import schema as S
from pipelines.cluster.runtime import count_nodes
from pipelines.faults import maybe_fail
from pipelines.report import Progress, utcnow
from pipelines.rerank import pair_cache as P

FLUSH_ROWS = 1024  # ranked queries buffered on the driver before a staging append ...
FLUSH_SECONDS = 2.0  # ... or this long (with the newly scored pairs: what a rerun of a killed run re-scores)


class Sink:
    """Driver-side end of the stream: adds the run's columns, counts queries, pairs and stage time, and keeps
    the pairs the model scored until they are written to the pair cache."""

    def __init__(self, run_id: str, cfg):
        self.run_id, self.cfg = run_id, cfg
        self.passages_version: int | None = None
        self.cross_encoder_id: str | None = None
        self.settings = ""
        self.carried = 0  # queries whose previous ranking was carried over
        self.normalizer = ""
        self.ranked = self.pairs = self.scored = self.cached = self.without_candidates = self.short_lists = 0
        self.pairs_written = 0
        self.retrieve_seconds = self.score_seconds = 0.0
        self.nodes: dict[str, dict[str, int]] = {"retrieve": {}, "score": {}}  # queries per Ray node and stage
        self._pending: list[pa.Table] = []
        self._new_pairs: list[pa.Table] = []
        self.pending_rows = 0

    def add(self, batch: pa.Table) -> None:
        n = batch.num_rows
        cands = batch[S.CANDIDATES].to_numpy()
        self.ranked += n
        self.pairs += int(cands.sum())
        self.scored += int(pc.sum(batch[P.PAIRS_SCORED]).as_py() or 0)
        self.cached += int(pc.sum(batch[P.PAIRS_CACHED]).as_py() or 0)
        if self.cfg.rerank.cache:
            self._new_pairs.append(P.new_pairs(batch, self.cross_encoder_id, self.run_id, utcnow()))
        self.without_candidates += int((cands == 0).sum())
        self.short_lists += int((cands < self.cfg.retrieve.k).sum())
        self.retrieve_seconds += float(pc.sum(batch[S.RETRIEVE_SECONDS]).as_py() or 0.0)
        self.score_seconds += float(pc.sum(batch[S.SCORE_SECONDS]).as_py() or 0.0)
        count_nodes(self.nodes["retrieve"], batch[S.RETRIEVE_NODE])
        count_nodes(self.nodes["score"], batch[S.SCORE_NODE])
        extra = {
            S.RUN_ID: pa.array([self.run_id] * n),
            S.BI_ENCODER: pa.array([self.cfg.embed.identity] * n),
            S.CROSS_ENCODER: pa.array([self.cfg.rerank.model] * n),
            S.PASSAGES_VERSION: pa.array([self.passages_version] * n, pa.int64()),
            S.NORMALIZER: pa.array([self.normalizer] * n),
            S.RANKED_AT: pa.array([utcnow()] * n, S.TIMESTAMP),
            S.SETTINGS: pa.array([self.settings] * n),
        }
        for name, values in extra.items():
            batch = batch.append_column(name, values)
        self._pending.append(batch.select(S.RANKINGS_SCHEMA.names))
        self.pending_rows += n

    def take_pending(self) -> pa.Table:
        out = pa.concat_tables(self._pending) if self._pending else S.RANKINGS_SCHEMA.empty_table()
        self._pending, self.pending_rows = [], 0
        return out

    def write_pairs(self, store) -> None:
        """Add the pairs scored since the last call to the pair cache."""
        if self._new_pairs:
            rows, self._new_pairs = pa.concat_tables(self._new_pairs), []
            self.pairs_written += P.write(store, rows)

    def flush(self, staged, store, timer) -> None:
        """The pending rows to the staging table, then the newly scored pairs to the pair cache (so that a rerun
        of a killed run re-uses them)."""
        with timer("stage_writes"):
            staged.add(self.take_pending())
        with timer("cache_writes"):
            self.write_pairs(store)

    def drain(self, batches, staged, store, timer, mark=None) -> None:
        """Every scored batch (an iterable of Arrow tables), flushed to ``staged`` and the pair cache: the first
        rows at once, then in bulk or every ``FLUSH_SECONDS`` (the scores a killed run loses stay few), and once
        more at the end. ``mark``: called with ``first_scored_pair`` when the first scored pair arrives (``Run.mark``)."""
        flushed = time.monotonic()
        with timer("pipeline"), Progress("rerank", unit="queries") as progress:
            for batch in batches:
                self.add(batch)
                if mark is not None and batch.num_rows and pc.sum(batch[P.PAIRS_SCORED]).as_py():
                    mark("first_scored_pair")
                if (self.pending_rows >= FLUSH_ROWS or staged.rows == 0
                        or time.monotonic() - flushed >= FLUSH_SECONDS):
                    self.flush(staged, store, timer)
                    flushed = time.monotonic()
                    maybe_fail("mid_run")
                progress.update(batch.num_rows, pairs=int(pc.sum(batch[S.CANDIDATES]).as_py() or 0),
                                scored=int(pc.sum(batch[P.PAIRS_SCORED]).as_py() or 0))
            self.flush(staged, store, timer)  # before the commit: whatever happens next, the scores are kept
