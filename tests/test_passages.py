"""Passages from documents (issue 19): long documents split by the bi-encoder's tokenizer with offsets and nothing
left unembedded; incremental runs keyed by document (a changed or shortened document replaces all its passages in
one commit); a change of chunking rebuilds; document-level candidates and rankings with the passage that earned the
score; query and document prompts; bad input refused or quarantined, never lost.

The tiny BERT reads 64 tokens, so a few hundred words make a long document."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import WORDS, good_docs, write_jsonl

from pipelines.index import job as index
from pipelines.index.chunk import Chunker, ChunkError, spans
from pipelines.store import Store

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module", autouse=True)
def _ray():
    import ray

    from pipelines.cluster.runtime import start_local_ray

    start_local_ray(num_cpus=2, logging_level="WARNING")
    yield
    ray.shutdown()


def long_text(n_words: int, seed: int = 0, sentences: bool = True) -> str:
    rng = np.random.default_rng(seed)
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), n_words)]
    if sentences:
        words = [w + ("." if i % 9 == 8 else "") for i, w in enumerate(words)]
    return " ".join(words)


def corpus(tmp_path: Path, long_docs: dict[str, str], n_short: int = 6) -> Path:
    docs = good_docs(n_short) + [{"_id": i, "title": f"long {i}", "text": t} for i, t in long_docs.items()]
    return write_jsonl(tmp_path / "c.jsonl", docs)


def passages(cfg, version=None) -> list[dict]:
    rows = Store(cfg.storage).passages(version).to_arrow().to_pylist()
    return sorted(rows, key=lambda r: (r["id"], r["passage"]))


def by_doc(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["id"], []).append(r)
    return out


def tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(model_path) / "raw")) if (Path(model_path) / "raw").exists() \
        else AutoTokenizer.from_pretrained(model_path)


# -- the split ----------------------------------------------------------------------------------------------


def _tokens(tok, text: str) -> list[tuple[int, int]]:
    return [tuple(o) for o in tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]


@pytest.mark.parametrize("sentences", [True, False])
def test_spans_cover_every_token_and_cut_at_word_boundaries(tiny_model, sentences):
    from sentence_transformers import SentenceTransformer

    tok = SentenceTransformer(tiny_model, device="cpu").tokenizer
    text = long_text(400, seed=1, sentences=sentences)  # without sentences: only whitespace between words
    offsets = _tokens(tok, text)
    cuts = spans(offsets, text, budget=40, overlap=8)
    assert len(cuts) > 5
    covered = set()
    for a, b in cuts:
        inside = [i for i, (x, y) in enumerate(offsets) if x >= a and y <= b]
        assert len(inside) <= 40  # the window holds
        covered.update(inside)
        assert a == 0 or text[a - 1] == " "  # passages start at a word ...
        assert b == len(text) or text[b] in " ."  # ... and end at one (a sentence end or a space)
    assert covered == set(range(len(offsets)))  # no token left out
    if sentences:  # most cuts fall on a sentence end when there is one in the window's second half
        assert sum(text[b - 1] == "." for a, b in cuts[:-1]) >= len(cuts[:-1]) // 2


def test_one_giant_token_and_a_run_without_boundaries():
    assert spans([(0, 100_000)], "x" * 100_000, budget=50, overlap=10) == [(0, 100_000)]
    chars = [(i, i + 1) for i in range(120)]  # a BPE-like run of 120 tokens without a gap: cut anywhere
    cuts = spans(chars, "a" * 120, budget=50, overlap=10)
    assert cuts[0] == (0, 50) and cuts[-1][1] == 120 and all(b - a <= 50 for a, b in cuts)


def test_chunk_settings_the_model_cannot_read_are_refused(tiny_model):
    from pydantic import ValidationError
    from sentence_transformers import SentenceTransformer

    from pipelines.config import ChunkConfig

    tok = SentenceTransformer(tiny_model, device="cpu").tokenizer
    with pytest.raises(ChunkError, match=r"chunk.tokens is 500.*at most 62 text tokens fit; set chunk.tokens to 62"):
        Chunker.from_model(tok, ChunkConfig(tokens=500), max_seq_length=64, prompt="", model="tiny")
    with pytest.raises(ValidationError, match="must be larger than chunk.overlap"):
        ChunkConfig(tokens=16, overlap=16)
    with pytest.raises(ChunkError, match="not larger than chunk.overlap"):
        Chunker.from_model(tok, ChunkConfig(overlap=200), max_seq_length=64, prompt="", model="tiny")


# -- the index job ------------------------------------------------------------------------------------------


def test_long_documents_become_passages_with_offsets_and_the_models_vectors(tmp_path, make_config, tiny_model):
    from sentence_transformers import SentenceTransformer

    texts = {"L1": long_text(300, seed=2), "L2": long_text(150, seed=3)}
    cfg = make_config(corpus(tmp_path, texts))
    report = index.run(cfg)
    assert report["rows"] == {"read": 8, "written": 8, "unchanged": 0, "delete_markers": 0, "quarantined": 0,
                              "reconciled": True}
    rows = passages(cfg)
    docs = by_doc(rows)
    assert report["passages"]["written"] == len(rows) == report["table"]["rows"]
    assert len(docs["L1"]) > len(docs["L2"]) > 1 and all(len(docs[f"d{i}"]) == 1 for i in range(6))
    assert report["passages_split"]["window_tokens"] == 60  # 64 less [CLS], [SEP] and a margin of 2
    tok = SentenceTransformer(tiny_model, device="cpu").tokenizer
    for doc_id, text in texts.items():
        parts = docs[doc_id]
        assert [p["passage"] for p in parts] == list(range(len(parts)))
        assert [p["passage_id"] for p in parts] == [f"{doc_id}#{n}" for n in range(len(parts))]
        for p in parts:
            assert p["text"] == text[p["passage_start"]:p["passage_end"]] and p["title"] == f"long {doc_id}"
            n_tokens = len(tok(f"long {doc_id} {p['text']}")["input_ids"])
            assert n_tokens <= 64  # the model reads the whole passage and its title: nothing is cut off
        offsets = _tokens(tok, text)
        covered = {i for p in parts for i, (a, b) in enumerate(offsets)
                   if a >= p["passage_start"] and b <= p["passage_end"]}
        assert covered == set(range(len(offsets)))
    # each vector is plain sentence-transformers' vector of "title passage"
    plain = SentenceTransformer(tiny_model, device="cpu")
    some = docs["L1"][:3] + docs["d0"]
    want = plain.encode([f"{p['title']} {p['text']}" for p in some], normalize_embeddings=True)
    got = np.array([p["vector"] for p in some])
    assert np.abs(got - want).max() < 1e-4


def test_whole_documents_when_chunking_is_off(tmp_path, make_config):
    cfg = make_config(corpus(tmp_path, {"L1": long_text(300, seed=2)}), chunk={"enabled": False})
    index.run(cfg)
    rows = by_doc(passages(cfg))
    assert len(rows["L1"]) == 1 and rows["L1"][0]["passage_end"] == len(long_text(300, seed=2))


@pytest.mark.parametrize("embedded_on", ["driver", "actors"])
def test_a_night_with_one_document_edited_and_one_shortened(tmp_path, make_config, embedded_on):
    texts = {"L1": long_text(300, seed=2), "L2": long_text(250, seed=3), "L3": long_text(200, seed=4)}
    path = corpus(tmp_path, texts)
    cfg = make_config(path, embed={"local_max_rows": 500 if embedded_on == "driver" else 0})
    first = index.run(cfg)
    before = by_doc(passages(cfg))
    texts["L1"] = long_text(320, seed=9)  # edited, still long
    texts["L2"] = "a short abstract now"  # shortened to one passage
    corpus(tmp_path, texts)
    night = index.run(cfg)
    assert night["mode"] == "incremental" and night["plan"]["embed"] == 2 and night["plan"]["unchanged"] == 7
    assert night["documents"] == {"added": 0, "updated": 2, "deleted": 0}
    after = by_doc(passages(cfg))
    fresh = {r["id"] for rows in after.values() for r in rows if r["run_id"] == night["run_id"]}
    assert fresh == {"L1", "L2"}  # only their passages were embedded
    assert night["passages"]["written"] == len(after["L1"]) + len(after["L2"])
    assert len(after["L2"]) == 1 and after["L2"][0]["text"] == "a short abstract now"  # none left over
    assert [p["text"] for p in after["L1"]] == [texts["L1"][p["passage_start"]:p["passage_end"]] for p in after["L1"]]
    for doc_id in ["L3", *(f"d{i}" for i in range(6))]:  # the others untouched: same rows, same run
        assert [(p["passage_id"], p["run_id"], p["vector"]) for p in after[doc_id]] == \
            [(p["passage_id"], p["run_id"], p["vector"]) for p in before[doc_id]]
    assert night["table"]["committed_version"] == first["table"]["version"] + 1  # one commit
    assert sum(map(len, after.values())) == night["table"]["rows"]

    del texts["L1"]  # deleted: all its passages go
    corpus(tmp_path, texts)
    gone = index.run(cfg)
    assert gone["documents"]["deleted"] == 1 and "L1" not in by_doc(passages(cfg))
    assert len(by_doc(passages(cfg, version=night["run_id"]))["L1"]) == len(after["L1"])  # older version keeps them


def test_a_change_of_chunking_rebuilds_in_one_commit(tmp_path, make_config):
    path = corpus(tmp_path, {"L1": long_text(300, seed=2)})
    first = index.run(make_config(path))
    cfg = make_config(path, chunk={"overlap": 30})  # the default is an eighth of the 60-token window: 7
    again = index.run(cfg)
    assert again["mode"] == "rebuild" and '"overlap": 30' in again["passage_settings_change"]["to"]
    assert len(by_doc(passages(cfg))["L1"]) > len(by_doc(passages(cfg, version=first["run_id"]))["L1"])
    assert index.run(cfg)["mode"] == "incremental"  # the same settings again: nothing to rebuild


def test_bad_documents_are_quarantined_or_split_never_lost(tmp_path, make_config):
    docs = [
        {"_id": "zw", "text": "\u200b\u200b\u200b"},  # no token the model reads, no title: nothing to embed
        {"_id": "giant", "title": "one token", "text": "x" * 100_000},  # a single 100,000-character word
        {"_id": "plain", "title": "t", "text": long_text(300, seed=5, sentences=False)},  # whitespace only
        {"_id": "empty", "title": "a title", "text": "   "},  # empty text: the validator's
        *good_docs(3),
    ]
    write_jsonl(tmp_path / "bad.jsonl", docs)
    cfg = make_config(tmp_path / "bad.jsonl")
    report = index.run(cfg)
    r = report["rows"]
    assert r["read"] == 7 and r["written"] == 5 and r["quarantined"] == 2 and r["reconciled"]
    assert report["quarantine_reasons"] == {"empty_after_tokenizing": 1, "empty_text": 1}
    q = Store(cfg.storage).quarantine(report["run_id"]).to_pylist()
    zw = next(x for x in q if x["id"] == "zw")
    assert "no token the bi-encoder reads" in zw["reason"] and json.loads(zw["raw"])["text"] == "\u200b" * 3
    rows = by_doc(passages(cfg))
    assert len(rows["giant"]) == 1 and rows["giant"][0]["passage_end"] == 100_000
    assert len(rows["plain"]) > 3 and rows["plain"][-1]["passage_end"] == len(docs[2]["text"])

    # a chunk window the model cannot read: refused before any actor starts, naming the setting
    with pytest.raises(ChunkError, match="set chunk.tokens to"):
        index.run(make_config(tmp_path / "bad.jsonl", chunk={"tokens": 100}))


def test_an_incremental_run_quarantines_a_document_that_became_empty(tmp_path, make_config):
    write_jsonl(tmp_path / "c.jsonl", good_docs(5))
    cfg = make_config(tmp_path / "c.jsonl")
    index.run(cfg)
    docs = good_docs(5)
    docs[2] = {"_id": "d2", "text": "\u200b"}
    write_jsonl(tmp_path / "c.jsonl", docs)
    report = index.run(cfg)
    assert report["rows"]["quarantined"] == 1 and report["rows"]["reconciled"]
    assert report["quarantine_reasons"] == {"empty_after_tokenizing": 1}
    assert by_doc(passages(cfg))["d2"][0]["text"] != "\u200b"  # the published version stays


# -- retrieval and rankings at document level ---------------------------------------------------------------


def test_candidates_are_documents_scored_by_their_best_passage(tmp_path, make_config, tiny_model):
    from pipelines.rerank.retrieve import CandidateSearch
    from pipelines.store import Store as St

    texts = {f"L{i}": long_text(300, seed=10 + i) for i in range(4)}
    cfg = make_config(corpus(tmp_path, texts, n_short=10))
    index.run(cfg)
    store = St(cfg.storage)
    table = store.passages()
    from sentence_transformers import SentenceTransformer

    q = SentenceTransformer(tiny_model, device="cpu").encode(["cell protein study", "cancer risk"],
                                                              normalize_embeddings=True).astype("float32")
    all_rows = table.to_arrow()
    vecs = np.array(all_rows["vector"].to_pylist(), dtype=np.float32)
    for exact in (True, "lance_flat"):
        with CandidateSearch.from_config(store, table, cfg, k=6, source="vector", exact=exact,
                                         columns=("title", "text"), passage_hits=1) as search:
            docs = search(q, ["cell protein study", "cancer risk"])
        with CandidateSearch.from_config(store, table, cfg, k=6, source="vector", exact=exact,
                                         level="passage") as search:
            flat = search(q, ["x", "y"])
        for qi, hits in enumerate(docs):
            ids = hits["id"].to_pylist()
            assert len(ids) == len(set(ids)) == 6  # k counts documents, each once (deepened past passage_hits=1)
            scores = vecs @ q[qi]
            best = {}
            for doc, pid, s in zip(all_rows["id"].to_pylist(), all_rows["passage_id"].to_pylist(), scores):
                if doc not in best or s > best[doc][1]:
                    best[doc] = (pid, s)
            want = sorted(best, key=lambda d: -best[d][1])[:6]
            assert ids == want  # max over each document's passages
            assert hits["passage_id"].to_pylist() == [best[d][0] for d in want]
        assert all(h.num_rows == 6 for h in flat) and "passage_id" in flat[0].column_names


def test_rankings_keep_the_passage_that_earned_each_score(tmp_path, make_config, tiny_cross_encoder):
    from pipelines.lookup import Rankings
    from pipelines.rerank import job as rerank

    texts = {f"L{i}": long_text(300, seed=20 + i) for i in range(3)}
    path = corpus(tmp_path, texts, n_short=8)
    log = write_jsonl(tmp_path / "log.jsonl", [{"query": q, "timestamp": "2026-12-01T10:00:00Z"}
                                               for q in ["cell protein", "cancer risk", "gene model data"]])
    cfg = make_config(path, query_log={"path": str(log)}, retrieve={"k": 8},
                      rerank={"model": tiny_cross_encoder, "top_n": 5, "actors": 1, "carry_over": False})
    index.run(cfg)
    report = rerank.run(cfg)
    assert report["status"] == "succeeded" and report["retrieve"]["level"] == "document"
    table = pa.Table.from_pylist(passages(cfg))
    text_of = dict(zip(table["passage_id"].to_pylist(), table["text"].to_pylist()))
    for row in Store(cfg.storage).rankings().to_arrow().to_pylist():
        assert len(row["doc_ids"]) == len(set(row["doc_ids"])) == 5
        assert [p.rsplit("#", 1)[0] for p in row["passage_ids"]] == row["doc_ids"]
        assert all(b > a for a, b in zip(row["passage_starts"], row["passage_ends"]))
    hit = Rankings(cfg).lookup("cell protein").hits[0]
    assert hit.passage_id.startswith(hit.id + "#") and hit.text == text_of[hit.passage_id]


def test_training_reads_a_judged_document_as_its_best_passage_for_the_query(tmp_path, make_config, tiny_model,
                                                                            monkeypatch):
    """The reranker's (and bi-encoder's) positive is the judged document's passage that retrieval found for the
    query (here its third), not its first; the audit file names it."""
    from pipelines.quality import train_reranker

    path = corpus(tmp_path, {"L1": long_text(300, seed=5)}, n_short=10)
    index.run(make_config(path))
    third = next(p for p in passages(make_config(path)) if p["passage_id"] == "L1#2")
    write_jsonl(tmp_path / "q.jsonl", [{"_id": "q0", "text": f"long L1 {third['text']}"},
                                       {"_id": "q1", "text": "cancer risk number 1"}])
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq0\tL1\t1\nq1\td1\t1\n")
    cfg = make_config(path, train={
        "queries": str(tmp_path / "q.jsonl"), "qrels": str(tmp_path / "qrels.tsv"), "output": str(tmp_path / "ce"),
        "base_model": str(Path(tiny_model).parent / "raw"), "negatives": {"per_query": 2, "range_max": 8},
        "validation_fraction": 0.0, "max_steps": 1, "device": "cpu"})
    seen = {}

    def fit(t, columns, samples, folder):
        seen.update(columns)
        folder.mkdir(parents=True)
        return {"device": "cpu", "steps": 0, "epochs": 0.0, "examples_per_second": 0.0, "head": "new",
                "loss": {"first": 0.0, "final": 0.0, "mean": 0.0}}

    monkeypatch.setattr(train_reranker, "_fit", fit)
    train_reranker.run(cfg)
    positives = [d for d, label in zip(seen["document"], seen["label"]) if label == 1.0]
    assert positives[0] == f"long L1 {third['text']}"  # not the first passage
    audit = [json.loads(x) for x in (tmp_path / "ce" / "batchrank-train-pairs.jsonl").read_text().splitlines()]
    assert [x["passage_id"] for x in audit if x["label"] == 1.0] == ["L1#2", "d1#0"]
    assert all(x["passage_id"].startswith(x["doc_id"] + "#") for x in audit)


# -- prompts ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompted_model(tmp_path_factory, tiny_model) -> str:
    """The tiny bi-encoder with a query and a document prompt in its configuration (as e5, bge, nomic, ...)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(tiny_model, device="cpu")
    model.prompts = {"query": "query: ", "document": "passage: "}
    out = tmp_path_factory.mktemp("prompted") / "prompted"
    model.save(str(out))
    return str(out)


def test_prompts_give_encode_document_and_encode_query_vectors(tmp_path, make_config, prompted_model, monkeypatch):
    from sentence_transformers import SentenceTransformer

    from pipelines.rerank import exact_search
    from pipelines.rerank.retrieve import Retriever

    cfg = make_config(corpus(tmp_path, {"L1": long_text(200, seed=3)}), embed={"model": prompted_model})
    report = index.run(cfg)
    assert report["passages_split"]["document_prompt"] == "passage: "
    assert report["passages_split"]["query_prompt"] == "query: "
    rows = passages(cfg)
    plain = SentenceTransformer(prompted_model, device="cpu")
    want = plain.encode_document([f"{r['title']} {r['text']}" for r in rows], normalize_embeddings=True)
    assert np.abs(np.array([r["vector"] for r in rows]) - want).max() < 1e-4
    assert report["passages_split"]["window_tokens"] < 60  # the prompt's tokens come out of the window

    asked: list[str] = []
    real = exact_search._torch_cuda
    monkeypatch.setattr(exact_search, "_torch_cuda", lambda device: asked.append(device) or real(device))
    retriever = Retriever.from_config(cfg, passages_version=report["table"]["version"], device="cpu")
    assert asked == ["cpu"]  # the actor's device (no GPU reserved): its exact-search matrix stays off the GPUs
    out = retriever(pa.table({"query": ["cell protein"]}))
    q = plain.encode_query(["cell protein"], normalize_embeddings=True)[0]
    best = rows[[r["passage_id"] for r in rows].index(out["_cand_passages"][0][0].as_py())]
    assert abs(float(np.dot(best["vector"], q)) - out["_cand_scores"][0][0].as_py()) < 1e-4

    literal = make_config(tmp_path / "c.jsonl", embed={"model": prompted_model, "document_prompt": "doc: "})
    changed = index.run(literal)  # another document prompt: a rebuild
    assert changed["mode"] == "rebuild" and changed["passages_split"]["document_prompt"] == "doc: "
    with pytest.raises(ValueError, match=r"'passage_x', which is not a prompt of bi-encoder .*its prompts: "
                                         r"document, query"):
        index.run(make_config(tmp_path / "c.jsonl", embed={"model": prompted_model,
                                                           "document_prompt": "passage_x"}))
