"""The index job: corpus → validate → embed (Ray actor pool) → stage → one commit to ``passages``.

Reads top to bottom::

    read_corpus (validated blocks) → map_batches(Embedder, actor pool) → sink on the driver:
        good rows → staging table (durable, invisible)      bad rows → quarantine
    → one merge_insert commit to passages (tagged with the run id) → ANN + full-text indexes
    → report: rows read = written + quarantined

Example::

    report = run(load_config("configs/demo.yaml"))
    report["rows"]["written"]
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import schema as S
from pipelines.faults import maybe_fail
from pipelines.report import (Progress, Timer, new_run_id, nodes_line, redact_uri, refuse_used_run_id, save_report,
                              utcnow)
from pipelines.runtime import count_nodes

log = logging.getLogger("batchrank.index")
FLUSH_ROWS = 4096  # rows buffered on the driver before a staging append ...
FLUSH_SECONDS = 2.0  # ... or this long: what a killed driver loses (and a rerun embeds again) stays small
LOCAL_READ_BYTES = 256 << 20  # an incremental run reads a corpus up to this size in-process (no read tasks)
FIRST_PLAN_BYTES = 1 << 20  # a first run plans (and may embed on the driver) only a corpus this small
# Small blocks (Ray Data's default is 128 MiB) keep every embedding actor fed, progress live and
# driver memory flat; a block of 64 rows with 384-d vectors is about 100 KiB.
BLOCK_BYTES = 256 * 1024
# Blocks in flight (read, waiting for an actor, embedded, waiting for the driver) are capped: reading is faster
# than embedding, and without a cap the backlog grew with the corpus (108 MiB of object store at 250k short
# documents, 394 MiB at 1M; benchmarks/memory_stream.py).
PIPELINE_OBJECT_STORE_BYTES = 128 << 20


def run(cfg, *, run_id: str | None = None, save: bool = True) -> dict[str, Any]:
    """Index the configured corpus; return the run report (also written as JSON unless ``save`` is False: the
    nightly job writes one report for all its stages).

    On failure the report is written with ``status: failed`` and the error, then the error is
    raised again; the previous ``passages`` version is untouched.
    """
    cfg.require("corpus", command="batchrank index")
    from pipelines.locks import RunLock

    if run_id is not None and save:  # a caller's id (a nightly checks its own once, for both tables)
        refuse_used_run_id(cfg, run_id, (cfg.storage.passages_table,))
    run_id = run_id or new_run_id("index")
    state = _RunState(run_id, cfg.embed.identity)
    lock = RunLock(cfg.storage, cfg.storage.passages_table, run_id, job="index",
                   wait_seconds=cfg.lock.wait_seconds, stale_seconds=cfg.lock.stale_seconds)
    try:
        with lock:
            state.report["lock"] = lock.report
            state.lock = lock
            _index(cfg, state)
    except BaseException as exc:
        from pipelines.locks import LockBusy

        state.report.update(status="refused" if isinstance(exc, LockBusy) else "failed",
                            error=f"{type(exc).__name__}: {exc}")
        exc.batchrank_report = _finish(cfg, state, save)  # the CLI prints its summary
        raise
    return _finish(cfg, state, save)


class _RunState:
    """What a run has done so far: the sink's counters, stage timings and the report being built."""

    def __init__(self, run_id: str, model: str):
        self.run_id = run_id
        self.sink = _Sink(run_id, model)
        self.known: dict[str, str] = {}  # {id: content hash} in passages when the run started
        self.cluster = None
        self.lock = None  # the table's RunLock, checked right before the commit
        self.timer, self.t0 = Timer(), time.perf_counter()
        self.report: dict[str, Any] = {"job": "index", "run_id": run_id, "status": "running",
                                       "started_at": utcnow().isoformat()}


def _index(cfg, state: _RunState) -> None:
    import ray.data

    from pipelines.corpus import expand_paths, read_local
    from pipelines.runtime import check_not_in_job_package, init_ray
    from pipelines.store import Store, StoreError

    run_id, sink, timer, report = state.run_id, state.sink, state.timer, state.report
    store = Store(cfg.storage)
    e, name = cfg.embed, cfg.storage.passages_table

    with timer("startup"):
        expand_paths(cfg.corpus.path, cfg.storage.storage_options)  # fail fast on a missing corpus, before Ray starts
        check_not_in_job_package(cfg.storage.uri, "storage.uri")
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # deterministic: the first row of a duplicated id wins
        ctx.enable_progress_bars = False  # our own progress line below, readable in job logs too
        ctx.target_max_block_size = BLOCK_BYTES
        ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
            object_store_memory=PIPELINE_OBJECT_STORE_BYTES)
        cluster = state.cluster = init_ray(cfg.ray)  # before LanceDB loads: Ray forks processes, LanceDB's runtime dislikes forks
        built_with = store.passages_model()
        rebuild = built_with is not None and built_with != e.identity
        if rebuild and cfg.corpus.mode == "changes":
            raise StoreError(
                f"'{name}' was built with '{built_with}' and embed.model is now '{e.identity}': a model change "
                "re-embeds every document, and a change feed does not hold them all; run this once with "
                "corpus.mode: snapshot on the full corpus (or set embed.model back)")
        known = {} if rebuild else store.content_hashes()
        state.known = known
        report["mode"] = "rebuild" if rebuild else "incremental" if known else "full"
        if rebuild:
            report["model_change"] = {"from": built_with, "to": e.identity}
        report["cluster"] = {"address": cluster.address, "nodes": cluster.nodes, "cpus": cluster.cpus,
                             "gpus": cluster.gpus}
        # A small delta is embedded right here: the model loads while the corpus is compared.
        preload = _Preload(cfg) if known and e.local_max_rows else None
        # Plan first (compare, then embed only what the plan says) when there is something to compare with, or
        # when the corpus is tiny: the plan costs little and a tiny corpus then needs no actor pool. A first run
        # (or a rebuild) of anything larger streams in one pass, holding nothing per document but its id's hash.
        plan_first = bool(known) or read_local(cfg, max_bytes=FIRST_PLAN_BYTES) is not None
        staged = _resume(cfg, state, store)
        sink.track_ids = plan_first or rebuild or bool(sink.done)

    log.info("run %s: indexing %s into %s/%s (%s)", run_id, redact_uri(str(cfg.corpus.path)),
             redact_uri(cfg.storage.uri), name, report["mode"])
    deletes = []
    try:
        if plan_first:
            with timer("plan"), Progress("compare", unit="docs") as progress:
                todo = _plan(cfg, sink, known, progress)
            _resume_planned(state, staged, todo)
            deletes = _deletions(cfg, state, known) if known else []
            report["plan"] = {"embed": len(todo), "unchanged": sink.rows_unchanged, "delete": len(deletes)}
            if todo:
                local = len(todo) <= e.local_max_rows
                report["plan"]["embedded_on"] = "driver" if local else "actors"
                batches = read_local(cfg, max_bytes=LOCAL_READ_BYTES) if local else None
                if batches is not None:  # a small delta of a small corpus: no Ray at all
                    batches = (_keep_planned(b, todo) for b in batches)
                else:
                    ds = _read(cfg).map_batches(_keep_planned, fn_kwargs={"todo": todo}, batch_format="pyarrow",
                                                batch_size=None, num_cpus=_read_cpus())
                    batches = (ds if local else _embed_with_actors(cfg, ds, state)).iter_batches(
                        batch_format="pyarrow", batch_size=None, prefetch_batches=1)
                embedder = (preload.get() if preload is not None else _driver_embedder(cfg)) if local else None
                staged = _stream(cfg, state, batches, store, staged, embedder=embedder, planned=todo)
                missing = set(todo) - sink.written_ids
                if missing:
                    raise StoreError(f"{len(missing):,} document(s) changed while this run was indexing them (e.g. "
                                     f"{min(missing)!r}); nothing was written: run the index job again once "
                                     "the corpus is no longer being written")
        else:
            ds = _read(cfg)
            if sink.done:  # what a killed run staged is not embedded again (the sink counts it as written)
                ds = ds.map_batches(_skip_resumed, fn_kwargs={"done": sink.done}, batch_format="pyarrow",
                                    batch_size=None, num_cpus=_read_cpus())
            ds = _embed_with_actors(cfg, ds, state)
            staged = _stream(cfg, state, ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=1),
                             store, staged)
            _drop_stale_resumed(state, staged)
        if rebuild:  # the overwrite drops what the new model's set lacks: guarded like any deletion
            have = store.content_hashes()
            deletes = _rebuild_deletions(cfg, state, sorted(set(have) - sink.written_ids), len(have))
        if staged is not None and sink.done:
            _keep_one_row_per_id(state, staged)
        report["deleted_ids_sample"] = [_show_id(i) for i in deletes[:20]]

        from pipelines.runtime import actor_restarts

        report["embed_actors"] = actor_restarts("Embedder")  # a killed actor is restarted; its task retried
        with timer("quarantine_write"):
            store.append_quarantine(sink.quarantine_table())
        maybe_fail("before_commit")
        with timer("commit"):
            before = store.open(name)
            report["passages_before"] = before.count_rows() if before is not None else 0
            if staged is not None or (deletes and not rebuild):
                if state.lock is not None:
                    state.lock.ensure_held()  # a run whose lease another run took must not commit (LockLost)
                version = store.commit_passages(staged, run_id, deletes=[] if rebuild else deletes,
                                                replace=rebuild)
                report["table_tag"] = run_id
            else:  # nothing new, changed or deleted: no new version
                version = before.version if before is not None else None
        if staged is not None:  # published: the next run has nothing to resume
            staged.drop()
            staged = None
        sink.rows_deleted = len(deletes)
        maybe_fail("after_commit")
        report["committed_version"] = version
        with timer("upkeep"):
            try:
                report["upkeep"] = store.upkeep(name, index_cfg=cfg.index, maint=cfg.maintenance,
                                                tag=report.get("table_tag")) if version is not None else {}
            except Exception as exc:
                raise StoreError(f"the commit is published ({name} v{version}), but the index upkeep after it "
                                 f"failed: {type(exc).__name__}: {exc}; run the job again to bring the indexes up "
                                 "to date (nothing will be embedded again)") from exc
        report["indexes"] = report["upkeep"].get("indexes", {})
        report["status"] = "succeeded"
    finally:
        # A failed run keeps its staging table: the next run (holding the lock) resumes from it.
        if preload is not None:
            preload.discard()


def _read_cpus() -> float:
    from pipelines.runtime import READ_CPUS

    return READ_CPUS


def _read(cfg):
    from pipelines.corpus import read_corpus
    from pipelines.validate import RowSpec

    return read_corpus(cfg.corpus, RowSpec.from_config(cfg), read_cpus=_read_cpus(),
                       storage_options=cfg.storage.storage_options)


def _embed_with_actors(cfg, ds, state: _RunState):
    """The embedding actor pool (one model per actor; GPUs when configured)."""
    import ray.data

    from pipelines.embed import Embedder
    from pipelines.runtime import actor_device, actor_options, actor_resources

    e = cfg.embed
    cpus, gpus = actor_resources(state.cluster, e.actors, e.cpus_per_actor, e.gpus_per_actor)
    state.report["cluster"].update(actors=e.actors, cpus_per_actor=cpus, gpus_per_actor=gpus)
    return ds.map_batches(
        Embedder,
        fn_constructor_kwargs=dict(
            model=e.model, batch_size=e.batch_size, device=actor_device(e.device, gpus), dtype=e.dtype,
            max_seq_length=e.max_seq_length, normalize=e.normalize, trust_remote_code=e.trust_remote_code,
            num_threads=e.cpus_per_actor, backend=e.backend, batch_tokens=e.batch_tokens,
        ),
        # One task in flight per actor: a killed driver's actors finish at most one task each, wasted, and with
        # preserve_order no finished block waits behind a second task (measured: same speed as two; 2k SciFact).
        compute=ray.data.ActorPoolStrategy(size=e.actors, max_tasks_in_flight_per_actor=1),
        num_cpus=cpus,
        num_gpus=gpus,
        batch_size=e.rows_per_call,
        batch_format="pyarrow",
        **actor_options(),
    )


def _stream(cfg, state: _RunState, batches, store, staged=None, *, embedder=None,
            planned: dict[str, str] | None = None):
    """Drain the embedded stream into the (resumable) staging table; return it (None when no row was staged).
    Rows are appended every ``FLUSH_ROWS`` rows or ``FLUSH_SECONDS``, so a killed driver loses little."""
    sink, timer = state.sink, state.timer
    flushed = time.monotonic()
    with timer("pipeline"), Progress("index", unit="docs") as progress:
        for batch in batches:
            if embedder is not None:
                with timer("embed_on_driver"):
                    batch = embedder(batch)
            if planned is None:
                good, bad = sink.split(batch)
            else:
                good, bad = sink.embedded(batch, planned), batch.slice(0, 0)
            if staged is None and good.num_rows:
                dim = good.schema.field(S.VECTOR).type.list_size
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


def _plan(cfg, sink: _Sink, known: dict[str, str], progress) -> dict[str, str]:
    """First pass of an incremental run: compare every corpus row with ``passages`` by id and content hash,
    without embedding anything. Counts and quarantines as it goes; returns {id: content hash} of the documents
    to embed (new or changed). A corpus of at most ``LOCAL_READ_BYTES`` is read right here (the same readers and
    validation; read tasks would cost more than the reading), a larger one by Ray read tasks."""
    from pipelines.corpus import read_local

    batches = read_local(cfg, max_bytes=LOCAL_READ_BYTES)
    if batches is None:
        batches = _read(cfg).drop_columns([S.EMBED_INPUT]).iter_batches(batch_format="pyarrow", batch_size=None,
                                                                       prefetch_batches=1)
    todo: dict[str, str] = {}
    for batch in batches:
        todo.update(sink.plan(batch, known))
        progress.update(batch.num_rows)
    return todo


def _deletions(cfg, state: _RunState, known: dict[str, str]) -> list[str]:
    """Ids to remove from passages: those a snapshot no longer holds, or those a change feed marks deleted.
    A snapshot missing more than ``corpus.max_delete_fraction`` of the table is refused (a truncated file); one
    with rows that could not be read (no id to be had: a torn line, an unreadable file) proves no absence, so its
    deletions are withheld (``corpus.delete_despite_unreadable`` allows them)."""
    c, sink = cfg.corpus, state.sink
    if c.mode == "changes":
        return sorted(i for i in sink.delete_markers if i in known)
    gone = sorted(set(known) - sink.seen_ids)
    _check_delete_fraction(cfg, len(gone), len(known), "the corpus snapshot lacks")
    if gone and sink.unidentified and not c.delete_despite_unreadable:
        state.report["deletions_withheld"] = {
            "documents": len(gone), "ids_sample": [_show_id(i) for i in gone[:20]],
            "unreadable_rows": sink.unidentified, "reasons": dict(sorted(sink.unidentified_reasons.items()))}
        log.warning("%s document(s) absent from the snapshot were NOT deleted: %s input row(s) could not be read "
                    "(no id), and an absent document may be one of them; fix the input (see the quarantine), or "
                    "set corpus.delete_despite_unreadable: true", f"{len(gone):,}", f"{sink.unidentified:,}")
        return []
    return gone


def _rebuild_deletions(cfg, state: _RunState, gone: list[str], n_table: int) -> list[str]:
    """What a model change's overwrite drops (documents the new model's set lacks, quarantined ones included),
    under the same guards as any deletion; a rebuild cannot withhold them, so it is refused instead."""
    from pipelines.store import StoreError

    sink = state.sink
    _check_delete_fraction(cfg, len(gone), n_table, "the model change would drop")
    if gone and sink.unidentified and not cfg.corpus.delete_despite_unreadable:
        raise StoreError(
            f"the model change would drop {len(gone):,} document(s) absent from the new model's set (e.g. "
            f"{_show_id(gone[0])!r}), and {sink.unidentified:,} input row(s) could not be read (no id), so they may be "
            "among them; fix the input (see the quarantine table) and run again, or set "
            "corpus.delete_despite_unreadable: true. Nothing was written")
    return gone


def _check_delete_fraction(cfg, n_gone: int, n_table: int, what: str) -> None:
    from pipelines.store import StoreError

    c = cfg.corpus
    if n_table and n_gone > c.max_delete_fraction * n_table:
        raise StoreError(
            f"{what} {n_gone:,} of the {n_table:,} documents in '{cfg.storage.passages_table}' "
            f"({n_gone / n_table:.0%}), over corpus.max_delete_fraction={c.max_delete_fraction}; if the corpus really "
            "shrank, raise it (1 allows any deletion); if the input holds only changes, set corpus.mode: changes. "
            "Nothing was written")


def _show_id(doc_id: str, limit: int = 200) -> str:
    """An id cut for display only (decisions always use the whole id)."""
    return doc_id if len(doc_id) <= limit else f"{doc_id[:limit]}... [{len(doc_id):,} chars]"


def _keep_planned(batch: pa.Table, todo: dict[str, str]) -> pa.Table:
    """Second pass of an incremental run (in the read tasks, or here): keep the rows the plan embeds, by id and
    content hash (a later duplicate with other content was quarantined by the plan; the sink drops a later
    duplicate with the same content)."""
    keep = [todo.get(i) == h for i, h in zip(batch[S.ID].to_pylist(), batch[S.CONTENT_HASH].to_pylist())]
    return batch.filter(pa.array(keep, pa.bool_()))


def _skip_resumed(batch: pa.Table, done: set[tuple[str, str]]) -> pa.Table:
    """In the read tasks of a resumed run: blank the model input of rows a killed run already staged (same id,
    same content), so that the embedding actors pass them through; the sink counts them."""
    skip = [(i, h) in done for i, h in zip(batch[S.ID].to_pylist(), batch[S.CONTENT_HASH].to_pylist())]
    if not any(skip):
        return batch
    at = batch.schema.get_field_index(S.EMBED_INPUT)
    return batch.set_column(at, S.EMBED_INPUT, pc.if_else(pa.array(skip, pa.bool_()), pa.scalar(None, pa.string()),
                                                          batch[S.EMBED_INPUT].cast(pa.string())))


def _resume(cfg, state: _RunState, store):
    """The staging table a killed run left (when its rows are this model's), with ``sink.done`` set to its
    {id: content hash}; None when there is none. Per-run staging tables of older releases are dropped."""
    name = cfg.storage.passages_table
    dead = store.drop_dead_staging(name)
    existing = f"_staging-{name}"
    if existing not in store.table_names():
        return None
    try:
        dim = store.db.open_table(existing).schema.field(S.VECTOR).type.list_size
    except (KeyError, AttributeError):
        dim = 0
    staged = store.stage(name, state.run_id, S.passages_schema(dict(cfg.corpus.metadata_fields), dim),
                         resumable=True)
    if not staged.resume():
        return None
    cols = staged.columns([S.ID, S.CONTENT_HASH, S.MODEL, S.RUN_ID])
    models = set(cols[S.MODEL].to_pylist())
    if models - {cfg.embed.identity}:
        log.warning("dropping %s: staged with %s, and embed.model is now %s", existing, sorted(models),
                    cfg.embed.identity)
        staged.drop()
        return None
    state.sink.done = set(zip(cols[S.ID].to_pylist(), cols[S.CONTENT_HASH].to_pylist()))
    state.report["resume"] = {"staged_rows": staged.rows, "from_runs": sorted(set(cols[S.RUN_ID].to_pylist())),
                              "dropped_dead_staging": dead}
    log.info("resuming: %s row(s) staged by killed run(s) %s are not embedded again", f"{staged.rows:,}",
             ", ".join(state.report["resume"]["from_runs"]))
    return staged


def _resume_planned(state: _RunState, staged, todo: dict[str, str]) -> None:
    """Incremental run: planned documents a killed run already staged (same content) are done; staged rows the
    plan no longer wants (unchanged since, changed again, or gone) leave the staging table."""
    sink = state.sink
    if not sink.done:
        return
    resumed = sorted({i for i, h in sink.done if todo.get(i) == h})
    hashes = [todo.pop(i) for i in resumed]
    sink.resume(resumed, hashes)
    _drop_stale_resumed(state, staged)


def _drop_stale_resumed(state: _RunState, staged) -> None:
    """Staged rows of a killed run that this run did not take over (the corpus changed since) are deleted."""
    sink = state.sink
    stale = sorted({i for i, _ in sink.done if i not in sink.resumed})
    if stale:
        staged.delete_ids(stale, not_run=state.run_id)
    if sink.done:
        state.report["resume"].update(taken_over=sink.rows_resumed, dropped=len(stale))


def _keep_one_row_per_id(state: _RunState, staged) -> None:
    """Before the commit of a resumed run: exactly one staged row per id, the one with the content this run
    took over (or embedded). Two killed runs can leave two versions of a changed document in the staging table;
    publishing both would put the id in passages twice."""
    cols = staged.columns([S.ID, S.CONTENT_HASH, S.RUN_ID])
    rows: dict[str, list[tuple[str, str]]] = {}
    for i, h, r in zip(cols[S.ID].to_pylist(), cols[S.CONTENT_HASH].to_pylist(), cols[S.RUN_ID].to_pylist()):
        rows.setdefault(i, []).append((h, r))
    keep = {}
    for i, versions in rows.items():
        if len(versions) < 2:
            continue
        mine = [v for v in versions if v[1] == state.run_id]  # embedded by this run: the corpus's content now
        wanted = mine or [v for v in versions if v[0] == state.sink.resumed.get(i)] or versions
        keep[i] = max(wanted, key=lambda v: v[1])
    if keep:
        staged.keep_only(keep)
        state.report.setdefault("resume", {})["duplicates_dropped"] = sum(len(rows[i]) - 1 for i in keep)


def _driver_embedder(cfg):
    """The bi-encoder in this process, for a run small enough to embed here."""
    from pipelines.embed import Embedder

    e = cfg.embed
    return Embedder(e.model, batch_size=e.batch_size, device=e.device, dtype=e.dtype, max_seq_length=e.max_seq_length,
                    normalize=e.normalize, trust_remote_code=e.trust_remote_code, num_threads=os.cpu_count(),
                    backend=e.backend, batch_tokens=e.batch_tokens)


class _Preload:
    """Loads the bi-encoder on the driver in a background thread, for deltas small enough to embed here."""

    def __init__(self, cfg):
        import threading

        self._cfg, self._result, self._error = cfg, None, None
        self._thread = threading.Thread(target=self._load, name="batchrank-preload", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        try:
            self._result = _driver_embedder(self._cfg)
        except BaseException as exc:  # surfaced by get()
            self._error = exc

    def get(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result

    def discard(self) -> None:
        """Drop the model; first let a load still under way finish: a daemon thread killed mid-import at exit
        prints torch tracebacks over a failed run's one-line error."""
        self._thread.join()
        self._result = None


def _rows(sink: _Sink, *, failed: bool) -> dict[str, Any]:
    """Row accounting: read = written + unchanged (already in passages, not embedded) + delete markers (a change
    feed's) + quarantined (+ staged but not published, when the run failed)."""
    written, unpublished = (0, sink.rows_written) if failed else (sink.rows_written, 0)
    rows = {"read": sink.rows_read, "written": written, "unchanged": sink.rows_unchanged,
            "delete_markers": sink.rows_delete_markers, "quarantined": sink.rows_quarantined}
    if failed:
        rows["not_published_run_failed"] = unpublished
    if sink.rows_resumed:
        rows["resumed_from_killed_run"] = sink.rows_resumed  # part of written: staged before, not embedded again
    rows["reconciled"] = sink.rows_read == (written + sink.rows_unchanged + sink.rows_delete_markers
                                            + sink.rows_quarantined + unpublished)
    return rows


def _finish(cfg, state: _RunState, save: bool = True) -> dict[str, Any]:
    """Complete the report from the run's counters, write it as JSON, return it."""
    from pipelines.store import Store

    sink, timer, report = state.sink, state.timer, state.report
    seconds = dict(timer.seconds, embed_busy_sum=round(sink.embed_seconds, 3),
                   total=round(time.perf_counter() - state.t0, 3))
    try:
        table = Store(cfg.storage).open(cfg.storage.passages_table)
        version, rows = (table.version, table.count_rows()) if table is not None else (None, 0)
    except Exception as exc:  # the report must still be written when storage is what failed
        version, rows = None, f"unreadable: {exc}"
    pipeline_s = timer.seconds.get("pipeline")
    succeeded = report["status"] == "succeeded"
    published = succeeded or report.get("committed_version") is not None  # upkeep can fail after the commit
    updated = sum(1 for i in sink.written_ids if i in state.known) if published else 0
    embedded = sink.rows_written - sink.rows_resumed
    report.update({
        "finished_at": utcnow().isoformat(),
        "corpus": cfg.corpus.path,
        "corpus_mode": cfg.corpus.mode,
        "storage": redact_uri(cfg.storage.uri),
        "model": cfg.embed.identity,
        "rows": _rows(sink, failed=not published),
        "passages": {"before": report.pop("passages_before", None),
                     "added": (sink.rows_written - updated) if published else 0, "updated": updated,
                     "deleted": sink.rows_deleted if published else 0, "after": rows},
        "quarantine_reasons": dict(sorted(sink.reasons.items())),
        "docs_per_second": round(embedded / pipeline_s, 2) if pipeline_s else None,
        "docs_per_second_end_to_end": round(embedded / seconds["total"], 2) if seconds["total"] else None,
        "seconds": seconds,
        "nodes": {"embed": dict(sorted(sink.nodes.items()))},
        "table": {"name": cfg.storage.passages_table, "version": version, "rows": rows,
                  "tag": report.pop("table_tag", None), "committed_version": report.pop("committed_version", None)},
    })
    report.setdefault("indexes", {})
    return save_report(report, cfg) if save else report


class _Sink:
    """Driver-side end of the stream: splits good from bad rows, catches duplicate ids, counts."""

    def __init__(self, run_id: str, model: str):
        self.run_id, self.model = run_id, model
        # id's 64-bit hash -> where its first good row was (source index << 41 | row): ~100 bytes per document, the
        # only per-document state of a first run; a collision (p ~ 3e-8 at 1M ids) would quarantine a good row
        self.seen: dict[int, int] = {}
        self.sources: list[str] = []
        self._source_index: dict[str, int] = {}
        self.track_ids = True  # keep seen_ids and written_ids (incremental runs and rebuilds need them)
        self.seen_ids: set[str] = set()  # every id the input holds, good or bad (a snapshot keeps them)
        self.delete_markers: set[str] = set()
        self.written_ids: set[str] = set()
        self.rows_read = self.rows_written = self.rows_unchanged = self.rows_quarantined = 0
        self.rows_delete_markers = self.rows_deleted = 0
        self.embed_seconds = 0.0
        self.nodes: dict[str, int] = {}  # rows embedded per Ray node
        self.reasons: dict[str, int] = {}
        self.unidentified = 0  # bad rows without an id (a torn line, an unreadable file): they prove no absence
        self.unidentified_reasons: dict[str, int] = {}
        self._pending: list[pa.Table] = []
        self.pending_rows = 0
        self._bad: list[pa.Table] = []
        # (id, content hash) pairs staged by killed runs: two killed runs may have staged two versions of one id
        self.done: set[tuple[str, str]] = set()
        self.resumed: dict[str, str] = {}  # {id: content hash} taken over from the staging table
        self.rows_resumed = 0

    def resume(self, ids: list[str], hashes: list[str]) -> None:
        """Count rows a killed run staged as written by this run."""
        self.rows_resumed += len(ids)
        self.rows_written += len(ids)
        self.resumed.update(zip(ids, hashes))
        if self.track_ids:
            self.written_ids.update(ids)

    def _take_in(self, batch: pa.Table) -> tuple[pa.Table, pa.Table, pa.Table]:
        """Count a batch of input rows; return (good rows, delete markers, bad rows), bad ones quarantined."""
        self.rows_read += batch.num_rows
        batch = self._mark_duplicates(batch)
        if self.track_ids:
            self.seen_ids.update(i for i in batch[S.ID].to_pylist() if i is not None)
        is_bad = pc.is_valid(batch[S.REASON_CODE])
        marker = pc.and_(pc.invert(is_bad), pc.fill_null(batch[S.DELETED], False))
        markers = batch.filter(marker)
        if markers.num_rows:
            self.rows_delete_markers += markers.num_rows
            self.delete_markers.update(markers[S.ID].to_pylist())
        bad = batch.filter(is_bad)
        if bad.num_rows:
            self._bad.append(bad.select([S.SOURCE, S.ROW, S.ID, S.REASON_CODE, S.REASON, S.RAW]))
            self.rows_quarantined += bad.num_rows
            for doc_id, code in zip(bad[S.ID].to_pylist(), bad[S.REASON_CODE].to_pylist()):
                self.reasons[code] = self.reasons.get(code, 0) + 1
                if doc_id is None:
                    self.unidentified += 1
                    self.unidentified_reasons[code] = self.unidentified_reasons.get(code, 0) + 1
        good = batch.filter(pc.and_(pc.invert(is_bad), pc.invert(marker)))
        return good, markers, bad

    def plan(self, batch: pa.Table, known: dict[str, str]) -> dict[str, str]:
        """First pass: {id: content hash} of the good rows that are new or changed; the rest is counted."""
        good, _, _ = self._take_in(batch)
        todo = {}
        for i, h in zip(good[S.ID].to_pylist(), good[S.CONTENT_HASH].to_pylist()):
            if known.get(i) == h:
                self.rows_unchanged += 1
            else:
                todo[i] = h
        return todo

    def split(self, batch: pa.Table) -> tuple[pa.Table, pa.Table]:
        """Single pass (a new table, or a rebuild): every good row was embedded."""
        self._count_embedded(batch)
        good, _, bad = self._take_in(batch)
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
        A later copy of an id already taken (a duplicate, quarantined by the plan) is dropped."""
        self._count_embedded(batch)
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
        if good.num_rows:
            now = pa.array([utcnow()] * good.num_rows, S.TIMESTAMP)
            good = (good.append_column(S.MODEL, pa.array([self.model] * good.num_rows))
                    .append_column(S.EMBEDDED_AT, now)
                    .append_column(S.RUN_ID, pa.array([self.run_id] * good.num_rows)))
            self._pending.append(good)
            self.pending_rows += good.num_rows
            self.rows_written += good.num_rows
            if self.track_ids:
                self.written_ids.update(good[S.ID].to_pylist())
        return good

    def _mark_duplicates(self, batch: pa.Table) -> pa.Table:
        ids = batch[S.ID].to_pylist()
        codes = batch[S.REASON_CODE].to_pylist()
        reasons = batch[S.REASON].to_pylist()
        raws = batch[S.RAW].to_pylist()
        sources, rows = batch[S.SOURCE].to_pylist(), batch[S.ROW].to_pylist()
        changed = False
        start = self.rows_read - batch.num_rows  # position of the batch's first row in the input (already counted)
        for i, doc_id in enumerate(ids):
            if codes[i] is not None:
                continue
            src = self._source_index.get(sources[i])
            if src is None:
                src = self._source_index[sources[i]] = len(self.sources)
                self.sources.append(sources[i])
            # a row without a number (Parquet) gets a unique stand-in: flag bit 40, its position in the input
            where = src << 41 | (int(rows[i]) if rows[i] is not None else 1 << 40 | start + i)
            first = self.seen.setdefault(_id_hash(doc_id), where)
            if first != where:
                at = self.sources[first >> 41] + ("" if first >> 40 & 1 else f":{first & ((1 << 40) - 1)}")
                codes[i], reasons[i] = "duplicate_id", f"duplicate id '{doc_id}' (first seen at {at})"
                raws[i] = _row_json(batch, i)
                changed = True
        if not changed:
            return batch
        for name, values in ((S.REASON_CODE, codes), (S.REASON, reasons), (S.RAW, raws)):
            batch = batch.set_column(batch.schema.get_field_index(name), name, pa.array(values, pa.string()))
        return batch

    def take_pending(self) -> pa.Table:
        out = pa.concat_tables(self._pending)
        self._pending, self.pending_rows = [], 0
        return out

    def quarantine_table(self) -> pa.Table:
        if not self._bad:
            return S.QUARANTINE_SCHEMA.empty_table()
        bad = pa.concat_tables(self._bad)
        n = bad.num_rows
        return (bad.append_column(S.RUN_ID, pa.array([self.run_id] * n))
                .append_column(S.JOB, pa.array(["index"] * n))
                .append_column(S.QUARANTINED_AT, pa.array([utcnow()] * n, S.TIMESTAMP)))


def _id_hash(doc_id: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def _row_json(batch: pa.Table, i: int) -> str:
    """The input fields of one row, as the raw text of a quarantined duplicate."""
    import json

    row = batch.slice(i, 1).to_pylist()[0]
    inputs = {k: v for k, v in row.items() if k not in _NOT_INPUT and not k.startswith("_")}
    return json.dumps(inputs, ensure_ascii=False)[:4096]


_NOT_INPUT = {S.VECTOR, S.CONTENT_HASH, S.SOURCE, S.ROW, S.REASON_CODE, S.REASON, S.RAW}


def _reliability_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    if res := report.get("resume"):
        lines.append(f"  resumed: {res.get('taken_over', 0):,} rows staged by killed run(s) "
                     f"{', '.join(res['from_runs'])} taken over, not embedded again"
                     + (f"; {res['dropped']:,} stale staged rows dropped" if res.get("dropped") else ""))
    if (a := report.get("embed_actors") or {}).get("restarts"):
        lines.append(f"  workers: {a['restarts']} embedding actor restart(s) (their tasks were retried)")
    if took := (report.get("lock") or {}).get("took_over"):
        from pipelines.locks import describe

        lines.append(f"  lock: took over from {describe(took)}, which ended without releasing it")
    return lines


def summary(report: dict[str, Any]) -> str:
    """A few lines for humans at the end of a run."""
    r, s = report["rows"], report["seconds"]
    if report["status"] != "succeeded":
        return (f"index run {report['run_id']}: {report['status']} ({report.get('error')})\n"
                f"  rows: {r}\n  the previous table version is intact; report: {report.get('report_path')}")
    p = report["passages"]
    lines = [
        f"index run {report['run_id']}: {report['status']} ({report.get('mode')}"
        + (f", model {report['model_change']['from']} -> {report['model_change']['to']}"
           if report.get("model_change") else "") + ")",
        f"  rows: {r['read']:,} read = {r['written']:,} written + "
        + (f"{r['unchanged']:,} unchanged (not embedded) + " if r.get("unchanged") else "")
        + (f"{r['delete_markers']:,} delete markers + " if r.get("delete_markers") else "")
        + f"{r['quarantined']:,} quarantined"
        + ("" if r["reconciled"] else "  (DOES NOT RECONCILE)"),
        (f"  passages: {p['before'] or 0:,} before, {p['added']:,} added, {p['updated']:,} updated, "
         f"{p['deleted']:,} deleted, {p['after'] if isinstance(p['after'], str) else format(p['after'], ',')} after"),
    ]
    if report["quarantine_reasons"]:
        lines.append("  quarantined: " + ", ".join(f"{k} {v}" for k, v in report["quarantine_reasons"].items()))
    if w := report.get("deletions_withheld"):
        lines.append(f"  deletions: {w['documents']:,} document(s) absent from the snapshot were NOT deleted: "
                     f"{w['unreadable_rows']:,} input row(s) could not be read, and an absent document may be one of "
                     "them; fix the input (see the quarantine), or set corpus.delete_despite_unreadable: true")
    if r["written"]:
        lines.append(f"  speed: {report['docs_per_second']} docs/s in the pipeline, "
                     f"{report['docs_per_second_end_to_end']} docs/s end to end"
                     + (f" (embedded on the {report['plan']['embedded_on']})" if report.get("plan", {}).get(
                         "embedded_on") else ""))
    if line := nodes_line(report.get("nodes", {}), "rows"):
        lines.append(line)
    lines += _reliability_lines(report)
    ix, up = report["indexes"], report.get("upkeep", {})
    ann = ix.get("ann", {})
    ann_state = ("exact search" if ann.get("type") == "exact" else
                 f"{ann.get('type')} trained ({ann.get('reason')})" if ann.get("built") else
                 f"{ann.get('type')} +{ann['rows_added_to_index']:,} rows" if ann.get("rows_added_to_index") else
                 f"{ann.get('type')} up to date")
    lines += [
        "  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in s.items()),
        f"  table: {report['table']['name']} v{report['table']['version']}, {report['table']['rows']:,} rows"
        + (f" (tag {report['table']['tag']})" if report["table"].get("tag") else " (no change: no new version)")
        if report["table"]["version"] is not None else f"  table: {report['table']['name']} not created (no good rows)",
        f"  indexes: ann {ann_state}; fts {'on' if 'fts' in ix else 'off'}"
        + (f"; compacted {up['compaction']['fragments_before']} -> {up['compaction']['fragments']} files"
           if up.get("compaction", {}).get("compacted") else "")
        + (f"; {up['cleanup']['versions_removed']} old versions removed" if up.get("cleanup", {}).get(
            "versions_removed") else "")
        + (f"; expired tags {', '.join(up['tags_expired'])}" if up.get("tags_expired") else ""),
        f"  report: {report['report_path']}",
    ]
    return "\n".join(lines)
