"""The rerank job: query log → retrieve (bi-encoder + LanceDB) → score (cross-encoder) → one commit to ``rankings``.

Reads top to bottom (``run``: ``runs.start``, then ``runs.guarded`` holding the rankings table's lock)::

    _start               Ray up; passages pinned at their current version and leased (the pair cache's too)
    _read_log            read_query_log (driver: normalise, window, count, select; bad lines → quarantine)
    _identify            actor resources; the cross-encoder's id and the settings digest that every row carries
    _carry_over          rankings this run would compute again unchanged are staged as they are
    _retrieve_and_score  from_arrow(the queries still to rank, small blocks)
                         → map_batches(Retriever, actor pool): top-k candidates from the pinned passages
                         → map_batches(Scorer, actor pool): cached pairs looked up, the rest scored, top-n kept
                         → sink on the driver: rows → staging table (durable, invisible); new pairs → pair cache
                         (a run of at most rerank.local_max_pairs pairs calls the two stages on the driver: no pools)
    _publish             check: queries ranked = queries selected → one overwrite commit of rankings (tagged)
    release_leases       however the run ended
    _upkeep              after a published run: old cached scores evicted, tables compacted, old versions cleaned
    finish_report        lines read = counted + outside window + quarantined; pairs = scored + from cache, pairs/s

A run that fails at any point leaves the previous rankings version in place: nothing is written to ``rankings``
until the complete set is staged. The pair cache (``rerank.cache``, ``pipelines.rerank.pair_cache``) is read as it was at
the start of the run and written at each staging flush, so a rerun of a killed run re-uses what that run scored.
The versions the actors read are leased for the run, so upkeep never cleans them away. Beside this module:
``sink.py`` (the sink), ``carry_over.py`` (carry-over, the settings digest), ``summary.py`` (the report).

Example::

    report = run(load_config("configs/demo.yaml"))
    report["queries"]["ranked"], report["pairs"]["per_second"]
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import runs
from pipelines import schema as S
from pipelines.faults import maybe_fail
from pipelines.report import Progress, redact_uri
from pipelines.rerank import pair_cache as P
from pipelines.rerank.carry_over import cross_encoder_key, precision, settings_key, unchanged_rankings
from pipelines.rerank.fusion import resolve_weight
from pipelines.rerank.sink import Sink
from pipelines.rerank.summary import finish_report, summary

__all__ = ["RerankError", "run", "summary"]

log = logging.getLogger("batchrank.rerank")
BLOCK_BYTES = 1 << 20  # small blocks: candidates of a few queries each, so every scoring actor stays fed


class RerankError(RuntimeError):
    """A run that must not publish; the message says why and what to do."""


@dataclass
class _RunState:
    """What the steps share beside the run itself (``runs.Run``: id, report, stage timer, lock)."""

    run: runs.Run
    sink: Sink
    log: Any = None  # the QueryLog once read
    leases: list[tuple[str, str | None]] = field(default_factory=list)  # (table, lease tag) pinned for the readers
    cache_version: int | None = None
    cluster: Any = None  # runtime.Cluster, once Ray is up
    resources: dict[str, tuple[float, float]] = field(default_factory=dict)  # CPUs and GPUs per actor of each pool

    def lease(self, store, table: str, version: int) -> None:
        """Pin ``version`` of ``table`` for this run's readers: upkeep keeps it until the lease is released."""
        self.leases.append((table, store.lease(table, version, self.run.run_id)))

    def release_leases(self, cfg) -> None:
        from pipelines.store import Store

        store = Store(cfg.storage)
        for table, lease in self.leases:
            store.release(table, lease)


def run(cfg, *, run_id: str | None = None, now=None, save: bool = True) -> dict[str, Any]:
    """Rerank the configured query log into a new version of the rankings table; return the run report (also
    written as JSON unless ``save`` is False: the nightly job writes one report for all its stages).

    On failure the report is written with ``status: failed`` and the error is raised again; the
    previous rankings version stays the current one.
    """
    started = runs.start(cfg, "rerank", sections=("query_log", "rerank"), command="batchrank rerank",
                         run_id=run_id, save=save, tables=(cfg.storage.rankings_table,))
    state = _RunState(started, Sink(started.run_id, cfg))
    return runs.guarded(started, cfg, body=lambda: _rerank(cfg, state, now),
                        finish=lambda: finish_report(cfg, started, state.sink, state.log, state.cache_version),
                        lock_table=cfg.storage.rankings_table, cleanup=lambda: state.release_leases(cfg),
                        after=lambda: _upkeep(cfg, started))


def _rerank(cfg, state: _RunState, now) -> None:
    """The job's chain, holding the rankings table's lock; a failure before the commit drops the staging table."""
    from pipelines.store import Store

    store = Store(cfg.storage)
    cluster, fusion_weight = _start(cfg, state, store)
    qlog = _read_log(cfg, state, now)
    _identify(cfg, state, cluster, fusion_weight)
    staged = _open_staging(cfg, state, store)
    try:
        rest = _carry_over(cfg, state, store, staged, qlog.selected)
        if rest.num_rows:  # else every query kept its ranking: nothing to retrieve or score
            _retrieve_and_score(cfg, state, store, staged, rest, fusion_weight)
    except BaseException:
        staged.drop()
        raise
    _publish(cfg, store, staged, qlog, state)


def _start(cfg, state: _RunState, store) -> tuple[Any, float | None]:
    """Ray up; passages pinned at their current version and leased for the run, as is the pair cache's (read as it
    is now by every actor; pairs this run adds go to later versions); return the cluster and the fusion weight."""
    import ray.data

    from pipelines.cluster.runtime import check_not_in_job_package, init_ray
    from pipelines.models.prompts import query_prompt_warning
    from pipelines.store import StoreError

    rt, rr, report = cfg.retrieve, cfg.rerank, state.run.report
    with state.run.timer("startup"):
        check_not_in_job_package(cfg.storage.uri, "storage.uri")
        _check_model_path(rr.model)
        _configure_ray_data(ray.data.DataContext.get_current())
        cluster = init_ray(cfg.ray)  # before LanceDB loads (fork safety)
        state.run.mark("ray_up")
        passages_version = store.passages_for_queries(cfg.embed.identity).version
        state.lease(store, cfg.storage.passages_table, passages_version)
        if rt.source != "vector" and not store.has_fts_index(cfg.index.fts.columns, passages_version):
            raise StoreError(f"retrieve.source: {rt.source} needs the full-text index on passages "
                             f"({', '.join(cfg.index.fts.columns)}); set index.fts.enabled: true and run "
                             "`batchrank index` again")
        state.sink.passages_version = passages_version
        fusion_weight, fusion_origin = resolve_weight(rr)
        report["fusion"] = {"cross_encoder_weight": fusion_weight, "origin": fusion_origin}
        report["tables"] = {"passages": {"name": cfg.storage.passages_table, "version": passages_version}}
        if warning := query_prompt_warning(cfg, store.passages_settings()):
            log.warning(warning)
            report.setdefault("warnings", []).append(warning)
        if rr.cache:
            state.cache_version = P.current_version(store)
            if state.cache_version is not None:
                state.lease(store, cfg.storage.pair_scores_table, state.cache_version)
    return cluster, fusion_weight


def _configure_ray_data(ctx) -> None:
    ctx.enable_progress_bars = False
    ctx.target_max_block_size = BLOCK_BYTES
    # Retrieval may run ahead of scoring up to the object-store budget: with the pair cache, scoring time per
    # query varies a hundredfold, and the default queue-ratio backpressure left the scorers waiting for
    # candidates after every slow block.
    ctx.downstream_capacity_backpressure_ratio = None
    ctx.execution_options.preserve_order = False  # rankings are keyed by query (the index job sets it True)


def _read_log(cfg, state: _RunState, now):
    """The query log, read once on the driver; refuses a run with no query selected."""
    from pipelines.rerank.query_log import read_query_log

    with state.run.timer("read_log"), Progress("query log", unit="lines") as progress:
        qlog = state.log = read_query_log(cfg.query_log, now=now, progress=progress,
                                          storage_options=cfg.storage.storage_options)
    state.sink.normalizer = qlog.normalizer
    if qlog.selected.num_rows == 0:
        c = qlog.counts
        raise RerankError(
            f"no query selected from the log ({c['lines_read']:,} lines read, {c['lines_counted']:,} in the window "
            f"{qlog.window}, {c['distinct_queries']:,} distinct, {c['below_min_count']:,} below min_count); check "
            "query_log.path, since/until/last_days and min_count. The previous rankings stay in place")
    return qlog


def _identify(cfg, state: _RunState, cluster, fusion_weight: float | None) -> None:
    """The actor pools' CPUs and GPUs, and what every row of this run carries: the cross-encoder's id (the pair
    cache's keys) and the settings digest (what carry-over compares)."""
    from pipelines.cluster.runtime import actor_device, pool_resources

    rt, rr, sink = cfg.retrieve, cfg.rerank, state.sink
    state.cluster = cluster
    state.resources = pool_resources(cluster, {"retrieve": rt.pool, "rerank": rr.pool})
    (r_cpus, r_gpus), (s_cpus, s_gpus) = state.resources["retrieve"], state.resources["rerank"]
    with state.run.timer("startup"):  # hashes the model's weights: the cache key must change when they do
        sink.cross_encoder_id = cross_encoder_key(rr, actor_device(rr.device, s_gpus))
    state.run.report["cluster"] = {
        "address": cluster.address, "nodes": cluster.nodes, "cpus": cluster.cpus, "gpus": cluster.gpus,
        "retrieve": {"actors": rt.actors, "cpus_per_actor": r_cpus, "gpus_per_actor": r_gpus},
        "rerank": {"actors": rr.actors, "cpus_per_actor": s_cpus, "gpus_per_actor": s_gpus}}
    sink.settings = settings_key(cfg, sink.cross_encoder_id, fusion_weight, passages_version=sink.passages_version)


def _open_staging(cfg, state: _RunState, store):
    dead = store.drop_dead_staging(cfg.storage.rankings_table)  # killed runs' (we hold the lock)
    if dead:
        state.run.report["dropped_dead_staging"] = dead
    return store.stage(cfg.storage.rankings_table, state.run.run_id, S.RANKINGS_SCHEMA)


def _carry_over(cfg, state: _RunState, store, staged, selected: pa.Table) -> pa.Table:
    """With ``rerank.carry_over``, stage the rankings this run would compute again unchanged; return the
    selected queries still to rank."""
    if not cfg.rerank.carry_over:
        return selected
    with state.run.timer("carry_over"):
        carried = unchanged_rankings(store, cfg, selected, state.sink)
    if carried.num_rows == 0:
        return selected
    staged.add(carried)
    state.sink.carried = state.sink.ranked = carried.num_rows
    done = pc.is_in(selected[S.QUERY_ID], value_set=carried[S.QUERY_ID])
    return selected.filter(pc.invert(done))


def _retrieve_and_score(cfg, state: _RunState, store, staged, selected: pa.Table, fusion_weight) -> None:
    """The two actor pools over the queries still to rank; rows go to ``staged``, new pair scores to the cache."""
    from pipelines.cluster.runtime import actor_restarts

    local = _local(cfg, state, selected.num_rows)
    state.run.report["ranked_on"] = "driver" if local else "actors"
    batches = _stream(cfg, state, selected, fusion_weight, local=local)
    log.info("run %s: reranking %d queries (k=%d, top_n=%d) with %s on the %s into %s/%s", state.run.run_id,
             selected.num_rows, cfg.retrieve.k, cfg.rerank.top_n, cfg.rerank.model, "driver" if local else "actors",
             redact_uri(cfg.storage.uri), cfg.storage.rankings_table)
    state.run.mark("pipeline_started")
    state.sink.drain(batches, staged, store, state.run.timer, mark=state.run.mark)
    if not local:
        state.run.report["actors"] = {"retrieve": actor_restarts("Retriever"), "score": actor_restarts("Scorer")}


def _local(cfg, state: _RunState, queries: int) -> bool:
    """Rank on the driver: at most ``rerank.local_max_pairs`` pairs, and no pool given a GPU (the driver may have
    none)."""
    pairs = queries * cfg.retrieve.k
    gpus = any(g for _, g in state.resources.values())
    return not gpus and pairs <= cfg.rerank.local_max_pairs


def _stream(cfg, state: _RunState, selected: pa.Table, fusion_weight, *, local: bool = False):
    """The scored batches: ``from_arrow`` → ``Retriever`` pool → ``Scorer`` pool, each stage built from its config
    section, its actors sized from ``state.resources``; or, ``local``, the same two stages called here."""
    import ray.data

    from pipelines.cluster.runtime import actor_device, actor_options
    from pipelines.rerank.retrieve import Retriever
    from pipelines.rerank.score import Scorer

    rt, rr, sink = cfg.retrieve, cfg.rerank, state.sink
    (r_cpus, r_gpus), (s_cpus, s_gpus) = state.resources["retrieve"], state.resources["rerank"]
    retriever = Retriever.config_kwargs(cfg, passages_version=sink.passages_version,
                                        device=actor_device(cfg.embed.device, r_gpus))
    scorer = Scorer.config_kwargs(rr, device=actor_device(rr.device, s_gpus), num_threads=rr.cpus_per_actor,
                                  fusion_weight=fusion_weight, cache_storage=cfg.storage if rr.cache else None,
                                  cache_version=state.cache_version, cross_encoder_id=sink.cross_encoder_id,
                                  precision=precision(rr, actor_device(rr.device, s_gpus)), preload=True)
    # Several blocks, built without tasks: one block feeds one actor, and a task-built split would need CPUs that
    # the actor pools hold. Small blocks balance the scoring actors: one task scores a whole block, and with the
    # pair cache the work per query varies from nothing (all cached) to every candidate (a new query).
    per_call = rr.call_queries(s_gpus)
    rows = max(1, min(rt.queries_per_call, per_call, math.ceil(selected.num_rows / (16 * rr.actors))))
    # Each scoring actor's first block is one query, so that the first scored pairs reach the driver after one
    # query's candidates rather than a whole call's. Each block is one call of each stage (batch_size None: no
    # stage gathers blocks), so these slices are the calls.
    head = min(rr.actors, selected.num_rows) if rows > 1 else 0
    blocks = [selected.slice(i, 1) for i in range(head)]
    blocks += [selected.slice(i, rows) for i in range(head, selected.num_rows, rows)]
    if local:
        retrieve, score = Retriever(**retriever), Scorer(**{**scorer, "preload": False})
        return (score(retrieve(b)) for b in blocks)
    options = actor_options()
    return state.cluster.stream(
        ray.data.from_arrow(blocks)
        .map_batches(Retriever, fn_constructor_kwargs=retriever,
                     compute=ray.data.ActorPoolStrategy(size=rt.actors, max_tasks_in_flight_per_actor=2),
                     num_cpus=r_cpus, num_gpus=r_gpus, batch_size=None, batch_format="pyarrow", **options)
        .map_batches(Scorer, fn_constructor_kwargs=scorer,
                     compute=ray.data.ActorPoolStrategy(size=rr.actors, max_tasks_in_flight_per_actor=2),
                     num_cpus=s_cpus, num_gpus=s_gpus, batch_size=None, batch_format="pyarrow",
                     **options))


def _publish(cfg, store, staged, qlog, state: _RunState) -> None:
    """Check that every selected query is ranked, then one commit of the staged set; the staging table goes."""
    timer, report, sink, run_id = state.run.timer, state.run.report, state.sink, state.run.run_id
    selected = qlog.selected.num_rows
    try:
        if staged.rows != selected or sink.ranked != selected:
            raise RerankError(f"ranked {sink.ranked:,} queries (staged {staged.rows:,}) but selected "
                              f"{selected:,}; not publishing an incomplete set")
        with timer("quarantine_write"):
            store.append_quarantine(S.quarantine_rows(qlog.quarantine, run_id, "rerank"))
        maybe_fail("before_commit")
        with timer("commit"):
            if state.run.lock is not None:
                state.run.lock.ensure_held()  # a run whose lease another run took must not commit (LockLost)
            previous = store.open(cfg.storage.rankings_table)
            report["tables"]["rankings_previous_version"] = previous.version if previous is not None else None
            report["tables"]["rankings_version"] = store.commit_rankings(staged, run_id)
        maybe_fail("after_commit")
        report["status"] = "succeeded"
    finally:
        staged.drop()


def _upkeep(cfg, run: runs.Run) -> None:
    """After a published run (leases released): expire old cached scores, compact and clean up old versions of
    rankings and the cache (tagged and leased versions kept); a failure is logged and reported, not raised."""
    from pipelines.store import Store

    with run.timer("upkeep"):
        try:
            store, m = Store(cfg.storage), cfg.maintenance
            done = {"rankings": store.upkeep(cfg.storage.rankings_table, maint=m)}
            if m.pair_cache_days is not None:
                done["pair_scores_evicted"] = P.evict(store, older_than_days=m.pair_cache_days)
            done["pair_scores"] = store.upkeep(cfg.storage.pair_scores_table, maint=m)
            run.report["upkeep"] = done
        except Exception as exc:  # noqa: BLE001 - the rankings are published; the next run's upkeep retries
            log.warning("run %s: upkeep failed after the commit (retried by the next run): %s", run.run_id, exc)
            run.report["upkeep"] = {"error": f"{type(exc).__name__}: {exc}"}


def _check_model_path(model: str) -> None:
    looks_local = model.startswith((".", "/", "~")) or os.sep in model and os.path.exists(os.path.dirname(model))
    if looks_local and not os.path.exists(model):
        raise RerankError(f"rerank.model {model!r} does not exist; train one with `batchrank train-reranker`, or "
                          "point rerank.model at a sentence-transformers CrossEncoder folder or hub name")
