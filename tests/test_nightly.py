"""The nightly job on a local Ray: reindex, upkeep and rerank in one run and one report; a night with no change
embeds and scores nothing; a deleted document leaves passages and the next rankings; both tables' new
versions carry the run's tag."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import good_docs, write_jsonl

from pipelines import nightly
from pipelines.lookup import Rankings
from pipelines.store import Store

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_per_module")]
QUERIES = ["cell protein", "cancer risk", "vitamin study", "brain data", "gene model"]


def test_nights_reindex_and_rerank_only_what_changed(tmp_path, make_config, tiny_cross_encoder):
    docs = good_docs(30)
    write_jsonl(tmp_path / "docs.jsonl", docs)
    write_jsonl(tmp_path / "log.jsonl", [{"query": q, "timestamp": "2026-11-28T10:00:00Z"} for q in QUERIES])
    cfg = make_config(tmp_path / "docs.jsonl", query_log={"path": str(tmp_path / "log.jsonl")},
                      retrieve={"k": 6}, rerank={"model": tiny_cross_encoder, "top_n": 6, "actors": 1})
    store = Store(cfg.storage)

    first = nightly.run(cfg)
    assert first["status"] == "succeeded" and first["stages"]["index"]["mode"] == "full"
    assert first["work"]["documents_embedded"] == 30 and first["work"]["pairs_scored"] == 5 * 6
    saved = json.loads(Path(first["report_path"]).read_text())  # one report for the whole night
    assert saved["job"] == "nightly" and set(saved["stages"]) == {"index", "rerank"}
    assert store.passages().tags.list()[first["run_id"]]["version"] == first["tables"]["passages"]
    assert store.rankings().tags.list()[first["run_id"]]["version"] == first["tables"]["rankings"]
    assert "nightly run" in nightly.summary(first)

    second = nightly.run(cfg)  # nothing changed: nothing embedded or scored; every ranking carried over
    assert second["work"]["documents_embedded"] == 0 and second["work"]["pairs_scored"] == 0
    assert second["stages"]["rerank"]["queries"]["carried_over"] == 5
    assert second["tables"]["passages"] == first["tables"]["passages"]
    assert _ranked(cfg, second) == _ranked(cfg, first)

    gone = _ranked(cfg, second)["cell protein"][0]  # the top document of a query is deleted from the corpus
    write_jsonl(tmp_path / "docs.jsonl", [d for d in docs if d["_id"] != gone])
    third = nightly.run(cfg)
    assert third["work"]["documents_deleted"] == 1 and third["work"]["documents_embedded"] == 0
    assert gone not in {r["id"] for r in store.passages().to_arrow().to_pylist()}
    assert all(gone not in ids for ids in _ranked(cfg, third).values())
    assert third["stages"]["rerank"]["queries"]["carried_over"] == 0  # passages changed: every query ranked again
    assert third["work"]["pairs_scored"] < 5  # at most the one new candidate per query that replaced it
    assert third["work"]["pairs_from_cache"] >= 5 * 6 - 5


def _ranked(cfg, report) -> dict[str, list[str]]:
    rankings = Rankings(cfg, version=report["run_id"], with_documents=False)
    return {q: [hit.id for hit in rankings.lookup(q).hits] for q in QUERIES}
