"""Quality and speed of the bi-encoder backends on SciFact: exact vector retrieval over the full corpus
(../shared/data/scifact), test judgments, all-MiniLM-L6-v2 with each embed.backend and dtype (torch float32, the
baseline; torch auto: bf16 autocast where the CPU runs bf16; onnx, onnx-int8; openvino float32 and auto; openvino-int8),
the same texts in the same process, on all cores. Prints nDCG@10, MRR@10, recall@100 and encode docs/s per backend,
with the speed-up and the nDCG@10 difference against torch float32; writes
benchmarks/results/backend_quality_scifact.json.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/backend_quality_scifact.py   # about 17 minutes on 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/backend_quality_scifact.py --backends "torch float32,openvino-int8 auto"
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


BACKENDS = "torch float32,torch auto,onnx auto,onnx-int8 auto,openvino float32,openvino auto,openvino-int8 auto"


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default=BACKENDS, help="comma list of 'backend dtype' (the first is the baseline)")
    args = ap.parse_args()
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
    variants = [tuple(v.split()) for v in args.backends.split(",")]
    for backend, dtype in variants:
        model = load_bi_encoder("all-MiniLM-L6-v2", device="cpu", backend=backend, dtype=dtype, threads=threads,
                                batch_tokens=0)
        model.encode(texts[:16], normalize_embeddings=True)  # warm (an OpenVINO int8 export is made once, cached)
        start = time.perf_counter()
        emb = np.asarray(model.encode(texts, batch_size=16, normalize_embeddings=True))
        seconds = time.perf_counter() - start
        qv = np.asarray(model.encode([queries[q] for q in qids], batch_size=16, normalize_embeddings=True))
        scores = qv @ emb.T  # exact search
        run = {q: {docs[j]["_id"]: float(scores[i, j]) for j in np.argsort(-scores[i])[:100]}
               for i, q in enumerate(qids)}
        measured = ir_measures.calc_aggregate([nDCG @ 10, RR @ 10, R @ 100], qrels, run)
        label = f"{backend} {dtype}"
        results[label] = {"docs_per_second": round(len(texts) / seconds, 1),
                          **{str(k): round(v, 4) for k, v in measured.items()}}
        base = results[" ".join(variants[0])]
        results[label].update(speedup=round(results[label]["docs_per_second"] / base["docs_per_second"], 2),
                              ndcg10_delta=round(results[label]["nDCG@10"] - base["nDCG@10"], 4))
        print(label, results[label], flush=True)
        del model
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
        cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "?")
    OUT.write_text(json.dumps({"cpu": cpu, "docs": len(texts), "queries": len(qids), "threads": threads,
                               "baseline": " ".join(variants[0]), "results": results}, indent=2) + "\n")
    for label, r in results.items():
        print(f"{label:22s} {r['docs_per_second']:7.1f} docs/s  {r['speedup']:5.2f}x  nDCG@10 {r['nDCG@10']:.4f} "
              f"({r['ndcg10_delta']:+.4f})")
    print(f"wrote {OUT} ({cpu})")


if __name__ == "__main__":
    main()
