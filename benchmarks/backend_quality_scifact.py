"""Quality and speed of the bi-encoder backends on SciFact: exact vector retrieval over the full corpus
(../shared/data/scifact), test judgments, all-MiniLM-L6-v2 with embed.backend torch and onnx-int8, the same texts in
the same process, each at batch size 16 on all cores. Prints nDCG@10, MRR@10, recall@100 and encode docs/s per
backend; writes benchmarks/results/backend_quality_scifact.json.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/backend_quality_scifact.py   # about 4 minutes on 2 cores
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "scifact"
OUT = ROOT / "benchmarks" / "results" / "backend_quality_scifact.json"


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def main() -> None:
    import ir_measures
    import torch
    from ir_measures import RR, R, nDCG

    from pipelines.models import load_bi_encoder

    docs = read_jsonl(DATA / "corpus.jsonl")
    queries = {q["_id"]: q["text"] for q in read_jsonl(DATA / "queries.jsonl")}
    qrels: dict[str, dict[str, int]] = {}
    with (DATA / "qrels" / "test.tsv").open(encoding="utf-8") as fh:
        rows = csv.reader(fh, delimiter="\t")
        next(rows)
        for q, d, score in rows:
            qrels.setdefault(q, {})[d] = int(score)
    qids = sorted(qrels)
    texts = [f"{d.get('title', '')} {d['text']}" for d in docs]
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    results = {}
    for backend in ("torch", "onnx-int8"):
        model = load_bi_encoder("all-MiniLM-L6-v2", device="cpu", backend=backend, threads=threads)
        start = time.perf_counter()
        emb = np.asarray(model.encode(texts, batch_size=16, normalize_embeddings=True))
        seconds = time.perf_counter() - start
        qv = np.asarray(model.encode([queries[q] for q in qids], batch_size=16, normalize_embeddings=True))
        scores = qv @ emb.T  # exact search
        run = {q: {docs[j]["_id"]: float(scores[i, j]) for j in np.argsort(-scores[i])[:100]}
               for i, q in enumerate(qids)}
        measured = ir_measures.calc_aggregate([nDCG @ 10, RR @ 10, R @ 100], qrels, run)
        results[backend] = {"docs_per_second": round(len(texts) / seconds, 1),
                            **{str(k): round(v, 4) for k, v in measured.items()}}
        print(backend, results[backend], flush=True)
    int8, base = results["onnx-int8"], results["torch"]
    int8.update(speedup=round(int8["docs_per_second"] / base["docs_per_second"], 2),
                ndcg10_delta=round(int8["nDCG@10"] - base["nDCG@10"], 4))
    OUT.write_text(json.dumps({"docs": len(texts), "queries": len(qids), "threads": threads, "results": results},
                              indent=2) + "\n")
    print(f"onnx-int8: {int8['speedup']}x torch encode, nDCG@10 {int8['ndcg10_delta']:+.4f}; wrote {OUT}")


if __name__ == "__main__":
    main()
