"""Incremental reindex on a local Ray: only new and changed documents are embedded, deletions (snapshot and
change feed) land in the same commit, a model change rebuilds and switches in one commit, and table upkeep
(incremental index updates, ANN retraining, compaction, version cleanup) keeps what must be kept."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from conftest import build_tiny_bi_encoder, good_docs, write_jsonl

from pipelines.index.job import run, summary
from pipelines.store import Store, StoreError

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_per_module")]


def _passages(cfg, version=None) -> dict[str, dict]:
    return {r["id"]: r for r in Store(cfg.storage).passages(version).to_arrow().to_pylist()}


@pytest.mark.parametrize("embedded_on,second_read", [("driver", False), ("actors", False), ("actors", True)])
def test_one_changed_document_is_the_only_one_embedded(tmp_path, make_config, embedded_on, second_read, monkeypatch):
    import pipelines.index.job as index_job

    if second_read:  # the plan keeps no row: the embedding reads the corpus again, keeping the planned ones
        monkeypatch.setattr(index_job, "KEEP_PLANNED_BYTES", 0)
    docs = good_docs(40)
    write_jsonl(tmp_path / "c.jsonl", docs)
    cfg = make_config(tmp_path / "c.jsonl", embed={"local_max_rows": 500 if embedded_on == "driver" else 0})
    first = run(cfg)
    assert first["mode"] == "full" and first["rows"]["written"] == 40
    docs[7]["text"] = "a changed abstract about gene data"
    write_jsonl(tmp_path / "c.jsonl", docs)
    second = run(cfg)
    assert second["mode"] == "incremental"
    assert second["plan"] == {"embed": 1, "unchanged": 39, "delete": 0, "embedded_on": embedded_on,
                              "second_read": second_read}
    assert second["rows"] == {"read": 40, "written": 1, "unchanged": 39, "delete_markers": 0, "quarantined": 0,
                              "reconciled": True}
    assert second["documents"] == {"added": 0, "updated": 1, "deleted": 0}
    assert second["passages"] == {"before": 40, "written": 1, "after": 40}
    rows = _passages(cfg)
    assert {i for i, r in rows.items() if r["run_id"] == second["run_id"]} == {"d7"}
    assert rows["d7"]["text"] == "a changed abstract about gene data"
    # the vector is the model's vector of the new text, wherever it was embedded
    from pipelines.index.embed import Embedder

    expected = Embedder(cfg.embed.model).encode(["title 7 a changed abstract about gene data"])[0]
    assert max(abs(a - b) for a, b in zip(rows["d7"]["vector"], expected)) < 1e-5
    assert "1 written + 39 unchanged (not embedded)" in summary(second)


def test_snapshot_deletes_absent_documents_in_the_same_commit(tmp_path, make_config):
    docs = good_docs(30)
    write_jsonl(tmp_path / "c.jsonl", docs)
    cfg = make_config(tmp_path / "c.jsonl")
    first = run(cfg)
    kept = [d for d in docs if d["_id"] not in ("d3", "d4")] + good_docs(1, start=30)
    kept[0]["text"] = "changed"
    write_jsonl(tmp_path / "c.jsonl", kept)
    second = run(cfg)
    assert second["documents"] == {"added": 1, "updated": 1, "deleted": 2}
    assert second["passages"] == {"before": 30, "written": 2, "after": 29}
    assert second["table"]["committed_version"] == first["table"]["version"] + 1  # upserts + deletions: one commit
    assert Store(cfg.storage).passages().tags.list()[second["run_id"]]["version"] == second["table"]["version"]
    assert set(_passages(cfg)) == {d["_id"] for d in kept}
    assert {"d3", "d4"} <= set(_passages(cfg, version=first["run_id"]))  # the previous version keeps them

    write_jsonl(tmp_path / "c.jsonl", kept[:5])  # a truncated snapshot: refused, nothing written
    with pytest.raises(StoreError, match="max_delete_fraction"):
        run(cfg)
    assert len(_passages(cfg)) == 29


def test_change_feed_upserts_and_deletes(tmp_path, make_config):
    write_jsonl(tmp_path / "full.jsonl", good_docs(20))
    cfg = make_config(tmp_path / "full.jsonl")
    run(cfg)
    feed = [{"_id": "d2", "title": "t", "text": "new text of two"}, {"_id": "d20", "text": "a new one"},
            {"_id": "d5", "deleted": True}, {"_id": "nope", "deleted": True}, {"_id": "d6", "deleted": "yes"}]
    write_jsonl(tmp_path / "feed.jsonl", feed)
    report = run(make_config(tmp_path / "feed.jsonl", corpus={"mode": "changes"}))
    assert report["rows"] == {"read": 5, "written": 2, "unchanged": 0, "delete_markers": 2, "quarantined": 1,
                              "reconciled": True}
    assert report["documents"] == {"added": 1, "updated": 1, "deleted": 1}
    assert report["passages"] == {"before": 20, "written": 2, "after": 20}
    rows = _passages(cfg)
    assert "d5" not in rows and "d6" in rows and rows["d2"]["text"] == "new text of two" and "d20" in rows
    assert report["quarantine_reasons"] == {"bad_deleted_flag": 1}


def test_model_change_rebuilds_and_switches_in_one_commit(tmp_path, make_config, monkeypatch):
    write_jsonl(tmp_path / "c.jsonl", good_docs(25))
    cfg = make_config(tmp_path / "c.jsonl")
    first = run(cfg)
    other = str(build_tiny_bi_encoder(tmp_path / "other", hidden=48))
    new_cfg = make_config(tmp_path / "c.jsonl", embed={"model": other})

    monkeypatch.setenv("BATCHRANK_FAILPOINTS", "before_commit")  # crash with every new vector staged
    with pytest.raises(RuntimeError, match="before_commit"):
        run(new_cfg)
    rows = _passages(cfg)
    assert {r["model"] for r in rows.values()} == {cfg.embed.model} and len(rows["d1"]["vector"]) == 32
    monkeypatch.delenv("BATCHRANK_FAILPOINTS")

    report = run(new_cfg)
    assert report["mode"] == "rebuild" and report["model_change"] == {"from": cfg.embed.model, "to": other}
    assert report["rows"]["written"] == 25
    rows = _passages(cfg)
    assert {r["model"] for r in rows.values()} == {other} and len(rows["d1"]["vector"]) == 48
    old = _passages(cfg, version=first["run_id"])  # the old model's version stays readable by its tag
    assert {r["model"] for r in old.values()} == {cfg.embed.model} and len(old["d1"]["vector"]) == 32
    assert Store(cfg.storage).passages().version == report["table"]["version"]
    assert "model" in summary(report) and "rebuild" in summary(report)

    with pytest.raises(StoreError, match="corpus.mode: snapshot"):  # a change feed cannot re-embed everything
        run(make_config(tmp_path / "c.jsonl", embed={"model": cfg.embed.model}, corpus={"mode": "changes"}))


def test_upkeep_updates_indexes_retrains_compacts_and_keeps_tagged_versions(tmp_path, make_config):
    docs = good_docs(300)
    write_jsonl(tmp_path / "c.jsonl", docs)
    upkeep = {"max_fragments": 2, "version_retention_days": 0}
    cfg = make_config(tmp_path / "c.jsonl", index={"ann": {"type": "ivf_flat", "min_rows": 0,
                                                         "retrain_fraction": 0.05}},
                      maintenance=upkeep)
    first = run(cfg)
    ann = first["indexes"]["ann"]
    assert ann["built"] is True and ann["accelerator"] == "cpu" and ann["build_seconds"] > 0
    assert ann["built_on"] != "driver" and "/" in ann["built_on"]  # a Ray task on a worker: "<ip>/<node id>"
    assert ann["train_sample_rows"] == min(300, ann["num_partitions"] * 256)
    assert f"on {ann['built_on']} (cpu" in summary(first)
    store = Store(cfg.storage)
    table = store.passages()
    table.tags.create("my-release", table.version)  # a user's tag: never cleaned, never expired

    docs[1]["text"] = "changed once"
    write_jsonl(tmp_path / "c.jsonl", docs)
    second = run(cfg)  # 1 of 300 changed: added to the trained index, no retraining
    assert second["indexes"]["ann"] == {"type": "ivf_flat", "built": False, "rows_added_to_index": 1,
                                        "changed_since_training": 1, "segments": 2}  # the new row's own segment
    assert second["indexes"]["fts"]["text"]["rows_added_to_index"]
    assert store.passages().index_stats("vector_idx").num_unindexed_rows == 0

    for i in range(2, 20):  # 18 more: 19 of 300 > 5% since training, so the ANN index is trained again
        docs[i]["text"] = f"changed {i}"
    write_jsonl(tmp_path / "c.jsonl", docs)
    cfg.index.ann = cfg.index.ann.model_copy(update={"build_on": "driver"})  # in the upkeep's own process ...
    cfg.maintenance = cfg.maintenance.model_copy(update={"table_work_on": "driver"})  # ... the driver's
    third = run(cfg)
    assert third["indexes"]["ann"]["built"] is True and "retrain_fraction" in third["indexes"]["ann"]["reason"]
    assert third["indexes"]["ann"]["built_on"] == "driver"
    assert third["upkeep"]["compaction"]["compacted"] is True, third["upkeep"]  # more than 2 data files
    assert store.passages().stats()["fragment_stats"]["num_fragments"] <= 2, (third["upkeep"], store.passages().stats())
    # version cleanup (retention 0): untagged versions go, tagged ones stay readable
    versions = [v["version"] for v in store.passages().list_versions()]
    tags = store.passages().tags.list()
    assert {"my-release", first["run_id"], second["run_id"], third["run_id"]} <= set(tags)
    assert set(versions) == {t["version"] for t in tags.values()} | {store.passages().version}
    assert store.passages(version=first["run_id"]).count_rows() == 300
    hits = store.search([0.1] * 32, k=3, index_cfg=cfg.index)
    assert hits.num_rows == 3

    # run tags expire after run_tag_retention_days; leases after lease_hours; user tags never
    lease = store.lease(cfg.storage.passages_table, first["table"]["version"], "rerank-20261129T000000Z-abcdef")
    later = datetime.now(UTC) + timedelta(days=31)
    dropped = Store.expire_tags(store.passages(), cfg.maintenance, now=later)
    assert lease in dropped and first["run_id"] in dropped and "my-release" not in dropped
    assert "my-release" in store.passages().tags.list()


def test_a_lease_keeps_the_version_a_run_reads(tmp_path, make_config):
    docs = good_docs(20)
    write_jsonl(tmp_path / "c.jsonl", docs)
    cfg = make_config(tmp_path / "c.jsonl", maintenance={"version_retention_days": 0, "run_tag_retention_days": None})
    first = run(cfg)
    store = Store(cfg.storage)
    store.passages().tags.delete(first["run_id"])  # only the lease protects this version now
    lease = store.lease(cfg.storage.passages_table, first["table"]["version"], "rerank-20991231T000000Z-abcdef")
    docs[0]["text"] = "changed"
    write_jsonl(tmp_path / "c.jsonl", docs)
    run(cfg)  # upkeep with retention 0
    assert store.passages(version=first["table"]["version"]).count_rows() == 20  # still readable
    store.release(cfg.storage.passages_table, lease)
    docs[1]["text"] = "changed again"
    write_jsonl(tmp_path / "c.jsonl", docs)
    run(cfg)
    assert first["table"]["version"] not in [v["version"] for v in store.passages().list_versions()]


def test_a_gpu_index_build_on_a_cluster_without_a_gpu_is_refused_before_any_work(tmp_path, make_config):
    write_jsonl(tmp_path / "c.jsonl", good_docs(5))
    cfg = make_config(tmp_path / "c.jsonl", index={"ann": {"type": "ivf_pq", "accelerator": "cuda"}})
    with pytest.raises(ValueError, match="has no GPU; add a GPU node or set index.ann.accelerator: auto"):
        run(cfg)
    assert Store(cfg.storage).open(cfg.storage.passages_table) is None  # nothing was embedded or written


def test_new_rows_join_the_ann_index_as_segments_until_max_segments(tmp_path, make_config):
    docs = good_docs(300)
    write_jsonl(tmp_path / "c.jsonl", docs)
    cfg = make_config(tmp_path / "c.jsonl", index={"ann": {"type": "ivf_flat", "min_rows": 0, "max_segments": 2}})
    assert run(cfg)["indexes"]["ann"]["built"] is True
    docs[1]["text"] = "changed once"
    write_jsonl(tmp_path / "c.jsonl", docs)
    second = run(cfg)["indexes"]["ann"]
    assert second["built"] is False and second["segments"] == 2  # the new row's own segment, nothing rebuilt
    store = Store(cfg.storage)
    assert store.passages().index_stats("vector_idx").num_indices == 2
    vector = _passages(cfg)["d1"]["vector"]
    assert store.search(vector, k=1, index_cfg=cfg.index)["id"].to_pylist() == ["d1"]  # found through its segment
    docs[2]["text"] = "changed twice"
    write_jsonl(tmp_path / "c.jsonl", docs)
    third = run(cfg)["indexes"]["ann"]
    assert third["built"] is True and "max_segments" in third["reason"]
    assert store.passages().index_stats("vector_idx").num_indices == 1
