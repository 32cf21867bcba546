"""Bi-encoder training: a few contrastive steps on a tiny random BERT, validation, metadata, cache. No Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import good_docs
from test_train import N_QUERIES, assert_trained_at, build_passages, collection, encoder, encoder_weights  # noqa: F401

from pipelines.quality import train_biencoder as tb
from pipelines.quality.training import META, PAIRS


@pytest.fixture
def cfg(collection, make_config, encoder):  # noqa: F811
    folder, corpus = collection
    config = make_config(corpus, embed={"model": encoder}, train_biencoder={
        "queries": str(folder / "queries.jsonl"), "qrels": str(folder / "qrels.tsv"),
        "output": str(folder / "bi-encoder"), "validation_fraction": 0.25, "max_steps": 2, "batch_size": 4,
        "max_seq_length": 64, "device": "cpu", "negatives": {"per_query": 1, "range_min": 1, "range_max": 10},
        "warmup_ratio": 0.0,  # with 2 steps, a warmup step would run at learning rate 0 (and may be the best kept)
    })
    build_passages(config, good_docs(30), encoder)
    return config


def test_trains_saves_and_the_model_encodes(cfg):
    from sentence_transformers import SentenceTransformer

    report = tb.run(cfg)
    assert report["status"] == "succeeded" and report["training"]["steps"] == 2
    assert report["base_model"] == cfg.embed.model and report["loss"]["name"] == "mnrl"
    out = Path(cfg.train_biencoder.output)
    trained = SentenceTransformer(str(out), device="cpu")
    vectors = trained.encode(["cancer risk", "title 1 cancer risk number 1"])
    assert vectors.shape == (2, 32) and np.isfinite(vectors).all()

    meta = json.loads((out / META).read_text())
    assert meta["job"] == "train-biencoder" and meta["fingerprint"] == report["fingerprint"]
    ids = meta["query_ids"]
    assert len(ids["train"]) == 6 and len(ids["validation"]) == 2 and not set(ids["train"]) & set(ids["validation"])
    pairs = [json.loads(line) for line in (out / PAIRS).read_text().splitlines()]
    assert {x["query_id"] for x in pairs} == set(ids["train"])
    assert report["pairs"] == {"total": 12, "positive": 6, "negative": 6, "self_supervised": 0, "left_out_short": 0}
    assert all(x["rank"] > 1 for x in pairs if x["label"] == 0.0)  # range_min
    v = meta["validation"]
    assert v["queries"] == 2 and 2 <= v["corpus"] <= 30 and set(v["ndcg@10"]) == {"before", "after"}
    assert meta["training"]["best_step"] in (1, 2) and [c["step"] for c in v["checkpoints"]] == [1, 2]
    assert v["ndcg@10"]["after"] == max(c["ndcg@10"] for c in v["checkpoints"])
    # the kept checkpoint was trained from embed.model at train_biencoder.learning_rate
    assert_trained_at(cfg.train_biencoder.learning_rate, meta["training"]["best_step"],
                      encoder_weights(SentenceTransformer(cfg.embed.model, device="cpu")), encoder_weights(trained))
    text = tb.summary(report)
    assert "set embed.model to" in text and "new table" in text and "6 train, 2 validation" in text
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith("bi-encoder")) == ["bi-encoder"]


def test_rerun_is_cached_until_forced(cfg, monkeypatch):
    cfg.train_biencoder.validation_fraction = 0.0
    cfg.train_biencoder.self_supervised.pairs = 4
    first = tb.run(cfg)
    assert first["status"] == "succeeded" and first["validation"] is None
    assert first["pairs"]["self_supervised"] == 4 and first["pairs"]["positive"] == N_QUERIES + 4
    monkeypatch.setattr(tb, "_fit", lambda *a: pytest.fail("a cached run must not train"))
    again = tb.run(cfg)
    assert again["status"] == "cached" and again["pairs"] == first["pairs"] and "--force" in tb.summary(again)

    def quick(t, base, columns, validation, folder):
        folder.mkdir(parents=True)
        assert len(columns["anchor"]) == first["pairs"]["positive"] and set(columns) == {"anchor", "positive",
                                                                                         "negative_1"}
        return {"device": "cpu", "steps": 0, "epochs": 0.0, "examples_per_second": 0.0,
                "loss": {"first": 0.0, "final": 0.0, "mean": 0.0}}

    monkeypatch.setattr(tb, "_fit", quick)
    assert tb.run(cfg, force=True)["status"] == "succeeded"
    cfg.train_biencoder.learning_rate *= 2
    assert tb.run(cfg)["status"] == "succeeded"
