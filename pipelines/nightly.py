"""The nightly job: incremental reindex → table upkeep → rerank of the window's query log, one run, one report.

Reads top to bottom::

    index.run   only new and changed documents embedded, deletions applied, one commit to passages;
                then upkeep: indexes brought up to date (ANN retrained past index.ann.retrain_fraction),
                small files compacted, old versions cleaned (tagged and leased versions kept)
    rerank.run  the query log's window; pairs already in the score cache are not scored again;
                one commit to rankings; upkeep of rankings and of the cache
    report      one JSON report with both stages; both tables' new versions are tagged with this run's id
                (``nightly-<UTC date and time>-<hex>``)

A failed index stage stops the night before the rerank (the rankings stay as they were); each stage
leaves its table's previous version in place when it fails.

Example::

    report = run(load_config("configs/demo.yaml"))
    report["stages"]["index"]["rows"], report["stages"]["rerank"]["pairs"]
"""

from __future__ import annotations

import time
from typing import Any

from pipelines import runs
from pipelines.report import utcnow


def run(cfg, *, run_id: str | None = None, now=None) -> dict[str, Any]:
    """Run one night; return its report (also written as JSON). A failed stage raises after the report is
    written, like every job."""
    from pipelines.index import job as index
    from pipelines.rerank import job as rerank

    night = runs.start(cfg, "nightly", sections=("corpus", "query_log", "rerank"), command="batchrank nightly",
                       run_id=run_id, tables=(cfg.storage.passages_table, cfg.storage.rankings_table),
                       stages={}, seconds={})
    report = night.report

    def stages() -> None:
        for name, stage, kwargs in (("index", index, {}), ("rerank", rerank, {"now": now})):
            start = time.perf_counter()
            try:
                report["stages"][name] = stage.run(cfg, run_id=night.run_id, save=False, **kwargs)
            except BaseException as exc:
                report["stages"][name] = getattr(exc, "batchrank_report", None)
                report["failed_stage"] = name
                raise
            finally:
                report["seconds"][name] = round(time.perf_counter() - start, 3)
        report["status"] = "succeeded"

    return runs.guarded(night, cfg, body=stages, finish=lambda: _finish(night))


def _finish(night: runs.Run) -> dict[str, Any]:
    report = night.report
    report["finished_at"] = utcnow().isoformat()
    report["seconds"]["total"] = night.elapsed()
    ix, rr = report["stages"].get("index") or {}, report["stages"].get("rerank") or {}
    report["work"] = {
        "documents_embedded": (ix.get("rows") or {}).get("written"),
        "documents_unchanged": (ix.get("rows") or {}).get("unchanged"),
        "documents_deleted": (ix.get("documents") or {}).get("deleted"),
        "passages_embedded": (ix.get("passages") or {}).get("written"),
        "pairs_scored": (rr.get("pairs") or {}).get("scored"),
        "pairs_from_cache": (rr.get("pairs") or {}).get("cached"),
    }
    report["tables"] = {"passages": (ix.get("table") or {}).get("version"),
                        "rankings": ((rr.get("tables") or {}).get("rankings") or {}).get("published_version"),
                        "tag": report["run_id"]}
    return report


def summary(report: dict[str, Any]) -> str:
    """The two stages' summaries under one headline."""
    from pipelines.index import job as index
    from pipelines.rerank import job as rerank

    w, s = report["work"], report["seconds"]
    head = (f"nightly run {report['run_id']}: {report['status']}"
            + (f" in the {report['failed_stage']} stage ({report.get('error')})" if report.get("failed_stage") else "")
            + f"; {s['total']:.1f}s")
    lines = [head]
    if w["documents_embedded"] is not None:
        lines.append(f"  work: {w['documents_embedded']:,} documents embedded ({w['documents_unchanged'] or 0:,} "
                     f"unchanged, {w['documents_deleted'] or 0:,} deleted)"
                     + (f", {w['pairs_scored']:,} pairs scored ({w['pairs_from_cache'] or 0:,} from the cache)"
                        if w["pairs_scored"] is not None else ""))
    for name, stage in (("index", index), ("rerank", rerank)):
        sub = report["stages"].get(name)
        if sub:
            sub.setdefault("report_path", report.get("report_path"))
            lines += ["  " + line for line in stage.summary(sub).splitlines() if not line.lstrip().startswith("report:")]
    lines.append(f"  report: {report.get('report_path')}")
    return "\n".join(lines)
