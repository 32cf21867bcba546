"""Index job vs plain ``SentenceTransformer.encode`` on SciFact, and ANN recall vs exact search.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/index_scifact.py [--data ../shared/data/scifact] [--limit N]

One run, same machine, same texts (title + " " + text, as the index job builds them):
1. baseline: plain ``SentenceTransformer.encode(texts, batch_size=16)`` in one process, all cores;
2. batchrank: ``python -m jobs.index`` end to end (Ray start, read, validate, embed, LanceDB commit,
   indexes) with the packaged all-MiniLM-L6-v2, as a separate process;
3. the stored vectors are checked against the baseline's (same model, so cosine ~ 1);
4. recall@10 of several ANN indexes against exact search, over 100 SciFact test queries.
Prints a table and writes ``benchmarks/results/index_scifact.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ANN_VARIANTS = {
    "ivf_flat": {"type": "ivf_flat", "num_partitions": 36, "nprobes": 8},
    "ivf_hnsw_sq": {"type": "ivf_hnsw_sq", "num_partitions": 4, "nprobes": 4, "ef": 100},
    "ivf_pq": {"type": "ivf_pq", "num_partitions": 36, "num_sub_vectors": 48, "nprobes": 8, "refine_factor": 10},
}
CHOSEN = "ivf_hnsw_sq"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/scifact"))
    ap.add_argument("--limit", type=int, default=None, help="first N documents only (quick check)")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--cpus-per-actor", type=float, default=1.0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/index_scifact.json"))
    args = ap.parse_args()
    data = Path(args.data)
    work = Path(tempfile.mkdtemp(prefix="batchrank-bench-"))
    corpus = work / "corpus.jsonl"
    with (data / "corpus.jsonl").open() as src, corpus.open("w") as dst:
        for i, line in enumerate(src):
            if args.limit and i >= args.limit:
                break
            dst.write(line)
    docs = [json.loads(line) for line in corpus.open()]
    texts = [" ".join(p for p in (d["title"], d["text"]) if p) for d in docs]
    print(f"{len(texts):,} documents from {data}", flush=True)

    # 1. baseline: what a user would write
    from sentence_transformers import SentenceTransformer

    from pipelines.models import resolve_model

    model = SentenceTransformer(resolve_model("all-MiniLM-L6-v2"), device="cpu")
    model.encode(texts[:32], batch_size=16)  # warm-up, as a user's second call would be
    t = time.perf_counter()
    baseline_vecs = model.encode(texts, batch_size=16, normalize_embeddings=True, convert_to_numpy=True)
    baseline_s = time.perf_counter() - t
    print(f"plain encode: {baseline_s:.1f}s, {len(texts) / baseline_s:.2f} docs/s", flush=True)

    # 2. batchrank index job, end to end, in its own process
    cfg_path = work / "index.yaml"
    ann = {k: v for k, v in ANN_VARIANTS[CHOSEN].items()}
    cfg_path.write_text(json.dumps({
        "storage": {"uri": str(work / "db")},
        "corpus": {"path": str(corpus)},
        "embed": {"model": "all-MiniLM-L6-v2", "batch_size": 16, "actors": args.actors,
                  "cpus_per_actor": args.cpus_per_actor},
        "index": {"metric": "cosine", "ann": {**ann, "min_rows": 0}},
    }))
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "jobs.index", "--config", str(cfg_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    job_s = time.perf_counter() - t
    if proc.returncode != 0:
        print(proc.stdout, proc.stderr)
        raise SystemExit("index job failed")
    print(proc.stdout, flush=True)
    reports = sorted((work / "db/_reports").glob("index-*.json"))
    report = json.loads(reports[-1].read_text())

    # 3. same vectors as the baseline?
    from pipelines.config import parse_config
    from pipelines.store import Store

    cfg = parse_config(json.loads(cfg_path.read_text()))
    store = Store(cfg.storage)
    table = store.passages().to_arrow()
    by_id = dict(zip(table["id"].to_pylist(), np.stack(table["vector"].to_numpy(zero_copy_only=False)), strict=True))
    stored = np.stack([by_id[d["_id"]] for d in docs])
    cos = np.sum(stored * baseline_vecs, axis=1)

    # 4. ANN recall@10 vs exact, over test queries
    qids = [line.split("\t")[0] for line in list((data / "qrels/test.tsv").open())[1:]]
    qids = list(dict.fromkeys(qids))[: args.queries]
    qtext = {q["_id"]: q["text"] for q in map(json.loads, (data / "queries.jsonl").open())}
    qvecs = model.encode([qtext[q] for q in qids], normalize_embeddings=True)
    recall = {}
    for name in [CHOSEN] + [n for n in ANN_VARIANTS if n != CHOSEN]:  # the job built CHOSEN already
        variant = ANN_VARIANTS[name]
        cfg.index.ann = cfg.index.ann.model_validate({**variant, "min_rows": 0})
        if name != CHOSEN:
            store.passages().drop_index("vector_idx")
        t = time.perf_counter()
        built = store.ensure_indexes(cfg.index) if name != CHOSEN else report["indexes"]
        build_s = time.perf_counter() - t
        hits = 0
        t = time.perf_counter()
        for v in qvecs:
            exact = set(store.search(v, k=10, index_cfg=cfg.index, exact=True)["id"].to_pylist())
            approx = set(store.search(v, k=10, index_cfg=cfg.index)["id"].to_pylist())
            hits += len(exact & approx)
        search_s = time.perf_counter() - t
        recall[name] = {"recall@10": round(hits / (10 * len(qvecs)), 4), "params": variant,
                        "build_seconds": round(build_s, 2) if name != CHOSEN else report["seconds"]["upkeep"],  # the job builds it in upkeep
                        "ann_info": built.get("ann"), "search_pairs_seconds": round(search_s, 2)}
    store.passages().drop_index("vector_idx")
    cfg.index.ann = cfg.index.ann.model_validate({**ANN_VARIANTS[CHOSEN], "min_rows": 0})
    store.ensure_indexes(cfg.index)

    result = {
        "documents": len(texts),
        "machine": {"cpus": os.cpu_count()},
        "baseline_plain_encode": {"seconds": round(baseline_s, 2), "docs_per_second": round(len(texts) / baseline_s, 2),
                                  "batch_size": 16},
        "index_job": {"wall_seconds": round(job_s, 2), "docs_per_second_end_to_end": round(len(texts) / job_s, 2),
                      "docs_per_second_pipeline": report["docs_per_second"], "report": report},
        "ratio_end_to_end": round(baseline_s / job_s, 3),
        "ratio_pipeline": round(report["docs_per_second"] / (len(texts) / baseline_s), 3),
        "vectors_vs_baseline": {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())},
        "passages_rows": store.passages().count_rows(),
        "ann_recall_at_10_vs_exact": recall,
        "ann_chosen": CHOSEN,
        "queries": len(qvecs),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print("\n| what | seconds | docs/s | ratio vs plain encode |\n|---|---|---|---|")
    print(f"| plain SentenceTransformer.encode (batch 16) | {baseline_s:.1f} | {len(texts) / baseline_s:.2f} | 1.00 |")
    print(f"| batchrank index job, end to end (python -m jobs.index) | {job_s:.1f} | {len(texts) / job_s:.2f} | "
          f"{result['ratio_end_to_end']:.2f} |")
    print(f"| batchrank pipeline (read->embed->stage, excl. Ray start and indexes) | "
          f"{report['seconds']['pipeline']:.1f} | {report['docs_per_second']:.2f} | {result['ratio_pipeline']:.2f} |")
    print(f"\nvectors vs baseline: min cosine {cos.min():.6f}; passages rows {result['passages_rows']:,}")
    for name, r in recall.items():
        print(f"ANN {name}: recall@10 vs exact {r['recall@10']:.3f} ({r['params']})")
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
