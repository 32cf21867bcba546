"""Filter strings built from user input: every one goes through the store's single quoting of string literals
(``pipelines.store.sql_strings``), so a value is a value whatever it holds: quotes, an injected ``OR``,
backslashes, NUL, 5,000 characters. No Ray, no models."""

from __future__ import annotations

import ast
import re
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from pipelines import schema as S

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
HOSTILE = ["O'Brien", "x' OR '1'='1", "x' OR 1=1 --", "''", "'", "back\\slash", "ends with \\", "a\\'b", "nul\x00byte",
           "z" * 5000, "café ☃", "%", "_", "line\nbreak", '"double"', "a;b", "); DROP TABLE runs; --"]


def _runs_file(tmp_path: Path) -> Path:
    config = tmp_path / "job.yaml"
    config.write_text("storage: {uri: db}\n")
    spec = {"runs": {"uri": str(tmp_path / "runs")},
            "schedules": [{"name": "nightly", "cron": "30 2 * * *", "job": "nightly", "config": str(config)}]}
    path = tmp_path / "schedules.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _seed_runs(path: Path, names: list[str]):
    from pipelines.cluster.schedule import RunsLog, load_schedules

    log = RunsLog(load_schedules(path).runs)
    when = datetime(2026, 11, 30, 2, 30, tzinfo=UTC)
    log.upsert([{"key": f"{name}@{when.isoformat()}", "schedule": name, "job": "nightly", "scheduled_for": when,
                 "timezone": "UTC", "status": "SUCCEEDED", "submission_id": f"sub-{i}", "missed": 0}
                for i, name in enumerate(names)])
    return log


def test_runs_of_a_schedule_match_its_name_exactly(tmp_path):
    """``RunsLog.rows(name)`` returns the rows of that name and only those, whatever the name holds."""
    log = _seed_runs(_runs_file(tmp_path), ["nightly", "1", *HOSTILE])
    assert len(log.rows()) == len(HOSTILE) + 2
    for name in HOSTILE:
        assert [r["schedule"] for r in log.rows(name)] == [name], repr(name[:40])
    assert log.rows("x' OR '1'='1'") == []  # the injection, one quote off: no match, no error
    assert log.rows("O''Brien") == []  # already doubled: taken literally
    assert log.rows("\udcff") == []  # undecodable command-line bytes: no stored name has them


@pytest.mark.parametrize("name", ["O'Brien", "x' OR '1'='1", "a\\'b", "z" * 5000, "\udcff"])
def test_runs_command_with_a_hostile_schedule_name(tmp_path, name):
    """`batchrank runs --schedule NAME` neither crashes nor lists other schedules' runs."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    path = _runs_file(tmp_path)
    _seed_runs(path, ["nightly", "other"])
    result = CliRunner().invoke(app, ["runs", "--config", str(path), "--schedule", name])
    assert result.exit_code == 0, result.output
    assert result.exception is None
    assert "sub-0" not in result.output and "sub-1" not in result.output  # no other schedule's runs
    assert "no runs recorded for schedule" in result.output and "nightly" in result.output
    listed = CliRunner().invoke(app, ["runs", "--config", str(path), "--schedule", "nightly"])
    assert listed.exit_code == 0 and "sub-0" in listed.output and "sub-1" not in listed.output


def test_rows_by_id_holds_up_for_hostile_ids(tmp_path):
    """The id path (lookups, training, the pair cache) with the same values, in IN lists of several chunks."""
    from pipelines.config import StorageConfig
    from pipelines.store import Store

    store = Store(StorageConfig(uri=str(tmp_path / "db")))
    ids = [*HOSTILE, *(f"d{i}" for i in range(20))]
    table = store.db.create_table("t", data=pa.table({S.ID: ids, "n": list(range(len(ids)))}))
    for wanted in ([v] for v in HOSTILE):
        assert store.rows_by_id(table, wanted, [S.ID])[S.ID].to_pylist() == wanted
    got = store.rows_by_id(table, [*HOSTILE, "absent'"], [S.ID, "n"], chunk=3)
    assert sorted(got[S.ID].to_pylist()) == sorted(HOSTILE)


def test_quarantine_by_run_id_and_pair_cache_eviction_hold_up(tmp_path):
    """The two filters that quote a string by hand (the same doubling of ``'``): a run id and a cross-encoder id."""
    from pipelines.config import StorageConfig
    from pipelines.rerank import pair_cache
    from pipelines.store import Store

    store = Store(StorageConfig(uri=str(tmp_path / "db")))
    now = datetime(2026, 11, 30, tzinfo=UTC)
    rows = pa.table({S.RUN_ID: HOSTILE, S.JOB: ["index"] * len(HOSTILE), S.SOURCE: ["f"] * len(HOSTILE),
                     S.ROW: list(range(len(HOSTILE))), S.ID: HOSTILE, S.REASON_CODE: ["bad"] * len(HOSTILE),
                     S.REASON: ["r"] * len(HOSTILE), S.RAW: ["{}"] * len(HOSTILE),
                     S.QUARANTINED_AT: [now] * len(HOSTILE)})
    store.append_quarantine(rows)
    for run_id in HOSTILE:
        assert store.quarantine(run_id)[S.RUN_ID].to_pylist() == [run_id], repr(run_id[:40])

    n = len(HOSTILE)
    cache = pa.table({pair_cache.PAIR_KEY: [f"k{i}" for i in range(n)], S.CROSS_ENCODER: HOSTILE,
                      S.QUERY: ["q"] * n, pair_cache.DOC_ID: ["d"] * n, pair_cache.DOC_HASH: ["h"] * n,
                      pair_cache.SCORE: [0.5] * n, S.RUN_ID: ["r"] * n, pair_cache.SCORED_AT: [now] * n})
    pair_cache.write(store, cache)
    assert pair_cache.evict(store, "x' OR '1'='1", now=now) == n - 1  # every other cross-encoder's entries
    left = store.open(store.cfg.pair_scores_table).search().limit(None).to_arrow()
    assert left[S.CROSS_ENCODER].to_pylist() == ["x' OR '1'='1"]


_QUOTED = re.compile(r"'\{([^{}]+)\}'")  # '{expr}' inside an f-string: a value pasted between quotes


def _filter_fstrings(tree: ast.AST):
    """f-strings passed to ``where``/``delete``/``when_not_matched_by_source_delete``/``count_rows`` or the store's
    ``scan``/``delete_where`` (or to ``where=``), directly or as a variable assigned in the same function."""
    calls = {"where", "delete", "when_not_matched_by_source_delete", "when_matched_update_all", "count_rows",
             "scan", "delete_where"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in calls:
            for arg in [*node.args, *(k.value for k in node.keywords if k.arg in ("where", "filter"))]:
                for sub in ast.walk(arg):
                    if isinstance(sub, ast.JoinedStr):
                        yield sub


def test_no_filter_pastes_a_value_between_quotes():
    """A lint over pipelines/ and its subpackages (the store's included): no filter f-string puts an interpolated
    value between single quotes unless that expression escapes it (``sql_strings`` builds the quotes itself, so its
    uses never match). The one allowed quoted value is a timestamp batchrank computes itself (``isoformat()``)."""
    offenders = []
    for path in sorted(PIPELINES.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        for node in _filter_fstrings(ast.parse(source)):
            text = ast.get_source_segment(source, node) or ""
            for expr in _QUOTED.findall(text):
                if not expr.endswith(".isoformat()"):  # every value from outside goes through sql_strings
                    offenders.append(f"{path.relative_to(PIPELINES)}:{node.lineno}: '{{{expr}}}'")
    assert offenders == [], "filters with unescaped values: " + "; ".join(offenders)


# -- lookup: --at and --file -----------------------------------------------------------------------------------------

RUN_TAG = "rerank-20261130T020000Z-abcdef"


@pytest.fixture
def rankings_db(tmp_path) -> Path:
    """A rankings table of three versions (the second tagged with its run id; the first cleaned up) whose one
    query, "O'Brien", ranks documents with quotes in their ids; a passages table with those documents."""
    from datetime import timedelta

    from pipelines.config import NormalizeConfig, StorageConfig
    from pipelines.rerank.query_log import normalize, normalizer_spec, query_id
    from pipelines.store import Store

    store = Store(StorageConfig(uri=str(tmp_path / "db")))
    store.db.create_table(store.cfg.passages_table, data=pa.table({S.ID: ["d'1", "x' OR '1'='1"],
                                                                   S.TITLE: ["first", "second"],
                                                                   S.TEXT: ["t1", "t2"]}))
    spec = normalizer_spec(NormalizeConfig())
    norm = normalize("O'Brien", {})
    now = datetime(2026, 11, 30, tzinfo=UTC)
    row = {S.QUERY_ID: query_id(norm), S.QUERY: norm, S.COUNT: 3, S.LAST_SEEN: now,
           S.DOC_IDS: ["d'1", "x' OR '1'='1"], S.SCORES: [0.9, 0.1], S.RETRIEVAL_SCORES: [0.5, 0.4],
           S.RETRIEVAL_RANKS: [1, 2], S.CANDIDATES: 2, S.RUN_ID: RUN_TAG, S.BI_ENCODER: "bi", S.CROSS_ENCODER: "ce",
           S.PASSAGES_VERSION: 1, S.NORMALIZER: spec, S.RANKED_AT: now}
    data = pa.Table.from_pylist([row], S.RANKINGS_SCHEMA)
    table = store.db.create_table(store.cfg.rankings_table, data=data, schema=S.RANKINGS_SCHEMA)
    table.add(data, mode="overwrite")
    table.tags.create(RUN_TAG, 2)
    table.add(data, mode="overwrite")
    table.to_lance().cleanup_old_versions(older_than=timedelta(0), delete_unverified=True,
                                          error_if_tagged_old_versions=False)
    assert sorted(v["version"] for v in table.list_versions()) == [2, 3]
    (tmp_path / "lookup.yaml").write_text(f"storage: {{uri: {tmp_path / 'db'}}}\n")
    return tmp_path / "lookup.yaml"


def _lookup(config: Path, *args: str):
    from typer.testing import CliRunner

    from pipelines.cli import app

    return CliRunner().invoke(app, ["lookup", "--config", str(config), *args])


def test_lookup_finds_a_query_with_quotes_at_a_tag(rankings_db):
    for at in ([], ["--at", RUN_TAG], ["--at", "3"]):
        result = _lookup(rankings_db, *at, "O'Brien")
        assert result.exit_code == 0, result.output
        assert "[d'1]" in result.output and "[x' OR '1'='1]" in result.output


@pytest.mark.parametrize("at, says", [
    ("v2", "has no tag 'v2': for version 2 pass --at 2"),
    ("v1", "has no tag 'v1' (and version 1 is not kept either: 2-3)"),
    ("nosuch", f"has no tag 'nosuch'; --at takes a version number (latest: 3) or a run-id tag: {RUN_TAG} (v2)"),
    ("1", "version 1 was cleaned up (versions kept: 2-3)"),
    ("99", "version 99 does not exist (versions kept: 2-3)"),
    ("", "--at is empty"),
    ("x' OR '1'='1", "has no tag \"x' OR '1'='1\""),
    ("rerank-20200101T000000Z-000000", "no run of that id published rankings here, or its tag was dropped"),
])
def test_lookup_at_a_version_or_tag_it_lacks_is_one_line(rankings_db, at, says):
    result = _lookup(rankings_db, "--at", at, "O'Brien")
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and says in errors[0], result.output
    assert "Was it cleaned up?" not in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("make, says", [
    (lambda p: p / "missing.txt", "No such file or directory"),
    (lambda p: p, "Is a directory"),
    (lambda p: (p / "bad.txt", (p / "bad.txt").write_bytes(b"\xff\xfe query\n"))[0], "can't decode byte 0xff"),
])
def test_lookup_file_that_cannot_be_read_is_one_line(rankings_db, tmp_path, make, says):
    path = make(tmp_path)
    result = _lookup(rankings_db, "--file", str(path))
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot read --file {path}: ") and says in errors[0]
    assert "one query per line" in errors[0] and "Traceback" not in result.output


def test_search_with_an_unknown_source_is_one_line(rankings_db):
    from typer.testing import CliRunner

    from pipelines.cli import app

    result = CliRunner().invoke(app, ["search", "O'Brien", "--config", str(rankings_db), "--source", "bm25"])
    assert result.exit_code == 2 and result.output.strip() == "error: --source 'bm25': use vector, fts or hybrid"
