"""The rerank job: query log → retrieve (bi-encoder + LanceDB) → score (cross-encoder) → one commit to ``rankings``.

Reads top to bottom::

    read_query_log (driver: normalise, window, count, select; bad lines → quarantine)
    → from_arrow(selected queries, several blocks)
    → map_batches(Retriever, actor pool)   top-k candidates from passages pinned at one version
    → map_batches(Scorer, actor pool)      cross-encoder scores (cached pairs looked up, the rest scored),
                                           candidates re-ordered, top-n kept
    → sink on the driver: rows → staging table (durable, invisible); newly scored pairs → pair cache
    → check: queries ranked = queries selected → one overwrite commit of rankings (tagged run id)
    → report: lines read = counted + outside window + quarantined; pairs total = scored + from cache, pairs/s

A run that fails at any point leaves the previous rankings version in place: nothing is
written to ``rankings`` until the complete set is staged. The pair cache (``rerank.cache``,
``pipelines.pair_cache``) is read as it was at the start of the run and written at each
staging flush, so a rerun of a killed run re-uses what that run scored. The passages version
(and the cache version) that the actors read is leased for the run, so upkeep never cleans it away.

Example::

    report = run(load_config("configs/demo.yaml"))
    report["queries"]["ranked"], report["pairs"]["per_second"]
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import pair_cache as P
from pipelines import schema as S
from pipelines.faults import maybe_fail
from pipelines.fusion import resolve_weight
from pipelines.report import (Progress, Timer, new_run_id, nodes_line, redact_uri, refuse_used_run_id, save_report,
                              utcnow)
from pipelines.runtime import count_nodes

log = logging.getLogger("batchrank.rerank")
FLUSH_ROWS = 1024  # ranked queries buffered on the driver before a staging append ...
FLUSH_SECONDS = 2.0  # ... or this long (with the newly scored pairs: what a rerun of a killed run re-scores)
BLOCK_BYTES = 1 << 20  # small blocks: candidates of a few queries each, so every scoring actor stays fed


class RerankError(RuntimeError):
    """A run that must not publish; the message says why and what to do."""


def run(cfg, *, run_id: str | None = None, now=None, save: bool = True) -> dict[str, Any]:
    """Rerank the configured query log into a new version of the rankings table; return the run report (also
    written as JSON unless ``save`` is False: the nightly job writes one report for all its stages).

    On failure the report is written with ``status: failed`` and the error is raised again; the
    previous rankings version stays the current one.
    """
    cfg.require("query_log", "rerank", command="batchrank rerank")
    from pipelines.locks import LockBusy, RunLock

    if run_id is not None and save:  # a caller's id (a nightly checks its own once, for both tables)
        refuse_used_run_id(cfg, run_id, (cfg.storage.rankings_table,))
    state = _RunState(run_id or new_run_id("rerank"), cfg)
    lock = RunLock(cfg.storage, cfg.storage.rankings_table, state.run_id, job="rerank",
                   wait_seconds=cfg.lock.wait_seconds, stale_seconds=cfg.lock.stale_seconds)
    try:
        with lock:
            state.report["lock"] = lock.report
            state.lock = lock
            _rerank(cfg, state, now)
    except BaseException as exc:
        state.report.update(status="refused" if isinstance(exc, LockBusy) else "failed",
                            error=f"{type(exc).__name__}: {exc}")
        exc.batchrank_report = _finish(cfg, state, save)
        raise
    finally:
        _release_leases(cfg, state)
    with state.timer("upkeep"):
        try:
            state.report["upkeep"] = _upkeep(cfg)
        except Exception as exc:  # noqa: BLE001 - the rankings are published; the next run's upkeep retries
            log.warning("run %s: upkeep failed after the commit (retried by the next run): %s", state.run_id, exc)
            state.report["upkeep"] = {"error": f"{type(exc).__name__}: {exc}"}
    return _finish(cfg, state, save)


def _upkeep(cfg) -> dict[str, Any]:
    """After a published run (and its leases released): expire old cached scores, then compact and clean up
    old versions of rankings and of the cache (tagged and leased versions are kept)."""
    from pipelines import pair_cache
    from pipelines.store import Store

    store, m = Store(cfg.storage), cfg.maintenance
    done = {"rankings": store.upkeep(cfg.storage.rankings_table, maint=m)}
    if m.pair_cache_days is not None:
        done["pair_scores_evicted"] = pair_cache.evict(store, older_than_days=m.pair_cache_days)
    done["pair_scores"] = store.upkeep(cfg.storage.pair_scores_table, maint=m)
    return done


class _RunState:
    def __init__(self, run_id: str, cfg):
        self.run_id = run_id
        self.timer, self.t0 = Timer(), time.perf_counter()
        self.log = None  # the QueryLog once read
        self.sink = _Sink(run_id, cfg)
        self.lock = None  # the rankings table's RunLock, checked right before the commit
        self.leases: list[tuple[str, str | None]] = []  # (table, lease tag) pinned for this run's readers
        self.cache_version: int | None = None
        self.resources: dict[str, tuple[float, float]] = {}  # CPUs and GPUs per actor of each pool
        self.report: dict[str, Any] = {"job": "rerank", "run_id": run_id, "status": "running",
                                       "started_at": utcnow().isoformat()}


def _rerank(cfg, state: _RunState, now) -> None:
    import ray.data

    from pipelines.query_log import read_query_log
    from pipelines.runtime import actor_device, check_not_in_job_package, init_ray, pool_resources
    from pipelines.store import Store, StoreError

    run_id, timer, report, sink = state.run_id, state.timer, state.report, state.sink
    store = Store(cfg.storage)
    rt, rr, e = cfg.retrieve, cfg.rerank, cfg.embed

    with timer("startup"):
        check_not_in_job_package(cfg.storage.uri, "storage.uri")
        _check_model_path(rr.model)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.target_max_block_size = BLOCK_BYTES
        # Retrieval may run ahead of scoring up to the object-store budget: with the pair cache, scoring time per
        # query varies a hundredfold, and the default queue-ratio backpressure left the scorers waiting for
        # candidates after every slow block.
        ctx.downstream_capacity_backpressure_ratio = None
        ctx.execution_options.preserve_order = False  # rankings are keyed by query (the index job sets it True)
        cluster = init_ray(cfg.ray)  # before LanceDB loads (fork safety)
        passages_version = store.passages_for_queries(e.identity).version
        state.leases.append((cfg.storage.passages_table,
                             store.lease(cfg.storage.passages_table, passages_version, run_id)))
        if rt.source != "vector" and not store.has_fts_index(cfg.index.fts.columns, passages_version):
            raise StoreError(f"retrieve.source: {rt.source} needs the full-text index on passages "
                             f"({', '.join(cfg.index.fts.columns)}); set index.fts.enabled: true and run "
                             "`batchrank index` again")
        sink.passages_version = passages_version
        fusion_weight, fusion_origin = resolve_weight(rr)
        report["fusion"] = {"cross_encoder_weight": fusion_weight, "origin": fusion_origin}
        report["tables"] = {"passages": {"name": cfg.storage.passages_table, "version": passages_version}}
        if rr.cache:  # read as it is now by every actor; pairs this run adds go to later versions
            state.cache_version = P.current_version(store)
            if state.cache_version is not None:
                state.leases.append((cfg.storage.pair_scores_table,
                                     store.lease(cfg.storage.pair_scores_table, state.cache_version, run_id)))

    with timer("read_log"), Progress("query log", unit="lines") as progress:
        qlog = state.log = read_query_log(cfg.query_log, now=now, progress=progress,
                                          storage_options=cfg.storage.storage_options)
    sink.normalizer = qlog.normalizer
    if qlog.selected.num_rows == 0:
        c = qlog.counts
        raise RerankError(
            f"no query selected from the log ({c['lines_read']:,} lines read, {c['lines_counted']:,} in the window "
            f"{qlog.window}, {c['distinct_queries']:,} distinct, {c['below_min_count']:,} below min_count); check "
            "query_log.path, since/until/last_days and min_count. The previous rankings stay in place")

    resources = pool_resources(cluster, {"retrieve": (rt.actors, rt.cpus_per_actor, rt.gpus_per_actor),
                                         "rerank": (rr.actors, rr.cpus_per_actor, rr.gpus_per_actor)})
    state.resources = resources
    (r_cpus, r_gpus), (s_cpus, s_gpus) = resources["retrieve"], resources["rerank"]
    s_device = actor_device(rr.device, s_gpus)
    with timer("startup"):  # hashes the model's weights: the cache key must change when they do
        sink.cross_encoder_id = P.cross_encoder_id(rr.model, rr.max_length, precision=_precision(rr, s_device))
    report["cluster"] = {"address": cluster.address, "nodes": cluster.nodes, "cpus": cluster.cpus,
                         "gpus": cluster.gpus,
                         "retrieve": {"actors": rt.actors, "cpus_per_actor": r_cpus, "gpus_per_actor": r_gpus},
                         "rerank": {"actors": rr.actors, "cpus_per_actor": s_cpus, "gpus_per_actor": s_gpus}}
    sink.settings = _settings_key(cfg, sink.cross_encoder_id, fusion_weight, passages_version=sink.passages_version)
    dead = store.drop_dead_staging(cfg.storage.rankings_table)  # killed runs' (we hold the lock)
    if dead:
        report["dropped_dead_staging"] = dead
    staged = store.stage(cfg.storage.rankings_table, run_id, S.RANKINGS_SCHEMA)
    try:
        selected = qlog.selected
        if rr.carry_over:
            with timer("carry_over"):
                carried = _carry_over(store, cfg, selected, sink)
            if carried.num_rows:
                staged.add(carried)
                sink.carried = sink.ranked = carried.num_rows
                done = pc.is_in(selected[S.QUERY_ID], value_set=carried[S.QUERY_ID])
                selected = selected.filter(pc.invert(done))
        if selected.num_rows:  # else every query kept its ranking: nothing to retrieve or score
            _retrieve_and_score(cfg, state, store, staged, selected, fusion_weight)
    except BaseException:
        staged.drop()
        raise
    _publish(cfg, store, staged, qlog, state)


def _retrieve_and_score(cfg, state: _RunState, store, staged, selected: pa.Table, fusion_weight) -> None:
    """The two actor pools over the queries still to rank; ranked rows go to ``staged``, new pair scores to the
    cache."""
    import ray.data

    from pipelines.retrieve import Retriever
    from pipelines.runtime import actor_device, actor_options
    from pipelines.score import Scorer

    timer, sink, run_id = state.timer, state.sink, state.run_id
    rt, rr, e = cfg.retrieve, cfg.rerank, cfg.embed
    (r_cpus, r_gpus), (s_cpus, s_gpus) = state.resources["retrieve"], state.resources["rerank"]
    s_device = actor_device(rr.device, s_gpus)
    # Several blocks, built without tasks: one block feeds one actor, and a task-built split would need CPUs
    # that the actor pools hold.
    # Small blocks balance the scoring actors: one task scores a whole block, and with the pair cache the work
    # per query varies from nothing (all cached) to every candidate (a new query).
    rows = max(1, min(rt.queries_per_call, math.ceil(selected.num_rows / (16 * rr.actors))))
    blocks = [selected.slice(i, rows) for i in range(0, selected.num_rows, rows)]
    options = actor_options()
    ds = (
        ray.data.from_arrow(blocks)
        .map_batches(
            Retriever,
            fn_constructor_kwargs=dict(
                storage_cfg=cfg.storage, index_cfg=cfg.index, passages_version=sink.passages_version, model=e.model,
                k=rt.k, source=rt.source, rrf_k=rt.rrf_k, exact=rt.exact, exact_max_rows=rt.exact_max_rows,
                exact_max_bytes=rt.exact_max_bytes, doc_fields=tuple(rr.input_fields),
                separator=rr.separator, threads=rt.search_threads, device=actor_device(e.device, r_gpus),
                dtype=e.dtype, max_seq_length=e.max_seq_length, normalize=e.normalize,
                trust_remote_code=e.trust_remote_code, num_threads=rt.cpus_per_actor, backend=e.backend,
                batch_tokens=e.batch_tokens),
            compute=ray.data.ActorPoolStrategy(size=rt.actors, max_tasks_in_flight_per_actor=2),
            num_cpus=r_cpus, num_gpus=r_gpus, batch_size=rows, batch_format="pyarrow", **options,
        )
        .map_batches(
            Scorer,
            fn_constructor_kwargs=dict(
                model=rr.model, top_n=rr.top_n, batch_size=rr.batch_size, max_length=rr.max_length,
                device=s_device, dtype=rr.dtype, trust_remote_code=rr.trust_remote_code,
                num_threads=rr.cpus_per_actor, fusion_weight=fusion_weight,
                cache_storage=cfg.storage if rr.cache else None, cache_version=state.cache_version,
                cross_encoder_id=sink.cross_encoder_id, preload=True, backend=rr.backend,
                batch_tokens=rr.batch_tokens),
            compute=ray.data.ActorPoolStrategy(size=rr.actors, max_tasks_in_flight_per_actor=2),
            num_cpus=s_cpus, num_gpus=s_gpus, batch_size=rr.queries_per_call, batch_format="pyarrow",
            **options,
        )
    )
    log.info("run %s: reranking %d queries (k=%d, top_n=%d) with %s into %s/%s", run_id, selected.num_rows,
             rt.k, rr.top_n, rr.model, redact_uri(cfg.storage.uri), cfg.storage.rankings_table)

    flushed = time.monotonic()
    with timer("pipeline"), Progress("rerank", unit="queries") as progress:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=2):
            sink.add(batch)
            # the first rows at once, then in bulk or every FLUSH_SECONDS: the scores a killed run loses stay few
            if (sink.pending_rows >= FLUSH_ROWS or staged.rows == 0
                    or time.monotonic() - flushed >= FLUSH_SECONDS):
                with timer("stage_writes"):
                    staged.add(sink.take_pending())
                with timer("cache_writes"):
                    sink.write_pairs(store)
                flushed = time.monotonic()
                maybe_fail("mid_run")
            progress.update(batch.num_rows, pairs=int(pc.sum(batch[S.CANDIDATES]).as_py() or 0),
                            scored=int(pc.sum(batch[P.PAIRS_SCORED]).as_py() or 0))
        with timer("stage_writes"):
            staged.add(sink.take_pending())
        with timer("cache_writes"):  # before the commit: whatever happens next, the scores are kept
            sink.write_pairs(store)
    from pipelines.runtime import actor_restarts

    state.report["actors"] = {"retrieve": actor_restarts("Retriever"), "score": actor_restarts("Scorer")}


def _publish(cfg, store, staged, qlog, state: _RunState) -> None:
    """Check that every selected query is ranked, then one commit of the staged set; the staging table goes."""
    timer, report, sink, run_id = state.timer, state.report, state.sink, state.run_id
    selected = qlog.selected.num_rows
    try:
        if staged.rows != selected or sink.ranked != selected:
            raise RerankError(f"ranked {sink.ranked:,} queries (staged {staged.rows:,}) but selected "
                              f"{selected:,}; not publishing an incomplete set")
        with timer("quarantine_write"):
            store.append_quarantine(_quarantine_rows(qlog.quarantine, run_id))
        maybe_fail("before_commit")
        with timer("commit"):
            if state.lock is not None:
                state.lock.ensure_held()  # a run whose lease another run took must not commit (LockLost)
            previous = store.open(cfg.storage.rankings_table)
            report["tables"]["rankings_previous_version"] = previous.version if previous is not None else None
            report["tables"]["rankings_version"] = store.commit_rankings(staged, run_id)
        maybe_fail("after_commit")
        report["status"] = "succeeded"
    finally:
        staged.drop()


def _precision(rr, device: str) -> str:
    """What runs the cross-encoder, for the pair cache's key: scores from another precision are not reused."""
    from pipelines.models import precision_label

    if rr.backend != "torch" and device == "cpu":
        return f"cpu/{rr.backend}"
    return precision_label(rr.dtype, device)


def _settings_key(cfg, cross_encoder_id: str, fusion_weight: float | None,
                  passages_version: int | None = None) -> str:
    """A digest of everything besides the query and the passages that a ranking depends on: equal keys on the same
    passages version give the same ranking, so the previous run's can be carried over. The vector search counts
    as the method it resolves to on passages (``passages_version``, default the latest): ``retrieve.exact``
    changes candidates only through it (ANN recall)."""
    import hashlib
    import json

    from pipelines.exact_search import configured_method

    rt, rr, e, ix = cfg.retrieve, cfg.rerank, cfg.embed, cfg.index
    settings = {"bi_encoder": e.identity, "normalize": e.normalize, "max_seq_length": e.max_seq_length,
                "k": rt.k, "source": rt.source, "rrf_k": rt.rrf_k,
                "method": configured_method(cfg, passages_version)[0],
                "metric": ix.metric, "ann": ix.ann.model_dump(mode="json"), "fts": ix.fts.columns,
                "cross_encoder": cross_encoder_id, "top_n": rr.top_n, "input_fields": rr.input_fields,
                "separator": rr.separator, "fusion_weight": fusion_weight}
    return hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=16).hexdigest()


def _carry_over(store, cfg, selected: pa.Table, sink) -> pa.Table:
    """Rows of the current rankings that this run would compute again unchanged: the same query (and
    normalisation), passages version and settings. Count, last_seen and run_id are this run's."""
    table = store.open(cfg.storage.rankings_table)
    if table is None or S.SETTINGS not in table.schema.names:
        return S.RANKINGS_SCHEMA.empty_table()
    rows = store.rows_by_id(table, selected[S.QUERY_ID].to_pylist(), S.RANKINGS_SCHEMA.names, key=S.QUERY_ID)
    same = pc.and_(pc.and_(pc.equal(rows[S.PASSAGES_VERSION], sink.passages_version),
                           pc.equal(rows[S.SETTINGS], sink.settings)),
                   pc.equal(rows[S.NORMALIZER], sink.normalizer))
    rows = rows.filter(pc.fill_null(same, False))
    if rows.num_rows == 0:
        return S.RANKINGS_SCHEMA.empty_table()
    today = pc.index_in(rows[S.QUERY_ID], value_set=selected[S.QUERY_ID])  # this run's count and last_seen
    for name in (S.COUNT, S.LAST_SEEN):
        rows = rows.set_column(rows.schema.get_field_index(name), name, selected[name].take(today))
    rows = rows.set_column(rows.schema.get_field_index(S.RUN_ID), S.RUN_ID, pa.array([sink.run_id] * rows.num_rows))
    return rows.select(S.RANKINGS_SCHEMA.names).cast(S.RANKINGS_SCHEMA)


def _release_leases(cfg, state: _RunState) -> None:
    from pipelines.store import Store

    store = Store(cfg.storage)
    for table, lease in state.leases:
        store.release(table, lease)


def _check_model_path(model: str) -> None:
    looks_local = model.startswith((".", "/", "~")) or os.sep in model and os.path.exists(os.path.dirname(model))
    if looks_local and not os.path.exists(model):
        raise RerankError(f"rerank.model {model!r} does not exist; train one with `batchrank train-reranker`, or "
                          "point rerank.model at a sentence-transformers CrossEncoder folder or hub name")


def _quarantine_rows(rows: list[dict[str, Any]], run_id: str) -> pa.Table:
    if not rows:
        return S.QUARANTINE_SCHEMA.empty_table()
    table = pa.Table.from_pylist(rows)
    n = table.num_rows
    return (table.append_column(S.RUN_ID, pa.array([run_id] * n))
            .append_column(S.JOB, pa.array(["rerank"] * n))
            .append_column(S.QUARANTINED_AT, pa.array([utcnow()] * n, S.TIMESTAMP)))


class _Sink:
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


def _finish(cfg, state: _RunState, save: bool = True) -> dict[str, Any]:
    """Complete the report from the run's counters, write it as JSON, return it."""
    from pipelines.exact_search import method_for_report
    from pipelines.store import Store

    sink, timer, report, qlog = state.sink, state.timer, state.report, state.log
    seconds = dict(timer.seconds, retrieve_busy_sum=round(sink.retrieve_seconds, 3),
                   score_busy_sum=round(sink.score_seconds, 3), total=round(time.perf_counter() - state.t0, 3))
    pipeline_s = timer.seconds.get("pipeline")
    succeeded = report["status"] == "succeeded"
    selected = qlog.selected.num_rows if qlog else 0
    tables = report.setdefault("tables", {})
    try:
        table = Store(cfg.storage).open(cfg.storage.rankings_table)
        current = {"version": table.version, "rows": table.count_rows()} if table is not None else None
    except Exception as exc:  # the report must still be written when storage is what failed
        current = {"unreadable": str(exc)}
    tables["rankings"] = {"name": cfg.storage.rankings_table, "tag": state.run_id if succeeded else None,
                          "current": current, "previous_version": tables.pop("rankings_previous_version", None),
                          "published_version": tables.pop("rankings_version", None)}
    report.update({
        "finished_at": utcnow().isoformat(),
        "storage": redact_uri(cfg.storage.uri),
        "query_log": {"path": cfg.query_log.path, "window": qlog.window if qlog else None,
                      **(qlog.counts if qlog else {}), "quarantine_reasons": qlog.reasons if qlog else {}},
        "queries": {"selected": selected, "ranked": sink.ranked if succeeded else 0,
                    "scored_not_published": 0 if succeeded else sink.ranked,
                    "carried_over": sink.carried if succeeded else 0,
                    "without_candidates": sink.without_candidates, "fewer_than_k_candidates": sink.short_lists,
                    "reconciled": (sink.ranked == selected) if succeeded else None},
        "pairs": {"total": sink.pairs, "scored": sink.scored, "cached": sink.cached,
                  "per_second": round(sink.scored / pipeline_s, 2) if pipeline_s else None,
                  "per_second_end_to_end": round(sink.scored / seconds["total"], 2) if seconds["total"] else None},
        "cache": {"enabled": cfg.rerank.cache, "table": cfg.storage.pair_scores_table,
                  "version_read": state.cache_version, "pairs_written": sink.pairs_written},
        "retrieve": {"k": cfg.retrieve.k, "source": cfg.retrieve.source, "exact": cfg.retrieve.exact,
                     **method_for_report(cfg, sink.passages_version)},
        "models": {"bi_encoder": cfg.embed.identity, "cross_encoder": cfg.rerank.model,
                   "cross_encoder_id": sink.cross_encoder_id, "top_n": cfg.rerank.top_n},
        "seconds": seconds,
        "nodes": {stage: dict(sorted(counts.items())) for stage, counts in sink.nodes.items()},
    })
    return save_report(report, cfg) if save else report


def summary(report: dict[str, Any]) -> str:
    """A few lines for humans at the end of a run."""
    q, ql, p, s, c = report["queries"], report["query_log"], report["pairs"], report["seconds"], report["cache"]
    head = f"rerank run {report['run_id']}: {report['status']}"
    lines = [head + (f" ({report['error']})" if report.get("error") else "")]
    if ql.get("lines_read") is not None:
        lines.append(f"  log: {ql['lines_read']:,} lines read = {ql['lines_counted']:,} counted + "
                     f"{ql['lines_outside_window']:,} outside the window + {ql['lines_quarantined']:,} quarantined"
                     + ("" if ql["lines_reconciled"] else "  (DOES NOT RECONCILE)"))
        if ql["quarantine_reasons"]:
            lines.append("  quarantined: " + ", ".join(f"{k} {v}" for k, v in ql["quarantine_reasons"].items()))
        lines.append(f"  queries: {ql['distinct_queries']:,} distinct, {ql['below_min_count']:,} below min_count, "
                     f"{ql['beyond_head']:,} beyond head, {q['selected']:,} selected, {q['ranked']:,} ranked"
                     + (f" ({q['carried_over']:,} carried over: same passages version and settings)"
                        if q.get("carried_over") else ""))
    lines.append(f"  pairs: {p['total']:,} total = {p['scored']:,} scored + {p['cached']:,} from cache"
                 + ("" if c["enabled"] else " (rerank.cache off)")
                 + f"; {p['per_second']} scored/s in the pipeline, {p['per_second_end_to_end']} end to end")
    if report.get("fusion"):
        w = report["fusion"]["cross_encoder_weight"]
        lines.append(f"  candidates: {report['retrieve']['source']} top {report['retrieve']['k']}; final score: "
                     + ("cross-encoder alone" if w is None else f"{w:.2f} x cross-encoder + {1 - w:.2f} x first "
                        "stage (standardised)") + f" [{report['fusion']['origin']}]")
    if line := nodes_line(report.get("nodes", {}), "queries"):
        lines.append(line)
    restarts = {k: v["restarts"] for k, v in (report.get("actors") or {}).items() if v.get("restarts")}
    if restarts:
        lines.append("  workers: " + ", ".join(f"{n} {k} actor restart(s)" for k, n in restarts.items())
                     + " (their tasks were retried)")
    if took := (report.get("lock") or {}).get("took_over"):
        from pipelines.locks import describe

        lines.append(f"  lock: took over from {describe(took)}, which ended without releasing it")
    lines.append("  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in s.items()))
    r = report["tables"]["rankings"]
    if report["status"] == "succeeded":
        lines.append(f"  table: {r['name']} v{r['published_version']} (tag {r['tag']}), {r['current']['rows']:,} "
                     f"queries; previous version {r['previous_version']}; passages "
                     f"v{report['tables']['passages']['version']}")
    else:
        cur = r["current"]
        lines.append(f"  table: {r['name']} unchanged" + (f" (v{cur['version']})" if cur and "version" in cur else
                                                             " (not created yet)"))
    lines.append(f"  report: {report['report_path']}")
    return "\n".join(lines)
