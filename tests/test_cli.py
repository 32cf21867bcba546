"""The command line answers fast and without torch; jobs are thin and fail with clear messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_help_does_not_import_heavy_libraries():
    code = ("import sys; from typer.testing import CliRunner; from pipelines.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "assert 'index' in r.output and 'search' in r.output; "
            "heavy = [m for m in ('torch', 'ray', 'lancedb', 'sentence_transformers') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_console_script_help():
    exe = Path(sys.executable).parent / "batchrank"
    if not exe.exists():
        import pytest

        pytest.skip("batchrank console script not installed (pip install -e .)")
    out = subprocess.run([str(exe), "index", "--help"], capture_output=True, text=True, check=True)
    assert "--config" in out.stdout


def test_job_with_bad_config_exits_2_and_names_the_key(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("corpus:\n  path: x.jsonl\nembed:\n  batch_size: 0\n")
    out = subprocess.run([sys.executable, "-m", "jobs.index", "--config", str(cfg)], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "embed.batch_size" in out.stderr and "(got 0)" in out.stderr


def test_job_with_missing_corpus_exits_1_with_the_path(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"storage:\n  uri: {tmp_path / 'db'}\ncorpus:\n  path: {tmp_path / 'missing.jsonl'}\n")
    out = subprocess.run([sys.executable, "-m", "jobs.index", "--config", str(cfg)], cwd=ROOT,
                         capture_output=True, text=True, env={"RAY_AUTH_MODE": "disabled", "PATH": "/usr/bin:/bin",
                                                              "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 1
    assert "missing.jsonl" in out.stderr and "does not exist" in out.stderr


def test_search_hybrid_prints_the_fusion_of_the_vector_and_full_text_lists(tmp_path, make_config, tiny_model):
    """`batchrank search --source hybrid` on passages written in-process (no Ray): its hits are exactly the
    convex fusion (0.5 x min-max scaled score of each list, summed) of the vector hits, which match an exact search recomputed
    here, and the full-text hits, best first; the plain output lists the same documents. At document level the
    fusion ranks k x retrieve.passage_hits passages of each list (one passage per document here)."""
    import json

    import numpy as np
    import yaml
    from conftest import good_docs
    from sentence_transformers import SentenceTransformer
    from test_train import build_passages
    from typer.testing import CliRunner

    from pipelines.cli import app
    from pipelines.store import Store

    docs, query, k = good_docs(30), "cancer risk number 11", 5
    cfg = make_config(tmp_path / "docs.jsonl")  # (the corpus file is never read: passages are written directly)
    build_passages(cfg, docs, tiny_model)
    Store(cfg.storage).ensure_indexes(cfg.index)  # the full-text index, as the index job builds it
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))

    def search(source: str, *extra: str, n: int = k) -> str:
        result = CliRunner().invoke(app, ["search", "--config", str(path), query, "-k", str(n), "--source", source,
                                          *extra])
        assert result.exit_code == 0, result.output
        return result.stdout

    def hits(source: str, n: int = k) -> list[dict]:
        return [json.loads(line) for line in search(source, "--json", n=n).splitlines() if line.startswith("{")]

    deep = k * cfg.retrieve.passage_hits  # what the hybrid search fuses
    vector, fts, hybrid = hits("vector", deep), hits("fts", deep), hits("hybrid")
    model = SentenceTransformer(tiny_model, device="cpu")
    doc_vecs = model.encode([f"{d['title']} {d['text']}" for d in docs], normalize_embeddings=True)
    exact = np.argsort(-(doc_vecs @ model.encode([query], normalize_embeddings=True)[0]), kind="stable")[:deep]
    assert [h["id"] for h in vector] == [docs[i]["_id"] for i in exact]
    assert len(fts) == deep and all({"cancer", "risk", "11"} & set(h["text"].split()) for h in fts[:k])
    assert {h["id"] for h in vector} != {h["id"] for h in fts}  # two different lists: the fusion is not trivial

    def scaled(hits: list[dict]) -> dict[str, float]:  # min-max over the list
        lo, hi = min(h["score"] for h in hits), max(h["score"] for h in hits)
        return {h["id"]: (h["score"] - lo) / (hi - lo) for h in hits}

    v, f = scaled(vector), scaled(fts)
    fused = {d: 0.5 * v.get(d, 0.0) + 0.5 * f.get(d, 0.0) for d in [*v, *(d for d in f if d not in v)]}
    expected = sorted(fused.items(), key=lambda item: -item[1])[:k]  # stable: the vector side's order breaks ties
    assert [h["id"] for h in hybrid] == [d for d, _ in expected], (hybrid, expected)
    assert np.allclose([h["score"] for h in hybrid], [s for _, s in expected], rtol=1e-6)
    assert [h["rank"] for h in hybrid] == list(range(1, k + 1))
    by_id = {d["_id"]: d for d in docs}
    assert all(h["text"] == by_id[h["id"]]["text"] and h["title"] == by_id[h["id"]]["title"] for h in hybrid)

    lines = search("hybrid").splitlines()  # the plain listing: rank, score, [id] title
    assert [line.split("[", 1)[1].split("]", 1)[0] for line in lines] == [h["id"] for h in hybrid]
    assert lines[0].split()[:2] == ["1.", f"{hybrid[0]['score']:.4f}"]

    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json") | {  # reciprocal rank instead: 1 / (60 + rank)
        "retrieve": {**cfg.retrieve.model_dump(mode="json"), "hybrid_fusion": "rrf"}}))
    rrf: dict[str, float] = {}
    for ranked in ([h["id"] for h in vector], [h["id"] for h in fts]):
        for rank, doc in enumerate(ranked, 1):
            rrf[doc] = rrf.get(doc, 0.0) + 1 / (60 + rank)
    expected = sorted(rrf.items(), key=lambda item: -item[1])[:k]
    by_rank = hits("hybrid")
    assert [h["id"] for h in by_rank] == [d for d, _ in expected]
    assert np.allclose([h["score"] for h in by_rank], [s for _, s in expected], rtol=1e-6)
