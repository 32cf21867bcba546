"""The eval's leak check identifies a query by its text, not its id (ids are per collection): a model trained on
one collection is not refused on another whose query ids happen to be the same numbers, and is refused on any
evaluated query whose text it was trained or validated on, whatever that query's id. Trained for real (tiny
random models, no Ray) and with fabricated records; models trained before texts were recorded are checked
through the queries file they recorded, or refused with the way out."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import as_passages, good_docs, write_jsonl

from pipelines import schema as S
from pipelines.config import parse_config
from pipelines.quality import evaluate

TOPICS = ["cell protein", "cancer risk", "vitamin study", "brain data", "gene model"]
N_TRAIN = 8


def _collection(folder: Path, texts: dict[str, str], splits: dict[str, list[tuple[str, str]]]) -> Path:
    """A BEIR folder: corpus.jsonl (30 docs), queries.jsonl, qrels/<split>.tsv."""
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "corpus.jsonl", good_docs(30))
    write_jsonl(folder / "queries.jsonl", [{"_id": q, "text": t} for q, t in texts.items()])
    for split, rows in splits.items():
        body = "".join(f"{q}\t{d}\t1\n" for q, d in rows)
        (folder / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + body)
    return folder


@pytest.fixture
def collections(tmp_path):
    """A: numeric query ids 1..8 judged in train, 9..10 in test; 101..108 in 'dup' are the train queries' texts
    again (case and spacing changed). B: the same ids 1..8 with other texts, judged in test."""
    a_texts = {str(i): f"{TOPICS[i % 5]} number {i}" for i in range(1, N_TRAIN + 3)}
    a_texts |= {str(100 + i): "  " + f"{TOPICS[i % 5]}   NUMBER {i}".title() + " " for i in range(1, N_TRAIN + 1)}
    a = _collection(tmp_path / "a", a_texts, {
        "train": [(str(i), f"d{i}") for i in range(1, N_TRAIN + 1)],
        "test": [("9", "d9"), ("10", "d10")],
        "dup": [(str(100 + i), f"d{i}") for i in range(1, N_TRAIN + 1)]})
    b = _collection(tmp_path / "b", {str(i): f"entirely other question {i} about data" for i in range(1, 11)},
                    {"test": [(str(i), f"d{i + 10}") for i in range(1, N_TRAIN + 1)]})
    return a, b


def _eval_config(tmp_path: Path, collection: Path, encoder: str, reranker: str, split: str = "test", **sections):
    data = {"storage": {"uri": str(tmp_path / "db")},
            "embed": {"model": encoder, "actors": 1, "batch_size": 8, "rows_per_call": 16},
            "rerank": {"model": reranker, "batch_size": 32, "max_length": 64},
            "eval": {"collection": str(collection), "split": split, "depths": [5],
                     "output": str(tmp_path / "eval-report")}}
    data.update(sections)
    return parse_config(data)


def _leak_check(cfg, monkeypatch) -> dict:
    """Run the eval job up to its leak check (the passages step is stopped): the report's ``leak_check``, or the
    LeakError it raised."""
    def stop(*args, **kwargs):
        raise RuntimeError("stopped after the leak check")

    monkeypatch.setattr(evaluate, "ensure_passages", stop)
    with pytest.raises(RuntimeError, match="stopped after the leak check") as info:
        evaluate.run(cfg)
    return info.value.batchrank_report["leak_check"]


def _build_passages(cfg, model: str) -> None:
    """The passages table as `batchrank index` writes it, embedded in-process (no Ray)."""
    from sentence_transformers import SentenceTransformer

    from pipelines.store import Store

    docs = good_docs(30)
    vecs = SentenceTransformer(model, device="cpu").encode([f"{d['title']} {d['text']}" for d in docs],
                                                          normalize_embeddings=True).astype("float32")
    n, dim = vecs.shape
    rows = pa.table({S.ID: [d["_id"] for d in docs], S.TITLE: [d["title"] for d in docs],
                     S.TEXT: [d["text"] for d in docs],
                     S.VECTOR: pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), dim),
                     S.CONTENT_HASH: [d["_id"] for d in docs], S.MODEL: [model] * n,
                     S.EMBEDDED_AT: pa.array([None] * n, S.TIMESTAMP), S.RUN_ID: ["test-index"] * n})
    rows = as_passages(rows, cfg.passage_settings)
    store = Store(cfg.storage)
    staged = store.stage(cfg.storage.passages_table, "test-index", S.passages_schema({}, dim))
    staged.add(rows)
    try:
        store.commit_passages(staged, "test-index")
    finally:
        staged.drop()


@pytest.fixture
def trained(tmp_path, collections, make_config, tiny_model) -> str:
    """A reranker really trained by `batchrank train-reranker` on A's train split (2 steps, tiny models)."""
    from pipelines.quality import train_reranker as train

    a, _ = collections
    cfg = make_config(a / "corpus.jsonl", train={
        "queries": str(a / "queries.jsonl"), "qrels": str(a / "qrels" / "train.tsv"),
        "output": str(tmp_path / "reranker"), "base_model": str(Path(tiny_model).parent / "raw"),
        "negatives": {"per_query": 2, "range_max": 8}, "validation_fraction": 0.25, "max_steps": 2,
        "batch_size": 8, "max_length": 64, "validation_k": 8, "device": "cpu"})
    _build_passages(cfg, tiny_model)
    assert train.run(cfg)["status"] == "succeeded"
    return str(tmp_path / "reranker")


def _meta(model: str) -> dict:
    return json.loads((Path(model) / "batchrank-train.json").read_text())


def test_a_really_trained_reranker_is_checked_by_query_text(tmp_path, collections, tiny_model, trained, monkeypatch):
    a, b = collections
    meta = _meta(trained)
    n_train, n_validation = len(meta["query_ids"]["train"]), len(meta["query_ids"]["validation"])
    assert n_train and n_validation and n_train + n_validation == N_TRAIN
    # B's query ids are A's training ids, with other texts: not a leak (the old check refused it)
    clean = _leak_check(_eval_config(tmp_path, b, tiny_model, trained), monkeypatch)
    assert clean["status"] == "clean"
    assert [m for m in clean["models"] if m["key"] == "rerank.model"][0]["train_queries"] == n_train
    # A's own test split: other queries, clean as well
    assert _leak_check(_eval_config(tmp_path, a, tiny_model, trained), monkeypatch)["status"] == "clean"
    # A's training queries under other ids (and other case and spacing): refused, with the count
    with pytest.raises(evaluate.LeakError, match=rf"rerank.model .*reranker was trained on {n_train} of the "
                                                 r"evaluated 'dup' queries \(in its train queries: 10\d") as info:
        evaluate.run(_eval_config(tmp_path, a, tiny_model, trained, split="dup"))
    assert "train on the train split" in str(info.value)


def test_an_older_model_recording_ids_only_is_checked_through_its_queries_file(tmp_path, collections, tiny_model,
                                                                               trained, monkeypatch):
    """Metadata written before query texts were recorded: ids, and the queries file with its digest."""
    a, b = collections
    meta = _meta(trained)
    del meta["query_keys"]
    (Path(trained) / "batchrank-train.json").write_text(json.dumps(meta))
    n_train = len(meta["query_ids"]["train"])
    assert _leak_check(_eval_config(tmp_path, b, tiny_model, trained), monkeypatch)["status"] == "clean"
    with pytest.raises(evaluate.LeakError, match=rf"trained on {n_train} of the evaluated 'dup' queries"):
        evaluate.run(_eval_config(tmp_path, a, tiny_model, trained, split="dup"))
    # its queries file moved: the eval's queries file has the recorded digest, so its texts stand in
    shutil.copytree(a, tmp_path / "a-moved")
    shutil.rmtree(a)
    moved = tmp_path / "a-moved"
    with pytest.raises(evaluate.LeakError, match=rf"trained on {n_train} of the evaluated 'dup' queries"):
        evaluate.run(_eval_config(tmp_path, moved, tiny_model, trained, split="dup"))
    # nothing has the recorded content any more: refused, saying why and what to do
    with pytest.raises(evaluate.LeakError, match=r"older batchrank that recorded query ids only.*retrain it"):
        evaluate.run(_eval_config(tmp_path, b, tiny_model, trained))


def _fake_model(tmp_path: Path, base: str, collection: Path, train: dict[str, str], validation: dict[str, str],
                self_supervised=()) -> str:
    """The tiny cross-encoder with a leak record as pipelines/quality/training.py writes it."""
    from pipelines.quality.leaks import training_record

    out = tmp_path / "fake-model"
    shutil.copytree(base, out)
    qrels, queries = collection / "qrels" / "train.tsv", collection / "queries.jsonl"
    meta = {"query_ids": {"train": list(train), "validation": list(validation)},
            "inputs": {"queries": {"path": str(queries), "sha256": hashlib.sha256(queries.read_bytes()).hexdigest()},
                       "qrels": {"path": str(qrels), "sha256": hashlib.sha256(qrels.read_bytes()).hexdigest()}},
            "query_keys": training_record(train.values(), validation.values(), self_supervised)}
    (out / "batchrank-train.json").write_text(json.dumps(meta))
    return str(out)


def test_validation_queries_count_and_ids_alone_never_match(tmp_path, collections, tiny_model, tiny_cross_encoder,
                                                            monkeypatch):
    a, b = collections
    texts = {str(i): f"{TOPICS[i % 5]} number {i}" for i in range(1, N_TRAIN + 1)}
    model = _fake_model(tmp_path, tiny_cross_encoder, a, {k: texts[k] for k in "12345"},
                        {k: texts[k] for k in "678"})
    assert _leak_check(_eval_config(tmp_path, b, tiny_model, model), monkeypatch)["status"] == "clean"
    with pytest.raises(evaluate.LeakError, match=r"trained on 5 of the evaluated 'dup' queries \(in its train "
                                                 r"queries: 101, 102, 103, 104, 105;"):
        evaluate.run(_eval_config(tmp_path, a, tiny_model, model, split="dup"))
    only_validation = _fake_model(tmp_path / "v", tiny_cross_encoder, a, {}, {"7": texts["7"]})
    with pytest.raises(evaluate.LeakError, match=r"trained on 1 of the evaluated 'dup' queries \(in its validation "
                                                 r"queries: 107;"):
        evaluate.run(_eval_config(tmp_path, a, tiny_model, only_validation, split="dup"))


def test_self_supervised_pairs_leak_only_with_their_document(tmp_path, collections, tiny_model, tiny_cross_encoder,
                                                             monkeypatch):
    """A title trained as a query for its own document is a leak only where the eval judges that document
    relevant to a query with that text."""
    a, _ = collections
    c = _collection(tmp_path / "c", {"1": "Title 3", "2": "title 4"}, {"test": [("1", "d3"), ("2", "d9")]})
    model = _fake_model(tmp_path, tiny_cross_encoder, a, {}, {}, self_supervised=[("title 3", "d3"),
                                                                                  ("title 4", "d4")])
    with pytest.raises(evaluate.LeakError, match=r"trained on 1 of the evaluated 'test' judgments as self-supervised "
                                                 r"pairs .*1 → d3"):
        evaluate.run(_eval_config(tmp_path, c, tiny_model, model))
    c2 = _collection(tmp_path / "c2", {"1": "Title 3", "2": "title 4"}, {"test": [("1", "d5"), ("2", "d9")]})
    assert _leak_check(_eval_config(tmp_path, c2, tiny_model, model), monkeypatch)["status"] == "clean"


def test_a_train_section_is_checked_by_query_text(tmp_path, collections, tiny_model, tiny_cross_encoder, monkeypatch):
    """The config's own train section: A's train judgments do not leak into B's test (same ids, other texts), and
    do leak into A's 'dup' split (same texts, other ids)."""
    a, b = collections
    section = {"train": {"queries": str(a / "queries.jsonl"), "qrels": str(a / "qrels" / "train.tsv"),
                         "output": str(tmp_path / "m")}}
    cfg = _eval_config(tmp_path, b, tiny_model, tiny_cross_encoder, **section)
    assert _leak_check(cfg, monkeypatch)["status"] == "clean"
    with pytest.raises(evaluate.LeakError, match=rf"train.qrels .* judges {N_TRAIN} of the evaluated queries \(101, "):
        evaluate.run(_eval_config(tmp_path, a, tiny_model, tiny_cross_encoder, split="dup", **section))


def test_leaked_queries_exclude_evaluates_without_them_and_lists_them(tmp_path, collections, tiny_model,
                                                                      tiny_cross_encoder, monkeypatch):
    """``eval.leaked_queries: exclude``: the queries whose text training judged are left out and listed (a
    collection whose splits share a query word for word, as SciFact's do, stays evaluable); the refusal names this
    fix; a training file equal to the eval judgments is refused either way."""
    a, _ = collections
    texts = {q["_id"]: q["text"] for q in map(json.loads, (a / "queries.jsonl").read_text().splitlines())}
    # 'mixed': two evaluated queries with a training query's text (101, 102) and two clean ones (9, 10)
    (a / "qrels" / "mixed.tsv").write_text("query-id\tcorpus-id\tscore\n101\td1\t1\n9\td9\t1\n102\td2\t1\n10\td10\t1\n")
    train = {"train": {"queries": str(a / "queries.jsonl"), "qrels": str(a / "qrels" / "train.tsv"),
                       "output": str(tmp_path / "m")}}
    with pytest.raises(evaluate.LeakError, match=r"judges 2 of the evaluated queries \(101, 102\).*"
                                                 r"eval.leaked_queries: exclude"):
        evaluate.run(_eval_config(tmp_path, a, tiny_model, tiny_cross_encoder, split="mixed", **train))
    cfg = _eval_config(tmp_path, a, tiny_model, tiny_cross_encoder, split="mixed", **train)
    cfg.eval.leaked_queries = "exclude"
    check = _leak_check(cfg, monkeypatch)
    assert check["status"] == "excluded" and list(check["excluded"]) == ["101", "102"], check
    assert all("train.qrels" in why for why in check["excluded"].values())
    assert texts["101"] and texts["9"]
    same_file = {"train": {**train["train"], "qrels": str(a / "qrels" / "mixed.tsv")}}
    cfg = _eval_config(tmp_path, a, tiny_model, tiny_cross_encoder, split="mixed", **same_file)
    cfg.eval.leaked_queries = "exclude"
    with pytest.raises(evaluate.LeakError, match="is the eval judgments file"):
        evaluate.run(cfg)
