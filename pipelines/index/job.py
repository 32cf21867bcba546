"""The index job: corpus → validate → embed (Ray actor pool) → stage → one commit to ``passages``.

Reads top to bottom (``_index``)::

    _start           the passage split checked (chunk.py); Ray up; what passages holds decides the run: full,
                     incremental, or a rebuild (another model, or other chunk / document prompt settings), and is
                     loaded into the id state (ids.py: Ray actors by id hash, or the driver for a small run);
                     a killed run's staging table is taken over (resume.py)
    _plan_and_embed  compare every row with passages, no model (deletions: deletions.py); embed only the new
                     and changed rows: on the driver when few (local.py), else on the actor pool
    _stream_all      or, with nothing to compare with: read_corpus → map_batches(Embedder, actor pool) in one pass
                     (the Embedder splits each document into passages and embeds each with the document prompt)
    stage            the sink on the driver (sink.py): good documents → their passage rows → staging table, bad rows
                     → quarantine
    _commit          one commit to passages: the staged passages added, every passage of the documents written
                     again and of the deleted ones removed in it (overwrite on a rebuild), tagged with the run id
    _upkeep          ANN + full-text indexes brought up to date, compaction, old versions cleaned (a Ray task on a
                     worker, table_work.py)
    → report: documents read = written + unchanged + quarantined; passage rows written (summary.py)

Example::

    report = run(load_config("configs/demo.yaml"))
    report["rows"]["written"]
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
from typing import Any

from pipelines import runs
from pipelines.cluster.runtime import READ_CPUS
from pipelines.faults import maybe_fail
from pipelines.index.deletions import deletions, rebuild_change, rebuild_deletions, show_id
from pipelines.index.ids import id_state, small_run
from pipelines.index.local import Preload, local_embedder
from pipelines.index.resume import (
    drop_stale_resumed,
    keep_one_row_per_id,
    keep_planned,
    resume,
    resume_planned,
    skip_resumed,
)
from pipelines.index.sink import FLUSH_ROWS, FLUSH_SECONDS, Sink, coalesce, stage
from pipelines.index.stream import BLOCK_BYTES, embed_actors, pool, read
from pipelines.index.summary import finish_report, summary
from pipelines.index.table_work import builder, committer, upkeeper
from pipelines.report import Progress, redact_uri

__all__ = ["FLUSH_ROWS", "FLUSH_SECONDS", "run", "summary"]  # the flush sizes stay importable here

log = logging.getLogger("batchrank.index")
LOCAL_READ_BYTES = 256 << 20  # a small run's plan, or a small delta's second read, reads up to this in-process
FIRST_PLAN_BYTES = 1 << 20  # a first run plans (and may embed on the driver) only a corpus this small
# The plan keeps the new and changed rows it finds up to this size (the delta's, not the corpus's), so that their
# embedding needs no second read of the corpus (at 1M short documents, reading and checking them took ~25 s)
KEEP_PLANNED_BYTES = 64 << 20
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
    job = runs.start(cfg, "index", sections=("corpus",), command="batchrank index", run_id=run_id, save=save,
                     tables=(cfg.storage.passages_table,))
    state = _RunState(job.run_id, cfg.embed.identity, job, passage_settings=cfg.passage_settings)
    return runs.guarded(job, cfg, body=lambda: _index(cfg, state), finish=lambda: finish_report(cfg, state),
                        lock_table=cfg.storage.passages_table)


class _RunState:
    """What an index run has done so far: the sink's counters, what passages held when it started and the startup's
    decisions; its report, stage timer and lock are the run protocol's (``run``)."""

    def __init__(self, run_id: str, model: str, run: runs.Run | None = None, passage_settings: str | None = None):
        self.run = run if run is not None else runs.Run("index", run_id, save=False, report={})
        self.run_id, self.report, self.timer = run_id, self.run.report, self.run.timer
        self.sink = Sink(run_id, model, passage_settings)
        self.ids = self.sink.ids  # the per-document state (ids.py): in the driver, or Ray actors for a large corpus
        self.known = 0  # documents passages held when the run started
        self.small = True  # a small corpus and table (ids.small_run): its state and table work stay in the driver
        self.updated = 0  # documents of passages written again (changed, or re-embedded by a rebuild)
        self.cluster = self.pool = None  # runtime.Cluster; the embedding pool's (CPUs, GPUs, rows per call)
        self.rebuild = False  # the model changed: every document is embedded again, then one overwrite
        self.plan_first = False  # compare with passages before embedding (or a corpus small enough to)
        self.preload: Preload | None = None  # the model loading on the driver, for a small delta
        self.build_ann = None  # the ANN training as a Ray task on a worker (table_work.py); None: in the upkeep's
        self.commit = None  # the commit as a Ray task on a worker (table_work.py); None: on the driver
        self.upkeep = None  # the upkeep as a Ray task on a worker (table_work.py); None: on the driver
        self.mean_chars: float | None = None  # of the corpus's first rows: sizes a CPU embedding call


def _index(cfg, state: _RunState) -> None:
    """The job's chain, run holding the passages lock."""
    from pipelines.store import Store

    store = Store(cfg.storage)
    state.sink.quarantine = store.append_quarantine  # bad rows appended as they come, never all held here
    staged = _start(cfg, state, store)
    try:
        if state.plan_first:
            staged, deletes = _plan_and_embed(cfg, state, store, staged)
        else:
            staged, deletes = _stream_all(cfg, state, store, staged), []
        version = _commit(cfg, state, store, staged, deletes)
        _upkeep(cfg, state, store, version)
        state.report["status"] = "succeeded"
    finally:
        # A failed run keeps its staging table: the next run (holding the lock) resumes from it.
        if state.preload is not None:
            state.preload.discard()
        with contextlib.suppress(Exception):  # a lost shard: the run's own error is the one to raise
            state.report.setdefault("id_state", {}).update(documents=state.ids.counts())
        state.ids.close()


def _start(cfg, state: _RunState, store):
    """Check the corpus and storage, start Ray, and decide the run from what ``passages`` holds: a first run, an
    incremental one or a model change. Returns the staging table a killed run left (None when there is none)."""
    import ray.data

    from pipelines.cluster.runtime import check_gpus, check_not_in_job_package, init_ray
    from pipelines.index.corpus import expand_paths, mean_input_chars, read_local
    from pipelines.models.prompts import check_passages

    e, name, report = cfg.embed, cfg.storage.passages_table, state.report
    with state.timer("startup"):
        expand_paths(cfg.corpus.path, cfg.storage.storage_options)  # fail fast on a missing corpus, before Ray starts
        check_not_in_job_package(cfg.storage.uri, "storage.uri")
        # the prompts and the passage window, refused here (naming the setting) rather than in every actor; checked
        # while Ray starts (loading the tokenizer imports transformers and torch: ~2 s on 2 cores)
        checker = concurrent.futures.ThreadPoolExecutor(1, "batchrank-check-passages")
        passages_split = checker.submit(check_passages, cfg)
        checker.shutdown(wait=False)
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # deterministic: the first row of a duplicated id wins
        ctx.enable_progress_bars = False  # our own progress line below, readable in job logs too
        ctx.target_max_block_size = BLOCK_BYTES
        ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
            object_store_memory=PIPELINE_OBJECT_STORE_BYTES)
        # Ray before LanceDB loads: Ray forks processes, LanceDB's runtime dislikes forks
        cluster = state.cluster = init_ray(cfg.ray)
        state.run.mark("ray_up")
        state.build_ann = builder(cfg, cluster)  # where an ANN training runs; refused here, before any work
        check_gpus(cluster, {"embed": e.pool})  # GPUs this machine lacks: refused here too
        change = rebuild_change(cfg, store)  # another model, chunking or document prompt: every document again
        rebuild = state.rebuild = change is not None
        # awaited here, before any actor starts: loading the tokenizer imports torch (~1.3 s of CPU), which opening
        # passages above overlaps
        report["passages_split"] = passages_split.result() or {
            "checked": "by the embedding actors (model files not readable on the driver)"}
        # what passages holds, by id hash, in the id state (actors for a large corpus): never all in the driver
        small = state.small = small_run(cfg, store)  # state, reading and table work stay in the driver
        state.ids = state.sink.ids = id_state(cfg, cluster, small=small, track_written=rebuild)
        state.sink.compare = not rebuild
        state.known = state.ids.load_known(store)
        known = state.known and not rebuild
        # Ray tasks for the table work of a large run (even a night's commit: finding the changed ids through the
        # id index took ~70 MiB in the process that does it, on a 1M-row table)
        state.commit, state.upkeep = committer(cfg, cluster, small), upkeeper(cfg, cluster, small)
        report["mode"] = "rebuild" if rebuild else "incremental" if known else "full"
        report["id_state"] = {"in": state.ids.where, "shards": state.ids.shards}
        report["table_work_on"] = {"commit": "worker" if state.commit is not None else "driver",
                                   "upkeep": "worker" if state.upkeep is not None else "driver"}
        report.update(change or {})
        report["cluster"] = {"address": cluster.address, "nodes": cluster.nodes, "cpus": cluster.cpus,
                             "gpus": cluster.gpus}
        # A small delta is embedded right here: for a small run the model loads while the corpus is compared; a
        # large one loads it once the plan says the delta is small (its driver stays without a model otherwise)
        state.preload = Preload(cfg) if known and e.local_max_rows and small else None
        # Plan first (compare, then embed only what the plan says) when there is something to compare with, or
        # when the corpus is tiny: the plan costs little and a tiny corpus then needs no actor pool. A first run
        # (or a rebuild) of anything larger streams in one pass, holding nothing per document but its id's hash.
        state.plan_first = bool(known) or read_local(cfg, max_bytes=FIRST_PLAN_BYTES) is not None
        staged = resume(cfg, state, store)
        state.sink.keep_written = state.plan_first
        # a CPU call's size, from the corpus's first rows (not read when set, or for GPU actors: 4,096 rows)
        sized = cfg.embed.rows_per_call is None and not cfg.embed.gpus_per_actor
        state.mean_chars = mean_input_chars(cfg) if sized else None
    log.info("run %s: indexing %s into %s/%s (%s)", state.run_id, redact_uri(str(cfg.corpus.path)),
             redact_uri(cfg.storage.uri), name, report["mode"])
    return staged


def _plan_and_embed(cfg, state: _RunState, store, staged):
    """Compare every corpus row with passages (no model), then embed only the new and changed rows: on the driver
    when at most ``embed.local_max_rows``, else on the actor pool. Returns (staging table, ids to delete)."""
    from pipelines.store import StoreError

    sink, report = state.sink, state.report
    with state.timer("plan"), Progress("compare", unit="docs") as progress:
        todo, kept = _plan(cfg, state, progress)
    resume_planned(state, staged, todo)
    deletes = deletions(cfg, state) if state.known and not state.rebuild else []
    report["plan"] = {"embed": len(todo), "unchanged": sink.rows_unchanged, "delete": len(deletes)}
    if todo:
        local = len(todo) <= cfg.embed.local_max_rows
        report["plan"]["embedded_on"] = "driver" if local else "actors"
        report["plan"]["second_read"] = kept is None  # the planned rows did not fit KEEP_PLANNED_BYTES
        batches = _planned_batches(cfg, state, todo, local, kept)
        embedder = local_embedder(cfg, state.preload) if local else None
        staged = stage(cfg, state, batches, store, staged, embedder=embedder, planned=todo)
        missing = set(todo) - sink.written_ids - sink.empty_ids
        if missing:
            raise StoreError(f"{len(missing):,} document(s) changed while this run was indexing them (e.g. "
                             f"{min(missing)!r}); nothing was written: run the index job again once "
                             "the corpus is no longer being written")
    return staged, deletes


def _plan(cfg, state: _RunState, progress) -> tuple[dict[str, str], list | None]:
    """First pass: compare every corpus row with ``passages`` by id and content hash, embedding nothing; count and
    quarantine. Returns ({id: content hash} of the new and changed documents, their rows while they fit in
    ``KEEP_PLANNED_BYTES``, else None: the embedding then reads the corpus a second time). A small run's corpus
    (``state.small``: at most ``LOCAL_READ_BYTES``) is read right here (read tasks would cost more than the
    reading), a larger one by Ray."""
    from pipelines.index.corpus import read_local

    # a small run reads here; a large one in Ray read tasks (its parsing and checking off the driver: read here, a
    # 1M-document night's driver grew ~70 MiB more)
    batches = read_local(cfg, max_bytes=LOCAL_READ_BYTES) if state.small else None
    if batches is None:
        batches = state.cluster.stream(read(cfg, plan=True))
    todo: dict[str, str] = {}
    kept: list | None = []
    size = 0
    for batch in coalesce(batches):
        planned = state.sink.plan(batch)
        todo.update(planned)
        if planned and kept is not None:
            rows = keep_planned(batch, planned)
            size += rows.nbytes
            if size <= KEEP_PLANNED_BYTES:
                kept.append(rows)
            else:
                kept = None
        progress.update(batch.num_rows)
    return todo, kept


def _planned_batches(cfg, state: _RunState, todo: dict[str, str], local: bool, kept: list | None):
    """The planned rows, as the plan kept them or read again from the corpus; embedded by the actor pool unless
    ``local``."""
    import pyarrow as pa

    from pipelines.index.corpus import read_local

    if kept is not None:  # what the plan kept (resume_planned may have taken some since), in blocks of one call
        rows = pa.concat_tables(kept) if kept else None
        rows = keep_planned(rows, todo) if rows is not None else None
        step = cfg.embed.call_rows(0, state.mean_chars)  # blocks; the actor pool gathers them into its calls
        blocks = [rows.slice(i, step) for i in range(0, rows.num_rows, step)] if rows is not None else []
        if local or not blocks:
            return iter(blocks)
        import ray.data

        return state.cluster.stream(embed_actors(cfg, ray.data.from_arrow(blocks), state))
    batches = read_local(cfg, max_bytes=LOCAL_READ_BYTES) if local else None
    if batches is not None:  # a small delta of a small corpus: no Ray at all
        return (keep_planned(b, todo) for b in batches)
    ds = read(cfg).map_batches(keep_planned, fn_kwargs={"todo": todo}, batch_format="pyarrow", batch_size=None,
                                num_cpus=READ_CPUS)
    return state.cluster.stream(ds if local else embed_actors(cfg, ds, state))


def _stream_all(cfg, state: _RunState, store, staged):
    """A first run of a corpus too large to plan, or a model change: read → embed on the actor pool → stage."""
    ds = read(cfg, rows=pool(cfg, state)[2])  # blocks of one call: Ray Data keeps state per block in the driver
    if state.sink.done:  # what a killed run staged is not embedded again (the sink counts it as written)
        ds = ds.map_batches(skip_resumed, fn_kwargs={"done": state.sink.done}, batch_format="pyarrow",
                            batch_size=None, num_cpus=READ_CPUS)
    ds = embed_actors(cfg, ds, state)
    staged = stage(cfg, state, state.cluster.stream(ds), store, staged)
    drop_stale_resumed(state, staged)
    return staged


def _commit(cfg, state: _RunState, store, staged, deletes: list[str]) -> int | None:
    """Settle what the run publishes (a model change's deletions, one staged row per id), write the quarantine,
    then publish in one commit: merge_insert on id (an overwrite on a model change), tagged with the run id.
    Returns the passages version (the current one when nothing changed; None when there is no table)."""
    from pipelines.cluster.runtime import actor_restarts

    sink, report, timer, name = state.sink, state.report, state.timer, cfg.storage.passages_table
    if state.rebuild:  # the overwrite drops what the new model's set lacks: guarded like any deletion
        deletes = rebuild_deletions(cfg, state, state.ids.gone("written"), state.known)
    if staged is not None and sink.done:
        keep_one_row_per_id(state, staged)
    report["deleted_ids_sample"] = [show_id(i) for i in deletes[:20]]
    report["embed_actors"] = actor_restarts("Embedder")  # a killed actor is restarted; its task retried
    with timer("quarantine_write"):
        store.append_quarantine(sink.quarantine_table())
    maybe_fail("before_commit")
    with timer("commit"):
        if staged is not None or (deletes and not state.rebuild):
            if state.run.lock is not None:
                state.run.lock.ensure_held()  # a run whose lease another run took must not commit (LockLost)
            # a changed document's passages are all replaced (its old ones removed in the same commit)
            gone = [] if state.rebuild else deletes
            if state.commit is not None:  # a Ray task on a worker: the table is never opened in the driver
                version, report["passages_before"] = state.commit(staged, state.run_id, gone, state.rebuild)
            else:
                report["passages_before"] = store.count(name)
                version = store.commit_passages(staged, state.run_id, deletes=gone, replace=state.rebuild)
            report["table_tag"] = state.run_id
        else:  # nothing new, changed or deleted: no new version
            before = store.open(name)
            report["passages_before"] = before.count_rows() if before is not None else 0
            version = before.version if before is not None else None
    state.updated = state.ids.counts()["written_known"] if state.rebuild else len(sink.changed & sink.written_ids)
    if staged is not None:  # published: the next run has nothing to resume
        staged.drop()
    sink.rows_deleted = len(deletes)
    maybe_fail("after_commit")
    report["committed_version"] = version
    return version


def _upkeep(cfg, state: _RunState, store, version: int | None) -> None:
    """After the commit: indexes brought up to date (ANN, full text, id), files compacted, old versions cleaned."""
    from pipelines.store import StoreError

    report, name = state.report, cfg.storage.passages_table
    with state.timer("upkeep"):
        try:
            if version is None:
                report["upkeep"] = {}
            elif state.upkeep is not None:  # a Ray task on a worker: the table's memory is never the driver's
                report["upkeep"] = state.upkeep(report.get("table_tag"), state.build_ann)
            else:
                report["upkeep"] = store.upkeep(name, index_cfg=cfg.index, maint=cfg.maintenance,
                                                tag=report.get("table_tag"), build_ann=state.build_ann)
        except Exception as exc:
            raise StoreError(f"the commit is published ({name} v{version}), but the index upkeep after it "
                             f"failed: {type(exc).__name__}: {exc}; run the job again to bring the indexes up "
                             "to date (nothing will be embedded again)") from exc
    report["indexes"] = report["upkeep"].get("indexes", {})
