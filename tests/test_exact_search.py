"""Exact search as matrix products (pipelines/rerank/exact_search.py): the same hits and scores as LanceDB's flat scan,
right rows after deletes and upserts, chunking that changes nothing, the per-size choice of ``retrieve.exact: auto``,
a clean CPU fallback for the GPU path. Tiny LanceDB tables in tmp_path, no Ray, no model."""

from __future__ import annotations

import logging
import sys

import lancedb
import numpy as np
import pyarrow as pa
import pytest

from pipelines import schema as S
from pipelines.config import ConfigError, IndexConfig, RetrieveConfig, parse_config
from pipelines.rerank.exact_search import ExactSearch, _top, choose_method, method_for_report, resolve_method
from pipelines.rerank.retrieve import CandidateSearch
from pipelines.store import Store

DIM = 16


def docs(ids, *, seed=0, tag="v1", vectors=None):
    vecs = vectors if vectors is not None else np.random.default_rng(seed).normal(size=(len(ids), DIM))
    schema = pa.schema([pa.field(S.ID, pa.string(), nullable=False), pa.field(S.TITLE, pa.string()),
                        pa.field(S.TEXT, pa.string()), pa.field(S.VECTOR, pa.list_(pa.float32(), DIM))])
    return pa.table({S.ID: list(ids), S.TITLE: [f"title {i}" for i in ids], S.TEXT: [f"text of {i} {tag}" for i in ids],
                     S.VECTOR: pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(vecs, np.float32).ravel()), DIM)},
                    schema=schema)


@pytest.fixture
def store(tmp_path):
    return Store(parse_config({"storage": {"uri": str(tmp_path / "db")}, "corpus": {"path": "x.jsonl"}}).storage)


def queries(n=12, seed=1):
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)


def lance_flat(store, table, q, k, metric, columns=(S.ID, S.TITLE, S.TEXT)):
    """LanceDB's flat scan (``bypass_vector_index``), through the code path CandidateSearch had before."""
    with CandidateSearch(store, table, IndexConfig(metric=metric), k=k, exact="lance_flat", columns=columns) as s:
        assert s.method == "lance_flat" and s.matrix is None
        return s(q, [])


@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
def test_same_hits_and_scores_as_lance_flat(store, metric):
    table = store.db.create_table("passages", docs([f"d{i}" for i in range(500)]))
    q = queries()
    with CandidateSearch(store, table, IndexConfig(metric=metric), k=20, exact=True,
                         columns=(S.TITLE, S.TEXT)) as search:
        assert search.method == "matmul" and search.matrix.device == "cpu"
        got = search(q, [])
    want = lance_flat(store, table, q, 20, metric)
    assert len(got) == len(want) == len(q)
    for g, w in zip(got, want):
        assert g.column_names == w.column_names == [S.ID, S.TITLE, S.TEXT, "score"]
        assert g.schema == w.schema
        assert g.select([S.ID, S.TITLE, S.TEXT]).equals(w.select([S.ID, S.TITLE, S.TEXT]))
        np.testing.assert_allclose(g["score"].to_numpy(), w["score"].to_numpy(), rtol=1e-5, atol=1e-5)
        assert np.all(np.diff(g["score"].to_numpy()) <= 0)  # best first


def test_rows_stay_right_after_deletes_upserts_and_compaction(store):
    ids = [f"d{i}" for i in range(300)]
    table = store.db.create_table("passages", docs(ids[:200]))
    table.add(docs(ids[200:], seed=1))
    table.delete(f"{S.ID} IN ('d3', 'd150', 'd201', 'd299')")
    (table.merge_insert(S.ID).when_matched_update_all().when_not_matched_insert_all()
     .execute(docs(["d7", "d210", "new1", "new2"], seed=2, tag="v2")))  # updated rows move to the end
    table.compact_files()
    table.delete(f"{S.ID} = 'd11'")  # a deletion vector on the compacted file
    pinned = table.version
    table.add(docs(["later"], seed=3))  # after the pin: not in that version
    table.delete(f"{S.ID} = 'd20'")
    at_pin = store.db.open_table("passages")
    at_pin.checkout(pinned)
    exact = ExactSearch(at_pin, "cosine", columns=(S.TEXT,))
    assert exact.version == pinned and exact.rows == at_pin.count_rows() == 297
    # matrix row i is the row at position i of that version: take() by position gives the scanned ids
    assert exact.ds.take(exact.positions, columns=[S.ID])[S.ID].combine_chunks().equals(exact.ids)
    q = queries(30)
    for hits, want in zip(exact.tables(q, 300), lance_flat(store, at_pin, q, 300, "cosine", (S.ID, S.TEXT))):
        assert hits.num_rows == 297
        assert hits[S.ID].to_pylist() == want[S.ID].to_pylist()
        assert hits[S.TEXT].to_pylist() == want[S.TEXT].to_pylist()
        assert {"later", "d3", "d11"}.isdisjoint(hits[S.ID].to_pylist()) and "d20" in hits[S.ID].to_pylist()
        texts = dict(zip(hits[S.ID].to_pylist(), hits[S.TEXT].to_pylist()))
        assert texts["d7"] == "text of d7 v2" and texts["d8"] == "text of d8 v1" and texts["new1"] == "text of new1 v2"


def test_chunking_and_ties_change_nothing(store):
    vecs = np.random.default_rng(0).normal(size=(400, DIM))
    vecs[50:60] = vecs[5]  # eleven equal rows: equal scores, any chunking keeps them in row order
    vecs[300] = vecs[5]
    table = store.db.create_table("passages", docs([f"d{i}" for i in range(400)], vectors=vecs))
    q = np.concatenate([vecs[5:6].astype(np.float32), queries(20)])
    for metric in ("cosine", "l2", "dot"):
        one = ExactSearch(table, metric, columns=(S.TITLE,)).tables(q, 15)
        for chunk_bytes in (4 * 400 * 3, 4 * 37, 4 * 7):  # 3 queries per chunk; blocks of 37 and of 7 rows
            chunked = ExactSearch(table, metric, columns=(S.TITLE,), chunk_bytes=chunk_bytes).tables(q, 15)
            assert all(a.equals(b) for a, b in zip(one, chunked)), (metric, chunk_bytes)
        if metric != "dot":  # the twelve copies of the query lead, equal, in row order
            top = one[0]
            assert top[S.ID].to_pylist()[:12] == ["d5", *(f"d{i}" for i in range(50, 60)), "d300"]
            assert len(set(top["score"].to_pylist()[:12])) == 1


def test_top_k_selection_breaks_ties_by_position():
    rng = np.random.default_rng(0)
    for n, k in ((1000, 10), (5000, 100), (300, 7), (50, 60), (2000, 1)):
        s = rng.normal(size=(30, n)).astype(np.float32)
        s[:, 5:n // 2] = np.round(s[:, 5:n // 2], 1)  # many ties
        s[3] = 0.5  # one row of nothing but ties
        want = np.array([np.lexsort((np.arange(n), -row))[:k] for row in s])
        assert (_top(s, k) == want).all()
        assert (_top(s, k, key=np.broadcast_to(np.arange(n), s.shape)) == want).all()


def test_auto_uses_the_matrix_product_below_the_crossover_and_ann_above(store):
    from lancedb.index import IvfFlat

    table = store.db.create_table("passages", docs([f"d{i}" for i in range(300)]))
    ix = IndexConfig()
    no_index = {"rows": 300, "dim": DIM, "has_ann": False}
    assert choose_method("auto", **no_index)[0] == "matmul"
    assert choose_method("auto", **no_index, max_bytes=100)[0] == "lance_flat"  # too big for memory
    assert choose_method(False, **no_index)[0] == "lance_flat"
    assert choose_method(True, **no_index, max_rows=10)[0] == "matmul"
    with CandidateSearch(store, table, ix, k=5, exact_max_rows=10) as s:  # no ANN index: no crossover
        assert s.method == "matmul"

    table.create_index(S.VECTOR, config=IvfFlat(distance_type="cosine", num_partitions=2))
    assert resolve_method(table, "auto", max_rows=1000)[0] == "matmul"
    method, why = resolve_method(table, "auto", max_rows=299)
    assert method == "ann" and "exact_max_rows 299" in why
    assert resolve_method(table, "auto", max_bytes=300 * DIM * 4 - 1)[0] == "ann"
    assert resolve_method(table, True, max_rows=1)[0] == "matmul"
    assert resolve_method(table, True, max_bytes=1)[0] == "lance_flat"  # still exact
    assert resolve_method(table, False)[0] == "ann"
    assert resolve_method(table, "lance_flat")[0] == "lance_flat"
    with pytest.raises(ValueError, match="auto, true, false or lance_flat"):
        resolve_method(table, "fast")
    q = queries(4)
    with CandidateSearch(store, table, ix, k=5, exact_max_rows=1000) as small, \
            CandidateSearch(store, table, ix, k=5, exact_max_rows=100) as large:
        assert (small.method, large.method) == ("matmul", "ann")
        assert small.matrix is not None and large.matrix is None
        assert all(len(h) == 5 for h in small(q, []) + large(q, []))
    with CandidateSearch(store, table, ix, k=5, exact=False) as never:
        assert never.method == "ann" and never.matrix is None


def test_config_accepts_auto_true_false_and_lance_flat():
    assert RetrieveConfig().exact == "auto"
    for given, want in (("auto", "auto"), (True, True), (False, False), ("true", True), ("lance_flat", "lance_flat")):
        assert RetrieveConfig(exact=given).exact == want
    with pytest.raises(ConfigError, match="retrieve.exact"):
        parse_config({"retrieve": {"exact": "sometimes"}})


def test_settings_key_and_report_follow_the_resolved_method(tmp_path):
    from lancedb.index import IvfFlat

    from pipelines.rerank.carry_over import settings_key

    def config(**retrieve):
        return parse_config({"storage": {"uri": str(tmp_path / "db")}, "retrieve": retrieve,
                             "rerank": {"model": "cross-encoder"}})

    table = lancedb.connect(str(tmp_path / "db")).create_table("passages", docs([f"d{i}" for i in range(300)]))
    table.create_index(S.VECTOR, config=IvfFlat(distance_type="cosine", num_partitions=2))
    auto_small, always = config(exact="auto", exact_max_rows=1000), config(exact=True)
    auto_large, never = config(exact="auto", exact_max_rows=100), config(exact=False)
    def key(c):
        return settings_key(c, "ce", None, passages_version=table.version)

    assert key(auto_small) == key(always) != key(auto_large) == key(never)  # matmul, matmul / ann, ann
    assert method_for_report(auto_large, table.version)["method"] == "ann"
    assert method_for_report(auto_small, table.version)["method"] == "matmul"
    assert method_for_report(auto_small, None)["method"] is None
    assert method_for_report(auto_small, 999)["method"] is None  # no such version: no exception


def test_gpu_path_falls_back_to_cpu(store, monkeypatch, caplog):
    table = store.db.create_table("passages", docs([f"d{i}" for i in range(200)]))
    q = queries(5)
    cpu = ExactSearch(table, "cosine", device="cpu").tables(q, 10)
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="pipelines.rerank.exact_search"):
        asked = ExactSearch(table, "cosine", device="cuda")
    assert asked.device == "cpu" and "falling back" not in caplog.text and "running on CPU" in caplog.text
    assert all(a.equals(b) for a, b in zip(cpu, asked.tables(q, 10)))
    assert ExactSearch(table, "cosine", device="auto").device == "cpu"
    monkeypatch.setitem(sys.modules, "torch", None)  # torch not installed: import fails
    assert ExactSearch(table, "cosine", device="cuda").device == "cpu"


@pytest.mark.gpu
def test_gpu_matches_cpu(store):
    table = store.db.create_table("passages", docs([f"d{i}" for i in range(3000)]))
    q = queries(40)
    for metric in ("cosine", "dot", "l2"):
        cpu = ExactSearch(table, metric, device="cpu").tables(q, 50)
        gpu = ExactSearch(table, metric, device="cuda", chunk_bytes=4 * 3000 * 7)
        assert gpu.device == "cuda"
        for a, b in zip(cpu, gpu.tables(q, 50)):
            assert a[S.ID].to_pylist() == b[S.ID].to_pylist()
            np.testing.assert_allclose(a["score"].to_numpy(), b["score"].to_numpy(), rtol=1e-5, atol=1e-5)
