"""The eval job end to end on a tiny BEIR collection (tiny random models): index built, then reused; every
variant measured; eval.json/.md/.png written. And the leak guard: test judgments never reach training."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import yaml
from conftest import good_docs, write_jsonl

from pipelines.config import parse_config
from pipelines.index.corpus import corpus_fingerprint
from pipelines.quality import evaluate

TOPICS = ["cell protein", "cancer risk", "vitamin study", "brain data", "gene model"]
TEST_IDS = [f"t{i}" for i in range(6)]
TRAIN_IDS = [f"r{i}" for i in range(8)]
DEPTHS = [5, 10, 20]
RERANKED = ["vector", "hybrid"]


@pytest.fixture(scope="module")
def _ray():
    import ray

    from pipelines.cluster.runtime import start_local_ray

    start_local_ray(num_cpus=2, logging_level="WARNING")
    yield
    ray.shutdown()


def number(text: str) -> str | None:
    found = re.search(r"number (\d+)", text)
    return found and found[1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def collection(tmp_path) -> Path:
    """30 docs; 6 test queries (t*, one graded) and 8 train queries (r*), in the BEIR layout."""
    folder = tmp_path / "tiny-beir"
    (folder / "qrels").mkdir(parents=True)
    write_jsonl(folder / "corpus.jsonl", good_docs(30))
    write_jsonl(folder / "queries.jsonl",
                [{"_id": f"t{i}", "text": f"{TOPICS[i % 5]} number {i}"} for i in range(6)]
                + [{"_id": f"r{i}", "text": f"{TOPICS[i % 5]} number {i + 10}"} for i in range(8)])
    test = ["query-id\tcorpus-id\tscore"] + [f"t{i}\td{i}\t1" for i in range(6)] + ["t0\td5\t2", "t1\td6\t0"]
    (folder / "qrels" / "test.tsv").write_text("\n".join(test) + "\n")
    train = ["query-id\tcorpus-id\tscore"] + [f"r{i}\td{i + 10}\t1" for i in range(8)]
    (folder / "qrels" / "train.tsv").write_text("\n".join(train) + "\n")
    return folder


def fake_reranker(tmp_path: Path, tiny_cross_encoder: str, collection: Path, name: str = "reranker",
                  train_ids=TRAIN_IDS[:6], validation_ids=TRAIN_IDS[6:], qrels: Path | None = None) -> str:
    """The tiny cross-encoder with the metadata `batchrank train-reranker` saves next to a trained model."""
    from pipelines.quality.beir import read_queries
    from pipelines.quality.leaks import training_record

    out = tmp_path / name
    shutil.copytree(tiny_cross_encoder, out)
    qrels = qrels or collection / "qrels" / "train.tsv"
    texts = read_queries(str(collection / "queries.jsonl"))
    meta = {"query_ids": {"train": list(train_ids), "validation": list(validation_ids)},
            "query_keys": training_record([texts[q] for q in train_ids], [texts[q] for q in validation_ids]),
            "qrels": {"path": str(qrels), "sha256": sha256(qrels)}, "fusion": {"cross_encoder": 0.35}}
    (out / "batchrank-train.json").write_text(json.dumps(meta))
    return str(out)


def config_data(tmp_path: Path, collection: Path, tiny_model: str, reranker: str, **sections) -> dict:
    data = {
        "storage": {"uri": str(tmp_path / "db")},
        "embed": {"model": tiny_model, "actors": 1, "batch_size": 8, "rows_per_call": 16},
        "rerank": {"model": reranker, "batch_size": 32, "max_length": 64},
        "train": {"queries": str(collection / "queries.jsonl"), "qrels": str(collection / "qrels" / "train.tsv"),
                  "output": str(tmp_path / "trained")},
        "eval": {"collection": str(collection), "depths": DEPTHS, "rerank_sources": RERANKED,
                 "output": str(tmp_path / "eval-report")},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


@pytest.mark.ray
def test_eval_end_to_end_then_reuses_the_index(tmp_path, collection, tiny_model, tiny_cross_encoder, _ray,
                                               monkeypatch):
    from typer.testing import CliRunner

    from pipelines.cli import app
    from pipelines.index import job as index
    from pipelines.store import Store

    reranker = fake_reranker(tmp_path, tiny_cross_encoder, collection)
    data = config_data(tmp_path, collection, tiny_model, reranker)
    report = evaluate.run(parse_config(data))

    assert report["status"] == "succeeded" and report["passages"]["action"] == "indexed"
    assert report["queries"] == {"judged": 6, "without_text": 0, "beyond_max_queries": 0, "evaluated": 6}
    assert report["leak_check"]["status"] == "clean"
    assert report["models"]["fusion"]["weight"] == 0.35  # fusion: auto reads the weight saved with the reranker
    by_name = {v["name"]: v for v in report["variants"]}
    expected = ["vector", "fts", "hybrid"] + [f"{s} → CE@{d}{f}" for s in RERANKED for d in DEPTHS
                                              for f in ("", " + fusion (w=0.35)")]
    assert sorted(by_name) == sorted(expected)
    for v in report["variants"]:
        assert set(v["metrics"]) == {"ndcg@10", "mrr@10", "recall@100"}
        assert all(0.0 <= x <= 1.0 for x in v["metrics"].values())
        if v["depth"] is not None:
            assert v["pairs"] == 6 * v["depth"]  # every doc is a vector candidate: no query is short
            assert v["seconds"] >= report["first_stage"][v["source"]]["seconds"] and v["pairs_per_second"] > 0
            # top K re-ordered, the rest appended in first-stage order: the top 100 is the same set
            assert v["metrics"]["recall@100"] == by_name[v["source"]]["metrics"]["recall@100"]
    for s in RERANKED:
        costs = [by_name[f"{s} → CE@{d}"]["rerank_seconds"] for d in DEPTHS]
        assert costs == sorted(costs)  # cumulative: the slices of depth 10 include those of depth 5

    out = Path(report["outputs"]["json"]).parent
    assert json.loads((out / "eval.json").read_text())["variants"] == report["variants"]
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "eval.md").read_text()
    assert "| variant | nDCG@10 |" in md and "Best: `" in md and "vector → CE@20" in md
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    assert json.loads(Path(report["report_path"]).read_text())["run_id"] == report["run_id"]
    text = evaluate.summary(report)
    assert "hybrid → CE@10 + fusion (w=0.35)" in text and "pairs/s" in text

    # the passages table holds exactly the corpus, as the eval's own fingerprint of the file says
    cfg = parse_config(data)
    icfg = cfg.model_copy(update={"corpus": parse_config({"corpus": {"path": str(collection / "corpus.jsonl")}}).corpus})
    store = Store(cfg.storage)
    assert corpus_fingerprint(icfg) == store.content_fingerprint(store.passages())

    # second run, through the CLI: passages is reused, the index job never starts
    def no_index(*args, **kwargs):
        raise AssertionError("the index job ran although passages was up to date")

    monkeypatch.setattr(index, "run", no_index)
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["eval", "--config", str(tmp_path / "eval.yaml")])
    assert result.exit_code == 0, result.output
    assert "reused" in result.output and "vector → CE@5" in result.output
    again = json.loads((out / "eval.json").read_text())
    assert again["passages"]["action"] == "reused" and again["run_id"] != report["run_id"]

    # ordering and slicing, with a fake cross-encoder that knows the answer (the query's number in the doc)
    class Oracle:
        calls: ClassVar[list[list[tuple[str, str]]]] = []

        def __init__(self, model, **settings):
            self.model = model

        def predict(self, pairs):
            Oracle.calls.append(list(pairs))
            return np.array([float(number(q) == number(d)) for q, d in pairs], dtype=np.float32)

    monkeypatch.setattr("pipelines.rerank.score.Scorer", Oracle)
    ranked = evaluate.run(parse_config(data))
    assert [len(c) for c in Oracle.calls] == [6 * 5, 6 * 5, 6 * 10] * len(RERANKED)  # slices, in depth order
    for i in range(len(RERANKED)):  # no pair of a source is scored twice
        pairs = [p for c in Oracle.calls[3 * i:3 * i + 3] for p in c]
        assert len(set(pairs)) == len(pairs) == 6 * 20
    by_name = {v["name"]: v for v in ranked["variants"]}
    # the oracle puts the query's own document first wherever the first stage found it: hybrid (BM25 matches the
    # number) always has it in its top 5; the tiny random bi-encoder alone does not (its vectors know no numbers)
    assert by_name["vector"]["metrics"]["mrr@10"] < 1.0 == by_name["hybrid → CE@5"]["metrics"]["mrr@10"]
    for source in RERANKED:
        for d in DEPTHS:
            assert by_name[f"{source} → CE@{d}"]["metrics"]["mrr@10"] >= by_name[source]["metrics"]["mrr@10"]

    # a changed document makes the file's fingerprint differ: the next run would index again
    docs = good_docs(30)
    docs[3]["text"] = "changed text"
    write_jsonl(collection / "corpus.jsonl", docs)
    assert corpus_fingerprint(icfg) != store.content_fingerprint(store.passages())


@pytest.mark.parametrize("where", ["rerank", "embed"])
@pytest.mark.parametrize("part", ["train", "validation"])
def test_a_model_trained_on_test_queries_is_refused(tmp_path, collection, tiny_model, tiny_cross_encoder, where, part):
    leaky = {"train_ids": ["r0", "t2"], "validation_ids": []} if part == "train" else \
        {"train_ids": ["r0"], "validation_ids": ["r1", "t4"]}
    model = fake_reranker(tmp_path, tiny_cross_encoder, collection, name="leaky-model", **leaky)
    data = config_data(tmp_path, collection, tiny_model, tiny_cross_encoder)
    data["rerank" if where == "rerank" else "embed"]["model"] = model
    with pytest.raises(evaluate.LeakError, match=rf"{where}.model .*leaky-model.*{part} queries: t[24]") as info:
        evaluate.run(parse_config(data))
    assert "train on the train split" in str(info.value)
    failed = info.value.batchrank_report
    assert failed["status"] == "failed" and json.loads(Path(failed["report_path"]).read_text())["status"] == "failed"
    assert not (tmp_path / "db" / "passages.lance").exists()  # refused before any work: nothing indexed


def test_a_model_trained_with_the_eval_qrels_file_is_refused(tmp_path, collection, tiny_model, tiny_cross_encoder):
    copy = tmp_path / "elsewhere.tsv"  # same judgments under another name: caught by the digest
    shutil.copy(collection / "qrels" / "test.tsv", copy)
    model = fake_reranker(tmp_path, tiny_cross_encoder, collection, train_ids=[], validation_ids=[], qrels=copy)
    data = config_data(tmp_path, collection, tiny_model, model)
    with pytest.raises(evaluate.LeakError, match="trained with the eval judgments file"):
        evaluate.run(parse_config(data))
    meta_path = Path(model) / "batchrank-train.json"  # the layout pipelines/quality/training.py writes: under "inputs"
    meta = json.loads(meta_path.read_text())
    meta["inputs"] = {"qrels": meta.pop("qrels")}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(evaluate.LeakError, match="trained with the eval judgments file"):
        evaluate.run(parse_config(data))


@pytest.mark.parametrize("section", ["train", "train_biencoder"])
def test_a_config_training_on_the_eval_qrels_is_refused(tmp_path, collection, tiny_model, tiny_cross_encoder, section):
    from typer.testing import CliRunner

    from pipelines.cli import app

    qrels = str(collection / "qrels" / "test.tsv")
    data = config_data(tmp_path, collection, tiny_model, tiny_cross_encoder)
    data[section] = {"queries": str(collection / "queries.jsonl"), "qrels": qrels, "output": str(tmp_path / "m")}
    with pytest.raises(evaluate.LeakError, match=rf"{section}.qrels is the eval judgments file"):
        evaluate.run(parse_config(data))
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["eval", "--config", str(tmp_path / "eval.yaml")])
    assert result.exit_code == 1 and "eval judgments file" in result.output


def test_train_qrels_judging_an_evaluated_query_is_refused(tmp_path, collection, tiny_model, tiny_cross_encoder):
    with (collection / "qrels" / "train.tsv").open("a") as fh:
        fh.write("t3\td3\t1\n")
    data = config_data(tmp_path, collection, tiny_model, tiny_cross_encoder)
    with pytest.raises(evaluate.LeakError, match=r"train.qrels .* judges 1 of the evaluated queries \(t3\)"):
        evaluate.run(parse_config(data))


def test_a_missing_split_is_named(tmp_path, collection, tiny_model, tiny_cross_encoder):
    data = config_data(tmp_path, collection, tiny_model, tiny_cross_encoder, eval={"split": "dev"})
    with pytest.raises(FileNotFoundError, match=r"not a BEIR collection: missing .*qrels/dev.tsv"):
        evaluate.run(parse_config(data))


def test_max_queries_takes_the_first_judged_and_only_those_are_checked(tmp_path, collection, tiny_model,
                                                                       tiny_cross_encoder, monkeypatch):
    model = fake_reranker(tmp_path, tiny_cross_encoder, collection, train_ids=["t4"], validation_ids=[])
    data = config_data(tmp_path, collection, tiny_model, model, eval={"max_queries": 2})

    def stop(*args, **kwargs):
        raise RuntimeError("stop after the leak check")

    monkeypatch.setattr(evaluate, "ensure_passages", stop)
    with pytest.raises(RuntimeError, match="stop after the leak check") as info:
        evaluate.run(parse_config(data))  # t4 is beyond the first 2 judged queries (t0, t1): no leak
    report = info.value.batchrank_report
    assert report["queries"] == {"judged": 6, "without_text": 0, "beyond_max_queries": 4, "evaluated": 2}
    assert report["leak_check"]["status"] == "clean"


_START_RAY = """
import json, sys
from pipelines.quality import evaluate
from pipelines.config import parse_config
cfg = parse_config(json.loads(sys.argv[1]))
if sys.argv[2] == "table":  # the passages check ran first: LanceDB is loaded when Ray starts
    from pipelines.store import Store
    Store(cfg.storage).passages_model()
    assert "lancedb" in sys.modules
else:
    assert evaluate._no_local_table(cfg) and "lancedb" not in sys.modules
import ray
evaluate._start_ray(cfg)
ray.shutdown()
print("started")
"""


@pytest.mark.ray
@pytest.mark.parametrize("order", ["no-table", "table"])
def test_starting_ray_for_the_index_job_prints_no_lancedb_fork_warning(tmp_path, tiny_model, order):
    """The eval starts Ray for the index job; LanceDB's at-fork hook warns in each process Ray forks and execs
    once LanceDB is loaded (five lines per eval before). No table: Ray starts before LanceDB loads. A table
    (checked with LanceDB): the spurious warning is silenced for Ray's start."""
    import os
    import subprocess
    import sys

    data = {"storage": {"uri": str(tmp_path / "db")}, "embed": {"model": tiny_model},
            "ray": {"num_cpus": 1}}
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(Path(evaluate.__file__).parents[1])}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", _START_RAY, json.dumps(data), order], env=env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0 and "started" in done.stdout, done.stderr[-3000:]
    assert "fork support is experimental" not in done.stderr, done.stderr[-3000:]
