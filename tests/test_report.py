from __future__ import annotations

import json
import re

from pipelines.report import Timer, new_run_id, redact_uri, write_report


def test_run_ids_sort_by_time_and_are_unique():
    a, b = new_run_id("index"), new_run_id("index")
    assert re.fullmatch(r"index-\d{8}T\d{6}Z-[0-9a-f]{6}", a) and a != b


def test_credentials_never_reach_reports():
    assert redact_uri("s3://AKIA:secret@bucket/db") == "s3://***@bucket/db"
    assert redact_uri("s3://bucket/db") == "s3://bucket/db"
    assert redact_uri("/data/db") == "/data/db"


def test_report_written_whole(tmp_path):
    path = write_report({"run_id": "index-x", "rows": {"read": 1}}, str(tmp_path / "reports"))
    assert json.loads(open(path).read())["rows"] == {"read": 1}
    assert not list((tmp_path / "reports").glob("*.tmp"))


def test_timer_accumulates_sections(monkeypatch):
    """Each section's wall time on a clock the test sets: repeated sections add up, a section that raises still
    counts, and seconds are rounded to milliseconds."""
    from types import SimpleNamespace

    from pipelines import report

    now = [100.0]
    monkeypatch.setattr(report, "time", SimpleNamespace(perf_counter=lambda: now[0]))

    def section(name: str, seconds: float, fail: bool = False) -> None:
        with timer(name):
            now[0] += seconds
            if fail:
                raise RuntimeError("boom")

    timer = Timer()
    section("read", 0.25)
    section("embed", 2.0)
    section("read", 0.5)
    try:
        section("commit", 1.23456, fail=True)
    except RuntimeError:
        pass
    section("tiny", 0.0004)
    assert timer.seconds == {"read": 0.75, "embed": 2.0, "commit": 1.235, "tiny": 0.0}


def test_progress_heartbeat_and_close(capsys):
    import time

    from pipelines.report import Progress

    with Progress("index", unit="docs", every=0.05) as progress:
        progress.update(3, quarantined=1)
        time.sleep(0.2)  # nothing arrives: the heartbeat still reports
    err = capsys.readouterr().err
    assert "index: 3 docs, 1 quarantined" in err and err.count("\n") >= 2
    assert progress._stop.is_set()
