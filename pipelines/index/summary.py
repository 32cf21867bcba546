"""The index run's report: completed from the run's counters, and summed up in a few lines for humans.

Reads top to bottom::

    row_counts         row accounting: read = written + unchanged + delete markers + quarantined (+ not published)
    finish_report      the report's fields (rows; documents added/updated/deleted; passage rows before/written/after;
                       speed, table, ...)
    reliability_lines  what the run recovered from: a killed run's staging, restarted actors, a stale lock
    summary            the lines the CLI prints at the end of a run
"""

from __future__ import annotations

from typing import Any

from pipelines.index.sink import Sink
from pipelines.report import firsts_line, nodes_line, redact_uri, utcnow


def row_counts(sink: Sink, *, failed: bool) -> dict[str, Any]:
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


def finish_report(cfg, state) -> dict[str, Any]:
    """Complete the report from the run's counters (``state``: the index run's sink, timer, report and what
    passages held at the start) and return it; the run protocol saves it."""
    from pipelines.store import Store

    sink, timer, report = state.sink, state.timer, state.report
    seconds = dict(timer.seconds, embed_busy_sum=round(sink.embed_seconds, 3), total=state.run.elapsed())
    try:
        table = Store(cfg.storage).open(cfg.storage.passages_table)
        version, rows = (table.version, table.count_rows()) if table is not None else (None, 0)
    except Exception as exc:  # the report must still be written when storage is what failed
        version, rows = None, f"unreadable: {exc}"
    pipeline_s = timer.seconds.get("pipeline")
    succeeded = report["status"] == "succeeded"
    published = succeeded or report.get("committed_version") is not None  # upkeep can fail after the commit
    updated = state.updated if published else 0
    embedded = sink.rows_written - sink.rows_resumed
    report.update({
        "finished_at": utcnow().isoformat(),
        "corpus": cfg.corpus.path,
        "corpus_mode": cfg.corpus.mode,
        "storage": redact_uri(cfg.storage.uri),
        "model": cfg.embed.identity,
        "rows": row_counts(sink, failed=not published),
        "documents": {"added": (sink.rows_written - updated) if published else 0, "updated": updated,
                      "deleted": sink.rows_deleted if published else 0},
        "passages": {"before": report.pop("passages_before", None),
                     "written": sink.passages_written if published else 0, "after": rows},
        "quarantine_reasons": dict(sorted(sink.reasons.items())),
        "quarantine_appended_during_run": sink.quarantine_flushed,  # the rest at the end, before the commit
        "docs_per_second": round(embedded / pipeline_s, 2) if pipeline_s else None,
        "docs_per_second_end_to_end": round(embedded / seconds["total"], 2) if seconds["total"] else None,
        "seconds": seconds,
        "nodes": {"embed": dict(sorted(sink.nodes.items()))},
        "table": {"name": cfg.storage.passages_table, "version": version, "rows": rows,
                  "tag": report.pop("table_tag", None), "committed_version": report.pop("committed_version", None)},
    })
    report.setdefault("indexes", {})
    return report


def reliability_lines(report: dict[str, Any]) -> list[str]:
    """What the run recovered from: a killed run's staging taken over, restarted actors, a stale lock."""
    lines = []
    if res := report.get("resume"):
        lines.append(f"  resumed: {res.get('taken_over', 0):,} rows staged by killed run(s) "
                     f"{', '.join(res['from_runs'])} taken over, not embedded again"
                     + (f"; {res['dropped']:,} stale staged rows dropped" if res.get("dropped") else ""))
    if (a := report.get("embed_actors") or {}).get("restarts"):
        lines.append(f"  workers: {a['restarts']} embedding actor restart(s) (their tasks were retried)")
    if took := (report.get("lock") or {}).get("took_over"):
        from pipelines.cluster.locks import describe

        lines.append(f"  lock: took over from {describe(took)}, which ended without releasing it")
    return lines


def summary(report: dict[str, Any]) -> str:
    """A few lines for humans at the end of a run."""
    r, s = report["rows"], report["seconds"]
    if report["status"] != "succeeded":
        return (f"index run {report['run_id']}: {report['status']} ({report.get('error')})\n"
                f"  rows: {r}\n  the previous table version is intact; report: {report.get('report_path')}")
    p, d = report["passages"], report["documents"]
    lines = [
        f"index run {report['run_id']}: {report['status']} ({report.get('mode')}"
        + (f", model {report['model_change']['from']} -> {report['model_change']['to']}"
           if report.get("model_change") else "") + ")",
        f"  rows: {r['read']:,} read = {r['written']:,} written + "
        + (f"{r['unchanged']:,} unchanged (not embedded) + " if r.get("unchanged") else "")
        + (f"{r['delete_markers']:,} delete markers + " if r.get("delete_markers") else "")
        + f"{r['quarantined']:,} quarantined"
        + ("" if r["reconciled"] else "  (DOES NOT RECONCILE)"),
        (f"  documents: {d['added']:,} added, {d['updated']:,} updated, {d['deleted']:,} deleted; passages: "
         f"{p['before'] or 0:,} before, {p['written']:,} written, "
         f"{p['after'] if isinstance(p['after'], str) else format(p['after'], ',')} after"),
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
    lines += reliability_lines(report)
    ix, up = report["indexes"], report.get("upkeep", {})
    ann = ix.get("ann", {})
    ann_state = ("exact search" if ann.get("type") == "exact" else
                 f"{ann.get('type')} trained ({ann.get('reason')}) on {ann.get('built_on')} "
                 f"({ann.get('accelerator')}, {ann.get('build_seconds')} s, sample of "
                 f"{ann.get('train_sample_rows', 0):,} vectors)" if ann.get("built") else
                 f"{ann.get('type')} +{ann['rows_added_to_index']:,} rows" if ann.get("rows_added_to_index") else
                 f"{ann.get('type')} up to date")
    lines += [
        "  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in s.items()),
        *filter(None, [firsts_line(report)]),
        f"  table: {report['table']['name']} v{report['table']['version']}, {report['table']['rows']:,} passages"
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
