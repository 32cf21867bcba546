"""The architectures users bring, through the jobs (issue 19): each tiny model of ``tests/archs.py`` indexes a corpus
with a long document (split by its own tokenizer: WordPiece, byte-level BPE or Unigram offsets) and reranks a query
log, on a local Ray. Every backend runs at job level (rotated over the architectures; each architecture x backend
cell is covered at stage level by ``test_architectures.py``). The stored vectors and the rankings' scores match plain
``SentenceTransformer.encode`` and ``CrossEncoder.predict`` of the same passages, within the tolerances stated there.
"""

from __future__ import annotations

import numpy as np
import pytest
from archs import WORDS, build_bi_encoder, build_cross_encoder
from conftest import write_jsonl

pytest.importorskip("onnxruntime", reason="pip install 'batchrank[onnx]'")

pytestmark = pytest.mark.ray

# (architecture, pooling, backend): every backend three times, both poolings, each architecture once
CELLS = [("bert", "mean", "torch"), ("mpnet", "cls", "onnx"), ("roberta", "mean", "onnx-int8"),
         ("xlm-roberta", "cls", "torch"), ("deberta-v2", "mean", "onnx"), ("modernbert", "cls", "onnx-int8"),
         ("electra", "mean", "torch")]


@pytest.fixture(scope="module", autouse=True)
def _ray(tmp_path_factory):
    import ray

    from pipelines.cluster.runtime import start_local_ray

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BATCHRANK_CACHE", str(tmp_path_factory.mktemp("exports")))  # this module's ONNX exports
        start_local_ray(num_cpus=2, logging_level="WARNING")
        yield
        ray.shutdown()


def _docs() -> list[dict]:
    rng = np.random.default_rng(7)
    long = " ".join(WORDS[i] + ("." if n % 7 == 6 else "") for n, i in enumerate(rng.integers(0, len(WORDS), 260)))
    return [{"_id": "long", "title": "a long study", "text": long},
            *({"_id": f"d{i}", "title": f"doc {i}", "text": " ".join(WORDS[(i * 5) % 20:(i * 5) % 20 + 6])}
              for i in range(8))]


@pytest.mark.parametrize(("arch", "pooling", "backend"), CELLS)
def test_index_and_rerank_jobs_run_each_architecture(tmp_path, make_config, arch, pooling, backend):
    from sentence_transformers import CrossEncoder, SentenceTransformer

    from pipelines.index import job as index
    from pipelines.rerank import job as rerank
    from pipelines.store import Store

    bi = str(build_bi_encoder(arch, tmp_path, pooling))
    ce = str(build_cross_encoder(arch, tmp_path))
    write_jsonl(tmp_path / "c.jsonl", _docs())
    log = write_jsonl(tmp_path / "log.jsonl", [{"query": q, "timestamp": "2026-12-01T10:00:00Z"}
                                               for q in ("cell protein", "learning guide", "cancer risk study")])
    cfg = make_config(tmp_path / "c.jsonl", embed={"model": bi, "backend": backend, "dtype": "float32"},
                      query_log={"path": str(log)}, retrieve={"k": 5},
                      rerank={"model": ce, "backend": backend, "dtype": "float32", "top_n": 4, "actors": 1,
                              "carry_over": False, "cache": False})
    report = index.run(cfg)
    assert report["status"] == "succeeded" and report["rows"]["written"] == 9
    rows = Store(cfg.storage).passages().to_arrow().to_pylist()
    long = [r for r in rows if r["id"] == "long"]
    text = _docs()[0]["text"]
    assert len(long) > 1 and all(r["text"] == text[r["passage_start"]:r["passage_end"]] for r in long)
    assert min(r["passage_start"] for r in long) == 0 and max(r["passage_end"] for r in long) == len(text)

    st = SentenceTransformer(bi, device="cpu")
    want = st.encode_document([f"{r['title']} {r['text']}" for r in rows], normalize_embeddings=True)
    got = np.array([r["vector"] for r in rows], dtype=np.float32)
    if backend == "onnx-int8":
        assert (got * want).sum(axis=1).min() >= 0.98
    else:
        assert np.abs(got - want).max() < 1e-4

    ranked = rerank.run(cfg)
    assert ranked["status"] == "succeeded" and ranked["queries"]["ranked"] == 3
    text_of = {r["passage_id"]: f"{r['title']} {r['text']}" for r in rows}
    cross = CrossEncoder(ce, device="cpu")
    mine, plain = [], []
    for row in Store(cfg.storage).rankings().to_arrow().to_pylist():
        assert len(set(row["doc_ids"])) == len(row["doc_ids"]) == 4
        plain += cross.predict([(row["query"], text_of[p]) for p in row["passage_ids"]]).tolist()
        mine += row["cross_encoder_scores"]
    mine, plain = np.array(mine), np.array(plain)
    spread = plain.max() - plain.min()
    if backend == "onnx-int8":
        assert np.corrcoef(mine, plain)[0, 1] >= 0.95 and np.abs(mine - plain).max() <= 0.15 * spread
    else:
        assert np.abs(mine - plain).max() <= 1e-4 * max(spread, 1e-3)
