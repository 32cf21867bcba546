"""The index run's per-document state held by Ray actors (``corpus.id_shards``), and its commit and upkeep run as Ray
tasks (``maintenance.table_work_on``), not in the driver: the sharded state answers every call exactly as the
in-process one does, and the job keeps every guarantee with them (first row of a duplicated id kept, only changed
documents embedded, a snapshot's and a change feed's deletions, a model change's overwrite dropping what the new
set lacks, read = written + unchanged + quarantined)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from conftest import build_tiny_bi_encoder, good_docs, write_jsonl

from pipelines.index.ids import CHANGED, NEW, NONE, UNCHANGED, IdTable, LocalIds, ShardedIds, id_hash
from pipelines.index.job import run
from pipelines.store import Store

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_per_module")]


def _ids(cfg) -> dict[str, set[str]]:
    rows = Store(cfg.storage).passages().to_arrow()
    out: dict[str, set[str]] = {}
    for i, r in zip(rows["id"].to_pylist(), rows["run_id"].to_pylist()):
        out.setdefault(i, set()).add(r)
    return out


def test_sharded_state_answers_as_the_in_process_one():
    rng = random.Random(7)
    known = {f"k{i}": f"h{i}" for i in range(300)}
    local, sharded = LocalIds(track_written=True), ShardedIds(3, track_written=True)
    try:
        assert local.load_pairs(known) == 300
        # what load_known streams from passages, sent in two batches the way it routes them
        keys = list(known)
        for part in (keys[:170], keys[170:]):
            hashes, contents = [id_hash(i) for i in part], [id_hash(known[i]) for i in part]
            rows = sharded._split(hashes)
            for actor, at in zip(sharded.actors, rows):
                actor.load_known.remote([hashes[i] for i in at], [contents[i] for i in at], [part[i] for i in at])
        assert sharded.counts()["known"] == 300
        position = 0
        for _ in range(12):
            n = rng.randint(0, 60)
            ids = [rng.choice([f"k{rng.randrange(400)}", f"n{rng.randrange(80)}"]) for _ in range(n)]
            hashes = np.array([id_hash(i) for i in ids], np.int64)
            wheres = np.array([NONE if rng.random() < 0.1 else position + j for j in range(n)], np.int64)
            contents = np.array([id_hash(rng.choice(["h1", known.get(i, "x")])) for i in ids], np.int64)
            position += n
            for compare in (contents, None):
                got, want = sharded.take(hashes, wheres, compare), local.take(hashes, wheres, compare)
                assert all(np.array_equal(a, b) for a, b in zip(got, want))
            written = [h for h in hashes.tolist() if rng.random() < 0.5]
            local.mark_written(written)
            sharded.mark_written(written)
        probe = [id_hash(f"k{i}") for i in range(0, 400, 7)]
        assert sharded.known_ids(probe) == local.known_ids(probe)
        assert sharded.gone("seen") == local.gone("seen") and local.gone("seen")
        assert sharded.gone("written") == local.gone("written")
        assert sharded.counts() == local.counts()
    finally:
        sharded.close()


def test_take_keeps_the_first_row_of_an_id_and_compares_content():
    table = IdTable()
    table.load_known([id_hash("a"), id_hash("b")], [id_hash("ha"), id_hash("hb")], ["a", "b"])
    first, status = table.take(np.array([id_hash(i) for i in ("a", "b", "c", "a", "b")]), np.array([1, 2, 3, 4, NONE]),
                               np.array([id_hash(h) for h in ("ha", "other", "hc", "ha", "hb")]))
    assert first.tolist() == [1, 2, 3, 1, NONE]  # the second 'a' is a duplicate of row 1; the last row quarantined
    assert status.tolist() == [UNCHANGED, CHANGED, NEW, NONE, NONE]
    assert table.take(np.array([id_hash("d")]), np.array([5]))[1].tolist() == [NONE]  # nothing to compare with


def test_index_job_with_sharded_state_keeps_every_guarantee(tmp_path, make_config):
    docs = good_docs(40)
    rows = docs + [dict(docs[5], text="a later copy with other text")]  # a duplicated id: the first row wins
    write_jsonl(tmp_path / "c.jsonl", rows)
    # the commit and the upkeep as Ray tasks too (the default for a large run): the driver holds no table work
    cfg = make_config(tmp_path / "c.jsonl", corpus={"id_shards": 2}, maintenance={"table_work_on": "worker"})
    first = run(cfg)
    assert first["table_work_on"] == {"commit": "worker", "upkeep": "worker"}
    assert first["upkeep"]["ran_on"] != "driver"
    assert first["id_state"]["in"] == "actors" and first["id_state"]["shards"] == 2
    assert first["id_state"]["documents"]["first"] == 40  # held by the actors, not the driver
    assert first["rows"] == {"read": 41, "written": 40, "unchanged": 0, "delete_markers": 0, "quarantined": 1,
                             "reconciled": True}
    assert first["quarantine_reasons"] == {"duplicate_id": 1}
    held = Store(cfg.storage).passages().to_arrow().to_pylist()
    assert [r["text"] for r in held if r["id"] == "d5"] == [docs[5]["text"]]

    # a night: one changed, two gone, one new; only the changed and new embedded, the gone deleted, one commit
    night = [d for d in docs if d["_id"] not in ("d3", "d4")] + good_docs(1, start=40)
    night[0] = dict(night[0], text="changed text of zero")
    write_jsonl(tmp_path / "c.jsonl", night)
    second = run(cfg)
    assert second["mode"] == "incremental" and second["id_state"]["in"] == "actors"
    assert second["table_work_on"] == {"commit": "worker", "upkeep": "worker"}
    assert second["plan"]["embed"] == 2 and second["plan"]["unchanged"] == 37 and second["plan"]["delete"] == 2
    assert second["documents"] == {"added": 1, "updated": 1, "deleted": 2}
    ids = _ids(cfg)
    assert set(ids) == {d["_id"] for d in night}
    assert {i for i, runs in ids.items() if second["run_id"] in runs} == {"d0", "d40"}

    # a change feed: a known id deleted, an unknown one ignored
    write_jsonl(tmp_path / "feed.jsonl", [{"_id": "d7", "deleted": True}, {"_id": "nope", "deleted": True}])
    feed = run(make_config(tmp_path / "feed.jsonl", corpus={"id_shards": 2, "mode": "changes"}))
    assert feed["documents"]["deleted"] == 1 and "d7" not in _ids(cfg)

    # a model change: every document embedded again (d7, deleted by the feed, comes back), what the new set lacks
    # dropped in the overwrite
    other = str(build_tiny_bi_encoder(tmp_path / "other", hidden=48))
    write_jsonl(tmp_path / "c.jsonl", [d for d in night if d["_id"] != "d9"])
    rebuild = run(make_config(tmp_path / "c.jsonl", corpus={"id_shards": 2}, embed={"model": other}))
    assert rebuild["mode"] == "rebuild" and rebuild["id_state"]["in"] == "actors"
    assert rebuild["documents"] == {"added": 1, "updated": 37, "deleted": 1}
    assert set(_ids(cfg)) == {d["_id"] for d in night} - {"d9"}
