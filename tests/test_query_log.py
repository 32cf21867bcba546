"""Query logs: normalisation, counting, time windows, selection, quarantine of bad lines. No Ray."""

from __future__ import annotations

import gzip
import json
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_jsonl

from pipelines.config import parse_config
from pipelines.rerank.query_log import normalize, parse_timestamp, query_id, read_query_log

DEFAULT_RULES = {"unicode": "NFKC", "casefold": True, "collapse_whitespace": True}


def log_cfg(path, **kw):
    return parse_config({"query_log": {"path": str(path), **kw}}).query_log


def t(day: int, hour: int = 12) -> str:
    return f"2026-11-{day:02d}T{hour:02d}:00:00Z"


def test_normalisation_rules():
    assert normalize("  Vitamin\tD  and\n BONE ", DEFAULT_RULES) == "vitamin d and bone"
    assert normalize("ＡＢＣ ﬁle", DEFAULT_RULES) == "abc file"  # NFKC folds full-width letters and ligatures
    assert normalize("Straße", DEFAULT_RULES) == "strasse"  # casefold, not lower
    assert normalize("  Keep  Case ", {"unicode": "none", "casefold": False, "collapse_whitespace": False}) \
        == "  Keep  Case "
    assert query_id("vitamin d") == query_id(normalize("VITAMIN   D", DEFAULT_RULES))
    assert query_id("vitamin d") != query_id("vitamin e") and len(query_id("x")) == 16


def test_timestamps():
    want = datetime(2026, 11, 29, 8, 0, tzinfo=UTC)
    assert parse_timestamp("2026-11-29T08:00:00Z") == want
    assert parse_timestamp("2026-11-29T09:00:00+01:00") == want
    assert parse_timestamp("2026-11-29 08:00:00") == want  # naive means UTC
    epoch = want.timestamp()
    assert parse_timestamp(epoch) == want
    assert parse_timestamp(int(epoch * 1000)) == want  # milliseconds
    assert parse_timestamp(int(epoch * 1_000_000)) == want  # microseconds
    for bad in ("yesterday", True, float("nan"), [1]):
        with pytest.raises(ValueError):
            parse_timestamp(bad)


def test_counting_dedupes_normalised_queries_and_orders_by_frequency(tmp_path):
    rows = ([{"query": "Cancer Risk", "timestamp": t(1)}] * 3 + [{"query": "cancer  risk ", "timestamp": t(2)}]
            + [{"query": "brain data", "timestamp": t(3)}] * 2 + [{"query": "gene", "timestamp": t(1)}])
    log = read_query_log(log_cfg(write_jsonl(tmp_path / "log.jsonl", rows)))
    sel = log.selected.to_pylist()
    assert [(r["query"], r["count"]) for r in sel] == [("cancer risk", 4), ("brain data", 2), ("gene", 1)]
    assert sel[0]["query_id"] == query_id("cancer risk")
    assert sel[0]["last_seen"] == datetime(2026, 11, 2, 12, tzinfo=UTC)
    assert log.counts["lines_read"] == 7 and log.counts["distinct_queries"] == 3 and log.counts["lines_reconciled"]


def test_min_count_and_head_with_deterministic_ties(tmp_path):
    rows = [{"query": q, "timestamp": t(1)} for q, n in (("a", 5), ("b", 3), ("d", 3), ("c", 3), ("e", 1))
            for _ in range(n)]
    path = write_jsonl(tmp_path / "log.jsonl", rows)
    log = read_query_log(log_cfg(path, min_count=2, head=3))
    assert log.selected["query"].to_pylist() == ["a", "b", "c"]  # ties broken by text
    assert log.counts["below_min_count"] == 1 and log.counts["beyond_head"] == 1 and log.counts["selected"] == 3
    assert log.counts["searches_selected"] == 11


def test_time_window_since_until_and_last_days(tmp_path):
    rows = [{"query": f"q{day}", "timestamp": t(day)} for day in range(1, 11)]
    path = write_jsonl(tmp_path / "log.jsonl", rows)
    log = read_query_log(log_cfg(path, since="2026-11-03", until="2026-11-06"))
    assert sorted(log.selected["query"].to_pylist()) == ["q3", "q4", "q5"]  # since inclusive, until exclusive
    assert log.counts["lines_outside_window"] == 7 and log.counts["lines_reconciled"]
    now = datetime(2026, 11, 10, 13, tzinfo=UTC)
    recent = read_query_log(log_cfg(path, last_days=2), now=now)
    assert sorted(recent.selected["query"].to_pylist()) == ["q10", "q9"]
    assert recent.window["since"] == "2026-11-08T13:00:00+00:00"
    before = read_query_log(log_cfg(path, last_days=1, until="2026-11-05"))  # the last day before `until`
    assert before.selected["query"].to_pylist() == ["q4"]


def test_bad_lines_are_quarantined_with_reasons_and_counts_reconcile(tmp_path):
    lines = [
        {"query": "good one", "timestamp": t(1)},
        '{"query": "unterminated',
        b'{"query": "caf\xe9", "timestamp": "2026-11-01"}',
        '["query", "list"]',
        {"timestamp": t(1)},
        {"query": None, "timestamp": t(1)},
        {"query": 42, "timestamp": t(1)},
        {"query": "   ", "timestamp": t(1)},
        {"query": "x" * 50, "timestamp": t(1)},
        {"query": "no time"},
        {"query": "bad time", "timestamp": "last tuesday"},
        {"query": "good two", "timestamp": t(2), "extra": "ignored"},
    ]
    path = tmp_path / "log.jsonl"
    with path.open("wb") as fh:
        for line in lines:
            fh.write(line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line)).encode())
            fh.write(b"\n")
    log = read_query_log(log_cfg(path, max_query_chars=40))
    codes = {row["reason_code"] for row in log.quarantine}
    assert codes == {"bad_json", "bad_utf8", "not_an_object", "missing_query", "bad_query_type", "empty_query",
                     "query_too_long", "missing_timestamp", "bad_timestamp"}
    assert log.reasons["missing_query"] == 2  # absent and null
    c = log.counts
    assert c["lines_read"] == 12 and c["lines_quarantined"] == 10 and c["lines_counted"] == 2 and c["lines_reconciled"]
    bad_time = next(r for r in log.quarantine if r["reason_code"] == "bad_timestamp")
    assert bad_time["row"] == 11 and "last tuesday" in bad_time["raw"] and "ISO 8601" in bad_time["reason"]
    assert all(r["source"] == str(path) and r["reason"] for r in log.quarantine)


def test_configured_fields_counts_and_parquet_folder_with_gzip(tmp_path):
    folder = tmp_path / "logs"
    folder.mkdir()
    pq.write_table(pa.table({
        "q": ["Cell Protein", "cell protein", "gene"],
        "ts": pa.array([datetime(2026, 11, 1, tzinfo=UTC)] * 3, pa.timestamp("ms", tz="UTC")),
        "n": [10, 5, 1], "user": ["u1", "u2", "u3"],
    }), folder / "part-0.parquet")
    with gzip.open(folder / "part-1.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"q": "gene", "ts": 1764547200, "n": 2}) + "\n")
        fh.write(json.dumps({"q": "gene", "ts": 1764547200, "n": 0}) + "\n")
    (folder / "_SUCCESS").write_text("")
    log = read_query_log(log_cfg(folder, text_field="q", time_field="ts", count_field="n"))
    assert [(r["query"], r["count"]) for r in log.selected.to_pylist()] == [("cell protein", 15), ("gene", 3)]
    assert log.reasons == {"bad_count": 1} and log.counts["lines_read"] == 5


def test_missing_log_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="query_log.path"):
        read_query_log(log_cfg(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match="query_log.path"):
        read_query_log(log_cfg(tmp_path / "*.jsonl"))


def test_quarantine_keeps_no_personal_fields_unless_configured(tmp_path):
    path = write_jsonl(tmp_path / "log.jsonl", [
        {"query": "bad time", "timestamp": "yesterday", "user_id": "u-123", "ip": "10.1.2.3"},
        '{"query": "broken", "user_id": "u-456"',
    ])
    kept = {r["reason_code"]: r["raw"] for r in read_query_log(log_cfg(path)).quarantine}
    assert json.loads(kept["bad_timestamp"]) == {"query": "bad time", "timestamp": "yesterday"}
    assert "u-456" not in kept["bad_json"] and "quarantine_raw: full" in kept["bad_json"]
    full = {r["reason_code"]: r["raw"] for r in read_query_log(log_cfg(path, quarantine_raw="full")).quarantine}
    assert "u-123" in full["bad_timestamp"] and "u-456" in full["bad_json"]
