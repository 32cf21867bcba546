"""The rerank job's report: completed from the run's counters, and its summary for humans.

Reads top to bottom::

    finish_report   the report's fields from the sink's counters, the query log's counts and the stage timer;
                    the rankings table as it is now (its version and rows, or why it could not be read)
    summary         a few lines: lines read = counted + outside window + quarantined; queries selected, ranked,
                    carried over; pairs total = scored + from cache, pairs/s; the table published (or unchanged)

Example::

    report = finish_report(cfg, run, sink, qlog, cache_version)
    print(summary(report))
"""

from __future__ import annotations

from typing import Any

from pipelines.report import firsts_line, nodes_line, redact_uri, utcnow


def finish_report(cfg, run, sink, qlog, cache_version: int | None) -> dict[str, Any]:
    """Complete ``run.report`` from the run's counters (``sink``: a ``rerank_sink.Sink``; ``qlog``: the
    ``QueryLog``, None when the run failed before reading it) and return it."""
    from pipelines.rerank.exact_search import method_for_report
    from pipelines.store import Store

    timer, report = run.timer, run.report
    seconds = dict(timer.seconds, retrieve_busy_sum=round(sink.retrieve_seconds, 3),
                   score_busy_sum=round(sink.score_seconds, 3), total=run.elapsed())
    pipeline_s = timer.seconds.get("pipeline")
    succeeded = report["status"] == "succeeded"
    selected = qlog.selected.num_rows if qlog else 0
    tables = report.setdefault("tables", {})
    try:
        table = Store(cfg.storage).open(cfg.storage.rankings_table)
        current = {"version": table.version, "rows": table.count_rows()} if table is not None else None
    except Exception as exc:  # the report must still be written when storage is what failed
        current = {"unreadable": str(exc)}
    tables["rankings"] = {"name": cfg.storage.rankings_table, "tag": run.run_id if succeeded else None,
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
                  "version_read": cache_version, "pairs_written": sink.pairs_written},
        "retrieve": {"k": cfg.retrieve.k, "source": cfg.retrieve.source, "exact": cfg.retrieve.exact,
                     "level": cfg.retrieve.level, "query_prompt": cfg.embed.query_prompt,
                     **method_for_report(cfg, sink.passages_version)},
        "models": {"bi_encoder": cfg.embed.identity, "cross_encoder": cfg.rerank.model,
                   "cross_encoder_id": sink.cross_encoder_id, "top_n": cfg.rerank.top_n},
        "seconds": seconds,
        "nodes": {stage: dict(sorted(counts.items())) for stage, counts in sink.nodes.items()},
    })
    return report


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
        from pipelines.cluster.locks import describe

        lines.append(f"  lock: took over from {describe(took)}, which ended without releasing it")
    lines.append("  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in s.items()))
    if line := firsts_line(report):
        lines.append(line)
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
