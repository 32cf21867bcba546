"""The index job end to end on a local Ray: quarantine and reconciliation, idempotent reruns,
crash before commit, other input formats, search. Tiny random BERT, one actor."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import good_docs, write_jsonl

from pipelines.index.job import run, summary
from pipelines.store import Store, StoreError

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _ray(tmp_path_factory):
    import ray

    from pipelines.cluster.runtime import start_local_ray

    start_local_ray(num_cpus=2, logging_level="WARNING")
    yield
    ray.shutdown()


BAD_LINES = [
    ("bad_json", '{"_id": "x1", "text": "unterminated'),
    ("bad_utf8", b'{"_id": "x2", "text": "caf\xe9"}'),
    ("not_an_object", '["_id", "x3"]'),
    ("missing_id", '{"text": "no id here"}'),
    ("missing_id", '{"_id": null, "text": "null id"}'),
    ("bad_id_type", '{"_id": 12345, "text": "numeric id"}'),
    ("empty_id", '{"_id": "", "text": "empty id"}'),
    ("missing_text", '{"_id": "x8", "title": "title only"}'),
    ("empty_text", '{"_id": "x9", "text": "   "}'),
    ("bad_text_type", '{"_id": "x10", "text": {"nested": true}}'),
    ("text_too_long", json.dumps({"_id": "x11", "text": "long " * 500})),
    ("bad_title_type", '{"_id": "x12", "text": "fine", "title": ["a", "b"]}'),
    ("bad_metadata", '{"_id": "x13", "text": "fine", "year": "MMXX"}'),
    ("duplicate_id", json.dumps({"_id": "d3", "text": "second copy of d3"})),
]


def _bad_corpus(path):
    lines: list = []
    docs = good_docs(40)
    for i, doc in enumerate(docs):
        lines.append(json.dumps({**doc, "year": 2000 + i}))
        if 4 <= i < 4 + len(BAD_LINES):  # bad rows interleaved; the duplicate of d3 comes after d3
            lines.append(BAD_LINES[i - 4][1])
    with path.open("wb") as fh:
        for line in lines:
            fh.write(line if isinstance(line, bytes) else line.encode())
            fh.write(b"\n")
    return docs


def test_bad_rows_are_quarantined_and_counts_reconcile(tmp_path, make_config, monkeypatch):
    """The shipped examples/bad-rows/corpus.jsonl, which `_bad_corpus` wrote; read in one streaming pass through the
    embedding actors, as a corpus too large to plan in-process is."""
    monkeypatch.setattr("pipelines.index.job.LOCAL_READ_BYTES", 0)
    monkeypatch.setattr("pipelines.index.sink.QUARANTINE_FLUSH_ROWS", 3)  # bad rows leave the driver as they come
    monkeypatch.setattr("pipelines.index.sink.CHECK_ROWS", 8)  # the sink takes the stream 8 rows at a time
    shipped = ROOT / "examples/bad-rows/corpus.jsonl"
    docs = _bad_corpus(tmp_path / "corpus.jsonl")
    assert (tmp_path / "corpus.jsonl").read_bytes() == shipped.read_bytes()
    cfg = make_config(shipped, corpus={"metadata_fields": {"year": "int"}, "max_text_chars": 1000})
    report = run(cfg)
    rows = report["rows"]
    assert rows == {"read": 40 + len(BAD_LINES), "written": 40, "unchanged": 0, "delete_markers": 0, "quarantined": len(BAD_LINES), "reconciled": True}
    expected = {}
    for code, _ in BAD_LINES:
        expected[code] = expected.get(code, 0) + 1
    assert report["quarantine_reasons"] == expected
    assert 3 <= report["quarantine_appended_during_run"] < len(BAD_LINES)  # in batches of 3, the rest at the end
    store = Store(cfg.storage)
    passages = store.passages().to_arrow()
    assert sorted(passages["id"].to_pylist()) == sorted(d["_id"] for d in docs)
    by_id = {r["id"]: r for r in passages.to_pylist()}
    assert by_id["d3"]["text"] == docs[3]["text"]  # the first copy of a duplicated id wins
    assert by_id["d5"]["year"] == 2005 and len(by_id["d5"]["vector"]) == 32
    quarantine = store.quarantine(report["run_id"]).to_pylist()
    assert sorted(q["reason_code"] for q in quarantine) == sorted(code for code, _ in BAD_LINES)
    assert all(q["reason"] and q["raw"] and q["source"].endswith("corpus.jsonl") for q in quarantine)
    dup = next(q for q in quarantine if q["reason_code"] == "duplicate_id")
    assert "first seen at" in dup["reason"] and "second copy" in dup["raw"]
    saved = json.loads(open(report["report_path"]).read())
    assert saved["rows"]["reconciled"] and saved["table"]["tag"] == report["run_id"]
    # the fixed cost, from the process's start: Ray up, then the stream, then the first embedded row
    first = {k: v["since_process_start_s"] for k, v in saved["first"].items()}
    assert 0 < first["ray_up"] <= first["pipeline_started"] <= first["first_embedded_row"], first
    assert saved["first"]["first_embedded_row"]["since_run_start_s"] <= saved["seconds"]["total"]
    assert "first embedded row" in summary(report)


def test_rerun_is_idempotent(tmp_path, make_config):
    write_jsonl(tmp_path / "c.jsonl", good_docs(30))
    cfg = make_config(tmp_path / "c.jsonl")
    first = run(cfg)
    second = run(cfg)
    table = Store(cfg.storage).passages().to_arrow()
    ids = table["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 30
    assert set(table["run_id"].to_pylist()) == {first["run_id"]}  # unchanged rows were not rewritten
    # nothing changed: nothing embedded, no new version
    assert second["rows"] == {"read": 30, "written": 0, "unchanged": 30, "delete_markers": 0, "quarantined": 0, "reconciled": True}
    assert second["table"]["rows"] == 30 and second["table"]["version"] == first["table"]["version"]
    assert "0 written + 30 unchanged (not embedded) + 0 quarantined" in summary(second)

    docs = good_docs(31)
    docs[4]["text"] = "a changed abstract"
    write_jsonl(tmp_path / "c.jsonl", docs)
    third = run(cfg)  # one changed, one new: two embedded, the rest left as they were
    assert third["rows"] == {"read": 31, "written": 2, "unchanged": 29, "delete_markers": 0, "quarantined": 0, "reconciled": True}
    table = Store(cfg.storage).passages().to_arrow().to_pylist()
    assert {r["id"] for r in table if r["run_id"] == third["run_id"]} == {"d4", "d30"}
    assert next(r["text"] for r in table if r["id"] == "d4") == "a changed abstract"


def test_failure_before_commit_leaves_previous_version(tmp_path, make_config, monkeypatch):
    write_jsonl(tmp_path / "v1.jsonl", good_docs(20))
    write_jsonl(tmp_path / "v2.jsonl", good_docs(50))
    first = run(make_config(tmp_path / "v1.jsonl"))
    store = Store(make_config(tmp_path / "v1.jsonl").storage)
    before = store.passages().version

    monkeypatch.setenv("BATCHRANK_FAILPOINTS", "before_commit")
    with pytest.raises(RuntimeError, match="failpoint 'before_commit'") as info:
        run(make_config(tmp_path / "v2.jsonl"))
    failed = info.value.batchrank_report
    assert failed["status"] == "failed" and "before_commit" in failed["error"]
    assert failed["rows"] == {"read": 50, "written": 0, "unchanged": 20, "delete_markers": 0, "quarantined": 0,
                              "not_published_run_failed": 30, "reconciled": True}
    assert json.loads(open(failed["report_path"]).read())["status"] == "failed"
    table = store.passages()
    assert table.version == before and table.count_rows() == 20  # the previous version, whole and readable
    # the staged rows stay, invisible, for the next run to take over
    assert [n for n in store.table_names() if n.startswith("_staging")] == ["_staging-passages"]

    monkeypatch.delenv("BATCHRANK_FAILPOINTS")
    again = run(make_config(tmp_path / "v2.jsonl"))
    assert again["rows"] == {"read": 50, "written": 30, "unchanged": 20, "delete_markers": 0, "quarantined": 0,
                             "resumed_from_killed_run": 30, "reconciled": True}
    assert again["resume"]["taken_over"] == 30 and again["resume"]["from_runs"] == [failed["run_id"]]
    assert "resumed: 30 rows" in summary(again)
    assert store.passages().count_rows() == 50
    assert store.passages(version=first["run_id"]).count_rows() == 20
    assert again["table"]["version"] > before
    assert not [n for n in store.table_names() if n.startswith("_staging")]


def test_parquet_and_csv_corpora(tmp_path, make_config):
    docs = good_docs(20)
    pq.write_table(pa.table({"doc_id": [d["_id"] for d in docs], "body": [d["text"] for d in docs],
                             "year": list(range(20))}), tmp_path / "c.parquet")
    cfg = make_config(tmp_path / "c.parquet", corpus={"id_field": "doc_id", "text_field": "body", "title_field": None,
                                                      "metadata_fields": {"year": "int"}})
    report = run(cfg)
    assert report["rows"] == {"read": 20, "written": 20, "unchanged": 0, "delete_markers": 0, "quarantined": 0, "reconciled": True}

    csv = tmp_path / "c.csv"
    csv.write_text("_id,title,text\n001,T,alpha beta\n002,T\n003,T,\"gamma, delta\"\n")
    cfg = make_config(csv, storage={"uri": str(tmp_path / "db2")})
    report = run(cfg)
    assert report["rows"] == {"read": 3, "written": 2, "unchanged": 0, "delete_markers": 0, "quarantined": 1, "reconciled": True}
    assert sorted(Store(cfg.storage).passages().to_arrow()["id"].to_pylist()) == ["001", "003"]

    import lance

    lance.write_dataset(pa.table({"_id": [d["_id"] for d in docs] + [None], "text": [d["text"] for d in docs] + ["x"]}),
                        str(tmp_path / "docs.lance"))
    cfg = make_config(tmp_path / "docs.lance", storage={"uri": str(tmp_path / "db3")})
    report = run(cfg)
    assert report["rows"] == {"read": 21, "written": 20, "unchanged": 0, "delete_markers": 0, "quarantined": 1, "reconciled": True}


def test_search_cli_reads_what_the_job_wrote(tmp_path, make_config):
    import yaml
    from typer.testing import CliRunner

    from pipelines.cli import app

    write_jsonl(tmp_path / "c.jsonl", good_docs(30))
    cfg = make_config(tmp_path / "c.jsonl")
    run(cfg)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["search", "--config", str(path), "cancer risk number 11", "-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    hits = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(hits) == 3 and [h["rank"] for h in hits] == [1, 2, 3]
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    result = CliRunner().invoke(app, ["search", "--config", str(path), "cancer risk", "--source", "hybrid", "-k", "2"])
    assert result.exit_code == 0, result.output


def test_uri_glob_corpus_with_a_file_of_only_bad_rows(tmp_path, make_config):
    parts = tmp_path / "parts"
    parts.mkdir()
    write_jsonl(parts / "good.jsonl", good_docs(12))
    write_jsonl(parts / "bad.jsonl", ['{"_id": 1}', "not json", '{"_id": "z", "text": ""}'])
    cfg = make_config(f"file://{parts}/*.jsonl")
    report = run(cfg)
    assert report["rows"] == {"read": 15, "written": 12, "unchanged": 0, "delete_markers": 0, "quarantined": 3, "reconciled": True}

    only_bad = make_config(f"file://{parts}/bad.jsonl", storage={"uri": str(tmp_path / "empty-db")})
    report = run(only_bad)  # nothing good: no passages table is created, the bad rows are still kept
    assert report["rows"] == {"read": 3, "written": 0, "unchanged": 0, "delete_markers": 0, "quarantined": 3, "reconciled": True}
    assert report["table"]["version"] is None
    assert Store(only_bad.storage).quarantine(report["run_id"]).num_rows == 3
