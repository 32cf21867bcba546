"""ANN recall@10 against exact search on real embeddings, and what the bounded training sample costs.

    HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/ann_recall.py \
        [--db ~/.batchrank/passages-scifact/db --table passages_scifact_passages] [--sample-rates 256 32 8]

The vectors are a real table: SciFact's 5,183 abstracts split into 10,299 passages and embedded with
all-MiniLM-L6-v2 by the index job (``benchmarks/passages_scifact.py`` builds it; run that first). The queries are
real too, embedded with the same model: the 6,980 MS MARCO dev queries (``../shared/data/msmarco-passage-dev-queries``,
read from there, never copied) and SciFact's 300 test claims. They are not SciFact's topic, which is the point: a
query log asks about anything.

For each ``index.ann.sample_rate`` (vectors sampled per IVF partition to train the index; the default 256 bounds the
training at num_partitions x 256 vectors, whatever the table's size), the index the job builds (``ann_config``:
IVF-HNSW-SQ, round(sqrt(n) / 2) partitions; searched as the job searches, ``Store.search``, nprobes 20) is trained on
a copy of the table, timed, with the process's peak RSS during the build, and every query's top 10 compared with the
exact top 10 (``Store.search(exact=True)``: every vector, cosine). At 10,299 rows the default trains on the whole
table (51 partitions x 256 > rows); the smaller rates train on 16% (32), 4% (8) and 1% (2) of it, the shares the
default takes at about 1M rows (500 x 256 = 128k: 13%), 4M (1,000 x 256: 6%) and 100M (4,096 x 256: 1%).
Writes ``benchmarks/results/ann_recall.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LANCE_LOG", "error")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", default=os.path.expanduser("~/.batchrank/passages-scifact/db"))
    ap.add_argument("--table", default="passages_scifact_passages")
    ap.add_argument("--sample-rates", type=int, nargs="+", default=[256, 32, 8, 2])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/ann_recall.json"))
    args = ap.parse_args()

    import lancedb
    import psutil

    from benchmarks.common import cpu_model
    from pipelines.config import parse_config
    from pipelines.store import Store
    from pipelines.store.search import ann_config

    src = Path(args.db) / f"{args.table}.lance"
    if not src.exists():
        raise SystemExit(f"{src} is missing: build it first with `.venv/bin/python benchmarks/passages_scifact.py`")
    work = Path(tempfile.mkdtemp(prefix="batchrank-ann-recall-"))
    shutil.copytree(src, work / f"{args.table}.lance")
    table = lancedb.connect(str(work)).open_table(args.table)
    rows = table.to_arrow()
    ids = rows["passage_id"].to_pylist()
    vectors = np.stack(rows["vector"].to_numpy(zero_copy_only=False)).astype(np.float32)
    model = rows["model"][0].as_py()
    queries = _queries()
    qvecs = _embed(model, [q for _, q in queries])
    cfg = parse_config({"storage": {"uri": str(work), "passages_table": args.table}, "corpus": {"path": "x.jsonl"}})
    store = Store(cfg.storage)
    exact_ids = [set(store.search(v, k=args.k, index_cfg=cfg.index, exact=True, columns=["passage_id"],
                                  table=table)["passage_id"].to_pylist()) for v in qvecs]
    proc, runs = psutil.Process(), []
    for rate in args.sample_rates:
        ann = cfg.index.ann = cfg.index.ann.model_copy(update={"sample_rate": rate, "min_rows": 0})
        config, params = ann_config("ivf_hnsw_sq", cfg.index.metric, ann, len(ids), vectors.shape[1])
        for ix in table.list_indices():
            if ix.name == "vector_idx":
                table.drop_index("vector_idx")
        peak, stop = [proc.memory_info().rss], threading.Event()

        def sample(peak=peak, stop=stop) -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.02)

        before = proc.memory_info().rss
        watcher = threading.Thread(target=sample, daemon=True)
        watcher.start()
        started = time.monotonic()
        table.create_index("vector", config=config, replace=True)
        build = time.monotonic() - started
        table.checkout_latest()
        stop.set()
        watcher.join()
        searches = {"defaults": {}}  # the job's search settings; at the default rate also two ways to buy recall
        if rate == args.sample_rates[0]:
            searches.update({"refine_factor 4": {"refine_factor": 4}, "ef 200": {"ef": 200}})
        recall = {}
        for label, extra in searches.items():
            cfg.index.ann = ann.model_copy(update=extra)
            hits = {"msmarco": 0, "scifact": 0}
            started = time.monotonic()
            for qi, v in enumerate(qvecs):
                got = store.search(v, k=args.k, index_cfg=cfg.index, columns=["passage_id"],
                                   table=table)["passage_id"].to_pylist()
                hits[queries[qi][0]] += len(exact_ids[qi] & set(got))
            n = {s: sum(1 for q in queries if q[0] == s) for s in hits}
            recall[label] = {"recall_at_10": round(sum(hits.values()) / (args.k * len(qvecs)), 4),
                             **{f"recall_at_10_{s}": round(hits[s] / (args.k * n[s]), 4) for s in hits},
                             "queries_per_second": round(len(qvecs) / (time.monotonic() - started), 1), **extra}
        cfg.index.ann = ann
        runs.append({"sample_rate": rate, **params, "build_seconds": round(build, 2),
                     "build_rss_growth_mib": round((peak[0] - before) / 2**20), "nprobes": ann.nprobes,
                     "recall_at_10": recall["defaults"]["recall_at_10"], "search": recall})
        print(f"sample_rate {rate:>4}: {params['train_sample_rows']:>6,} training vectors of {len(ids):,}, built in "
              f"{build:.1f} s (+{runs[-1]['build_rss_growth_mib']} MiB), recall@{args.k} "
              + ", ".join(f"{k} {v['recall_at_10']:.4f} (MS MARCO {v['recall_at_10_msmarco']:.4f}, SciFact "
                          f"{v['recall_at_10_scifact']:.4f})" for k, v in recall.items()), flush=True)
    result = {"benchmark": "ann_recall", "command": "python " + " ".join(sys.argv),
              "date": datetime.now(UTC).isoformat(), "machine": {"cpu": cpu_model(), "cpus": os.cpu_count()},
              "table": {"source": str(src), "rows": len(ids), "model": model, "dim": int(vectors.shape[1])},
              "queries": {"msmarco_dev": sum(1 for s, _ in queries if s == "msmarco"),
                          "scifact_test": sum(1 for s, _ in queries if s == "scifact")},
              "index": "ivf_hnsw_sq (the index job's default), cosine", "runs": runs}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(f"CPU: {cpu_model()}; wrote {args.out}")


def _queries() -> list[tuple[str, str]]:
    out = [("msmarco", json.loads(line)["text"])
           for line in (SHARED / "msmarco-passage-dev-queries" / "queries.jsonl").open(encoding="utf-8")]
    scifact = SHARED / "scifact"
    test = {line.split("\t")[0] for line in list((scifact / "qrels" / "test.tsv").open())[1:]}
    out += [("scifact", q["text"]) for q in map(json.loads, (scifact / "queries.jsonl").open()) if q["_id"] in test]
    return out


def _embed(model: str, texts: list[str]) -> np.ndarray:
    from pipelines.models import load_bi_encoder

    encoder = load_bi_encoder(model, device="cpu")
    return np.asarray(encoder.encode(texts, batch_size=64, normalize_embeddings=True), dtype=np.float32)


if __name__ == "__main__":
    main()
