"""Runs that must not lose or duplicate documents (issue 17, items 1-8): a snapshot that could not be read whole
deletes nothing it cannot prove absent; long ids protect their documents; a model change is held to the
truncation guard; a resume after two killed runs publishes each id once; table names, staging names, run ids and
metadata names that would make one run write over another's data are refused before any work."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import build_tiny_bi_encoder, good_docs, write_jsonl

from pipelines.config import ConfigError, parse_config
from pipelines.index import job as index
from pipelines.store import Store, StoreError

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_per_module")]


def _ids(cfg) -> list[str]:
    return sorted(Store(cfg.storage).passages().to_arrow()["id"].to_pylist())


def _write(folder, fmt: str, docs: list[dict], damage: bool = False) -> None:
    """Documents in four files of one format; ``damage``: the second file loses a document to a torn record
    (JSONL: a line cut mid-record; CSV: a record cut short) or is truncated whole (Parquet)."""
    import csv
    import json

    folder.mkdir(exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    parts = [docs[n::4] for n in range(4)]
    for n, part in enumerate(parts):
        path = folder / f"part{n}.{fmt}"
        if fmt == "parquet":
            pq.write_table(pa.Table.from_pylist(part), path)
            if damage and n == 1:
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        elif fmt == "jsonl":
            lines = [json.dumps(d) for d in part]
            if damage and n == 1:
                lines[0] = lines[0][:25]
            path.write_text("\n".join(lines) + "\n")
        else:
            with path.open("w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["_id", "title", "text"])
                for i, d in enumerate(part):
                    row = [d["_id"], d.get("title", ""), d["text"]]
                    w.writerow(row[:1] if damage and n == 1 and i == 0 else row)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv"])
def test_a_snapshot_with_unreadable_rows_deletes_nothing_it_cannot_prove_absent(tmp_path, make_config, fmt):
    docs = good_docs(40)
    cfg = make_config(tmp_path / "c", corpus={"format": fmt})
    _write(tmp_path / "c", fmt, docs)
    assert index.run(cfg)["rows"]["written"] == 40

    # tonight: one record torn (or one file truncated), d4 really removed, one new document
    tonight = [d for d in docs if d["_id"] != "d4"] + [{"_id": "new", "title": "", "text": "a new abstract on cells"}]
    _write(tmp_path / "c", fmt, tonight, damage=True)
    report = index.run(cfg)

    assert report["status"] == "succeeded"
    assert report["documents"]["deleted"] == 0
    assert set(_ids(cfg)) == {d["_id"] for d in docs} | {"new"}  # the new one landed; nothing was deleted
    withheld = report["deletions_withheld"]
    lost = 1 if fmt != "parquet" else 10  # the torn record, or the truncated file's ten documents
    assert withheld["documents"] == lost + 1 and withheld["unreadable_rows"] == 1
    assert "NOT deleted" in index.summary(report)
    assert report["rows"]["reconciled"]

    # the user who accepts the risk says so
    allowed = make_config(tmp_path / "c", corpus={"format": fmt, "delete_despite_unreadable": True})
    report = index.run(allowed)
    assert report["documents"]["deleted"] == lost + 1 and "deletions_withheld" not in report


def test_a_quarantined_row_with_a_long_id_keeps_its_document(tmp_path, make_config):
    long_id = "https://example.org/" + "x" * 400  # URLs are common ids
    docs = good_docs(10) + [{"_id": long_id, "text": "a document with a long id about genes"}]
    write_jsonl(tmp_path / "c.jsonl", docs)
    cfg = make_config(tmp_path / "c.jsonl")
    index.run(cfg)
    docs[-1]["text"] = ""  # tonight its text is empty: quarantined, but still in the snapshot
    write_jsonl(tmp_path / "c.jsonl", [d for d in docs if d["_id"] != "d2"])
    report = index.run(cfg)
    assert report["rows"]["quarantined"] == 1
    assert long_id in _ids(cfg) and "d2" not in _ids(cfg)
    assert report["documents"]["deleted"] == 1
    quarantined = Store(cfg.storage).quarantine(report["run_id"]).to_pylist()
    assert quarantined[0]["id"] == long_id  # the whole id, in the quarantine too


def test_a_model_change_is_held_to_the_truncation_guard(tmp_path, make_config):
    write_jsonl(tmp_path / "c.jsonl", good_docs(30))
    cfg = make_config(tmp_path / "c.jsonl")
    index.run(cfg)
    other = str(build_tiny_bi_encoder(tmp_path / "other", hidden=48))
    write_jsonl(tmp_path / "small.jsonl", good_docs(3))
    with pytest.raises(StoreError, match="max_delete_fraction"):
        index.run(make_config(tmp_path / "small.jsonl", embed={"model": other}))
    assert len(_ids(cfg)) == 30
    assert {r for r in Store(cfg.storage).passages().to_arrow()["model"].to_pylist()} == {cfg.embed.model}

    # a model change with an unreadable row cannot withhold its deletions: refused too
    write_jsonl(tmp_path / "torn.jsonl", good_docs(29) + ['{"_id": "d29", "te'])
    with pytest.raises(StoreError, match="could not be read"):
        index.run(make_config(tmp_path / "torn.jsonl", embed={"model": other}))
    assert len(_ids(cfg)) == 30


def test_a_resume_after_two_killed_runs_publishes_each_id_once(tmp_path, make_config, monkeypatch):
    monkeypatch.setattr(index, "FIRST_PLAN_BYTES", 0)  # the streaming path of a first run, as a large corpus takes
    docs = good_docs(20)
    write_jsonl(tmp_path / "c.jsonl", docs)
    cfg = make_config(tmp_path / "c.jsonl")
    monkeypatch.setenv("BATCHRANK_FAILPOINTS", "before_commit")
    with pytest.raises(RuntimeError, match="before_commit"):
        index.run(cfg)  # killed run 1: all 20 staged
    docs[0]["text"] = "d0 changed between the two killed runs"
    write_jsonl(tmp_path / "c.jsonl", docs)
    monkeypatch.setenv("BATCHRANK_FAILPOINTS", "after_staging")
    with pytest.raises(RuntimeError, match="after_staging"):
        index.run(cfg)  # killed run 2: the new d0 staged beside run 1's
    monkeypatch.delenv("BATCHRANK_FAILPOINTS")
    report = index.run(cfg)
    ids = Store(cfg.storage).passages().to_arrow()["id"].to_pylist()
    assert sorted(ids) == sorted(d["_id"] for d in docs)  # each id once
    rows = {r["id"]: r for r in Store(cfg.storage).passages().to_arrow().to_pylist()}
    assert rows["d0"]["text"] == "d0 changed between the two killed runs"
    assert report["rows"]["written"] == 20 and report["rows"]["reconciled"]


def test_equal_table_names_are_refused_at_config_load(tmp_path):
    with pytest.raises(ConfigError, match="rankings_table and storage.passages_table|both 'passages'"):
        parse_config({"storage": {"uri": str(tmp_path), "rankings_table": "passages"}})
    with pytest.raises(ConfigError, match="both 'q'"):
        parse_config({"storage": {"uri": str(tmp_path), "quarantine_table": "q", "pair_scores_table": "q"}})
    with pytest.raises(ConfigError, match="must not start with '_'"):
        parse_config({"storage": {"uri": str(tmp_path), "passages_table": "_staging-x"}})


@pytest.mark.parametrize("name", ["model", "vector", "id", "content_hash", "run_id", "reason_code", "_deleted"])
def test_reserved_column_names_are_refused_as_metadata_fields(tmp_path, name):
    with pytest.raises(ConfigError, match="reserved"):
        parse_config({"storage": {"uri": str(tmp_path)}, "corpus": {"path": "x", "metadata_fields": {name: "string"}}})


def test_staging_cleanup_matches_exact_names_only(tmp_path):
    cfg = parse_config({"storage": {"uri": str(tmp_path / "db")}})
    store = Store(cfg.storage)
    schema = pa.schema([pa.field("id", pa.string())])
    rows = pa.table({"id": ["a"]})
    other_live = store.stage("passages-v2", "index-20261206T000000Z-abcdef", schema, resumable=True)
    other_run = store.stage("passages-v2", "index-20261206T000000Z-abcdef", schema)
    other_legacy = "_staging-passages-v-index-20261206T000000Z-abcdef"  # table 'passages-v', old naming
    mine = store.stage("passages", "rerank-20261206T000000Z-123456", schema)
    for staged in (other_live, other_run, mine):
        staged.add(rows)
    store.db.create_table(other_legacy, data=rows)
    store.db.create_table("_staging-passages-index-20261206T000000Z-fedcba", data=rows)  # this table's, old naming
    dropped = store.drop_dead_staging("passages")
    assert sorted(dropped) == sorted([mine.name, "_staging-passages-index-20261206T000000Z-fedcba"])
    assert {other_live.name, other_run.name, other_legacy} <= set(store.table_names())


def test_a_used_run_id_is_refused_before_any_work(tmp_path, make_config):
    write_jsonl(tmp_path / "c.jsonl", good_docs(10))
    cfg = make_config(tmp_path / "c.jsonl")
    first = index.run(cfg, run_id="nightly-2026-12-06")
    report_file = first["report_path"]
    before = open(report_file).read()
    version = Store(cfg.storage).passages().version
    write_jsonl(tmp_path / "c.jsonl", good_docs(12))
    with pytest.raises(ConfigError, match="already used"):
        index.run(cfg, run_id="nightly-2026-12-06")
    assert Store(cfg.storage).passages().version == version  # nothing committed
    assert open(report_file).read() == before  # the first report is not overwritten
