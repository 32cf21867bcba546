"""Reranker training: mining, caching, atomic save, counts and errors. Tiny random BERTs, LanceDB in tmp_path, no Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import good_docs, write_jsonl

from pipelines import schema as S
from pipelines import train
from pipelines.store import Store, StoreError

N_QUERIES = 8


def build_passages(cfg, docs: list[dict], model: str, run_id: str = "test-index") -> None:
    """The passages table as `batchrank index` would write it, embedded in-process (no Ray)."""
    from sentence_transformers import SentenceTransformer

    encoder = SentenceTransformer(model, device="cpu")
    vecs = encoder.encode([f"{d['title']} {d['text']}" for d in docs], normalize_embeddings=True).astype("float32")
    n, dim = vecs.shape
    rows = pa.table({
        S.ID: [d["_id"] for d in docs], S.TITLE: [d["title"] for d in docs], S.TEXT: [d["text"] for d in docs],
        S.VECTOR: pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), dim),
        S.CONTENT_HASH: [d["_id"] for d in docs], S.MODEL: [model] * n,
        S.EMBEDDED_AT: pa.array([None] * n, S.TIMESTAMP), S.RUN_ID: ["test-index"] * n,
    })
    store = Store(cfg.storage)
    staged = store.stage(cfg.storage.passages_table, run_id, S.passages_schema({}, dim))
    staged.add(rows)
    try:
        store.commit_passages(staged, run_id)
    finally:
        staged.drop()


@pytest.fixture
def collection(tmp_path):
    """30 docs; 8 judged queries (one positive each, one judged non-relevant doc, one judged doc absent from
    passages) and 2 unjudged queries."""
    corpus = write_jsonl(tmp_path / "corpus.jsonl", good_docs(30))
    topics = ["cell protein", "cancer risk", "vitamin study", "brain data", "gene model"]
    write_jsonl(tmp_path / "queries.jsonl",
                [{"_id": f"q{i}", "text": f"{topics[i % 5]} number {i}"} for i in range(N_QUERIES + 2)])
    lines = ["query-id\tcorpus-id\tscore"]
    for i in range(N_QUERIES):
        lines += [f"q{i}\td{i}\t1", f"q{i}\td{i + 5}\t0"]
    lines.append("q0\tnot-indexed\t1")
    (tmp_path / "qrels.tsv").write_text("\n".join(lines) + "\n")
    return tmp_path, corpus


@pytest.fixture
def cfg(collection, make_config, tiny_model):
    folder, corpus = collection
    config = make_config(corpus, train={
        "queries": str(folder / "queries.jsonl"), "qrels": str(folder / "qrels.tsv"),
        "output": str(folder / "reranker"), "base_model": str(Path(tiny_model).parent / "raw"),
        "negatives_per_query": 3, "mine_k": 10, "max_steps": 2, "batch_size": 8, "max_length": 64,
        "device": "cpu",
    })
    build_passages(config, good_docs(30), tiny_model)
    return config


def pairs_of(output: str) -> list[dict]:
    return [json.loads(line) for line in (Path(output) / train.PAIRS).read_text().splitlines()]


def fake_fit(t, examples, folder):
    """Stands in for training where only the plumbing around it is under test."""
    folder.mkdir(parents=True)
    return {"device": "cpu", "steps": 0, "epochs": 0.0, "pairs_per_second": 0.0,
            "loss": {"first": 0.0, "final": 0.0, "mean": 0.0}}


def test_trains_saves_and_the_model_loads(cfg):
    from sentence_transformers import CrossEncoder

    report = train.run(cfg)
    assert report["status"] == "succeeded" and report["steps"] == 2
    out = Path(cfg.train.output)
    assert (out / train.META).is_file()
    assert json.loads((out / train.META).read_text())["fingerprint"] == report["fingerprint"]
    scores = CrossEncoder(str(out)).predict([("cancer risk", "title 1 cancer risk number 1"), ("a", "b"), ("c", "d")])
    assert scores.shape == (3,) and np.isfinite(scores).all()

    q, j, p = report["queries"], report["judgments"], report["pairs"]
    assert q == {"judged": N_QUERIES, "not_in_queries_file": 0, "beyond_max_queries": 0,
                 "without_positive_in_passages": 0, "used": N_QUERIES, "short_of_negatives": 0}
    assert j["read"] == 2 * N_QUERIES + 1 and j["not_relevant"] == N_QUERIES and j["used"] == N_QUERIES
    assert j["skipped_not_in_passages"] == 1 and j["reconciled"]
    assert p == {"total": 4 * N_QUERIES, "positive": N_QUERIES, "negative": 3 * N_QUERIES}

    pairs = pairs_of(out)
    assert len(pairs) == p["total"] and sum(x["label"] for x in pairs) == p["positive"]
    judged = {(f"q{i}", f"d{i}") for i in range(N_QUERIES)} | {(f"q{i}", f"d{i + 5}") for i in range(N_QUERIES)}
    assert not [x for x in pairs if x["label"] == 0.0 and (x["query_id"], x["doc_id"]) in judged]
    assert Path(report["report_path"]).is_file()
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith("reranker")) == ["reranker"]
    assert "queries: 8 used of 8 judged" in train.summary(report)


def test_rerun_is_cached_until_forced_or_changed(cfg, monkeypatch):
    first = train.run(cfg)
    monkeypatch.setattr(train, "_fit", lambda *a: pytest.fail("a cached run must not train"))
    again = train.run(cfg)
    assert again["status"] == "cached" and again["trained_at"] and again["pairs"] == first["pairs"]
    assert "train" not in again["seconds"] and "pass --force to retrain" in train.summary(again)
    build_passages(cfg, good_docs(30), cfg.embed.model, "again")  # a reindex that changed nothing: new version, same content
    assert Store(cfg.storage).passages().version > first["passages_version"]
    assert train.run(cfg)["status"] == "cached"
    monkeypatch.setattr(train, "_fit", fake_fit)
    build_passages(cfg, good_docs(2, start=100), cfg.embed.model, "more")  # new documents: the negatives may differ
    assert train.run(cfg)["status"] == "succeeded"
    assert train.run(cfg, force=True)["status"] == "succeeded"
    cfg.train.seed += 1
    changed = train.run(cfg)
    assert changed["status"] == "succeeded" and changed["fingerprint"] != first["fingerprint"]


def test_failed_training_leaves_the_previous_reranker(cfg, monkeypatch):
    from sentence_transformers import CrossEncoder

    train.run(cfg)

    def crash(t, examples, folder):
        folder.mkdir(parents=True)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(train, "_fit", crash)
    with pytest.raises(RuntimeError, match="out of memory") as err:
        train.run(cfg, force=True)
    assert err.value.batchrank_report["status"] == "failed"
    assert Path(err.value.batchrank_report["report_path"]).is_file()
    out = Path(cfg.train.output)
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith("reranker")) == ["reranker"]
    assert CrossEncoder(str(out)).predict([("a", "b")]).shape == (1,)


def test_counts_missing_docs_and_max_queries(cfg, monkeypatch):
    monkeypatch.setattr(train, "_fit", fake_fit)
    with open(cfg.train.qrels, "a") as fh:
        fh.write("q1\tgone-1\t1\nq1\tgone-2\t2\nq1\td1\t1\nq-unknown\td3\t1\n")
    cfg.train.max_queries = 3
    report = train.run(cfg)
    q, j = report["queries"], report["judgments"]
    assert q["judged"] == N_QUERIES + 1 and q["not_in_queries_file"] == 1 and q["used"] == 3
    assert q["beyond_max_queries"] == N_QUERIES - 3
    assert j["skipped_not_in_passages"] == 3 and j["duplicate"] == 1 and j["query_not_in_queries_file"] == 1
    assert j["reconciled"] and report["pairs"]["positive"] == 3


def test_query_without_positive_in_passages(cfg, monkeypatch):
    monkeypatch.setattr(train, "_fit", fake_fit)
    Path(cfg.train.qrels).write_text("query-id\tcorpus-id\tscore\nq0\tgone\t1\nq1\td1\t1\n")
    report = train.run(cfg)
    assert report["queries"]["without_positive_in_passages"] == 1 and report["queries"]["used"] == 1
    assert {x["query_id"] for x in pairs_of(cfg.train.output)} == {"q1"}


@pytest.mark.parametrize("qrels, error, match", [
    (None, FileNotFoundError, "train.qrels: no file"),
    ("q0\td0\t1\n", ValueError, "not a header"),
    ("query-id\tcorpus-id\tscore\nq0 d0 1\n", ValueError, r"qrels.tsv:2: 1 tab-separated columns"),
    ("query-id\tcorpus-id\tscore\nzz\td0\t1\n", ValueError, "none of the 1 judged query ids is in train.queries"),
])
def test_bad_inputs_name_the_fix(cfg, qrels, error, match):
    path = Path(cfg.train.qrels)
    if qrels is None:
        path.unlink()
    else:
        path.write_text(qrels)
    with pytest.raises(error, match=match) as err:
        train.run(cfg)
    assert err.value.batchrank_report["status"] == "failed"
    assert not Path(cfg.train.output).exists()


def test_refuses_passages_of_another_bi_encoder(cfg):
    cfg.embed.model = "all-MiniLM-L6-v2"
    with pytest.raises(StoreError, match="set embed.model to the table's model"):
        train.run(cfg)


def test_refuses_without_passages(collection, make_config, tiny_model):
    folder, corpus = collection
    config = make_config(corpus, train={"queries": str(folder / "queries.jsonl"), "qrels": str(folder / "qrels.tsv"),
                                        "output": str(folder / "reranker")})
    with pytest.raises(StoreError, match="run `batchrank index` first"):
        train.run(config)


def test_refuses_to_replace_a_foreign_folder(cfg):
    Path(cfg.train.output).mkdir()
    (Path(cfg.train.output) / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="point train.output at a new folder"):
        train.run(cfg)
    assert (Path(cfg.train.output) / "notes.txt").read_text() == "mine"
