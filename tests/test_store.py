"""Storage: staged writes invisible until one commit, upserts, tags, indexes. LanceDB in tmp_path, no Ray."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from conftest import as_passages

from pipelines import schema as S
from pipelines.config import parse_config
from pipelines.store import Store, StoreError

DIM = 8


def rows(ids, *, seed=0, text="t", model="m", run="r1"):
    rng = np.random.default_rng(seed)
    vecs = rng.normal(size=(len(ids), DIM)).astype("float32")
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    n = len(ids)
    return as_passages(pa.table({
        S.ID: ids, S.TITLE: [""] * n, S.TEXT: [f"{text} {i}" for i in ids],
        S.VECTOR: pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), DIM),
        S.CONTENT_HASH: [f"{text}-{i}" for i in ids], S.MODEL: [model] * n,
        S.EMBEDDED_AT: pa.array([None] * n, S.TIMESTAMP), S.RUN_ID: [run] * n,
    }))


@pytest.fixture
def cfg(tmp_path):
    return parse_config({"storage": {"uri": str(tmp_path / "db")}, "corpus": {"path": "x.jsonl"}})


def publish(store, table, run_id):
    staged = store.stage("passages", run_id, S.passages_schema({}, DIM))
    staged.add(table)
    try:
        return store.commit_passages(staged, run_id)
    finally:
        staged.drop()


def test_staged_rows_are_invisible_until_commit(cfg):
    store = Store(cfg.storage)
    publish(store, rows(["a", "b"]), "run-1")
    staged = store.stage("passages", "run-2", S.passages_schema({}, DIM))
    staged.add(rows(["c", "d", "e"], seed=1))
    assert store.passages().count_rows() == 2  # a reader during the run sees the old version whole
    version = store.commit_passages(staged, "run-2")
    staged.drop()
    assert store.passages().count_rows() == 5
    assert store.passages().tags.list()["run-2"]["version"] == version
    assert not [n for n in store.table_names() if n.startswith("_staging")]


def test_commit_upserts_by_id_and_skips_unchanged(cfg):
    store = Store(cfg.storage)
    publish(store, rows(["a", "b", "c"]), "run-1")
    publish(store, rows(["a", "b", "c"]), "run-2")  # same content: no duplicates
    table = store.passages()
    assert table.count_rows() == 3
    assert set(table.to_arrow()[S.RUN_ID].to_pylist()) == {"r1"}
    publish(store, rows(["b"], text="changed", run="r3"), "run-3")
    got = {r["id"]: r for r in store.passages().to_arrow().to_pylist()}
    assert len(got) == 3 and got["b"]["text"] == "changed b" and got["a"]["text"] == "t a"


@pytest.mark.parametrize("indexed", [("passage_id", "BTree"), ("id", "BTree"), ("id", "Bitmap"),
                                     ("passage_id+id", "BTree")])
def test_upserts_update_rows_when_the_key_has_a_scalar_index(cfg, indexed):
    """Users report merge_insert updating nothing when a scalar index is on the key (lancedb issues). With an index
    on passage_id (the merge key) or id (the delete filter), built before a run and left stale by it: every commit
    still updates the changed rows, inserts the new, deletes the gone, and leaves no duplicate."""
    from lancedb import index as lance_index

    columns, kind = indexed[0].split("+"), getattr(lance_index, indexed[1])
    store = Store(cfg.storage)
    ids = [f"d{i:03d}" for i in range(300)]
    publish(store, rows(ids), "run-1")
    for column in columns:
        store.passages().create_index(column, config=kind())
    assert {i.columns[0] for i in store.passages().list_indices()} == set(columns)
    publish(store, rows(ids[:10] + ["n1", "n2"], text="v2", run="r2"), "run-2")  # 10 updated, 2 new
    # a third run touches rows of the indexed fragment and of the fragment run-2 added (not in the index), and
    # deletes one of each
    staged = store.stage("passages", "run-3", S.passages_schema({}, DIM))
    staged.add(rows(["d005", "d200", "n1"], text="v3", run="r3"))
    try:
        store.commit_passages(staged, "run-3", deletes=["d150", "n2"])
    finally:
        staged.drop()
    got = {r["id"]: r for r in store.passages().to_arrow().to_pylist()}
    assert len(got) == store.passages().count_rows() == 300 + 2 - 2  # no duplicate rows
    assert "d150" not in got and "n2" not in got
    assert {d: got[d]["text"] for d in ("d005", "d200", "n1")} == {"d005": "v3 d005", "d200": "v3 d200",
                                                                   "n1": "v3 n1"}
    assert all(got[d]["text"] == f"v2 {d}" for d in ids[:10] if d != "d005")
    assert got["d299"]["text"] == "t d299" and got["d299"]["run_id"] == "r1"
    # lookups through the (stale) index see the new rows too
    assert store.passages().search().where("id = 'd200'").to_arrow()["text"].to_pylist() == ["v3 d200"]
    assert store.passages().search().where("passage_id = 'n1#0'").to_arrow()["text"].to_pylist() == ["v3 n1"]


def test_old_versions_stay_readable_by_tag(cfg):
    store = Store(cfg.storage)
    publish(store, rows(["a"]), "run-1")
    publish(store, rows(["b", "c"]), "run-2")
    assert store.passages(version="run-1").count_rows() == 1
    assert store.passages().count_rows() == 3


def test_incompatible_vectors_refused(cfg):
    store = Store(cfg.storage)
    publish(store, rows(["a"]), "run-1")
    other = S.passages_schema({}, DIM * 2)
    staged = store.stage("passages", "run-2", other)
    with pytest.raises(StoreError, match="new storage.passages_table"):
        store.commit_passages(staged, "run-2")


def test_indexes_exact_below_threshold_and_built_above(cfg):
    store = Store(cfg.storage)
    publish(store, rows([f"d{i}" for i in range(300)]), "run-1")
    info = store.ensure_indexes(cfg.index)  # default min_rows 50,000
    assert info["ann"]["type"] == "exact" and all(f["built"] for f in info["fts"].values())
    assert set(info["fts"]) == {"title", "text"}
    cfg.index.ann = cfg.index.ann.model_validate({"type": "ivf_flat", "min_rows": 0, "num_partitions": 2})
    info = store.ensure_indexes(cfg.index)
    assert info["ann"].pop("build_seconds") >= 0  # here: no builder given, so on this (the driver's) process
    assert info["ann"] == {"type": "ivf_flat", "built": True, "reason": "no index yet", "metric": "cosine",
                           "num_partitions": 2, "sample_rate": 256, "train_sample_rows": 300,
                           "built_on": "driver", "accelerator": "cpu"}
    assert store.ensure_indexes(cfg.index)["ann"]["built"] is False  # up to date: no rebuild
    cfg.index.ann = cfg.index.ann.model_validate({"type": "ivf_hnsw_sq", "min_rows": 0, "num_partitions": 1})
    rebuilt = store.ensure_indexes(cfg.index)["ann"]  # another index type: rebuilt
    assert rebuilt["built"] is True and rebuilt["reason"] == "index type or metric changed"
    assert store.passages().index_stats("vector_idx").index_type == "IVF_HNSW_SQ"
    cfg.index.ann = cfg.index.ann.model_validate({"type": "ivf_flat", "min_rows": 0, "num_partitions": 2})
    store.ensure_indexes(cfg.index)
    query = rows(["q"], seed=0).column(S.VECTOR)[0].values.to_numpy()
    exact = store.search(query, k=5, index_cfg=cfg.index, exact=True)["id"].to_pylist()
    approx = store.search(query, k=5, index_cfg=cfg.index)["id"].to_pylist()
    assert exact[0] == "d0"  # the query is d0's own vector
    assert approx[0] == "d0"
    from pipelines.rerank.retrieve import CandidateSearch

    hybrid = CandidateSearch(store, store.passages(), cfg.index, k=5, source="hybrid")(query[None], ["t d7"])[0]
    assert "d7" in hybrid["id"].to_pylist()  # from the full-text side
    assert hybrid["id"].to_pylist()[0] == "d0"  # the vector side's best, in both lists' top


def test_quarantine_is_an_append_only_log(cfg):
    store = Store(cfg.storage)
    bad = pa.table({S.RUN_ID: ["r"], S.JOB: ["index"], S.SOURCE: ["f"], S.ROW: [3], S.ID: [None],
                    S.REASON_CODE: ["bad_json"], S.REASON: ["x"], S.RAW: ["{"],
                    S.QUARANTINED_AT: pa.array([None], S.TIMESTAMP)})
    store.append_quarantine(bad)
    store.append_quarantine(bad.set_column(0, S.RUN_ID, pa.array(["r2"])))
    assert store.quarantine().num_rows == 2 and store.quarantine("r2").num_rows == 1


def test_ann_training_device_and_the_refusals_that_name_the_fix(cfg):
    """index.ann.accelerator: cuda only for ivf_pq (LanceDB's GPU build) and only on a cluster with a GPU."""
    from pydantic import ValidationError

    from pipelines.cluster.runtime import Cluster
    from pipelines.index.table_work import accelerator, builder

    ann = cfg.index.ann.model_validate
    assert accelerator(ann({"type": "ivf_pq"}), cluster_gpus=1) == "cuda"
    assert accelerator(ann({"type": "ivf_pq"}), cluster_gpus=0) == "cpu"
    assert accelerator(ann({"type": "ivf_hnsw_sq"}), cluster_gpus=4) == "cpu"  # no GPU build for HNSW here
    assert accelerator(ann({"type": "ivf_pq", "accelerator": "cpu"}), cluster_gpus=4) == "cpu"
    with pytest.raises(ValidationError, match="set index.ann.type: ivf_pq or index.ann.accelerator: cpu"):
        ann({"type": "ivf_hnsw_sq", "accelerator": "cuda"})
    cpu_only = Cluster(address="local", local=True, cpus=2, gpus=0, nodes=1)
    cfg.index.ann = ann({"type": "ivf_pq", "accelerator": "cuda"})
    with pytest.raises(ValueError, match="has no GPU; add a GPU node or set index.ann.accelerator: auto"):
        builder(cfg, cpu_only)
    cfg.index.ann = ann({"build_on": "driver"})
    assert builder(cfg, cpu_only) is None and builder(cfg.model_copy(), None) is None
