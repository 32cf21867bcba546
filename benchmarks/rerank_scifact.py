"""Rerank job vs plain ``CrossEncoder.predict`` on SciFact's 300 test claims, and lookup latency.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/rerank_scifact.py [--data ../shared/data/scifact]

One run, same machine, same pairs:
1. ``passages``: the full SciFact corpus indexed with the packaged all-MiniLM-L6-v2 (``jobs.index``;
   reused when already there);
2. a reranker trained by ``jobs.train_reranker`` on the TRAIN judgments only (cached by fingerprint);
3. a query log of the 300 test claims, reranked by ``python -m jobs.rerank`` end to end (Ray start,
   retrieve top-k, cross-encoder on an actor pool, one commit), as a separate process;
4. baseline: the same candidates (the ``Retriever`` stage called in-process; checked against the
   rankings' retrieval ranks) scored by plain ``CrossEncoder.predict`` in one process on all cores,
   at its best batch size; the top-n from the baseline's scores is checked against the rankings;
5. lookup latency: single lookups (hits and misses) and one batch lookup of all 300.
Prints a table and writes ``benchmarks/results/rerank_scifact.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/scifact"))
    ap.add_argument("--work", default=str(Path("~/.batchrank/bench-scifact").expanduser()))
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--top-n", type=int, default=20)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32, help="cross-encoder batch size of the rerank job")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--train-queries", type=int, default=400)
    ap.add_argument("--queries", type=int, default=None, help="first N test claims only (quick check)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/rerank_scifact.json"))
    args = ap.parse_args()
    data, work = Path(args.data), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    config = work / "rerank.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "storage": {"uri": str(work / "db")},
        "corpus": {"path": str(data / "corpus.jsonl")},
        "embed": {"model": "all-MiniLM-L6-v2", "batch_size": 16, "actors": 2},
        "query_log": {"path": str(work / "test-claims-log.jsonl")},
        "retrieve": {"k": args.k},
        "rerank": {"model": str(work / "reranker"), "top_n": args.top_n, "max_length": args.max_length,
                   "batch_size": args.batch_size, "actors": args.actors,
                   "cache": False},  # every pair scored by the model: the comparison is model against model
        "train": {"queries": str(data / "queries.jsonl"), "qrels": str(data / "qrels/train.tsv"),
                  "output": str(work / "reranker"), "max_queries": args.train_queries,
                  "negatives": {"per_query": 3, "range_max": 30}, "max_length": args.max_length},
    }, indent=1))
    from pipelines.config import load_config

    cfg = load_config(config)
    result: dict = {"machine": f"{os.cpu_count()} CPUs", "k": args.k, "top_n": args.top_n,
                    "max_length": args.max_length, "date": datetime.now(UTC).isoformat()}

    # 1-2. passages and the reranker (reused when up to date)
    if not _passages_ready(cfg, data):
        result["index_report"] = _job("index", config)
    result["train_report"] = _job("train_reranker", config)

    # 3. the test claims as a query log, reranked by the job
    claims = _test_claims(data)[: args.queries]
    now = datetime.now(UTC).isoformat()
    with open(cfg.query_log.path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"query": text, "timestamp": now}) + "\n" for text in claims)
    report = _job("rerank", config)
    result["rerank_report"] = report
    ours = report["pairs"]["per_second"]
    print(f"rerank job: {report['pairs']['scored']:,} pairs, {ours} pairs/s in the pipeline, "
          f"{report['pairs']['per_second_end_to_end']} end to end", flush=True)

    # 4. baseline on the same pairs
    baseline = _baseline(cfg, report)
    result["baseline"] = baseline
    result["ratio_pipeline"] = round(ours / baseline["pairs_per_second"], 3)
    result["ratio_end_to_end"] = round(report["pairs"]["per_second_end_to_end"] / baseline["pairs_per_second"], 3)

    # 5. lookups
    result["lookup"] = _lookup_latency(cfg, claims)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    lk = result["lookup"]
    print("\n| what | figure |\n|---|---|")
    print(f"| queries ranked | {report['queries']['ranked']} of {report['queries']['selected']} selected |")
    print(f"| pairs scored | {report['pairs']['scored']:,} (k={args.k}, max_length={args.max_length}) |")
    print(f"| plain CrossEncoder.predict (batch {baseline['batch_size']}) | {baseline['pairs_per_second']} pairs/s |")
    print(f"| rerank job, pipeline | {ours} pairs/s ({result['ratio_pipeline']}x) |")
    print(f"| rerank job, end to end | {report['pairs']['per_second_end_to_end']} pairs/s "
          f"({result['ratio_end_to_end']}x) |")
    print(f"| same top-{args.top_n} as the baseline | {baseline['same_top_n']} of {baseline['queries']} queries; "
          f"max score diff {baseline['max_score_diff']:.2e} |")
    print(f"| lookup, one query (hit) | p50 {lk['hit_ms_p50']} ms, p95 {lk['hit_ms_p95']} ms |")
    print(f"| lookup, one query (miss) | p50 {lk['miss_ms_p50']} ms |")
    print(f"| lookup, {lk['batch_queries']} queries at once | {lk['batch_ms']} ms |")
    print(f"\nwrote {args.out}")


def _job(name: str, config: Path) -> dict:
    """Run ``python -m jobs.<name>`` and return its JSON report."""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", f"jobs.{name}", "--config", str(config)], cwd=ROOT,
                         capture_output=True, text=True)
    sys.stderr.write(out.stderr[-3000:])
    print(out.stdout, flush=True)
    if out.returncode != 0:
        raise SystemExit(f"jobs.{name} failed ({out.returncode})")
    path = next(line.split("report: ", 1)[1].strip() for line in out.stdout.splitlines() if "report: " in line)
    report = json.loads(Path(path).read_text())
    report["wall_seconds"] = round(time.perf_counter() - t, 1)
    return report


def _passages_ready(cfg, data: Path) -> bool:
    from pipelines.store import Store

    store = Store(cfg.storage)
    table = store.open(cfg.storage.passages_table)
    n = sum(1 for _ in (data / "corpus.jsonl").open())
    return table is not None and table.count_rows() == n and store.passages_model() == cfg.embed.model


def _test_claims(data: Path) -> list[str]:
    texts = {q["_id"]: q["text"] for q in map(json.loads, (data / "queries.jsonl").open())}
    ids = dict.fromkeys(line.split("\t")[0] for line in list((data / "qrels/test.tsv").open())[1:])
    return [texts[q] for q in ids]


def _baseline(cfg, report: dict) -> dict:
    """The same candidates, scored by plain CrossEncoder.predict at its best batch size."""
    from sentence_transformers import CrossEncoder

    from pipelines.lookup import Rankings
    from pipelines.rerank.query_log import read_query_log
    from pipelines.rerank.retrieve import Retriever

    selected = read_query_log(cfg.query_log).selected
    version = report["tables"]["passages"]["version"]
    retriever = Retriever(cfg.storage, cfg.index, passages_version=version, model=cfg.embed.model, k=cfg.retrieve.k,
                          device="cpu", num_threads=os.cpu_count())
    cands = retriever(selected).to_pylist()
    pairs = [(row["query"], text) for row in cands for text in row["_cand_texts"]]
    model = CrossEncoder(cfg.rerank.model, device="cpu", max_length=cfg.rerank.max_length)
    probe = pairs[:640]
    speeds = {}
    for bs in (16, 32, 64):
        model.predict(probe[:64], batch_size=bs, show_progress_bar=False)  # warm-up
        t = time.perf_counter()
        model.predict(probe, batch_size=bs, show_progress_bar=False)
        speeds[bs] = len(probe) / (time.perf_counter() - t)
    best = max(speeds, key=speeds.get)
    print(f"baseline batch sizes (pairs/s on {len(probe)} pairs): "
          + ", ".join(f"{k}: {v:.1f}" for k, v in speeds.items()), flush=True)
    t = time.perf_counter()
    scores = model.predict(pairs, batch_size=best, show_progress_bar=False)
    seconds = time.perf_counter() - t

    stored = {r.query: r for r in Rankings(cfg, with_documents=False).lookup_many([c["query"] for c in cands])}
    same, ranks_ok, max_diff, offset = 0, 0, 0.0, 0
    top_n = cfg.rerank.top_n
    for row in cands:
        ids = row["_cand_ids"]
        s = np.asarray(scores[offset:offset + len(ids)])
        offset += len(ids)
        ranking = stored[row["query"]]
        ours = [h.id for h in ranking.hits]
        ranks_ok += all(ids[h.retrieval_rank - 1] == h.id for h in ranking.hits)
        order = np.argsort(-s, kind="stable")[:top_n]
        same += [ids[i] for i in order] == ours
        max_diff = max(max_diff, float(np.max(np.abs(s[order] - np.asarray([h.score for h in ranking.hits])))))
    return {"pairs": len(pairs), "seconds": round(seconds, 2), "pairs_per_second": round(len(pairs) / seconds, 2),
            "batch_size": best, "batch_size_probe": {k: round(v, 2) for k, v in speeds.items()},
            "queries": len(cands), "same_candidates": ranks_ok, "same_top_n": same, "max_score_diff": max_diff}


def _lookup_latency(cfg, claims: list[str]) -> dict:
    from pipelines.lookup import Rankings

    rankings = Rankings(cfg)
    rankings.lookup(claims[0])  # warm: open tables, load indexes

    def timed(queries):
        out = []
        for q in queries:
            t = time.perf_counter()
            rankings.lookup(q, n=10)
            out.append((time.perf_counter() - t) * 1000)
        return out

    hits = timed(claims)
    misses = timed([f"{c} (never searched)" for c in claims])
    t = time.perf_counter()
    found = rankings.lookup_many(claims, n=10)
    batch_ms = (time.perf_counter() - t) * 1000
    assert all(f is not None for f in found)

    def pct(xs, p):
        return round(float(np.percentile(xs, p)), 2)

    return {"hit_ms_p50": pct(hits, 50), "hit_ms_p95": pct(hits, 95), "hit_ms_mean": round(statistics.mean(hits), 2),
            "miss_ms_p50": pct(misses, 50), "miss_ms_p95": pct(misses, 95), "batch_queries": len(claims),
            "batch_ms": round(batch_ms, 1), "documents_joined_per_hit": 10}


if __name__ == "__main__":
    main()
