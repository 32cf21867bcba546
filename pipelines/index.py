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
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import schema as S
from pipelines.faults import maybe_fail
from pipelines.report import Progress, Timer, new_run_id, redact_uri, save_report, utcnow

log = logging.getLogger("batchrank.index")
FLUSH_ROWS = 4096  # rows buffered on the driver before a staging append
# Small blocks (Ray Data's default is 128 MiB) keep every embedding actor fed, progress live and
# driver memory flat; a block of 64 rows with 384-d vectors is about 100 KiB.
BLOCK_BYTES = 256 * 1024


def run(cfg, *, run_id: str | None = None) -> dict[str, Any]:
    """Index the configured corpus; return the run report (also written as JSON).

    On failure the report is written with ``status: failed`` and the error, then the error is
    raised again; the previous ``passages`` version is untouched.
    """
    cfg.require("corpus", command="batchrank index")
    run_id = run_id or new_run_id("index")
    state = _RunState(run_id, cfg.embed.model)
    try:
        _index(cfg, state)
    except BaseException as exc:
        state.report.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        exc.batchrank_report = _finish(cfg, state)  # the CLI prints its summary
        raise
    return _finish(cfg, state)


class _RunState:
    """What a run has done so far: the sink's counters, stage timings and the report being built."""

    def __init__(self, run_id: str, model: str):
        self.run_id = run_id
        self.sink = _Sink(run_id, model)
        self.timer, self.t0 = Timer(), time.perf_counter()
        self.report: dict[str, Any] = {"job": "index", "run_id": run_id, "status": "running",
                                       "started_at": utcnow().isoformat()}


def _index(cfg, state: _RunState) -> None:
    import ray.data

    from pipelines.corpus import expand_paths, read_corpus
    from pipelines.embed import Embedder
    from pipelines.runtime import (
        READ_CPUS,
        actor_device,
        actor_resources,
        check_not_in_job_package,
        init_ray,
        worker_env,
    )
    from pipelines.store import Store, StoreError
    from pipelines.validate import RowSpec

    run_id, sink, timer, report = state.run_id, state.sink, state.timer, state.report
    store = Store(cfg.storage)
    e = cfg.embed

    with timer("startup"):
        expand_paths(cfg.corpus.path)  # fail fast on a missing corpus, before Ray starts
        check_not_in_job_package(cfg.storage.uri, "storage.uri")
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # deterministic: the first row of a duplicated id wins
        ctx.enable_progress_bars = False  # our own progress line below, readable in job logs too
        ctx.target_max_block_size = BLOCK_BYTES
        cluster = init_ray(cfg.ray)  # before LanceDB loads: Ray forks processes, LanceDB's runtime dislikes forks
        built_with = store.passages_model()
        if built_with is not None and built_with != e.model:
            raise StoreError(
                f"'{cfg.storage.passages_table}' was built with model '{built_with}', but embed.model is "
                f"'{e.model}'; vectors of two models must not mix: set embed.model back, or index into a new "
                "storage.passages_table"
            )
        known = store.content_hashes() if built_with is not None else {}  # rows a rerun need not embed
        cpus, gpus = actor_resources(cluster, e.actors, e.cpus_per_actor, e.gpus_per_actor)
        report["cluster"] = {"address": cluster.address, "nodes": cluster.nodes, "cpus": cluster.cpus,
                             "gpus": cluster.gpus, "actors": e.actors, "cpus_per_actor": cpus, "gpus_per_actor": gpus}
        ds = read_corpus(cfg.corpus, RowSpec.from_config(cfg), read_cpus=READ_CPUS).map_batches(
            Embedder,
            fn_constructor_kwargs=dict(
                model=e.model, batch_size=e.batch_size, device=actor_device(e.device, gpus), dtype=e.dtype,
                max_seq_length=e.max_seq_length, normalize=e.normalize, trust_remote_code=e.trust_remote_code,
                num_threads=e.cpus_per_actor, known=known,
            ),
            # Two tasks in flight per actor keep it fed without letting the first actor up hoard the queue.
            compute=ray.data.ActorPoolStrategy(size=e.actors, max_tasks_in_flight_per_actor=2),
            num_cpus=cpus,
            num_gpus=gpus,
            batch_size=e.rows_per_call,
            batch_format="pyarrow",
            runtime_env={"env_vars": worker_env()},
        )

    log.info("run %s: indexing %s into %s/%s", run_id, cfg.corpus.path, redact_uri(cfg.storage.uri),
             cfg.storage.passages_table)
    staged = None
    try:
        with timer("pipeline"):
            with Progress("index", unit="docs") as progress:
                for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=2):
                    unchanged_before = sink.rows_unchanged
                    good, bad = sink.split(batch)
                    if staged is None and good.num_rows:
                        dim = good.schema.field(S.VECTOR).type.list_size
                        staged = store.stage(cfg.storage.passages_table, run_id,
                                             S.passages_schema(dict(cfg.corpus.metadata_fields), dim))
                    if sink.pending_rows >= FLUSH_ROWS:
                        with timer("stage_writes"):
                            staged.add(sink.take_pending())
                    progress.update(good.num_rows, unchanged=sink.rows_unchanged - unchanged_before,
                                    quarantined=bad.num_rows)
            if staged is not None and sink.pending_rows:
                with timer("stage_writes"):
                    staged.add(sink.take_pending())

        with timer("quarantine_write"):
            store.append_quarantine(sink.quarantine_table())
        maybe_fail("before_commit")
        with timer("commit"):
            if staged is not None:
                version = store.commit_passages(staged, run_id)
                report["table_tag"] = run_id
            else:  # nothing good to write: the table stays as it was
                existing = store.open(cfg.storage.passages_table)
                version = existing.version if existing is not None else None
        maybe_fail("after_commit")
        with timer("index"):
            report["indexes"] = store.ensure_indexes(cfg.index) if version is not None else {}
        report["status"] = "succeeded"
    finally:
        if staged is not None:
            staged.drop()


def _rows(sink: _Sink, *, failed: bool) -> dict[str, Any]:
    """Row accounting: read = written + unchanged (already in passages, not embedded) + quarantined
    (+ staged but not published, when the run failed)."""
    written, unpublished = (0, sink.rows_written) if failed else (sink.rows_written, 0)
    rows = {"read": sink.rows_read, "written": written, "unchanged": sink.rows_unchanged,
            "quarantined": sink.rows_quarantined}
    if failed:
        rows["not_published_run_failed"] = unpublished
    rows["reconciled"] = sink.rows_read == written + sink.rows_unchanged + sink.rows_quarantined + unpublished
    return rows


def _finish(cfg, state: _RunState) -> dict[str, Any]:
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
    report.update({
        "finished_at": utcnow().isoformat(),
        "corpus": cfg.corpus.path,
        "storage": redact_uri(cfg.storage.uri),
        "model": cfg.embed.model,
        "rows": _rows(sink, failed=report["status"] != "succeeded"),
        "quarantine_reasons": dict(sorted(sink.reasons.items())),
        "docs_per_second": round(sink.rows_written / pipeline_s, 2) if pipeline_s else None,
        "docs_per_second_end_to_end": round(sink.rows_written / seconds["total"], 2) if seconds["total"] else None,
        "seconds": seconds,
        "table": {"name": cfg.storage.passages_table, "version": version, "rows": rows,
                  "tag": report.pop("table_tag", None)},
    })
    report.setdefault("indexes", {})
    return save_report(report, cfg)


class _Sink:
    """Driver-side end of the stream: splits good from bad rows, catches duplicate ids, counts."""

    def __init__(self, run_id: str, model: str):
        self.run_id, self.model = run_id, model
        self.seen: dict[str, str] = {}
        self.rows_read = self.rows_written = self.rows_unchanged = self.rows_quarantined = 0
        self.embed_seconds = 0.0
        self.reasons: dict[str, int] = {}
        self._pending: list[pa.Table] = []
        self.pending_rows = 0
        self._bad: list[pa.Table] = []

    def split(self, batch: pa.Table) -> tuple[pa.Table, pa.Table]:
        self.rows_read += batch.num_rows
        self.embed_seconds += pc.sum(batch[S.SECONDS]).as_py() or 0.0
        batch = self._mark_duplicates(batch)
        is_bad = pc.is_valid(batch[S.REASON_CODE])
        unchanged = pc.and_(pc.invert(is_bad), batch[S.UNCHANGED]) if S.UNCHANGED in batch.column_names else None
        if unchanged is not None:  # already in passages as they are: counted, not rewritten
            self.rows_unchanged += pc.sum(unchanged).as_py() or 0
            batch, is_bad = batch.filter(pc.invert(unchanged)).drop_columns([S.UNCHANGED]), \
                is_bad.filter(pc.invert(unchanged))
        good, bad = batch.filter(pc.invert(is_bad)), batch.filter(is_bad)
        if good.num_rows:
            now = pa.array([utcnow()] * good.num_rows, S.TIMESTAMP)
            good = (good.append_column(S.MODEL, pa.array([self.model] * good.num_rows))
                    .append_column(S.EMBEDDED_AT, now)
                    .append_column(S.RUN_ID, pa.array([self.run_id] * good.num_rows)))
            self._pending.append(good)
            self.pending_rows += good.num_rows
            self.rows_written += good.num_rows
        if bad.num_rows:
            self._bad.append(bad.select([S.SOURCE, S.ROW, S.ID, S.REASON_CODE, S.REASON, S.RAW]))
            self.rows_quarantined += bad.num_rows
            for code in bad[S.REASON_CODE].to_pylist():
                self.reasons[code] = self.reasons.get(code, 0) + 1
        return good, bad

    def _mark_duplicates(self, batch: pa.Table) -> pa.Table:
        ids = batch[S.ID].to_pylist()
        codes = batch[S.REASON_CODE].to_pylist()
        reasons = batch[S.REASON].to_pylist()
        raws = batch[S.RAW].to_pylist()
        sources, rows = batch[S.SOURCE].to_pylist(), batch[S.ROW].to_pylist()
        changed = False
        for i, doc_id in enumerate(ids):
            if codes[i] is not None:
                continue
            where = f"{sources[i]}:{rows[i]}"
            first = self.seen.setdefault(doc_id, where)
            if first != where:
                codes[i], reasons[i] = "duplicate_id", f"duplicate id '{doc_id}' (first seen at {first})"
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


def _row_json(batch: pa.Table, i: int) -> str:
    """The input fields of one row, as the raw text of a quarantined duplicate."""
    import json

    row = batch.slice(i, 1).to_pylist()[0]
    inputs = {k: v for k, v in row.items() if k not in _NOT_INPUT and not k.startswith("_")}
    return json.dumps(inputs, ensure_ascii=False)[:4096]


_NOT_INPUT = {S.VECTOR, S.CONTENT_HASH, S.SOURCE, S.ROW, S.REASON_CODE, S.REASON, S.RAW}


def summary(report: dict[str, Any]) -> str:
    """A few lines for humans at the end of a run."""
    r, s = report["rows"], report["seconds"]
    if report["status"] != "succeeded":
        return (f"index run {report['run_id']}: {report['status']} ({report.get('error')})\n"
                f"  rows: {r}\n  the previous table version is intact; report: {report.get('report_path')}")
    lines = [
        f"index run {report['run_id']}: {report['status']}" + (f" ({report['error']})" if "error" in report else ""),
        f"  rows: {r['read']:,} read = {r['written']:,} written + "
        + (f"{r['unchanged']:,} unchanged (not embedded) + " if r.get("unchanged") else "")
        + f"{r['quarantined']:,} quarantined"
        + ("" if r["reconciled"] else "  (DOES NOT RECONCILE)"),
    ]
    if report["quarantine_reasons"]:
        lines.append("  quarantined: " + ", ".join(f"{k} {v}" for k, v in report["quarantine_reasons"].items()))
    lines += [
        f"  speed: {report['docs_per_second']} docs/s in the pipeline, {report['docs_per_second_end_to_end']} docs/s end to end",
        "  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in s.items()),
        f"  table: {report['table']['name']} v{report['table']['version']}, {report['table']['rows']:,} rows"
        if report["table"]["version"] is not None else f"  table: {report['table']['name']} not created (no good rows)",
        f"  indexes: ann={report['indexes'].get('ann', {}).get('type')}, "
        f"fts={'on' if 'fts' in report['indexes'] else 'off'}",
        f"  report: {report['report_path']}",
    ]
    return "\n".join(lines)

