"""Reranker training: validation split, mining, losses, heads, fusion, caching, atomic save, counts and errors.
Tiny random BERTs, LanceDB in tmp_path, no Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import as_passages, good_docs, write_jsonl

from pipelines import schema as S
from pipelines.quality import train_reranker as train
from pipelines.store import Store, StoreError

N_QUERIES = 8


@pytest.fixture(scope="session")
def encoder(tiny_model) -> str:
    """The tiny bi-encoder: its tokenizer splits words, so mined candidates have distinct scores."""
    return tiny_model


def build_passages(cfg, docs: list[dict], model: str, run_id: str = "test-index", *, replace: bool = False) -> None:
    """The passages table as `batchrank index` would write it, embedded in-process (no Ray); ``replace``: as a
    rebuild writes it (one overwrite)."""
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
    rows = as_passages(rows, cfg.passage_settings)
    store = Store(cfg.storage)
    staged = store.stage(cfg.storage.passages_table, run_id, S.passages_schema({}, dim))
    staged.add(rows)
    try:
        store.commit_passages(staged, run_id, replace=replace)
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
def cfg(collection, make_config, encoder):
    folder, corpus = collection
    config = make_config(corpus, embed={"model": encoder}, train={
        "queries": str(folder / "queries.jsonl"), "qrels": str(folder / "qrels.tsv"),
        "output": str(folder / "reranker"), "base_model": str(Path(encoder).parent / "raw"),
        "negatives": {"per_query": 3, "range_max": 10}, "validation_fraction": 0.25, "max_steps": 2,
        "batch_size": 8, "max_length": 64, "validation_k": 10, "device": "cpu",
        "warmup_ratio": 0.0,  # with 2 steps, a warmup step would run at learning rate 0 (and may be the best kept)
    })
    build_passages(config, good_docs(30), encoder)
    return config


def encoder_weights(model) -> dict:
    """The transformer's weights of a loaded CrossEncoder, SentenceTransformer or Hugging Face model, by name."""
    from sentence_transformers import CrossEncoder, SentenceTransformer

    if isinstance(model, CrossEncoder):
        model = model.model
    elif isinstance(model, SentenceTransformer):
        model = model[0].auto_model
    return {k: v.detach().clone() for k, v in model.base_model.state_dict().items()}  # (without a classifier head)


def assert_trained_at(learning_rate: float, steps: int, before: dict, after: dict) -> None:
    """The weights moved as Adam's steps at this learning rate move them: a step changes each weight by at most
    about the learning rate (Adam divides the gradient by its own size; the first step by exactly that much),
    so the largest change is neither ~0 (no training, or a learning rate of 0) nor well above
    ``learning_rate x steps`` (another learning rate). Measured here: 1.0x after one step, 1.5x after two."""
    assert before.keys() == after.keys()
    moved = max(float((after[k].float() - before[k].float()).abs().max()) for k in before)
    assert 0.5 * learning_rate <= moved <= 1.5 * learning_rate * steps, (moved, learning_rate, steps)


def pairs_of(output: str) -> list[dict]:
    return [json.loads(line) for line in (Path(output) / train.PAIRS).read_text().splitlines()]


def meta_of(output: str) -> dict:
    return json.loads((Path(output) / train.META).read_text())


def fake_fit(t, columns, samples, folder):
    """Stands in for training where only the plumbing around it is under test."""
    folder.mkdir(parents=True)
    out = {"device": "cpu", "steps": 0, "epochs": 0.0, "examples_per_second": 0.0, "head": "new",
           "loss": {"first": 0.0, "final": 0.0, "mean": 0.0}}
    if samples:
        out.update(best_step=None, checkpoints=[],
                   validation_scores=[[float(-i) for i in range(len(s["documents"]))] for s in samples])
    return out


def test_trains_validates_fits_fusion_and_the_model_loads(cfg):
    from sentence_transformers import CrossEncoder
    from transformers import AutoModel

    report = train.run(cfg)
    assert report["status"] == "succeeded" and report["training"]["steps"] == 2 and report["head"] == "new"
    out = Path(cfg.train.output)
    meta = meta_of(out)
    assert meta["fingerprint"] == report["fingerprint"] and meta["job"] == "train" and meta["head"] == "new"
    trained = CrossEncoder(str(out))
    scores = trained.predict([("cancer risk", "title 1 cancer risk number 1"), ("a", "b"), ("c", "d")])
    assert scores.shape == (3,) and np.isfinite(scores).all()
    # the kept checkpoint (step 1 or 2) was trained from the base model's encoder, at train.learning_rate
    assert_trained_at(cfg.train.learning_rate, meta["training"]["best_step"],
                      encoder_weights(AutoModel.from_pretrained(cfg.train.base_model)), encoder_weights(trained))

    q, j, p = report["queries"], report["judgments"], report["pairs"]
    assert q == {"judged": N_QUERIES, "not_in_queries_file": 0, "beyond_max_queries": 0,
                 "without_positive_in_passages": 0, "used": N_QUERIES, "train": 6, "validation": 2,
                 "short_of_negatives": 0}
    assert j["read"] == 2 * N_QUERIES + 1 and j["not_relevant"] == N_QUERIES and j["used"] == N_QUERIES
    assert j["skipped_not_in_passages"] == 1 and j["reconciled"]
    assert p == {"total": 4 * 6, "positive": 6, "negative": 3 * 6, "self_supervised": 0, "left_out_short": 0}

    # the validation queries are recorded and never trained on
    ids = meta["query_ids"]
    assert len(ids["train"]) == 6 and len(ids["validation"]) == 2 and not set(ids["train"]) & set(ids["validation"])
    pairs = pairs_of(out)
    assert {x["query_id"] for x in pairs} == set(ids["train"])
    assert len(pairs) == p["total"] and sum(x["label"] for x in pairs) == p["positive"]
    judged = {(f"q{i}", f"d{i}") for i in range(N_QUERIES)} | {(f"q{i}", f"d{i + 5}") for i in range(N_QUERIES)}
    assert not [x for x in pairs if x["label"] == 0.0 and (x["query_id"], x["doc_id"]) in judged]
    for name in ("queries", "qrels"):
        assert meta["inputs"][name]["path"] == getattr(cfg.train, name) and len(meta["inputs"][name]["sha256"]) == 64

    # best checkpoint chosen on validation; validation nDCG@10 and the fusion weight saved for rerank.fusion: auto
    assert meta["training"]["best_step"] in (1, 2) and [c["step"] for c in meta["validation"]["checkpoints"]] == [1, 2]
    v, f = meta["validation"], meta["fusion"]
    assert v["queries"] == 2 and set(v["ndcg@10"]) == {"first_stage", "reranker", "fused"}
    assert 0 <= f["cross_encoder"] <= 1 and f["source"] == "vector" and f["k"] == 10 and f["validation_queries"] == 2
    assert len(f["curve"]) == 21 and v["ndcg@10"]["fused"] == max(f["curve"].values())
    assert meta["negatives"] == {"per_query": 3, "source": "vector", "range_min": 0, "range_max": 10,
                                 "absolute_margin": None, "relative_margin": None}
    assert Path(report["report_path"]).is_file()
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith("reranker")) == ["reranker"]
    text = train.summary(report)
    assert "queries: 8 used of 8 judged (6 train, 2 validation" in text and "fused" in text


@pytest.mark.parametrize("margins", [{"range_min": 2}, {"range_min": 1, "absolute_margin": 0.0},
                                     {"relative_margin": 0.001}])
def test_mining_honours_range_and_margins(cfg, monkeypatch, margins):
    from pipelines.models import load_bi_encoder
    from pipelines.rerank.retrieve import CandidateSearch

    monkeypatch.setattr(train, "_fit", fake_fit)
    cfg.train.negatives = cfg.train.negatives.model_copy(update=dict(margins, per_query=5))
    cfg.train.validation_fraction = 0.0
    report = train.run(cfg)
    pairs, n = pairs_of(cfg.train.output), cfg.train.negatives
    texts = {r["_id"]: r["text"] for r in map(json.loads, Path(cfg.train.queries).read_text().splitlines())}
    model, store = load_bi_encoder(cfg.embed.model, device="cpu", batch_tokens=0), Store(cfg.storage)  # as mining
    search = CandidateSearch(store, store.passages(), cfg.index, k=n.range_max, exact=True)
    for q in {x["query_id"] for x in pairs}:
        hits = search(model.encode([texts[q]], normalize_embeddings=True), [texts[q]])[0].to_pylist()
        rank = {h["id"]: (r, h["score"]) for r, h in enumerate(hits, 1)}
        pos = next(x for x in pairs if x["query_id"] == q and x["label"] == 1.0)
        expected = rank[pos["doc_id"]] if pos["doc_id"] in rank else (None, min(h["score"] for h in hits))
        assert (pos["rank"], pos["score"]) == pytest.approx(expected)  # a positive outside: the lowest score
        negs = [x for x in pairs if x["query_id"] == q and x["label"] == 0.0]
        for x in negs:
            assert rank[x["doc_id"]] == pytest.approx((x["rank"], x["score"]))
            assert n.range_min < x["rank"] <= n.range_max
            if n.absolute_margin is not None:
                assert x["score"] <= pos["score"] - n.absolute_margin
            if n.relative_margin is not None:
                assert x["score"] <= pos["score"] * (1 - n.relative_margin)
        judged = {f"d{q[1:]}", f"d{int(q[1:]) + 5}"}
        eligible = [d for d, (r, s) in rank.items() if r > n.range_min and d not in judged
                    and (n.absolute_margin is None or s <= pos["score"] - n.absolute_margin)
                    and (n.relative_margin is None or s <= pos["score"] * (1 - n.relative_margin))]
        assert len(negs) == min(5, len(eligible))
    if margins.get("absolute_margin") is not None:  # negatives scored above the positive were left out
        assert report["queries"]["short_of_negatives"] > 0


def test_listwise_loss_trains(cfg):
    from sentence_transformers import CrossEncoder
    from transformers import AutoModel

    cfg.train.loss, cfg.train.validation_fraction = "listwise", 0.0
    cfg.train.negatives = cfg.train.negatives.model_copy(update={"per_query": 2})
    report = train.run(cfg)
    assert report["status"] == "succeeded" and report["loss"]["name"] == "listwise"
    assert np.isfinite(report["loss"]["mean"]) and report["training"]["steps"] == 2
    assert report["pairs"]["positive"] == N_QUERIES and report["pairs"]["negative"] == 2 * N_QUERIES
    meta = meta_of(cfg.train.output)
    assert "fusion" not in meta and meta["validation"] is None and meta["query_ids"]["validation"] == []
    trained = CrossEncoder(cfg.train.output)
    assert trained.predict([("a", "b")]).shape == (1,)
    assert_trained_at(cfg.train.learning_rate, 2, encoder_weights(AutoModel.from_pretrained(cfg.train.base_model)),
                      encoder_weights(trained))


def test_self_supervised_pairs_are_added_and_counted(cfg, monkeypatch):
    monkeypatch.setattr(train, "_fit", fake_fit)
    cfg.train.self_supervised.pairs = 5
    report = train.run(cfg)
    assert report["self_supervised"]["pairs"] == 5 and report["pairs"]["self_supervised"] == 5
    assert report["pairs"]["positive"] == 6 + 5
    meta, pairs = meta_of(cfg.train.output), pairs_of(cfg.train.output)
    ss = [x for x in pairs if x["source"] == "self_supervised"]
    positives = [x["doc_id"] for x in ss if x["label"] == 1.0]
    assert len(set(positives)) == 5 and all(x["query_id"] is None for x in ss)
    assert None not in meta["query_ids"]["train"] and meta["self_supervised"]["pairs"] == 5
    held = {f"d{q[1:]}" for q in meta["query_ids"]["validation"]} | {f"d{int(q[1:]) + 5}"
                                                                      for q in meta["query_ids"]["validation"]}
    assert not set(positives) & held  # documents of validation queries are never drawn


def test_an_existing_cross_encoder_keeps_its_head(cfg, encoder, tmp_path):
    from sentence_transformers import CrossEncoder

    reranker = CrossEncoder(str(Path(encoder).parent / "raw"), num_labels=1, max_length=64, device="cpu")
    for name, weights in reranker.named_parameters():
        if "classifier" in name:  # a head no fresh initialisation would give: every score near sigmoid(3)
            weights.data.fill_(0.0 if name.endswith("weight") else 3.0)
    reranker.save(str(tmp_path / "reranker-base"))
    cfg.train.base_model, cfg.train.learning_rate, cfg.train.validation_fraction = str(tmp_path / "reranker-base"), \
        1e-12, 0.0
    cfg.train.max_steps = 1
    report = train.run(cfg)
    assert report["head"] == "kept" and meta_of(cfg.train.output)["head"] == "kept"
    pairs = [("cancer risk", "title 1 cancer risk number 1"), ("brain", "gene model")]
    assert np.allclose(CrossEncoder(cfg.train.output).predict(pairs), 1 / (1 + np.exp(-3.0)), atol=1e-4)


def test_rerun_is_cached_until_forced_or_changed(cfg, monkeypatch):
    monkeypatch.setattr(train, "_fit", fake_fit)
    first = train.run(cfg)
    monkeypatch.setattr(train, "_fit", lambda *a: pytest.fail("a cached run must not train"))
    again = train.run(cfg)
    assert again["status"] == "cached" and again["trained_at"] and again["pairs"] == first["pairs"]
    assert again["fusion"] == first["fusion"]
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
    monkeypatch.setattr(train, "_fit", lambda *a: pytest.fail("a cached run must not train"))
    assert train.run(cfg)["status"] == "cached"
    cfg.chunk.overlap = 3  # the same documents split otherwise (as a rebuild would write them): mined anew
    build_passages(cfg, good_docs(30) + good_docs(2, start=100), cfg.embed.model, "resplit", replace=True)
    monkeypatch.setattr(train, "_fit", fake_fit)
    assert train.run(cfg)["status"] == "succeeded"


def test_failed_training_leaves_the_previous_reranker(cfg, monkeypatch):
    from sentence_transformers import CrossEncoder

    cfg.train.validation_fraction = 0.0
    train.run(cfg)

    def crash(t, columns, samples, folder):
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
    cfg.train.max_queries, cfg.train.validation_fraction = 3, 0.0
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
    ("query-id\tcorpus-id\tscore\nzz\td0\t1\n", ValueError, "none of the 1 judged query ids is in the queries file"),
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


def test_refuses_without_passages(collection, make_config):
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
