"""Guarantees the README makes that had no test of their own (issue 17, item 16): staged rows of a document that
changed between a kill and the rerun are dropped; a rerank rerun reuses the cached scores of the run that died;
a failed index stage stops the night before the rerank; rankings are published only when every selected query
is ranked; the model loaders get ``trust_remote_code`` as configured (false by default: a model's own code never
runs unless asked for)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import good_docs, write_jsonl

from pipelines import nightly
from pipelines.config import parse_config
from pipelines.faults import InjectedFailure
from pipelines.index import job as index
from pipelines.rerank import job as rerank
from pipelines.rerank import sink as rerank_sink
from pipelines.store import Store

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_per_module")]
QUERIES = ["cell protein", "cancer risk", "vitamin study", "brain data", "gene model", "protein gene"]


def _log(path: Path, queries=QUERIES) -> Path:
    return write_jsonl(path, [{"query": q, "timestamp": "2026-11-28T10:00:00Z"} for q in queries])


def test_staged_rows_of_a_document_changed_after_the_kill_are_dropped(tmp_path, make_config, monkeypatch):
    docs = good_docs(24)
    write_jsonl(tmp_path / "c.jsonl", docs)
    cfg = make_config(tmp_path / "c.jsonl")
    monkeypatch.setenv("BATCHRANK_FAILPOINTS", "before_commit")
    with pytest.raises(InjectedFailure):
        index.run(cfg)  # every document staged, nothing published
    docs[3]["text"] = "d3 rewritten after the kill"
    write_jsonl(tmp_path / "c.jsonl", docs)
    monkeypatch.delenv("BATCHRANK_FAILPOINTS")
    report = index.run(cfg)
    assert report["resume"]["taken_over"] == 23 and report["resume"]["dropped"] == 1
    assert report["rows"]["resumed_from_killed_run"] == 23 and report["rows"]["written"] == 24
    rows = Store(cfg.storage).passages().to_arrow().to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(d["_id"] for d in docs)  # each id once
    assert next(r for r in rows if r["id"] == "d3")["text"] == "d3 rewritten after the kill"


@pytest.fixture
def reranking(tmp_path, make_config, tiny_cross_encoder):
    write_jsonl(tmp_path / "docs.jsonl", good_docs(30))

    def make(**overrides):
        sections = {"query_log": {"path": str(_log(tmp_path / "log.jsonl"))}, "retrieve": {"k": 6},
                    "rerank": {"model": tiny_cross_encoder, "top_n": 6, "actors": 1, "queries_per_call": 1,
                               "carry_over": False}}
        for name, values in overrides.items():
            sections.setdefault(name, {}).update(values)
        return make_config(tmp_path / "docs.jsonl", **sections)

    index.run(make())
    return make


def test_rerank_reruns_reuse_a_dead_runs_scores_and_publish_only_complete_sets(reranking, monkeypatch):
    cfg = reranking()
    store = Store(cfg.storage)
    monkeypatch.setenv("BATCHRANK_FAILPOINTS", "mid_run")  # dies right after its first staging and cache flush
    with pytest.raises(InjectedFailure) as info:
        rerank.run(cfg)
    assert info.value.batchrank_report["status"] == "failed"
    monkeypatch.delenv("BATCHRANK_FAILPOINTS")

    take = rerank_sink.Sink.take_pending

    def lose_one_row(self):  # a ranking lost between the sink and the staging table
        rows = take(self)
        return rows.slice(1) if rows.num_rows else rows

    with monkeypatch.context() as m:
        m.setattr(rerank_sink.Sink, "take_pending", lose_one_row)
        with pytest.raises(rerank.RerankError, match="not publishing an incomplete set"):
            rerank.run(cfg)
    assert store.open(cfg.storage.rankings_table) is None  # ranked != selected: nothing was published
    assert not [n for n in store.table_names() if n.startswith("_staging-rankings")]

    again = rerank.run(cfg)
    pairs = again["pairs"]
    assert again["status"] == "succeeded" and pairs["total"] == len(QUERIES) * 6
    assert store.rankings().count_rows() == len(QUERIES)
    assert pairs["cached"] >= 6  # at least the first flushed query's pairs came from the dead runs' cache writes
    assert pairs["scored"] + pairs["cached"] == pairs["total"] and pairs["scored"] < pairs["total"]


def test_a_failed_index_stage_stops_the_night_before_the_rerank(reranking, tmp_path, monkeypatch):
    cfg = reranking()
    first = nightly.run(cfg)
    store = Store(cfg.storage)
    rankings, passages = store.rankings().version, store.passages().version
    write_jsonl(tmp_path / "docs.jsonl", good_docs(32))
    monkeypatch.setenv("BATCHRANK_FAILPOINTS", "before_commit")
    with pytest.raises(InjectedFailure) as info:
        nightly.run(cfg)
    report = info.value.batchrank_report
    assert report["status"] == "failed" and report["failed_stage"] == "index"
    assert "rerank" not in report["stages"]  # the rerank never started
    assert store.rankings().version == rankings and store.passages().version == passages
    saved = json.loads(Path(report["report_path"]).read_text())
    assert saved["failed_stage"] == "index" and first["status"] == "succeeded"


CUSTOM_CODE = '''
import os

from transformers import BertForSequenceClassification, BertModel

with open(os.environ["BATCHRANK_TEST_REMOTE_CODE_MARKER"], "a") as fh:
    fh.write("the model's own code ran\\n")


class CustomModel(BertModel):
    pass


class CustomForSequenceClassification(BertForSequenceClassification):
    pass
'''


def _with_custom_code(folder: Path, target: Path) -> str:
    shutil.copytree(folder, target)
    (target / "custom_code_spy.py").write_text(CUSTOM_CODE)
    config = json.loads((target / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "custom_code_spy.CustomModel",
                          "AutoModelForSequenceClassification": "custom_code_spy.CustomForSequenceClassification"}
    (target / "config.json").write_text(json.dumps(config))
    return str(target)


def test_model_loaders_get_trust_remote_code_as_configured(tmp_path, tiny_model, tiny_cross_encoder, monkeypatch):
    from pipelines.index.embed import Embedder
    from pipelines.rerank.score import Scorer

    marker = tmp_path / "ran.txt"
    monkeypatch.setenv("BATCHRANK_TEST_REMOTE_CODE_MARKER", str(marker))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    bi = _with_custom_code(Path(tiny_model), tmp_path / "bi")
    ce = _with_custom_code(Path(tiny_cross_encoder), tmp_path / "ce")
    cfg = parse_config({"storage": {"uri": str(tmp_path / "db")}, "embed": {"model": bi},
                        "rerank": {"model": ce}})
    assert cfg.embed.trust_remote_code is False and cfg.rerank.trust_remote_code is False  # the defaults
    Embedder(cfg.embed.model, trust_remote_code=cfg.embed.trust_remote_code).encode(["a cell"])
    Scorer(cfg.rerank.model, trust_remote_code=cfg.rerank.trust_remote_code, preload=True)
    assert not marker.exists(), "a model's own code ran although trust_remote_code is false"

    Embedder(bi, trust_remote_code=True).encode(["a cell"])  # asked for: the loader gets it, and the code runs
    assert marker.read_text().count("ran") == 1
