"""An index run's per-document state, held where it can grow: Ray actors that each own one range of id hashes.

A run needs four things per document: where its id was first seen (duplicates are quarantined, the first row
kept), what ``passages`` held for it (content hash: unchanged documents are not embedded again), whether the input
holds it (a snapshot deletes the ids it lacks) and, on a model change, whether it was written again. Held in the
driver, that grew ~400 bytes per document (a 100M-passage corpus would need tens of GiB in one process). Here it
is split by id hash over ``corpus.id_shards`` actors (spread over the cluster's nodes); the driver sends each batch's
ids and keeps only counters and what the run changes (its plan, deletions: the size of the delta, not the corpus).

Reads top to bottom::

    IdTable         one shard's state, and the batch calls on it (also the whole state, in-process, for a corpus
                    small enough: ``LocalIds``)
    LocalIds        the state in this process
    ShardedIds      the same calls, each batch split by id hash over the shard actors
    small_run       a corpus and table small enough that the run's state and table work stay in the driver
    id_state        which of the two a run uses (``corpus.id_shards``)
    id_hash         an id's 64-bit hash (blake2b, keys.py): the state is keyed by it, never by the id itself

Hash keys: two ids colliding on 64 bits (p ~ 3e-4 at 100M ids, 3e-8 at 1M) would make the later one a duplicate
of the earlier; the state keeps each known id's text, so deletions name real ids.

Example::

    ids = id_state(cfg, cluster, small=small_run(cfg, store))
    ids.load_known(store)                           # what passages holds: {id hash: (content hash, id)}
    first, status = ids.take(hashes, wheres, contents)   # int64 arrays in; NONE (-1): no place, no status
    gone = ids.gone("seen")                         # the known ids the input did not hold
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Sequence

import numpy as np

from pipelines.index.keys import id_hash

log = logging.getLogger("batchrank.index")

NEW, CHANGED, UNCHANGED = 0, 1, 2  # a unique good row against what passages holds
NONE = -1  # no place (a quarantined row) or no status, in the id state's int64 / int8 arrays
SMALL_RUN_BYTES = 16 << 20  # a corpus up to this size (and ...
SMALL_RUN_ROWS = 100_000  # ... a passages table up to this many rows) is a small run: its state and table work stay
# in the driver (actors and tasks cost seconds to start, and there is no memory to spare)
KNOWN_SCAN_ROWS = 8_192  # rows per batch when passages' ids are read into the state (bigger batches left the driver
# with more retained heap: +76 MiB after streaming 100k ids in batches of 65,536)
MAX_SHARDS = 64


class IdTable:
    """One shard's per-document state (or all of it, in the driver). Every call takes a batch: one round trip."""

    def __init__(self, track_written: bool = False):
        self.first: dict[int, int] = {}  # id hash -> where its first good row was (source index << 41 | row)
        self.known: dict[int, tuple[int, str]] = {}  # id hash -> (content hash's hash, id) in passages
        self.seen: set[int] = set()  # id hashes of every input row with an id, good or bad (when any is known)
        self.track_written = track_written
        self.written: set[int] = set()  # a model change: id hashes written again

    def load_known(self, hashes: Sequence[int], contents: Sequence[int], ids: Sequence[str]) -> int:
        """Take passages' (id, content) pairs (a document's passages repeat them); return documents held."""
        self.known.update(zip(hashes, zip(contents, ids)))
        return len(self.known)

    def take(self, hashes: np.ndarray, wheres: np.ndarray, contents: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
        """One batch of input rows that have an id, in input order (int64 arrays). ``hashes``: the id's hash;
        ``wheres``: the row's place, for a row that may be a duplicate (``NONE``: already quarantined);
        ``contents``: each row's content hash's hash, to compare with passages (None: no comparison).
        Returns (where each row's id was first seen, ``NONE`` for a quarantined row; NEW / CHANGED / UNCHANGED for a
        compared row that is its id's first, else ``NONE``)."""
        hs, ws = np.asarray(hashes, np.int64).tolist(), np.asarray(wheres, np.int64).tolist()
        cs = np.asarray(contents, np.int64).tolist() if contents is not None else None
        if self.known:  # only a snapshot's deletions need it (known - seen): a first run keeps no seen set
            self.seen.update(hs)
        first, status = [NONE] * len(hs), [NONE] * len(hs)
        setdefault, known = self.first.setdefault, self.known
        for i, (h, where) in enumerate(zip(hs, ws)):
            if where == NONE:
                continue
            at = first[i] = setdefault(h, where)
            if cs is None or at != where:
                continue
            had = known.get(h)
            status[i] = NEW if had is None else UNCHANGED if had[0] == cs[i] else CHANGED
        return np.array(first, np.int64), np.array(status, np.int8)

    def mark_written(self, hashes: Sequence[int] | np.ndarray) -> None:
        if self.track_written:
            self.written.update(np.asarray(hashes, np.int64).tolist())

    def known_ids(self, hashes: Sequence[int] | np.ndarray) -> list[bool]:
        """Whether passages holds each id (a change feed's deletions)."""
        return [h in self.known for h in np.asarray(hashes, np.int64).tolist()]

    def gone(self, by: str) -> list[str]:
        """Known ids the input did not hold (``by="seen"``: a snapshot's deletions) or the run did not write again
        (``by="written"``: what a model change's overwrite drops)."""
        have = self.seen if by == "seen" else self.written
        return [doc_id for h, (_, doc_id) in self.known.items() if h not in have]

    def counts(self) -> dict[str, int]:
        return {"first": len(self.first), "known": len(self.known), "seen": len(self.seen),
                "written": len(self.written), "written_known": sum(1 for h in self.written if h in self.known)}


class LocalIds:
    """The state in this process (a small corpus and table, or tests)."""

    where = "driver"

    def __init__(self, track_written: bool = False):
        self.table = IdTable(track_written)
        self.shards, self.track_written = 0, track_written

    def load_known(self, store) -> int:
        for hashes, contents, ids in _known_batches(store):
            self.table.load_known(hashes, contents, ids)
        return len(self.table.known)

    def load_pairs(self, pairs: dict[str, str]) -> int:
        """Known documents from {id: content hash} (tests)."""
        ids = list(pairs)
        return self.table.load_known([id_hash(i) for i in ids], [id_hash(pairs[i]) for i in ids], ids)

    def take(self, hashes, wheres, contents=None):
        return self.table.take(hashes, wheres, contents)

    def mark_written(self, hashes) -> None:
        self.table.mark_written(hashes)

    def known_ids(self, hashes) -> list[bool]:
        return self.table.known_ids(hashes)

    def gone(self, by: str) -> list[str]:
        return sorted(self.table.gone(by))

    def counts(self) -> dict[str, int]:
        return self.table.counts()

    def close(self) -> None:
        pass


class ShardedIds:
    """The state split by id hash over ``shards`` Ray actors (no CPU reserved: they wait on the driver's calls).
    A shard lost mid-run fails the run (its state cannot be rebuilt); the rerun starts over, resuming what was
    staged."""

    where = "actors"

    def __init__(self, shards: int, track_written: bool = False):
        import ray

        from pipelines.cluster.runtime import worker_env

        actor = ray.remote(IdTable).options(num_cpus=0, max_restarts=0, scheduling_strategy="SPREAD",
                                            runtime_env={"env_vars": worker_env()})
        self.shards, self.track_written = shards, track_written
        self.actors = [actor.remote(track_written) for _ in range(shards)]

    def _split(self, hashes: Sequence[int] | np.ndarray) -> list[np.ndarray]:
        """Row positions per shard (an id hash's shard: its value modulo the shards, never negative)."""
        shard = np.asarray(hashes, np.int64) % self.shards
        order = np.argsort(shard, kind="stable")
        bounds = np.searchsorted(shard[order], np.arange(self.shards + 1))
        return [order[a:b] for a, b in itertools.pairwise(bounds)]

    def _call(self, method: str, parts: list[np.ndarray], *columns: np.ndarray | None) -> list:
        """``method`` on every shard with its rows of each int64 column (None stays None); the answers, None for a
        shard without rows."""
        import ray

        refs = [getattr(a, method).remote(*(None if col is None else col[rows] for col in columns))
                if len(rows) else None for a, rows in zip(self.actors, parts)]
        return [ray.get(r) if r is not None else None for r in refs]

    def load_known(self, store) -> int:
        """passages' ids, read by a Ray task that sends each batch to the shards (the scan's buffers are never the
        driver's: streaming 100k ids here grew it by ~75 MiB); the documents held."""
        import ray

        from pipelines.cluster.runtime import worker_env

        task = ray.remote(max_calls=1)(_route_known).options(num_cpus=1, max_retries=0,
                                                             runtime_env={"env_vars": worker_env()})
        return ray.get(task.remote(store.cfg, self.actors))

    def take(self, hashes, wheres, contents=None):
        hashes, wheres = np.asarray(hashes, np.int64), np.asarray(wheres, np.int64)
        contents = None if contents is None else np.asarray(contents, np.int64)
        parts = self._split(hashes)
        first = np.full(len(hashes), NONE, np.int64)
        status = np.full(len(hashes), NONE, np.int8)
        for rows, answer in zip(parts, self._call("take", parts, hashes, wheres, contents)):
            if answer is not None:
                first[rows], status[rows] = answer
        return first, status

    def mark_written(self, hashes) -> None:
        hashes = np.asarray(hashes, np.int64)
        self._call("mark_written", self._split(hashes), hashes)

    def known_ids(self, hashes) -> list[bool]:
        hashes = np.asarray(hashes, np.int64)
        parts = self._split(hashes)
        out = np.zeros(len(hashes), bool)
        for rows, answer in zip(parts, self._call("known_ids", parts, hashes)):
            if answer is not None:
                out[rows] = answer
        return out.tolist()

    def gone(self, by: str) -> list[str]:
        import ray

        return sorted(i for part in ray.get([a.gone.remote(by) for a in self.actors]) for i in part)

    def counts(self) -> dict[str, int]:
        import ray

        out: dict[str, int] = {}
        for c in ray.get([a.counts.remote() for a in self.actors]):
            for k, v in c.items():
                out[k] = out.get(k, 0) + v
        return out

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []


def small_run(cfg, store) -> bool:
    """A corpus of at most ``SMALL_RUN_BYTES`` on local disk and a passages table of at most ``SMALL_RUN_ROWS``."""
    from pipelines.index.corpus import corpus_size

    size = corpus_size(cfg)
    if size is None or size > SMALL_RUN_BYTES:
        return False
    table = store.open(cfg.storage.passages_table)
    return table is None or table.count_rows() <= SMALL_RUN_ROWS


def id_state(cfg, cluster, *, small: bool, track_written: bool = False) -> LocalIds | ShardedIds:
    """The run's id state: ``corpus.id_shards`` actors; by default (null) in the driver for a ``small`` run, else
    one shard per 4 cluster CPUs (at least 2). 0: always in the driver."""
    shards = cfg.corpus.id_shards
    if shards is None:
        shards = 0 if small or cluster is None else min(MAX_SHARDS, max(2, int(cluster.cpus) // 4))
    if shards == 0 or cluster is None:
        return LocalIds(track_written)
    return ShardedIds(shards, track_written)


def _route_known(storage_cfg, actors: list) -> int:
    """In a Ray task: passages' (id hash, content, id) sent to the shard owning each id; the documents held."""
    import ray

    from pipelines.store import Store

    router = ShardedIds.__new__(ShardedIds)
    router.shards, router.actors = len(actors), actors
    pending: list = []
    for hashes, contents, ids in _known_batches(Store(storage_cfg)):
        parts = [rows.tolist() for rows in router._split(hashes)]
        pending.extend(a.load_known.remote([hashes[i] for i in rows], [contents[i] for i in rows],
                                           [ids[i] for i in rows]) for a, rows in zip(actors, parts) if rows)
        if len(pending) > 4 * len(actors):  # a bounded number of batches in flight
            ray.get(pending)
            pending = []
    ray.get(pending)
    return sum(c["known"] for c in ray.get([a.counts.remote() for a in actors]))


def _known_batches(store) -> Iterable[tuple[list[int], list[int], list[str]]]:
    """passages' (id hash, content hash's hash, id) in batches, streamed: the driver never holds the column."""
    from pipelines import schema as S

    for batch in store.scan_batches(store.cfg.passages_table, [S.ID, S.CONTENT_HASH], batch_rows=KNOWN_SCAN_ROWS):
        ids, contents = batch.column(0).to_pylist(), batch.column(1).to_pylist()
        yield [id_hash(i) for i in ids], [id_hash(c or "") for c in contents], ids
